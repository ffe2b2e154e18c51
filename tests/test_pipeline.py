"""End to end on the real embedded broker: produce -> batches -> tables -> web views."""

from __future__ import annotations

import time
from collections import defaultdict

import msgpack

from schemas import wire
from tests.factories import nested, record, task
from tests.harness import Deployment, consume_all, produce, wait_until


def _completed(worker, expected: int):  # type: ignore[no-untyped-def]
    return lambda: (s := worker.stats())["completed_tasks"] + s["failed_tasks"] + s["dead_tasks"] >= expected and s


def test_every_task_completes_in_agent_order_with_exact_stats(deployment: Deployment) -> None:
    worker = deployment.worker().start().wait_ready()
    agents = [f"agent_order_{i:03d}" for i in range(200)]
    events = []
    for step in range(10):
        for agent in agents:
            events.append(task(agent, "memory_operation", {"op": "write", "content": f"step {step}"}))
            events.append(task(agent, "tool_execution", {"tool": "wordcount", "input": "a b c"}))
    failing = [task(agents[0], "tool_execution", {"tool": "no-such-tool"}) for _ in range(3)]
    dying = [task(agents[1], "inference", {"latency_ms": 1, "fail_attempts": 99})]
    events += failing + dying
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in events])

    stats = wait_until(_completed(worker, len(events)), 90, what="all tasks finished")
    assert stats["completed_tasks"] == len(events) - 4
    assert stats["failed_tasks"] == 3
    assert stats["dead_tasks"] == 1
    assert stats["active_agents"] == len(agents)
    assert stats["duplicate_tasks"] == 0
    assert stats["task_latency_ms"]["p50"] is not None

    for event in events[::37] + failing + dying:
        status, body = worker.get(f"/v1/tasks/{event.task_id}")
        assert status == 200, body
        expected = "failed" if event in failing else "dead" if event in dying else "completed"
        assert body["status"] == expected
    status, body = worker.get(f"/v1/tasks/{dying[0].task_id}")
    assert body["attempts"] == 3 and "simulated model error" in body["error"]
    status, body = worker.get(f"/v1/tasks/{events[1].task_id}")
    assert body["result"] == {"tool": "wordcount", "output": 3}

    # Per-agent order: each agent's memory holds its writes in the order they were produced.
    for agent in agents[:20]:
        status, memory = worker.get(f"/v1/agents/{agent}/memory")
        assert status == 200
        contents = [e["content"] for e in memory["entries"]]
        assert contents == [f"step {s}" for s in range(10)]
        assert memory["written"] == 10
    status, agent_doc = worker.get(f"/v1/agents/{agents[5]}")
    assert agent_doc["stats"]["tasks_completed"] == 20
    assert agent_doc["status"] == "idle"

    # Lifecycle events reach their topic: one task.completed per completed task.
    # One finished event per task, a memory.written per write, a wake-up per agent, and for
    # the dying task a task.started per attempt (3) and a task.failed per retried one (2).
    expected_lifecycle = len(events) + 10 * len(agents) + len(agents) + 3 + 2
    lifecycle = consume_all(deployment.bootstrap, deployment.topic("events"), 4, expect=expected_lifecycle)
    assert len(lifecycle) == expected_lifecycle
    types = defaultdict(int)
    completed_ids = set()
    task_event_ids = []
    for rec in lifecycle:
        event = msgpack.unpackb(rec.value)
        types[event["type"]] += 1
        if event["type"].startswith("task."):
            task_event_ids.append(event["event_id"])
        if event["type"] == "task.completed":
            completed_ids.add(event["event_id"])
    assert types["task.completed"] == len(events) - 4
    # Task event ids derive from the task id, so a redelivered copy is recognisable.
    finished = {e.task_id for e in events if e not in failing and e not in dying}
    assert completed_ids == {wire.task_event_id(task_id, "completed") for task_id in finished}
    assert types["task.failed"] == 4 + 2
    # Only a task that waits in its handler (the inference task here) is reported as started.
    assert types["task.started"] == 3
    # Every attempt's events have ids of their own (copies from a replay would repeat them).
    assert len(set(task_event_ids)) == len(task_event_ids)
    # Finished rows are kept frozen once flushed; a lookup still gets the whole task.
    status, body = worker.get(f"/v1/tasks/{events[1].task_id}")
    assert body["result"] == {"tool": "wordcount", "output": 3} and body["title"] == events[1].title
    assert types["agent.status_changed"] == len(agents)

    # The work really went through in batches (far fewer batches than events).
    _, metrics = worker.get("/metrics")
    batches = float(
        next(line.split()[1] for line in metrics.splitlines() if line.startswith("blackroad_batch_size_events_count"))
    )
    assert 0 < batches < len(events) / 5


def test_per_agent_concurrency_limit(deployment: Deployment) -> None:
    worker = deployment.worker().start().wait_ready()
    busy = [task("agent_busy_001", "inference", {"latency_ms": 150}) for _ in range(12)]
    solo = [task("agent_solo_001", "inference", {"latency_ms": 150})]
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in busy + solo])
    wait_until(_completed(worker, 13), 60, what="inference tasks finished")
    _, busy_doc = worker.get("/v1/agents/agent_busy_001")
    _, solo_doc = worker.get("/v1/agents/agent_solo_001")
    # Five at once (the default limit), never more; a lone task runs alone.
    assert busy_doc["stats"]["peak_concurrent_tasks"] == 5
    assert busy_doc["stats"]["tasks_completed"] == 12
    assert solo_doc["stats"]["peak_concurrent_tasks"] == 1
    started = sorted(worker.get(f"/v1/tasks/{e.task_id}")[1]["started_at"] for e in busy)
    in_order = [worker.get(f"/v1/tasks/{e.task_id}")[1]["started_at"] for e in busy]
    assert in_order == started  # started in the order they were produced


def test_bad_events_go_to_dead_letter_and_worker_keeps_going(deployment: Deployment) -> None:
    worker = deployment.worker().start().wait_ready()
    good_before = task("agent_dlq_001")
    bad = [
        (b"agent_dlq_001", b"\xc1 not msgpack"),
        (b"agent_dlq_001", msgpack.packb([1, 2, 3])),
        (b"agent_dlq_001", msgpack.packb({"v": 99, "type": "task.created"})),
        (b"agent_dlq_001", msgpack.packb({**good_before.to_wire(), "task_id": "nope"})),
    ]
    good_after = task("agent_dlq_001")
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(good_before), *bad, record(good_after)])
    wait_until(_completed(worker, 2), 60, what="valid tasks finished")
    dead = consume_all(deployment.bootstrap, deployment.topic("deadletter"), 4, expect=len(bad))
    assert len(dead) == len(bad)
    letters = sorted((msgpack.unpackb(r.value) for r in dead), key=lambda d: d["offset"])
    assert [d["value"] for d in letters] == [value for _, value in bad]
    assert "not msgpack" in letters[0]["reason"]
    assert "must be a msgpack map" in letters[1]["reason"]
    assert "schema version" in letters[2]["reason"]
    assert "task_id" in letters[3]["reason"]
    assert len({d["offset"] for d in letters}) == len(bad)
    stats = wait_until(lambda: (s := worker.stats())["dead_lettered_events"] == len(bad) and s, 10, what="dlq stats")
    assert stats["completed_tasks"] == 2
    _, metrics = worker.get("/metrics")
    assert "blackroad_dead_lettered_total" in metrics


def test_events_keyed_otherwise_are_repartitioned(deployment: Deployment) -> None:
    worker = deployment.worker().start().wait_ready()
    events = [task(f"agent_rekey_{i:03d}") for i in range(20)]
    produce(deployment.bootstrap, deployment.topic("tasks"), [(b"wrong-key", record(e)[1]) for e in events])
    wait_until(_completed(worker, 20), 60, what="re-keyed tasks finished")
    for event in events:
        assert worker.get(f"/v1/agents/{event.agent_id}")[1]["stats"]["tasks_completed"] == 1


def test_batch_events_carry_many_tasks_and_refuse_bad_ones_alone(deployment: Deployment) -> None:
    from schemas import wire

    worker = deployment.worker().start().wait_ready()
    agents = [f"agent_pack_{i:03d}" for i in range(40)]
    by_partition: dict[int, list] = defaultdict(list)  # type: ignore[type-arg]
    events = [task(agent, "tool_execution", {"tool": "upper", "input": agent}) for agent in agents for _ in range(3)]
    for event in events:
        by_partition[wire.partition_for(event.agent_id.encode(), deployment.partitions)].append(event)
    records = []
    for group in by_partition.values():
        value = msgpack.unpackb(wire.encode_batch(group))
        bad = {"task_id": "task_bad", "agent_id": group[0].agent_id, "kind": "nope"}
        for name, values in value["columns"].items():
            values.append(bad.get(name))
        records.append((group[0].agent_id.encode(), msgpack.packb(value)))
    # A task whose agent lives in another partition is re-keyed, not lost.
    stray = task("agent_stray_001")
    other = next(p for p in by_partition if p != wire.partition_for(b"agent_stray_001", deployment.partitions))
    records.append((by_partition[other][0].agent_id.encode(), wire.encode_batch([stray])))
    produce(deployment.bootstrap, deployment.topic("tasks"), records)

    stats = wait_until(_completed(worker, len(events) + 1), 60, what="packed tasks finished")
    assert stats["completed_tasks"] == len(events) + 1
    for agent in agents:
        assert worker.get(f"/v1/agents/{agent}")[1]["stats"]["tasks_completed"] == 3
    assert worker.get(f"/v1/tasks/{stray.task_id}")[1]["status"] == "completed"
    dead = consume_all(deployment.bootstrap, deployment.topic("deadletter"), 4, expect=len(by_partition))
    reasons = sorted(msgpack.unpackb(r.value)["reason"] for r in dead)
    assert len(reasons) == len(by_partition)
    assert all(r.startswith("tasks[") and "kind" in r for r in reasons)


def test_the_liveness_check_reports_no_stalls_for_a_healthy_worker(deployment: Deployment) -> None:
    """Faust checks every assigned partition; changelogs are paused on purpose once recovered."""
    deployment.env["BLACKROAD_STALL_TIMEOUT"] = "1"
    worker = deployment.worker().start().wait_ready()
    sent = 0
    for round_ in range(4):  # records keep arriving across several checks (one each 2.5 s)
        events = [
            task(f"agent_live_{i:03d}", "tool_execution", {"tool": "echo", "input": str(round_)}) for i in range(50)
        ]
        produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in events])
        sent += len(events)
        time.sleep(2)
    wait_until(_completed(worker, sent), 60, what="all tasks finished")
    log = worker.log_path.read_text(errors="replace")
    assert "has not sent fetch request" not in log
    assert "Stream has not started processing" not in log
    assert "Stream stopped processing" not in log


def test_values_the_views_could_not_serve_are_dead_lettered_at_the_door(deployment: Deployment) -> None:
    """Everything accepted stays readable: what JSON cannot carry never becomes a task."""
    worker = deployment.worker().start().wait_ready()

    def bad(reason: str, **change: object) -> tuple[str, bytes, bytes]:
        value = {**task("agent_door_001").to_wire(), **change}
        key = str(value["agent_id"]).encode()
        return reason, key, msgpack.packb(value, use_bin_type=True)

    cases = [
        bad(
            "payload['input']: a msgpack ext type (code 5)", payload={"tool": "echo", "input": msgpack.ExtType(5, b"x")}
        ),
        bad("payload['input']: a msgpack timestamp", payload={"tool": "echo", "input": msgpack.Timestamp(1, 0)}),
        bad("payload['input']: binary data (msgpack bin)", payload={"tool": "echo", "input": b"\x00\xff"}),
        bad("payload: a map key is binary data", payload={b"tool": "echo"}),
        bad("nested deeper than 32 levels", payload=nested(600)),
        bad("metadata['trace']: a msgpack ext type", metadata={"trace": msgpack.ExtType(1, b"")}),
        bad("agent_id must look like", agent_id="agent_door_001\n"),
        bad("agent_id must look like", agent_id="agent_" + "d" * 5000 + "_001"),
        bad("task_id must look like", task_id="task_door\n"),
        bad("ts must be milliseconds", ts=2**64 - 1),
        bad("deadline must be milliseconds", deadline=2**64 - 1),
    ]
    good = task("agent_door_001", payload={"tool": "echo", "input": nested(31)})
    # One task of a batch is refused alone; the other runs.
    packed_good = task("agent_door_001")
    packed_bad = task("agent_door_001", payload={"tool": "echo", "input": b"\x01"})
    batch = wire.encode_batch([packed_bad, packed_good])
    cases.append(("tasks[0]: payload['input']: binary data", b"agent_door_001", batch))
    records = [(key, value) for _, key, value in cases]
    produce(deployment.bootstrap, deployment.topic("tasks"), [*records, record(good)])

    wait_until(_completed(worker, 2), 60, what="the valid tasks finished")
    letters = consume_all(deployment.bootstrap, deployment.topic("deadletter"), 4, expect=len(cases))
    reasons = {(r.key, msgpack.unpackb(r.value)["value"]): msgpack.unpackb(r.value)["reason"] for r in letters}
    assert len(letters) == len(cases)
    for expected, key, value in cases:
        assert expected in reasons[(key, value)]
    stats = wait_until(lambda: (s := worker.stats())["dead_lettered_events"] == len(cases) and s, 10, what="stats")
    assert stats["completed_tasks"] == 2 and stats["failed_tasks"] == 0
    # What was accepted reads back; what was refused was never stored.
    for event in (good, packed_good):
        status, body = worker.get(f"/v1/tasks/{event.task_id}")
        assert status == 200 and body["status"] == "completed", body
    assert worker.get(f"/v1/tasks/{good.task_id}")[1]["result"] == {"tool": "echo", "output": nested(31)}
    status, body = worker.get(f"/v1/tasks/{packed_bad.task_id}")
    assert status == 404, body
