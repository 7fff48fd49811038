"""Test support: real DICOM peers (peers.py), test data (corpus.py), the router process (router.py)."""
