"""Reads apart from processing: task latency with and without 5,000 GET/s on read replicas.

Usage: python benchmarks/reads.py [--engine kafka|tansu] [--seconds 30] [--rate 500]
       [--agents 30000] [--reads 5000] [--readers 1] [--connections 32] [--warmup 5] [--memory-search on|off]
       [--load wrk|python]

Starts a fresh embedded broker, then twice a fresh ``blackroad worker`` (one worker process
and ``--readers`` read replicas, ``BLACKROAD_READERS``), each time sending the demo mix
(``streams.runtime.loadgen``) at ``--rate`` tasks a second over ``--agents`` agents for
``--seconds`` seconds:

1. without reads;
2. with ``--reads`` GET requests a second spread over the readers: agent detail (40%), task
   detail (30%, tasks sent at least a second before), stats (15%) and the agent list (15%),
   from ``wrk`` (``benchmarks/wrk_reads.lua``, paced, from the end of the warm-up) where it is
   installed, else from an aiohttp load generator in this process, open loop on
   ``--connections`` connections (which needs about a core of its own for 5,000 a second).

Prints the task latency P50/P99 of each phase: from the rows (``completed_at - created_at``,
the worker's own clock) of every fifth task sent after the first ``--warmup`` seconds, and, for
reference, from the worker's ``/v1/stats`` (all the phase's tasks; each phase has its own app).
Then the views' P50/P99 and error count, and the replicas' staleness P99 (the ``X-Staleness-Ms`` header of
every answer). The bars: task P99 with reads within 1.25x of without; views P99 <= 20 ms;
staleness P99 <= 250 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench import machine, running_broker  # noqa: E402
from schemas import wire  # noqa: E402
from streams.runtime import kafka_clients  # noqa: E402
from streams.runtime.broker import free_port, terminate  # noqa: E402
from streams.runtime.loadgen import agent_ids, make_task  # noqa: E402

#: Share of each view in the read mix.
MIX = (("agent", 40), ("task", 30), ("stats", 15), ("agents", 15))
#: A task is asked for once it was sent at least this long ago (seconds).
TASK_AGE = 1.0


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))], 2) if ordered else float("nan")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own worker
        return orjson.loads(response.read())


def start(bootstrap: str, env: dict[str, str], readers: int, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """One worker process and ``readers`` readers (ports port+1...), once all answer ``/readyz``."""
    port = free_port(1 + readers)
    log = (workdir / f"worker-{port}.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "worker"],
        cwd=ROOT,
        env={
            **os.environ,
            **env,
            "BLACKROAD_KAFKA_BOOTSTRAP": bootstrap,
            "BLACKROAD_WEB_PORT": str(port),
            "BLACKROAD_WORKER_PROCESSES": "1",
            "BLACKROAD_READERS": str(readers),
        },
        stdout=log,
        stderr=log,
    )
    deadline = time.monotonic() + 120
    for each in range(port, port + 1 + readers):
        while True:
            try:
                get_json(f"http://127.0.0.1:{each}/readyz")
                break
            except OSError:
                if time.monotonic() > deadline:
                    process.kill()
                    raise SystemExit(f"port {each} did not become ready; see {log.name}") from None
                time.sleep(0.3)
    return process, port


async def send_tasks(
    bootstrap: str,
    topic: str,
    agents: list[str],
    rate: float,
    seconds: float,
    sent: deque[tuple[float, str]],
    measured: list[str],
    warmup: float,
) -> int:
    """The demo mix at ``rate`` for ``seconds``; each task's id and send time go to ``sent``, and
    every fifth one sent after ``warmup`` seconds to ``measured``."""
    rng = random.Random(7)  # noqa: S311 - load generation
    producer = kafka_clients.producer(bootstrap, linger_ms=0, acks=1)
    await producer.start()
    started = time.monotonic()
    count = int(rate * seconds)
    try:
        pending = []
        for sequence in range(1, count + 1):
            agent = agents[(sequence - 1) % len(agents)]
            event = make_task(agent, sequence, rng)
            pending.append(await producer.send(topic, wire.encode_task(event), key=agent.encode()))
            sent.append((time.monotonic(), event.task_id))
            if sequence % 5 == 0 and sequence > warmup * rate:
                measured.append(event.task_id)
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                pending.clear()
            ahead = sequence / rate - (time.monotonic() - started)
            if ahead > 0.002:
                await asyncio.sleep(ahead)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return count


async def read_load(
    urls: list[str],
    agents: list[str],
    sent: deque[tuple[float, str]],
    rate: float,
    connections: int,
    stop: asyncio.Event,
    found: dict[str, list[float]],
) -> None:
    """GETs at ``rate`` a second in all, open loop: each connection has its own schedule."""
    views = [view for view, weight in MIX for _ in range(weight)]
    rng = random.Random(11)  # noqa: S311 - load generation
    per_connection = rate / connections

    def path() -> str:
        view = rng.choice(views)
        if view == "agent":
            return f"/v1/agents/{rng.choice(agents)}"
        if view == "task":
            if sent:
                when, task = sent[rng.randrange(len(sent))]
                if time.monotonic() - when >= TASK_AGE:
                    return f"/v1/tasks/{task}"
            return "/v1/stats"
        return "/v1/stats" if view == "stats" else "/v1/agents?limit=20"

    async def connection(number: int, session: aiohttp.ClientSession) -> None:
        base = urls[number % len(urls)]
        began = time.monotonic() + rng.random() / per_connection
        n = 0
        while not stop.is_set():
            due = began + n / per_connection
            n += 1
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            asked = time.perf_counter()
            try:
                async with session.get(base + path()) as response:
                    await response.read()
                    status = response.status
                    staleness = response.headers.get("X-Staleness-Ms")
            except aiohttp.ClientError:
                found["errors"].append(1)
                continue
            found["ms"].append((time.perf_counter() - asked) * 1000)
            if status >= 500:
                found["errors"].append(status)
            if staleness is not None:
                found["staleness"].append(float(staleness))

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(connection(n, session) for n in range(connections)))


async def wrk_load(
    urls: list[str],
    agents: list[str],
    sent: deque[tuple[float, str]],
    rate: float,
    connections: int,
    seconds: float,
    workdir: Path,
) -> dict[str, Any]:
    """The read mix from ``wrk`` (``benchmarks/wrk_reads.lua``), one wrk per reader, for
    ``seconds``: each connection pauses between requests so that all of them make about
    ``rate`` a second. Task detail asks for tasks sent at least :data:`TASK_AGE` ago."""
    agent_file, task_file = workdir / "agents.txt", workdir / "tasks.txt"
    agent_file.write_text("\n".join(agents) + "\n")
    old_enough = time.monotonic() - TASK_AGE
    task_file.write_text("\n".join(task for when, task in list(sent) if when <= old_enough) + "\n")
    per_reader = max(1, connections // len(urls))
    # A connection's request takes a few ms besides its pause; 2 ms is taken off the pause for it.
    pause = max(0.0, per_reader * len(urls) * 1000 / rate - 2.0)
    runs = [
        await asyncio.create_subprocess_exec(
            "wrk",
            f"-t{max(1, 2 // len(urls))}",
            f"-c{per_reader}",
            f"-d{max(1, int(seconds))}s",
            "--latency",
            "-s",
            str(ROOT / "benchmarks" / "wrk_reads.lua"),
            url,
            "--",
            str(agent_file),
            str(task_file),
            f"{pause:.2f}",
            stdout=asyncio.subprocess.PIPE,
        )
        for url in urls
    ]
    outputs = [orjson.loads((await run.communicate())[0].decode().strip().splitlines()[-1]) for run in runs]
    seconds_run = max(out["seconds"] for out in outputs)
    return {
        "reads_per_s": round(sum(out["requests"] for out in outputs) / seconds_run),
        "view_p50_ms": max(out["p50_ms"] for out in outputs),
        "view_p99_ms": max(out["p99_ms"] for out in outputs),
        "view_errors": sum(out["errors"] + out["socket_errors"] for out in outputs),
        "staleness_p50_ms": max(out["staleness_p50_ms"] for out in outputs),
        "staleness_p99_ms": max(out["staleness_p99_ms"] for out in outputs),
        "load": "wrk",
    }


async def task_latencies(worker_url: str, task_ids: list[str]) -> list[float]:
    """``completed_at - created_at`` of each finished task among ``task_ids`` (its row on the worker)."""
    found: list[float] = []
    async with aiohttp.ClientSession() as session:
        for task_id in task_ids:
            async with session.get(f"{worker_url}/v1/tasks/{task_id}") as response:
                if response.status != 200:
                    continue
                row = await response.json()
            if row.get("completed_at"):
                found.append(float(row["completed_at"] - row["created_at"]))
    return found


async def phase(
    args: argparse.Namespace, bootstrap: str, worker_url: str, reader_urls: list[str], reads: bool
) -> dict[str, Any]:
    agents = agent_ids(args.agents)
    sent: deque[tuple[float, str]] = deque(maxlen=20_000)
    measured: list[str] = []
    found: dict[str, list[float]] = {"ms": [], "staleness": [], "errors": []}
    stop = asyncio.Event()
    with_wrk = reads and args.load == "wrk"
    reading = (
        asyncio.create_task(read_load(reader_urls, agents, sent, args.reads, args.connections, stop, found))
        if reads and not with_wrk
        else None
    )
    started = time.monotonic()
    sending = asyncio.create_task(
        send_tasks(bootstrap, args.topic, agents, args.rate, args.seconds, sent, measured, args.warmup)
    )
    from_wrk: dict[str, Any] = {}
    if with_wrk:
        # wrk starts once the warm-up has sent tasks to ask for, and reads until the load ends.
        await asyncio.sleep(args.warmup)
        left = args.seconds - (time.monotonic() - started)
        from_wrk = await wrk_load(reader_urls, agents, sent, args.reads, args.connections, left, args.workdir)
    count = await sending
    elapsed = time.monotonic() - started
    stop.set()
    if reading is not None:
        await reading
    deadline = time.monotonic() + 60
    stats: dict[str, Any] = get_json(f"{worker_url}/v1/stats")

    def finished() -> int:
        return int(stats["completed_tasks"] + stats["failed_tasks"] + stats["dead_tasks"])

    while finished() < count and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        stats = get_json(f"{worker_url}/v1/stats")
    latencies = await task_latencies(worker_url, measured)
    result: dict[str, Any] = {
        "tasks_sent": count,
        "tasks_finished": finished(),
        "tasks_measured": len(latencies),
        "task_p50_ms": percentile(latencies, 0.5),
        "task_p99_ms": percentile(latencies, 0.99),
        "stats_task_p50_ms": stats["task_latency_ms"]["p50"],
        "stats_task_p99_ms": stats["task_latency_ms"]["p99"],
    }
    if from_wrk:
        result.update(from_wrk)
    elif reads:
        result.update(
            {
                "reads_per_s": round(len(found["ms"]) / elapsed),
                "view_p50_ms": percentile(found["ms"], 0.5),
                "view_p99_ms": percentile(found["ms"], 0.99),
                "view_errors": len(found["errors"]),
                "staleness_p50_ms": percentile(found["staleness"], 0.5),
                "staleness_p99_ms": percentile(found["staleness"], 0.99),
            }
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="kafka", choices=("kafka", "tansu"))
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=500.0, help="tasks a second (the demo mix)")
    parser.add_argument("--agents", type=int, default=30_000)
    parser.add_argument("--reads", type=float, default=5000.0, help="GET requests a second in the second phase")
    parser.add_argument("--readers", type=int, default=1, help="read replicas (BLACKROAD_READERS)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of tasks left out of the task latency")
    parser.add_argument("--memory-search", default="on", choices=("on", "off"))
    parser.add_argument(
        "--load",
        default="wrk" if shutil.which("wrk") else "python",
        choices=("wrk", "python"),
        help="what makes the reads: wrk (the default where it is installed) or this script",
    )
    args = parser.parse_args()
    print(f"machine: {machine()}")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, running_broker(args.engine, Path(tmp)) as broker:
        for number, reads in enumerate((False, True)):
            env = {
                "BLACKROAD_HISTORY": "off",
                "BLACKROAD_MEMORY_SEARCH": args.memory_search,
                # One load generator is one client: the per-client limit would refuse most reads.
                "BLACKROAD_RATE_LIMIT_REQUESTS": "0",
                "BLACKROAD_APP_ID": f"reads{number}",
                "BLACKROAD_TOPIC_PREFIX": f"reads{number}",
                "BLACKROAD_DATA_DIR": str(Path(tmp) / f"data-{number}"),
            }
            args.topic = f"reads{number}.tasks"
            args.workdir = Path(tmp)
            process, port = start(broker.bootstrap, env, args.readers, Path(tmp))
            worker_url = f"http://127.0.0.1:{port}"
            reader_urls = [f"http://127.0.0.1:{port + 1 + n}" for n in range(args.readers)]
            try:
                name = "with reads" if reads else "without reads"
                results[name] = asyncio.run(phase(args, broker.bootstrap, worker_url, reader_urls, reads))
                print(f"{name}: {results[name]}", flush=True)
            finally:
                terminate(process, timeout=15)
    alone, loaded = results["without reads"], results["with reads"]
    ratio = (loaded["task_p99_ms"] or 0) / max(1e-9, alone["task_p99_ms"] or 0)
    print(
        f"task P99 {alone['task_p99_ms']} -> {loaded['task_p99_ms']} ms ({ratio:.2f}x, bar <= 1.25x); "
        f"views P99 {loaded['view_p99_ms']} ms (bar <= 20); staleness P99 {loaded['staleness_p99_ms']} ms (bar <= 250)"
    )


if __name__ == "__main__":
    main()
