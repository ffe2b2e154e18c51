"""Fairness of the web ingress: a polite client's task latency with and without a greedy one.

Usage: python benchmarks/fairness.py [--engine kafka|tansu] [--seconds 20] [--polite-rate 50]
       [--greedy-connections 4] [--limits both|defaults|off] [--rounds 1]

Starts a fresh embedded broker and one ``blackroad worker`` with two API tokens, then
measures, for each setting of the rate limits (the defaults, then limits off):

1. the polite client alone: ``POST /v1/tasks`` at ``--polite-rate`` a second;
2. the same polite client while a greedy one posts ``/v1/batch`` of 1,000 tasks back to
   back on ``--greedy-connections`` connections, ignoring every 429.

A polite task's latency is its row's ``completed_at - created_at`` (the worker's own
clock, so this script's CPU use does not enter it). Prints P50/P99 of each phase, the
ratio of the loaded P99 to the unloaded one (the bar: at most 2x with the limits on), and
what the greedy client got through and had refused.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench import machine, running_broker  # noqa: E402
from streams.runtime.broker import free_port  # noqa: E402

POLITE, GREEDY = "polite-client-token-0001", "greedy-client-token-0001"
BATCH = orjson.dumps(
    {"requests": [{"agent_id": f"agent_greedy_{n:03d}", "kind": "tool_execution"} for n in range(1000)]}
)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


async def polite(
    session: aiohttp.ClientSession, url: str, rate: float, seconds: float, tag: str, posts: list[float]
) -> list[str]:
    """Post single tasks at ``rate`` for ``seconds``; returns their ids (and adds each
    request's round trip, in ms, to ``posts``)."""
    ids: list[str] = []
    start = time.monotonic()
    headers = {"Authorization": f"Bearer {POLITE}"}
    for n in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        task = {"id": f"task_{tag}_{n}", "agent_id": f"agent_polite_{n % 100:03d}", "kind": "tool_execution"}
        sent = time.perf_counter()
        async with session.post(f"{url}/v1/tasks", json=task, headers=headers) as response:
            if response.status == 202:
                ids.append(task["id"])
        posts.append((time.perf_counter() - sent) * 1000)
    return ids


async def greedy(session: aiohttp.ClientSession, url: str, stop: asyncio.Event, counts: dict[int, int]) -> None:
    headers = {"Authorization": f"Bearer {GREEDY}", "Content-Type": "application/json"}
    while not stop.is_set():
        async with session.post(f"{url}/v1/batch", data=BATCH, headers=headers) as response:
            await response.read()
            counts[response.status] = counts.get(response.status, 0) + 1


async def latencies(session: aiohttp.ClientSession, url: str, ids: list[str], queued: list[float]) -> list[float]:
    """Each task's completed_at - created_at, waiting for those not done yet (and, where the
    row has it, started_at - created_at added to ``queued``)."""
    found: list[float] = []
    deadline = time.monotonic() + 120
    for task_id in ids:
        while True:
            async with session.get(f"{url}/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {POLITE}"}) as r:
                body = await r.json() if r.status == 200 else {}
            if body.get("completed_at") or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if body.get("completed_at"):
            found.append(body["completed_at"] - body["created_at"])
            if body.get("started_at"):
                queued.append(body["started_at"] - body["created_at"])
    return found


async def phase(url: str, rate: float, seconds: float, connections: int, tag: str) -> dict[str, Any]:
    limits = aiohttp.TCPConnector(limit=connections + 4)
    async with aiohttp.ClientSession(connector=limits) as session:
        stop, counts = asyncio.Event(), dict[int, int]()
        flooding = [asyncio.create_task(greedy(session, url, stop, counts)) for _ in range(connections)]
        started = time.monotonic()
        posts: list[float] = []
        ids = await polite(session, url, rate, seconds, tag, posts)
        elapsed = time.monotonic() - started
        stop.set()
        await asyncio.gather(*flooding)
        queued: list[float] = []
        measured = await latencies(session, url, ids, queued)
    return {
        "polite_tasks": len(measured),
        "p50_ms": percentile(measured, 0.5),
        "p99_ms": percentile(measured, 0.99),
        "queued_p99_ms": percentile(queued, 0.99),
        "post_p99_ms": round(percentile(posts, 0.99), 1),
        "greedy_accepted_tasks_per_s": round(counts.get(202, 0) * 1000 / elapsed),
        "greedy_refused": counts.get(429, 0),
        "greedy_other": {status: n for status, n in counts.items() if status not in (202, 429)},
    }


def run_worker(bootstrap: str, env: dict[str, str], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = (workdir / f"worker-{port}.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "worker"],
        cwd=ROOT,
        env={**os.environ, **env, "BLACKROAD_KAFKA_BOOTSTRAP": bootstrap, "BLACKROAD_WEB_PORT": str(port)},
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(f"{url}/v1/stats", headers={"Authorization": f"Bearer {POLITE}"})  # noqa: S310
            with urllib.request.urlopen(request, timeout=1):  # noqa: S310 - the worker just started
                return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the worker did not start; see {log.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="kafka", choices=("kafka", "tansu"))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--polite-rate", type=float, default=50.0)
    parser.add_argument("--greedy-connections", type=int, default=4)
    parser.add_argument("--limits", default="both", choices=("both", "defaults", "off"))
    parser.add_argument("--rounds", type=int, default=1, help="pairs of phases (alone, loaded) per worker")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp, running_broker(args.engine, Path(tmp)) as broker:
        settings: list[tuple[str, dict[str, str]]] = [
            ("limits at their defaults", {}),
            ("limits off", {"BLACKROAD_RATE_LIMIT_TASKS": "0"}),
        ]
        if args.limits != "both":
            settings = settings[:1] if args.limits == "defaults" else settings[1:]
        for number, (name, limits) in enumerate(settings):
            env = {
                "BLACKROAD_API_TOKENS": f"{POLITE},{GREEDY}",
                "BLACKROAD_HISTORY": "off",
                "BLACKROAD_MEMORY_SEARCH": "off",
                "BLACKROAD_APP_ID": f"fair{number}",
                "BLACKROAD_TOPIC_PREFIX": "blackroad",
                "BLACKROAD_DATA_DIR": str(Path(tmp) / f"data-{number}"),
                **limits,
            }
            process, url = run_worker(broker.bootstrap, env, Path(tmp))
            try:
                asyncio.run(phase(url, args.polite_rate, 5.0, 0, f"{number}w"))  # warm-up, not counted
                for round_ in range(args.rounds):
                    tag = f"{number}r{round_}"
                    alone = asyncio.run(phase(url, args.polite_rate, args.seconds, 0, f"{tag}a"))
                    loaded = asyncio.run(phase(url, args.polite_rate, args.seconds, args.greedy_connections, f"{tag}b"))
                    ratio = loaded["p99_ms"] / alone["p99_ms"] if alone["p99_ms"] else float("nan")
                    print(f"== {name}" + (f", round {round_ + 1}" if args.rounds > 1 else ""))
                    print(f"  polite alone:      {alone}")
                    print(f"  polite and greedy: {loaded}")
                    print(f"  polite P99 loaded / alone: {ratio:.2f}x", flush=True)
            finally:
                process.terminate()
                process.wait(timeout=30)


if __name__ == "__main__":
    main()
