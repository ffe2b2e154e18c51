"""The OpenAPI 3.1 document of the HTTP API, built from ``streams.serve.contract``."""

from __future__ import annotations

from http import HTTPStatus
from importlib import metadata
from typing import Any

from streams.serve.consistency import STALENESS_HEADER, TOKEN_HEADER, TOKEN_PATTERN
from streams.serve.contract import responses
from streams.serve.contract.operations import BODIES, OPERATIONS, Operation
from streams.serve.contract.params import openapi_parameter

HEADERS = {
    # Every answer carries the request's id (the client's own X-Request-ID when plausible).
    "X-Request-ID": {"description": "the request's id", "required": True, "schema": {"type": "string"}},
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    STALENESS_HEADER: {
        "description": "how far behind the stream the answering process was, in ms: 0 when it had applied "
        "everything its latest fetches of the tables' changelogs reported, else the time since it last had "
        "(always 0 from a processing worker, which answers from its own stores); docs/read-replicas.md",
        "required": False,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    TOKEN_HEADER: {
        "description": "the write's consistency token (p<partition>:<offset> joined by dots): send it with a "
        "GET to read nothing older than this write",
        "required": True,
        "schema": {"type": "string", "pattern": TOKEN_PATTERN},
    },
}
#: The operations whose accepted answer carries a consistency token.
_WRITES = frozenset({"createTask", "createTasks"})
_RETRIED = {429, 503}

DESCRIPTION = """\
Agents, tasks and memory of BlackRoad as an event-streaming pipeline.

Reads may be served by read replicas. Every GET answer says how far behind the stream it is
(`X-Staleness-Ms`); a write answers with a consistency token (`X-Consistency-Token`, and
`consistency_token` in its body), which any GET that reads the tables may carry in the request
header `X-Consistency-Token` to be answered only once the process serving it has applied that
write: a token naming a partition the tasks topic lacks is a 400, one not applied within
`BLACKROAD_CONSISTENCY_WAIT` seconds a 503 with `Retry-After` (docs/read-replicas.md). It is
not listed as a parameter: a token no write ever reached is always answered 503. A lookup
(an agent, its memory or its verification, a task) carrying `X-Consistency: current` is
answered from the owner's tables: a read replica passes it to its worker.

A POST's tasks belong to the request's W3C trace (its `traceparent` header, or a new trace),
which the answer names in its `traceresponse` header (docs/tracing.md).

Every error answers with the envelope `{"error": {"code", "message", "details"}, "request_id"}`,
including a path no view serves (404), a method a view does not take (405) and a request the
HTTP parser refuses (400). Writes need `Authorization: Bearer <token>` when API tokens are
configured (reads too with `BLACKROAD_API_READS=token`).
"""


def _answer(description: str, schema: dict[str, Any], content_type: str, status: int) -> dict[str, Any]:
    named = ("X-Request-ID", "Retry-After") if status in _RETRIED else ("X-Request-ID",)
    headers = {name: {"$ref": f"#/components/headers/{name}"} for name in named}
    return {"description": description, "headers": headers, "content": {content_type: {"schema": schema}}}


def _operation(op: Operation) -> dict[str, Any]:
    answers = {str(op.ok_status): _answer(HTTPStatus(op.ok_status).phrase, op.ok, op.content_type, op.ok_status)}
    for status in op.answers:
        answers[str(status)] = _answer(HTTPStatus(status).phrase, op.ok, op.content_type, status)
    for status in op.errors:
        answers[str(status)] = _answer(HTTPStatus(status).phrase, responses.ref("Error"), "application/json", status)
    if op.method == "get":
        for answer in answers.values():
            answer["headers"][STALENESS_HEADER] = {"$ref": f"#/components/headers/{STALENESS_HEADER}"}
    if op.operation_id in _WRITES:
        answers[str(op.ok_status)]["headers"][TOKEN_HEADER] = {"$ref": f"#/components/headers/{TOKEN_HEADER}"}
    document: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "responses": answers,
        # open: no token asked; read: one when BLACKROAD_API_READS=token; write: one when tokens are on.
        "security": {"open": [], "read": [{"bearerAuth": []}, {}], "write": [{"bearerAuth": []}]}[op.access],
    }
    if op.parameters:
        document["parameters"] = [openapi_parameter(parameter) for parameter in op.parameters]
    if op.body is not None:
        document["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": responses.ref(op.body)}},
        }
    return document


def package_version() -> str:
    try:
        return metadata.version("blackroad-streams")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_document(version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "BlackRoad streams", "version": version, "description": DESCRIPTION},
        "paths": paths,
        "components": {
            "schemas": {**responses.COMPONENTS, **BODIES},
            "headers": HEADERS,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }
