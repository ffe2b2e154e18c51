"""Task events in the documented wire format."""

from __future__ import annotations

from typing import Any

from schemas import wire
from schemas.wire import TaskEvent

_counter = {"n": 0}


def task(
    agent_id: str, kind: str = "tool_execution", payload: dict[str, Any] | None = None, task_id: str | None = None
) -> TaskEvent:
    _counter["n"] += 1
    return TaskEvent(
        task_id=task_id or f"task_t{_counter['n']:08d}",
        agent_id=agent_id,
        kind=kind,
        priority="normal",
        title=f"{kind} {_counter['n']}",
        description="",
        payload=payload if payload is not None else {"tool": "upper", "input": "x"},
        created_ms=wire.now_ms(),
    )


def nested(levels: int, leaf: Any = "x") -> dict[str, Any]:
    """A map holding lists and maps ``levels`` deep in all (itself included)."""
    value: Any = leaf
    for level in range(levels - 1):
        value = [value] if level % 2 == 0 else {"k": value}
    return {"k": value}


def record(event: TaskEvent) -> tuple[bytes, bytes]:
    return event.agent_id.encode(), wire.encode_task(event)
