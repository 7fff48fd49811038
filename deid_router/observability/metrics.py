"""Prometheus metrics of the node, read from the queue database at each scrape.

The listener and the workers run in other processes; the database is what they share, so the
counters are counts of rows (instances received, jobs done, quarantine entries ever made):
they survive restarts and agree between nodes sharing one database. ``/metrics`` and the
node_exporter textfile (``scheduler.Housekeeping.report``) render this same collector, next to
the per-event latency histograms and refusal counts of the node's processes
(:mod:`deid_router.observability.process_metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.metrics_core import Metric

from deid_router import __version__
from deid_router.db.engine import utc_now
from deid_router.db.operations import Reports
from deid_router.errors import QueueError
from deid_router.jobs.states import ALL_STATES
from deid_router.observability.logging import get_logger

log = get_logger("metrics")


class QueueCollector(Collector):
    """Every metric of the contract's ``/metrics``, from one read of the database."""

    def __init__(
        self,
        reports: Reports,
        free_bytes: Callable[[], int],
        destinations: Sequence[str] = (),
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.reports = reports
        self.free_bytes = free_bytes
        self.destinations = tuple(destinations)
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("deid_router_build", "deid-router version.")
        info.add_metric([], {"version": __version__})
        yield info
        free = GaugeMetricFamily("deid_router_holding_free_bytes", "Free space on the holding filesystem.")
        try:
            free.add_metric([], float(self.free_bytes()))
        except OSError:
            pass
        yield free
        up = GaugeMetricFamily("deid_router_queue_database_up", "1 when the queue database answered this scrape.")
        try:
            m = self.reports.metrics()
        except QueueError:
            log.error("queue_metrics_failed")
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        names = sorted(set(self.destinations) | set(m.jobs) | m.paused)
        jobs = GaugeMetricFamily("deid_router_jobs", "Jobs by destination and state.", labels=["destination", "state"])
        delivered = CounterMetricFamily(
            "deid_router_instances_delivered", "Instances delivered (jobs done) per destination.", labels=["destination"]
        )
        oldest = GaugeMetricFamily(
            "deid_router_oldest_job_age_seconds", "Age of the oldest queued, running or retrying job (0: none).",
            labels=["destination"],
        )
        paused = GaugeMetricFamily("deid_router_destination_paused", "1 while an operator paused it.", labels=["destination"])
        now = self.clock()
        for d in names:
            states = m.jobs.get(d, {})
            for s in ALL_STATES:
                jobs.add_metric([d, s.value], float(states.get(s.value, 0)))
            delivered.add_metric([d], float(states.get("done", 0)))
            first = m.oldest_pending.get(d)
            oldest.add_metric([d], max(0.0, (now - first).total_seconds()) if first else 0.0)
            paused.add_metric([d], 1.0 if d in m.paused else 0.0)
        yield jobs
        yield delivered
        yield oldest
        yield paused
        received = CounterMetricFamily("deid_router_instances_received", "Instances received and held.")
        received.add_metric([], float(m.received_total))
        yield received
        qtotal = CounterMetricFamily(
            "deid_router_instances_quarantined", "Quarantine entries ever made, per destination ('' for the instance).",
            labels=["destination"],
        )
        for d in sorted(set(names) | set(m.quarantined_total)):
            qtotal.add_metric([d], float(m.quarantined_total.get(d, 0)))
        yield qtotal
        q = GaugeMetricFamily("deid_router_quarantined", "Instances in the quarantine (open entries).")
        q.add_metric([], float(m.quarantined))
        yield q


def registry_for(collector: QueueCollector, children: Collector | None = None) -> CollectorRegistry:
    """One registry of the queue collector and, in a node, its process metrics (``children``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if children is not None:
        registry.register(children)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry)
