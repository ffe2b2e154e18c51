"""Prometheus metrics of one worker (served at ``GET /metrics``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000, 10000)


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
        self.handler_seconds = Histogram(
            "blackroad_handler_seconds", "Agent handler latency.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "blackroad_batch_size", "Events per processing batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "blackroad_batch_seconds", "Time to process and flush one batch.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.consumer_lag = Gauge(
            "blackroad_consumer_lag", "Records not yet consumed, by partition.", ["partition"], registry=r
        )
        self.dead_lettered = Counter(
            "blackroad_dead_lettered", "Records sent to the dead-letter topic.", ["reason"], registry=r
        )
        self.handler_errors = Counter("blackroad_handler_errors", "Handler attempts that raised.", registry=r)
        self.repartitioned = Counter(
            "blackroad_repartitioned", "Events re-keyed to their agent's partition.", registry=r
        )
        self.tasks_expired = Counter(
            "blackroad_tasks_expired", "Finished tasks removed from the live tasks table.", registry=r
        )
        self.duplicates = Counter(
            "blackroad_duplicate_tasks", "Task events whose task id was already seen.", registry=r
        )
        self.http_requests = Counter(
            "blackroad_http_requests", "HTTP requests, by view and status.", ["view", "status"], registry=r
        )

        self.tasks_by_status = {
            status: self.tasks_done.labels(status=status) for status in ("completed", "failed", "dead")
        }

    def batch_done(
        self, events: int, produced: int, seconds: float, finished: Mapping[str, int], handler_ms: Iterable[float]
    ) -> None:
        self.batch_size.observe(events)
        self.batch_seconds.observe(seconds)
        self.events_out.inc(produced)
        for status, count in finished.items():
            self.tasks_by_status[status].inc(count)
        observe = self.handler_seconds.observe
        for value in handler_ms:
            observe(value / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
