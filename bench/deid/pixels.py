"""Pixel cleaning speed: ms per frame of a 640x480 RGB ultrasound, beside the header-only path.

Usage: .venv/bin/python bench/deid/pixels.py [--frames N] [--reps N]
Prints a table and writes it to bench/deid/PIXELS.md. Median over reps of a whole
deidentify_file (read, de-identify, clean, encode, write) of an N-frame cine, divided by N.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from deid_router.config import DeidConfig  # noqa: E402
from deid_router.deid.engine import Deidentifier  # noqa: E402
from deid_router.deid.keys import Keys  # noqa: E402
from tests.support import pixeldata as px  # noqa: E402

from run import timed  # noqa: E402  (bench/deid/run.py: the same median timer)

HERE = Path(__file__).resolve().parent
RULES = """
[[rules]]
name = "bench band"
manufacturer = "ACME"
model = "SONO1"
regions = [[0, 0, 640, 40]]
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deid-pixel-bench-"))
    rules = work / "rules.toml"
    rules.write_text(RULES)
    frames = [px.render(rows=480, cols=640, frame=i) for i in range(args.frames)]
    files = {}
    for name, syntax, burned in (("header only (BurnedInAnnotation NO)", "native", "NO"),
                                 ("clean, native RGB", "native", "YES"),
                                 ("clean, JPEG baseline -> JPEG-LS", "jpeg", "YES")):
        ds = px.encode(px.dataset(frames, sop_class=px.US_MULTIFRAME, burned_in=burned), syntax)
        files[name] = px.write(ds, work / f"{len(files)}.dcm")
    keys = Keys(bytes(range(32)))
    plain = Deidentifier(DeidConfig(secret_file=work / "k", burned_in_annotation="clean", pixel_rules_file=rules), keys)
    ocr = Deidentifier(DeidConfig(secret_file=work / "k", burned_in_annotation="clean", pixel_rules_file=rules,
                                  pixel_ocr=True), keys)
    out = work / "out.dcm"

    def run(deid: Deidentifier, src: Path) -> Callable[[], object]:
        def go() -> object:
            with open(out, "wb") as fh:
                return deid.deidentify_file(src, fh)
        return go

    rows = []
    for name, src in files.items():
        ms = timed(run(plain, src), args.reps)
        rows.append((name, ms / args.frames, ms))
    ms = timed(run(ocr, files["clean, native RGB"]), max(1, args.reps // 2))
    rows.append(("clean + OCR of 3 frames, native RGB", ms / args.frames, ms))
    per_ocr = (ms - rows[1][2]) / min(3, args.frames)
    rows.append(("OCR alone, per frame read", per_ocr, per_ocr * min(3, args.frames)))
    head = (f"{args.frames}-frame 640x480 RGB US cine, median of {args.reps} runs, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    lines = [head, "", "| path | ms per frame | ms per instance |", "|---|---:|---:|"]
    lines += [f"| {n} | {f:.1f} | {i:.0f} |" for n, f, i in rows]
    text = "\n".join(lines)
    print(text)
    (HERE / "PIXELS.md").write_text(
        "# Pixel cleaning speed\n\nWritten by `.venv/bin/python bench/deid/pixels.py` "
        f"(--frames {args.frames} --reps {args.reps}).\n\n{text}\n", encoding="utf-8")


if __name__ == "__main__":
    main()
