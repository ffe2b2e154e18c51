"""The fields of the JSON request bodies: their types (checked by ``streams.serve.request_bodies``
on the ingest path, exactly and cheaply) and their JSON Schemas, built from the same limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas import domain, wire
from streams.memory_search.index import TIERS
from streams.runtime.settings import MAX_BATCH_TASKS
from streams.serve.contract.params import anchored

#: The largest request body read (413 above).
MAX_BODY_BYTES = 256 * 1024
MAX_BATCH_REQUESTS = MAX_BATCH_TASKS
MAX_QUERY_CHARS = 4000
MAX_SEARCH_LIMIT = 100
DEFAULT_SEARCH_LIMIT = 10


@dataclass(frozen=True)
class Field:
    #: What ``isinstance`` accepts (the finer checks, e.g. an id's shape, follow it).
    types: type | tuple[type, ...]
    schema: dict[str, Any]
    required: bool = False


_FREE_FORM = {"type": "object", "description": f"any JSON object, nested at most {wire.MAX_DEPTH} levels"}
_TIME_MS = {"type": "integer", "minimum": 0, "maximum": wire.MAX_TIME_MS}

TASK_FIELDS: dict[str, Field] = {
    "title": Field(str, {"type": "string", "maxLength": wire.MAX_TEXT}),
    "description": Field(str, {"type": "string", "maxLength": wire.MAX_TEXT}),
    "agent_id": Field(
        str, {"type": "string", "maxLength": domain.MAX_AGENT_ID, "pattern": anchored(domain.AGENT_ID)}, True
    ),
    "priority": Field(
        (str, int, float),
        {
            "description": "a name (case does not matter), a variant of one, or its number; normal if left out",
            "anyOf": [
                {"type": "string", "enum": [*domain.PRIORITIES, *domain.PRIORITY_VARIANTS]},
                {"type": "integer", "enum": sorted(domain.PRIORITIES.values())},
            ],
        },
    ),
    "kind": Field(str, {"type": "string", "enum": sorted(domain.TASK_KINDS)}, True),
    "payload": Field(dict, _FREE_FORM),
    "deadline": Field((int, float, type(None)), {**_TIME_MS, "type": ["integer", "null"]}),
    "metadata": Field(dict, _FREE_FORM),
    "agent_type": Field(str, {"type": "string", "enum": sorted(domain.AGENT_TYPES)}),
    "id": Field(
        str,
        {
            "type": "string",
            "maxLength": domain.MAX_TASK_ID,
            "pattern": anchored(domain.TASK_ID),
            "description": "the task's id, made up when left out; a retry with the same id is counted once",
        },
    ),
}
#: Fields of JSON numbers that must be integers: JSON (and JSON Schema) does not tell ``5`` from
#: ``5.0``, so an integral float is taken as the integer.
TASK_INTEGERS = ("priority", "deadline")
TASK_REQUIRED = tuple(name for name, field in TASK_FIELDS.items() if field.required)
TASK_FIELD_NAMES = frozenset(TASK_FIELDS)

SEARCH_FILTERS: dict[str, dict[str, Any]] = {
    "agent_id": {"type": ["string", "null"], "maxLength": domain.MAX_AGENT_ID, "pattern": anchored(domain.AGENT_ID)},
    "memory_type": {"type": ["string", "null"], "enum": [*sorted(domain.MEMORY_TYPES), None]},
    "tier": {"type": ["string", "null"], "enum": [*TIERS, None]},
}
SEARCH_FIELDS: dict[str, dict[str, Any]] = {
    "query": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS, "pattern": r"\S"},
    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_SEARCH_LIMIT, "default": DEFAULT_SEARCH_LIMIT},
    "threshold": {
        "type": ["number", "null"],
        "minimum": -1,
        "maximum": 1,
        "description": "the least cosine similarity of a result; the model's own when left out",
    },
    "filters": {
        "type": ["object", "null"],
        "additionalProperties": False,
        "properties": SEARCH_FILTERS,
    },
}


def task_request_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": list(TASK_REQUIRED),
        "properties": {name: field.schema for name, field in TASK_FIELDS.items()},
    }


def batch_request_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["requests"],
        "properties": {
            "requests": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_BATCH_REQUESTS,
                "items": {"$ref": "#/components/schemas/TaskRequest"},
            }
        },
    }


def search_request_schema() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["query"], "properties": SEARCH_FIELDS}
