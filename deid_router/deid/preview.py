"""Before/after PNG previews of pixel cleaning (``deidentify --dry-run --preview DIR``).

For each input that ``burned_in_annotation = "clean"`` would clean, the first frame is
rendered as it is (``NAME.before.png``, the rule's regions outlined in red, its crop in green)
and as it would be forwarded (``NAME.after.png``). An input no rule matches gets only its
``before`` image, to help write a rule. The images show burned-in PHI: files are mode 0600
in a folder of mode 0700.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset

from deid_router.deid import pixels
from deid_router.deid.pixel_rules import OCR_CLEAR, PixelRule
from deid_router.errors import DeidError

if TYPE_CHECKING:
    import numpy as np

    from deid_router.deid.engine import Deidentifier

_AS_IS = PixelRule(name="(as received)")


def _first_frame(header: Dataset, ts: str, rule: PixelRule, fp: BinaryIO, start: int) -> tuple[np.ndarray, pixels.Plan]:
    from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

    plan = pixels.make_plan(header, ts, rule, ocr_frames=1)
    little, implicit = ts != ExplicitVRBigEndian, ts == ImplicitVRLittleEndian
    vstart, _ = pixels.value_start(fp, start, little, implicit)
    fp.seek(vstart)
    sampler = pixels.FrameSampler(plan, header)
    for _ in pixels.Cleaner(plan, sampler).frames(fp, little, pixels.extended_offsets(header)):
        break
    return sampler.images[0], plan


def _save(img: np.ndarray, path: Path, boxes: list[tuple[tuple[int, int, int, int], str]]) -> None:
    from PIL import Image, ImageDraw

    pil = Image.fromarray(img).convert("RGB")
    draw = ImageDraw.Draw(pil)
    for (x0, y0, x1, y1), colour in boxes:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as fh:
        pil.save(fh, format="PNG")


def write_preview(deid: Deidentifier, src: Path, out_dir: Path, name: str) -> str:
    """Write the previews of one file; return what was done (no tag value in it)."""
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(src, "rb") as fp:
        header = dcmread(fp, stop_before_pixels=True)
        start = fp.tell()
        ts = str(header.file_meta.get("TransferSyntaxUID", "") or "")
        try:
            rule = deid.pixel_decision(header)
        except DeidError as exc:
            rule, reason = None, exc.reason
        else:
            reason = ""
        if rule is None and not reason:
            return "no pixel cleaning needed"
        if start >= os.path.getsize(src):
            return "no pixel data"
        try:
            before, plan = _first_frame(header, ts, _AS_IS, fp, start)
            boxes = []
            if rule is not None and rule is not OCR_CLEAR:
                after_plan = pixels.make_plan(header, ts, rule)
                boxes = [(r, "red") for r in after_plan.regions]
                if after_plan.crop:
                    boxes.append((after_plan.crop, "lime"))
            _save(before, out_dir / f"{name}.before.png", boxes)
            if rule is None or rule is OCR_CLEAR:
                return f"{reason or 'ocr_clear'}: before image only"
            after, after_plan = _first_frame(header, ts, rule, fp, start)
            _save(after, out_dir / f"{name}.after.png", [] if after_plan.crop else [(r, "red") for r in after_plan.regions])
        except DeidError as exc:
            return f"cannot preview: {exc.reason}"
    return f"rule {rule.name!r}: before/after written"
