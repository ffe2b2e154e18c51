"""The HTTP API's contract: the OpenAPI document a worker serves, schemathesis run against a
live worker with it, and errors in the envelope at every level (router, HTTP parser)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import schemathesis
from aiohttp import web

from schemas import domain
from streams.app import create_app
from streams.runtime.broker import free_port
from streams.runtime.settings import Settings
from streams.serve.contract.fields import TASK_FIELDS, task_request_schema
from streams.serve.contract.operations import OPERATIONS, TASK_STATUS, TASKS_LIMIT
from streams.serve.errors import ApiError
from streams.serve.http_errors import EnvelopeRunner, router_errors_in_envelope
from streams.serve.request_bodies import parse_task_request
from tests.harness import Deployment

TOKEN = "contract-token-0123456789abcdef"
#: schemathesis's checks the suite holds the API to.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "unsupported_method",
)
#: Expected statuses of the checks that take them (a body over the worker's limit is a 413).
CONFIG = Path(__file__).with_name("schemathesis.toml")


def _assert_envelope(status: int, headers: dict[str, str], body: Any, expected_status: int, code: str) -> None:
    assert status == expected_status, body
    assert headers["content-type"].startswith("application/json"), headers
    assert isinstance(body, dict) and set(body) == {"error", "request_id"}, body
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code and body["error"]["message"]
    assert body["request_id"] == headers["x-request-id"]


def _raw_exchange(port: int, *parts: bytes, pause: float = 0.0) -> tuple[int, dict[str, str], Any]:
    """Send ``parts`` (``pause`` seconds apart) as they are and read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for index, part in enumerate(parts):
            if index:
                time.sleep(pause)
            sock.sendall(part)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, orjson.loads(body)


MALFORMED = {
    "not HTTP": b"HELLO THERE\r\n\r\n",
    "bad request line": b"GET /v1/stats HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    "header without a colon": b"GET /v1/stats HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
    "header line too long": b"GET /v1/stats HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n",
    "length and chunked": (
        b"POST /v1/memory/search HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    ),
    "bad chunk size": (
        b"POST /v1/memory/search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n"
    ),
}


def test_malformed_http_gets_the_error_envelope(deployment: Deployment) -> None:
    """Requests aiohttp's HTTP parser refuses are answered 400 in the envelope, not in plain text."""
    worker = deployment.worker().start().wait_ready()
    for what, request in MALFORMED.items():
        status, headers, body = _raw_exchange(worker.port, request)
        _assert_envelope(status, headers, body, 400, "invalid_request")
        assert "malformed HTTP request" in body["error"]["message"], what
    # Chunked framing that breaks once the view reads the body.
    status, headers, body = _raw_exchange(
        worker.port,
        b"POST /v1/memory/search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"5\r\n{}\r\nZZ\r\n",
        pause=0.3,
    )
    _assert_envelope(status, headers, body, 400, "invalid_request")
    # The worker still serves.
    assert worker.get("/healthz") == (200, {"status": "alive"})


def test_router_errors_get_the_error_envelope(deployment: Deployment) -> None:
    worker = deployment.worker().start().wait_ready()
    status, body, headers = worker.exchange("GET", "/v2/nothing")
    _assert_envelope(status, _lower(headers), body, 404, "not_found")
    for method, path in (("DELETE", "/v1/tasks"), ("PUT", "/v1/stats"), ("GET", "/v1/batch")):
        status, body, headers = worker.exchange(method, path)
        _assert_envelope(status, _lower(headers), body, 405, "invalid_request")
    # HEAD of a view with no GET: 405 too (no body, as for every HEAD).
    status, _, headers = worker.exchange("HEAD", "/v1/batch")
    assert status == 405 and _lower(headers)["content-type"].startswith("application/json")


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def test_openapi_document_describes_every_route(deployment: Deployment) -> None:
    """``/openapi.json`` is a valid OpenAPI 3.1 document with an operation for each route the
    app serves (a view added without a contract entry fails here), open to read."""
    deployment.env.update(BLACKROAD_API_TOKENS=TOKEN, BLACKROAD_API_READS="token", BLACKROAD_MEMORY_SEARCH="off")
    worker = deployment.worker().start()
    worker.token = TOKEN
    worker.wait_ready()
    worker.token = None
    status, document = worker.get("/openapi.json")
    assert status == 200 and document["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(document).validate()
    assert document["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    described = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    app = create_app(Settings(data_dir=deployment.tmp / "routes").for_cluster(1))
    # aiohttp adds HEAD beside each route; it answers as GET does (405 where there is no GET).
    routes = {(route.method, route.resource.canonical) for route in app.web.web_app.router.routes()}
    assert described == {(method, path) for method, path in routes if method != "HEAD"}
    # The security the document states is what the worker does: with reads needing a token
    # too, every operation but the open ones refuses a request without one.
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert "200" in operation["responses"] or "202" in operation["responses"], (method, path)
            concrete = path.replace("{agent_id}", "agent_a_001").replace("{task_id}", "task_a")
            status, _, _ = worker.exchange(method.upper(), concrete, {} if method == "post" else None)
            if operation["security"] == []:
                assert status != 401, (method, path)
            else:
                assert status == 401 and "401" in operation["responses"], (method, path, status)


@pytest.mark.parametrize("broker", ["tansu"], indirect=True)
def test_schemathesis_finds_no_failures(deployment: Deployment, tmp_path: Path) -> None:
    """schemathesis, with the document the worker serves, against that worker (with an API
    token, so the writes are exercised): every check passes."""
    deployment.env.update(BLACKROAD_API_TOKENS=TOKEN)
    worker = deployment.worker().start()
    worker.wait_ready()
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file",
        str(CONFIG),
        "run",
        f"{worker.url}/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        "25",
        "--seed",
        "20261204",
        "--workers",
        "2",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--request-timeout",
        "10",
        "--report-dir",
        str(tmp_path / "report"),
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-30_000:] + done.stderr[-5_000:] + worker.log()
    # Every operation read was tested (a document schemathesis read none from passes vacuously);
    # it leaves out the one serving the document itself.
    selected = re.search(r"Operations:\s+(\d+) selected / (\d+) total", done.stdout)
    tested = re.search(r"Tested:\s+(\d+)", done.stdout)
    assert selected is not None and tested is not None, done.stdout
    assert int(selected.group(1)) == int(selected.group(2)) == int(tested.group(1)) == len(OPERATIONS) - 1


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({}, 20),
        ({"limit": "7"}, 7),
        ({"limit": "100"}, 100),
        ({"limit": "0"}, None),
        ({"limit": "101"}, None),
        ({"limit": "+5"}, None),
        ({"limit": " 5"}, None),
        ({"limit": "5_0"}, None),
        ({"limit": "\u0665"}, None),  # an Arabic-Indic five: int() takes it
        ({"limit": "9" * 5000}, None),
    ],
)
def test_integer_parameters_read_what_the_document_says(query: dict[str, str], expected: int | None) -> None:
    schema = TASKS_LIMIT.schema()
    assert (schema["minimum"], schema["maximum"], schema["default"]) == (1, 100, 20)
    if expected is None:
        with pytest.raises(ApiError) as refused:
            TASKS_LIMIT.read(query)
        assert refused.value.status == 400 and refused.value.details == {"field": "limit"}
    else:
        assert TASKS_LIMIT.read(query) == expected


def test_choice_parameters_take_their_enum_and_map_variants() -> None:
    assert set(TASK_STATUS.schema()["enum"]) == {*domain.TASK_STATUSES, *domain.TASK_STATUS_VARIANTS, ""}
    assert TASK_STATUS.read({"status": "running"}) == "in_progress"
    assert TASK_STATUS.read({"status": "queued"}) == "queued"
    # Not sent, or sent empty: no filter.
    assert TASK_STATUS.read({}) is None and TASK_STATUS.read({"status": ""}) is None
    for refused in ("RUNNING", "sleeping", " "):
        with pytest.raises(ApiError):
            TASK_STATUS.read({"status": refused})


def test_task_bodies_are_checked_with_the_documented_fields() -> None:
    schema = task_request_schema()
    assert set(schema["properties"]) == set(TASK_FIELDS) and schema["additionalProperties"] is False
    assert schema["required"] == ["agent_id", "kind"]
    # JSON does not tell 5 from 5.0: an integral number is an integer, as the schema says.
    event = parse_task_request({"agent_id": "agent_a_001", "kind": "inference", "priority": 1.0, "deadline": 9.0})
    assert (event.priority, event.deadline_ms) == ("high", 9)
    for bad in ({"deadline": 9.5}, {"priority": 1.5}, {"colour": "red"}, {"deadline": True}):
        with pytest.raises(ApiError):
            parse_task_request({"agent_id": "agent_a_001", "kind": "inference", **bad})


async def test_an_exception_no_view_caught_is_a_500_in_the_envelope() -> None:
    """The server's own request handler answers what escapes every view and middleware in the
    envelope too (the views catch their own; this is the last resort)."""

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("escaped")

    app = web.Application(middlewares=[router_errors_in_envelope])
    app.router.add_get("/broken", broken)
    runner = EnvelopeRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/broken") as answer:
            body = await answer.json()
            _assert_envelope(answer.status, _lower(dict(answer.headers)), body, 500, "internal_error")
    finally:
        await runner.cleanup()
