"""deid-router: a DICOM node that holds, de-identifies and forwards instances without losing any."""

__version__ = "0.1.0"
