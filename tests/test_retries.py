"""Handler retries wait out their backoff without holding up the agent or the partition."""

from __future__ import annotations

import re
import time
import urllib.request

from tests.factories import record, task
from tests.harness import Deployment, produce, wait_until


def _task(worker, task_id: str) -> dict:  # type: ignore[no-untyped-def]
    """The task's view; ``{"status": None}`` while the worker has not seen it yet."""
    status, body = worker.get(f"/v1/tasks/{task_id}")
    if status == 404:
        return {"status": None}
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def _retries_counted(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    match = re.search(r"^blackroad_task_retries_total (\S+)$", text, re.M)
    assert match is not None, "blackroad_task_retries_total is not exported"
    return float(match.group(1))


def test_a_failed_task_waits_its_backoff_while_the_agents_other_tasks_run_and_survives_a_kill(
    deployment: Deployment,
) -> None:
    backoff = 1.0  # the waits: 2 s after the first attempt, 4 s after the second
    deployment.env.update(BLACKROAD_RETRY_BACKOFF=str(backoff), BLACKROAD_MAX_ATTEMPTS="3")
    worker = deployment.worker().start().wait_ready()
    agent, other = "agent_retry_001", "agent_retry_002"
    flaky = task(agent, "inference", {"latency_ms": 0, "fail_attempts": 1})
    after = [task(agent, "tool_execution", {"tool": "wordcount", "input": "a b"}) for _ in range(5)]
    doomed = task(other, "inference", {"latency_ms": 0, "fail_attempts": 99})
    started = time.monotonic()
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in [flaky, *after, doomed]])

    # The agent's later tasks finish while its failed one waits, queued, for its next attempt.
    wait_until(lambda: all(_task(worker, t.task_id)["status"] == "completed" for t in after), 30, what="later tasks")
    waited = time.monotonic() - started
    waiting = _task(worker, flaky.task_id)
    assert waited < 2 * backoff, f"the agent's other tasks took {waited:.2f} s: they waited for the retry"
    assert waiting["status"] == "queued" and waiting["attempts"] == 1
    assert "simulated model error" in waiting["error"]

    done = wait_until(lambda: (b := _task(worker, flaky.task_id))["status"] == "completed" and b, 30, what="retry")
    assert done["attempts"] == 2
    assert done["completed_at"] - done["created_at"] >= 2 * backoff * 1000
    dead = wait_until(lambda: (b := _task(worker, doomed.task_id))["status"] == "dead" and b, 30, what="dead")
    assert dead["attempts"] == 3
    assert dead["completed_at"] - dead["created_at"] >= (2 + 4) * backoff * 1000
    assert _retries_counted(worker.port) == 3  # flaky once, doomed twice

    # A retry waiting when its worker is killed still runs, once.
    pending = task(agent, "inference", {"latency_ms": 0, "fail_attempts": 1})
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(pending)])
    wait_until(lambda: _task(worker, pending.task_id)["status"] == "queued", 30, what="a waiting retry")
    worker.kill()
    worker = deployment.worker().start().wait_ready()
    done = wait_until(lambda: (b := _task(worker, pending.task_id))["status"] == "completed" and b, 60, what="retry")
    assert done["attempts"] == 2

    # The stats view follows the stats changelog: it may be a flush behind the task view.
    stats = wait_until(lambda: (s := worker.stats())["completed_tasks"] >= 7 and s, 30, what="stats")
    assert (stats["completed_tasks"], stats["dead_tasks"], stats["failed_tasks"]) == (7, 1, 0)
    assert stats["duplicate_tasks"] == 0
    status, body = worker.get(f"/v1/agents/{agent}")
    assert status == 200
    assert body["stats"]["tasks_completed"] == 7
