"""The router's fast path: de-identify the header, copy the pixel element's bytes untouched.

Pixel data is never decoded nor loaded whole (instances can be several GB). Whatever follows
the pixel element in the input (Digital Signatures Sequence, trailing padding...) is dropped,
so it cannot carry PHI through.
"""

from __future__ import annotations

import errno
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from pydicom import dcmread
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from deid_router.deid.reader import read_header
from deid_router.deid.writer import write_header
from deid_router.elements import PIXEL_DATA_TAGS, Malformed, Window, elements
from deid_router.errors import DeidError, InfrastructureError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from deid_router.config import DeidConfig
    from deid_router.deid.pixel_rules import PixelRule


@dataclass(frozen=True)
class DeidResult:
    """What the caller of a de-identified file needs of its output (UIDs are output UIDs)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str


class HeaderEngine(Protocol):
    """What this module asks of the engine (``deid.engine.Deidentifier``, which imports this
    module; this one does not import it back)."""

    config: DeidConfig

    def deidentify(self, ds: Dataset) -> Dataset: ...

    def pixel_decision(self, ds: Dataset) -> PixelRule | None: ...

    def strong_identifiers(self, ds: Dataset) -> set[str]: ...

    def result_of(self, ds: Dataset) -> DeidResult: ...


_CHUNK = 1 << 20
# copy_file_range refuses these pairs (another filesystem, a pipe, an old kernel): copy in Python
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF})


def pixel_element_end(fp: BinaryIO, start: int, size: int, little: bool, implicit: bool) -> int:
    """Offset just past the pixel element that starts at ``start`` (native or encapsulated)."""
    try:
        for _pos, tag, _vr, _length, _value, end in elements(Window(fp, size), start, size, implicit, little):
            if tag not in PIXEL_DATA_TAGS:
                raise DeidError("invalid_dataset", "unexpected element where pixel data should start", "PixelData")
            return end
    except Malformed as exc:
        raise DeidError("invalid_dataset", f"pixel data: {exc}", "PixelData") from exc
    raise DeidError("invalid_dataset", "no pixel data element", "PixelData")


def copy_range(fp: BinaryIO, dst: BinaryIO, start: int, end: int) -> None:
    """Append bytes ``start:end`` of ``fp`` to ``dst``: in the kernel where it can, else read/write."""
    if _kernel_copy(fp, dst, start, end):
        return
    fp.seek(start)
    remaining = end - start
    while remaining > 0:
        chunk = fp.read(min(_CHUNK, remaining))
        if not chunk:
            raise DeidError("invalid_dataset", "file shrank while copying pixel data", "PixelData")
        dst.write(chunk)
        remaining -= len(chunk)


def _kernel_copy(fp: BinaryIO, dst: BinaryIO, start: int, end: int) -> bool:
    """copy_file_range from ``fp`` at ``start`` to ``dst`` at its position; False when the
    kernel cannot copy between these two (an in-memory file, another filesystem, old kernel)."""
    try:
        dst.flush()
        out_fd = dst.fileno()
    except (io.UnsupportedOperation, AttributeError):
        return False
    pos = start
    while pos < end:
        try:
            copied = os.copy_file_range(fp.fileno(), out_fd, end - pos, pos)
        except OSError as exc:
            if pos == start and exc.errno in _NO_KERNEL_COPY:
                return False
            raise
        if not copied:
            raise DeidError("invalid_dataset", "file shrank while copying pixel data", "PixelData")
        pos += copied
    return True


def _known_encoding(ts: str) -> bool:
    """Whether the header encoding follows from the transfer syntax (else pydicom decides)."""
    if ts in (ImplicitVRLittleEndian, ExplicitVRBigEndian):
        return True
    uid = UID(ts)
    return bool(ts) and uid.is_transfer_syntax and not uid.is_private and not uid.is_deflated


def _deidentify_pixels(
    deid: HeaderEngine, ds: Dataset, rule: PixelRule, fp: BinaryIO, start: int, end: int, dst: BinaryIO,
    ts: str, little: bool, implicit: bool,
) -> DeidResult:
    """An image with burned-in text under ``burned_in_annotation = "clean"``: header, then its
    pixel element cleaned frame by frame (deid/pixels.py); OCR verifies when configured."""
    from deid_router.deid import pixels
    from deid_router.deid.pixel_rules import OCR_CLEAR

    strong = deid.strong_identifiers(ds) if deid.config.pixel_ocr else None
    if rule is OCR_CLEAR:
        assert strong is not None  # config validation: ocr_clear needs pixel_ocr
        pixels.ocr_clear(ds, ts, fp, start, little, implicit, strong)
        deid.deidentify(ds)
        ds.preamble = b"\0" * 128
        write_header(dst, ds, implicit, little)
        copy_range(fp, dst, start, end)
        return deid.result_of(ds)
    plan = pixels.make_plan(ds, ts, rule, ocr_frames=3 if strong is not None else 0)
    extended = pixels.extended_offsets(ds)
    deid.deidentify(ds)
    ds.preamble = b"\0" * 128
    pixels.apply_header(plan, ds)
    if plan.native_in:
        write_header(dst, ds, implicit, little)
    else:
        write_header(dst, ds, False, True)  # encapsulated inputs are explicit VR little endian
    pixels.write_cleaned(plan, ds, fp, start, dst, little, implicit, strong, extended)
    return deid.result_of(ds)


def deidentify_file(deid: HeaderEngine, src: Path, dst: BinaryIO) -> DeidResult:
    """Read the header only, de-identify it, write it in the same transfer syntax, copy pixels raw."""
    try:
        with open(src, "rb") as fp:
            fp.seek(0, 2)
            size = fp.tell()
            try:
                fast = read_header(fp, size)
            except Exception:  # noqa: BLE001 - pydicom's reader decides what is readable
                fast = None
            if fast is not None:
                ds, start = fast
            else:
                fp.seek(0)
                try:
                    ds = dcmread(fp, stop_before_pixels=True)
                except Exception as exc:
                    raise DeidError("invalid_dataset", "not a readable DICOM Part-10 file") from exc
                start = fp.tell()
            ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
            if ts == DeflatedExplicitVRLittleEndian:
                fp.seek(0)
                ds = dcmread(fp)
                start = size
            little = ts != ExplicitVRBigEndian
            implicit = ts == ImplicitVRLittleEndian
            has_pixels = start < size  # otherwise the header is the whole dataset
            end = pixel_element_end(fp, start, size, little, implicit) if has_pixels else size
            rule = deid.pixel_decision(ds) if has_pixels else None
            if rule is not None:
                return _deidentify_pixels(deid, ds, rule, fp, start, end, dst, ts, little, implicit)
            deid.deidentify(ds)
            ds.preamble = b"\0" * 128
            if _known_encoding(ts):
                write_header(dst, ds, implicit, little)
            else:
                dcmwrite(dst, ds, enforce_file_format=True)
            if has_pixels:
                copy_range(fp, dst, start, end)
            return deid.result_of(ds)
    except (DeidError, *InfrastructureError):
        raise  # infrastructure trouble is retried by the caller, never quarantined
    except Exception as exc:
        raise DeidError("invalid_dataset", f"unexpected {type(exc).__name__}") from exc
