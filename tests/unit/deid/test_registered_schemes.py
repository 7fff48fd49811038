"""The registered coding schemes (codes of these are kept, not replaced by a dummy code)
include every scheme pydicom's PS3.16 concept dictionaries know, without importing them."""

from __future__ import annotations

from pydicom.sr import _concepts_dict

from deid_router.deid.actions import REGISTERED_SCHEMES


def test_every_scheme_of_pydicoms_concept_dictionaries_is_registered() -> None:
    assert set(_concepts_dict.concepts) <= REGISTERED_SCHEMES
