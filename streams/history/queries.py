"""Reads of the history: an agent's tasks, newest first, a page at a time (keyset pagination).

A page ends with a cursor, ``"<created_at ms>:<task id>"`` of its last task; the next page
is the tasks strictly before it in ``(created_at, id)`` order. Each query runs on an index
that starts with its filter and ends in ``(created_at, id)`` (``tasks_by_agent``,
``tasks_by_agent_status``): a page costs its own rows, however long the history is.
"""

from __future__ import annotations

from typing import Any

import orjson

#: Columns of a task as the history serves it (times in milliseconds, as the live views).
_TASK = """
    id, agent_id, title, description, kind, priority, payload::text AS payload, status,
    result::text AS result, error, attempts,
    (extract(epoch FROM created_at) * 1000)::bigint AS created_at,
    (extract(epoch FROM started_at) * 1000)::bigint AS started_at,
    (extract(epoch FROM completed_at) * 1000)::bigint AS completed_at,
    (extract(epoch FROM deadline) * 1000)::bigint AS deadline,
    metadata::text AS metadata
"""

AGENT_TASKS = f"""
SELECT {_TASK} FROM tasks
WHERE agent_id = $1 AND ($2::text IS NULL OR status = $2)
  AND ($3::bigint IS NULL OR (tasks.created_at, tasks.id) < (to_timestamp($3::float8 / 1000), $4))
ORDER BY tasks.created_at DESC, tasks.id DESC
LIMIT $5
"""  # noqa: S608 - the module's own column list


class BadCursor(ValueError):
    """A ``before`` cursor that is not ``<created_at ms>:<task id>``."""


def parse_cursor(cursor: str) -> tuple[int, str]:
    """A cursor's creation time (ms, converted as the rows were: ``to_timestamp(ms::float8 / 1000)``) and task id."""
    millis, _, task_id = cursor.partition(":")
    if not millis.isdigit() or len(millis) > 15 or not task_id:
        raise BadCursor(f"expected <created_at ms>:<task id>, got {cursor!r}")
    return int(millis), task_id


def cursor_of(task: dict[str, Any]) -> str:
    return f"{task['created_at']}:{task['id']}"


async def agent_tasks(
    conn: Any, agent_id: str, status: str | None, before: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """Up to ``limit`` of the agent's tasks before the cursor, newest first, and the next page's cursor."""
    moment, task_id = parse_cursor(before) if before else (None, None)
    rows = await conn.fetch(AGENT_TASKS, agent_id, status, moment, task_id, limit)
    tasks = [_task(row) for row in rows]
    return tasks, cursor_of(tasks[-1]) if len(tasks) == limit else None


def _task(row: Any) -> dict[str, Any]:
    task = dict(row)
    for name in ("payload", "result", "metadata"):
        if task[name] is not None:
            task[name] = orjson.loads(task[name])
    return task
