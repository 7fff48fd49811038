"""Latency histograms and refusal counts observed in the node's processes, for ``/metrics``.

De-identification and forwarding happen in the worker processes and refusals in every
listener process (the main one and ``listener.processes - 1`` extra ones), while ``/metrics``
and the node_exporter textfile are rendered in the main process. These are per-event values,
too many for database rows, so they travel the way prometheus_client documents for several
processes (multiprocess mode): each child process writes its metrics into its own
memory-mapped files in a per-node directory, ``<storage.root>/prometheus/<node>/`` (per node:
nodes may share a storage volume), and the main process merges the files at each scrape
(``MultiProcessCollector.merge``). ``Node.start`` wipes the directory and exports it as
``PROMETHEUS_MULTIPROC_DIR`` before it spawns any child (:func:`prepare_directory`), and calls
``mark_process_dead`` for every child that exits (:func:`mark_dead`).

Only the children create metric objects. prometheus_client chooses its value store once, when
it is first imported, from ``PROMETHEUS_MULTIPROC_DIR``; the main process imports it long before
it has read the config that names the directory, so a metric object there would count into
memory nobody merges. The children are spawned (``multiprocessing`` "spawn": a fresh
interpreter that inherits the exported variable) and import it in multiprocess mode;
:func:`for_this_process` checks that and otherwise observes nothing (one error log) instead of
counting silently into memory. The main process's own listener already counts its refusals in
memory (``Listener.refusals``), and :class:`ProcessCollector` adds those to the children's
counts. So the design depends on one ordering only, "export before spawn", which holds for
restarted children too.

Counters and histograms of exited children stay in their files: a restarted worker must not
make a counter go down. ``mark_process_dead`` removes only live-gauge files (none today); it is
called as the documentation asks, so a future live gauge is right from the start.

- ``deid_router_deidentify_seconds``: one instance, read the raw file, de-identify, write the
  work file (the engine's whole run, including runs that refuse the instance).
- ``deid_router_forward_seconds{destination}``: one send of a batch (up to ``queue.batch_size``
  instances over one association, or into one folder), not one instance: the batch is what is
  sent and what a slow or stalled destination delays; waiting for a lane is not included.
- ``deid_router_associations_rejected_total{reason}``: connections and associations the
  listener refused, by the fixed reason code it logs (``called_aet_not_recognized``,
  ``host_not_allowed``, ``artim_timeout``, ...); never a value the peer sent.
"""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from prometheus_client import Counter, Histogram, values
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from deid_router.observability.logging import get_logger

log = get_logger("metrics")

ENV_DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"

DEIDENTIFY = "deid_router_deidentify_seconds"
FORWARD = "deid_router_forward_seconds"
REJECTED = "deid_router_associations_rejected"  # exposed as ..._total

DEIDENTIFY_HELP = "Seconds to read, de-identify and write one instance."
FORWARD_HELP = "Seconds of one send of a batch of instances to a destination."
REJECTED_HELP = "Connections and associations refused by the listener, by reason code."

# A 512x512 CT takes about 2 ms; a multi-frame instance or a pixel-cleaning rule seconds.
DEIDENTIFY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A batch over a warm association takes milliseconds; a cold one or a slow PACS, seconds; a
# destination that does not answer, its connect or DIMSE timeout.
FORWARD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Observer(Protocol):
    """What a worker or a listener process reports (:class:`ProcessMetrics` or :data:`NO_METRICS`)."""

    def deidentified(self, seconds: float) -> None: ...
    def forwarded(self, destination: str, seconds: float) -> None: ...
    def refused(self, reason: str) -> None: ...


class NoMetrics:
    """Observes nothing: tests, the offline commands, a process not in multiprocess mode."""

    def deidentified(self, seconds: float) -> None:
        """Nothing."""

    def forwarded(self, destination: str, seconds: float) -> None:
        """Nothing."""

    def refused(self, reason: str) -> None:
        """Nothing."""


NO_METRICS = NoMetrics()


class ProcessMetrics:
    """The metric objects of one child process (create one per process: two objects of the
    same metric in one process would write over each other's values in the file)."""

    def __init__(self, destinations: Sequence[str] = ()) -> None:
        self._deidentify = Histogram(DEIDENTIFY, DEIDENTIFY_HELP, buckets=DEIDENTIFY_BUCKETS, registry=None)
        self._forward = Histogram(FORWARD, FORWARD_HELP, ["destination"], buckets=FORWARD_BUCKETS, registry=None)
        self._rejected = Counter(REJECTED, REJECTED_HELP, ["reason"], registry=None)
        for name in destinations:  # every destination's zeros show before its first batch
            self._forward.labels(name)
        self._failed = False

    def deidentified(self, seconds: float) -> None:
        try:
            self._deidentify.observe(seconds)
        except OSError as exc:
            self._failure(exc)

    def forwarded(self, destination: str, seconds: float) -> None:
        try:
            self._forward.labels(destination).observe(seconds)
        except OSError as exc:
            self._failure(exc)

    def refused(self, reason: str) -> None:
        try:
            self._rejected.labels(reason).inc()
        except OSError as exc:
            self._failure(exc)

    def _failure(self, exc: OSError) -> None:
        """A metric must never stop a worker or a listener (the directory removed, a full disk)."""
        if not self._failed:
            self._failed = True
            log.error("process_metrics_write_failed", error=type(exc).__name__)


def prepare_directory(directory: Path) -> None:
    """At node start, before any child process exists: empty the node's metrics directory and
    export it for the children (they inherit the environment when they are spawned)."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.glob("*.db"):
        path.unlink(missing_ok=True)
    os.environ[ENV_DIRECTORY] = str(directory)


def mark_dead(directory: Path, pid: int | None) -> None:
    """A child process exited: prometheus_client's bookkeeping for it."""
    if pid is not None:
        try:
            mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
        except OSError:
            log.error("process_metrics_cleanup_failed")


def for_this_process(directory: Path, destinations: Sequence[str] = ()) -> Observer:
    """The metrics of a child process of the node whose directory is ``directory``; observes
    nothing (and says so once) unless this process was started in multiprocess mode for it."""
    multiprocess = bool(getattr(values.ValueClass, "_multiprocess", False))
    if os.environ.get(ENV_DIRECTORY) != str(directory) or not multiprocess or not directory.is_dir():
        log.error("process_metrics_unavailable", multiprocess=multiprocess)
        return NO_METRICS
    try:
        return ProcessMetrics(destinations)
    except OSError as exc:
        log.error("process_metrics_unavailable", multiprocess=multiprocess, error=type(exc).__name__)
        return NO_METRICS


Labels = tuple[tuple[str, str], ...]


class ProcessCollector(Collector):
    """The three families from the children's files, this process's listener refusals added.

    Every family is always present; each histogram has at least zeros (without labels, and for
    every configured destination), so a dashboard's ``rate()`` has a series from the start.
    """

    def __init__(
        self,
        directory: Path,
        destinations: Sequence[str] = (),
        local_refusals: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self.directory = directory
        self.destinations = tuple(destinations)
        self.local_refusals = local_refusals

    def collect(self) -> Iterator[Metric]:
        merged = self._merged()
        yield _histogram(DEIDENTIFY, DEIDENTIFY_HELP, merged.get(DEIDENTIFY), DEIDENTIFY_BUCKETS, [()])
        yield _histogram(
            FORWARD, FORWARD_HELP, merged.get(FORWARD), FORWARD_BUCKETS,
            [(("destination", d),) for d in self.destinations],
        )
        totals: defaultdict[str, float] = defaultdict(float)
        files = merged.get(REJECTED)
        for s in files.samples if files is not None else ():
            if s.name == f"{REJECTED}_total":
                totals[s.labels.get("reason", "")] += s.value
        for reason, count in self.local_refusals().items():
            totals[reason] += count
        rejected = CounterMetricFamily(REJECTED, REJECTED_HELP, labels=["reason"])
        for reason in sorted(totals):
            rejected.add_metric([reason], totals[reason])
        yield rejected

    def _merged(self) -> dict[str, Metric]:
        files = glob.glob(os.path.join(glob.escape(str(self.directory)), "*.db"))
        try:
            merged = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
            return {m.name: m for m in merged}
        except Exception as exc:  # a file torn by a killed child must not fail the scrape
            log.error("process_metrics_read_failed", error=type(exc).__name__)
            return {}


def _histogram(
    name: str, documentation: str, merged: Metric | None, buckets: Sequence[float], expected: Sequence[Labels]
) -> Metric:
    """``merged``'s samples under our help text, with zeros for each expected label set it lacks."""
    family = Metric(name, documentation, "histogram")
    samples = list(merged.samples) if merged is not None else []
    seen = {tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")) for s in samples}
    for labels in expected:
        if labels in seen:
            continue
        base = dict(labels)
        for bound in (*buckets, float("inf")):
            le = floatToGoString(bound)  # type: ignore[no-untyped-call]  # as prometheus_client writes it
            samples.append(Sample(f"{name}_bucket", {**base, "le": le}, 0.0))
        samples.append(Sample(f"{name}_count", base, 0.0))
        samples.append(Sample(f"{name}_sum", base, 0.0))
    family.samples = samples
    return family
