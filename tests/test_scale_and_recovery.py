"""Several workers split the partitions; SIGKILLed workers recover exactly."""

from __future__ import annotations

import os
import signal
import time

from tests.factories import record, task
from tests.harness import Deployment, produce, wait_until


def _finished(worker, expected: int):  # type: ignore[no-untyped-def]
    def check():  # type: ignore[no-untyped-def]
        status, stats = worker.get("/v1/stats")  # not serving yet (restarting): keep waiting
        return status == 200 and stats["completed_tasks"] >= expected and stats

    return check


def _progressed(worker, beyond: int):  # type: ignore[no-untyped-def]
    return lambda: worker.stats()["completed_tasks"] > beyond


def test_two_workers_split_partitions_and_answer_for_each_other(deployment: Deployment) -> None:
    first = deployment.worker().start()
    second = deployment.worker().start()
    first.wait_ready()
    second.wait_ready()
    agents = [f"agent_split_{i:03d}" for i in range(60)]
    events = [task(agent, "memory_operation", {"op": "write", "content": f"{agent} note"}) for agent in agents]
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in events])
    for worker in (first, second):
        stats = wait_until(_finished(worker, len(events)), 90, what="both workers see all completions")
        assert stats["completed_tasks"] == len(events)
        assert stats["active_agents"] == len(agents)

    # Each worker owns some partitions; both answer every key correctly.
    owners = {first.get("/v1/agents?limit=100")[1]["total"], second.get("/v1/agents?limit=100")[1]["total"]}
    assert owners == {len(agents)}
    for worker in (first, second):
        for event in events:
            status, agent = worker.get(f"/v1/agents/{event.agent_id}")
            assert status == 200 and agent["stats"]["tasks_completed"] == 1
            status, memory = worker.get(f"/v1/agents/{event.agent_id}/memory")
            assert status == 200 and [e["content"] for e in memory["entries"]] == [f"{event.agent_id} note"]
            status, task_doc = worker.get(f"/v1/tasks/{event.task_id}")
            assert status == 200 and task_doc["status"] == "completed"
        page = worker.get("/v1/agents?limit=50&offset=40")[1]
        assert [a["id"] for a in page["agents"]] == sorted(agents)[40:]
    partitions = [worker.get("/metrics")[1].count("blackroad_consumer_lag_records{") for worker in (first, second)]
    assert all(count > 0 for count in partitions), partitions


def test_sigkill_and_restart_recovers_tables_exactly(deployment: Deployment) -> None:
    agents = [f"agent_crash_{i:03d}" for i in range(100)]
    rounds = 3
    per_round = 40  # tasks per agent per round
    worker = deployment.worker().start().wait_ready()
    produced = 0
    for crash in range(rounds):
        events = []
        for step in range(per_round):
            for agent in agents:
                kind = "memory_operation" if step % 2 == 0 else "tool_execution"
                payload = (
                    {"op": "write", "content": f"r{crash} s{step}"}
                    if kind == "memory_operation"
                    else {"tool": "echo", "input": step}
                )
                events.append(task(agent, kind, payload))
        produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in events])
        produced += len(events)
        if crash < rounds - 1:
            # Kill mid-stream: some of this round is processed, some is not.
            halfway = produced - len(events) // 2
            wait_until(_progressed(worker, halfway), 60, 0.02, what="progress")
            worker.kill()
            worker = deployment.worker().start().wait_ready()
    stats = wait_until(_finished(worker, produced), 120, what="all tasks after restarts")
    assert stats["completed_tasks"] == produced
    assert stats["duplicate_tasks"] == 0
    assert stats["active_agents"] == len(agents)
    total = 0
    for agent in agents:
        _, doc = worker.get(f"/v1/agents/{agent}")
        assert doc["stats"]["tasks_completed"] == rounds * per_round, agent
        total += doc["stats"]["tasks_completed"]
        _, memory = worker.get(f"/v1/agents/{agent}/memory")
        assert memory["written"] == rounds * per_round // 2, agent
        contents = [e["content"] for e in memory["entries"]]
        expected = [f"r{r} s{s}" for r in range(rounds) for s in range(0, per_round, 2)]
        assert contents == expected[-len(contents) :]
    assert total == produced


def test_finished_tasks_leave_the_live_table_and_stay_gone_after_restart(deployment: Deployment) -> None:
    deployment.env["BLACKROAD_TASK_RETENTION"] = "1"
    worker = deployment.worker().start().wait_ready()
    events = [task(f"agent_old_{i:03d}") for i in range(50)]
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in events])
    wait_until(_finished(worker, len(events)), 60, what="tasks finished")
    wait_until(lambda: all(worker.get(f"/v1/tasks/{e.task_id}")[0] == 404 for e in events), 30, what="tasks expired")
    wait_until(
        lambda: "blackroad_tasks_expired_total 50.0" in worker.get("/metrics")[1], 30, what="the sweep to drop them"
    )
    worker.kill()
    worker = deployment.worker().start().wait_ready()
    time.sleep(1.5)  # three sweep periods: rows restored without their tombstones would be swept again
    assert "blackroad_tasks_expired_total 0.0" in worker.get("/metrics")[1]
    for event in events:
        assert worker.get(f"/v1/tasks/{event.task_id}")[0] == 404
        assert worker.get(f"/v1/agents/{event.agent_id}")[1]["stats"]["tasks_completed"] == 1
    assert worker.stats()["completed_tasks"] == len(events)


def test_worker_processes_split_partitions_and_a_killed_one_is_restarted(deployment: Deployment) -> None:
    supervisor = deployment.worker(processes=2).start()
    ports = [supervisor, supervisor.at(supervisor.port + 1)]
    for worker in ports:
        worker.wait_ready()
    agents = [f"agent_proc_{i:03d}" for i in range(40)]
    first = [task(agent, "tool_execution", {"tool": "upper", "input": agent}) for agent in agents]
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in first])
    for worker in ports:
        wait_until(_finished(worker, len(first)), 90, what="both processes see all completions")
    # Each process owns some agents (the list is per worker) and forwards the rest.
    totals = [worker.get("/v1/agents?limit=100")[1]["total"] for worker in ports]
    assert totals == [len(agents)] * 2

    children = supervisor.children()
    assert len(children) == 2
    os.kill(children[0], signal.SIGKILL)
    second = [task(agent, "tool_execution", {"tool": "reverse", "input": agent}) for agent in agents]
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in second])
    total = len(first) + len(second)
    wait_until(
        lambda: len(supervisor.children()) == 2 and children[0] not in supervisor.children(),
        30,
        what="the supervisor to start the killed process again",
    )
    for worker in ports:
        stats = wait_until(_finished(worker, total), 120, what="all tasks after the restart")
        assert stats["completed_tasks"] == total
    for worker in ports:
        for agent in agents:
            status, body = worker.get(f"/v1/agents/{agent}")
            assert status == 200 and body["stats"]["tasks_completed"] == 2, body
