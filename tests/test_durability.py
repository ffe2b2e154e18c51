"""On the Apache Kafka engine, `blackroad up` again after Ctrl-C or a SIGKILL serves everything as before."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from streams.runtime.broker import free_port
from tests.conftest import require_kafka
from tests.factories import record, task
from tests.harness import Up, Web, produce, wait_until

AGENTS = 40
ROUNDS = 3
#: Stats that are windows over the last minute, not state: they move with the clock.
CLOCK_STATS = ("tasks_per_minute", "memory_ops_per_second", "as_of")


def _load() -> list[Any]:
    """Per agent and round, a memory write (its working memory and hash chain) and a tool task."""
    events = []
    for turn in range(ROUNDS):
        for i in range(AGENTS):
            agent = f"agent_durable_{i:03d}"
            events.append(task(agent, "memory_operation", {"op": "write", "content": f"{agent} note {turn}"}))
            events.append(task(agent, "tool_execution", {"tool": "upper", "input": f"{agent} {turn}"}))
    return events


def _views(web: Web, agent_ids: list[str], task_ids: list[str]) -> dict[str, Any]:
    """Everything the web views serve about the load: agent list, agents, memories, tasks, stats."""
    views: dict[str, Any] = {}
    offset = 0
    while True:
        status, page = web.get(f"/v1/agents?limit=100&offset={offset}")
        assert status == 200, page
        views[f"list@{offset}"] = page
        offset += 100
        if offset >= page["total"]:
            break
    for agent in agent_ids:
        views[agent] = web.get(f"/v1/agents/{agent}")
        views[f"{agent}/memory"] = web.get(f"/v1/agents/{agent}/memory")
    for task_id in task_ids:
        views[task_id] = web.get(f"/v1/tasks/{task_id}")
    stats = web.stats()
    for key in CLOCK_STATS:
        stats.pop(key)
    views["stats"] = stats
    return views


def _all_done(web: Web, total: int) -> Any:
    """Every task completed, every partition reporting, and the history in PostgreSQL caught up."""

    def check() -> Any:
        status, stats = web.get("/v1/stats")
        done = status == 200 and stats["completed_tasks"] == total and stats["partitions_reporting"] == 4
        return done and stats["history_lag"] == 0 and stats

    return check


def _same(before: dict[str, Any], after: dict[str, Any]) -> None:
    changed = [key for key in before if before[key] != after.get(key)]
    if changed:
        first = changed[0]
        raise AssertionError(f"{len(changed)} views changed, e.g. {first}: {before[first]} -> {after.get(first)}")


def _broker_line(up: Up) -> str:
    lines = up.log_path.read_text(errors="replace").splitlines()
    return next(line for line in lines if line.startswith("embedded broker:"))


def test_ctrl_c_and_sigkill_then_up_again_serve_every_agent_memory_task_and_stat(tmp_path: Path) -> None:
    require_kafka()
    env = {
        **os.environ,
        "BLACKROAD_ENGINE": "kafka",
        "BLACKROAD_EMBEDDED_BROKER_PORT": str(free_port()),
        "BLACKROAD_EMBEDDED_POSTGRES_PORT": str(free_port()),
        "BLACKROAD_WEB_PORT": str(free_port()),
        "BLACKROAD_DATA_DIR": str(tmp_path / "data"),
        "BLACKROAD_LOG_LEVEL": "info",
    }
    bootstrap = f"127.0.0.1:{env['BLACKROAD_EMBEDDED_BROKER_PORT']}"
    up = Up(env, tmp_path / "up-fresh.log").start()
    try:
        fresh = up.wait_serving()
        print(f"fresh data directory: {_broker_line(up)}; up to serving {fresh:.1f}s")
        events = _load()
        produce(bootstrap, "blackroad.tasks", [record(e) for e in events])
        # One through the HTTP ingress too, as a user would.
        status, posted = up.web.post(
            "/v1/tasks", {"agent_id": "agent_durable_000", "kind": "memory_operation", "payload": {"op": "recall"}}
        )
        assert status == 202, posted
        total = len(events) + 1
        wait_until(_all_done(up.web, total), 60, what="every task to complete")
        agent_ids = sorted({event.agent_id for event in events})
        task_ids = [event.task_id for event in events] + [posted["id"]]
        before = _views(up.web, agent_ids, task_ids)
        assert before["stats"]["active_agents"] == AGENTS
        assert before["agent_durable_007/memory"][1]["written"] == ROUNDS

        # Ctrl-C: the worker stops, then the broker; both are gone when `up` exits.
        broker = up.broker_pid()
        assert up.interrupt() == 130, up.log()  # stopped cleanly, by Ctrl-C
        assert not Path(f"/proc/{broker}").exists(), "the broker outlived blackroad up"
        up = Up(env, tmp_path / "up-after-ctrl-c.log").start()
        again = up.wait_serving()
        wait_until(_all_done(up.web, total), 60, what="the restored stats")
        print(f"after Ctrl-C: {_broker_line(up)}; up to serving {again:.1f}s")
        _same(before, _views(up.web, agent_ids, task_ids))

        # SIGKILL of everything, the broker included: Kafka recovers its log on the next start.
        up.kill_everything()
        up = Up(env, tmp_path / "up-after-sigkill.log").start()
        recovered = up.wait_serving()
        wait_until(_all_done(up.web, total), 60, what="the restored stats")
        print(f"after SIGKILL: {_broker_line(up)}; up to serving {recovered:.1f}s")
        _same(before, _views(up.web, agent_ids, task_ids))
        assert "Recovering unflushed segment" in (tmp_path / "data" / "kafka" / "broker.log").read_text()
    finally:
        up.stop()
