"""Synthetic images with burned-in text, in every pixel encoding the cleaner handles.

An image is a textured background (so "unchanged outside the regions" is a real check) with
the patient's name and ID drawn with Pillow into a known band of rows at the top, and,
optionally, a second text somewhere else. ``encode`` writes it as a Part-10 file in native,
RLE, JPEG baseline (Pillow), JPEG-LS or JPEG 2000 (pydicom's encoders).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
SYNTAXES = {
    "native": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg": JPEGBaseline8Bit,
    "jpegls": JPEGLSLossless,
    "j2k": JPEG2000Lossless,
}
NAME = "ZEBRAFINCH^QUENTIN"
PATIENT_ID = "PID778899"
BAND = (0, 0, 320, 40)  # the rule's region: [x0, y0, x1, y1]
RULE_TOML = """
[[rules]]
name = "ACME SONO1 header band"
manufacturer = "ACME"
model = "SONO1"
rows = 240
columns = 320
regions = [[0, 0, 320, 40]]
"""


def font(size: int = 26) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render(rows: int = 240, cols: int = 320, colour: bool = True, frame: int = 0,
           text: str = "ZEBRAFINCH QUENTIN PID778899", elsewhere: str | None = None) -> np.ndarray:
    """One 8-bit frame: (rows, cols, 3) or (rows, cols)."""
    y, x = np.mgrid[0:rows, 0:cols]
    base = ((x * 3 + y * 2 + frame * 17) % 160 + 40).astype(np.uint8)
    img = Image.fromarray(np.stack([base, (base // 2 + 60).astype(np.uint8), (200 - base // 2).astype(np.uint8)], axis=2)
                          if colour else base)
    draw = ImageDraw.Draw(img)
    white = (255, 255, 255) if colour else 255
    draw.text((6, 6), text, fill=white, font=font())
    if elsewhere:
        draw.text((20, rows // 2 + 20), elsewhere, fill=white, font=font())
    return np.asarray(img).copy()


def dataset(frames: list[np.ndarray], sop_class: str = US_IMAGE, manufacturer: str = "ACME",
            model: str = "SONO1", burned_in: str | None = "YES") -> FileDataset:
    first = frames[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19610203"
    ds.StudyDate = "20240312"
    ds.AccessionNumber = "ACC5566"
    ds.Modality = "US" if sop_class != SC_IMAGE else "OT"
    ds.PatientSex = "O"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "S1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Laterality = ""
    ds.PatientOrientation = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL"] if sop_class != SC_IMAGE else ["DERIVED", "SECONDARY"]
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    if sop_class == SC_IMAGE:
        ds.ConversionType = "WSD"
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    ds.Rows, ds.Columns = first.shape[:2]
    ds.SamplesPerPixel = 3 if first.ndim == 3 else 1
    ds.PhotometricInterpretation = "RGB" if first.ndim == 3 else "MONOCHROME2"
    if first.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 * first.dtype.itemsize
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if len(frames) > 1 or sop_class == US_MULTIFRAME:
        ds.NumberOfFrames = len(frames)
        ds.FrameTime = 33.3
        ds.FrameIncrementPointer = 0x00181063
    ds.PixelData = np.stack(frames).tobytes() if len(frames) > 1 else first.tobytes()
    return ds


def encode(ds: FileDataset, syntax: str) -> FileDataset:
    """``ds`` (native, 8-bit) re-encoded in one of :data:`SYNTAXES`, in place."""
    uid = SYNTAXES[syntax]
    if syntax == "native":
        return ds
    n = int(ds.get("NumberOfFrames", 1))
    arr = np.frombuffer(ds.PixelData, dtype=np.uint8).reshape((n, ds.Rows, ds.Columns, -1))
    if syntax == "jpeg":
        import io

        parts = []
        for frame in arr:
            img = Image.fromarray(frame if ds.SamplesPerPixel == 3 else frame[..., 0])
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90, subsampling=1)  # 4:2:2
            parts.append(buf.getvalue())
        ds.PixelData = encapsulate(parts)
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = uid
        if ds.SamplesPerPixel == 3:
            ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        return ds
    ds.compress(uid)  # JPEG 2000 RGB: with the reversible colour transform, as YBR_RCT
    return ds


def write(ds: FileDataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def decoded(path: Path) -> np.ndarray:
    """All frames as pydicom decodes them: (frames, rows, cols[, samples])."""
    from pydicom import dcmread

    ds = dcmread(path)
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) == 1:
        arr = arr[None]
    return arr


def write_big_cine(path: Path, frames: int, rows: int = 480, cols: int = 640) -> None:
    """A native RGB US multi-frame of ``frames`` frames written frame by frame (never in memory):
    every frame carries the burned-in band, each one shifted so frames differ."""
    import struct

    base = render(rows=rows, cols=cols)
    ds = dataset([base[:1, :1]], sop_class=US_MULTIFRAME)
    ds.Rows, ds.Columns = rows, cols
    ds.NumberOfFrames = frames
    del ds.PixelData
    length = rows * cols * 3 * frames
    with open(path, "wb") as fh:
        ds.save_as(fh, enforce_file_format=True)
        fh.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, length + (length & 1)))
        for i in range(frames):
            fh.write(big_cine_frame(base, i).tobytes())
        if length & 1:
            fh.write(b"\0")


def big_cine_frame(base: np.ndarray, i: int) -> np.ndarray:
    frame = base.copy()
    frame[60:] = np.roll(base[60:], i, axis=1)
    return frame
