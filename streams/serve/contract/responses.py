"""JSON Schemas of what the views answer: the error envelope and each view's document.

Documents list the fields every answer has (``required``) and leave room for more
(``additionalProperties`` is not closed) so a field added later is not a breaking change.
"""

from __future__ import annotations

from typing import Any

from schemas import domain
from streams.memory_search.index import TIERS
from streams.serve.errors import STATUS_OF_CODE

Schema = dict[str, Any]

INTEGER: Schema = {"type": "integer"}
NUMBER: Schema = {"type": "number"}
STRING: Schema = {"type": "string"}
BOOLEAN: Schema = {"type": "boolean"}
OBJECT: Schema = {"type": "object"}
MAYBE_INTEGER: Schema = {"type": ["integer", "null"]}
MAYBE_NUMBER: Schema = {"type": ["number", "null"]}
MAYBE_STRING: Schema = {"type": ["string", "null"]}


def document(properties: dict[str, Schema], optional: tuple[str, ...] = ()) -> Schema:
    """An object with ``properties``, each one always there except the ``optional`` ones."""
    return {
        "type": "object",
        "required": [name for name in properties if name not in optional],
        "properties": properties,
    }


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


ERROR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["error", "request_id"],
    "properties": {
        "error": {
            "type": "object",
            "additionalProperties": False,
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "string", "enum": list(STATUS_OF_CODE)},
                "message": STRING,
                "details": OBJECT,
            },
        },
        "request_id": STRING,
    },
}

AGENT = document(
    {
        "id": STRING,
        "name": STRING,
        "type": {"type": "string", "enum": sorted(domain.AGENT_TYPES)},
        "status": {"type": "string", "enum": list(domain.AGENT_STATUSES)},
        "config": OBJECT,
        "stats": document(
            {
                "tasks_completed": INTEGER,
                "tasks_failed": INTEGER,
                "tasks_dead": INTEGER,
                "avg_response_ms": NUMBER,
                "peak_concurrent_tasks": INTEGER,
                "last_activity": MAYBE_INTEGER,
            }
        ),
        "recent_tasks": {"type": "array", "items": ref("Task")},
        "created_at": INTEGER,
        "updated_at": INTEGER,
    },
    optional=("recent_tasks",),
)

TASK = document(
    {
        "id": STRING,
        "agent_id": STRING,
        "title": STRING,
        "description": STRING,
        "kind": STRING,
        "priority": {"type": "string", "enum": list(domain.PRIORITIES)},
        "payload": OBJECT,
        "status": {"type": "string", "enum": list(domain.TASK_STATUSES)},
        "result": {},
        "error": {},
        "attempts": INTEGER,
        "created_at": INTEGER,
        "started_at": MAYBE_INTEGER,
        "completed_at": MAYBE_INTEGER,
        "deadline": MAYBE_INTEGER,
        "metadata": OBJECT,
        # The W3C trace id the task came with (docs/tracing.md); null: untraced.
        "trace_id": MAYBE_STRING,
    }
)

MEMORY_ENTRY = document(
    {
        "id": STRING,
        "agent_id": STRING,
        "key": STRING,
        "content": STRING,
        "memory_type": STRING,
        "role": MAYBE_STRING,
        "importance": NUMBER,
        "access_count": INTEGER,
        "last_accessed": MAYBE_INTEGER,
        "tier": {"type": "string", "enum": list(TIERS)},
        "tokens": INTEGER,
        "seq": MAYBE_INTEGER,
        "hash": STRING,
        "prev_hash": STRING,
        "created_at": INTEGER,
        "expires_at": MAYBE_INTEGER,
    }
)

_TIER_COUNTS = document({tier: INTEGER for tier in TIERS})

AGENT_LIST = document(
    {"agents": {"type": "array", "items": ref("Agent")}, "total": INTEGER, "limit": INTEGER, "offset": INTEGER}
)
WORKING_MEMORY = document(
    {
        "agent_id": STRING,
        "tier": {"type": "string", "enum": list(TIERS)},
        "entries": {"type": "array", "items": ref("MemoryEntry")},
        # Working memory's own answer; the other tiers' carry "total" instead.
        "tiers": OBJECT,
        "tokens": INTEGER,
        "written": INTEGER,
        "head": STRING,
        "total": INTEGER,
    },
    optional=("tiers", "tokens", "written", "head", "total"),
)
MEMORY_VERIFY = document(
    {
        "agent_id": STRING,
        "valid": BOOLEAN,
        "head": STRING,
        "written": INTEGER,
        "verified": INTEGER,
        "first_broken": MAYBE_STRING,
        "problems": {"type": "array", "items": STRING},
    }
)
SEARCH_RESULTS = document(
    {
        "results": {
            "type": "array",
            "items": document({"id": STRING, "key": STRING, "content": STRING, "score": NUMBER, "metadata": OBJECT}),
        },
        "total": INTEGER,
        "model": STRING,
    }
)
_WORKER_MEMORY = document(
    {"entries": _TIER_COUNTS, "index_bytes": INTEGER, "model": STRING, "embedded": INTEGER, "ready": BOOLEAN}
)
MEMORY_STATS = document(
    {
        "entries": _TIER_COUNTS,
        "total": INTEGER,
        "index_bytes": INTEGER,
        "embedded": INTEGER,
        "embedding_cache_hits": INTEGER,
        "vectors_reused": INTEGER,
        "vectors_stored": INTEGER,
        "accesses_recorded": INTEGER,
        "accesses_dropped": INTEGER,
        "model": STRING,
        "ready": BOOLEAN,
        "workers": {"type": "object", "additionalProperties": _WORKER_MEMORY},
    }
)
_TASKS = {"type": "array", "items": ref("Task")}
AGENT_TASK_PAGE = document({"agent_id": STRING, "tasks": _TASKS, "limit": INTEGER, "next_before": MAYBE_STRING})
TASK_FEED_PAGE = document({"tasks": _TASKS, "limit": INTEGER, "next_since": MAYBE_STRING})
QUEUED = document({"id": STRING, "status": {"const": "queued"}})
#: A write's consistency token (streams.serve.consistency).
CONSISTENCY_TOKEN: Schema = {"type": "string", "pattern": r"^p[0-9]{1,4}:[0-9]{1,19}(\.p[0-9]{1,4}:[0-9]{1,19})*$"}
TASK_QUEUED = document({"id": STRING, "status": {"const": "queued"}, "consistency_token": CONSISTENCY_TOKEN})
BATCH_QUEUED = document({"results": {"type": "array", "items": ref("Queued")}, "consistency_token": CONSISTENCY_TOKEN})
ALIVE = document({"status": {"const": "alive"}})
READY = document(
    {
        "status": {"type": "string", "enum": ["ready", "not_ready"]},
        "checks": {"type": "object", "additionalProperties": BOOLEAN},
    }
)
_PERCENTILES = document({"p50": MAYBE_NUMBER, "p95": MAYBE_NUMBER, "p99": MAYBE_NUMBER})
STATS = document(
    {
        "active_agents": INTEGER,
        "pending_tasks": INTEGER,
        "in_progress_tasks": INTEGER,
        "completed_tasks": INTEGER,
        "failed_tasks": INTEGER,
        "dead_tasks": INTEGER,
        "tasks_per_minute": INTEGER,
        "memory_ops_per_second": NUMBER,
        "task_latency_ms": _PERCENTILES,
        "handler_latency_ms": _PERCENTILES,
        "partitions_reporting": INTEGER,
        "as_of": INTEGER,
        # The process that answered and how far behind the stream it was (docs/read-replicas.md).
        "served_by": document(
            {
                "process": {"type": "string", "enum": ["worker", "reader"]},
                "url": STRING,
                "staleness_ms": INTEGER,
                "lag_records": INTEGER,
            }
        ),
    }
)

#: The named schemas (``components/schemas``).
COMPONENTS: dict[str, Schema] = {
    "Error": ERROR,
    "Agent": AGENT,
    "Task": TASK,
    "MemoryEntry": MEMORY_ENTRY,
    "Queued": QUEUED,
}
