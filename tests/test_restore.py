"""Table restore from the changelogs, with records written straight to the broker."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas import wire
from streams.processing import state
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
