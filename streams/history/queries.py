"""Reads of the history: tasks a page at a time (keyset pagination), a task by id, and the
recent tasks of a page of agents in one query.

A page ends with a cursor, ``"<created_at ms>:<task id>"`` of its last task. An agent's
tasks come newest first (the next page: strictly before the cursor, in ``(created_at, id)``
order); the task feed (``GET /v1/tasks``) oldest first (the next page: strictly after it).
Each query runs on an index that starts with its filter and ends in ``(created_at, id)``
(``tasks_by_agent``, ``tasks_by_agent_status``, ``tasks_by_created``, ``tasks_by_status``):
a page costs its own rows, however long the history is. A filter that may be absent is a
query text of its own rather than ``$n IS NULL OR ...``, so a prepared statement's generic
plan still uses the index.
"""

from __future__ import annotations

from typing import Any

import orjson


def _columns(json: str) -> str:
    """A task's columns as the history serves them (times in milliseconds, as the live views);
    ``json`` is appended to its JSON columns (``::text`` to decode in Python, or nothing)."""
    return f"""
    id, agent_id, title, description, kind, priority, payload{json} AS payload, status,
    result{json} AS result, error, attempts,
    (extract(epoch FROM created_at) * 1000)::bigint AS created_at,
    (extract(epoch FROM started_at) * 1000)::bigint AS started_at,
    (extract(epoch FROM completed_at) * 1000)::bigint AS completed_at,
    (extract(epoch FROM deadline) * 1000)::bigint AS deadline,
    metadata{json} AS metadata, trace_id
    """


_TASK = _columns("::text")
#: The time of a cursor, converted as the rows' times were (``streams.history.store``); always
#: given (the first page's is past every row), so the keyset is always an index condition.
_CURSOR_TIME = "to_timestamp({}::float8 / 1000)"
#: The first page's cursor going back in time: ``to_timestamp('Infinity')`` is ``infinity``.
_AFTER_EVERY_ROW = (float("inf"), "")
#: The first page's cursor going forward: "" sorts before every id.
_BEFORE_EVERY_ROW = (0.0, "")


#: The status most history rows end in. The status indexes are partial and leave it out
#: (``streams.history.schema``): a filter on it reads the plain index and skips the few
#: others; a filter on any other status says ``status <> 'completed'`` in its text, so even a
#: generic plan may use the partial index.
COMMON_STATUS = "completed"


def _status_filter(status: str | None, param: str) -> str:
    """The WHERE terms of a status filter (``param`` carries the status when it is not the common one)."""
    if status is None:
        return ""
    if status == COMMON_STATUS:
        return f"AND status = '{COMMON_STATUS}'"
    return f"AND status <> '{COMMON_STATUS}' AND status = {param}"


def _agent_tasks(status: str | None) -> str:
    return f"""
SELECT {_TASK} FROM tasks
WHERE agent_id = $1 {_status_filter(status, "$5")}
  AND (tasks.created_at, tasks.id) < ({_CURSOR_TIME.format("$2")}, $3)
ORDER BY tasks.created_at DESC, tasks.id DESC
LIMIT $4
"""  # noqa: S608 - the module's own column list and status names


def _task_feed(status: str | None) -> str:
    return f"""
SELECT {_TASK} FROM tasks
WHERE (tasks.created_at, tasks.id) > ({_CURSOR_TIME.format("$1")}, $2) {_status_filter(status, "$4")}
ORDER BY tasks.created_at, tasks.id
LIMIT $3
"""  # noqa: S608 - the module's own column list and status names


#: An agent's tasks before a cursor, newest first: ``(agent, cursor ms, cursor id, limit[, status])``
#: (cursor times as float8: exact for any millisecond count, and infinite for the first page);
#: by the status filter: none, the common status, another (the only one that takes a ``status``).
AGENT_TASKS = _agent_tasks(None)
AGENT_TASKS_COMMON_STATUS = _agent_tasks(COMMON_STATUS)
AGENT_TASKS_OTHER_STATUS = _agent_tasks("other")
#: Tasks after a cursor, oldest first: ``(cursor ms, cursor id, limit[, status])``, the same way.
TASK_FEED = _task_feed(None)
TASK_FEED_COMMON_STATUS = _task_feed(COMMON_STATUS)
TASK_FEED_OTHER_STATUS = _task_feed("other")
#: One task: ``(task id)``.
TASK_BY_ID = f"SELECT {_TASK} FROM tasks WHERE id = $1"  # noqa: S608 - the module's own column list
#: The newest tasks of each of a list of agents, as one JSON array per agent, in one query
#: (a lateral join on ``tasks_by_agent``, not one query per agent): ``(agent ids, per agent)``.
RECENT_TASKS_OF_AGENTS = f"""
SELECT agent.id AS agent_id,
       coalesce(json_agg(recent ORDER BY recent.created_at DESC, recent.id DESC)
                FILTER (WHERE recent.id IS NOT NULL), '[]')::text AS tasks
FROM unnest($1::text[]) AS agent(id)
LEFT JOIN LATERAL (
    SELECT {_columns("")} FROM tasks
    WHERE tasks.agent_id = agent.id
    ORDER BY tasks.created_at DESC, tasks.id DESC
    LIMIT $2
) AS recent ON true
GROUP BY agent.id
"""  # noqa: S608 - the module's own column list


class BadCursor(ValueError):
    """A cursor that is not ``<created_at ms>:<task id>`` (nor, for ``since``, a time in ms)."""


def parse_cursor(cursor: str) -> tuple[float, str]:
    """A cursor's creation time (ms) and task id."""
    millis, _, task_id = cursor.partition(":")
    if not _is_millis(millis) or not task_id:
        raise BadCursor(f"expected <created_at ms>:<task id>, got {cursor!r}")
    return float(millis), task_id


def parse_since(since: str) -> tuple[float, str]:
    """``since``: a time in ms (tasks created at or after it) or a page's cursor (tasks after it)."""
    if _is_millis(since):
        return float(since), ""  # "" sorts before every id: the time itself is included
    try:
        return parse_cursor(since)
    except BadCursor:
        raise BadCursor(f"expected a time in ms or <created_at ms>:<task id>, got {since!r}") from None


def _is_millis(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 15


def cursor_of(task: dict[str, Any]) -> str:
    return f"{task['created_at']}:{task['id']}"


async def agent_tasks(
    conn: Any, agent_id: str, status: str | None, before: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """Up to ``limit`` of the agent's tasks before the cursor, newest first, and the next page's cursor."""
    moment, task_id = parse_cursor(before) if before else _AFTER_EVERY_ROW
    if status is None:
        rows = await conn.fetch(AGENT_TASKS, agent_id, moment, task_id, limit)
    elif status == COMMON_STATUS:
        rows = await conn.fetch(AGENT_TASKS_COMMON_STATUS, agent_id, moment, task_id, limit)
    else:
        rows = await conn.fetch(AGENT_TASKS_OTHER_STATUS, agent_id, moment, task_id, limit, status)
    tasks = [_task(row) for row in rows]
    return tasks, cursor_of(tasks[-1]) if len(tasks) == limit else None


async def task_feed(
    conn: Any, status: str | None, since: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """Up to ``limit`` tasks from ``since`` on, oldest first, and the next page's ``since``."""
    moment, task_id = parse_since(since) if since else _BEFORE_EVERY_ROW
    if status is None:
        rows = await conn.fetch(TASK_FEED, moment, task_id, limit)
    elif status == COMMON_STATUS:
        rows = await conn.fetch(TASK_FEED_COMMON_STATUS, moment, task_id, limit)
    else:
        rows = await conn.fetch(TASK_FEED_OTHER_STATUS, moment, task_id, limit, status)
    tasks = [_task(row) for row in rows]
    return tasks, cursor_of(tasks[-1]) if len(tasks) == limit else None


async def task_by_id(conn: Any, task_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(TASK_BY_ID, task_id)
    return None if row is None else _task(row)


async def recent_tasks_of_agents(conn: Any, agent_ids: list[str], per_agent: int) -> dict[str, list[dict[str, Any]]]:
    """Each agent's ``per_agent`` newest tasks, newest first (an agent with none: an empty list)."""
    rows = await conn.fetch(RECENT_TASKS_OF_AGENTS, agent_ids, per_agent)
    return {row["agent_id"]: orjson.loads(row["tasks"]) for row in rows}


def _task(row: Any) -> dict[str, Any]:
    task = dict(row)
    for name in ("payload", "result", "metadata"):
        if task[name] is not None:
            task[name] = orjson.loads(task[name])
    return task


_MEMORY = (
    "SELECT agent_id, id, hash, prev_hash, content, round(extract(epoch FROM created_at) * 1000)::bigint AS created_at"
    " FROM memory_entries WHERE agent_id = ANY($1)"
)


async def archived_memory(conn: Any, agent_ids: list[str], chunk: int = 10_000) -> dict[str, list[dict[str, Any]]]:
    """The memory entries of ``agent_ids`` that left working memory, by agent (their chain
    fields; times back in ms, as hashed), looked up ``chunk`` agents per query."""
    by_agent: dict[str, list[dict[str, Any]]] = {agent_id: [] for agent_id in agent_ids}
    for start in range(0, len(agent_ids), chunk):
        for record in await conn.fetch(_MEMORY, agent_ids[start : start + chunk]):
            by_agent[record["agent_id"]].append(dict(record))
    return by_agent
