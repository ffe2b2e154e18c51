"""Three Kafka brokers: the project's topics get three copies, and a broker SIGKILLed mid-stream loses nothing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streams.engines.kafka import KafkaCluster
from tests.chaos import KillReport, SteadyLoad, get_json, run_with_kills
from tests.conftest import require_kafka
from tests.harness import Deployment

#: Resuming after a broker's death takes its session timeout (3 s, see streams.engines.kafka),
#: the clients' metadata refresh and the work that waited meanwhile.
RESUME_WITHIN_S = 10.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    require_kafka()
    running = KafkaCluster(tmp_path_factory.mktemp("cluster"))
    started = time.monotonic()
    running.start()
    print(f"three-broker cluster serving after {time.monotonic() - started:.1f} s")
    try:
        yield running
    finally:
        running.stop()


def project_topics(deployment: Deployment, names: list[str]) -> list[str]:
    app_id = deployment.env["BLACKROAD_APP_ID"]
    return sorted(name for name in names if name.startswith((f"{deployment.prefix}.", f"{app_id}-")))


async def describe_replication(bootstrap: str, deployment: Deployment) -> dict[str, Any]:
    """Per project topic: its partitions' replica lists and leaders, and its configs."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        topics = project_topics(deployment, await admin.list_topics())
        described = await admin.describe_topics(topics)
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name) for name in topics])
    finally:
        await admin.close()
    found: dict[str, Any] = {topic["topic"]: {"partitions": topic["partitions"], "configs": {}} for topic in described}
    for response in responses:
        for _code, _message, _kind, name, entries, *_ in response.resources:
            found[name]["configs"] = {entry[0]: entry[1] for entry in entries}
    return found


def busiest_broker(bootstrap: str, deployment: Deployment) -> tuple[int, Counter[int]]:
    """The broker that leads the most partitions of the project's topics, and every broker's count."""
    topics = asyncio.run(describe_replication(bootstrap, deployment))
    leaders = Counter(partition["leader"] for topic in topics.values() for partition in topic["partitions"])
    return leaders.most_common(1)[0][0], leaders


class CompletedFollower(threading.Thread):
    """Polls a worker's ``completed_tasks`` to time when the count moves again after a kill."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True, name="completed-follower")
        self.url = url
        self.timeline: list[tuple[float, int]] = []
        self._stop_requested = threading.Event()

    def run(self) -> None:
        while not self._stop_requested.wait(0.1):
            status, stats = get_json(f"{self.url}/v1/stats")
            if status == 200:
                self.timeline.append((time.monotonic(), int(stats["completed_tasks"])))

    def stop(self) -> None:
        self._stop_requested.set()
        self.join(10)

    def moving_again(self, killed_at: float, window: float = 20.0) -> float | None:
        """Seconds from ``killed_at`` until the count moved at the end of its longest pause after it.

        None if it never moved after the kill. Pauses are measured within ``window`` seconds of it.
        """
        moved = [
            seen
            for (_, count), (seen, next_count) in zip(self.timeline, self.timeline[1:], strict=False)
            if next_count > count and killed_at < seen <= killed_at + window
        ]
        previous, longest, end = killed_at, -1.0, None
        for seen in moved:
            if seen - previous > longest:
                longest, end = seen - previous, seen
            previous = seen
        return None if end is None else end - killed_at


def test_a_broker_killed_mid_stream_loses_nothing(cluster: KafkaCluster, tmp_path: Path) -> None:
    # Defaults: the workers learn the cluster has three brokers.
    deployment = Deployment(cluster.bootstrap, tmp_path, engine="kafka")
    try:
        supervisor = deployment.worker(processes=2).start()
        for port in (supervisor.port, supervisor.port + 1):
            supervisor.at(port).wait_ready(90)

        topics = asyncio.run(describe_replication(cluster.bootstrap, deployment))
        app_id = deployment.env["BLACKROAD_APP_ID"]
        expected = {deployment.topic(name) for name in ("tasks", "events", "deadletter", "memory-archive")}
        expected |= {f"{app_id}-{name}-changelog" for name in ("agents", "tasks", "memory", "memory_entries", "stats")}
        assert expected <= set(topics), sorted(topics)
        for name, topic in topics.items():
            assert {len(partition["replicas"]) for partition in topic["partitions"]} == {3}, (name, topic)
            assert topic["configs"].get("min.insync.replicas") == "2", (name, topic["configs"])
            if name.endswith("-changelog"):
                assert topic["configs"].get("cleanup.policy") == "compact", (name, topic["configs"])

        completed = CompletedFollower(supervisor.url)
        completed.start()
        victims: list[tuple[int, Counter[int]]] = []

        def kill_busiest(load: SteadyLoad, report: KillReport) -> dict[float, dict[int, int]]:
            time.sleep(6.0)
            victim, leaders = busiest_broker(cluster.bootstrap, deployment)
            victims.append((victim, leaders))
            acked = load.acked_now()
            cluster.node(victim).kill()
            killed_at = time.monotonic()
            report.killed_at.append(killed_at)
            return {killed_at: acked}

        run = run_with_kills(deployment, supervisor, agents=1000, rate=300.0, killer=kill_busiest, settle=12.0)
        completed.stop()
        ((victim, leaders),) = victims
        stalled = completed.moving_again(run.kills.killed_at[0])
        (resumed,) = run.kills.served_again_s
        print(f"killed broker {victim}, leader of {leaders[victim]} of {sum(leaders.values())} partitions: {leaders}")
        print(run.summary())
        print(
            "completed-task count moving again "
            + ("never" if stalled is None else f"{stalled:.1f} s")
            + " after the kill; every partition processed past it after "
            + ("never" if resumed is None else f"{resumed:.1f} s")
        )
        assert run.exact, run.summary()
        assert resumed is not None and resumed <= RESUME_WITHIN_S, run.summary()
        assert stalled is not None and stalled <= RESUME_WITHIN_S
    finally:
        deployment.close()
