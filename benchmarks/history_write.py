"""The history's two ways of writing a batch, side by side, on a fresh embedded PostgreSQL.

Usage: python benchmarks/history_write.py [--rows 200000] [--batch 20000] [--agents 30000]

* ``copy``: the sink's way (:func:`streams.history.store.write`): binary COPY into a
  staging table, then one ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` per batch;
* ``executemany``: one prepared ``INSERT ... VALUES ... ON CONFLICT DO UPDATE`` run for
  every row of the batch (asyncpg's ``executemany``, pipelined in one round trip).

Each method writes the same task rows (first as new rows, then all again as newer versions,
the upsert path) into emptied tables with every index of the schema. Prints rows/s per
method and pass, and the machine it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from streams.history import schema, store
from streams.history.embedded import EmbeddedPostgres
from streams.runtime.broker import free_port

_EXECUTEMANY = f"""
INSERT INTO tasks AS t ({", ".join(store.TASK_COLUMNS)})
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9::jsonb, $10, $11,
        to_timestamp($12::float8 / 1000), to_timestamp($13::float8 / 1000), to_timestamp($14::float8 / 1000),
        to_timestamp($15::float8 / 1000), $16::jsonb, $17, $18)
ON CONFLICT (id) DO UPDATE SET
    {", ".join(f"{c} = EXCLUDED.{c}" for c in store.TASK_COLUMNS[1:])}, recorded_at = clock_timestamp()
WHERE {store.TASK_NEWER}
"""  # noqa: S608 - the project's own column names


def task_rows(count: int, agents: int, offset_base: int) -> list[dict[str, Any]]:
    now = int(time.time() * 1000)
    rows = []
    for i in range(count):
        rows.append(
            {
                "o": offset_base + i,
                "id": f"task_bench{i:09d}",
                "agent_id": f"agent_bench_{i % agents:05d}",
                "title": f"bench task {i}",
                "description": "",
                "kind": "inference",
                "priority": "normal",
                "payload": {"prompt": f"question {i}", "max_tokens": 64},
                "status": "completed",
                "result": {"text": f"answer {i}", "tokens": 12},
                "error": None,
                "attempts": 1,
                "created_at": now - 50,
                "started_at": now - 40,
                "completed_at": now,
                "deadline": None,
                "metadata": {},
            }
        )
    return rows


async def run_method(pool: asyncpg.Pool, method: str, rows: list[dict[str, Any]], batch_size: int) -> float:
    """Rows/s writing ``rows`` in batches of ``batch_size`` (conversion to columns included)."""
    started = time.perf_counter()
    for first in range(0, len(rows), batch_size):
        batch = store.HistoryBatch()
        for row in rows[first : first + batch_size]:
            batch.add_task(row, 0)
        async with pool.acquire() as conn:
            if method == "copy":
                await store.write(conn, batch)
            else:
                async with conn.transaction():
                    await conn.executemany(_EXECUTEMANY, list(batch.tasks.values()))
    return len(rows) / (time.perf_counter() - started)


async def main_async(args: argparse.Namespace, dsn: str) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, init=store.prepare)
    async with pool.acquire() as conn:
        await schema.migrate(conn)
    first = task_rows(args.rows, args.agents, 0)
    newer = task_rows(args.rows, args.agents, args.rows)
    for method in ("copy", "executemany", "copy", "executemany"):
        async with pool.acquire() as conn:
            await conn.execute("TRUNCATE tasks")
            await conn.execute("CHECKPOINT")
        inserted = await run_method(pool, method, first, args.batch)
        updated = await run_method(pool, method, newer, args.batch)
        async with pool.acquire() as conn:
            count = await conn.fetchval("SELECT count(*) FROM tasks WHERE source_offset >= $1", args.rows)
        assert count == args.rows, f"{method}: {count} rows updated of {args.rows}"
        print(f"{method:12s} new rows {inserted:>9,.0f} rows/s   newer versions {updated:>9,.0f} rows/s", flush=True)
    await pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--agents", type=int, default=30_000)
    args = parser.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{args.rows:,} task rows in batches of {args.batch:,}, indexes of schema version {schema.latest_version()}")
    with tempfile.TemporaryDirectory() as tmp, EmbeddedPostgres(free_port(), Path(tmp) / "postgres") as server:
        asyncio.run(main_async(args, server.dsn))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
