"""Very large multi-frame instances written (and hashed) in a streaming way, never in memory.

The header is a pydicom data set (Multi-frame Grayscale Word Secondary Capture, explicit VR
little endian, BurnedInAnnotation NO) written without PixelData; the native pixel element
header and the frames are then appended in chunks. ``pixel_sha256`` finds the pixel element
of any Part-10 file (header read with ``stop_before_pixels``) and hashes its value in chunks.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

MF_GRAYSCALE_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
_CHUNK = 8 << 20


def write_big_multiframe(
    path: Path, frames: int, rows: int = 1024, cols: int = 1024, patient_id: str = "BIGPID0001",
) -> tuple[str, str, int]:
    """Write the file; return (SOPInstanceUID, sha256 of the pixel data value, its length)."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MF_GRAYSCALE_WORD_SC
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MF_GRAYSCALE_WORD_SC
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "BIGFRAME^TEST^Q"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20240312"
    ds.AccessionNumber = "ACCBIG01"
    ds.InstitutionName = "Example General Hospital"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    length = frames * rows * cols * 2
    if length >= 0xFFFFFFFE:
        raise ValueError("native pixel data must stay below 4 GiB")
    digest = hashlib.sha256()
    block = os.urandom(_CHUNK)
    with open(path, "wb") as fh:
        ds.save_as(fh, enforce_file_format=True)
        fh.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length))
        remaining, i = length, 0
        while remaining:
            # vary every chunk so a misplaced or repeated chunk changes the hash
            chunk = struct.pack("<Q", i) + block[8 : min(_CHUNK, remaining)]
            chunk = chunk[: min(_CHUNK, remaining)]
            fh.write(chunk)
            digest.update(chunk)
            remaining -= len(chunk)
            i += 1
    return sop_uid, digest.hexdigest(), length


def pixel_sha256(path: Path) -> tuple[str, int]:
    """(sha256, length) of the native PixelData value of an explicit VR little endian file."""
    with open(path, "rb") as fp:
        dcmread(fp, stop_before_pixels=True)
        start = fp.tell()
        hdr = fp.read(12)
        group, elem, vr, _, length = struct.unpack("<HH2sHL", hdr)
        if (group, elem) != (0x7FE0, 0x0010) or vr not in (b"OW", b"OB"):
            raise AssertionError(f"no native pixel data element at offset {start}")
        digest = hashlib.sha256()
        remaining = length
        while remaining:
            chunk = fp.read(min(_CHUNK, remaining))
            if not chunk:
                raise AssertionError("pixel data truncated")
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest(), length
