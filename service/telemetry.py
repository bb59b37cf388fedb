"""Prometheus metrics of one process, in a registry of their own (no global state).

The DICOM node gets the same :class:`Telemetry` object from ``rtseg serve`` and
counts its associations with ``telemetry.dicom_associations.labels(outcome).inc()``;
this module imports nothing from either face.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from rtseg.jobs import FINAL, JobState, JobStore
from rtseg.worker import PoolStatus

DURATION_BUCKETS = (5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, float("inf"))


class Telemetry:
    """Counters a process increments, plus collectors that read the job store at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.dicom_associations = Counter(
            "rtseg_dicom_associations",
            "DICOM associations handled by the node, by outcome (accepted, rejected, aborted)",
            ["outcome"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "rtseg_http_requests",
            "HTTP requests answered, by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "rtseg_http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            ["route"],
            registry=self.registry,
        )
        self._watched = False

    def watch_jobs(self, store: JobStore) -> None:
        """Expose jobs by state, queue depth and durations from ``store`` (once per registry)."""
        if not self._watched:
            self.registry.register(JobCollector(store))
            self._watched = True

    def watch_workers(self, status: Callable[[], PoolStatus]) -> None:
        """Expose configured and live workers and worker restarts, read from ``status`` at scrape time."""
        self.registry.register(WorkerCollector(status))


class WorkerCollector(Collector):
    """The supervised pool: a gap between configured and live workers means one is missing."""

    def __init__(self, status: Callable[[], PoolStatus]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        now = self.status()
        yield GaugeMetricFamily(
            "rtseg_workers_configured", "Worker processes configured", value=now.configured
        )
        yield GaugeMetricFamily(
            "rtseg_workers_live", "Worker processes running with a model loaded", value=now.ready
        )
        yield CounterMetricFamily(
            "rtseg_worker_restarts", "Dead worker processes restarted", value=now.restarts
        )


class JobCollector(Collector):
    """Reads the shared job table on every scrape, so jobs of every process are counted."""

    def __init__(self, store: JobStore, history: int = 10_000) -> None:
        self.store = store
        self.history = history

    def collect(self) -> Iterator[Metric]:
        counts = self.store.counts()
        jobs = GaugeMetricFamily("rtseg_jobs", "Jobs in the store, by state", labels=["state"])
        for state, n in counts.items():
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily(
            "rtseg_queue_depth", "Jobs waiting for a worker", value=counts[str(JobState.QUEUED)]
        )
        yield self._durations()

    def _durations(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "rtseg_job_duration_seconds",
            "Pipeline time of finished jobs (load, segment, RTSTRUCT), by source",
            labels=["source"],
        )
        by_source: dict[str, list[float]] = {}
        for job in self.store.list(FINAL, limit=self.history):
            total = (job.result.get("timings") or {}).get("total_s")
            if isinstance(total, int | float):
                by_source.setdefault(job.source, []).append(float(total))
        for source, values in sorted(by_source.items()):
            buckets = [(_bound(b), float(sum(v <= b for v in values))) for b in DURATION_BUCKETS]
            family.add_metric([source], buckets, sum(values))
        return family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else f"{value:g}"
