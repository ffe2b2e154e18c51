"""Table rows and how events change them. Pure functions over plain dicts.

Every row carries ``"o"``: the source offset of the last event applied to it.
Rows of one partition only ever see events of that partition, so an event whose
offset is not above a row's ``"o"`` is already in that row. That makes replays
after a crash (at-least-once delivery) idempotent row by row.
"""

from __future__ import annotations

from typing import Any

from agents import memory as working_memory
from schemas.domain import NAMED_AGENTS
from schemas.wire import TaskEvent
from streams.processing import histogram

STATS_WINDOW_SECONDS = 120
TERMINAL_TASK_STATUSES = frozenset({"completed", "failed", "dead", "cancelled"})


def task_expired(row: dict[str, Any], cutoff_ms: int) -> bool:
    """Whether a task row is past retention: finished before ``cutoff_ms``.

    Expired rows are swept from the live table now and then; until they are, every reader
    treats them as gone, so a lookup answers the same before and after a sweep (and after
    a restart that restored rows whose tombstones had not reached the changelog yet).
    """
    finished = row["completed_at"]
    return finished is not None and finished < cutoff_ms and row["status"] in TERMINAL_TASK_STATUSES


def stats_key(partition: int) -> str:
    return f"partition-{partition:04d}"


def agent_name(agent_id: str) -> str:
    parts = agent_id.split("_")
    return "_".join(parts[1:-1]).upper()


def new_agent(agent_id: str, agent_type: str, now_ms: int, max_concurrent_tasks: int) -> dict[str, Any]:
    name = agent_name(agent_id)
    return {
        "o": -1,
        "id": agent_id,
        "name": name,
        "type": NAMED_AGENTS.get(name.lower(), agent_type),
        "status": "offline",
        "config": {"max_concurrent_tasks": max_concurrent_tasks},
        "tasks_completed": 0,
        "tasks_failed": 0,
        "tasks_dead": 0,
        "avg_response_ms": 0.0,
        "peak_concurrent_tasks": 0,
        "last_activity": None,
        "created_at": now_ms,
        "updated_at": now_ms,
    }


#: A task row's fields in the order of its changelog value, a msgpack array: a finished
#: task is written once and kept as those bytes, and an array packs in half the time of a
#: map and takes fewer bytes. Other rows are maps.
TASK_FIELDS = (
    "o",
    "id",
    "agent_id",
    "title",
    "description",
    "kind",
    "priority",
    "payload",
    "status",
    "result",
    "error",
    "attempts",
    "created_at",
    "started_at",
    "completed_at",
    "deadline",
    "metadata",
    # Added later: rows written before it end at "metadata" (read with a None trace id).
    "trace_id",
)


def task_values(row: dict[str, Any]) -> list[Any]:
    """A task row as its changelog array (see :data:`TASK_FIELDS`)."""
    return [row[name] for name in TASK_FIELDS]


def task_from_values(values: list[Any]) -> dict[str, Any]:
    """A task row from its changelog array (one written before ``trace_id`` existed too)."""
    count = len(values)
    if count == len(TASK_FIELDS) - 1:
        values = [*values, None]
    elif count != len(TASK_FIELDS):
        raise ValueError(f"a task row has {len(TASK_FIELDS)} fields, got an array of {count}")
    return dict(zip(TASK_FIELDS, values, strict=True))


def finished_task_values(
    event: TaskEvent,
    offset: int,
    status: str,
    result: Any,
    error: str | None,
    attempts: int,
    started_at: int,
    completed_at: int,
) -> list[Any]:
    """A finished task's row as its changelog array, built without the map (the hot path)."""
    return [
        offset,
        event.task_id,
        event.agent_id,
        event.title,
        event.description,
        event.kind,
        event.priority,
        event.payload,
        status,
        result,
        error,
        attempts,
        event.created_ms,
        started_at,
        completed_at,
        event.deadline_ms,
        event.metadata,
        event.trace_id,
    ]


def new_task(event: TaskEvent, offset: int, status: str = "queued", started_at: int | None = None) -> dict[str, Any]:
    return {
        "o": offset,
        "id": event.task_id,
        "agent_id": event.agent_id,
        "title": event.title,
        "description": event.description,
        "kind": event.kind,
        "priority": event.priority,
        "payload": event.payload,
        "status": status,
        "result": None,
        "error": None,
        "attempts": 0,
        "created_at": event.created_ms,
        "started_at": started_at,
        "completed_at": None,
        "deadline": event.deadline_ms,
        "metadata": event.metadata,
        "trace_id": event.trace_id,
    }


def new_memory() -> dict[str, Any]:
    return {"o": -1, **working_memory.empty_memory()}


def new_stats(partition: int) -> dict[str, Any]:
    return {
        "o": -1,
        # Fingerprint of the record at offset "o": a broker that lost its data may hold
        # another one there (see streams.processing.log_continuity).
        "f": None,
        "partition": partition,
        "agents_awake": 0,
        "completed": 0,
        "failed": 0,
        "dead": 0,
        "invalid_events": 0,
        "pending": 0,
        "duplicates": 0,
        "task_latency": {},
        "handler_latency": {},
        "completed_per_second": {},
        "memory_ops_per_second": {},
    }


def apply_outcome_to_agent(agent: dict[str, Any], status: str, handler_ms: float, now_ms: int) -> None:
    """Fold one finished task (its final ``status``) into its agent's counters."""
    if status == "completed":
        done = agent["tasks_completed"] + 1
        agent["tasks_completed"] = done
        # Kept unrounded (rounding a float costs more than the rest of this function);
        # the agent view rounds it.
        agent["avg_response_ms"] += (handler_ms - agent["avg_response_ms"]) / done
    elif status == "failed":
        agent["tasks_failed"] += 1
    elif status == "dead":
        agent["tasks_dead"] += 1
    agent["last_activity"] = now_ms
    agent["updated_at"] = now_ms


def apply_outcome_to_stats(
    stats: dict[str, Any], status: str, created_at: int, handler_ms: float, memory_ops: int, now_ms: int
) -> None:
    """Fold one finished task into its partition's stats (latency = created to finished)."""
    if status == "completed":
        stats["completed"] += 1
        histogram.record(stats["task_latency"], now_ms - created_at)
        _bump_second(stats["completed_per_second"], now_ms)
    elif status == "failed":
        stats["failed"] += 1
    elif status == "dead":
        stats["dead"] += 1
    histogram.record(stats["handler_latency"], handler_ms)
    if memory_ops:
        _bump_second(stats["memory_ops_per_second"], now_ms, memory_ops)


def _bump_second(window: dict[int, int], now_ms: int, amount: int = 1) -> None:
    second = now_ms // 1000
    window[second] = window.get(second, 0) + amount
    if len(window) > STATS_WINDOW_SECONDS:
        horizon = second - STATS_WINDOW_SECONDS
        for old in [s for s in window if s <= horizon]:
            del window[old]


def copy_row(row: dict[str, Any]) -> dict[str, Any]:
    """A copy safe to change without touching ``row`` (nested maps and lists copied too)."""
    copied = dict(row)
    for key, value in row.items():
        if isinstance(value, dict):
            copied[key] = dict(value)
        elif isinstance(value, list):
            copied[key] = list(value)
    return copied
