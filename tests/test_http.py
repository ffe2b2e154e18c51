"""HTTP ingress and validation against a running worker."""

from __future__ import annotations

import asyncio

from faust.types import TP

from streams.transport import fetch_highwaters
from tests.factories import nested
from tests.harness import Deployment, wait_until


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
