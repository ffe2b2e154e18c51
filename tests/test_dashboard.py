"""The live dashboard (``/dashboard``) in headless Chromium, against a real broker and worker."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from schemas import domain
from streams.processing.metrics import Metrics
from tests.browser import Chromium, Page
from tests.factories import record, task
from tests.harness import Deployment, Web, produce

TOKEN = "dashboard-reader-token"
#: Every figure on the page, by name, as its raw value ("" while not known), and how many
#: throughputs the sparkline draws.
SHOWN = """JSON.stringify({
  figures: Object.fromEntries(
    [...document.querySelectorAll("[data-figure]")].map((e) => [e.dataset.figure, e.dataset.value ?? null])),
  sparkline: document.getElementById("sparkline")?.dataset.samples ?? null,
})"""
#: Figures that must be above zero while tasks flow (one undecodable record among them).
MOVING = (
    "throughput",
    "tasks_per_minute",
    "completed_tasks",
    "task_latency_p50",
    "task_latency_p99",
    "handler_latency_p50",
    "handler_latency_p99",
    "active_agents",
    "agents_idle",
    "memory_ops_per_second",
    "dead_lettered_events",
    "events_in_per_second",
    "resident_memory",
)


def _script() -> str:
    """The dashboard's script as the installed package holds it."""
    return resources.files("streams.serve.dashboard").joinpath("dashboard.js").read_text()


def _metrics_read(script: str) -> set[str]:
    return set(re.findall(r'"((?:blackroad|process)_\w+)"', script))


def _exported(exposition: str) -> set[str]:
    """The series names a ``/metrics`` text can hold (counters and histograms with their suffixes)."""
    families = set(re.findall(r"^# TYPE (\w+) (\w+)", exposition, re.MULTILINE))
    names = {name for name, _ in families}
    return names | {
        f"{name}{suffix}" for name, kind in families for suffix in ("_total", "_bucket", "_info") if kind != "gauge"
    }


def test_the_dashboard_script_reads_only_metrics_the_workers_export() -> None:
    script = _script()
    asked = _metrics_read(script)
    assert len(asked) >= 5
    exported = _exported(Metrics().render().decode())
    assert asked <= exported, asked - exported
    [statuses] = re.findall(r"const AGENT_STATUSES = \[(.*?)\];", script)
    assert tuple(re.findall(r'"(\w+)"', statuses)) == domain.AGENT_STATUSES


@contextmanager
def _tasks_flowing(deployment: Deployment) -> Iterator[None]:
    """Tasks (tools, memory writes, simulated inference) produced until the block ends, after
    one undecodable record (a dead letter)."""
    topic = deployment.topic("tasks")
    produce(deployment.bootstrap, topic, [(b"agent_dash_001", b"\xc1 not msgpack")])
    stop = threading.Event()

    def run() -> None:
        sent = 0
        while not stop.is_set():
            agents = [f"agent_dash_{(sent + i) % 12 + 1:03d}" for i in range(9)]
            events = [task(a) for a in agents[:3]]
            events += [task(a, "memory_operation", {"op": "write", "content": f"note {sent}"}) for a in agents[3:6]]
            events += [task(a, "inference", {"latency_ms": 20}) for a in agents[6:]]
            produce(deployment.bootstrap, topic, [record(e) for e in events])
            sent += len(events)
            stop.wait(0.25)

    with ThreadPoolExecutor(1, thread_name_prefix="dashboard-tasks") as pool:
        producing = pool.submit(run)
        try:
            yield
        finally:
            stop.set()
        producing.result(timeout=30)  # raises what stopped it, if anything did


async def _wait_for(page: Page, expression: str, done: Callable[[Any], bool], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = await page.evaluate(expression)
        if value is not None and done(value):
            return value
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {value!r}")


def _moving(shown: dict[str, Any]) -> bool:
    """Every figure of :data:`MOVING` above zero, and three throughputs in the sparkline."""
    figures = shown["figures"]
    return int(shown["sparkline"] or 0) >= 3 and all(float(figures.get(name) or 0) > 0 for name in MOVING)


async def _look(url: str, home: Path) -> dict[str, Any]:
    """Open the dashboard without a token, then with it; what it shows once its figures move."""
    import orjson

    async with Chromium(home) as browser, browser.tab() as page:
        await page.navigate(f"{url}/dashboard")
        asked = await _wait_for(
            page, "document.getElementById('status')?.textContent", lambda text: "token" in text, 30, "the ask"
        )
        await page.navigate(f"{url}/dashboard#token={TOKEN}")
        shown = await _wait_for(page, SHOWN, lambda raw: _moving(orjson.loads(raw)), 90, "non-zero figures")
        figures = orjson.loads(shown)["figures"]

        def completed(raw: str) -> float:
            return float(orjson.loads(raw)["figures"]["completed_tasks"])

        # It keeps up: the next readings show more tasks done.
        await _wait_for(
            page, SHOWN, lambda raw: completed(raw) > float(figures["completed_tasks"]), 10, "the next figures"
        )
        return {
            "asked": asked,
            "figures": figures,
            "status": await page.evaluate("document.getElementById('status')?.textContent"),
            "reasons": await page.evaluate("document.getElementById('dead_letter_reasons')?.textContent"),
            "screenshot": await page.screenshot(home / "dashboard.png"),
            # The first visit's requests were refused (401): the browser logs those.
            "errors": [error for error in page.errors if not error.startswith("network:")],
        }


def test_the_dashboard_shows_the_deployment_live_in_chromium(deployment: Deployment, tmp_path: Path) -> None:
    deployment.env.update(BLACKROAD_API_TOKENS=TOKEN, BLACKROAD_API_READS="token")
    worker = deployment.worker()
    worker.token = TOKEN
    worker.start().wait_ready()
    # The page and its files need no token (they hold no data); the views the script reads do.
    anyone = Web(worker.port)
    status, html, headers = anyone.exchange("GET", "/dashboard")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8", (status, headers)
    assert "script-src 'self'" in headers["Content-Security-Policy"] and 'src="/dashboard/dashboard.js"' in html
    for asset, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        status, _, headers = anyone.exchange("GET", f"/dashboard/{asset}")
        assert status == 200 and headers["Content-Type"].startswith(kind), (asset, status, headers)
    assert anyone.get("/dashboard/secrets.txt")[0] == 404 and anyone.get("/v1/stats")[0] == 401
    # What the script reads, the live worker serves.
    script = _script()
    _, live_metrics = worker.get("/metrics")
    assert _metrics_read(script) <= _exported(live_metrics), _metrics_read(script) - _exported(live_metrics)
    stats_read = set(re.findall(r"\bstats\.(\w+)", script))
    assert len(stats_read) >= 10 and stats_read <= set(worker.stats()), stats_read - set(worker.stats())

    with _tasks_flowing(deployment):
        seen = asyncio.run(_look(worker.url, tmp_path / "chromium"))
    assert "/dashboard#token=" in seen["asked"] and seen["status"].startswith("updated "), seen
    figures, reasons = seen["figures"], seen["reasons"]
    assert figures["consumer_lag"] not in (None, "") and re.fullmatch(r"\w+: 1", reasons), (figures, reasons)
    assert not seen["errors"], seen["errors"]
    png = seen["screenshot"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000, len(png)
