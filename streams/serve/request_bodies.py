"""Reading and validating the JSON request bodies, with the fields and limits of
``streams.serve.contract.fields`` (the same the OpenAPI document describes)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from schemas import domain, wire
from schemas.wire import WireError
from streams.serve.contract.fields import (
    DEFAULT_SEARCH_LIMIT,
    MAX_BATCH_REQUESTS,
    MAX_BODY_BYTES,
    MAX_QUERY_CHARS,
    MAX_SEARCH_LIMIT,
    SEARCH_FIELDS,
    SEARCH_FILTERS,
    TASK_FIELD_NAMES,
    TASK_FIELDS,
    TASK_INTEGERS,
    TASK_REQUIRED,
)
from streams.serve.errors import ApiError, invalid

_TASK_TYPES = [(name, field.types) for name, field in TASK_FIELDS.items()]
_SEARCH_FIELD_NAMES = frozenset(SEARCH_FIELDS)
_FILTER_CHOICES = {
    name: frozenset(schema["enum"]) - {None} for name, schema in SEARCH_FILTERS.items() if "enum" in schema
}


#: Tasks of a batch request validated in one turn of the event loop (:func:`parse_batch`).
PARSE_SLICE = 100


def _too_large() -> ApiError:
    return ApiError("invalid_request", f"body larger than {MAX_BODY_BYTES} bytes", 413)


async def read_json(request: Any) -> Any:
    """The request's body, decoded: 413 when over :data:`MAX_BODY_BYTES`, 400 when it is not
    JSON or its framing is broken (a bad chunk, a body shorter than its Content-Length)."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _too_large()
    try:
        body = await request.content.read(MAX_BODY_BYTES + 1)
    except (RequestPayloadError, HttpProcessingError) as exc:
        raise ApiError("invalid_request", f"the request body is malformed: {exc}") from None
    if len(body) > MAX_BODY_BYTES:
        raise _too_large()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError("invalid_request", f"malformed JSON: {exc}") from None


def parse_task_request(body: Any, where: str = "body") -> wire.TaskEvent:
    """Validate one task request (HTTP JSON) and build its event."""
    if not isinstance(body, dict):
        raise ApiError("invalid_request", f"{where} must be a JSON object")
    if not body.keys() <= TASK_FIELD_NAMES:
        unknown = sorted(set(body) - TASK_FIELD_NAMES)
        raise ApiError("invalid_request", f"unknown fields in {where}: {unknown}", details={"fields": unknown})
    for name, expected in _TASK_TYPES:
        if name in body and not isinstance(body[name], expected):
            raise ApiError("invalid_request", f"{where}.{name} has the wrong type", details={"field": name})
    for required in TASK_REQUIRED:
        if required not in body:
            raise ApiError("invalid_request", f"{where}.{required} is required", details={"field": required})
    for name in TASK_INTEGERS:
        value = body.get(name)
        if type(value) is float and value.is_integer():
            body[name] = int(value)
    wire_map = {
        "v": wire.SCHEMA_VERSION,
        "type": wire.TASK_CREATED,
        "ts": wire.now_ms(),
        # An id given is validated as sent (an empty one too); only a missing one is made up.
        "task_id": body["id"] if "id" in body else domain.new_id("task"),
        **{k: v for k, v in body.items() if k != "id"},
    }
    try:
        return wire.task_from_map(wire_map)
    except WireError as exc:
        raise ApiError("invalid_request", f"{where}: {exc}") from None


async def parse_batch(body: Any, charge: Callable[[int], None] | None = None) -> list[wire.TaskEvent]:
    """Validate a ``POST /v1/batch`` body (``{"requests": [...]}``): one bad task refuses all.

    ``charge(n)``, when given, is called with the number of tasks before any is validated
    (it raises to refuse the request, e.g. over the client's rate limit): a client over its
    limit is refused without the work of validating its tasks. The tasks are validated
    :data:`PARSE_SLICE` at a time, with a turn of the event loop between slices: a request
    of a thousand tasks (some 5 ms) then does not hold up other clients' requests and the
    tasks in processing for its whole length.
    """
    if not isinstance(body, dict) or body.keys() != {"requests"} or not isinstance(body["requests"], list):
        raise ApiError("invalid_request", 'body must be {"requests": [...]}')
    requests = body["requests"]
    if not 1 <= len(requests) <= MAX_BATCH_REQUESTS:
        raise ApiError("invalid_request", f"requests must hold 1 to {MAX_BATCH_REQUESTS} tasks")
    if charge is not None:
        charge(len(requests))
    events: list[wire.TaskEvent] = []
    for start in range(0, len(requests), PARSE_SLICE):
        if start:
            await asyncio.sleep(0)
        piece = requests[start : start + PARSE_SLICE]
        events.extend(parse_task_request(r, f"requests[{i}]") for i, r in enumerate(piece, start))
    return events


class MemorySearch:
    """A validated ``POST /v1/memory/search`` request."""

    def __init__(self, query: str, limit: int, threshold: float | None, filters: dict[str, str]) -> None:
        self.query = query
        self.limit = limit
        self.threshold = threshold
        self.filters = filters
        self.vector: Any = None


def parse_search(body: Any) -> MemorySearch:
    """Validate a memory search request (``{query, limit, threshold, filters}``)."""
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "body must be a JSON object")
    unknown = sorted(set(body) - _SEARCH_FIELD_NAMES)
    if unknown:
        raise ApiError("invalid_request", f"unknown fields in body: {unknown}", details={"fields": unknown})
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise invalid("query", "query must be a non-empty string")
    if len(query) > MAX_QUERY_CHARS:
        raise invalid("query", f"query is longer than {MAX_QUERY_CHARS} characters")
    limit = body.get("limit", DEFAULT_SEARCH_LIMIT)
    if type(limit) is float and limit.is_integer():
        limit = int(limit)
    if type(limit) is not int or not 1 <= limit <= MAX_SEARCH_LIMIT:
        raise invalid("limit", f"limit must be an integer from 1 to {MAX_SEARCH_LIMIT}")
    threshold = body.get("threshold")  # None: the model's own (Embedder.default_threshold)
    if threshold is not None and (type(threshold) not in (int, float) or not -1.0 <= threshold <= 1.0):
        raise invalid("threshold", "threshold must be a number from -1 to 1")
    filters = body.get("filters")
    if filters is None:
        filters = {}
    if not isinstance(filters, dict):
        raise invalid("filters", "filters must be a JSON object")
    unknown = sorted(set(filters) - set(SEARCH_FILTERS))
    if unknown:
        raise ApiError(
            "invalid_request",
            f"unknown filters: {unknown}; known: {sorted(SEARCH_FILTERS)}",
            details={"fields": unknown},
        )
    chosen = {name: value for name, value in filters.items() if value is not None}
    for name, value in chosen.items():
        if not isinstance(value, str):
            raise invalid(f"filters.{name}", f"filters.{name} must be a string")
        choices = _FILTER_CHOICES.get(name)
        if choices is not None and value not in choices:
            raise invalid(f"filters.{name}", f"unknown {name}; expected one of {sorted(choices)}")
    agent_id = chosen.get("agent_id")
    if agent_id is not None and (len(agent_id) > domain.MAX_AGENT_ID or not domain.AGENT_ID.fullmatch(agent_id)):
        raise invalid("filters.agent_id", "filters.agent_id is not a valid agent id")
    return MemorySearch(query, limit, None if threshold is None else float(threshold), chosen)
