"""Table restore from the changelogs, with records written straight to the broker."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas import wire
from streams.processing import state
from tests import factories
from tests.harness import Deployment, wait_until


def _write_changelog(deployment: Deployment, table: str, rows: list[tuple[str, dict]]) -> None:
    """Write rows (key, row) to a table's changelog, each to its key's partition, in order."""
    topic = f"{deployment.env['BLACKROAD_APP_ID']}-{table}-changelog"

    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=deployment.bootstrap)
        await admin.start()
        try:
            # As the worker declares it (compacted), which it then finds already there.
            await admin.create_topics(
                [NewTopic(topic, deployment.partitions, 1, topic_configs={"cleanup.policy": "compact"})]
            )
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=deployment.bootstrap, linger_ms=5)
        await producer.start()
        try:
            futures = []
            for key, row in rows:
                encoded = key.encode()
                partition = wire.partition_for(encoded, deployment.partitions)
                futures.append(await producer.send(topic, wire.encode(row), key=encoded, partition=partition))
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(run())


def _agent(agent_id: str, offset: int, completed: int) -> dict:
    row = state.new_agent(agent_id, "worker", wire.now_ms(), 5)
    row.update(o=offset, status="idle", tasks_completed=completed)
    return row


def test_every_changelog_record_is_restored_across_fetches(deployment: Deployment) -> None:
    """Many fetches' worth of rows: the last record of each fetch is restored too."""
    agents = [f"agent_restore_{i:05d}" for i in range(20_000)]
    _write_changelog(deployment, "agents", [(agent, _agent(agent, 7, 1)) for agent in agents])
    worker = deployment.worker().start().wait_ready(90)
    status, listing = worker.get("/v1/agents?limit=1")
    assert status == 200
    missing = [agent for agent in agents[::97] if worker.get(f"/v1/agents/{agent}")[0] != 200]
    assert listing["total"] == len(agents), f"{len(agents) - listing['total']} rows not restored, e.g. {missing[:5]}"


def test_an_older_copy_written_after_the_newer_row_does_not_win(deployment: Deployment) -> None:
    """A worker that lost a partition may write an older copy of a row late; restore keeps the newer."""
    agent = "agent_zombie_001"
    newer, older = _agent(agent, 500, 40), _agent(agent, 300, 25)
    stats_newer = {**state.new_stats(wire.partition_for(agent.encode(), 4)), "o": 500, "completed": 40}
    stats_older = {**stats_newer, "o": 300, "completed": 25}
    _write_changelog(deployment, "agents", [(agent, newer), (agent, older)])
    _write_changelog(
        deployment, "stats", [(state.stats_key(stats_newer["partition"]), s) for s in (stats_newer, stats_older)]
    )
    worker = deployment.worker().start().wait_ready(90)
    status, doc = worker.get(f"/v1/agents/{agent}")
    assert status == 200 and doc["stats"]["tasks_completed"] == 40, doc
    wait_until(lambda: worker.stats()["partitions_reporting"] == 1, 10, what="the stats row")
    assert worker.stats()["completed_tasks"] == 40


def test_a_restore_cut_short_by_a_rebalance_sweeps_only_partitions_the_worker_owns(deployment: Deployment) -> None:
    """Finished tasks long past their retention are being restored (and swept) when a second
    worker joins and the partitions move: the sweep removes rows only of partitions the
    worker owns at that moment, so neither worker stops."""
    hour_ago = wire.now_ms() - 3_600_000
    rows = []
    for number in range(150_000):
        event = factories.task(f"agent_sweep_{number % 400:04d}")
        row = state.new_task(event, number, "completed", hour_ago)
        row.update(created_at=hour_ago, completed_at=hour_ago, attempts=1)
        rows.append((event.task_id, state.task_values(row)))
    _write_changelog(deployment, "tasks", rows)
    deployment.env["BLACKROAD_TASK_RETENTION"] = "1"
    first = deployment.worker().start()
    second = deployment.worker().start()
    for worker in (first, second):
        worker.wait_ready(90)

    def swept() -> bool:
        for worker in (first, second):
            status, text = worker.request("GET", "/metrics")
            expired = [line for line in str(text).splitlines() if line.startswith("blackroad_tasks_expired_total")]
            if status != 200 or not expired:
                return False
        return True

    wait_until(swept, 60, what="both workers sweeping")
    time.sleep(2.0)
    for worker in (first, second):
        assert worker.exited_within(0) is None, worker.log()
        assert "NotOwner" not in worker.log_path.read_text(errors="replace"), worker.log()
