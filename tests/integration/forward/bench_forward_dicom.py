"""Throughput of DicomDestination into dcmtk storescp (not a test: run it by hand).

    .venv/bin/python tests/integration/forward/bench_forward_dicom.py [--n 500] [--batch 32] [--ct512]

Prints instances/s and CPU ms per instance of this process (the sender). A pynetdicom stall
(response on the socket but never read) shows up as a dimse_timeout plus association_lost
items, reported as "rest: retry".
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(_REPO))

from pydicom.uid import generate_uid  # noqa: E402

from deid_router.forward.dicom import DicomDestination  # noqa: E402
from tests.integration.forward.forward_fixtures import bundled, copies, dicom_cfg  # noqa: E402
from tests.support.peers import StoreSCP  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ct512", action="store_true", help="a generated 512x512 CT instead of CT_small.dcm")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.ct512:
            from tests.support.corpus import make_ct

            src = make_ct(root / "src.dcm", "BENCH", "BENCH^ONE", generate_uid(), generate_uid(), generate_uid())
        else:
            src = bundled("CT_small.dcm")
        items = copies(src, root / "in", args.n)
        size = items[0].path.stat().st_size
        with StoreSCP(root / "pacs", ae_title="PACS") as scp:
            dest = DicomDestination(dicom_cfg(scp.port, "PACS"), "BENCH")
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            delivered = 0
            for i in range(0, len(items), args.batch):
                outcomes = dest.send(items[i : i + args.batch])
                delivered += sum(o.delivered for o in outcomes.values())
            elapsed = time.perf_counter() - t0
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            dest.close()
            scp.wait_for_instances(delivered, timeout=60)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        print(
            f"{args.n} x {size / 1024:.0f} KiB, batch {args.batch}: delivered {delivered} (rest: retry), "
            f"{elapsed:.2f} s, {args.n / elapsed:.0f} instances/s, "
            f"{1000 * cpu / args.n:.2f} ms CPU/instance, associations {dest.associations_opened}"
        )


if __name__ == "__main__":
    main()
