"""A task traced end to end: from its request's traceparent to its row, its lifecycle
events and its spans at a real OTLP/HTTP collector."""

from __future__ import annotations

import msgpack

from schemas import trace_context
from tests.chaos import read_topic
from tests.factories import record, task
from tests.harness import Deployment, Worker, produce, wait_until
from tests.otlp_collector import OtlpCollector

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
STEPS = {"queue", "handler", "table write"}


def _request(agent_id: str) -> dict[str, object]:
    return {"agent_id": agent_id, "kind": "tool_execution", "payload": {"tool": "upper", "input": "traced"}}


def _completed(worker: Worker, task_id: str) -> dict[str, object]:
    done = wait_until(
        lambda: (b := worker.get(f"/v1/tasks/{task_id}")[1]).get("status") == "completed" and b, 30, what=task_id
    )
    return done  # type: ignore[no-any-return]


def test_a_task_is_followed_from_its_request_to_its_row_in_one_trace(deployment: Deployment) -> None:
    with OtlpCollector() as collector:
        deployment.env["BLACKROAD_OTLP_ENDPOINT"] = collector.url
        worker = deployment.worker().start().wait_ready()

        # A request in the client's trace: the ingress span is its child, the rest the ingress span's.
        incoming = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
        status, body, headers = worker.exchange(
            "POST", "/v1/tasks", _request("agent_trace_001"), {"traceparent": incoming}
        )
        assert status == 202, body
        answered = trace_context.parse(headers["traceresponse"])
        assert answered is not None and trace_context.trace_id(answered) == CLIENT_TRACE
        row = _completed(worker, body["id"])
        assert row["trace_id"] == CLIENT_TRACE
        spans = collector.wait_for(CLIENT_TRACE, {"POST /v1/tasks", *STEPS})
        ingress = spans["POST /v1/tasks"]
        assert ingress.parent_span_id == CLIENT_SPAN and ingress.span_id == trace_context.parent_span_id(answered)
        assert ingress.service == "blackroad-streams" and ingress.attributes["http.route"] == "/v1/tasks"
        for name in STEPS:
            assert spans[name].parent_span_id == ingress.span_id, name
            assert spans[name].attributes["blackroad.task.id"] == body["id"], name
            assert spans[name].start_ns <= spans[name].end_ns, name
        queue, handler, write = spans["queue"], spans["handler"], spans["table write"]
        # The worker keeps the handler's start in whole milliseconds (rounded down).
        assert ingress.start_ns <= queue.end_ns + 1_000_000 and queue.end_ns <= handler.start_ns + 1_000_000
        assert handler.end_ns <= write.end_ns and handler.attributes["blackroad.task.status"] == "completed"
        assert write.end_ns >= row["completed_at"] * 1_000_000  # type: ignore[operator]

        # A batch with no traceparent starts a trace of its own, shared by its tasks.
        status, body, headers = worker.exchange(
            "POST", "/v1/batch", {"requests": [_request(f"agent_trace_{i:03d}") for i in range(2, 5)]}
        )
        assert status == 202, body
        started = trace_context.trace_id(headers["traceresponse"])
        assert started != CLIENT_TRACE
        for result in body["results"]:
            assert _completed(worker, result["id"])["trace_id"] == started
        spans = collector.wait_for(started, {"POST /v1/batch", *STEPS})
        assert spans["POST /v1/batch"].parent_span_id == ""  # the trace's root

        # A Kafka client's record with a traceparent header: the row has the trace id, and a
        # trace its sender does not record (flags 00) gets no spans here either.
        unsampled, sampled = task("agent_trace_001"), task("agent_trace_001")
        quiet_trace, loud_trace = trace_context.new_trace_id(), trace_context.new_trace_id()
        quiet = [("traceparent", f"00-{quiet_trace}-{CLIENT_SPAN}-00".encode())]
        loud = [("traceparent", f"00-{loud_trace}-{CLIENT_SPAN}-01".encode())]
        produce(deployment.bootstrap, deployment.topic("tasks"), [record(unsampled)], headers=quiet)
        produce(deployment.bootstrap, deployment.topic("tasks"), [record(sampled)], headers=loud)
        assert _completed(worker, unsampled.task_id)["trace_id"] == quiet_trace
        assert _completed(worker, sampled.task_id)["trace_id"] == loud_trace
        collector.wait_for(loud_trace, STEPS)  # recorded after the other, in the same partition
        assert collector.of_trace(quiet_trace) == []

    # The trace id travels with the task's lifecycle events.
    isolation = "read_committed" if deployment.env.get("BLACKROAD_ENGINE") == "kafka" else "read_uncommitted"
    events = [
        msgpack.unpackb(r.value)
        for r in read_topic(deployment.bootstrap, deployment.topic("events"), deployment.partitions, isolation)
    ]
    finished = {e["task_id"]: e.get("trace_id") for e in events if e["type"] == "task.completed"}
    assert finished[row["id"]] == CLIENT_TRACE  # type: ignore[index]
    assert finished[unsampled.task_id] == quiet_trace
