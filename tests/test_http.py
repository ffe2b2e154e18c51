"""HTTP ingress and validation against a running worker."""

from __future__ import annotations

import asyncio
import gzip
import time
import urllib.request

import orjson
from faust.types import TP

from schemas import wire
from streams.processing.transport import fetch_highwaters
from streams.serve import ingress
from tests.factories import nested
from tests.harness import Deployment, consume_all, wait_until


def _topic_size(deployment: Deployment) -> int:
    tps = [TP(deployment.topic("tasks"), p) for p in range(deployment.partitions)]
    return sum(asyncio.run(fetch_highwaters(deployment.bootstrap, tps)).values())


def _assert_envelope(status: int, body: object, expected_status: int, code: str) -> None:
    assert status == expected_status, body
    assert isinstance(body, dict) and set(body) == {"error", "request_id"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["request_id"].startswith("req_")


def test_post_task_and_batch_are_processed(deployment: Deployment) -> None:
    worker = deployment.worker().start().wait_ready()
    status, body = worker.post(
        "/v1/tasks",
        {
            "agent_id": "agent_alice_001",
            "kind": "tool_execution",
            "title": "hi",
            "payload": {"tool": "upper", "input": "hey"},
            "priority": "medium",
        },
    )
    assert status == 202 and body["status"] == "queued" and body["id"].startswith("task_")
    single = body["id"]
    status, body = worker.post(
        "/v1/batch",
        {
            "requests": [
                {"agent_id": f"agent_bob_{i:03d}", "kind": "code_analysis", "payload": {"code": "def f():\n  pass"}}
                for i in range(5)
            ]
        },
    )
    assert status == 202 and len(body["results"]) == 5
    ids = [r["id"] for r in body["results"]]
    wait_until(lambda: worker.get(f"/v1/tasks/{single}")[1].get("status") == "completed", 30, what="single task")
    status, task = worker.get(f"/v1/tasks/{single}")
    assert task["result"] == {"tool": "upper", "output": "HEY"}
    assert task["priority"] == "normal"
    for task_id in ids:
        wait_until(lambda t=task_id: worker.get(f"/v1/tasks/{t}")[1].get("status") == "completed", 30, what=task_id)
    _, alice = worker.get("/v1/agents/agent_alice_001")
    assert alice["type"] == "worker" and alice["name"] == "ALICE"


def test_a_large_batch_reaches_each_partition_directly_in_slices(deployment: Deployment) -> None:
    """A batch of 250 tasks goes to the broker as records of one partition each, at most 100
    tasks a record, so no worker forwards any of them and no record holds the whole batch."""
    worker = deployment.worker().start().wait_ready()
    requests = [{"agent_id": f"agent_slice_{i:03d}", "kind": "tool_execution"} for i in range(250)]
    status, body = worker.post("/v1/batch", {"requests": requests})
    assert status == 202 and len(body["results"]) == 250
    ids = [result["id"] for result in body["results"]]
    wait_until(lambda: worker.stats()["completed_tasks"] == 250, 30, what="the batch's tasks")
    records = consume_all(
        deployment.bootstrap, deployment.topic("tasks"), deployment.partitions, _topic_size(deployment)
    )
    partition_for = wire.Partitioner(deployment.partitions)
    seen: list[str] = []
    for record in records:
        events, refused, _ = wire.decode_record(record.value)
        assert not refused and 1 <= len(events) <= ingress.SLICE
        assert {partition_for(event.agent_id.encode()) for event in events} == {record.partition}
        seen.extend(event.task_id for event in events)
    assert sorted(seen) == sorted(ids)
    assert len(records) >= 250 // ingress.SLICE + 1


def test_bad_requests_get_the_error_envelope_and_reach_no_topic(deployment: Deployment) -> None:
    worker = deployment.worker().start().wait_ready()
    before = _topic_size(deployment)
    _assert_envelope(*worker.post("/v1/tasks", b"{not json"), 400, "invalid_request")
    _assert_envelope(
        *worker.post("/v1/tasks", {"agent_id": "agent_a_001", "kind": "inference", "colour": "red"}),
        400,
        "invalid_request",
    )
    _assert_envelope(
        *worker.post("/v1/tasks", {"agent_id": "agent_a_001", "kind": "inference", "payload": "text"}),
        400,
        "invalid_request",
    )
    _assert_envelope(*worker.post("/v1/tasks", {"agent_id": "bob", "kind": "inference"}), 400, "invalid_request")
    _assert_envelope(*worker.post("/v1/tasks", {"agent_id": "agent_a_001", "kind": "dancing"}), 400, "invalid_request")
    _assert_envelope(
        *worker.post("/v1/tasks", {"agent_id": "agent_a_001", "kind": "inference", "priority": "urgent"}),
        400,
        "invalid_request",
    )
    _assert_envelope(*worker.post("/v1/tasks", {"kind": "inference"}), 400, "invalid_request")
    _assert_envelope(*worker.post("/v1/tasks", [1, 2]), 400, "invalid_request")
    big = {"agent_id": "agent_a_001", "kind": "inference", "description": "x" * 300_000}
    _assert_envelope(*worker.post("/v1/tasks", big), 413, "invalid_request")
    # One bad request in a batch rejects the whole batch.
    batch = {"requests": [{"agent_id": "agent_a_001", "kind": "inference"}, {"agent_id": "agent_a_001", "kind": 7}]}
    status, body = worker.post("/v1/batch", batch)
    _assert_envelope(status, body, 400, "invalid_request")
    assert "requests[1]" in body["error"]["message"]
    _assert_envelope(*worker.post("/v1/batch", {"requests": []}), 400, "invalid_request")
    _assert_envelope(*worker.get("/v1/tasks/task_unknown"), 404, "not_found")
    _assert_envelope(*worker.get("/v1/agents/agent_nobody_001"), 404, "not_found")
    _assert_envelope(*worker.get("/v1/agents/agent_nobody_001/memory"), 404, "not_found")
    _assert_envelope(*worker.get("/v1/agents?limit=500"), 400, "invalid_request")
    _assert_envelope(*worker.get("/v1/agents?status=sleeping"), 400, "invalid_request")
    _assert_envelope(*worker.get("/v1/agents?offset=-1"), 400, "invalid_request")
    assert _topic_size(deployment) == before


def _deep_json(levels: int) -> bytes:
    """JSON text nesting ``levels`` lists (orjson writes at most 254 levels, so by hand)."""
    return b"[" * levels + b"]" * levels


def test_requests_the_views_could_not_serve_are_refused(deployment: Deployment) -> None:
    worker = deployment.worker().start().wait_ready()
    before = _topic_size(deployment)
    ok = {"agent_id": "agent_door_001", "kind": "tool_execution"}
    refused = [
        (b'{"agent_id": "agent_door_001", "kind": "tool_execution", "payload": {"input": ' + _deep_json(600) + b"}}"),
        {**ok, "payload": {"input": nested(32)}},
        {**ok, "metadata": nested(33)},
        {**ok, "deadline": 2**64 - 1},
        {**ok, "deadline": -1},
        {**ok, "id": ""},
        {**ok, "id": "task_door\n"},
        {**ok, "agent_id": "agent_door_001\n"},
        {**ok, "agent_id": "agent_" + "d" * 5000 + "_001"},
    ]
    answers = [worker.post("/v1/tasks", body) for body in refused]
    assert [status for status, _ in answers] == [400] * len(refused), answers
    for status, answer in answers:
        _assert_envelope(status, answer, 400, "invalid_request")
    status, answer = worker.post("/v1/batch", {"requests": [ok, {**ok, "payload": {"input": nested(40)}}]})
    _assert_envelope(status, answer, 400, "invalid_request")
    assert "requests[1]: payload['input']" in answer["error"]["message"]
    assert "nested deeper than 32 levels" in answer["error"]["message"]
    assert _topic_size(deployment) == before
    # As deep as allowed is accepted, and reads back.
    status, answer = worker.post("/v1/tasks", {**ok, "payload": {"tool": "echo", "input": nested(31)}})
    assert status == 202, answer
    task_id = answer["id"]
    wait_until(lambda: worker.get(f"/v1/tasks/{task_id}")[1].get("status") == "completed", 30, what="deep task")
    assert worker.get(f"/v1/tasks/{task_id}")[1]["result"]["output"] == nested(31)


def test_only_the_documented_views_are_served(deployment: Deployment) -> None:
    """Faust's own pages (tables, router, stats) are not served: 404 in the error envelope."""
    worker = deployment.worker().start().wait_ready()
    status, answer = worker.post(
        "/v1/tasks",
        {"agent_id": "agent_page_001", "kind": "memory_operation", "payload": {"op": "write", "content": "private"}},
    )
    assert status == 202, answer
    task_id = answer["id"]
    wait_until(lambda: worker.get(f"/v1/tasks/{task_id}")[1].get("status") == "completed", 30, what="task")
    paths = (
        "/",
        "/table/",
        "/table/tasks/x/",
        f"/table/tasks/{task_id}/",
        "/table/agents/agent_page_001/",
        "/table/memory/agent_page_001/",
        "/router/",
        "/router/topics",
        "/router/agents/",
        "/router/agents/agent_page_001/",
        "/assignment/",
        "/graph/",
        "/performance/",
        "/v1/nothing",
    )
    answers = {path: worker.get(path) for path in paths}
    assert {path: status for path, (status, _) in answers.items()} == dict.fromkeys(paths, 404), answers
    for path, (status, answer) in answers.items():
        _assert_envelope(status, answer, 404, "not_found")
        assert path in answer["error"]["message"]
    # A documented path with a method it does not take.
    _assert_envelope(*worker.post("/v1/stats", {}), 405, "invalid_request")
    assert "Traceback" not in worker.log_path.read_text(errors="replace")


WRITER = "w" * 16 + "-writer"
FROM_FILE = "f" * 16 + "-from-file"


def _task(agent: str) -> dict[str, object]:
    return {"agent_id": agent, "kind": "tool_execution", "payload": {"tool": "echo", "input": 1}}


def test_api_tokens_guard_the_views_and_only_workers_may_forward(deployment: Deployment) -> None:
    tokens_file = deployment.tmp / "tokens"
    tokens_file.write_text(f"# one token per line\n{FROM_FILE}\n\n")
    deployment.env.update(
        BLACKROAD_API_TOKENS=WRITER, BLACKROAD_API_TOKENS_FILE=str(tokens_file), BLACKROAD_MEMORY_SEARCH="off"
    )
    first, second = deployment.worker().start(), deployment.worker().start()
    first.wait_ready()
    second.wait_ready()
    # Writes need a known token, sent as a bearer token; a refused request sends nothing.
    for headers in ({}, {"Authorization": "Bearer " + "x" * 20}, {"Authorization": f"Basic {WRITER}"}):
        status, body, answer_headers = first.exchange("POST", "/v1/tasks", _task("agent_guard_001"), headers)
        _assert_envelope(status, body, 401, "unauthorized")
        assert answer_headers["WWW-Authenticate"].startswith("Bearer")
    assert _topic_size(deployment) == 0
    agents = [f"agent_guard_{n:03d}" for n in range(8)]
    for n, agent in enumerate(agents):
        token = WRITER if n % 2 else FROM_FILE
        status, body, _ = first.exchange("POST", "/v1/tasks", _task(agent), {"Authorization": f"Bearer {token}"})
        assert status == 202, body
    status, body, _ = second.exchange(
        "POST", "/v1/batch", {"requests": [_task("agent_guard_100")]}, {"Authorization": f"Bearer {WRITER}"}
    )
    assert status == 202, body
    # Reads are open (BLACKROAD_API_READS=open), and any worker answers for any agent: one
    # of the two forwards each lookup to the owner with the peer secret.
    wait_until(lambda: first.stats()["completed_tasks"] == len(agents) + 1, 30, what="the tasks done")
    for agent in agents:
        assert first.get(f"/v1/agents/{agent}") == second.get(f"/v1/agents/{agent}")
        assert first.get(f"/v1/agents/{agent}")[0] == 200
    assert first.get("/v1/agents?limit=100")[1]["total"] == len(agents) + 1
    # A client passing for a worker is refused, whatever it sends.
    for forged in ("1", "", WRITER):
        status, body, _ = first.exchange("GET", "/v1/agents?window=10000000", None, {"X-Blackroad-Forwarded": forged})
        _assert_envelope(status, body, 403, "forbidden")
    # No token reaches the logs.
    first.stop()
    second.stop()
    for worker in (first, second):
        text = worker.log_path.read_text(errors="replace")
        assert WRITER not in text and FROM_FILE not in text
    # With BLACKROAD_API_READS=token the reads need a token too.
    deployment.env["BLACKROAD_API_READS"] = "token"
    reader = deployment.worker().start()
    reader.token = FROM_FILE
    reader.wait_ready()
    reader.token = None
    for path in ("/v1/stats", "/metrics", "/v1/agents/agent_guard_001"):
        status, body = reader.get(path)
        _assert_envelope(status, body, 401, "unauthorized")
    reader.token = WRITER
    wait_until(lambda: reader.get("/v1/agents/agent_guard_001")[0] == 200, 30, what="the agent with a token")


def test_a_greedy_client_gets_429_with_retry_after_while_a_polite_one_goes_on(deployment: Deployment) -> None:
    greedy, polite = "g" * 20, "p" * 20
    deployment.env.update(
        BLACKROAD_API_TOKENS=f"{greedy},{polite}",
        BLACKROAD_RATE_LIMIT_TASKS="1000",
        BLACKROAD_RATE_LIMIT_REQUESTS="40",
        BLACKROAD_RATE_LIMIT_BURST="1",
        BLACKROAD_MEMORY_SEARCH="off",
    )
    worker = deployment.worker().start().wait_ready()
    batch = {"requests": [_task(f"agent_greedy_{n:03d}") for n in range(1000)]}
    as_greedy = {"Authorization": f"Bearer {greedy}"}
    status, body, _ = worker.exchange("POST", "/v1/batch", batch, as_greedy)
    assert status == 202, body
    status, body, headers = worker.exchange("POST", "/v1/batch", batch, as_greedy)
    _assert_envelope(status, body, 429, "rate_limited")
    assert int(headers["Retry-After"]) >= 1 and body["error"]["details"] == {"limit": "tasks", "per_second": 1000.0}
    # The other client's bucket is its own; the refused batch never ran.
    status, body, _ = worker.exchange(
        "POST", "/v1/tasks", _task("agent_polite_001"), {"Authorization": f"Bearer {polite}"}
    )
    assert status == 202, body
    wait_until(lambda: worker.stats()["completed_tasks"] >= 1001, 30, what="the accepted tasks")
    time.sleep(1)
    assert worker.stats()["completed_tasks"] == 1001
    # Requests: 40 at once are let in, then the client waits.
    started = time.monotonic()
    answers = [worker.exchange("GET", "/v1/stats", None, {"Authorization": f"Bearer {polite}"}) for _ in range(80)]
    refilled = 40 * (time.monotonic() - started)  # what the bucket took in meanwhile
    statuses = [status for status, _, _ in answers]
    assert 429 in statuses and statuses[:30] == [200] * 30, statuses
    assert statuses.count(200) <= 40 + refilled, (statuses.count(200), refilled)
    refused = next(body for status, body, _ in answers if status == 429)
    assert refused["error"]["details"]["limit"] == "requests"
    time.sleep(1.1)  # a second later its bucket has filled again
    assert worker.exchange("GET", "/v1/stats", None, {"Authorization": f"Bearer {polite}"})[0] == 200


def test_health_checks_request_ids_compression_and_metrics(deployment: Deployment) -> None:
    deployment.env.update(BLACKROAD_API_TOKENS=WRITER, BLACKROAD_API_READS="token", BLACKROAD_MEMORY_SEARCH="off")
    worker = deployment.worker().start()
    worker.token = WRITER
    worker.wait_ready()
    worker.token = None
    # The probes need no token (every other view here does).
    assert worker.get("/healthz") == (200, {"status": "alive"})
    ready = wait_until(lambda: (answer := worker.get("/readyz"))[0] == 200 and answer[1], 30, what="ready")
    assert ready == {"status": "ready", "checks": {"started": True, "tables": True, "broker": True}}
    # A request id given is kept (answer header and error envelope); one that is not plausible is replaced.
    status, body, headers = worker.exchange("GET", "/v1/agents/agent_nobody_001", None, {"X-Request-ID": "abc-1.2:3"})
    assert status == 401 and headers["X-Request-ID"] == body["request_id"] == "abc-1.2:3"
    worker.token = WRITER
    for bad in ("has spaces", "x" * 129):
        status, body, headers = worker.exchange("GET", "/v1/agents/agent_nobody_001", None, {"X-Request-ID": bad})
        _assert_envelope(status, body, 404, "not_found")
        assert headers["X-Request-ID"] == body["request_id"] != bad
    # Ids in paths are held to the lengths and shapes of the wire format.
    for path, field in (
        ("/v1/agents/agent_" + "a" * 200 + "_001", "agent_id"),
        ("/v1/agents/Alice/memory", "agent_id"),
        ("/v1/tasks/task_" + "x" * 65, "task_id"),
        ("/v1/tasks/42", "task_id"),
    ):
        status, body = worker.get(path)
        _assert_envelope(status, body, 400, "invalid_request")
        assert body["error"]["details"] == {"field": field}
    # Long answers go gzip-compressed to clients that accept it.
    batch = {"requests": [_task(f"agent_zip_{n:03d}") for n in range(40)]}
    assert worker.post("/v1/batch", batch)[0] == 202
    wait_until(lambda: worker.get("/v1/agents?limit=100")[1]["total"] == 40, 30, what="the agents")
    plain = worker.get("/v1/agents?limit=100")[1]
    request = urllib.request.Request(
        worker.url + "/v1/agents?limit=100", headers={"Authorization": f"Bearer {WRITER}", "Accept-Encoding": "gzip"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Encoding"] == "gzip" and response.headers["Vary"] == "Accept-Encoding"
        raw = response.read()
    assert orjson.loads(gzip.decompress(raw)) == plain and len(raw) < len(orjson.dumps(plain)) / 3
    # Prometheus conventions: build info, process and Python collectors, request durations.
    status, text = worker.get("/metrics")
    assert status == 200
    for name in (
        "blackroad_build_info{",
        "process_resident_memory_bytes",
        "python_gc_collections_total",
        'blackroad_http_request_duration_seconds_bucket{le="0.005",view="agents"}',
    ):
        assert name in text, name
