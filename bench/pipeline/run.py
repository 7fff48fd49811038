"""End-to-end pipeline throughput: dcmtk storescu -> {dcmtk storescp | minimal pynetdicom SCP | deid-router -> dcmtk storescp}.

Usage: .venv/bin/python bench/pipeline/run.py [--quick] [--profile] [--pg] [--keep-data]

All rows run in ONE invocation, side by side, on the same generated corpora:
  * ct:    N 512x512x16 CT instances with a realistic identified header (tests.support.corpus.make_series)
  * small: M 16x16 instances, same header
Rows per corpus, 1 sender (the whole corpus in one association) and 4 senders (corpus split in 4):
  dcmtk-ignore   storescu -> storescp --ignore (receives, discards)
  dcmtk-write    storescu -> storescp +B (writes every file)
  min-pynetdicom storescu -> bench/pipeline/min_scp.py (writes encoded_dataset(), no decode, no fsync)
  deid-router    storescu -> deid-router serve (fsync + queue commit before 0x0000) -> dcmtk storescp +B
  deid-router -> single   the same, to a storescp WITHOUT --fork (one association at a time, as many
                          archives and per-AE limits are): destination max_associations 1, 2 workers
  deid-router -> Orthanc  the same, Orthanc as the PACS (delivered counted by its REST /statistics)
acked/s: N / storescu wall time (last sender done). delivered/s: N / time until the PACS holds N
files. peak RSS: router main process + workers (sum, sampled every 0.1 s).
--profile: py-spy record (all router processes) during the 1-sender deid-router row of each corpus,
summarised as ms of sampled CPU per instance by pipeline stage.
Prints the table and writes it to bench/RESULTS.md with the command line and date.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.support.corpus import make_series  # noqa: E402
from tests.support.peers import Orthanc  # noqa: E402
from tests.support.procmon import RssSampler, cpu_seconds, process_tree  # noqa: E402
from tests.support.router import RouterProcess, dicom_destination, free_port, wait_until  # noqa: E402

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
ENV = {**os.environ, "TCP_NODELAY": "1"}
SCU_FLAGS = ["-aet", "BENCH", "+sd", "+r", "-nh", "-pdu", "131072", "-to", "10", "-ta", "60", "-ts", "120"]
SCP_COMMON = ["--fork", "-aet", "PACS", "+xa", "-pm", "-dhl", "-pdu", "131072"]
SCP_WRITE = ["+B", "+uf", "-fe", ".dcm"]


@dataclass
class Row:
    corpus: str
    target: str
    senders: int
    n: int
    ack_s: float
    deliver_s: float | None = None
    rss_mb: float | None = None
    note: str = ""
    cpu_s: float | None = None  # receiver CPU (all its processes) while sending and delivering

    @property
    def ack_rate(self) -> float:
        return self.n / self.ack_s

    @property
    def deliver_rate(self) -> float | None:
        return self.n / self.deliver_s if self.deliver_s else None

    @property
    def cpu_ms(self) -> float | None:
        return 1000 * self.cpu_s / self.n if self.cpu_s is not None else None


# --------------------------------------------------------------------------- corpora


def build_corpus(root: Path, n: int, rows: int, patients: int) -> list[Path]:
    """The corpus in 4 folders (part0..part3), each with its own patients."""
    parts = []
    for k in range(4):
        d = root / f"part{k}"
        make_series(d, n // 4 + (1 if k < n % 4 else 0), patients=max(1, patients // 4), rows=rows, cols=rows, seed=k)
        parts.append(d)
    return parts


# --------------------------------------------------------------------------- peers


def count_files(d: Path) -> int:
    try:
        return sum(1 for e in os.scandir(d) if e.name.endswith(".dcm"))
    except FileNotFoundError:
        return 0


def start_storescp(out: Path, ignore: bool, fork: bool = True) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    flags = ["--ignore"] if ignore else ["-od", str(out), *SCP_WRITE]
    common = SCP_COMMON if fork else [f for f in SCP_COMMON if f != "--fork"]
    proc = subprocess.Popen([STORESCP, *common, *flags, str(port)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def start_min_scp(out: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([PY, str(Path(__file__).with_name("min_scp.py")), str(out), str(port)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def wait_port(port: int, timeout: float = 20.0) -> None:
    import socket

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_until(up, timeout, 0.05, f"port {port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def send(port: int, aec: str, groups: list[list[Path]]) -> tuple[float, list[int]]:
    """Start one storescu per group at once; wall time until the last one exits."""
    t0 = time.monotonic()
    procs = [
        subprocess.Popen([STORESCU, *SCU_FLAGS, "-aec", aec, "127.0.0.1", str(port), *map(str, g)],
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for g in groups
    ]
    codes = []
    for p in procs:
        _, err = p.communicate(timeout=1800)
        codes.append(p.returncode)
        if p.returncode:
            print(f"  storescu exit {p.returncode}: {err.decode(errors='replace')[-400:]}", file=sys.stderr)
    return time.monotonic() - t0, codes


def groups_for(parts: list[Path], senders: int) -> list[list[Path]]:
    return [parts] if senders == 1 else [[p] for p in parts]


# --------------------------------------------------------------------------- rows


def run_direct(corpus: str, parts: list[Path], n: int, senders: int, tmp: Path, ignore: bool) -> Row:
    out = tmp / f"scp-{corpus}-{senders}-{'ign' if ignore else 'w'}"
    proc, port = start_storescp(out, ignore)
    try:
        secs, codes = send(port, "PACS", groups_for(parts, senders))
        if not ignore:
            wait_until(lambda: count_files(out) >= n, 30, 0.05, "storescp files")
            assert count_files(out) == n, (count_files(out), n)
    finally:
        stop(proc)
        shutil.rmtree(out, ignore_errors=True)
    note = "" if not any(codes) else f"storescu exit codes {codes}"
    return Row(corpus, "dcmtk storescp --ignore" if ignore else "dcmtk storescp +B (write)", senders, n, secs,
               note=note)


def run_min(corpus: str, parts: list[Path], n: int, senders: int, tmp: Path) -> Row:
    out = tmp / f"min-{corpus}-{senders}"
    proc, port = start_min_scp(out)
    try:
        cpu0 = cpu_seconds([proc.pid])
        secs, codes = send(port, "MINSCP", groups_for(parts, senders))
        cpu = cpu_seconds([proc.pid]) - cpu0
        got = count_files(out)
        assert got == n, (got, n)
    finally:
        stop(proc)
        shutil.rmtree(out, ignore_errors=True)
    return Row(corpus, "minimal pynetdicom SCP", senders, n, secs, note="" if not any(codes) else f"exit {codes}",
               cpu_s=cpu)


class _OrthancPacs:
    """Orthanc as the router's destination; delivered = its instance count."""

    def __init__(self, work: Path) -> None:
        self.orthanc = Orthanc(work, ae_title="PACS")

    def count(self) -> int:
        return int(self.orthanc.get("/statistics", timeout=5.0)["CountInstances"])


def run_router(corpus: str, parts: list[Path], n: int, senders: int, tmp: Path, pg_url: str | None,
               profile_to: Path | None, listeners: int = 1, baseline: tuple[str, Path] | None = None,
               pacs: str = "fork") -> Row:
    """``baseline``: (git ref, checkout) to run that version of the router instead of this one.
    ``pacs``: "fork" (storescp --fork), "single" (storescp, one association at a time), "orthanc"."""
    out = tmp / f"pacs-{corpus}-{senders}-{pacs}"
    orthanc: _OrthancPacs | None = None
    if pacs == "orthanc":
        orthanc = _OrthancPacs(out)
        scp, scp_port = None, orthanc.orthanc.port
        delivered_count = orthanc.count
    else:
        scp, scp_port = start_storescp(out, ignore=False, fork=pacs == "fork")
        delivered_count = lambda: count_files(out)  # noqa: E731
    queue: dict[str, object] = {"workers": 2, "poll_seconds": 0.1, "lease_seconds": 60}
    if pg_url:
        queue["url"] = pg_url
    env = {"TCP_NODELAY": "1"}
    if baseline is not None:
        env["PYTHONPATH"] = str(baseline[1])  # ahead of the editable install of this checkout
    router = RouterProcess(tmp / f"router-{corpus}-{senders}-{listeners}", [dicom_destination("pacs", scp_port, "PACS")],
                           queue=queue, env=env, listener={"processes": listeners},
                           http=None if baseline is not None else {})  # a baseline may predate [http]
    spy = None
    try:
        router.start()
        wait_until(lambda: router.log_text().count("worker_started") >= 2, 60, 0.1, "workers")
        assert router.proc is not None
        if profile_to is not None:
            spy = subprocess.Popen([str(REPO / ".venv" / "bin" / "py-spy"), "record", "--pid", str(router.proc.pid),
                                    "--subprocesses", "--rate", "200", "--format", "raw", "--nonblocking",
                                    "--output", str(profile_to)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        with RssSampler(router.proc.pid) as rss:
            pids = process_tree(router.proc.pid)
            cpu0 = cpu_seconds(pids)
            t0 = time.monotonic()
            secs, codes = send(router.port, "DEID_ROUTER", groups_for(parts, senders))
            wait_until(lambda: delivered_count() >= n, 600, 0.05, "delivery at the PACS")
            delivered = time.monotonic() - t0
            cpu = cpu_seconds(pids) - cpu0
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        status = router.wait_idle(60, expect_done=n)
        note = "" if status["jobs"].get("done") == n else f"status {status['jobs']}"
        if any(codes):
            note += f" storescu exit {codes}"
        target = "deid-router -> dcmtk storescp" if listeners == 1 else f"deid-router listener.processes={listeners}"
        if baseline is not None:
            target = f"deid-router at {baseline[0]} (baseline)"
        if pacs == "single":
            target = "deid-router -> storescp, 1 association at a time"
        elif pacs == "orthanc":
            target = "deid-router -> Orthanc"
        return Row(corpus, target, senders, n, secs, delivered, rss.peak_sum_mb, note, cpu)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        router.stop()
        if scp is not None:
            stop(scp)
        if orthanc is not None:
            orthanc.orthanc.stop(graceful=False)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(router.workdir, ignore_errors=True)


# --------------------------------------------------------------------------- profile summary

# (stage, substring of a frame) checked innermost-first against each sampled stack
STAGES = [
    ("intake: fsync raw file + directory (commit)", "RawFile.commit"),
    ("intake: queue commit (enqueue)", "JobQueue.enqueue"),
    ("intake: header walk (structure + UIDs)", "integrity"),
    ("listener: raw file write, hash, writeback", "RawFile.write"),
    ("intake: header parse + routing (accept)", "Intake.accept"),
    ("listener: association (socket reads, PDU parsing, response)", "Association.run"),
    ("worker: send C-STORE (sendfile, response)", "DicomDestination.send"),
    ("worker: work file write", "work_writer"),
    ("worker: copy pixel bytes", "copy_range"),
    ("worker: write header (dcmwrite)", "dcmwrite"),
    ("worker: crosswalk record (db)", "DbCrosswalk.record"),
    ("worker: de-identify header", "Deidentifier.deidentify ("),
    ("worker: read header (dcmread)", "deidentify_file"),
    ("worker: claim (db)", "JobQueue.claim"),
    ("worker: finish, one transaction per batch (db)", "JobQueue.finish"),
    ("worker: heartbeat (db)", "JobQueue.heartbeat"),
]


def summarise_profile(path: Path, n: int, rate: int = 200) -> list[tuple[str, str, float]]:
    """(process, stage, ms of CPU samples per instance)."""
    totals: collections.Counter[tuple[str, str]] = collections.Counter()
    if not path.exists():
        return []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        proc = "listener (main)" if "serve" in frames[0] and "spawn" not in frames[0] else "workers"
        if "multiprocessing" in frames[0] or "spawn_main" in stack:
            proc = "workers"
        stage = "other"
        for name, needle in STAGES:
            if any(needle in f for f in frames):
                stage = name
                break
        if stage == "other" and any("_poll" in f or "select" in f for f in frames[-2:]):
            stage = "idle/poll"
        totals[(proc, stage)] += int(count)
    return [(p, s, c / rate * 1000 / n) for (p, s), c in sorted(totals.items(), key=lambda kv: (kv[0][0], -kv[1]))]


# --------------------------------------------------------------------------- report


def fmt(x: float | None, d: int = 0) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def render(rows: list[Row], profiles: dict[str, list[tuple[str, str, float]]], args: argparse.Namespace,
           cmd: str, seconds: float) -> str:
    lines = [
        "# Pipeline throughput (dcmtk storescu -> receiver [-> dcmtk storescp])",
        "",
        f"Date: {dt.datetime.now().isoformat(timespec='seconds')}  ",
        f"Command: `{cmd}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, a shared VM whose speed drifts by 20 % or more from "
        f"one minute to the next (absolute numbers are noisy; compare the ratios, measured side by side in this one "
        f"run, and the receiver CPU per instance, which drifts less), "
        f"Python {platform.python_version()}. Total bench time {seconds:.0f} s.  ",
        f"Queue: {'PostgreSQL' if args.pg else 'SQLite (default)'}; router workers=2 (queue.worker_nice 19, the default), batch_size 32, max PDU 0.  ",
        f"storescu flags: `TCP_NODELAY=1 storescu {' '.join(SCU_FLAGS)}` (one association per sender).  ",
        f"storescp flags: `TCP_NODELAY=1 storescp {' '.join(SCP_COMMON)}` + `--ignore` or `{' '.join(SCP_WRITE)} -od DIR`; "
        "the router's destination is the writing storescp (max_associations 1); its rows \"1 association at a time\" use "
        "the same storescp without `--fork`, and its rows \"Orthanc\" Orthanc with the test suite's configuration "
        "(tests/support/peers.py), delivery counted by its REST /statistics.  ",
        "min pynetdicom SCP: bench/pipeline/min_scp.py (encoded_dataset() to a file, PDU 0, TCP_NODELAY, no fsync).",
        "",
    ]
    for corpus in dict.fromkeys(r.corpus for r in rows):
        rs = [r for r in rows if r.corpus == corpus]
        base = {(r.target, r.senders): r for r in rs}
        dcmtk1 = base.get(("dcmtk storescp +B (write)", 1))
        min1 = base.get(("minimal pynetdicom SCP", 1))
        lines += [
            f"## {corpus} ({rs[0].n} instances)",
            "",
            "| receiver | senders | acked/s | delivered/s | ack vs dcmtk-write (1 sender) | ack vs min pynetdicom (1 sender) "
            "| delivered / acked | receiver CPU ms/instance | router peak RSS MB | note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in rs:
            lines.append(
                f"| {r.target} | {r.senders} | {r.ack_rate:.0f} | {fmt(r.deliver_rate)} "
                f"| {r.ack_rate / dcmtk1.ack_rate:.2f} | {r.ack_rate / min1.ack_rate:.2f} "
                f"| {fmt(r.deliver_rate / r.ack_rate if r.deliver_rate else None, 2)} | {fmt(r.cpu_ms, 1)} "
                f"| {fmt(r.rss_mb)} | {r.note} |"
                if dcmtk1 and min1 else f"| {r.target} | {r.senders} | {r.ack_rate:.0f} | | | | | | | |"
            )
        single = base.get(("deid-router -> storescp, 1 association at a time", 1))
        r1 = base.get(("deid-router -> dcmtk storescp", 1))
        fours = [r for (t, k), r in base.items() if k == 4 and t.startswith("deid-router")
                 and "Orthanc" not in t and "1 association" not in t]  # the PACS rows measure the PACS too
        r4 = max(fours, key=lambda r: r.ack_rate) if fours else None
        if r1 and r4 and min1:
            ok = lambda b: "PASS" if b else "MISS"  # noqa: E731
            lines += [
                "",
                "Targets: "
                f"1 sender ack >= min pynetdicom: {r1.ack_rate:.0f} vs {min1.ack_rate:.0f} -> {ok(r1.ack_rate >= min1.ack_rate)}; "
                f"delivered >= 0.8 x acked: {r1.deliver_rate:.0f} vs {0.8 * r1.ack_rate:.0f} -> "
                f"{ok((r1.deliver_rate or 0) >= 0.8 * r1.ack_rate)}; "
                f"4 senders ack >= 1.6 x min pynetdicom (1 sender), best router row ({r4.target}): "
                f"{r4.ack_rate:.0f} vs {1.6 * min1.ack_rate:.0f} -> {ok(r4.ack_rate >= 1.6 * min1.ack_rate)}"
                + (f"; single-association PACS, delivered >= 0.9 x acked (1 sender): {single.deliver_rate:.0f} vs "
                   f"{0.9 * single.ack_rate:.0f} -> {ok((single.deliver_rate or 0) >= 0.9 * single.ack_rate)}"
                   if single else "") + ".",
            ]
        if profiles.get(corpus):
            lines += ["", "py-spy (200 Hz, all router threads, 1-sender row): ms of samples per instance. A thread is "
                      "sampled while it runs and while it waits (socket, disk, database), so this "
                      "shows where each thread spends its time, not CPU; the CPU column above is the CPU.", "",
                      "| process | stage | ms/instance |", "| --- | --- | --- |"]
            lines += [f"| {p} | {s} | {ms:.2f} |" for p, s, ms in profiles[corpus] if ms >= 0.05]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 CT / 1000 small instead of 1000 / 5000")
    ap.add_argument("--ct", type=int, default=None)
    ap.add_argument("--small", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="py-spy the 1-sender router rows")
    ap.add_argument("--pg", action="store_true", help="PostgreSQL queue (a fresh database on 127.0.0.1:5432)")
    ap.add_argument("--only", choices=["ct", "small"], default=None)
    ap.add_argument("--data", type=Path, default=None, help="scratch folder (default: a temp dir under /work or /tmp)")
    ap.add_argument("--keep-data", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite bench/RESULTS.md")
    ap.add_argument("--baseline", metavar="GIT_REF", default=None,
                    help="also run the router of this commit (a temporary git worktree), side by side")
    args = ap.parse_args()
    n_ct = args.ct or (200 if args.quick else 1000)
    n_small = args.small or (1000 if args.quick else 5000)
    base = args.data or Path(tempfile.mkdtemp(prefix="deid-bench-", dir="/work" if os.access("/work", os.W_OK) else None))
    base.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    pg_url, drop_pg = None, None
    if args.pg:
        pg_url, drop_pg = create_pg()
    baseline: tuple[str, Path] | None = None
    if args.baseline:
        checkout = base / "baseline-src"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(checkout), args.baseline],
                       check=True, capture_output=True)
        baseline = (args.baseline, checkout)
    rows: list[Row] = []
    profiles: dict[str, list[tuple[str, str, float]]] = {}
    try:
        corpora = [("ct", n_ct, 512, 20), ("small", n_small, 16, 40)]
        for name, n, size, patients in corpora:
            if args.only and name != args.only:
                continue
            print(f"generating {name}: {n} x {size}x{size}", flush=True)
            parts = build_corpus(base / f"corpus-{name}", n, size, patients)
            tmp = base / f"run-{name}"
            for senders in (1, 4):
                steps = [
                    lambda: run_direct(name, parts, n, senders, tmp, ignore=True),
                    lambda: run_direct(name, parts, n, senders, tmp, ignore=False),
                    lambda: run_min(name, parts, n, senders, tmp),
                    lambda: run_router(name, parts, n, senders, tmp, fresh_pg(pg_url),
                                       base / f"profile-{name}.txt" if args.profile and senders == 1 else None),
                ]
                steps += [
                    lambda: run_router(name, parts, n, senders, tmp, fresh_pg(pg_url), None, pacs="single"),
                    lambda: run_router(name, parts, n, senders, tmp, fresh_pg(pg_url), None, pacs="orthanc"),
                ]
                if senders == 4:
                    steps.append(lambda: run_router(name, parts, n, senders, tmp, fresh_pg(pg_url), None, listeners=2))
                if baseline is not None:
                    steps.append(lambda: run_router(name, parts, n, senders, tmp, fresh_pg(pg_url), None,
                                                    baseline=baseline))
                for step in steps:
                    row = step()
                    rows.append(row)
                    print(f"  {row.target:34s} senders={row.senders} acked/s={row.ack_rate:7.1f} "
                          f"delivered/s={fmt(row.deliver_rate, 1):>7s} rss={fmt(row.rss_mb)} {row.note}", flush=True)
            if args.profile:
                profiles[name] = summarise_profile(base / f"profile-{name}.txt", n)
            if not args.keep_data:
                shutil.rmtree(base / f"corpus-{name}", ignore_errors=True)
    finally:
        if drop_pg:
            drop_pg()
        if baseline is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline[1])],
                           capture_output=True)
        if not args.keep_data and args.data is None:
            shutil.rmtree(base, ignore_errors=True)
    cmd = " ".join([".venv/bin/python", "bench/pipeline/run.py", *sys.argv[1:]])
    text = render(rows, profiles, args, cmd, time.monotonic() - started)
    print(text)
    if not args.no_write:
        (REPO / "bench" / "RESULTS.md").write_text(text + "\n", encoding="utf-8")


_PG_DBS: list[str] = []
PG_ADMIN = os.environ.get("DEID_ROUTER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def create_pg():  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")

    def drop() -> None:
        with admin.connect() as c:
            for name in _PG_DBS:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return PG_ADMIN.rsplit("/", 1)[0], drop


def fresh_pg(prefix: str | None) -> str | None:
    """A new empty database per router row (so every row starts with an empty queue)."""
    if prefix is None:
        return None
    import uuid

    from sqlalchemy import create_engine, text

    name = f"deid_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    _PG_DBS.append(name)
    return f"{prefix}/{name}"


if __name__ == "__main__":
    main()
