"""Every operation the web views serve: method, path, parameters, body and answers.

The parameter objects here are the ones the views read requests with; the OpenAPI
document (``streams.serve.openapi``) is built from :data:`OPERATIONS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from schemas import domain
from streams.memory_search.index import TIERS
from streams.serve.contract import fields, responses
from streams.serve.contract.params import ChoiceQuery, IntegerQuery, Parameter, PathId, PatternQuery

AGENT_ID = PathId("agent_id", domain.AGENT_ID, domain.MAX_AGENT_ID, "an agent's id, e.g. agent_alice_001")
TASK_ID = PathId("task_id", domain.TASK_ID, domain.MAX_TASK_ID, "a task's id, e.g. task_3f9a0c21b7d41a")

AGENTS_LIMIT = IntegerQuery("limit", 20, 1, 100, "agents in the page")
AGENTS_OFFSET = IntegerQuery("offset", 0, 0, 10_000_000, "agents skipped (in id order)")
AGENT_STATUS = ChoiceQuery(
    "status", domain.AGENT_STATUSES, "only agents in this status", variants=domain.AGENT_STATUS_VARIANTS
)
AGENTS_INCLUDE = ChoiceQuery(
    "include", ("recent_tasks",), "recent_tasks: each agent's newest tasks, from the history (404 with it off)"
)
#: Agents a worker asked by another returns (not documented: only workers send it).
PEER_WINDOW = IntegerQuery("window", 0, 0, 10_000_000, "agents a worker returns to another")
MEMORY_TIER = ChoiceQuery("tier", TIERS, "the memory tier listed", default="working")
MEMORY_LIMIT = IntegerQuery("limit", 100, 1, 1000, "the newest entries of a tier beyond working memory")
TASKS_LIMIT = IntegerQuery("limit", 20, 1, 100, "tasks in the page")
TASK_STATUS = ChoiceQuery(
    "status", domain.TASK_STATUSES, "only tasks in this status", variants=domain.TASK_STATUS_VARIANTS
)
#: The history's page cursors: ``<created_at ms>:<task id>`` (and for ``since``, a time in ms too).
_CURSOR = rf"[0-9]{{1,15}}:{domain.TASK_ID.pattern}"
BEFORE = PatternQuery("before", re.compile(_CURSOR), "the next_before of the page before: tasks older than it")
SINCE = PatternQuery(
    "since",
    re.compile(rf"[0-9]{{1,15}}|{_CURSOR}"),
    "a time in ms (tasks created from then on) or the next_since of the page before",
)

Access = Literal["open", "read", "write"]


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    operation_id: str
    summary: str
    ok: dict[str, Any]
    #: ``open``: anyone, no token, no limit; ``read``: a token when BLACKROAD_API_READS=token;
    #: ``write``: a token whenever tokens are configured.
    access: Access = "read"
    parameters: tuple[Parameter, ...] = ()
    body: str | None = None
    ok_status: int = 200
    #: Besides 200/202: the statuses the operation answers in the error envelope.
    errors: tuple[int, ...] = (400, 401, 403, 404, 429, 500, 503)
    content_type: str = "application/json"
    #: Other answers in the operation's own document, not the envelope (``/readyz``'s 503).
    answers: tuple[int, ...] = ()


_NO_PARAMS = (401, 403, 429, 500, 503)
_BODY = (400, 401, 403, 404, 413, 429, 500, 503)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "get",
        "/v1/agents",
        "listAgents",
        "Agents in id order, of every worker",
        responses.AGENT_LIST,
        parameters=(AGENTS_LIMIT, AGENTS_OFFSET, AGENT_STATUS, AGENTS_INCLUDE),
    ),
    Operation("get", "/v1/agents/{agent_id}", "getAgent", "One agent", responses.ref("Agent"), parameters=(AGENT_ID,)),
    Operation(
        "get",
        "/v1/agents/{agent_id}/memory",
        "getAgentMemory",
        "An agent's memory entries of one tier",
        responses.WORKING_MEMORY,
        parameters=(AGENT_ID, MEMORY_TIER, MEMORY_LIMIT),
    ),
    Operation(
        "get",
        "/v1/agents/{agent_id}/memory/verify",
        "verifyAgentMemory",
        "Walks the agent's memory chain from its head back to GENESIS",
        responses.MEMORY_VERIFY,
        parameters=(AGENT_ID,),
    ),
    Operation(
        "get",
        "/v1/agents/{agent_id}/tasks",
        "listAgentTasks",
        "The agent's tasks from the history, newest first (404 with the history off)",
        responses.AGENT_TASK_PAGE,
        parameters=(AGENT_ID, TASKS_LIMIT, TASK_STATUS, BEFORE),
    ),
    Operation(
        "post",
        "/v1/memory/search",
        "searchMemory",
        "Memory entries by similarity to a text (404 with memory search off)",
        responses.SEARCH_RESULTS,
        body="MemorySearchRequest",
        errors=_BODY,
    ),
    Operation(
        "get",
        "/v1/memory/stats",
        "memoryStats",
        "Memory entries per tier and the search index, of every worker (404 with memory search off)",
        responses.MEMORY_STATS,
        errors=(*_NO_PARAMS, 404),
    ),
    Operation(
        "get",
        "/v1/tasks",
        "listTasks",
        "The history's tasks from `since` on, oldest first (404 with the history off)",
        responses.TASK_FEED_PAGE,
        parameters=(TASKS_LIMIT, TASK_STATUS, SINCE),
    ),
    Operation(
        "post",
        "/v1/tasks",
        "createTask",
        "Queue a task",
        responses.TASK_QUEUED,
        access="write",
        body="TaskRequest",
        ok_status=202,
        errors=_BODY,
    ),
    Operation("get", "/v1/tasks/{task_id}", "getTask", "One task", responses.ref("Task"), parameters=(TASK_ID,)),
    Operation(
        "post",
        "/v1/batch",
        "createTasks",
        "Queue several tasks as one record: all of them or none",
        responses.BATCH_QUEUED,
        access="write",
        body="BatchRequest",
        ok_status=202,
        errors=_BODY,
    ),
    Operation("get", "/v1/stats", "getStats", "The precomputed stats", responses.STATS, errors=_NO_PARAMS),
    Operation(
        "get",
        "/metrics",
        "getMetrics",
        "Prometheus metrics (text format)",
        {"type": "string"},
        errors=_NO_PARAMS,
        content_type="text/plain",
    ),
    Operation("get", "/healthz", "alive", "The process serves HTTP", responses.ALIVE, access="open", errors=(500,)),
    Operation(
        "get",
        "/readyz",
        "ready",
        "The worker has started, its tables are recovered and the broker answers",
        responses.READY,
        access="open",
        errors=(500,),
        answers=(503,),
    ),
    Operation("get", "/openapi.json", "openapi", "This document", {"type": "object"}, access="open", errors=(500,)),
    Operation(
        "get",
        "/dashboard",
        "dashboard",
        "The live dashboard page (docs/dashboard.md)",
        {"type": "string"},
        access="open",
        errors=(500,),
        content_type="text/html",
    ),
    Operation(
        "get",
        "/dashboard/dashboard.js",
        "dashboardScript",
        "The dashboard's script",
        {"type": "string"},
        access="open",
        errors=(500,),
        content_type="text/javascript",
    ),
    Operation(
        "get",
        "/dashboard/dashboard.css",
        "dashboardStyle",
        "The dashboard's style",
        {"type": "string"},
        access="open",
        errors=(500,),
        content_type="text/css",
    ),
)

#: The request bodies' schemas (``components/schemas``).
BODIES: dict[str, dict[str, Any]] = {
    "TaskRequest": fields.task_request_schema(),
    "BatchRequest": fields.batch_request_schema(),
    "MemorySearchRequest": fields.search_request_schema(),
}
