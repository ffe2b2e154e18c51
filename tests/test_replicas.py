"""Read replicas: a reader serves the workers' views from the changelogs, waits for a write's
consistency token, says how stale it is, and comes back when killed (real brokers)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from streams.runtime.settings import Settings, SettingsError
from streams.serve.consistency import format_token, parse_token
from streams.serve.errors import ApiError
from tests.harness import Deployment, Web, Worker, wait_until

#: The task every test posts: synchronous (the ``upper`` tool), so once processed it is completed.
TOOL = {"kind": "tool_execution", "payload": {"tool": "upper", "input": "read me"}}


def _serving(web: Web) -> bool:
    status, _ = web.get("/readyz")
    return status == 200


def _start(deployment: Deployment) -> tuple[Worker, Worker]:
    """One worker process and one reader beside it (the reader on the port after the worker's)."""
    supervisor = deployment.worker(processes=1, readers=1).start()
    worker, reader = supervisor.at(supervisor.port), supervisor.at(supervisor.port + 1)
    worker.wait_ready(90)
    wait_until(lambda: _serving(reader), 90, what="the reader to catch up")
    return worker, reader


def _get(web: Web, path: str, token: str | None = None) -> tuple[int, Any, dict[str, str]]:
    return web.exchange("GET", path, headers={"X-Consistency-Token": token} if token else None)


def _comparable_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """What any process serving ``/v1/stats`` answers alike (in-progress counts are the worker's own)."""
    keys = ("active_agents", "completed_tasks", "failed_tasks", "dead_tasks", "duplicate_tasks", "task_latency_ms")
    return {key: stats[key] for key in keys}


def test_a_reader_serves_every_view_as_the_worker_does(deployment: Deployment) -> None:
    worker, reader = _start(deployment)
    agents = [f"agent_replica_{i:03d}" for i in range(12)]
    note = {"kind": "memory_operation", "payload": {"op": "write", "content": "remember the replica"}}
    requests = [{"agent_id": agent, **TOOL} for agent in agents for _ in range(2)]
    requests += [{"agent_id": agent, **note} for agent in agents]
    status, queued = worker.post("/v1/batch", {"requests": requests})
    assert status == 202, queued
    task_ids = [result["id"] for result in queued["results"]]
    wait_until(lambda: worker.stats()["completed_tasks"] == len(requests), 60, what="the tasks on the worker")
    wait_until(lambda: reader.stats()["completed_tasks"] == len(requests), 60, what="the tasks on the reader")

    worker_stats, reader_stats = worker.stats(), reader.stats()
    assert _comparable_stats(reader_stats) == _comparable_stats(worker_stats)
    assert reader_stats["served_by"]["process"] == "reader"
    assert worker_stats["served_by"] == {"process": "worker", "url": worker.url, "staleness_ms": 0, "lag_records": 0}
    views = [
        "/v1/agents?limit=100",
        "/v1/agents?limit=5&offset=3&status=idle",
        *(f"/v1/agents/{agent}" for agent in agents),
        *(f"/v1/agents/{agent}/memory" for agent in agents[:4]),
        *(f"/v1/agents/{agent}/memory/verify" for agent in agents[:4]),
        *(f"/v1/tasks/{task_id}" for task_id in task_ids),
        "/v1/agents/agent_nobody_001",
        "/v1/tasks/task_nosuchtask0000",
    ]
    for path in views:
        from_worker, from_reader = worker.get(path), reader.get(path)
        assert from_reader[0] == from_worker[0], (path, from_worker, from_reader)
        if from_worker[0] == 200:
            assert from_reader[1] == from_worker[1], path
    assert reader.get("/v1/agents?limit=100")[1]["total"] == len(agents)
    assert reader.get(f"/v1/agents/{agents[0]}")[1]["stats"]["tasks_completed"] == 3
    assert reader.get(f"/v1/agents/{agents[0]}/memory/verify")[1]["valid"] is True
    for path in ("/healthz", "/readyz", "/openapi.json", "/dashboard"):
        assert reader.get(path)[0] == 200, path
    # Only workers hold the memory search index: a reader passes the view on to its worker.
    # Compared once the worker's index is built and its vectors are on the broker (sent a
    # moment after they are indexed): until then two requests may see two states.
    wait_until(lambda: worker.get("/v1/memory/stats")[1]["ready"], 60, what="the worker's memory index")
    wait_until(
        lambda: reader.get("/v1/memory/stats") == worker.get("/v1/memory/stats"),
        10,
        what="the reader's memory stats to be the worker's",
    )

    # Staleness: every GET says it; idle and caught up, it is 0.
    for path in ("/v1/stats", f"/v1/agents/{agents[1]}", "/v1/agents", f"/v1/tasks/{task_ids[0]}", "/metrics"):
        status, _, headers = _get(reader, path)
        assert status == 200 and int(headers["X-Staleness-Ms"]) >= 0, (path, headers)
        assert _get(worker, path)[2]["X-Staleness-Ms"] == "0"
    wait_until(lambda: _get(reader, "/v1/stats")[2]["X-Staleness-Ms"] == "0", 10, what="staleness 0 when idle")
    metrics = reader.get("/metrics")[1]
    assert "blackroad_replica_lag_records 0.0" in metrics
    assert "blackroad_replica_lag_seconds" in metrics

    # A token no write reached is waited for up to the bound, then refused (never answered older).
    status, body, headers = _get(reader, f"/v1/agents/{agents[0]}", "p0:999999999")
    assert status == 503 and body["error"]["code"] == "internal_error", body
    assert headers["Retry-After"] and body["error"]["details"]["consistency_token"] == "p0:999999999"
    status, body, _ = _get(reader, f"/v1/agents/{agents[0]}", "p99:1")
    assert status == 400 and body["error"]["code"] == "invalid_request", body

    # A lookup that must be current goes to the reader's worker, which answers from the owner's tables.
    current = {"X-Consistency": "current"}
    lookups = [
        f"/v1/agents/{agents[2]}",
        f"/v1/agents/{agents[2]}/memory",
        f"/v1/agents/{agents[2]}/memory/verify",
        f"/v1/tasks/{task_ids[2]}",
    ]
    for path in lookups:
        status, body, headers = reader.exchange("GET", path, headers=current)
        assert (status, body) == worker.get(path) and headers["X-Staleness-Ms"] == "0", (path, status, headers)
    status, body, _ = reader.exchange("GET", lookups[0], headers={"X-Consistency": "eventual"})
    assert status == 400 and body["error"]["details"] == {"field": "X-Consistency"}, body
    worker_pid = next(pid for pid in worker.children() if b"reader" not in Path(f"/proc/{pid}/cmdline").read_bytes())
    os.kill(worker_pid, signal.SIGSTOP)  # the reader's own copy still answers; a current lookup cannot
    try:
        assert reader.get(lookups[0])[0] == 200
        status, body, _ = reader.exchange("GET", lookups[0], headers=current)
        assert status == 503 and "cannot be reached" in body["error"]["message"], body
    finally:
        os.kill(worker_pid, signal.SIGCONT)

    # A reader killed comes back at once (the supervisor) and catches up, also with what it missed.
    reader_pid = worker.children()[1]
    os.kill(reader_pid, signal.SIGKILL)
    more = [{"agent_id": agent, **TOOL} for agent in agents]
    assert worker.post("/v1/batch", {"requests": more})[0] == 202
    wait_until(lambda: reader_pid not in worker.children() and len(worker.children()) == 2, 30, what="a new reader")
    wait_until(lambda: _serving(reader), 60, what="the restarted reader to catch up")
    total = len(requests) + len(more)
    wait_until(lambda: reader.stats()["completed_tasks"] == total, 60, what="the restarted reader's stats")
    assert reader.get(f"/v1/agents/{agents[0]}")[1]["stats"]["tasks_completed"] == 4
    assert "reader on web port" in worker.log_path.read_text()


def test_a_read_with_the_token_of_a_write_never_sees_an_older_state(deployment: Deployment) -> None:
    worker, reader = _start(deployment)
    for round_ in range(30):
        agent = f"agent_ryw_{round_:03d}"
        status, queued, headers = worker.exchange("POST", "/v1/tasks", {"agent_id": agent, **TOOL})
        assert status == 202, queued
        token = queued["consistency_token"]
        assert headers["X-Consistency-Token"] == token and token.startswith("p"), (token, headers)
        status, task, _ = _get(reader, f"/v1/tasks/{queued['id']}", token)
        assert status == 200 and task["status"] == "completed", (round_, status, task)
        status, row, _ = _get(reader, f"/v1/agents/{agent}", token)
        assert status == 200 and row["stats"]["tasks_completed"] == 1, (round_, row)
        stats = _get(reader, "/v1/stats", token)[1]
        assert stats["completed_tasks"] >= round_ * 6 + 1, (round_, stats["completed_tasks"])

        batch = [{"agent_id": agent, **TOOL} for _ in range(5)]
        status, queued, _ = worker.exchange("POST", "/v1/batch", {"requests": batch})
        assert status == 202, queued
        token = queued["consistency_token"]
        status, row, _ = _get(reader, f"/v1/agents/{agent}", token)
        assert status == 200 and row["stats"]["tasks_completed"] == 6, (round_, row)
        for result in queued["results"]:
            status, task, _ = _get(reader, f"/v1/tasks/{result['id']}", token)
            assert status == 200 and task["status"] == "completed", (round_, task)
        # The worker honours the token too (it owns every partition here).
        status, row, _ = _get(worker, f"/v1/agents/{agent}", token)
        assert status == 200 and row["stats"]["tasks_completed"] == 6, (round_, row)

    # A write posted to the reader is answered there too, and its token waited for there.
    status, queued, _ = reader.exchange("POST", "/v1/tasks", {"agent_id": "agent_ryw_reader_001", **TOOL})
    assert status == 202, queued
    status, task, _ = _get(reader, f"/v1/tasks/{queued['id']}", queued["consistency_token"])
    assert status == 200 and task["status"] == "completed", task


def test_a_consistency_token_names_partitions_and_offsets() -> None:
    token = format_token({3: 77, 1: 1234})
    assert token == "p1:1234.p3:77"
    assert parse_token(token, 4) == {1: 1234, 3: 77}
    assert parse_token("p2:5.p2:9", 4) == {2: 9}
    for bad in ("", "p1", "1:5", "p1:5.", "p1:-5", "p1:5,p2:6", "p1:5 "):
        with pytest.raises(ApiError) as refused:
            parse_token(bad, 4)
        assert refused.value.status == 400, bad
    with pytest.raises(ApiError, match="partition 4"):
        parse_token("p4:1", 4)


def test_readers_take_the_ports_after_the_workers_and_are_checked() -> None:
    settings = Settings(web_port=7000, worker_processes=2, readers=3)
    assert settings.reader_ports == [7002, 7003, 7004]
    with pytest.raises(SettingsError, match="BLACKROAD_READERS"):
        Settings(readers=-1).validate()
    with pytest.raises(SettingsError, match="BLACKROAD_CONSISTENCY_WAIT"):
        Settings(consistency_wait=-0.5).validate()


def test_workers_forward_a_token_to_the_owner_of_the_partition(deployment: Deployment) -> None:
    """Two worker processes split the partitions: a lookup one forwards carries the token, and the
    owner waits for its part of the write."""
    supervisor = deployment.worker(processes=2).start()
    first, second = supervisor.at(supervisor.port), supervisor.at(supervisor.port + 1)
    first.wait_ready(90)
    second.wait_ready(90)
    for round_ in range(20):
        agents = [f"agent_fwd{round_:03d}_{n:03d}" for n in range(4)]  # most rounds span both workers' partitions
        status, queued = first.post("/v1/batch", {"requests": [{"agent_id": agent, **TOOL} for agent in agents]})
        assert status == 202, queued
        token = queued["consistency_token"]
        for web in (first, second):
            for agent in agents:
                status, row, _ = _get(web, f"/v1/agents/{agent}", token)
                assert status == 200 and row["stats"]["tasks_completed"] == 1, (round_, web.port, agent, row)
            for result in queued["results"]:
                status, task, _ = _get(web, f"/v1/tasks/{result['id']}", token)
                assert status == 200 and task["status"] == "completed", (round_, web.port, task)
