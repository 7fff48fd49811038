"""Composition root: build every part from the config, start them, stop them.

``serve`` runs the listener and the scheduler in the main process and de-identification
workers in separate processes (de-identification is CPU work in Python: processes use every
core while intake never waits for it). Workers claim jobs from the database, so the same code
scales to several nodes sharing one PostgreSQL database.
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import signal
import socket
import threading
import uuid
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine

from deid_router.config import Config, load_config
from deid_router.db.crosswalk import DbCrosswalk
from deid_router.db.engine import make_engine, migrate
from deid_router.db.lanes import LaneLeases
from deid_router.db.repository import JobRepository
from deid_router.deid.crosswalk import Crosswalk
from deid_router.deid.engine import Deidentifier
from deid_router.deid.keys import Keys
from deid_router.errors import QueueError
from deid_router.forward.base import Destination, build_destination
from deid_router.forward.registry import handler_for
from deid_router.forward.lanes import FreeLane, Lane, LeasedLane
from deid_router.jobs.policy import RetryPolicy
from deid_router.jobs.worker import Worker
from deid_router.observability import process_metrics
from deid_router.observability.logging import configure_logging, get_logger
from deid_router.observability.systemd import notify as notify_systemd
from deid_router.routing import Router
from deid_router.scheduler import Housekeeping, start_scheduler
from deid_router.observability.audit_messages import Auditor, auditor_from
from deid_router.scp.listener import Intake, Listener
from deid_router.scp.commitment import Commitment, CommitmentPeer
from deid_router.store.holding import Holding

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from deid_router.http.server import HttpServer

log = get_logger("app")

SHUTDOWN_GRACE_SECONDS = 20.0


@dataclass
class Context:
    """The shared parts every process builds from the same config."""

    config: Config
    keys: Keys
    engine: Engine
    repo: JobRepository
    holding: Holding

    def crosswalk(self, profile: str = "") -> Crosswalk:
        p = self.config.profile(profile)
        return DbCrosswalk(self.repo, self.keys.for_scope(p.scope), p.scope)

    def deidentifier(self, profile: str = "") -> Deidentifier:
        """The engine of a profile ("": [deid]), keyed by the profile's scope."""
        p = self.config.profile(profile)
        return Deidentifier(p.deid, self.keys.for_scope(p.scope), self.crosswalk(profile))

    def profile_deidentifiers(self) -> dict[str, Deidentifier]:
        """One engine per [profiles.NAME] (the worker's own deidentifier is [deid])."""
        return {p.name: self.deidentifier(p.name) for p in self.config.profiles}

    def destinations(self) -> dict[str, Destination]:
        calling = self.config.listener.ae_title
        return {d.name: build_destination(d, calling) for d in self.config.destinations}

    def destination_lanes(self) -> dict[str, list[Destination]]:
        """Per destination, ``max_associations`` forwarders: parallel associations to one PACS."""
        calling = self.config.listener.ae_title
        return {
            d.name: [build_destination(d, calling) for _ in range(d.max_associations)]
            for d in self.config.destinations
        }

    def worker_lanes(self, owner: str) -> dict[str, list[Lane]]:
        """Per destination, ``max_associations`` senders for one worker process. DICOM senders
        hold a lane lease while they send, so the destination sees at most
        ``max_associations`` associations from all workers of all nodes together."""
        calling = self.config.listener.ae_title
        leases = LaneLeases(self.engine)
        lanes: dict[str, list[Lane]] = {}
        k = 0
        for d in self.config.destinations:
            lanes[d.name] = []
            for _ in range(d.max_associations):
                dest = build_destination(d, calling)
                if handler_for(d.type).leased:  # connections to a remote service: bounded
                    lane: Lane = LeasedLane(dest, leases, d.max_associations, f"{owner}/{k}",
                                            self.config.queue.lease_seconds)
                else:
                    lane = FreeLane(dest)
                lanes[d.name].append(lane)
                k += 1
        return lanes

    @functools.cached_property
    def auditor(self) -> Auditor:
        """DICOM audit messages to ``[audit] syslog_url`` (does nothing when it is empty)."""
        return build_auditor(self.config)

    def close(self) -> None:
        if "auditor" in self.__dict__:
            self.auditor.close()
        self.engine.dispose()


def build_auditor(config: Config) -> Auditor:
    """The node's DICOM audit message sender (the node's parts and the CLI commands share it)."""
    au = config.audit
    return auditor_from(
        au.syslog_url, au.source_id or node_name(config), config.listener.ae_title,
        str(au.ca_file) if au.ca_file else None,
    )


def build_context(config: Config, *, run_migrations: bool = False) -> Context:
    holding = Holding(config.storage.root, node_name(config))
    config.storage.root.mkdir(parents=True, exist_ok=True)
    engine = make_engine(config.queue.url, busy_timeout_ms=int(config.queue.busy_timeout_seconds * 1000))
    if run_migrations:  # serve (and offline deidentify): the secret is checked against the database
        from deid_router.db.guard import database_label, keys_for_serve

        try:
            migrate(engine)
            keys = keys_for_serve(JobRepository(engine), config.deid.secret_file, database_label(config.queue.url))
        except BaseException:
            engine.dispose()
            raise
    else:
        keys = Keys.load_or_create(config.deid.secret_file)
    return Context(config, keys, engine, JobRepository(engine), holding)


def node_name(config: Config) -> str:
    """This node's name among nodes sharing a holding volume: host and listener port."""
    return f"{socket.gethostname()}-{config.listener.port}"


def worker_count(config: Config) -> int:
    return config.queue.workers or (os.cpu_count() or 1)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when its parent dies, so a killed node leaves no orphans.

    PDEATHSIG only covers a parent that dies *after* the prctl: a spawned worker spends
    seconds importing before it gets here, and a node killed meanwhile left an orphan
    worker processing the queue next to the restarted node. Hence the parent check.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:
        os._exit(0)  # the node died before we got here


def _child_stop_event() -> threading.Event:
    """SIGTERM from the node sets the event; SIGINT is ignored (the node decides when to stop)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the node forwards reloads to its listeners only
    return stop


def build_listener(ctx: Context, metrics: process_metrics.Observer = process_metrics.NO_METRICS) -> Listener:
    """The listener of the config; ``metrics`` counts its refusals (in an extra listener process:
    the main process reads its own listener's counts, ``Listener.refusals``)."""
    config = ctx.config
    intake = Intake(
        ctx.holding, ctx.repo, Router(config.routes), ctx.keys, config.storage.min_free_mb * 1024 * 1024
    )
    sc = config.storage_commitment
    commitment = Commitment(
        ctx.repo, ctx.keys, config.listener.ae_title, mode=sc.commitment, wait_seconds=sc.wait_seconds,
        peers=[CommitmentPeer(p.ae_title, p.host, p.port) for p in sc.peers],
    ) if sc.enabled else None
    audit = ctx.auditor.association_refused

    def on_refused(reason: str, calling_aet: str, peer: str) -> None:
        metrics.refused(reason)
        audit(reason, calling_aet, peer)

    return Listener(config.listener, intake, commitment, on_refused=on_refused)


def worker_process_main(config_path: str, index: int, log_level: str, parent_pid: int) -> None:
    """Entry point of one de-identification worker process."""
    _die_with_parent(parent_pid)
    configure_logging(log_level)
    stop = _child_stop_event()
    config = load_config(config_path)
    # The listener's acknowledgement is what a modality waits for; de-identification can lag
    # and catch up from the queue. Lower priority keeps the workers off the listener's CPU.
    os.nice(config.queue.worker_nice)
    ctx = build_context(config)
    owner = f"{socket.gethostname()}:{os.getpid()}:{index}:{uuid.uuid4().hex[:6]}"
    metrics = process_metrics.for_this_process(
        ctx.holding.process_metrics_dir, [d.name for d in config.destinations]
    )
    worker = Worker(
        owner=owner,
        repo=ctx.repo,
        holding=ctx.holding,
        deidentifier=ctx.deidentifier(),
        profiles=ctx.profile_deidentifiers(),
        destinations=ctx.worker_lanes(owner),
        policy=RetryPolicy.from_config(config.queue),
        lease_seconds=config.queue.lease_seconds,
        batch_size=config.queue.batch_size,
        poll_seconds=config.queue.poll_seconds,
        work_prefix=f"w{index}",
        auditor=ctx.auditor,
        metrics=metrics,
    )
    log.info("worker_started", owner=owner)
    try:
        worker.run(stop)
    finally:
        ctx.close()
        log.info("worker_stopped", owner=owner, processed=worker.stats.processed)


def listener_process_main(config_path: str, index: int, log_level: str, parent_pid: int) -> None:
    """Entry point of an extra listener process (``listener.processes`` > 1): same port, SO_REUSEPORT."""
    _die_with_parent(parent_pid)
    configure_logging(log_level)
    stop = _child_stop_event()
    ctx = build_context(load_config(config_path))
    listener = build_listener(ctx, process_metrics.for_this_process(ctx.holding.process_metrics_dir))
    listener.start()
    signal.signal(signal.SIGHUP, lambda signum, frame: listener.reload_tls())
    try:
        stop.wait()
    finally:
        listener.shutdown(SHUTDOWN_GRACE_SECONDS)
        ctx.close()


def build_http(ctx: Context, listener: Listener, children: Collector | None = None) -> HttpServer | None:
    """The console, API, health and metrics server of ``[http]`` (None when port is 0)."""
    if not ctx.config.http.port:
        return None
    from deid_router.http.app import build_app
    from deid_router.http.server import HttpServer
    from deid_router.http.services import build_services

    svc = build_services(
        ctx.config, ctx.repo, ctx.holding, ctx.keys, lambda: listener.listening, ctx.auditor, children
    )
    return HttpServer(ctx.config.http, build_app(svc))


@dataclass
class _Child:
    kind: str  # "worker" | "listener"
    index: int
    proc: BaseProcess


class Node:
    """One running deid-router: a listener and the scheduler here; de-identification workers,
    and extra listeners when configured, in child processes that die with this one."""

    def __init__(self, config: Config, log_level: str = "INFO") -> None:
        self.config = config
        self.log_level = log_level
        self.ctx = build_context(config, run_migrations=True)
        removed = self.ctx.holding.prepare()
        if removed:
            log.warning("partial_files_removed", count=removed)
        self.listener = build_listener(self.ctx)
        names = [d.name for d in config.destinations]
        # /metrics and the textfile: the children's histograms and counts, this listener's refusals
        self.process_metrics = process_metrics.ProcessCollector(
            self.ctx.holding.process_metrics_dir, names, self.listener.refusals
        )
        self.housekeeping = Housekeeping(
            self.ctx.repo, self.ctx.holding, config.storage.keep_raw_hours, RetryPolicy.from_config(config.queue),
            destinations=names, children=self.process_metrics,
        )
        self.http = build_http(self.ctx, self.listener, self.process_metrics)
        self._children: list[_Child] = []
        self._mp = multiprocessing.get_context("spawn")
        self._scheduler: BackgroundScheduler | None = None

    def _spawn(self, kind: str, index: int) -> _Child:
        target = worker_process_main if kind == "worker" else listener_process_main
        proc = self._mp.Process(
            target=target,
            args=(str(self.config.path), index, self.log_level, os.getpid()),
            name=f"deid-{kind}-{index}",
            daemon=False,
        )
        proc.start()
        return _Child(kind, index, proc)

    def _remove_partial_outputs(self) -> None:
        for cfg in self.config.destinations:
            dest = build_destination(cfg, self.config.listener.ae_title)
            removed = handler_for(cfg.type).startup(dest)
            dest.close()
            if removed:
                log.warning("partial_outputs_removed", destination=cfg.name, count=removed)

    def start(self) -> None:
        process_metrics.prepare_directory(self.process_metrics.directory)  # before the first child
        self._remove_partial_outputs()
        self.housekeeping.sweep_orphans()
        self.housekeeping.requeue_stale()
        if self.http is not None:
            self.http.start()  # first: a taken HTTP port stops the node before it accepts DICOM
        self.listener.start()
        self._scheduler = start_scheduler(self.housekeeping, self.config.queue.lease_seconds)
        listeners = self.config.listener.processes or (os.cpu_count() or 1)
        self._children = [self._spawn("listener", i) for i in range(1, listeners)]
        self._children += [self._spawn("worker", i) for i in range(worker_count(self.config))]
        log.info("node_started", workers=worker_count(self.config), listeners=listeners, port=self.listener.port)
        notify_systemd("READY=1")  # Type=notify: the listener accepts, the database is migrated

    def supervise(self, stop: threading.Event) -> None:
        """Block until ``stop``; restart any child process that died meanwhile."""
        while not stop.wait(1.0):
            for i, child in enumerate(self._children):
                if not child.proc.is_alive():
                    log.error("child_died", kind=child.kind, index=child.index, exitcode=child.proc.exitcode)
                    process_metrics.mark_dead(self.process_metrics.directory, child.proc.pid)
                    if child.kind == "worker":
                        self._free_lanes_of(child)
                    self._children[i] = self._spawn(child.kind, child.index)

    def _free_lanes_of(self, child: _Child) -> None:
        """A dead worker's lanes come free now rather than when their leases expire (its
        owner names start with host and pid, see ``worker_process_main``)."""
        try:
            LaneLeases(self.ctx.engine).release_owned_by(f"{socket.gethostname()}:{child.proc.pid}:")
        except QueueError:
            log.error("lane_release_failed", index=child.index)

    def reload(self) -> None:
        """SIGHUP: the listeners read their TLS certificates again (destinations re-read theirs
        by themselves when the files change); established associations are not touched."""
        self.listener.reload_tls()
        for child in self._children:
            if child.kind == "listener" and child.proc.is_alive() and child.proc.pid is not None:
                os.kill(child.proc.pid, signal.SIGHUP)

    def _signal_children(self, kind: str) -> list[BaseProcess]:
        procs = [c.proc for c in self._children if c.kind == kind]
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        return procs

    @staticmethod
    def _join(procs: list[BaseProcess], timeout: float) -> None:
        for proc in procs:
            proc.join(timeout=timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2.0)

    def stop(self) -> None:
        """Stop accepting, let transfers finish, let workers release their jobs, exit (< 30 s)."""
        log.info("node_stopping")
        notify_systemd("STOPPING=1")
        if self.http is not None:
            self.http.begin_stop()  # closes while the listener drains; joined below
        listeners = self._signal_children("listener")
        self.listener.shutdown(SHUTDOWN_GRACE_SECONDS)
        self._join(listeners, timeout=2.0)
        self._join(self._signal_children("worker"), timeout=6.0)
        for child in self._children:
            process_metrics.mark_dead(self.process_metrics.directory, child.proc.pid)
        if self.http is not None:
            self.http.stop()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        self.ctx.close()
        log.info("node_stopped")


def serve(config_path: Path, log_level: str = "INFO") -> int:
    config = load_config(config_path)
    configure_logging(log_level)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node = Node(config, log_level)
    signal.signal(signal.SIGHUP, lambda signum, frame: node.reload())
    node.start()
    try:
        node.supervise(stop)
    finally:
        node.stop()
    return 0
