"""A seeded chaos run: faults injected at random while senders push instances through real nodes,
then the whole history checked against what the modalities were told.

Senders (a pynetdicom SCU and dcmtk storescu) record every instance acknowledged with 0x0000 and
re-send what was not. Three destinations: dcmtk storescp as installed (one association at a
time, the default of many archives), Orthanc as installed, and a small pynetdicom PACS that can
be told to answer 0xA700. While the run lasts, a fault is injected every few seconds, chosen at
random (seeded) among:

- ``node_kill``: SIGKILL a node, start it again after a moment; with probability one half the
  new node is armed to SIGKILL itself at one of its own fault points (deid_router/faults.py);
- ``worker_kill``: SIGKILL one de-identification worker process (the node restarts it);
- ``storescp_down`` / ``orthanc_down``: stop a PACS for a while, on the same port;
- ``pacs_a700``: the pynetdicom PACS answers 0xA700 (out of resources) for a while;
- ``disk_full``: a filler file pushes the holding disk (a tmpfs) below the node's reserve;
- ``db_cut``: PostgreSQL only, the TCP proxy between nodes and database drops every connection
  and refuses new ones for a while.

Then faults stop, everything is brought back, senders finish, the queue drains, and the check
runs: every acknowledged instance is at each destination under its de-identified SOP Instance
UID (or quarantined with a reason, listed), no destination holds an instance that was never
sent, each PACS holds each UID once (storescp writes unique file names, so the extra copies an
at-least-once delivery makes are counted apart as ``redelivered``), no partial file remains,
the nodes' memory stayed bounded and every job is final.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from deid_router.deid.keys import Keys
from deid_router.faults import POINTS
from tests.support.corpus import make_series
from tests.support.fake_pacs import FakePacs
from tests.support.fault_harness import open_repo, worker_pids
from tests.support.peers import Orthanc, StoreSCP, require_path
from tests.support.procmon import RssSampler
from tests.support.router import RouterProcess, dicom_destination
from tests.support.tcp_proxy import TcpProxy

RSS_LIMIT_MB = 450.0  # a node, all its processes together: listener, HTTP, two workers with lanes (seen: 305-401 MB)
FINAL_STATES = ("done", "failed", "purged")
# listener fault points that fire before the acknowledgement, and worker ones after the claim
NODE_FAULT_POINTS = [p for p in POINTS if p != "during_folder_write"]


@dataclass
class Chaos:
    """Everything one run needs and records."""

    workdir: Path
    seconds: float
    seed: int
    nodes: int = 1
    pg_url: str | None = None
    instances: int = 600
    fault_every: tuple[float, float] = (2.0, 5.0)
    errors: list[BaseException] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    acked: set[str] = field(default_factory=set)
    sent: set[str] = field(default_factory=set)
    routers: list[RouterProcess] = field(default_factory=list)
    samplers: dict[int, RssSampler] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    started: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop_faults: threading.Event = field(default_factory=threading.Event)
    _a700: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ set-up

    def _holding_disk(self) -> Path:
        """A small tmpfs for the holding area, so that a filler file can fill it on demand."""
        root = self.workdir / "holding"
        root.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=384m,mode=0700", "tmpfs", str(root)], check=True)
        self._mounted = root
        return root

    def setup(self) -> None:
        self.files = make_series(self.workdir / "in", self.instances, patients=12, rows=16, cols=16, seed=self.seed)
        self.source_uid = {p: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.files}
        self.holding = self._holding_disk()
        self.storescp = StoreSCP(self.workdir / "storescp", ae_title="PACS")  # no --fork: one association at a time
        self.orthanc = Orthanc(self.workdir / "orthanc", ae_title="ORTHANC")
        self.fake = _SwitchablePacs(self._a700).start()
        self.proxy: TcpProxy | None = None
        queue: dict[str, Any] = {
            "workers": 2, "max_attempts": 1000, "retry_initial_seconds": 0.2, "retry_max_seconds": 2,
            "lease_seconds": 4, "poll_seconds": 0.1,
        }
        if self.pg_url:
            from tests.support.tcp_proxy import proxy_for_url

            self.proxy = proxy_for_url(self.pg_url)
            queue["url"] = self.proxy.url_for(self.pg_url)
        dests = [
            dicom_destination("storescp", self.storescp.port, "PACS"),
            dicom_destination("orthanc", self.orthanc.port, "ORTHANC"),
            dicom_destination("fake", self.fake.port, "FAKEPACS"),
        ]
        for i in range(self.nodes):
            self.routers.append(
                RouterProcess(
                    self.workdir / f"node-{i}", dests, queue=queue,
                    storage={"root": str(self.holding), "min_free_mb": 64},
                    deid={"secret_file": str(self.holding / "secret.key")},
                    listener={"max_associations": 8},
                    env={"TCP_NODELAY": "1"},
                )
            )
        for r in self.routers:
            self._start(r)

    def _start(self, router: RouterProcess, fault: str | None = None) -> None:
        router.env.pop("DEID_ROUTER_FAULT", None)
        if fault:
            router.env["DEID_ROUTER_FAULT"] = fault
        try:
            router.start(timeout=60)
        except AssertionError:
            if not fault:
                raise
            # armed at a point reached during start-up: it killed itself; start unarmed
            router.env.pop("DEID_ROUTER_FAULT", None)
            router.start(timeout=60)
        assert router.proc is not None
        old = self.samplers.pop(id(router), None)
        if old is not None:
            old.stop()
            self.peak_rss_mb = max(self.peak_rss_mb, old.peak_sum_mb)
        self.samplers[id(router)] = RssSampler(router.proc.pid, interval=0.5).start()

    def _alive(self, router: RouterProcess) -> bool:
        return router.proc is not None and router.proc.poll() is None

    def _supervise(self) -> None:
        """A node armed with a fault point kills itself: bring it back, as systemd would. A node
        that died unarmed crashed: that is counted apart, and the check fails on it."""
        for r in self.routers:
            if not self._alive(r):
                self.faults["node_self_kill" if r.env.get("DEID_ROUTER_FAULT") else "node_crashed"] += 1
                self._start(r)

    # ------------------------------------------------------------------ senders

    def _record(self, uid: str, ok: bool) -> None:
        with self._lock:
            self.sent.add(uid)
            if ok:
                self.acked.add(uid)

    def _pending(self, files: list[Path]) -> list[Path]:
        """Files not acknowledged yet that are due: the corpus is released evenly over the
        chaos window, so instances arrive while faults happen, not all in the first seconds."""
        elapsed = time.monotonic() - self.started
        due = len(files) if self._stop_faults.is_set() else int(len(files) * min(1.0, elapsed / (0.9 * self.seconds))) + 1
        with self._lock:
            return [f for f in files[:due] if self.source_uid[f] not in self.acked]

    def _ports(self) -> list[int]:
        return [r.port for r in self.routers]

    def _pynetdicom_sender(self, files: list[Path], until: float) -> None:
        ae = AE(ae_title="CHAOS_SCU")
        ae.add_requested_context(CTImageStorage)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
        rng = random.Random(self.seed + 1)
        while time.monotonic() < until:
            todo = self._pending(files)
            if not todo:
                if self._stop_faults.is_set():
                    return
                time.sleep(0.2)
                continue
            assoc = ae.associate("127.0.0.1", rng.choice(self._ports()), ae_title="DEID_ROUTER")
            if not assoc.is_established:
                time.sleep(0.3)
                continue
            try:
                for f in todo[:25]:
                    status = assoc.send_c_store(pydicom.dcmread(f))
                    code = getattr(status, "Status", None)
                    self._record(self.source_uid[f], code == 0x0000)
                    if code is None:  # aborted or timed out
                        break
            finally:
                if assoc.is_established:
                    assoc.release()
            time.sleep(0.05)

    def _storescu_sender(self, files: list[Path], until: float) -> None:
        rng = random.Random(self.seed + 2)
        storescu = str(require_path("storescu"))
        while time.monotonic() < until:
            todo = self._pending(files)[:20]
            if not todo:
                if self._stop_faults.is_set():
                    return
                time.sleep(0.2)
                continue
            port = rng.choice(self._ports())
            try:
                res = subprocess.run(
                    [storescu, "-v", "-aet", "CHAOS_DCMTK", "-aec", "DEID_ROUTER", "-nh", "-to", "5",
                     "-ta", "15", "-ts", "15", "127.0.0.1", str(port), *map(str, todo)],
                    capture_output=True, text=True, errors="replace", timeout=60,
                    env={**os.environ, "TCP_NODELAY": "1"},
                )
                out = res.stdout + res.stderr
            except subprocess.TimeoutExpired:
                out = ""
            for path, ok in _storescu_results(out):
                if Path(path) in self.source_uid:
                    self._record(self.source_uid[Path(path)], ok)
            time.sleep(0.1)

    # ------------------------------------------------------------------ faults

    def _fault(self, kind: str, rng: random.Random) -> None:
        if kind == "node_kill":
            r = rng.choice(self.routers)
            r.kill()
            time.sleep(rng.uniform(0.2, 2.0))
            fault = None
            if rng.random() < 0.5:
                fault = f"{rng.choice(NODE_FAULT_POINTS)}@{rng.randint(1, 40)}"
            self._start(r, fault)
        elif kind == "worker_kill":
            live = [r for r in self.routers if self._alive(r)]
            pids = worker_pids(rng.choice(live)) if live else []
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
        elif kind == "storescp_down":
            self.storescp.pause()
            time.sleep(rng.uniform(1.0, 5.0))
            self.storescp.resume()
        elif kind == "orthanc_down":
            self.orthanc.pause()
            time.sleep(rng.uniform(1.0, 5.0))
            self.orthanc.resume()
        elif kind == "pacs_a700":
            self._a700.set()
            time.sleep(rng.uniform(1.0, 5.0))
            self._a700.clear()
        elif kind == "disk_full":
            usage = shutil.disk_usage(self.holding)
            filler = self.holding / "chaos-filler"
            size = max(0, usage.free - 32 * 2**20)  # below the 64 MB reserve
            with open(filler, "wb") as fh:
                fh.truncate(0)
                os.posix_fallocate(fh.fileno(), 0, size)
            time.sleep(rng.uniform(1.0, 5.0))
            filler.unlink()
        elif kind == "db_cut":
            assert self.proxy is not None
            self.proxy.cut()
            time.sleep(rng.uniform(1.0, 4.0))
            self.proxy.restore()
        else:  # pragma: no cover - the kinds are ours
            raise ValueError(kind)

    def _injectors(self) -> list[list[str]]:
        """Two injectors run at once, so faults overlap: one for the node and its resources,
        one for the destinations (each owns its kinds: no two threads act on one thing)."""
        local = ["node_kill", "worker_kill", "disk_full"] + (["db_cut"] if self.proxy is not None else [])
        return [local, ["storescp_down", "orthanc_down", "pacs_a700"]]

    def _inject(self, kinds: list[str], rng: random.Random, until: float, supervise: bool) -> None:
        try:
            self._inject_until(kinds, rng, until, supervise)
        except BaseException as exc:  # the run fails on it, after healing
            self.errors.append(exc)

    def _inject_until(self, kinds: list[str], rng: random.Random, until: float, supervise: bool) -> None:
        # every kind once first (in a seeded order), then at random
        plan = kinds[:]
        rng.shuffle(plan)
        while not self._stop_faults.is_set() and time.monotonic() < until:
            if self._stop_faults.wait(rng.uniform(*self.fault_every)):
                break
            if supervise:
                self._supervise()
            kind = plan.pop(0) if plan else rng.choice(kinds)
            self._fault(kind, rng)
            with self._lock:
                self.faults[kind] += 1
            if supervise:
                self._supervise()

    # ------------------------------------------------------------------ the run

    def run(self) -> Report:
        self.setup()
        self.started = time.monotonic()
        chaos_until = self.started + self.seconds
        send_until = chaos_until + 240  # after the faults stop, senders finish what is left
        half = len(self.files) // 2
        senders = [
            threading.Thread(target=self._pynetdicom_sender, args=(self.files[:half], send_until), daemon=True),
            threading.Thread(target=self._storescu_sender, args=(self.files[half:], send_until), daemon=True),
        ]
        # senders pace themselves over the whole chaos window: one round of the corpus at a time
        for t in senders:
            t.start()
        injectors = [
            threading.Thread(
                target=self._inject, args=(kinds, random.Random(self.seed * 100 + i), chaos_until, i == 0), daemon=True
            )
            for i, kinds in enumerate(self._injectors())
        ]
        try:
            for t in injectors:
                t.start()
            for t in injectors:
                t.join()
        finally:
            self._stop_faults.set()
            self._heal()
        if self.errors:
            raise self.errors[0]
        for t in senders:
            t.join(timeout=max(1.0, send_until - time.monotonic()))
        self._drain(timeout=300)
        return self.report()

    def _heal(self) -> None:
        self._a700.clear()
        (self.holding / "chaos-filler").unlink(missing_ok=True)
        if self.proxy is not None:
            self.proxy.restore()
        if not self.storescp.running:
            self.storescp.resume()
        if not self.orthanc.running:
            self.orthanc.resume()
        for r in self.routers:
            if not self._alive(r) or r.env.get("DEID_ROUTER_FAULT"):
                r.kill()
                self._start(r)  # unarmed from here on

    def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._supervise()
            jobs = self.routers[0].status()["jobs"]
            if all(n == 0 for s, n in jobs.items() if s not in FINAL_STATES):
                return
            time.sleep(1.0)
        raise AssertionError(f"queue did not drain: {self.routers[0].status()}")

    def close(self) -> None:
        for s in self.samplers.values():
            s.stop()
            self.peak_rss_mb = max(self.peak_rss_mb, s.peak_sum_mb)
        for r in self.routers:
            r.stop()
        self.storescp.stop()
        self.orthanc.close()
        self.fake.stop()
        if self.proxy is not None:
            self.proxy.stop()
        if getattr(self, "_mounted", None) is not None:
            subprocess.run(["umount", "-l", str(self._mounted)], check=False)

    # ------------------------------------------------------------------ the check

    def report(self) -> Report:
        keys = Keys.load_or_create(self.holding / "secret.key")
        deid_of = {keys.uid(u): u for u in self.source_uid.values()}
        acked_deid = {keys.uid(u) for u in self.acked}
        sent_deid = {keys.uid(u) for u in self.sent}
        at = {
            "storescp": self.storescp.sop_instance_uids(),
            "orthanc": self.orthanc.sop_instance_uids(),
            "fake": Counter(self.fake.delivered),
        }
        with open_repo(self.routers[0], self.routers[0].queue.get("url")) as repo:
            quarantined = {e.reason for e in repo.quarantine_list()}
            status = repo.status_counts([*at])
        rep = Report(
            backend="postgres" if self.pg_url else "sqlite", nodes=self.nodes, seconds=time.monotonic() - self.started,
            sent=len(self.sent), acknowledged=len(self.acked),
            faults={k: v for k, v in self.faults.items() if k != "node_crashed"},
            crashes=self.faults.get("node_crashed", 0),
            quarantine_reasons=sorted(quarantined), peak_rss_mb=self.peak_rss_mb,
        )
        for name, got in at.items():
            rep.delivered[name] = len(set(got) & acked_deid)
            rep.lost[name] = len(acked_deid - set(got))
            rep.unexpected[name] = len(set(got) - sent_deid)
            rep.redelivered[name] = sum(n - 1 for n in got.values() if n > 1)
            rep.duplicates[name] = len(set(got) - set(deid_of))  # objects that map to no source instance
        rep.jobs = dict(status["jobs"])
        rep.partial_files = [
            str(p) for p in self.holding.rglob("*") if p.is_file() and (p.name.endswith(".part") or p.name.startswith(".tmp-"))
        ]
        return rep


@dataclass
class Report:
    backend: str
    nodes: int
    seconds: float
    sent: int
    acknowledged: int
    faults: dict[str, int]
    crashes: int
    quarantine_reasons: list[str]
    peak_rss_mb: float
    delivered: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    unexpected: dict[str, int] = field(default_factory=dict)
    redelivered: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    partial_files: list[str] = field(default_factory=list)

    @property
    def fault_count(self) -> int:
        return sum(self.faults.values())

    def table(self) -> str:
        dests = ", ".join(f"{d} {n}" for d, n in self.delivered.items())
        rows = [
            ("backend / nodes", f"{self.backend} / {self.nodes}"),
            ("run time", f"{self.seconds:.0f} s"),
            ("instances sent (distinct)", str(self.sent)),
            ("acknowledged (distinct)", str(self.acknowledged)),
            ("delivered per destination", dests),
            ("lost per destination", ", ".join(f"{d} {n}" for d, n in self.lost.items())),
            ("duplicates (an instance under a UID of its own)", ", ".join(f"{d} {n}" for d, n in self.duplicates.items())),
            ("redelivered copies (at-least-once)", ", ".join(f"{d} {n}" for d, n in self.redelivered.items())),
            ("faults injected", f"{self.fault_count}: " + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))),
            ("nodes that died unasked", str(self.crashes)),
            ("quarantine reasons", ", ".join(self.quarantine_reasons) or "none"),
            ("jobs at the end", ", ".join(f"{k} {v}" for k, v in sorted(self.jobs.items()) if v)),
            ("peak RSS of a node", f"{self.peak_rss_mb:.0f} MB"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(["| what | figure |", "|---|---|"] + [f"| {k:<{width}} | {v} |" for k, v in rows])


class _SwitchablePacs(FakePacs):
    """A pynetdicom PACS that answers 0xA700 while ``busy`` is set; remembers what it kept."""

    def __init__(self, busy: threading.Event) -> None:
        self.delivered: list[str] = []
        self._busy = busy
        super().__init__(status=self._answer, ae_title="FAKEPACS")

    def _answer(self, n: int) -> int:
        if self._busy.is_set():
            return 0xA700
        self.delivered.append(self.received[n][0])
        return 0x0000


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((\w+)")


def _storescu_results(output: str) -> list[tuple[str, bool]]:
    """(file, acknowledged with Success) per file storescu -v reported on."""
    results: list[tuple[str, bool]] = []
    current: str | None = None
    for line in output.splitlines():
        m = _SENDING.search(line)
        if m:
            current = m.group(1).strip()
            continue
        m = _RESPONSE.search(line)
        if m and current is not None:
            results.append((current, m.group(1) == "Success"))
            current = None
    return results

