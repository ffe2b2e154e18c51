"""Prometheus metrics of one worker (served at ``GET /metrics``)."""

from __future__ import annotations

import platform
import re
from collections.abc import Iterator, Mapping
from importlib import metadata
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from streams.processing import histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000, 10000)
#: Distinct dead-letter ``reason`` labels kept before the rest are counted as ``other``.
MAX_REASON_LABELS = 32
_INDEX = re.compile(r"\[\d+\]")
_LABEL_SHAPE = re.compile(r"[a-z][a-z_.]{0,31}")


def reason_label(reason: str) -> str:
    """The ``reason`` label of a dead letter: the first word of its reason, without list
    indexes and the colon (``tasks[9999]: ...`` -> ``tasks``), or ``other`` if it is not a
    plain lower-case word."""
    word = _INDEX.sub("", reason.split(" ", 1)[0]).rstrip(":")
    return word if _LABEL_SHAPE.fullmatch(word) else "other"


class Metrics:
    """One registry per worker, so several workers in one process (tests) stay apart."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_in = Counter("blackroad_events_in", "Task events consumed.", registry=r)
        self.events_out = Counter(
            "blackroad_events_out", "Records produced (changelog, lifecycle, dead letters).", registry=r
        )
        self.tasks_done = Counter("blackroad_tasks", "Tasks finished, by final status.", ["status"], registry=r)
        self.task_retries = Counter(
            "blackroad_task_retries", "Failed attempts after which the task waits for another.", registry=r
        )
        #: Handler latency in the project's log buckets (ms), recorded per task on the hot
        #: path and turned into a Prometheus histogram only when scraped.
        self.handler_ms: dict[int, int] = {}
        r.register(_LogHistogramCollector("blackroad_handler_seconds", "Agent handler latency.", self.handler_ms))
        self.batch_size = Histogram(
            "blackroad_batch_size_events", "Events per processing batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "blackroad_batch_seconds", "Time to process and flush one batch.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.consumer_lag = Gauge(
            "blackroad_consumer_lag_records", "Records not yet consumed, by partition.", ["partition"], registry=r
        )
        self.dead_lettered = Counter(
            "blackroad_dead_lettered", "Records sent to the dead-letter topic.", ["reason"], registry=r
        )
        self.handler_errors = Counter("blackroad_handler_errors", "Handler attempts that raised.", registry=r)
        self.repartitioned = Counter(
            "blackroad_repartitioned", "Events re-keyed to their agent's partition.", registry=r
        )
        self.stale_batches = Counter(
            "blackroad_stale_batches",
            "Fetches dropped because partitions were revoked while they waited (fetched again).",
            registry=r,
        )
        self.tasks_expired = Counter(
            "blackroad_tasks_expired", "Finished tasks removed from the live tasks table.", registry=r
        )
        self.history_lag = Gauge(
            "blackroad_history_lag_records",
            "Changelog records the history sink has yet to write to PostgreSQL (all sinks, from the broker).",
            registry=r,
        )
        self.replica_lag_records = Gauge(
            "blackroad_replica_lag_records",
            "Changelog records a read replica has yet to apply (0 on a worker, which answers from its own stores).",
            registry=r,
        )
        self.replica_lag_seconds = Gauge(
            "blackroad_replica_lag_seconds",
            "How far behind the changelogs a read replica answers (X-Staleness-Ms, in seconds).",
            registry=r,
        )
        self.consistency_timeouts = Counter(
            "blackroad_consistency_timeouts",
            "Reads answered 503 because the write their consistency token names was not applied in time.",
            registry=r,
        )
        self.duplicates = Counter(
            "blackroad_duplicate_tasks", "Task events whose task id was already seen.", registry=r
        )
        self.build = Info(
            "blackroad_build", "The running code: version, Python, and whether the hot path is compiled.", registry=r
        )
        self.build.info(build_info())
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        r.register(GC_COLLECTOR)
        self.http_requests = Counter(
            "blackroad_http_requests", "HTTP requests, by view and status.", ["view", "status"], registry=r
        )
        self.http_seconds = Histogram(
            "blackroad_http_request_duration_seconds",
            "Time to answer an HTTP request, by view.",
            ["view"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

        self.tasks_by_status = {
            status: self.tasks_done.labels(status=status) for status in ("completed", "failed", "dead")
        }
        self._http_counters: dict[tuple[str, int], Any] = {}
        self._http_timers: dict[str, Any] = {}
        self._dead_letter_counters: dict[str, Any] = {}

    def dead_letter(self, reason: str) -> None:
        """Count one record sent to the dead-letter topic, labelled by :func:`reason_label`
        (at most :data:`MAX_REASON_LABELS` labels, ``other`` among them)."""
        label = reason_label(reason)
        counter = self._dead_letter_counters.get(label)
        if counter is None:
            if len(self._dead_letter_counters) >= MAX_REASON_LABELS - 1:
                label = "other"
            counter = self._dead_letter_counters[label] = self.dead_lettered.labels(reason=label)
        counter.inc()

    def http_request(self, view: str, status: int, seconds: float) -> None:
        """Count one answered request and its time (the labelled series are looked up once each)."""
        counter = self._http_counters.get((view, status))
        if counter is None:
            counter = self._http_counters[(view, status)] = self.http_requests.labels(view=view, status=str(status))
        counter.inc()
        timer = self._http_timers.get(view)
        if timer is None:
            timer = self._http_timers[view] = self.http_seconds.labels(view=view)
        timer.observe(seconds)

    def batch_done(self, events: int, produced: int, seconds: float, finished: Mapping[str, int]) -> None:
        self.batch_size.observe(events)
        self.batch_seconds.observe(seconds)
        self.events_out.inc(produced)
        for status, count in finished.items():
            self.tasks_by_status[status].inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LogHistogramCollector(Collector):
    """Exposes a :mod:`streams.processing.histogram` map (ms) as a Prometheus histogram in seconds.

    Each log bucket (about 4% wide) is counted under the first bound at or above its
    middle, so counts near a bound may land one bucket off.
    """

    def __init__(self, name: str, documentation: str, buckets: dict[int, int]) -> None:
        self._name = name
        self._documentation = documentation
        self._buckets = buckets

    def collect(self) -> Iterator[HistogramMetricFamily]:
        counts = [0] * (len(_LATENCY_BUCKETS) + 1)
        total_seconds = 0.0
        for index, count in list(self._buckets.items()):
            seconds = histogram.bucket_value(index) / 1000.0
            total_seconds += seconds * count
            slot = next((i for i, bound in enumerate(_LATENCY_BUCKETS) if seconds <= bound), len(_LATENCY_BUCKETS))
            counts[slot] += count
        cumulative = 0
        buckets = []
        for bound, count in zip((*map(str, _LATENCY_BUCKETS), "+Inf"), counts, strict=True):
            cumulative += count
            buckets.append((bound, float(cumulative)))
        family = HistogramMetricFamily(self._name, self._documentation)
        family.add_metric([], buckets, total_seconds)
        yield family


def build_info() -> dict[str, str]:
    """What ``blackroad_build_info`` says of the running code."""
    from streams.runtime import native

    try:
        version = metadata.version("blackroad-streams")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"version": version, "python": platform.python_version(), "hot_path": native.describe()}
