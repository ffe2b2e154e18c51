"""``blackroad verify``: the history in PostgreSQL against the tables, as their changelogs hold them.

The changelogs are read to the ends they have when the check starts (committed records only
under exactly-once), keeping the newest version of each task and agent row; a task tombstoned
after its retention is still compared, by the last version before its tombstone. The check
first waits (``--wait``) for the history sink to have copied those records, then compares
each row with PostgreSQL's:

- a row missing from PostgreSQL is a difference;
- a row PostgreSQL holds at an older version (source offset, then how far the task got or
  when the agent changed) is a difference; one it holds at a newer version moved on while
  the check ran, and is not;
- at the same version the fields that matter must be equal: a task's status, attempts,
  result and error; an agent's status and counts;
- each agent's memory chain, from its working memory's head back to ``GENESIS``, must be
  whole: every entry no longer in working memory is in PostgreSQL, every entry's hash
  matches its content, the chain is as long as the row counts entries written, and
  PostgreSQL holds no entry of the agent off that chain.

Rows that PostgreSQL holds and the changelogs no longer do (compacted away long after their
tombstone) are history, not differences.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgpack
import orjson
from aiokafka import TopicPartition

from agents.memory import walk_chain
from streams.history.lag import SUNK_TABLES, archive_topic, changelog_topic, lag_reader, topic_ends
from streams.history.queries import archived_memory
from streams.processing.state import task_from_values
from streams.runtime import kafka_clients
from streams.runtime.settings import Settings

#: Rows looked up in PostgreSQL per query.
_CHUNK = 10_000
_STATUS_RANK = {"queued": 0, "in_progress": 1}


@dataclass
class Report:
    """What the check compared and what differed (every difference, one line each)."""

    tasks: int = 0
    agents: int = 0
    #: Agents whose memory chain was checked, and the entries on those chains.
    memory_chains: int = 0
    memory_entries: int = 0
    history_behind: int = 0
    differences: list[str] = field(default_factory=list)


async def read_changelog(
    settings: Settings, table: str, version: Callable[[dict[str, Any]], Any]
) -> tuple[list[dict[str, Any]], dict[TopicPartition, int]]:
    """The newest version of each row of ``table``'s changelog up to its current ends, and those
    ends. Newest by ``version(row)``, as table restore decides (a late copy of an older version,
    written by a worker that had lost the partition, does not replace a newer one); a tombstoned
    row keeps its version before the tombstone."""
    topic = changelog_topic(settings, table)
    consumer = kafka_clients.consumer(
        settings,
        enable_auto_commit=False,
        isolation_level="read_committed" if settings.exactly_once else "read_uncommitted",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await topic_ends(settings, consumer, partitions)
        newest: dict[bytes, tuple[Any, dict[str, Any]]] = {}
        remaining = {tp for tp in partitions if ends[tp] > 0}
        while remaining:
            fetched = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, records in fetched.items():
                for record in records:
                    if record.offset >= ends[tp] or record.value is None:
                        continue
                    row = _decode(table, record.key, record.value)
                    seen = newest.get(record.key)
                    if seen is None or version(row) >= seen[0]:
                        newest[record.key] = (version(row), row)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        return [row for _, row in newest.values()], ends
    finally:
        await consumer.stop()


def _decode(table: str, key: bytes, value: bytes) -> dict[str, Any]:
    decoded = msgpack.unpackb(value, raw=False, strict_map_key=False)
    if table == "tasks":
        return task_from_values(decoded)
    row = dict(decoded)
    if table == "agents":
        row.setdefault("tasks_dead", 0)  # rows written before the field existed
    else:  # a memory row, keyed by its agent
        row["agent_id"] = key.decode()
    return row


async def wait_for_sink(
    settings: Settings, ends: dict[TopicPartition, int], timeout: float, and_topic: str | None = None
) -> int:
    """Wait up to ``timeout`` s for the sink group's committed offsets to reach ``ends`` (and
    ``and_topic``'s ends as they are now); the records still behind then (0: the sink has
    copied everything the check reads)."""
    reader = lag_reader(settings)
    await reader.start()
    try:
        if and_topic is not None:
            more = [TopicPartition(and_topic, partition) for partition in range(settings.partitions)]
            ends = {**ends, **await topic_ends(settings, reader, more)}
        reader.assign(list(ends))
        deadline = time.monotonic() + timeout
        while True:
            behind = 0
            for tp, end in ends.items():
                behind += max(0, end - (await reader.committed(tp) or 0))
            if behind == 0 or time.monotonic() >= deadline:
                return behind
            await asyncio.sleep(0.5)
    finally:
        await reader.stop()


def compare(
    kind: str,
    tables: Iterable[dict[str, Any]],
    stored: dict[str, dict[str, Any]],
    version: Callable[[dict[str, Any]], Any],
    fields: tuple[str, ...],
    describe: Callable[[dict[str, Any]], str],
    differences: list[str],
) -> None:
    """Each ``kind`` row of the tables against PostgreSQL's (``stored``: id -> row, its source
    offset as ``"o"``): missing, older, or at the same version with ``fields`` differing."""
    for row in tables:
        what = f"{kind} {row['id']}"
        held = stored.get(row["id"])
        if held is None:
            differences.append(f"{what}: not in PostgreSQL (the table has {describe(row)})")
            continue
        ours, theirs = version(row), version(held)
        if theirs > ours:
            continue  # moved on while the check ran
        if theirs < ours:
            differences.append(
                f"{what}: PostgreSQL has an older version ({describe(held)}) than the table ({describe(row)})"
            )
            continue
        for name in fields:
            if held[name] != row[name]:
                differences.append(f"{what}: {name} is {held[name]!r} in PostgreSQL, {row[name]!r} in the table")


def compare_tasks(tables: Iterable[dict[str, Any]], stored: dict[str, Any], differences: list[str]) -> None:
    fields = ("attempts", "error", "result")
    compare("task", tables, stored, task_version, fields, _describe_task, differences)


def compare_agents(tables: Iterable[dict[str, Any]], stored: dict[str, Any], differences: list[str]) -> None:
    fields = ("status", "tasks_completed", "tasks_failed", "tasks_dead")
    compare("agent", tables, stored, agent_version, fields, _describe_agent, differences)


def compare_memory(memory: dict[str, Any], archived: list[dict[str, Any]], differences: list[str]) -> int:
    """One agent's memory chain (its working memory row, and ``archived``: PostgreSQL's entries
    of the agent) walked from the head back to ``GENESIS``; returns the entries walked."""
    stored = {entry["hash"]: entry for entry in archived}
    on_chain, whole = walk_chain(memory, stored.get, "PostgreSQL", differences)
    off_chain = sorted(entry["id"] for digest, entry in stored.items() if digest not in on_chain)
    if whole and off_chain:
        what = f"memory of {memory['agent_id']}"
        differences.append(f"{what}: {len(off_chain)} entries in PostgreSQL are not on its chain, e.g. {off_chain[0]}")
    return len(on_chain)


def _describe_task(row: dict[str, Any]) -> str:
    return f"{row['status']}, source offset {row['o']}"


def _describe_agent(row: dict[str, Any]) -> str:
    return f"source offset {row['o']}"


async def _stored(conn: Any, query: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    """PostgreSQL's rows of ``ids`` as the tables' rows look (the source offset as ``"o"``, JSON decoded)."""
    stored: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), _CHUNK):
        for record in await conn.fetch(query, ids[start : start + _CHUNK]):
            row = dict(record)
            row["o"] = row.pop("source_offset")
            if "result" in row:
                row["result"] = None if row["result"] is None else orjson.loads(row["result"])
            stored[row["id"]] = row
    return stored


_TASKS = "SELECT id, status, attempts, error, result::text AS result, source_offset FROM tasks WHERE id = ANY($1)"
_AGENTS = (
    "SELECT id, status, tasks_completed, tasks_failed, tasks_dead, source_offset,"
    " (extract(epoch FROM updated_at) * 1000)::bigint AS updated_at FROM agents WHERE id = ANY($1)"
)


def task_version(row: dict[str, Any]) -> tuple[int, int]:
    """Which of two versions of a task row is newer: the later source event, then how far it got."""
    return row["o"], _STATUS_RANK.get(row["status"], 2)


def memory_version(row: dict[str, Any]) -> int:
    """Which of two versions of a memory row is newer: the later source event."""
    return int(row["o"])


def agent_version(row: dict[str, Any]) -> tuple[int, int]:
    """Which of two versions of an agent row is newer: the later source event, then the later change."""
    return row["o"], row["updated_at"]


async def verify(settings: Settings, wait: float, progress: Callable[[str], None] = lambda _: None) -> Report:
    """Compare the history with the tables (see the module's docstring)."""
    report = Report()
    rows: dict[str, list[dict[str, Any]]] = {}
    all_ends: dict[TopicPartition, int] = {}
    for table in (*SUNK_TABLES, "memory"):
        version = task_version if table == "tasks" else agent_version if table == "agents" else memory_version
        rows[table], ends = await read_changelog(settings, table, version)
        if table in SUNK_TABLES:
            all_ends.update(ends)
        progress(f"read {len(rows[table])} {table} rows from {changelog_topic(settings, table)}")
    report.tasks, report.agents = len(rows["tasks"]), len(rows["agents"])
    # The archive's ends as they are after the memory rows were read: they hold every entry
    # that left those rows (sent with, or under at-least-once just after, the row's version).
    report.history_behind = await wait_for_sink(settings, all_ends, wait, and_topic=archive_topic(settings))
    conn = await asyncpg.connect(settings.postgres_url, timeout=settings.postgres_command_timeout)
    try:
        tasks = await _stored(conn, _TASKS, [row["id"] for row in rows["tasks"]])
        agents = await _stored(conn, _AGENTS, [row["id"] for row in rows["agents"]])
        archived = await archived_memory(conn, [row["agent_id"] for row in rows["memory"]], _CHUNK)
    finally:
        await conn.close()
    compare_tasks(rows["tasks"], tasks, report.differences)
    compare_agents(rows["agents"], agents, report.differences)
    for memory in rows["memory"]:
        report.memory_entries += compare_memory(memory, archived[memory["agent_id"]], report.differences)
    report.memory_chains = len(rows["memory"])
    return report
