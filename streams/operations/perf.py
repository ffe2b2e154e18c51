"""``blackroad perf``: the seed's performance dashboard (its ``./perf.sh``) in the terminal.

Two samples ``interval`` seconds apart of each worker's ``/metrics`` and one of the
deployment's ``/v1/stats`` give, over that interval: API latency P50/P95/P99 (from the
HTTP request duration histograms, every view but ``/metrics`` and the probes), requests a
second, the 5xx share, CPU and memory of the worker processes, their open files (sockets
included), consumer lag, and the stream's own figures (tasks a minute, task and handler
latency, memory operations a second). Each of the seed's targets gets a check or a warning.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

#: Views left out of the API latency: scrapes, probes and the dashboard's files are not API calls.
_NOT_API = frozenset({"metrics", "healthz", "readyz", "dashboard"})


@dataclass
class Sample:
    """What one scrape of the workers' ``/metrics`` says, summed over the workers."""

    at: float
    #: view -> upper bound (seconds) -> requests at or under it (cumulative, as Prometheus keeps them).
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)
    requests: float = 0.0
    errors: float = 0.0
    cpu_seconds: float = 0.0
    rss_bytes: float = 0.0
    open_files: float = 0.0
    lag: float = 0.0


def parse_metrics(texts: list[str], at: float) -> Sample:
    sample = Sample(at)
    for text in texts:
        for family in text_string_to_metric_families(text):
            for metric in family.samples:
                name, labels, value = metric.name, metric.labels, metric.value
                if name == "blackroad_http_request_duration_seconds_bucket" and labels["view"] not in _NOT_API:
                    view = sample.buckets.setdefault(labels["view"], {})
                    bound = float(labels["le"])
                    view[bound] = view.get(bound, 0.0) + value
                elif name == "blackroad_http_requests_total" and labels["view"] not in _NOT_API:
                    sample.requests += value
                    if labels["status"].startswith("5"):
                        sample.errors += value
                elif name == "process_cpu_seconds_total":
                    sample.cpu_seconds += value
                elif name == "process_resident_memory_bytes":
                    sample.rss_bytes += value
                elif name == "process_open_fds":
                    sample.open_files += value
                elif name == "blackroad_consumer_lag_records":
                    sample.lag += value
    return sample


def percentile_ms(cumulative: dict[float, float], share: float) -> float | None:
    """The ``share`` quantile (ms) of a cumulative histogram: the upper bound of the bucket it
    falls in (``inf`` beyond the last), or None when it counts nothing."""
    if not cumulative:
        return None
    total = cumulative.get(math.inf, max(cumulative.values()))
    if total <= 0:
        return None
    for bound in sorted(cumulative):
        if cumulative[bound] >= share * total:
            return bound * 1000.0
    return math.inf


def _difference(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {bound: count - before.get(bound, 0.0) for bound, count in after.items()}


@dataclass
class Report:
    seconds: float
    api_ms: dict[str, float | None]
    search_p99_ms: float | None
    requests_per_second: float
    error_share: float | None
    cpu_percent: float
    rss_bytes: float
    open_files: float
    lag: float
    stats: dict[str, Any]

    def checks(self) -> list[tuple[bool | None, str]]:
        """The seed's targets: (met, what); met is None when there is nothing to judge it by."""
        task_p99 = (self.stats.get("task_latency_ms") or {}).get("p99")
        return [
            _under(self.api_ms["p50"], 50, "API latency P50 < 50 ms"),
            _under(self.api_ms["p99"], 200, "API latency P99 < 200 ms"),
            _under(self.search_p99_ms, 100, "memory search P99 < 100 ms"),
            _under(task_p99, 500, "agent response (task latency P99) < 500 ms"),
            (
                None if not self.stats else self.stats.get("tasks_per_minute", 0) > 1000,
                "task throughput > 1,000/min",
            ),
            _under(None if self.error_share is None else self.error_share * 100, 0.1, "error rate (HTTP 5xx) < 0.1%"),
        ]


def _under(value: float | None, limit: float, what: str) -> tuple[bool | None, str]:
    return (None if value is None else value < limit), what


def report(before: Sample, after: Sample, stats: dict[str, Any]) -> Report:
    seconds = max(1e-9, after.at - before.at)
    views = {view: _difference(counts, before.buckets.get(view, {})) for view, counts in after.buckets.items()}
    api: dict[float, float] = {}
    for counts in views.values():
        for bound, count in counts.items():
            api[bound] = api.get(bound, 0.0) + count
    requests = after.requests - before.requests
    return Report(
        seconds=seconds,
        api_ms={f"p{round(q * 100)}": percentile_ms(api, q) for q in (0.5, 0.95, 0.99)},
        search_p99_ms=percentile_ms(views.get("memory_search", {}), 0.99),
        requests_per_second=requests / seconds,
        error_share=(after.errors - before.errors) / requests if requests > 0 else None,
        cpu_percent=100.0 * (after.cpu_seconds - before.cpu_seconds) / seconds,
        rss_bytes=after.rss_bytes,
        open_files=after.open_files,
        lag=after.lag,
        stats=stats,
    )


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return "over 10 s" if math.isinf(value) else f"{value:g}ms"


def render(found: Report, workers: int) -> str:
    stats = found.stats
    task = stats.get("task_latency_ms") or {}
    handler = stats.get("handler_latency_ms") or {}
    lines = [
        "BLACKROAD PERFORMANCE",
        "=====================",
        f"({workers} worker process(es), over {found.seconds:.1f} s)",
        "",
        "API Latency:",
        *(f"  {name.upper()}: {_ms(value)}" for name, value in found.api_ms.items()),
        f"  memory search P99: {_ms(found.search_p99_ms)}",
        "",
        "Throughput:",
        f"  Requests/s: {found.requests_per_second:,.1f}",
        f"  Tasks/min: {stats.get('tasks_per_minute', 0):,}",
        f"  Memory ops/s: {stats.get('memory_ops_per_second', 0):,}",
        f"  Task latency P50/P95/P99: {task.get('p50')}/{task.get('p95')}/{task.get('p99')} ms "
        f"(handlers {handler.get('p50')}/{handler.get('p95')}/{handler.get('p99')} ms)",
        "",
        "Resources:",
        f"  CPU: {found.cpu_percent:.0f}% of a core",
        f"  Memory: {found.rss_bytes / 2**20:,.0f} MB resident",
        f"  Open files (connections included): {found.open_files:,.0f}",
        f"  Consumer lag: {found.lag:,.0f} records; pending tasks {stats.get('pending_tasks', 0):,}",
        "",
        "Targets:",
    ]
    for met, what in found.checks():
        mark = "?" if met is None else "✓" if met else "⚠"
        lines.append(f"  {mark} {what}" + (" (nothing to judge it by yet)" if met is None else ""))
    return "\n".join(lines)


def fetcher(token: str | None) -> Callable[[str], bytes]:
    def fetch(url: str) -> bytes:
        request = urllib.request.Request(url)  # noqa: S310 - the deployment's own URLs
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            body: bytes = response.read()
            return body

    return fetch


def measure(urls: list[str], interval: float, fetch: Callable[[str], bytes]) -> Report:
    """Scrape ``urls`` (worker web URLs) twice, ``interval`` seconds apart, and ``/v1/stats`` once."""
    before = parse_metrics([fetch(f"{url}/metrics").decode() for url in urls], time.monotonic())
    time.sleep(interval)
    after = parse_metrics([fetch(f"{url}/metrics").decode() for url in urls], time.monotonic())
    stats: dict[str, Any] = orjson.loads(fetch(f"{urls[0]}/v1/stats"))
    return report(before, after, stats)
