"""Paired timing of the current engine against a frozen copy of an older one, in one process.

Usage:
  # once: a copy of the old engine as package deid_router_old (its imports renamed)
  mkdir -p /tmp/oldroot/deid_router_old && cp -r deid_router/deid /tmp/oldroot/deid_router_old/ \
    && touch /tmp/oldroot/deid_router_old/__init__.py \
    && grep -rl deid_router.deid /tmp/oldroot/deid_router_old | xargs sed -i 's/deid_router\\.deid/deid_router_old.deid/g'
  OLD_ROOT=/tmp/oldroot .venv/bin/python bench/deid/pair.py [--pairs N] [--profile]

Old and new alternate file by file (order swapped each pair); prints the median new/old ratio
of per-call times, which a busy machine disturbs far less than absolute times.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, os.environ.get("OLD_ROOT", "/tmp/oldroot"))
from pydicom.uid import generate_uid  # noqa: E402

from deid_router.config import DeidConfig  # noqa: E402
from deid_router.deid.engine import Deidentifier  # noqa: E402
from deid_router.deid.keys import Keys  # noqa: E402
from tests.support.corpus import make_ct  # noqa: E402

warnings.simplefilter("ignore")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--profile", action="store_true", help="cProfile the new engine only")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deid-pair-"))
    src = make_ct(work / "ct.dcm", "MRN0048213", "MUSTERMANN^ERIKA", generate_uid(), generate_uid(), generate_uid())
    keys = Keys(bytes(range(32)))
    new = Deidentifier(DeidConfig(secret_file=work / "k"), keys)

    def run(d: object) -> float:
        out = io.BytesIO()
        t = time.perf_counter()
        d.deidentify_file(src, out)  # type: ignore[attr-defined]
        return time.perf_counter() - t

    if args.profile:
        import cProfile
        import pstats

        for _ in range(50):
            run(new)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.pairs):
            run(new)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return
    old_engine = importlib.import_module("deid_router_old.deid.engine")
    old_keys = importlib.import_module("deid_router_old.deid.keys")
    old = old_engine.Deidentifier(DeidConfig(secret_file=work / "k"), old_keys.Keys(bytes(range(32))))
    for _ in range(30):
        run(new)
        run(old)
    ratios, tn, to = [], [], []
    for i in range(args.pairs):
        if i & 1:
            a = run(new)
            b = run(old)
        else:
            b = run(old)
            a = run(new)
        ratios.append(a / b)
        tn.append(a)
        to.append(b)
    q = statistics.quantiles(ratios, n=4)
    print(f"pairs={args.pairs} median new/old = {statistics.median(ratios):.3f} "
          f"(IQR {q[0]:.3f}-{q[2]:.3f}); median ms new {statistics.median(tn) * 1e3:.2f} "
          f"old {statistics.median(to) * 1e3:.2f}")


if __name__ == "__main__":
    main()
