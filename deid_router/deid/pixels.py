"""Pixel cleaning (``burned_in_annotation = "clean"``): black out a rule's regions, frame by frame.

The instance's pixel element is read from the raw file one frame at a time and the cleaned
element is written after the de-identified header; a cine of hundreds of frames never has
more than one frame decoded.

* Native pixel data is cleaned in its stored bytes (same transfer syntax, same layout, same
  bits above BitsStored): nothing outside the regions changes by a single bit.
* Encapsulated pixel data is decoded with pydicom's decoders (pylibjpeg, pylibjpeg-libjpeg,
  pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls) and re-encoded without further loss
  (:data:`REENCODE`): lossless syntaxes back to themselves where an encoder exists, lossy ones
  to JPEG-LS lossless (no second generation of loss; LossyImageCompression stays "01").
  JPEG YCbCr is written as the RGB the decoder produced, so colours do not shift and
  PhotometricInterpretation says what the pixels are.

"Black" is the darkest value of the photometric interpretation: the minimum stored value
(MONOCHROME2, RGB, palette index), the maximum for MONOCHROME1, (0, half, half) for YBR_FULL;
a rule's ``fill`` overrides it. Any doubt raises DeidError: the instance is quarantined.
"""

from __future__ import annotations

import io
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    UID,
    RLELossless,
)

from deid_router.deid.pixel_rules import Box, PixelRule
from deid_router.errors import DeidError

if TYPE_CHECKING:
    import numpy as np

NATIVE = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian})
# Encapsulated input syntax -> the syntax the cleaned pixels are written in (never a lossy one).
REENCODE: dict[str, str] = {
    RLELossless: RLELossless,
    JPEGLSLossless: JPEGLSLossless,
    JPEG2000Lossless: JPEG2000Lossless,
    JPEGLossless: ExplicitVRLittleEndian,  # no JPEG lossless encoder in pydicom
    JPEGLosslessSV1: ExplicitVRLittleEndian,
    # lossy inputs: re-encoded losslessly, so cleaning adds no second generation of loss
    JPEGBaseline8Bit: JPEGLSLossless,
    JPEGExtended12Bit: JPEGLSLossless,
    JPEGLSNearLossless: JPEGLSLossless,
    JPEG2000: JPEG2000Lossless,
    # High-Throughput JPEG 2000: decoded by pylibjpeg-openjpeg, no encoder
    HTJ2KLossless: ExplicitVRLittleEndian,
    HTJ2KLosslessRPCL: ExplicitVRLittleEndian,
    HTJ2K: JPEG2000Lossless,
}
LOSSY_METHOD: dict[str, str] = {
    JPEGBaseline8Bit: "ISO_10918_1", JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1", JPEG2000: "ISO_15444_1", HTJ2K: "ISO_15444_15",
}
_JPEG_FAMILY = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1})
_J2K_FAMILY = frozenset({JPEG2000, JPEG2000Lossless, HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL})
_DECODED_RGB = {  # (input syntax family, photometric) decoded to RGB by pydicom's decoders
    "jpeg": frozenset({"YBR_FULL", "YBR_FULL_422", "RGB"}),
    "j2k": frozenset({"YBR_RCT", "YBR_ICT", "RGB"}),
}
_PIXEL_TAG = (0x7FE0, 0x0010)
_LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"})
_SUPPORTED_PI = frozenset({"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR",
                           "YBR_RCT", "YBR_ICT"})


@dataclass(frozen=True)
class Spec:
    """The Image Pixel module of an instance, as its pixel element is encoded."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric: str
    planar: int
    frames: int

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.columns * self.samples * (self.bits_allocated // 8)

    def options(self, **extra: Any) -> dict[str, Any]:
        return dict(
            rows=self.rows, columns=self.columns, samples_per_pixel=self.samples,
            bits_allocated=self.bits_allocated, bits_stored=self.bits_stored,
            pixel_representation=self.pixel_representation, photometric_interpretation=self.photometric,
            number_of_frames=self.frames, planar_configuration=self.planar, **extra,
        )


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, None)
    if isinstance(value, (list, MultiValue)):
        value = value[0] if len(value) else None
    if value is None or value == "":
        if default is None:
            raise DeidError("pixel_unsupported", f"{keyword} is missing", keyword)
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DeidError("pixel_unsupported", f"{keyword} is not a number", keyword) from None


def spec_of(ds: Dataset) -> Spec:
    spec = Spec(
        rows=_int(ds, "Rows"), columns=_int(ds, "Columns"), samples=_int(ds, "SamplesPerPixel", 1),
        bits_allocated=_int(ds, "BitsAllocated"), bits_stored=_int(ds, "BitsStored", _int(ds, "BitsAllocated")),
        pixel_representation=_int(ds, "PixelRepresentation", 0),
        photometric=str(ds.get("PhotometricInterpretation", "") or "").strip().upper(),
        planar=_int(ds, "PlanarConfiguration", 0), frames=max(_int(ds, "NumberOfFrames", 1), 1),
    )
    if spec.bits_allocated not in (8, 16, 32) or not 1 <= spec.bits_stored <= spec.bits_allocated:
        raise DeidError("pixel_unsupported", "BitsAllocated must be 8, 16 or 32", "BitsAllocated")
    if spec.samples not in (1, 3) or spec.photometric not in _SUPPORTED_PI:
        raise DeidError("pixel_unsupported", "unsupported photometric interpretation", "PhotometricInterpretation")
    if spec.rows < 1 or spec.columns < 1:
        raise DeidError("pixel_unsupported", "empty image", "Rows")
    return spec


@dataclass(frozen=True)
class Plan:
    """How one instance's pixels are cleaned and written."""

    rule: PixelRule
    spec: Spec
    ts_in: str
    ts_out: str
    photometric_out: str
    planar_out: int
    regions: tuple[Box, ...]  # clipped to the image
    crop: Box | None
    fill: tuple[int, ...]  # one value per sample, in the output's photometric interpretation
    as_rgb: bool = False
    lossy_in: bool = False
    ocr_frames: tuple[int, ...] = field(default=())

    @property
    def native_in(self) -> bool:
        return self.ts_in in NATIVE and self.spec.photometric != "YBR_FULL_422"

    @property
    def native_out(self) -> bool:
        return self.ts_out in NATIVE

    @property
    def header_photometric(self) -> str:
        """What the output's header says: RGB in JPEG 2000 is written with the reversible colour
        transform, which PS3.5 8.2.4 names YBR_RCT (decoders give RGB back)."""
        if self.ts_out == JPEG2000Lossless and self.photometric_out == "RGB":
            return "YBR_RCT"
        return self.photometric_out

    @property
    def out_rows(self) -> int:
        return self.crop[3] - self.crop[1] if self.crop else self.spec.rows

    @property
    def out_columns(self) -> int:
        return self.crop[2] - self.crop[0] if self.crop else self.spec.columns


def _clip(box: Box, spec: Spec) -> Box | None:
    x0, y0, x1, y1 = box
    x1, y1 = min(x1, spec.columns), min(y1, spec.rows)
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def black(spec: Spec, photometric: str, fill: int | None) -> tuple[int, ...]:
    """The value written into the regions, per sample."""
    if fill is not None:
        return (fill,) * spec.samples
    bs = spec.bits_stored
    if spec.pixel_representation:
        lo, hi = -(1 << (bs - 1)), (1 << (bs - 1)) - 1
    else:
        lo, hi = 0, (1 << bs) - 1
    if photometric == "MONOCHROME1":
        return (hi,)
    if photometric == "YBR_FULL":
        return (lo, 1 << (bs - 1), 1 << (bs - 1))
    return (lo,) * spec.samples


def make_plan(ds: Dataset, ts: str, rule: PixelRule, ocr_frames: int = 0) -> Plan:
    """The plan for a header (original or de-identified: the Image Pixel module is the same)."""
    spec = spec_of(ds)
    photometric = spec.photometric
    planar = spec.planar
    as_rgb = False
    ts_out: str
    if ts in NATIVE:
        ts_out = ts
        if photometric == "YBR_FULL_422":  # decoded (subsampling removed), written as YBR_FULL
            photometric, planar = "YBR_FULL", 0
            ts_out = ExplicitVRLittleEndian
    elif ts in REENCODE:
        ts_out = REENCODE[ts]
        family = "jpeg" if ts in _JPEG_FAMILY else "j2k" if ts in _J2K_FAMILY else ""
        if spec.samples == 3 and family and photometric in _DECODED_RGB[family]:
            photometric, as_rgb = "RGB", family == "jpeg"
        if spec.samples == 3 and ts_out != RLELossless:
            planar = 0
        if photometric == "YBR_FULL_422":
            raise DeidError("pixel_unsupported", "YBR_FULL_422 outside JPEG", "PhotometricInterpretation")
    else:
        raise DeidError("pixel_unsupported", f"no decoder for transfer syntax {ts}", "TransferSyntaxUID")
    regions = tuple(b for b in (_clip(r, spec) for r in rule.regions) if b is not None)
    crop = _clip(rule.crop, spec) if rule.crop else None
    frames = spec.frames
    sample = tuple(sorted({0, frames // 2, frames - 1}))[:ocr_frames] if ocr_frames else ()
    return Plan(
        rule=rule, spec=spec, ts_in=ts, ts_out=ts_out, photometric_out=photometric, planar_out=planar,
        regions=regions, crop=crop, fill=black(spec, photometric, rule.fill), as_rgb=as_rgb,
        lossy_in=ts in LOSSY_METHOD, ocr_frames=sample,
    )


def apply_header(plan: Plan, ds: Dataset) -> None:
    """The Image Pixel module and file meta of the cleaned output (the engine marks the rest)."""
    spec = plan.spec
    ds.file_meta.TransferSyntaxUID = UID(plan.ts_out)
    if plan.header_photometric != spec.photometric:
        ds.PhotometricInterpretation = plan.header_photometric
    if spec.samples > 1 and ("PlanarConfiguration" in ds or plan.planar_out != spec.planar):
        ds.PlanarConfiguration = plan.planar_out
    if plan.crop:
        ds.Rows = plan.out_rows
        ds.Columns = plan.out_columns
        _crop_us_regions(plan.crop, ds)
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            del ds[keyword]
    if plan.lossy_in:
        ds.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" not in ds:
            ds.LossyImageCompressionMethod = LOSSY_METHOD[plan.ts_in]
    ds.BurnedInAnnotation = "NO"


def _crop_us_regions(crop: Box, ds: Dataset) -> None:
    """Ultrasound calibration regions follow the crop (shifted, clipped; ones left outside go)."""
    regions = ds.get("SequenceOfUltrasoundRegions")
    if not regions:
        return
    cx0, cy0, cx1, cy1 = crop
    kept = []
    for item in regions:
        try:
            x0, y0 = int(item.RegionLocationMinX0), int(item.RegionLocationMinY0)
            x1, y1 = int(item.RegionLocationMaxX1), int(item.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            raise DeidError("pixel_unsupported", "an ultrasound region without its location",
                            "SequenceOfUltrasoundRegions") from None
        nx0, ny0, nx1, ny1 = max(x0, cx0), max(y0, cy0), min(x1, cx1 - 1), min(y1, cy1 - 1)
        if nx0 > nx1 or ny0 > ny1:
            continue
        item.RegionLocationMinX0, item.RegionLocationMinY0 = nx0 - cx0, ny0 - cy0
        item.RegionLocationMaxX1, item.RegionLocationMaxY1 = nx1 - cx0, ny1 - cy0
        kept.append(item)
    if kept:
        ds.SequenceOfUltrasoundRegions = kept
    else:
        del ds.SequenceOfUltrasoundRegions


def clean_frame(plan: Plan, arr: np.ndarray, planar1: bool) -> np.ndarray:
    """Black out the regions of one frame in place; return it, cropped when the rule says so."""
    fill = plan.fill
    for x0, y0, x1, y1 in plan.regions:
        if arr.ndim == 2:
            arr[y0:y1, x0:x1] = fill[0]
        elif planar1:
            for s, v in enumerate(fill):
                arr[s, y0:y1, x0:x1] = v
        else:
            arr[y0:y1, x0:x1, :] = fill
    if plan.crop:
        x0, y0, x1, y1 = plan.crop
        arr = arr[:, y0:y1, x0:x1] if planar1 else arr[y0:y1, x0:x1]
    return arr


# ---------------------------------------------------------------------- reading frames
def _native_frames(plan: Plan, src: BinaryIO | bytes, little: bool) -> Iterator[np.ndarray]:
    """Frames of native pixel data as writable arrays over the stored bytes."""
    import numpy as np

    spec = plan.spec
    kind = "i" if spec.pixel_representation else "u"
    dtype = np.dtype(f"{'<' if little else '>'}{kind}{spec.bits_allocated // 8}")
    size = spec.frame_bytes
    if spec.samples == 1:
        shape: tuple[int, ...] = (spec.rows, spec.columns)
    elif spec.planar:
        shape = (spec.samples, spec.rows, spec.columns)
    else:
        shape = (spec.rows, spec.columns, spec.samples)
    view = memoryview(src) if isinstance(src, (bytes, bytearray)) else None
    for i in range(spec.frames):
        if view is not None:
            data = bytearray(view[i * size:(i + 1) * size])
        else:
            assert not isinstance(src, (bytes, bytearray))
            data = bytearray(src.read(size))
        if len(data) != size:
            raise DeidError("invalid_dataset", "pixel data is shorter than Rows x Columns x frames", "PixelData")
        yield np.frombuffer(data, dtype=dtype).reshape(shape)


def _decoded_frames(plan: Plan, src: BinaryIO | bytes, extended: tuple[bytes, bytes] | None) -> Iterator[np.ndarray]:
    from pydicom.pixels.decoders.base import get_decoder

    import numpy as np

    try:
        decoder = get_decoder(plan.ts_in)
        extra: dict[str, Any] = {"as_rgb": plan.as_rgb, "pixel_keyword": "PixelData"}
        if extended is not None:
            extra["extended_offsets"] = extended
        frames = decoder.iter_array(src, **plan.spec.options(**extra))
        for arr, props in frames:
            got = str(props.get("photometric_interpretation", plan.photometric_out))
            if got != plan.photometric_out:
                raise DeidError("pixel_unsupported", "the decoder produced another photometric interpretation",
                                "PhotometricInterpretation")
            yield arr if arr.flags.writeable else np.array(arr)
    except DeidError:
        raise
    except Exception as exc:  # noqa: BLE001 - the codecs' errors, translated at this boundary
        raise DeidError("pixel_decode_failed", f"{type(exc).__name__} while decoding pixel data", "PixelData") from exc


# ---------------------------------------------------------------------- writing
def _write_all(dst: BinaryIO, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = dst.write(view)
        if n is None:
            raise DeidError("invalid_dataset", "non-blocking output")
        view = view[n:]


def _encoder(plan: Plan) -> Callable[[np.ndarray], bytes]:
    from pydicom.pixels.encoders.base import get_encoder

    encoder = get_encoder(plan.ts_out)
    spec = plan.spec
    opts: dict[str, Any] = dict(
        rows=plan.out_rows, columns=plan.out_columns, samples_per_pixel=spec.samples,
        bits_allocated=spec.bits_allocated, bits_stored=spec.bits_stored,
        pixel_representation=spec.pixel_representation, photometric_interpretation=plan.photometric_out,
        number_of_frames=1, planar_configuration=0,
    )
    if plan.ts_out == JPEG2000Lossless:
        opts["use_mct"] = plan.header_photometric == "YBR_RCT"

    def encode(arr: np.ndarray) -> bytes:
        try:
            return bytes(encoder.encode(arr, **opts))
        except Exception as exc:  # noqa: BLE001 - the codecs' errors, translated at this boundary
            raise DeidError("pixel_encode_failed", f"{type(exc).__name__} while encoding pixel data", "PixelData") from exc

    return encode


class Cleaner:
    """Cleans one instance's frames from ``src`` and writes the new pixel element to ``dst``."""

    def __init__(self, plan: Plan, on_frame: Callable[[int, np.ndarray], None] | None = None) -> None:
        self.plan = plan
        self.on_frame = on_frame

    def frames(self, src: BinaryIO | bytes, little: bool, extended: tuple[bytes, bytes] | None = None,
               ) -> Iterator[np.ndarray]:
        """Cleaned frames, in the output's layout (planar as stored for native input)."""
        plan = self.plan
        if plan.native_in:
            planar1 = plan.spec.samples > 1 and plan.spec.planar == 1
            source = _native_frames(plan, src, little)
        else:
            planar1 = False
            source = _decoded_frames(plan, src, extended)
        wanted = set(plan.ocr_frames)
        for i, arr in enumerate(source):
            out = clean_frame(plan, arr, planar1)
            if self.on_frame is not None and i in wanted:
                self.on_frame(i, out)
            yield out

    def write_element(self, src: BinaryIO | bytes, dst: BinaryIO, little: bool, implicit: bool,
                      vr: bytes = b"OB", extended: tuple[bytes, bytes] | None = None) -> None:
        """The whole pixel element (tag, VR, length, value) in the output's syntax."""
        plan = self.plan
        e = "<" if little else ">"
        frames = self.frames(src, little, extended)
        spec = plan.spec
        if plan.native_out:
            length = plan.out_rows * plan.out_columns * spec.samples * (spec.bits_allocated // 8) * spec.frames
            if not plan.native_in:  # decoded: written as explicit VR little endian
                e, implicit = "<", False
                vr = b"OB" if spec.bits_allocated == 8 else b"OW"
            pad = length & 1
            if implicit:
                head = struct.pack(e + "HHL", *_PIXEL_TAG, length + pad)
            else:
                head = struct.pack(e + "HH2sHL", *_PIXEL_TAG, vr, 0, length + pad)
            _write_all(dst, head)
            for arr in frames:
                _write_all(dst, _native_bytes(arr, spec.bits_allocated, e))
            if pad:
                _write_all(dst, b"\0")
            return
        encode = _encoder(plan)
        _write_all(dst, struct.pack("<HH2sHL", *_PIXEL_TAG, b"OB", 0, 0xFFFFFFFF))
        _write_all(dst, struct.pack("<HHL", 0xFFFE, 0xE000, 0))  # empty Basic Offset Table
        for arr in frames:
            data = encode(arr)
            if len(data) & 1:
                data += b"\0"
            _write_all(dst, struct.pack("<HHL", 0xFFFE, 0xE000, len(data)))
            _write_all(dst, data)
        _write_all(dst, struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))


def _native_bytes(arr: np.ndarray, bits_allocated: int, e: str) -> bytes:
    import numpy as np

    kind = "i" if arr.dtype.kind == "i" else "u"
    dtype = np.dtype(f"{e}{kind}{bits_allocated // 8}")
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    return np.ascontiguousarray(arr).tobytes()


# ---------------------------------------------------------------------- files and datasets
def value_start(fp: BinaryIO, start: int, little: bool, implicit: bool) -> tuple[int, bytes]:
    """(offset of the pixel element's value, its explicit VR) for the element at ``start``."""
    fp.seek(start)
    hdr = fp.read(8)
    if struct.unpack(("<" if little else ">") + "HH", hdr[:4]) != _PIXEL_TAG:
        raise DeidError("pixel_unsupported", "float pixel data is not cleaned", "FloatPixelData")
    if implicit:
        return start + 8, b"OW"
    vr = hdr[4:6]
    return (start + 12 if vr in _LONG_VRS else start + 8), vr


def extended_offsets(ds: Dataset) -> tuple[bytes, bytes] | None:
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        return bytes(ds.ExtendedOffsetTable), bytes(ds.ExtendedOffsetTableLengths)
    return None


def clean_dataset(plan: Plan, ds: Dataset, on_frame: Callable[[int, np.ndarray], None] | None = None) -> None:
    """Clean the PixelData held in memory by ``ds`` (a dataset read whole, e.g. deflated)."""
    from pydicom.encaps import encapsulate

    ext = extended_offsets(ds)
    cleaner = Cleaner(plan, on_frame)
    little = plan.ts_in != ExplicitVRBigEndian
    src = bytes(ds.PixelData)
    apply_header(plan, ds)
    if plan.native_out:
        out = io.BytesIO()
        e = "<" if little and plan.native_in else ">" if plan.native_in else "<"
        for arr in cleaner.frames(src, little, ext):
            out.write(_native_bytes(arr, plan.spec.bits_allocated, e))
        value = out.getvalue()
        ds.PixelData = value + b"\0" * (len(value) & 1)
        ds["PixelData"].VR = "OB" if plan.spec.bits_allocated == 8 else "OW"
        return
    encode = _encoder(plan)
    ds.PixelData = encapsulate([encode(arr) for arr in cleaner.frames(src, little, ext)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True


class FrameSampler:
    """Keeps 8-bit renderings of the frames a plan samples, for OCR and previews."""

    def __init__(self, plan: Plan, header: Dataset | None = None) -> None:
        self.plan = plan
        self.palette = header if plan.photometric_out == "PALETTE COLOR" else None
        self.images: list[np.ndarray] = []

    def __call__(self, index: int, arr: np.ndarray) -> None:
        from deid_router.deid.ocr import display_u8

        if arr.ndim == 3 and self.plan.native_in and self.plan.spec.planar == 1:
            arr = arr.transpose(1, 2, 0)
        self.images.append(display_u8(arr, self.plan.photometric_out, self.plan.spec.bits_stored, self.palette))

    def verify(self, strong: set[str]) -> None:
        """Raise DeidError('burned_in_text_found') when OCR reads what it must not."""
        from deid_router.deid.ocr import verify

        for img in self.images:
            verify(img, strong, self.plan.rule.verify == "strict")


def write_cleaned(plan: Plan, header: Dataset, fp: BinaryIO, start: int, dst: BinaryIO, little: bool,
                  implicit: bool, strong: set[str] | None, extended: tuple[bytes, bytes] | None) -> None:
    """Write the cleaned pixel element of the raw file ``fp`` (element at ``start``) to ``dst``;
    ``header`` has had :func:`apply_header` and was written already; ``extended``: the input's
    extended offset table. With ``strong``, OCR verifies the cleaned frames."""
    from deid_router.observability.logging import get_logger

    began = time.perf_counter()
    vstart, vr = value_start(fp, start, little, implicit)
    fp.seek(vstart)
    sampler = FrameSampler(plan, header) if strong is not None else None
    Cleaner(plan, sampler).write_element(fp, dst, little, implicit, vr, extended)
    cleaned = time.perf_counter()
    if sampler is not None and strong is not None:
        sampler.verify(strong)
    get_logger("pixels").info(
        "pixels_cleaned", rule=plan.rule.name, frames=plan.spec.frames, transfer_syntax=UID(plan.ts_out).keyword,
        clean_ms=round((cleaned - began) * 1000, 1), ocr_ms=round((time.perf_counter() - cleaned) * 1000, 1),
    )


def ocr_clear(header: Dataset, ts: str, fp: BinaryIO, start: int, little: bool, implicit: bool,
              strong: set[str]) -> None:
    """No rule matched and deid.pixel_no_rule = "ocr_clear": refuse unless OCR reads no text."""
    from deid_router.deid.pixel_rules import OCR_CLEAR

    plan = make_plan(header, ts, OCR_CLEAR, ocr_frames=3)
    vstart, _ = value_start(fp, start, little, implicit)
    fp.seek(vstart)
    sampler = FrameSampler(plan, header)
    for _ in Cleaner(plan, sampler).frames(fp, little, extended_offsets(header)):
        pass
    sampler.verify(strong)
