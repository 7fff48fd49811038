"""OCR verification of cleaned pixels (``deid.pixel_ocr``), with Tesseract through pytesseract.

A frame is turned into an 8-bit grey image (colour converted, windowed to its own range, light
text on dark made dark on light, enlarged when small) and read by Tesseract. ``verify``
refuses the instance (``burned_in_text_found``) when a word matches one of the instance's
identifiers (the strong ones of the residual scan), or, with ``strict``, when any word of
three or more letters or digits is left: the rule's regions are black, so any text that
Tesseract still reads lies outside them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deid_router.errors import DeidError

if TYPE_CHECKING:
    import numpy as np

MIN_CONFIDENCE = 50.0
_LIGHT = 220  # 8-bit level from which a pixel may be text
_WORD = re.compile(r"[0-9A-Za-z]{3,}")
_ALNUM = re.compile(r"[^0-9A-Za-z]+")


@dataclass(frozen=True)
class Word:
    text: str
    confidence: float
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels


def display_u8(arr: np.ndarray, photometric: str, bits_stored: int, palette: Any = None) -> np.ndarray:
    """An 8-bit RGB or grey rendering of one frame (sample-last layout)."""
    import numpy as np

    if photometric == "YBR_FULL" and arr.ndim == 3:
        from pydicom.pixels.processing import convert_color_space

        arr = convert_color_space(arr, "YBR_FULL", "RGB")
    elif photometric == "PALETTE COLOR" and palette is not None:
        from pydicom.pixels.processing import apply_color_lut

        arr = apply_color_lut(arr, palette)
        bits_stored = 16 if arr.dtype.itemsize > 1 else 8
    if arr.ndim == 3:
        shift = max(bits_stored - 8, 0)
        return np.asarray(arr >> shift if shift else arr).clip(0, 255).astype(np.uint8)
    a = arr.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    out = np.zeros(a.shape, dtype=np.uint8) if hi <= lo else ((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def words(img: np.ndarray) -> list[Word]:
    """Words Tesseract reads in an 8-bit image (grey or RGB)."""
    import numpy as np

    try:
        import pytesseract
        from PIL import Image
    except ImportError as exc:
        raise DeidError("ocr_unavailable", "pytesseract or Pillow is not installed") from exc
    # Burned-in text is light (white, yellow, green) on an image: read the grey rendering
    # (inverted when dark), then the light pixels alone as black on white.
    bright = img if img.ndim == 2 else img[..., :3].max(axis=2)
    grey = img if img.ndim == 2 else (img[..., :3].astype(np.uint16).sum(axis=2) // 3).astype(np.uint8)
    if float(grey.mean()) < 128:  # Tesseract reads dark text on a light background best
        grey = 255 - grey
    binary = np.where(bright >= _LIGHT, 0, 255).astype(np.uint8)
    found: list[Word] = []
    for image in (grey, binary):
        found.extend(_read(pytesseract, Image, image))
    return found


def _read(pytesseract: Any, image_mod: Any, grey: np.ndarray) -> list[Word]:
    scale = 2 if max(grey.shape) < 1200 else 1
    pil = image_mod.fromarray(grey)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), image_mod.Resampling.LANCZOS)
    try:
        data = pytesseract.image_to_data(pil, config="--psm 11", output_type=pytesseract.Output.DICT)
    except (pytesseract.TesseractNotFoundError, pytesseract.TesseractError, OSError) as exc:
        raise DeidError("ocr_unavailable", f"tesseract failed: {type(exc).__name__}") from exc
    found: list[Word] = []
    for i, text in enumerate(data["text"]):
        text = str(text).strip()
        try:
            conf = float(data["conf"][i])
        except (TypeError, ValueError):
            conf = -1.0
        if not text or conf < 0:
            continue
        x, y, w, h = (int(data[k][i]) // scale for k in ("left", "top", "width", "height"))
        found.append(Word(text, conf, (x, y, x + w, y + h)))
    return found


def matches_identifier(found: Iterable[Word], strong: Iterable[str]) -> bool:
    """Whether a read word (or run of words) spells one of the identifiers."""
    keys = {_ALNUM.sub("", s).upper() for s in strong}
    keys = {k for k in keys if len(k) >= 3}
    if not keys:
        return False
    tokens = [_ALNUM.sub("", w.text).upper() for w in found]
    joined = "".join(tokens)
    return any(t in keys for t in tokens if t) or any(k in joined for k in keys if len(k) >= 4)


def has_text(found: Iterable[Word]) -> bool:
    return any(w.confidence >= MIN_CONFIDENCE and _WORD.search(w.text) for w in found)


def verify(img: np.ndarray, strong: Iterable[str], strict: bool) -> None:
    """Raise DeidError('burned_in_text_found') if the cleaned image still shows text it must not."""
    found = words(img)
    if matches_identifier(found, strong):
        raise DeidError("burned_in_text_found", "OCR read an identifier of the instance in the cleaned pixels", "PixelData")
    if strict and has_text(found):
        raise DeidError("burned_in_text_found", "OCR read text outside the rule's regions (verify = strict)", "PixelData")
