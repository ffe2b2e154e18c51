"""Pure logic: wire format, working memory, histograms, handlers, stats rows."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
import types
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from faust.types import TP
from yarl import URL

from agents import memory
from agents.base import TaskContext, TaskFailed
from agents.registry import HandlerRegistry, default_registry
from benchmarks import bench
from schemas import domain, trace_context, wire
from schemas.wire import WireError
from streams.cold_rows import ColdRow, RowFile, row_file
from streams.processing import histogram, state, tables
from streams.processing import processor as processor_module
from streams.processing.log_continuity import BrokerLostData, fingerprint
from streams.processing.metrics import Metrics
from streams.processing.processor import BatchProcessor
from streams.runtime import heap_trim, native, stack_dump
from streams.runtime.client_log import RepeatedClientMessages
from streams.runtime.settings import Settings
from streams.serve.peers import PartitionOwners
from tests.factories import task


def test_wire_round_trip_and_variants() -> None:
    event = task("agent_alice_001", "inference", {"latency_ms": 0})
    decoded = wire.decode_task(wire.encode_task(event))
    assert decoded == event
    as_map = {**event.to_wire(), "priority": "medium"}
    assert wire.task_from_map(as_map).priority == "normal"
    assert wire.task_from_map({**event.to_wire(), "priority": 1}).priority == "high"


def test_a_task_batch_reads_the_same_as_columns_or_as_task_maps() -> None:
    events = [task(f"agent_pack_{i:03d}", "tool_execution", {"tool": "echo", "input": i}) for i in range(3)]
    events[1].trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    columnar = msgpack.unpackb(wire.encode_batch(events))
    assert set(columnar["columns"]) == set(wire.BATCH_COLUMNS)
    assert columnar["columns"]["traceparent"] == [None, events[1].trace, None]
    as_maps = {key: value for key, value in columnar.items() if key != "columns"}
    as_maps["tasks"] = [{k: v for k, v in e.to_wire().items() if k not in ("v", "type")} for e in events]
    assert wire.decode_tasks(msgpack.packb(columnar)) == (events, [])
    assert wire.decode_tasks(msgpack.packb(as_maps)) == (events, [])
    # Columns left out, and nils, take the defaults; the batch's ts stands in for the tasks'.
    minimal = {"v": 1, "type": "task.batch", "ts": 5, "columns": {}}
    minimal["columns"] = {
        "task_id": ["task_a1", "task_a2"],
        "agent_id": ["agent_a_001"] * 2,
        "kind": ["coordination"] * 2,
    }
    minimal["columns"]["priority"] = [None, "high"]
    decoded, refused = wire.decode_tasks(msgpack.packb(minimal))
    assert refused == [] and [(e.priority, e.created_ms, e.payload, e.agent_type) for e in decoded] == [
        ("normal", 5, {}, "worker"),
        ("high", 5, {}, "worker"),
    ]


@pytest.mark.parametrize(
    ("columns", "reason"),
    [
        ({"task_id": ["task_a1"], "agent_id": ["agent_a_001", "agent_a_001"]}, "as long as the others"),
        ({"task_id": "task_a1"}, "as long as the others"),
        ({"task_id": ["task_a1"], "colour": ["red"]}, "unknown task.batch columns"),
        ({"task_id": []}, "1 to 10000 tasks"),
        ([["task_a1"]], "must be a map"),
    ],
)
def test_a_malformed_column_batch_is_refused_whole(columns: object, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        wire.decode_tasks(msgpack.packb({"v": 1, "type": "task.batch", "ts": 5, "columns": columns}))


def test_bad_tasks_in_a_column_batch_are_refused_alone() -> None:
    columns = {
        "task_id": ["task_a1", "task_a2", "task_a1", None],
        "agent_id": ["agent_a_001"] * 4,
        "kind": ["coordination", "sing", "coordination", "coordination"],
    }
    decoded, refused = wire.decode_tasks(msgpack.packb({"v": 1, "type": "task.batch", "ts": 5, "columns": columns}))
    assert [e.task_id for e in decoded] == ["task_a1"]
    assert [r.split(":")[0] for r in refused] == ["tasks[1]", "tasks[2]", "tasks[3]"]
    assert "kind" in refused[0] and "repeated" in refused[1] and "task_id" in refused[2]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"v": 2}, "schema version"),
        ({"type": "task.deleted"}, "event type"),
        ({"agent_id": "Alice"}, "agent_id"),
        ({"task_id": "42"}, "task_id"),
        ({"kind": "sing"}, "kind"),
        ({"priority": "asap"}, "priority"),
        ({"ts": "yesterday"}, "ts"),
        ({"payload": [1]}, "payload"),
        ({"title": 5}, "title"),
        ({"agent_type": "robot"}, "agent_type"),
        ({"kind": ["inference"]}, "kind"),
        ({"agent_type": {"a": 1}}, "agent_type"),
        ({"priority": [1]}, "priority"),
        ({"ts": True}, "ts"),
        ({"v": True}, "schema version"),
    ],
)
def test_wire_rejections_say_why(change: dict[str, object], reason: str) -> None:
    raw = msgpack.packb({**task("agent_alice_001").to_wire(), **change})
    with pytest.raises(WireError, match=reason):
        wire.decode_task(raw)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"agent_id": "Alice"}, "agent_id"),
        ({"ts": "now"}, "'ts'"),
        ({"ids": []}, "'ids'"),
        ({"ids": ["mem_1"]}, "memory id"),
        ({"ids": [7]}, "memory id"),
        ({"v": 2}, "schema version"),
    ],
)
def test_memory_accessed_events_decode_or_say_why(change: dict[str, object], reason: str) -> None:
    valid = {"v": 1, "type": "memory.accessed", "agent_id": "agent_alice_001", "ts": 5, "ids": ["mem_" + "ab" * 10]}
    tasks, refused, access = wire.decode_record(msgpack.packb(valid))
    assert (tasks, refused) == ([], []) and access is not None
    assert (access.agent_id, access.ids, access.ts) == ("agent_alice_001", ["mem_" + "ab" * 10], 5)
    assert wire.decode_record(wire.encode_task(task("agent_alice_001")))[2] is None
    with pytest.raises(WireError, match=reason):
        wire.decode_record(msgpack.packb({**valid, **change}))


def test_undecodable_values() -> None:
    with pytest.raises(WireError, match="not msgpack"):
        wire.decode_task(b"\xc1")
    with pytest.raises(WireError, match="tombstone"):
        wire.decode_task(None)


def test_working_memory_keeps_system_message_and_trims_oldest() -> None:
    mem = memory.empty_memory()
    left: list[dict[str, Any]] = []
    system = memory.append(
        mem, "agent_a_001", "s" * 40, role="system", memory_type="conversation", timestamp_ms=1, budget_tokens=30
    )
    turns = [
        memory.append(
            mem,
            "agent_a_001",
            f"turn {i} " + "x" * 12,
            role="user",
            memory_type="conversation",
            timestamp_ms=2 + i,
            budget_tokens=30,
            left=left,
        )
        for i in range(10)
    ]
    assert left == turns[:5]  # what left, oldest first
    kept = memory.entries(mem)
    assert kept[0]["role"] == "system"
    assert [e["content"][:6] for e in kept[1:]] == [f"turn {i}" for i in range(5, 10)]  # 10 + 5 * 4 tokens
    assert mem["tokens"] <= 30
    assert mem["tokens"] == sum(e["tokens"] for e in kept)
    assert mem["written"] == 11
    assert memory.verify_chain(mem)
    # A system message replaced leaves too.
    memory.append(
        mem, "agent_a_001", "s", role="system", memory_type="conversation", timestamp_ms=20, left=left, budget_tokens=30
    )
    assert left[-1] is system
    mem["turns"][1]["content"] = "tampered"
    assert not memory.verify_chain(mem)


def test_chain_starts_at_genesis() -> None:
    mem = memory.empty_memory()
    entry = memory.append(
        mem, "agent_a_001", "hello", role="user", memory_type="conversation", timestamp_ms=5, budget_tokens=100
    )
    assert entry["prev_hash"] == "GENESIS"
    assert entry["hash"] == memory.chain_hash("hello", 5, "GENESIS")


def test_histogram_percentiles_within_resolution() -> None:
    hist: dict[int, int] = {}
    for value in range(1, 1001):
        histogram.record(hist, float(value))
    p50, p99 = histogram.percentiles(hist, (0.5, 0.99))
    assert p50 is not None and abs(p50 - 500) / 500 < 0.05
    assert p99 is not None and abs(p99 - 990) / 990 < 0.05
    merged = histogram.merge([hist, hist])
    assert sum(merged.values()) == 2000
    assert histogram.percentiles({}, (0.5,)) == [None]


def _context(agent: str = "agent_a_001", attempt: int = 1) -> TaskContext:
    return TaskContext(agent, "worker", 1000, memory.empty_memory(), 100, attempt)


def test_builtin_handlers_are_deterministic() -> None:
    registry = default_registry(5.0, 10.0)
    tool = registry.resolve("tool_execution", "worker")
    assert tool(task("agent_a_001", payload={"tool": "reverse", "input": "abc"}), _context()) == {
        "tool": "reverse",
        "output": "cba",
    }
    with pytest.raises(TaskFailed):
        tool(task("agent_a_001", payload={"tool": "nope"}), _context())
    code = registry.resolve("code_analysis", "worker")
    assert (
        code(task("agent_a_001", "code_analysis", {"code": "def a():\n  pass  # TODO"}), _context())["functions"] == 1
    )
    inference = registry.resolve("inference", "worker")
    event = task("agent_a_001", "inference", {})
    assert inference.latency_ms(event) == inference.latency_ms(event)  # type: ignore[attr-defined]
    result = asyncio.run(inference(event, _context()))  # type: ignore[arg-type]
    assert result["context_turns"] == 0
    failing = task("agent_a_001", "inference", {"latency_ms": 0, "fail_attempts": 1})
    with pytest.raises(RuntimeError):
        asyncio.run(inference(failing, _context(attempt=1)))  # type: ignore[arg-type]
    assert "text" in asyncio.run(inference(failing, _context(attempt=2)))  # type: ignore[arg-type]


def test_memory_operation_write_then_recall() -> None:
    handler = default_registry().resolve("memory_operation", "memory")
    context = _context()
    handler(task("agent_a_001", "memory_operation", {"op": "system", "content": "be brief"}), context)
    handler(task("agent_a_001", "memory_operation", {"op": "write", "content": "first"}), context)
    recalled = handler(task("agent_a_001", "memory_operation", {"op": "recall", "limit": 5}), context)
    assert [e["content"] for e in recalled["entries"]] == ["be brief", "first"]  # type: ignore[index]
    with pytest.raises(TaskFailed):
        handler(task("agent_a_001", "memory_operation", {"op": "forget"}), context)


def test_stats_rows_count_outcomes() -> None:
    row = state.new_stats(0)
    for status in ("completed", "completed", "failed", "dead"):
        state.apply_outcome_to_stats(row, status, 0, 2.0, 1, 1500)
    assert (row["completed"], row["failed"], row["dead"]) == (2, 1, 1)
    assert row["completed_per_second"] == {1: 2}
    agent = state.new_agent("agent_alice_001", "reasoning", 0, 5)
    assert agent["type"] == "worker"  # ALICE is a named worker agent
    state.apply_outcome_to_agent(agent, "completed", 10.0, 5)
    state.apply_outcome_to_agent(agent, "completed", 20.0, 6)
    assert agent["avg_response_ms"] == 15.0 and agent["tasks_completed"] == 2


def test_domain_variants() -> None:
    assert domain.canonical_agent_status("online") == "idle"
    assert domain.canonical_agent_status("standby") == "offline"
    assert domain.canonical_task_status("running") == "in_progress"
    assert domain.canonical_priority("bulk") == "bulk"
    assert domain.canonical_priority(True) is None


def test_a_task_is_expired_only_when_finished_before_the_cutoff() -> None:
    row = state.new_task(task("agent_x_001"), 0, "in_progress", 1_000)
    assert not state.task_expired(row, 5_000)  # still running, however old
    row.update(status="completed", completed_at=2_000)
    assert state.task_expired(row, 5_000)
    assert not state.task_expired(row, 2_000)  # finished exactly at the cutoff: kept


def test_the_expiry_scan_stops_at_the_first_finished_task_still_within_retention() -> None:
    running = state.new_task(task("agent_x_001"), 1, "in_progress", 1_000)
    finished_early = state.new_task(task("agent_x_001"), 2, "in_progress", 1_000)
    finished_early.update(status="failed", completed_at=1_500)
    rows = {
        "old": tables.frozen_row(0, 1_200, b""),
        "running": running,
        "finished early": finished_early,
        "recent": tables.frozen_row(3, 9_000, b""),
        "old but later": tables.frozen_row(4, 1_300, b""),
    }
    assert tables.expired_task_ids(rows, 5_000, limit=10) == ["old", "finished early"]
    assert tables.expired_task_ids(rows, 5_000, limit=1) == ["old"]
    assert tables.expired_task_ids(rows, 10_000, limit=10) == ["old", "finished early", "recent", "old but later"]


class _Batch:
    """Stands in for aiokafka's batch builder: keeps what was appended."""

    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes | None]] = []

    def append(self, key: bytes | None, value: bytes | None, timestamp: int | None) -> int:
        self.records.append((key, value))
        return len(self.records)

    def record_count(self) -> int:
        return len(self.records)


class _Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bytes | None, bytes | None]] = []

    def create_batch(self) -> _Batch:
        return _Batch()

    async def send_batch(self, batch: _Batch, topic: str, partition: int) -> asyncio.Future[None]:
        self.sent.extend((topic, partition, key, value) for key, value in batch.records)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def _cached_table(name: str, rows_in: RowFile | None = None) -> tables.CachedTable:
    store = types.SimpleNamespace(data={}, _key_partition={})
    topic = types.SimpleNamespace(get_topic_name=lambda: f"{name}-changelog")
    return tables.CachedTable(name, types.SimpleNamespace(data=store, changelog_topic=topic), rows_in)


def test_a_row_file_gives_rows_back_from_its_buffer_and_its_file_and_compacts_to_the_live_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(row_file, "WRITE_AT", 64)
    monkeypatch.setattr(row_file, "COMPACT_FROM", 1_000)
    rows = RowFile(tmp_path / "cold")
    assert rows.size == 0 and not (tmp_path / "cold").exists()  # nothing made before the first row
    kept = [rows.keep(f"row {number:03d} ".encode() * 3) for number in range(100)]
    assert all(type(row) is ColdRow for row in kept)
    assert [row.read() for row in kept] == [f"row {number:03d} ".encode() * 3 for number in range(100)]  # type: ignore[union-attr]
    assert list((tmp_path / "cold").iterdir()) == []  # unlinked: nothing left behind by a kill
    assert rows.size == 100 * 24 and rows.needs_compaction()

    live = kept[::4]
    stale = kept[1]
    rows.move(live, rows.start_compaction())  # type: ignore[arg-type]
    rows.end_compaction()
    assert rows.compactions == 1 and rows.size == 25 * 24 and not rows.needs_compaction()
    assert [row.read() for row in live] == [f"row {number:03d} ".encode() * 3 for number in range(0, 100, 4)]  # type: ignore[union-attr]
    assert stale.read() == b"row 001 " * 3  # type: ignore[union-attr]  # a reader still holding a dead row
    assert rows.keep(b"x" * row_file.LONGEST) == b"x" * row_file.LONGEST  # too long for a handle: as it is


def test_rows_move_to_the_row_file_once_packed_and_read_write_and_roll_back_as_before(tmp_path: Path) -> None:
    producer = _Producer()
    entries = _cached_table("memory_entries", RowFile(tmp_path))
    writer = tables.TableWriter(tables.DirectSender(producer), {"memory_entries": entries})
    entry = {"id": "mem_0001", "agent_id": "agent_x_001", "content": "likes tea", "o": 5, "tier": "episodic"}
    entries.put_final("mem_0001", entry, 1)
    assert type(entries.rows["mem_0001"]) is bytes  # until its changelog record is packed

    async def flush() -> None:
        writer.end_batch()
        await writer.flush()
        await writer.sent()

    asyncio.run(flush())
    assert [(key, tables.decode_row(value)) for _, _, key, value in producer.sent] == [(b"mem_0001", entry)]
    stored = entries.rows["mem_0001"]
    assert type(stored) is ColdRow
    assert entries.get("mem_0001") == entry and tables.row_offset(stored) == 5

    changed = entries.writable("mem_0001", 1, dict)
    assert changed == entry
    changed["access_count"] = 1
    writer.rollback()
    assert entries.rows["mem_0001"] is stored and entries.get("mem_0001") == entry

    changed = entries.writable("mem_0001", 1, dict)
    changed["access_count"] = 2
    changed["o"] = 6
    asyncio.run(flush())
    assert type(entries.rows["mem_0001"]) is ColdRow and entries.get("mem_0001") == {**entry, "access_count": 2, "o": 6}
    assert tables.decode_row(producer.sent[-1][3]) == {**entry, "access_count": 2, "o": 6}


def test_a_finished_task_in_the_row_file_is_found_expired_and_swept_without_staying_in_the_heap(tmp_path: Path) -> None:
    tasks = _cached_table("tasks", RowFile(tmp_path))
    writer = tables.TableWriter(tables.DirectSender(_Producer()), {"tasks": tasks})
    events = [task("agent_x_001") for _ in range(3)]
    for offset, event in enumerate(events):
        values = state.finished_task_values(event, offset, "completed", {"n": offset}, None, 1, 1_000, 2_000 + offset)
        tasks.put_finished(event.task_id, values, 2_000 + offset, 0)

    async def flush() -> None:
        writer.end_batch()
        await writer.flush()
        await writer.sent()

    asyncio.run(flush())
    assert all(type(row) is ColdRow for row in tasks.rows.values())
    assert tasks.get(events[1].task_id)["result"] == {"n": 1}
    assert tables.task_expired(tasks.rows[events[0].task_id], 2_001)
    assert not tables.task_expired(tasks.rows[events[1].task_id], 2_001)
    assert tables.expired_task_ids(tasks.rows, 2_002, 10) == [events[0].task_id, events[1].task_id]


def test_a_flush_compacts_a_row_file_that_holds_as_much_dead_as_live_while_rows_still_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(row_file, "MOVE_CHUNK", 7)
    rows_in = RowFile(tmp_path)
    tasks = _cached_table("tasks", rows_in)
    writer = tables.TableWriter(tables.DirectSender(_Producer()), {"tasks": tasks})
    events = [task("agent_x_001") for _ in range(400)]

    def finish(offset: int) -> None:
        event = events[offset]
        values = state.finished_task_values(event, offset, "completed", {"n": offset}, None, 1, 1_000, 2_000)
        tasks.put_finished(event.task_id, values, 2_000, 0)

    async def run() -> None:
        for offset in range(200):
            finish(offset)
        writer.end_batch()
        await writer.flush()  # the rows go to the file
        monkeypatch.setattr(row_file, "COMPACT_FROM", rows_in.size + 1)
        for event in events[:150]:
            tasks.delete(event.task_id)
        for offset in range(200, 400):
            finish(offset)
        writer.end_batch()
        await writer.flush()  # 250 of 400 rows live: compacted on a thread
        await writer.sent()

    asyncio.run(run())
    assert rows_in.compactions == 1 and not rows_in.needs_compaction()
    assert [tasks.get(event.task_id)["result"] for event in events[150:]] == [{"n": n} for n in range(150, 400)]
    assert all(row.segment is tasks.rows[events[150].task_id].segment for row in tasks.rows.values())


def test_a_finished_task_row_freezes_at_flush_and_reads_back_whole() -> None:
    producer = _Producer()
    tasks = _cached_table("tasks")
    writer = tables.TableWriter(tables.DirectSender(producer), {"tasks": tasks})
    running = state.new_task(task("agent_x_001"), 7, "in_progress", 1_000)
    finished = state.new_task(task("agent_x_001"), 8, "in_progress", 1_000)
    finished.update(status="completed", result={"ok": 1}, completed_at=2_000)
    tasks.put(running["id"], running, 0)
    tasks.put(finished["id"], finished, 0)

    async def flush() -> int:
        writer.end_batch()
        count = await writer.flush()
        await writer.sent()
        return count

    assert asyncio.run(flush()) == 2
    assert tasks.rows[running["id"]] is running  # still changing: stays a dict
    frozen = tasks.rows[finished["id"]]
    assert type(frozen) is bytes and tables.frozen_finished_at(frozen) == 2_000
    assert tasks.get(finished["id"]) == finished
    sent = {key: value for _, _, key, value in producer.sent}
    value = sent[finished["id"].encode()]
    assert msgpack.unpackb(value) == [finished[name] for name in state.TASK_FIELDS]  # an array, not a map
    assert tables.decode_row(value) == finished
    assert tables.decode_row(sent[running["id"].encode()]) == running


def test_a_task_finished_at_once_is_stored_frozen_as_its_changelog_array() -> None:
    tasks = _cached_table("tasks")
    event = task("agent_x_001")
    values = state.finished_task_values(event, 9, "completed", {"ok": 1}, None, 1, 1_000, 1_500)
    tasks.put_finished(event.task_id, values, 1_500, 2)
    frozen = tasks.rows[event.task_id]
    assert type(frozen) is bytes and (tables.frozen_offset(frozen), tables.frozen_finished_at(frozen)) == (9, 1_500)
    expected = state.new_task(event, 9, "completed", 1_000)
    expected.update(result={"ok": 1}, attempts=1, completed_at=1_500)
    assert tasks.get(event.task_id) == expected
    assert tasks.dirty == {event.task_id: 2}
    with pytest.raises(ValueError, match="18 fields"):
        tables.decode_row(msgpack.packb([1, 2, 3]))
    # A row written before tasks had a trace id reads back with none.
    assert tables.decode_row(msgpack.packb(values[:-1])) == expected


def _changelog_record(key: str, value: dict[str, Any] | None) -> types.SimpleNamespace:
    return types.SimpleNamespace(key=key.encode(), value=None if value is None else wire.encode(value))


@pytest.mark.parametrize("table", ["memory_entries", "agents"])
def test_changelog_records_restore_the_newest_rows_frozen_as_their_table_keeps_them(tmp_path: Any, table: str) -> None:
    entry = {"id": "mem_" + "a" * 20, "content": "Paper is stuck inside the copier on level three again.", "o": 7}
    newer = {**entry, "tier": "semantic", "o": 9}
    rows: dict[str, Any] = {}
    where: dict[str, int] = {}
    files = RowFile(tmp_path) if table == "memory_entries" else None
    records = [_changelog_record("k1", entry), _changelog_record("k1", newer), _changelog_record("k2", entry)]
    records += [_changelog_record("k1", entry), _changelog_record("k3", entry), _changelog_record("k3", None)]
    tables.apply_changelog(table, rows, records, files, where, 3)  # k1's late older copy loses
    assert {key: tables.thaw(row) for key, row in rows.items()} == {"k1": newer, "k2": entry}
    assert where == {"k1": 3, "k2": 3}
    if table == "memory_entries":  # kept frozen, in the file
        assert type(rows["k1"]) is ColdRow and tables.row_offset(rows["k1"]) == 9
    else:
        assert rows["k1"] is not None and type(rows["k1"]) is dict


def test_a_stack_dump_shows_where_each_task_waits_down_its_chain_of_awaits() -> None:
    async def innermost(event: asyncio.Event) -> None:
        await event.wait()

    async def outer(event: asyncio.Event) -> None:
        await innermost(event)

    async def dump() -> str:
        event = asyncio.Event()
        task = asyncio.create_task(outer(event), name="waiting-task")
        await asyncio.sleep(0)
        out = io.StringIO()
        stack_dump.dump_stacks(out, asyncio.get_running_loop())
        event.set()
        await task
        return out.getvalue()

    text = asyncio.run(dump())
    task_lines = text[text.index("--- waiting-task: ") :].splitlines()[1:4]
    assert [line.strip().split(" in ")[-1] for line in task_lines] == ["outer", "innermost", "wait"]
    assert all(line.startswith("      awaits ") for line in task_lines[1:])


def test_a_traceparent_is_read_as_w3c_trace_context_says() -> None:
    valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert trace_context.parse(valid) == valid
    assert trace_context.trace_id(valid) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_context.parent_span_id(valid) == "00f067aa0ba902b7"
    assert trace_context.sampled(valid) and not trace_context.sampled(valid[:-2] + "00")
    # A later version's first four fields are read; anything after them is not.
    assert trace_context.parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-follows") == valid
    for invalid in (
        valid.upper(),
        valid + "-extra",  # version 00 has exactly four fields
        "ff" + valid[2:],
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        None,
    ):
        assert trace_context.parse(invalid) is None, invalid
    made = trace_context.format_traceparent(trace_context.new_trace_id(), trace_context.new_span_id(), True)
    assert trace_context.parse(made) == made and trace_context.sampled(made)


def test_a_task_keeps_its_trace_through_the_wire_a_retry_and_a_header() -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    event = task("agent_x_001")
    assert event.trace is None and "traceparent" not in event.to_wire()
    event.trace = traceparent
    assert wire.decode_task(wire.encode_task(event)).trace == traceparent
    retried, _, _ = wire.decode_record(wire.task_retry(event, 2, 1))
    assert (retried[0].trace, retried[0].trace_id) == (traceparent, "4bf92f3577b34da6a3ce929d0e0e4736")
    # A traceparent that does not parse leaves the task untraced; it still runs.
    assert wire.task_from_map({**event.to_wire(), "traceparent": "nonsense"}).trace is None
    assert wire.header_trace([("other", b"x"), ("traceparent", traceparent.encode())]) == traceparent
    assert wire.header_trace([("traceparent", b"00-nonsense")]) is None


def test_a_record_s_traceparent_header_reaches_the_task_row_and_its_lifecycle_events() -> None:
    producer = _Producer()
    processor = _processor(producer, lambda tp: None)
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    traced, plain, carried = task("agent_x_001"), task("agent_x_001"), task("agent_x_001")
    carried.trace = own  # its own field wins over the header
    headers = [("traceparent", traceparent.encode())]
    records = [
        types.SimpleNamespace(
            headers=headers if e is not plain else (),
            topic="tasks",
            partition=0,
            offset=i,
            timestamp=0,
            key=b"agent_x_001",
            value=wire.encode_task(e),
        )
        for i, e in enumerate([traced, plain, carried])
    ]

    async def run() -> None:
        await processor({TP("tasks", 0): records})
        await processor.flush_changed_rows()

    asyncio.run(run())
    rows = processor.writer.tables["tasks"]
    assert rows.get(traced.task_id)["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert rows.get(plain.task_id)["trace_id"] is None
    assert rows.get(carried.task_id)["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    events = [msgpack.unpackb(v) for topic, _, _, v in producer.sent if topic == "blackroad.events"]
    completed = {e["task_id"]: e.get("trace_id") for e in events if e["type"] == "task.completed"}
    assert completed == {
        traced.task_id: "4bf92f3577b34da6a3ce929d0e0e4736",
        plain.task_id: None,
        carried.task_id: "0af7651916cd43dd8448eb211c80319c",
    }


def test_a_memory_row_freezes_when_its_batch_ends_and_thaws_into_a_private_copy_to_write() -> None:
    producer = _Producer()
    memory_table = _cached_table("memory")
    memory_table.hot_limit = 0  # no row stays thawed
    writer = tables.TableWriter(tables.DirectSender(producer), {"memory": memory_table})
    row = state.new_memory()
    memory.append(
        row, "agent_x_001", "hello", role="user", memory_type="conversation", timestamp_ms=1, budget_tokens=100
    )
    row["o"] = 41
    memory_table.put("agent_x_001", row, 0)

    async def scenario() -> tables.FrozenRow:
        writer.end_batch()
        ended = memory_table.rows["agent_x_001"]  # frozen before any flush
        await writer.flush()
        await writer.sent()
        return ended  # type: ignore[no-any-return]

    frozen = asyncio.run(scenario())
    assert type(frozen) is bytes and tables.frozen_offset(frozen) == 41
    assert [value for _, _, _, value in producer.sent] == [tables.frozen_value(frozen)]
    writable = memory_table.writable("agent_x_001", 0, state.copy_row)
    assert writable == row and writable is not row
    assert memory_table.rows["agent_x_001"] is writable  # the batch's copy replaces the frozen row
    memory_table.rollback()
    assert memory_table.rows["agent_x_001"] is frozen


def test_the_memory_rows_changed_most_recently_stay_thawed_and_the_coolest_freeze() -> None:
    producer = _Producer()
    memory_table = _cached_table("memory")
    # Room for two rows: new ones count as NEW_ROW_BYTES, packed ones as their changelog value.
    memory_table.hot_limit = 2 * tables.NEW_ROW_BYTES + 100
    writer = tables.TableWriter(tables.DirectSender(producer), {"memory": memory_table})
    rows = {}
    for number, agent_id in enumerate(["agent_x_001", "agent_x_002", "agent_x_003"]):
        row = rows[agent_id] = state.new_memory()
        note = f"note {number} " + "x" * 110
        memory.append(row, agent_id, note, role="user", memory_type="conversation", timestamp_ms=1, budget_tokens=100)
        row["o"] = number
    packed = len(memory_table.pack(rows["agent_x_001"]))
    assert 2 * packed + 16 <= memory_table.hot_limit < 3 * packed  # frozen rows have a 16-byte header

    async def scenario() -> None:
        for agent_id, row in rows.items():  # one batch each, oldest first
            memory_table.put(agent_id, row, 0)
            writer.end_batch()
        await writer.flush()
        await writer.sent()

    asyncio.run(scenario())
    stored = memory_table.rows
    assert type(stored["agent_x_001"]) is bytes  # the coolest froze at its batch's end
    assert memory_table.hot == {"agent_x_002": packed, "agent_x_003": packed}  # sizes known once packed
    assert memory_table.hot_bytes == 2 * packed
    assert stored["agent_x_002"] is rows["agent_x_002"] and stored["agent_x_003"] is rows["agent_x_003"]
    sent = {key: value for _, _, key, value in producer.sent}
    assert sent == {agent_id.encode(): memory_table.pack(row) for agent_id, row in rows.items()}
    # A hot row is written in place, its batch's undo keeps a copy, a rollback restores it.
    writable = memory_table.writable("agent_x_002", 0, state.copy_row)
    assert writable is rows["agent_x_002"]
    writable["turns"] = []
    memory_table.rollback()
    assert stored["agent_x_002"] == memory_table.get("agent_x_002") and stored["agent_x_002"]["turns"]

    async def write_the_coolest() -> None:
        memory_table.writable("agent_x_001", 0, state.copy_row)
        writer.end_batch()

    # Written again, a frozen row becomes the hottest; the coolest of the others freezes.

    asyncio.run(write_the_coolest())
    assert type(stored["agent_x_001"]) is dict and type(stored["agent_x_002"]) is bytes
    assert type(stored["agent_x_003"]) is dict
    assert list(memory_table.hot) == ["agent_x_003", "agent_x_001"]
    assert memory_table.hot_bytes == 2 * packed + 16  # agent_x_001 counts as its frozen bytes until packed


def test_outgoing_records_leave_with_the_flush_and_a_rollback_drops_only_its_batch() -> None:
    producer = _Producer()
    writer = tables.TableWriter(tables.DirectSender(producer), {"stats": _cached_table("stats")})

    async def scenario() -> None:
        writer.emit("events", 1, b"a", b"first")
        waits = writer.end_batch()
        writer.emit("events", 1, b"a", b"rolled back")
        writer.rollback()
        writer.emit("events", 1, b"a", b"second")
        assert writer.end_batch() == waits  # both batches wait for the same flush
        assert producer.sent == [] and writer.dirty == 2 and not waits[0].done()
        assert await writer.flush() == 2
        await waits[0]
        await writer.sent()

    asyncio.run(scenario())
    assert [value for _, _, _, value in producer.sent] == [b"first", b"second"]
    assert writer.end_batch() == []  # nothing new: nothing to wait for


class _SlowProducer(_Producer):
    """Takes a batch only when let through (a broker still busy with the last request)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.failure: Exception | None = None

    async def send_batch(self, batch: _Batch, topic: str, partition: int) -> asyncio.Future[None]:
        await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return await super().send_batch(batch, topic, partition)


def test_a_flush_hands_records_over_in_the_background_and_in_order() -> None:
    producer = _SlowProducer()
    writer = tables.TableWriter(tables.DirectSender(producer), {"stats": _cached_table("stats")})
    names = [b"first", b"second", b"third"][: tables.MAX_HANDOVERS + 1]

    async def scenario() -> None:
        waits = []
        for name in names[:-1]:
            writer.emit("events", 0, b"a", name)
            waits.append(writer.end_batch()[0])
            # Returns while the producer is busy with the flushes before it.
            assert await asyncio.wait_for(writer.flush(), 1.0) == 1
        writer.emit("events", 0, b"a", names[-1])
        waits.append(writer.end_batch()[0])
        assert producer.sent == [] and not any(wait.done() for wait in waits)
        next_flush = asyncio.ensure_future(writer.flush())
        await asyncio.sleep(0.01)
        assert not next_flush.done()  # MAX_HANDOVERS flushes are on their way: it waits for the oldest
        producer.gate.set()
        assert await next_flush == 1
        await writer.sent()
        for wait in waits:
            await wait

    asyncio.run(scenario())
    assert [value for _, _, _, value in producer.sent] == names


def test_a_failed_hand_over_fails_its_batches_and_the_next_flush() -> None:
    producer = _SlowProducer()
    producer.failure = RuntimeError("broker gone")
    producer.gate.set()
    writer = tables.TableWriter(tables.DirectSender(producer), {"stats": _cached_table("stats")})

    async def scenario() -> None:
        writer.emit("events", 0, b"a", b"lost")
        waits = writer.end_batch()
        await writer.flush()
        with pytest.raises(RuntimeError, match="broker gone"):
            await waits[0]
        # Records after a failed flush are never sent: their batches fail too.
        writer.emit("events", 0, b"a", b"next")
        next_waits = writer.end_batch()
        await writer.flush()
        with pytest.raises(RuntimeError, match="broker gone"):
            await next_waits[0]
        with pytest.raises(RuntimeError, match="broker gone"):
            await writer.sent()

    asyncio.run(scenario())
    assert producer.sent == []


def _processor(
    producer: _Producer,
    highwater: Callable[[TP], int | None],
    lock: asyncio.Lock | None = None,
    rebalances: Callable[[], int] = lambda: 0,
    stores: dict[str, tables.CachedTable] | None = None,
) -> BatchProcessor:
    if stores is None:
        stores = {name: _cached_table(name) for name in tables.TABLE_NAMES}
    return BatchProcessor(
        Settings(),
        tables.TableWriter(tables.DirectSender(producer), stores),
        default_registry(),
        Metrics(),
        wire.Partitioner(1),
        lambda offsets: None,
        highwater,
        lock or asyncio.Lock(),
        rebalances=rebalances,
    )


def _batch(first_offset: int, count: int) -> dict[TP, list[types.SimpleNamespace]]:
    records = []
    for offset in range(first_offset, first_offset + count):
        value = wire.encode_task(task("agent_x_001", "tool_execution"))
        records.append(
            types.SimpleNamespace(
                headers=(),
                topic="tasks",
                partition=0,
                offset=offset,
                timestamp=wire.now_ms(),
                key=b"agent_x_001",
                value=value,
            )
        )
    return {TP("tasks", 0): records}


@pytest.mark.parametrize("waiting", [0, None, 1_000])
def test_flushes_are_rarer_while_a_backlog_waits(waiting: int | None) -> None:
    """Caught up (or end unknown): a flush every FLUSH_INTERVAL (0.2 s); with records
    ``waiting`` on the broker after the batch: every BACKLOG_FLUSH_INTERVAL (1 s)."""
    producer = _Producer()
    end: dict[str, int | None] = {}
    processor = _processor(producer, lambda tp: end["offset"])
    flushes_after = 1.0 if waiting else 0.2

    async def scenario() -> list[int]:
        sent_after = []
        for offset, age in ((0, 0.0), (1, 0.3), (2, 1.1)):
            end["offset"] = None if waiting is None else offset + 1 + waiting
            processor._last_flush = time.monotonic() - age  # the flush clock
            await processor(_batch(offset, 1))
            await processor.writer.sent()
            sent_after.append(len(producer.sent))
            producer.sent.clear()
        return sent_after

    sent_after = asyncio.run(scenario())
    assert processor.behind is bool(waiting)
    flushed = [count > 0 for count in sent_after]
    assert flushed == [False, flushes_after < 0.3, True]


class _MemorySource:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.stored = memory.empty_memory()
        memory.append(
            self.stored,
            "agent_x_001",
            "kept",
            role="user",
            memory_type="conversation",
            timestamp_ms=1,
            budget_tokens=100,
        )

    def read_memory(self) -> dict[str, Any] | None:
        self.calls.append("read")
        return self.stored

    def open_memory(self, keep: bool) -> dict[str, Any]:
        self.calls.append(f"open keep={keep}")
        return self.stored if keep else state.copy_row(self.stored)


def test_a_task_context_reads_memory_only_when_a_handler_recalls() -> None:
    source = _MemorySource()
    context = TaskContext("agent_x_001", "worker", 1000, None, 100, source=source)
    assert source.calls == []
    assert [e["content"] for e in context.recall()] == ["kept"]
    context.recall()
    assert source.calls == ["read"]


@pytest.mark.parametrize("keep", [True, False])
def test_a_task_context_opens_memory_at_the_first_write_and_a_replay_keeps_nothing(keep: bool) -> None:
    source = _MemorySource()
    context = TaskContext("agent_x_001", "worker", 1000, None, 100, source=source, keep_writes=keep)
    context.recall()
    context.remember("one")
    context.remember("two")
    assert source.calls == ["read", f"open keep={keep}"]
    assert [e["content"] for e in context.recall()] == ["kept", "one", "two"]
    kept = [e["content"] for e in memory.entries(source.stored)]
    assert kept == (["kept", "one", "two"] if keep else ["kept"])


def test_partition_owners_follow_the_latest_assignment() -> None:
    assignor = types.SimpleNamespace(
        changelog_distribution={
            "http://127.0.0.1:7001": {"app-agents-changelog": [0, 2], "app-tasks-changelog": [0, 2]},
            "http://127.0.0.1:7002": {"app-agents-changelog": [1, 3], "app-tasks-changelog": [1, 3]},
        }
    )
    owners = PartitionOwners(assignor, "app-agents-changelog", URL("http://127.0.0.1:7001"))
    assert owners.url(0) is None and owners.url(2) is None  # this worker's own partitions
    assert owners.url(1) == URL("http://127.0.0.1:7002")
    assert owners.url(9) is None  # owned by no one (yet)
    assignor.changelog_distribution = {"http://127.0.0.1:7002": {"app-agents-changelog": [0, 1, 2, 3]}}
    assert owners.url(0) == URL("http://127.0.0.1:7002")  # a rebalance moved it


def test_a_compiled_module_older_than_its_source_is_reported(tmp_path: Path) -> None:
    source = tmp_path / "pkg" / "hot.py"
    source.parent.mkdir()
    source.write_text("x = 1\n")
    assert native.stale(tmp_path, ("pkg/hot.py",)) == []  # plain Python: nothing to be stale
    built = source.parent / "hot.cpython-311-x86_64-linux-gnu.so"
    built.write_bytes(b"")
    os.utime(source, (1_000, 1_000))
    os.utime(built, (2_000, 2_000))
    assert native.stale(tmp_path, ("pkg/hot.py",)) == []
    os.utime(source, (3_000, 3_000))  # the source changed after the build
    assert native.stale(tmp_path, ("pkg/hot.py",)) == ["pkg/hot.py"]


def _run_tasks(registry: HandlerRegistry, events: list[wire.TaskEvent]) -> dict[str, tables.CachedTable]:
    """Run ``events`` (one partition, in order) through a batch processor; its table stores."""
    stores = {name: _cached_table(name) for name in tables.TABLE_NAMES}
    processor = BatchProcessor(
        Settings(),
        tables.TableWriter(tables.DirectSender(_Producer()), stores),
        registry,
        Metrics(),
        wire.Partitioner(1),
        lambda offsets: None,
        lambda tp: None,
        asyncio.Lock(),
    )
    records = [
        types.SimpleNamespace(
            headers=(),
            topic="tasks",
            partition=0,
            offset=i,
            timestamp=e.created_ms,
            key=e.agent_id.encode(),
            value=wire.encode_task(e),
        )
        for i, e in enumerate(events)
    ]
    asyncio.run(processor({TP("tasks", 0): records}))
    return stores


def test_a_handler_result_that_cannot_be_stored_fails_its_task_and_processing_goes_on() -> None:
    """Results are stored as the handler gives them; one msgpack cannot encode fails the task."""
    registry = HandlerRegistry()
    registry.register("tool_execution", lambda event, context: [1, 2, 3])
    registry.register("coordination", lambda event, context: None)
    registry.register("code_analysis", lambda event, context: {"lines": {1, 2}})  # a set: not encodable

    async def later(event: wire.TaskEvent, context: TaskContext) -> object:
        return {"when": object()}

    registry.register("inference", later)
    kinds = ["tool_execution", "coordination", "code_analysis", "inference", "tool_execution"]
    events = [task("agent_x_001", kind) for kind in kinds]
    stores = _run_tasks(registry, events)
    rows = [stores["tasks"].get(event.task_id) for event in events]
    assert [row["status"] for row in rows] == ["completed", "completed", "failed", "failed", "completed"]
    assert rows[0]["result"] == [1, 2, 3] and rows[1]["result"] is None
    assert rows[2]["error"].startswith("the handler's result cannot be stored") and rows[2]["result"] is None
    assert rows[3]["error"].startswith("the handler's result cannot be stored")
    agent = stores["agents"].get("agent_x_001")
    assert (agent["tasks_completed"], agent["tasks_failed"]) == (3, 2)


def test_a_handler_result_the_views_could_not_serve_fails_its_task() -> None:
    """msgpack stores bytes, int map keys and deep nesting; the task view could not serve them."""
    deep: object = "x"
    for _ in range(wire.MAX_DEPTH):
        deep = [deep]
    results = {
        "tool_execution": {"raw": b"\x00\x01"},
        "coordination": {"plan": {1: "first"}},
        "code_analysis": {"tree": deep},
        "memory_operation": {"ok": [1.5, None, True, {"a": "b"}]},
    }
    registry = HandlerRegistry()
    for kind, result in results.items():
        registry.register(kind, lambda event, context, result=result: result)

    async def later(event: wire.TaskEvent, context: TaskContext) -> object:
        return {"ext": msgpack.ExtType(7, b"")}

    registry.register("inference", later)
    events = [task("agent_x_001", kind) for kind in [*results, "inference"]]
    stores = _run_tasks(registry, events)
    rows = [tables.thaw(stores["tasks"].get(event.task_id)) for event in events]
    assert [row["status"] for row in rows] == ["failed", "failed", "failed", "completed", "failed"]
    reasons = [row["error"] for row in rows]
    assert (
        reasons[0] == "the handler's result cannot be stored: result['raw']: binary data (msgpack bin) has no JSON form"
    )
    assert reasons[1].endswith("result['plan']: a map key is a value of type int, not a string")
    assert reasons[2].endswith(f"nested deeper than {wire.MAX_DEPTH} levels")
    assert reasons[4].endswith("result['ext']: a msgpack ext type (code 7) has no JSON form")
    assert rows[3]["result"] == results["memory_operation"]
    for row in rows:  # every row reads back as the task view serves it
        orjson.dumps({k: v for k, v in row.items() if k != "o"})


def test_repeated_kafka_client_messages_show_once_per_window_and_are_counted() -> None:
    now = [0.0]
    limiter = RepeatedClientMessages(window=30.0, clock=lambda: now[0])

    def record(name: str, msg: str, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, ("127.0.0.1",), None)

    connect = "Unable connect to node %s"
    assert limiter.filter(record("aiokafka.conn", connect))
    assert not limiter.filter(record("aiokafka.conn", connect))  # the same kind again
    assert limiter.filter(record("aiokafka.cluster", "Unable to update metadata from %s"))  # another kind
    assert limiter.filter(record("streams.app", connect))  # the project's own lines are never hidden
    assert limiter.filter(record("aiokafka.conn", "fatal %s", logging.CRITICAL))
    now[0] = 29.0
    assert not limiter.filter(record("aiokafka.conn", connect))
    assert limiter.filter(record("faust.tables.recovery", "No event received for %s"))
    assert not limiter.filter(record("faust.tables.recovery", "No event received for %s"))  # hidden, not counted
    hidden, since = limiter.take_hidden()
    assert hidden == 2 and since is not None
    assert limiter.take_hidden() == (0, None)
    now[0] = 31.0
    assert limiter.filter(record("aiokafka.conn", connect))  # once per window


def test_a_groups_rebalance_warnings_are_hidden_when_repeated_but_not_counted_as_failures() -> None:
    """A heartbeat answered "rebalancing" is the group at work: counted, it made the worker
    warn after every restart that the client kept failing against a broker that was fine."""
    limiter = RepeatedClientMessages(window=30.0, clock=lambda: 0.0)
    rebalancing = "Heartbeat failed for group %s because it is rebalancing"

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("aiokafka.consumer.group_coordinator", logging.WARNING, __file__, 1, msg, ("g",), None)

    assert limiter.filter(record(rebalancing))
    assert not limiter.filter(record(rebalancing))  # still shown once per window
    assert limiter.take_hidden() == (0, None)
    connect = "Heartbeat send request failed: %s. Will retry."
    assert limiter.filter(record(connect))
    assert not limiter.filter(record(connect))  # a failure to reach the coordinator is counted
    assert limiter.take_hidden()[0] == 1


def test_a_log_that_restarted_below_the_processed_offset_is_noticed() -> None:
    tp = TP("t.tasks", 2)

    def at(offset: int, value: bytes = b"task") -> ConsumerRecord[bytes, bytes]:
        return ConsumerRecord("t.tasks", 2, offset, 1_700_000_000_000 + offset, 0, b"k", value, None, 1, 4, ())

    stats = state.new_stats(2)
    check = processor_module._check_continuity
    check(tp, [at(o) for o in range(10)], stats, 10)  # nothing processed yet
    stats["o"], stats["f"] = 9, fingerprint(at(9))
    check(tp, [at(o) for o in range(5, 12)], stats, 12)  # a replay through offset 9 (after a rebalance)
    check(tp, [at(o) for o in range(10, 12)], stats, 12)  # new records
    with pytest.raises(BrokerLostData, match=r"t\.tasks\[2\] restarted: it ends at offset 4, not above offset 9"):
        check(tp, [at(o) for o in range(4)], stats, 4)
    with pytest.raises(BrokerLostData, match="another record at offset 9"):
        check(tp, [at(o, b"another task") for o in range(20)], stats, 20)


def test_a_task_id_twice_in_one_batch_counts_once() -> None:
    """A request retried after a 503 may land beside the copy the broker took after all."""
    processor = _processor(_Producer(), lambda tp: None)
    first = task("agent_x_001", task_id="task_retried_1")
    other = task("agent_x_001")
    events = [first, other, first, first]
    records = [
        types.SimpleNamespace(
            headers=(),
            topic="tasks",
            partition=0,
            offset=i,
            timestamp=e.created_ms,
            key=b"agent_x_001",
            value=wire.encode_task(e),
        )
        for i, e in enumerate(events)
    ]
    asyncio.run(processor({TP("tasks", 0): records}))
    stores = processor.writer.tables
    assert stores["agents"].get("agent_x_001")["tasks_completed"] == 2
    stats = stores["stats"].get(state.stats_key(0))
    assert (stats["completed"], stats["duplicates"]) == (2, 2)
    assert stores["tasks"].get("task_retried_1")["o"] == 0


def test_a_task_and_its_retry_in_one_batch_are_no_duplicate() -> None:
    """After a kill, a task's first copy comes again, and the new worker's retry relay may
    put the task's due ``task.retry`` on the topic before the first fetch: one batch holds both."""
    processor = _processor(_Producer(), lambda tp: None)
    flaky = task("agent_x_001", "inference", {"latency_ms": 0, "fail_attempts": 1}, task_id="task_flaky_1")
    values = [wire.encode_task(flaky), wire.encode_task(task("agent_x_001")), wire.task_retry(flaky, 2, wire.now_ms())]
    records = [
        types.SimpleNamespace(
            headers=(), topic="tasks", partition=0, offset=i, timestamp=0, key=b"agent_x_001", value=v
        )
        for i, v in enumerate(values)
    ]
    asyncio.run(processor({TP("tasks", 0): records}))
    stores = processor.writer.tables
    stats = stores["stats"].get(state.stats_key(0))
    assert (stats["completed"], stats["duplicates"]) == (1, 0)
    # The first copy ran its first attempt again; the retry it asked for is the one that counts.
    assert stores["tasks"].get("task_flaky_1")["status"] == "queued"


def test_a_batch_fetched_before_a_revocation_is_dropped_not_processed() -> None:
    """A fetch that waited for the batch lock while partitions were revoked (and maybe given
    back) is stale: the records come again from the committed offsets. Processing it too
    would emit its lifecycle events and dead letters twice."""
    producer = _Producer()
    rebalances = [0]
    stores = {name: _cached_table(name) for name in tables.TABLE_NAMES}
    lock = asyncio.Lock()
    processor = _processor(producer, lambda tp: None, lock, lambda: rebalances[0], stores)

    async def scenario() -> None:
        async with lock:  # a rebalance holds the lock while the fetch waits for it
            waiting = asyncio.ensure_future(processor(_batch(0, 3), fetched_in=rebalances[0]))
            await asyncio.sleep(0)
            rebalances[0] += 1
        await waiting
        await processor.flush_changed_rows()
        # A batch fetched after the revocation is processed as usual.
        await processor(_batch(0, 3), fetched_in=rebalances[0])
        await processor.flush_changed_rows()

    asyncio.run(scenario())
    events = [value or b"" for topic, _, _, value in producer.sent if topic == "blackroad.events"]
    completions = [value for value in events if b"task.completed" in value]
    assert len(completions) == 3
    assert tables.thaw(stores["agents"].rows["agent_x_001"])["tasks_completed"] == 3


def test_a_failing_client_says_which_of_several_brokers_are_unreachable() -> None:
    from streams.runtime.broker_health import describe_failure

    one = describe_failure(["a:1"], [False])
    assert one == "the broker at a:1 is unreachable"
    some = describe_failure(["a:1", "b:2", "c:3"], [True, False, True])
    assert "of which b:2 is unreachable" in some
    assert describe_failure(["a:1", "b:2"], [False, False]) == "the brokers at a:1,b:2 are unreachable"
    assert "which accept connections" in describe_failure(["a:1", "b:2"], [True, True])


def _measurement(system: str, phase: str, rate: float, engine: str, **extra: Any) -> bench.Measurement:
    return bench.Measurement(system, phase, 1000, 1.0, rate, 90.0, extra.pop("rss", 200.0), engine=engine, **extra)


def test_bench_ratios_and_targets_are_taken_within_one_engine() -> None:
    one, packed = bench.Project(), bench.Project(pack=100, processes=2)
    results = [
        _measurement(bench.REFERENCE, "backlog", 30_000, "kafka"),
        _measurement(one.name, "backlog", 33_000, "kafka", rss=320.0),
        _measurement(one.name, "500/s", 500, "kafka", latency_ms={"p50": 2.0, "p95": 9.0, "p99": 18.0}),
        _measurement(packed.name, "backlog", 96_000, "kafka"),
    ]
    assert bench.ratios_vs_reference(results) == {one.name: 1.1, packed.name: 3.2}
    found = bench.bars(results)
    assert found["one_process_vs_quix"] == {"measured": 1.1, "target": 1.0, "met": True}
    assert found["packed_two_processes_vs_quix"]["met"]
    assert found["p50_ms"]["met"] and not found["p99_ms"]["met"]
    assert found["rss_mb"] == {"measured": 320.0, "target": 500.0, "met": True}
    # Without Quix Streams there is nothing to compare with.
    assert bench.ratios_vs_reference(results[1:]) == {}
    report = {
        "engines": {
            engine: {"broker": engine, "results": [asdict(r) for r in results], "bars": found}
            for engine in bench.ENGINES
        }
    }
    printed = bench.render(report)
    assert printed.count(f"| {packed.name} | backlog | 1,000 | 96,000 |") == 2
    assert "bar p99_ms: 18.0 (target 15.0): NOT met" in printed
    # Over several rounds each ratio is taken within its round, and the median is judged.
    second = [
        _measurement(bench.REFERENCE, "backlog", 40_000, "kafka", round=2),
        _measurement(one.name, "backlog", 36_000, "kafka", round=2),
        _measurement(one.name, "500/s", 500, "kafka", round=2, latency_ms={"p50": 2.0, "p95": 5.0, "p99": 10.0}),
        _measurement(packed.name, "backlog", 100_000, "kafka", round=2),
    ]
    over = bench.bars_over_rounds([results, second])
    assert over["one_process_vs_quix"] == {"measured": 1.0, "target": 1.0, "met": True, "by_round": [1.1, 0.9]}
    assert over["packed_two_processes_vs_quix"]["measured"] == 2.85
    assert over["p99_ms"]["measured"] == 14.0 and over["p99_ms"]["met"]
    rows = bench.table(results + second).splitlines()
    assert rows[2].startswith(f"| {bench.REFERENCE} | backlog, round 1 |")
    assert rows[3].startswith(f"| {bench.REFERENCE} | backlog, round 2 |")


def test_bench_runs_on_the_engines_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    from streams.engines import kafka_jars

    assert bench.build_parser().parse_args([]).engine == "both"
    assert bench.build_parser().parse_args(["--engine", "kafka"]).engine == "kafka"
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--engine", "redpanda"])
    monkeypatch.setattr(kafka_jars, "unavailable", lambda: None)
    assert bench.available_engines("both") == (["tansu", "kafka"], None)
    assert bench.available_engines("tansu") == (["tansu"], None)
    monkeypatch.setattr(kafka_jars, "unavailable", lambda: "no `java` found")
    engines, note = bench.available_engines("both")
    assert engines == ["tansu"] and note is not None and "no `java` found" in note
    with pytest.raises(ValueError, match="no `java` found"):
        bench.available_engines("kafka")
    assert bench.available_engines("tansu") == (["tansu"], None)


def test_the_bench_kafka_broker_holds_a_new_groups_first_join(tmp_path: Path) -> None:
    from streams.engines.kafka import KafkaBroker

    broker = bench.new_broker("kafka", tmp_path)
    assert isinstance(broker, KafkaBroker)
    configured = broker.configuration(controller_port=broker.port + 1)
    assert configured["group.initial.rebalance.delay.ms"] == "3000"
    assert configured["auto.create.topics.enable"] == "false"
    # The project's own embedded Kafka keeps forming a group at once.
    assert KafkaBroker(broker.port, tmp_path).configuration(broker.port + 1)["group.initial.rebalance.delay.ms"] == "0"


@pytest.mark.parametrize("pack", [1, 100])
def test_the_processing_benchmark_times_every_task_and_builds_its_records(pack: int) -> None:
    from benchmarks import processing

    settings = Settings(partitions=1)
    records = processing.task_records(settings.topic("tasks"), 1_000, 40, pack)
    assert len(records) == (10 if pack == 100 else 1_000)
    seconds, producer = asyncio.run(processing.one_round(records, 1_000, 60))
    # Each task's finished row and task.completed event; each agent's row and wake-up event.
    assert producer.records_by_topic == {
        "tasks-changelog": 1_000,
        settings.topic("events"): 1_000 + 40,
        "agents-changelog": 40,
        "stats-changelog": 1,
    }
    assert seconds > 0 and producer.batches >= len(producer.records_by_topic)  # a batch is one topic's
    # A round checks the tasks it timed all finished.
    with pytest.raises(RuntimeError, match="1000 of 1001 tasks finished"):
        asyncio.run(processing.one_round(records, 1_001, 60))


def _records(events: list[wire.TaskEvent], first_offset: int) -> list[Any]:
    return [
        types.SimpleNamespace(
            headers=(),
            topic="tasks",
            partition=0,
            offset=first_offset + i,
            timestamp=e.created_ms,
            key=e.agent_id.encode(),
            value=wire.encode_task(e),
        )
        for i, e in enumerate(events)
    ]


class _Worker:
    """A batch processor over fresh table stores, one partition, sending to a :class:`_Producer`."""

    def __init__(self, settings: Settings, memory_row: dict[str, Any] | None = None) -> None:
        self.producer = _Producer()
        self.stores = {name: _cached_table(name) for name in tables.TABLE_NAMES}
        if memory_row is not None:  # restored from its changelog
            self.stores["memory"].rows["agent_x_001"] = memory_row
        last = frozenset({settings.topic("memory-archive"), "memory_entries-changelog"})
        sender = tables.DirectSender(self.producer, last=last)
        self.processor = BatchProcessor(
            settings,
            tables.TableWriter(sender, self.stores),
            default_registry(),
            Metrics(),
            wire.Partitioner(1),
            lambda offsets: None,
            lambda tp: None,
            asyncio.Lock(),
        )

    async def process(self, events: list[wire.TaskEvent], first_offset: int) -> None:
        acknowledging = asyncio.ensure_future(self.processor.acknowledge())
        await self.processor({TP(self.processor.tasks_topic, 0): _records(events, first_offset)})
        async with self.processor.lock:
            await self.processor.drain()
        acknowledging.cancel()

    def sent(self, topic: str) -> list[Any]:
        return [msgpack.unpackb(value) for sent_to, _, _, value in self.producer.sent if sent_to == topic]


def test_entries_leaving_working_memory_are_archived_once_on_the_broker_and_again_after_a_crash_lost_them() -> None:
    from streams.history.verify import compare_memory

    settings = Settings(working_memory_tokens=16, processing_guarantee="at_least_once")
    archive = settings.topic("memory-archive")
    notes = [f"note number {n:02d} of the agent" for n in range(8)]  # 8 tokens each: 2 fit
    writes = [task("agent_x_001", "memory_operation", {"op": "write", "content": note}) for note in notes]

    async def scenario() -> None:
        worker = _Worker(settings)
        await worker.process(writes[:6], 0)
        # The 4 entries that left went out after the row's changelog, in one record for the batch.
        topics = [topic for topic, *_ in worker.producer.sent]
        assert topics.index(archive) > topics.index("memory-changelog")
        [record] = worker.sent(archive)
        assert (record["agent_id"], record["source_offset"]) == ("agent_x_001", 5)
        assert [entry["content"] for entry in record["entries"]] == notes[:4]
        row = worker.stores["memory"].get("agent_x_001")
        assert [entry["content"] for entry in memory.entries(row)] == notes[4:6] and "leaving" not in row
        # They are episodic memory now, each a row of its own, also written after the memory row.
        episodic = {entry["id"]: worker.stores["memory_entries"].get(entry["id"]) for entry in record["entries"]}
        assert [(row["content"], row["tier"], row["o"]) for row in episodic.values()] == [
            (note, "episodic", 5) for note in notes[:4]
        ]
        assert topics.index("memory_entries-changelog") > topics.index("memory-changelog")
        [consolidated] = [
            event for event in worker.sent(settings.topic("events")) if event["type"] == "memory.consolidated"
        ]
        assert consolidated["memory_ids"] == list(episodic) and consolidated["to_tier"] == "episodic"
        # The row's changelog record carries them too, in case the archive record is lost.
        changelog = [
            msgpack.unpackb(value) for topic, _, _, value in worker.producer.sent if topic == "memory-changelog"
        ]
        assert changelog[-1] == {**row, "leaving": [[5, record["entries"]]]}

        await worker.process(writes[6:7], 6)
        changelog = [
            msgpack.unpackb(value) for topic, _, _, value in worker.producer.sent if topic == "memory-changelog"
        ]
        assert [(offset, [e["content"] for e in entries]) for offset, entries in changelog[-1]["leaving"]] == [
            (6, notes[4:5])
        ]

        # A crash after the last row version reached its changelog, before its archive record
        # did: a new worker restores that version, and the replay of offset 6 sends it again.
        restored = changelog[-1]
        again = _Worker(settings, memory_row=restored)
        await again.process(writes[6:7], 6)
        assert again.sent(archive) == worker.sent(archive)[1:]
        assert again.stores["memory"].get("agent_x_001") == restored  # nothing written twice
        [resent] = again.sent(archive)[0]["entries"]
        assert again.stores["memory_entries"].get(resent["id"])["content"] == notes[4]
        # Every entry is on the chain: in the archive or in working memory.
        archived = [entry for record in worker.sent(archive) for entry in record["entries"]]
        differences: list[str] = []
        assert compare_memory({**restored, "agent_id": "agent_x_001"}, archived, differences) == 7
        assert differences == []

    asyncio.run(scenario())


def test_under_exactly_once_the_memory_row_keeps_nothing_that_left_it() -> None:
    """The archive record is in the flush's transaction with the row's changelog: both or neither."""
    settings = Settings(working_memory_tokens=16, processing_guarantee="exactly_once")
    notes = [f"note number {n:02d} of the agent" for n in range(4)]
    writes = [task("agent_x_001", "memory_operation", {"op": "write", "content": note}) for note in notes]

    async def scenario() -> None:
        worker = _Worker(settings)
        await worker.process(writes, 0)
        [record] = worker.sent(settings.topic("memory-archive"))
        assert [entry["content"] for entry in record["entries"]] == notes[:2]
        [changelog] = [value for topic, _, _, value in worker.producer.sent if topic == "memory-changelog"]
        assert "leaving" not in msgpack.unpackb(changelog)

    asyncio.run(scenario())


def test_records_of_a_topic_sent_last_wait_for_the_rest_of_their_flush() -> None:
    class Held(_Producer):
        def __init__(self) -> None:
            super().__init__()
            self.acks: list[asyncio.Future[None]] = []

        async def send_batch(self, batch: Any, topic: str, partition: int) -> asyncio.Future[None]:
            await super().send_batch(batch, topic, partition)
            self.acks.append(asyncio.get_running_loop().create_future())
            return self.acks[-1]

    async def run() -> list[list[str]]:
        producer = Held()
        table = _cached_table("memory")
        writer = tables.TableWriter(tables.DirectSender(producer, last=frozenset({"archive"})), {"memory": table})
        table.put("agent_x_001", state.new_memory(), 0)
        writer.emit("archive", 0, b"agent_x_001", b"left")
        writer.emit("events", 0, b"agent_x_001", b"event")
        writer.end_batch()
        await writer.flush()
        seen = []
        for _ in range(3):
            await asyncio.sleep(0)
        seen.append([topic for topic, *_ in producer.sent])
        for ack in producer.acks:
            ack.set_result(None)
        for _ in range(3):
            await asyncio.sleep(0)
        seen.append([topic for topic, *_ in producer.sent])
        producer.acks[-1].set_result(None)
        await writer.sent()
        return seen

    before, after = asyncio.run(run())
    assert sorted(before) == ["events", "memory-changelog"]
    assert after == [*before, "archive"]


def test_carried_fields_reach_the_next_changelog_record_only_and_a_rollback_drops_them() -> None:
    async def run() -> list[Any]:
        producer = _Producer()
        table = _cached_table("memory")
        writer = tables.TableWriter(tables.DirectSender(producer), {"memory": table})
        row = state.new_memory()
        table.put("agent_a_001", row, 0)
        table.carry("agent_a_001", "leaving", [1, ["a"]])
        table.carry("agent_b_001", "leaving", [1, ["b"]])  # a row not written in this flush
        writer.end_batch()
        table.carry("agent_a_001", "leaving", [2, ["rolled back"]])
        writer.rollback()
        table.put("agent_a_001", table.get("agent_a_001"), 0)
        table.carry("agent_a_001", "leaving", [3, ["c"]])
        writer.end_batch()
        await writer.flush()
        table.put("agent_a_001", table.get("agent_a_001"), 0)
        writer.end_batch()
        await writer.flush()
        await writer.sent()
        assert "leaving" not in table.get("agent_a_001")  # the live row never holds them
        return [msgpack.unpackb(value) for _, _, _, value in producer.sent]

    first, second = asyncio.run(run())
    assert first["leaving"] == [[1, ["a"]], [3, ["c"]]]
    assert "leaving" not in second


def test_dead_letter_reasons_become_a_bounded_set_of_labels() -> None:
    from streams.processing.metrics import MAX_REASON_LABELS, Metrics, reason_label

    assert reason_label("tasks[9999]: task_id 'x' repeated in the batch") == "tasks"
    assert reason_label("value is not msgpack: ...") == "value"
    assert reason_label("memory.accessed: invalid memory id 'x'") == "memory.accessed"
    assert reason_label("'columns' must be a map") == "other"
    metrics = Metrics()
    for n in range(MAX_REASON_LABELS + 10):
        metrics.dead_letter(f"word{'abcdefghijklmnopqrstuvwxyz'[n % 26]}{'x' * (n // 26)} happened")
    text = metrics.render().decode()
    labels = {line.split('reason="')[1].split('"')[0] for line in text.splitlines() if "dead_lettered_total{" in line}
    assert len(labels) == MAX_REASON_LABELS and "other" in labels


def test_a_handler_runs_without_kafka_over_a_memory_snapshot() -> None:
    from agents import builtin
    from agents.testing import make_task, run_handler
    from tests import plugin_handlers

    snapshot = memory.empty_memory()
    memory.append(snapshot, "agent_test_001", "earlier", role="user", memory_type="observation",
                  timestamp_ms=1, budget_tokens=10**6)  # fmt: skip
    run = run_handler(plugin_handlers.shout, make_task("code_analysis", {"code": "x = 1"}), snapshot, now_ms=5)
    assert run.result == {"plugin": "shout", "code": "X = 1"}
    assert [entry["content"] for entry in memory.entries(run.memory)] == ["earlier", "X = 1"]
    assert run.written[0]["importance"] == 0.8 and len(memory.entries(snapshot)) == 1  # the snapshot is kept
    slow = builtin.SimulatedInference(0, 0)
    run = run_handler(slow, make_task("inference", {"latency_ms": 1}), search_results=[{"id": "m", "content": "c"}])
    assert run.result and len(run.written) == 2  # an async handler, awaited
    with pytest.raises(WireError):
        make_task("singing")


def test_handler_plug_ins_replace_built_ins_or_say_why_they_cannot_load() -> None:
    from agents.plugins import PluginError, load_handlers
    from agents.registry import default_registry

    registry = default_registry()
    assert "tests.plugin_handlers:register" in load_handlers(registry, ["tests.plugin_handlers:register"])
    assert registry.resolve("code_analysis", "worker").__name__ == "shout"  # type: ignore[attr-defined]
    for spec, reason in (
        ("no_such_module:register", "cannot import"),
        ("tests.plugin_handlers:missing", "no function missing"),
        ("tests.plugin_handlers:broken", "cannot start"),
    ):
        with pytest.raises(PluginError, match=reason):
            load_handlers(default_registry(), [spec])


def test_the_performance_dashboard_reads_latency_and_rates_from_two_scrapes() -> None:
    from streams.operations.perf import parse_metrics, render, report

    def scrape(fast: int, slow: int, errors: int, cpu: float) -> str:
        total = fast + slow
        return "\n".join(
            [
                "# TYPE blackroad_http_request_duration_seconds histogram",
                f'blackroad_http_request_duration_seconds_bucket{{le="0.005",view="agent"}} {fast}',
                f'blackroad_http_request_duration_seconds_bucket{{le="0.25",view="agent"}} {total}',
                f'blackroad_http_request_duration_seconds_bucket{{le="+Inf",view="agent"}} {total}',
                f'blackroad_http_request_duration_seconds_bucket{{le="+Inf",view="metrics"}} {total * 9}',
                f'blackroad_http_request_duration_seconds_count{{view="agent"}} {total}',
                'blackroad_http_request_duration_seconds_sum{view="agent"} 1.0',
                "# TYPE blackroad_http_requests counter",
                f'blackroad_http_requests_total{{status="200",view="agent"}} {total - errors}',
                f'blackroad_http_requests_total{{status="503",view="agent"}} {errors}',
                "# TYPE process_cpu_seconds counter",
                f"process_cpu_seconds_total {cpu}",
                "# TYPE process_resident_memory_bytes gauge",
                "process_resident_memory_bytes 104857600",
                "",
            ]
        )

    before = parse_metrics([scrape(100, 0, 0, 10.0)], at=0.0)
    after = parse_metrics([scrape(1080, 20, 1, 11.0)], at=2.0)  # 1000 requests in 2 s, 20 of them slow, 1 failed
    found = report(before, after, {"tasks_per_minute": 1500, "task_latency_ms": {"p50": 2, "p95": 5, "p99": 9}})
    assert found.api_ms == {"p50": 5.0, "p95": 5.0, "p99": 250.0}  # the slowest 2% hold the P99
    assert found.requests_per_second == 500.0 and found.error_share == 0.001 and found.cpu_percent == 50.0
    checks = dict((what, met) for met, what in found.checks())
    assert checks["API latency P50 < 50 ms"] and not checks["API latency P99 < 200 ms"]
    assert checks["memory search P99 < 100 ms"] is None and checks["task throughput > 1,000/min"]
    text = render(found, 1)
    assert "P99: 250ms" in text and "⚠ API latency P99 < 200 ms" in text and "Memory: 100 MB" in text


def test_the_grafana_dashboard_asks_only_for_metrics_the_workers_export() -> None:
    import json
    import re
    from pathlib import Path

    from streams.processing.metrics import Metrics

    dashboard = json.loads((Path(__file__).parents[1] / "dashboards" / "grafana.json").read_text())
    exported = Metrics().render().decode()
    families = set(re.findall(r"^# TYPE (\w+) (\w+)", exported, re.MULTILINE))
    names = {name for name, _ in families}
    names |= {
        f"{name}{suffix}" for name, kind in families for suffix in ("_total", "_bucket", "_info") if kind != "gauge"
    }
    asked = {
        metric
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for metric in re.findall(r"\b((?:blackroad|process)_\w+)", target["expr"])
    }
    assert len(dashboard["panels"]) >= 10 and asked
    assert asked <= names, asked - names


def test_every_exported_metric_follows_prometheus_naming_with_its_unit() -> None:
    from prometheus_client.exposition import generate_latest

    from streams.processing.metrics import Metrics

    families = {}
    for line in generate_latest(Metrics().registry).decode().splitlines():
        if line.startswith("# TYPE blackroad_"):
            _, _, name, kind = line.split()
            families[name] = kind
    assert families, "no blackroad_ metric exported"
    units = ("_seconds", "_bytes", "_records", "_events", "_info", "_ratio")
    for name, kind in families.items():
        if kind == "counter" or name.endswith("_created"):
            continue  # a count of things (exported with _total), or when a series started
        assert name.endswith(units), f"{name} ({kind}) does not end with a unit {units}"


def test_a_batch_request_is_validated_in_slices_and_names_its_bad_task_by_its_place() -> None:
    from streams.serve.errors import ApiError
    from streams.serve.request_bodies import PARSE_SLICE, parse_batch

    good = [{"agent_id": f"agent_slice_{n:03d}", "kind": "tool_execution"} for n in range(PARSE_SLICE * 2 + 5)]
    events = asyncio.run(parse_batch({"requests": good}))
    assert [e.agent_id for e in events] == [r["agent_id"] for r in good]
    bad = [*good[: PARSE_SLICE + 7], {"agent_id": "nobody", "kind": "tool_execution"}]
    with pytest.raises(ApiError, match=rf"requests\[{PARSE_SLICE + 7}\]"):
        asyncio.run(parse_batch({"requests": bad}))


def test_a_batch_is_charged_by_its_size_before_its_tasks_are_validated() -> None:
    """A client over its limit is refused before the work of validating its tasks; the charge
    sees the whole batch's size once."""
    from streams.serve.errors import ApiError
    from streams.serve.request_bodies import parse_batch

    charged: list[int] = []

    def refuse(count: int) -> None:
        charged.append(count)
        raise ApiError("rate_limited", "over the limit", 429)

    bad = [{"agent_id": "agent_ok_001", "kind": "tool_execution"}, {"agent_id": "nobody", "kind": "tool_execution"}]
    with pytest.raises(ApiError) as refused:
        asyncio.run(parse_batch({"requests": bad}, refuse))
    assert refused.value.status == 429 and charged == [2]
    with pytest.raises(ApiError, match=r"requests\[1\]"):
        asyncio.run(parse_batch({"requests": bad}, charged.append))
    assert charged == [2, 2]


def test_sorted_keys_follow_the_rows_count_and_age() -> None:
    from streams.serve.sorted_keys import SortedKeys

    rows = {"b": 1, "a": 2}
    keys = SortedKeys(rows, max_age=3600)
    assert keys.get() == ["a", "b"]
    rows["c"] = 3
    assert keys.get() == ["a", "b", "c"]  # a new row: sorted again
    del rows["a"]
    rows["0"] = 4  # as many rows as before: the old order stands until it is max_age old
    assert keys.get() == ["a", "b", "c"]
    keys.max_age = 0.0
    assert keys.get() == ["0", "b", "c"]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(heap_trim.find_malloc_trim() is None, reason="the C library has no malloc_trim")
def test_heap_trim_gives_freed_pages_in_the_heap_back() -> None:
    # 64 KiB blocks come from the heap (below the mmap threshold); freeing every other one
    # leaves 64 MB in holes of whole pages below blocks still in use, which only a trim returns.
    blocks = [bytearray(65536) for _ in range(2_000)]
    kept = blocks[1::2]
    del blocks
    before = _rss_mb()

    async def run() -> heap_trim.HeapTrim:
        service = heap_trim.HeapTrim(0.05)
        await service.start()
        deadline = time.monotonic() + 10
        while service.trims == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await service.stop()
        return service

    service = asyncio.run(run())
    assert service.trims >= 1
    assert before - _rss_mb() > 40, (before, _rss_mb())
    assert len(kept) == 1_000


def test_heap_trim_off_does_nothing() -> None:
    async def run() -> heap_trim.HeapTrim:
        service = heap_trim.HeapTrim(0.0)
        await service.start()
        await asyncio.sleep(0.1)
        await service.stop()
        return service

    assert asyncio.run(run()).trims == 0


def test_the_stats_document_has_every_field_before_the_first_refresh() -> None:
    """``GET /v1/stats`` right after a worker starts serves the fields it serves later."""
    from streams.serve.stats_view import StatsView

    view = StatsView(Settings(), "stats-changelog")
    before = set(view.snapshot)
    view.refresh()
    assert before == set(view.snapshot), set(view.snapshot) ^ before


def test_the_retry_relay_keeps_the_liveness_settings_of_the_tasks_group() -> None:
    """A killed worker's relay partitions move as soon as its tasks' partitions do, and
    Tansu, which holds a join for half the session, lets the relay join as soon too."""
    from streams.processing.retry_relay import RetryRelay

    async def check(settings: Settings) -> None:
        consumer = RetryRelay(settings).consumer()  # not started: no broker needed
        assert consumer._session_timeout_ms == settings.group_session_timeout * 1000
        assert consumer._heartbeat_interval_ms == settings.heartbeat_interval * 1000

    for settings in (Settings(), Settings(session_timeout=12.0)):
        asyncio.run(check(settings))
