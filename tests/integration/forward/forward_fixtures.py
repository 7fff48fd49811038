"""Helpers for forwarding tests: deliveries built from pydicom's bundled files, destination configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from deid_router.config import DestinationConfig
from deid_router.forward.base import Delivery


def bundled(name: str) -> Path:
    """A file bundled with pydicom (never one that needs downloading)."""
    found = get_testdata_file(name, download=False)
    if found is None:
        pytest.skip(f"pydicom test file {name} is not bundled")
    return Path(str(found))


def delivery_for(path: Path, job_id: int) -> Delivery:
    ds = dcmread(path, stop_before_pixels=True)
    return Delivery(
        job_id=job_id,
        path=path,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
    )


def copies(src: Path, out_dir: Path, n: int, first_job_id: int = 1) -> list[Delivery]:
    """``n`` copies of ``src`` with fresh 2.25 SOPInstanceUIDs (like de-identified output)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = dcmread(src)
    items = []
    for i in range(n):
        uid = generate_uid(prefix=None)
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        path = out_dir / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        items.append(delivery_for(path, first_job_id + i))
    return items


def dicom_cfg(port: int, ae_title: str = "FAKEPACS", **kw: Any) -> DestinationConfig:
    base: dict[str, Any] = dict(
        connect_timeout_seconds=2.0,
        acse_timeout_seconds=5.0,
        dimse_timeout_seconds=10.0,
        network_timeout_seconds=30.0,
    )
    base.update(kw)
    return DestinationConfig(name="pacs", type="dicom", ae_title=ae_title, host="127.0.0.1", port=port, **base)
