"""Writes into the history database: a batch of rows in one transaction, by COPY and one upsert.

A batch's rows are copied (binary COPY) into temporary staging tables, then merged into
the history tables with one ``INSERT ... SELECT ... ON CONFLICT`` per table. The merge
keeps the newer version of each row only (:data:`TASK_NEWER`, :data:`AGENT_NEWER`), and
a memory entry, which never changes, is inserted once, so a batch written twice, or an
older copy of a row arriving late, changes nothing. ``benchmarks/history_write.py`` measures this against
``executemany`` of a prepared upsert.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from streams.processing.state import TASK_FIELDS

_TASK_FIELD_COUNT = len(TASK_FIELDS)

#: Staging tables, one per connection (temporary), emptied by each commit.
_STAGING = """
CREATE TEMPORARY TABLE IF NOT EXISTS incoming_tasks (
    id text, agent_id text, title text, description text, kind text, priority text,
    payload text, status text, result text, error text, attempts integer,
    created_at bigint, started_at bigint, completed_at bigint, deadline bigint,
    metadata text, trace_id text, source_partition integer, source_offset bigint
) ON COMMIT DELETE ROWS;
CREATE TEMPORARY TABLE IF NOT EXISTS incoming_agents (
    id text, name text, type text, status text, config text,
    tasks_completed bigint, tasks_failed bigint, tasks_dead bigint,
    avg_response_ms double precision, peak_concurrent_tasks integer,
    last_activity bigint, created_at bigint, updated_at bigint,
    source_partition integer, source_offset bigint
) ON COMMIT DELETE ROWS;
CREATE TEMPORARY TABLE IF NOT EXISTS incoming_memory (
    id text, agent_id text, key text, role text, content text, memory_type text, tokens integer,
    hash text, prev_hash text, created_at bigint, source_partition integer, source_offset bigint
) ON COMMIT DELETE ROWS;
"""

#: A task's columns: its changelog fields but ``"o"`` (``source_offset``), then where it came from.
TASK_COLUMNS = (*TASK_FIELDS[1:], "source_partition", "source_offset")
AGENT_COLUMNS = (
    "id",
    "name",
    "type",
    "status",
    "config",
    "tasks_completed",
    "tasks_failed",
    "tasks_dead",
    "avg_response_ms",
    "peak_concurrent_tasks",
    "last_activity",
    "created_at",
    "updated_at",
    "source_partition",
    "source_offset",
)
MEMORY_COLUMNS = (
    "id",
    "agent_id",
    "key",
    "role",
    "content",
    "memory_type",
    "tokens",
    "hash",
    "prev_hash",
    "created_at",
    "source_partition",
    "source_offset",
)
#: Rows of a kind below which they are written on one connection (splitting costs round trips).
_SPLIT_AT = 2000

#: How far a task has got: versions of a task row with the same source offset (its
#: handler finished after the event that started it) are ordered by this.
STATUS_RANK = "CASE {0}.status WHEN 'queued' THEN 0 WHEN 'in_progress' THEN 1 ELSE 2 END"
#: When an incoming task row replaces the stored one: it applied a later event, or got further.
TASK_NEWER = (
    f"(t.source_offset, {STATUS_RANK.format('t')}) < (EXCLUDED.source_offset, {STATUS_RANK.format('EXCLUDED')})"
)
#: When an incoming agent row replaces the stored one: a later event, or a later change.
AGENT_NEWER = "(a.source_offset, a.updated_at) < (EXCLUDED.source_offset, EXCLUDED.updated_at)"


def _ms(column: str) -> str:
    """Milliseconds since the epoch as a timestamptz (in floating point: numeric division is slow)."""
    return f"to_timestamp({column}::float8 / 1000)"


_MERGE_TASKS = f"""
INSERT INTO tasks AS t ({", ".join(TASK_COLUMNS)})
SELECT id, agent_id, title, description, kind, priority, payload::jsonb, status, result::jsonb, error, attempts,
       {_ms("created_at")}, {_ms("started_at")}, {_ms("completed_at")}, {_ms("deadline")},
       metadata::jsonb, trace_id, source_partition, source_offset
FROM incoming_tasks
ON CONFLICT (id) DO UPDATE SET
    {", ".join(f"{c} = EXCLUDED.{c}" for c in TASK_COLUMNS[1:])}, recorded_at = clock_timestamp()
WHERE {TASK_NEWER}
"""  # noqa: S608 - the module's own column names, no input

_MERGE_AGENTS = f"""
INSERT INTO agents AS a ({", ".join(AGENT_COLUMNS)})
SELECT id, name, type, status, config::jsonb, tasks_completed, tasks_failed, tasks_dead, avg_response_ms,
       peak_concurrent_tasks, {_ms("last_activity")}, {_ms("created_at")}, {_ms("updated_at")},
       source_partition, source_offset
FROM incoming_agents
ON CONFLICT (id) DO UPDATE SET
    {", ".join(f"{c} = EXCLUDED.{c}" for c in AGENT_COLUMNS[1:])}
WHERE {AGENT_NEWER}
"""  # noqa: S608 - the module's own column names, no input


_INSERT_MEMORY = f"""
INSERT INTO memory_entries ({", ".join(MEMORY_COLUMNS)})
SELECT id, agent_id, key, role, content, memory_type, tokens, hash, prev_hash, {_ms("created_at")},
       source_partition, source_offset
FROM incoming_memory
ON CONFLICT (id) DO NOTHING
"""  # noqa: S608 - the module's own column names, no input


def json_text(value: Any) -> str | None:
    """A JSON column's value as text (None stays NULL)."""
    return None if value is None else orjson.dumps(value).decode()


@dataclass
class HistoryBatch:
    """Rows to write in one transaction, at most one version per key (the newest seen)."""

    tasks: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    agents: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    memory: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tasks) + len(self.agents) + len(self.memory)

    def add_task(self, row: dict[str, Any], partition: int) -> None:
        """A task row (as the tasks table holds it) from ``partition``; a later version replaces an earlier."""
        self.tasks[row["id"]] = (
            row["id"],
            row["agent_id"],
            row["title"],
            row["description"],
            row["kind"],
            row["priority"],
            json_text(row["payload"]),
            row["status"],
            json_text(row["result"]),
            row["error"],
            row["attempts"],
            row["created_at"],
            row["started_at"],
            row["completed_at"],
            row["deadline"],
            json_text(row["metadata"]),
            row.get("trace_id"),
            partition,
            row["o"],
        )

    def add_task_values(self, values: list[Any], partition: int) -> None:
        """A task row as its changelog array (:data:`streams.processing.state.TASK_FIELDS`), without a
        map; one written before the trace id existed lacks the last field."""
        count = len(values)
        if count == _TASK_FIELD_COUNT - 1:
            values = [*values, None]
        elif count != _TASK_FIELD_COUNT:
            raise ValueError(f"a task row has {_TASK_FIELD_COUNT} fields, got an array of {count}")
        self.tasks[values[1]] = (
            values[1],
            values[2],
            values[3],
            values[4],
            values[5],
            values[6],
            json_text(values[7]),
            values[8],
            json_text(values[9]),
            values[10],
            values[11],
            values[12],
            values[13],
            values[14],
            values[15],
            json_text(values[16]),
            values[17],
            partition,
            values[0],
        )

    def add_agent(self, row: dict[str, Any], partition: int) -> None:
        """An agent row from ``partition``; a later version replaces an earlier."""
        self.agents[row["id"]] = (
            row["id"],
            row["name"],
            row["type"],
            row["status"],
            json_text(row.get("config")),
            row["tasks_completed"],
            row["tasks_failed"],
            row.get("tasks_dead", 0),
            float(row["avg_response_ms"]),
            row.get("peak_concurrent_tasks", 0),
            row["last_activity"],
            row["created_at"],
            row["updated_at"],
            partition,
            row["o"],
        )

    def add_memory(self, archived: dict[str, Any], partition: int) -> None:
        """The entries of a memory-archive record (:func:`schemas.wire.memory_archived`) from ``partition``."""
        offset = archived["source_offset"]
        for entry in archived["entries"]:
            self.memory[entry["id"]] = (
                entry["id"],
                entry["agent_id"],
                entry["key"],
                entry["role"],
                entry["content"],
                entry["memory_type"],
                entry["tokens"],
                entry["hash"],
                entry["prev_hash"],
                entry["created_at"],
                partition,
                offset,
            )


async def prepare(conn: Any) -> None:
    """Per connection: the staging tables (asyncpg's ``init`` hook of the pool)."""
    await conn.execute(_STAGING)


async def write(conn: Any, batch: HistoryBatch) -> None:
    """Write ``batch`` in one transaction: staged by COPY, merged by one upsert per table."""
    async with conn.transaction():
        await _copy_and_merge(conn, "incoming_tasks", TASK_COLUMNS, batch.tasks.values(), _MERGE_TASKS)
        await _copy_and_merge(conn, "incoming_agents", AGENT_COLUMNS, batch.agents.values(), _MERGE_AGENTS)
        await _copy_and_merge(conn, "incoming_memory", MEMORY_COLUMNS, batch.memory.values(), _INSERT_MEMORY)


async def write_concurrently(pool: Any, batch: HistoryBatch, connections: int) -> None:
    """Write ``batch`` over up to ``connections`` pooled connections at once (the server merges
    on as many cores): the agent rows on one, the task rows and the memory entries each split
    over the others. Each part is its own transaction; all are in when this returns (a failure
    raises, and writing the whole batch again is a no-op for the parts already in)."""
    parts = [HistoryBatch(agents=batch.agents)]
    parts += [HistoryBatch(tasks=rows) for rows in _split(batch.tasks, connections - 1)]
    parts += [HistoryBatch(memory=rows) for rows in _split(batch.memory, connections - 1)]

    async def write_part(part: HistoryBatch) -> None:
        async with pool.acquire() as conn:
            try:
                await write(conn, part)
            except (asyncpg.PostgresError, asyncio.CancelledError):
                # The server refused a statement, or a sibling part failed and this one was
                # cancelled: asyncpg cancels the statement on the server and the pool resets the
                # connection before taking it back.
                raise
            except BaseException:
                # A timeout, a dead server, a confused protocol: the connection may be
                # mid-statement, so it is closed rather than handed to the next write.
                conn.terminate()
                raise

    await _all_or_none_running([write_part(part) for part in parts if len(part)])


def _split(rows: dict[str, tuple[Any, ...]], ways: int) -> list[dict[str, tuple[Any, ...]]]:
    """``rows`` in up to ``ways`` parts of about the same size (one part below :data:`_SPLIT_AT`)."""
    items = list(rows.items())
    chunks = max(1, ways) if len(items) >= _SPLIT_AT else 1
    size = max(1, -(-len(items) // chunks))
    return [dict(items[i : i + size]) for i in range(0, len(items), size)]


async def _all_or_none_running(steps: list[Coroutine[Any, Any, None]]) -> None:
    """Run ``steps`` at once; the first failure cancels the others and is raised once they have
    all ended (a retry then never overlaps a step of this try still on the server)."""
    running = [asyncio.ensure_future(step) for step in steps]
    try:
        await asyncio.wait(running, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in running:
            task.cancel()
        await asyncio.wait(running)
    for task in running:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def _copy_and_merge(
    conn: Any, staging: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]], merge: str
) -> None:
    records = list(rows)
    if not records:
        return
    await conn.copy_records_to_table(staging, records=records, columns=columns)
    await conn.execute(merge)
