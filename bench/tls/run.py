"""What DICOM TLS costs: dcmtk storescu -> {dcmtk storescp | deid-router -> dcmtk storescp}, plain and TLS.

Usage: .venv/bin/python bench/tls/run.py [--n 200] [--rows 512] [--baseline DIR]

Rows, side by side in one run on one generated CT corpus (one storescu association):
  dcmtk plain    storescu -> storescp
  dcmtk TLS      storescu +tls -> storescp +tls (mutual TLS, dcmtk's BCP 195 profile)
  router plain   storescu -> deid-router -> storescp
  router TLS     storescu +tls -> deid-router [listener.tls] -> destination tls = true -> storescp +tls
  router plain (baseline)   with --baseline DIR: the router from DIR (a folder holding the
                 deid_router package of another commit, e.g. from `git archive REF deid_router`)
acked/s: N / storescu wall time. delivered/s: N / time until the PACS holds N files.
CPU ms/instance: user + system CPU of the receiver (storescp, or the router's processes,
de-identification and forwarding included) per instance; it drifts less with the host's load.
Certificates are made with openssl in a temporary folder. Prints the table and writes it to
bench/tls/RESULTS.md. Compare rows of one run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.support.certs import Pki  # noqa: E402
from tests.support.corpus import make_series  # noqa: E402
from tests.support.peers import StoreSCP, free_port, peer_env  # noqa: E402
from tests.support.procmon import cpu_seconds, process_tree  # noqa: E402
from tests.support.router import RouterProcess, dicom_destination  # noqa: E402

SCU = ["storescu", "-aet", "BENCH", "+sd", "+r", "-nh", "-pdu", "131072", "-to", "10", "-ta", "60", "-ts", "120"]


def _send(port: int, called: str, corpus: Path, tls: list[str]) -> float:
    start = time.monotonic()
    subprocess.run([*SCU, "-aec", called, *tls, "127.0.0.1", str(port), str(corpus)],
                   check=True, capture_output=True, env=peer_env(), timeout=600)
    return time.monotonic() - start


def _wait_files(pacs: StoreSCP, n: int, since: float, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while len(pacs.files()) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(pacs.files())} of {n} delivered")
        time.sleep(0.05)
    return time.monotonic() - since


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--baseline", type=Path, help="folder with another commit's deid_router package")
    args = parser.parse_args()
    rows: list[tuple[str, float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp_name:
        tmp = Path(tmp_name)
        corpus = tmp / "corpus"
        make_series(corpus, args.n, rows=args.rows, cols=args.rows)
        pki = Pki(tmp / "pki")
        router_cert, pacs_cert, modality = pki.issue("router"), pki.issue("pacs"), pki.issue("modality")

        def tls_args(issued: object) -> list[str]:
            return ["+tls", str(issued.key), str(issued.cert), "+cf", str(pki.cert)]  # type: ignore[attr-defined]

        for label, tls in (("plain", False), ("TLS", True)):
            with StoreSCP(tmp / f"direct-{label}", extra=tls_args(pacs_cert) if tls else ()) as pacs:
                pids = [pacs._proc.pid] if pacs._proc is not None else []
                cpu, start = cpu_seconds(pids), time.monotonic()
                acked = _send(pacs.port, "PACS", corpus, tls_args(modality) if tls else [])
                delivered = _wait_files(pacs, args.n, start)
                ms = (cpu_seconds(pids) - cpu) * 1000 / args.n
                rows.append((f"dcmtk {label}", args.n / acked, args.n / delivered, ms))
        runs: list[tuple[str, bool, dict[str, str]]] = [("plain", False, {}), ("TLS", True, {})]
        if args.baseline is not None:
            runs.insert(0, ("plain (baseline)", False, {"PYTHONPATH": str(args.baseline.resolve())}))
        for label, tls, env in runs:
            with StoreSCP(tmp / f"via-{len(rows)}", extra=tls_args(pacs_cert) if tls else ()) as pacs:
                extra: dict[str, object] = {}
                listener: dict[str, object] = {}
                tls_port = free_port()
                if tls:
                    extra = {"tls": True, "ca_file": str(pki.cert), "cert_file": str(router_cert.cert),
                             "key_file": str(router_cert.key)}
                    listener = {"plain": False, "tls": {"port": tls_port, "cert_file": str(router_cert.cert),
                                                        "key_file": str(router_cert.key), "ca_file": str(pki.cert)}}
                router = RouterProcess(tmp / f"router-{len(rows)}", [dicom_destination("pacs", pacs.port, "PACS", **extra)],
                                       listener=listener, queue={"workers": 0}, env=env)
                with router:
                    assert router.proc is not None
                    time.sleep(3.0)  # the workers are up
                    pids = process_tree(router.proc.pid)
                    cpu, start = cpu_seconds(pids), time.monotonic()
                    acked = _send(tls_port if tls else router.port, "DEID_ROUTER", corpus,
                                  tls_args(modality) if tls else [])
                    delivered = _wait_files(pacs, args.n, start)
                    ms = (cpu_seconds(pids) - cpu) * 1000 / args.n
                    rows.append((f"router {label}", args.n / acked, args.n / delivered, ms))
    table = ["| path | acked/s | delivered/s | receiver CPU ms/instance |", "| --- | ---: | ---: | ---: |"]
    table += [f"| {name} | {ack:.0f} | {deliv:.0f} | {ms:.2f} |" for name, ack, deliv, ms in rows]
    text = "\n".join(table)
    print(text)
    header = (f"# DICOM TLS cost\n\n`{' '.join(['bench/tls/run.py', *sys.argv[1:]])}` on "
              f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {args.n} CT {args.rows}x{args.rows}, "
              f"{os.cpu_count()} cores, one association per run.\n\n")
    (Path(__file__).parent / "RESULTS.md").write_text(header + text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
