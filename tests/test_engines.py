"""The embedded engines: which one starts, which one a worker finds, and what lands on the broker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streams.engines import kafka_jars
from streams.engines.choice import Engine, choose, engine_in_use, identify
from streams.engines.kafka import KafkaBroker, Quorum, server_properties
from streams.runtime.broker import free_port
from streams.runtime.settings import Settings, SettingsError
from tests.harness import ROOT, Deployment


def test_a_worker_finds_out_which_engine_it_reached(broker: Engine) -> None:
    assert asyncio.run(identify(broker.bootstrap)) == broker.engine
    settings = Settings.from_env({"BLACKROAD_EMBEDDED_BROKER_PORT": str(broker.port)})
    assert settings.engine == "auto" and not settings.on_tansu
    found = asyncio.run(engine_in_use(settings))
    assert found.engine == broker.engine
    assert found.on_tansu == (broker.engine == "tansu")
    # One broker: one copy of each topic, which must have every record.
    assert (found.replication_factor, found.min_insync_replicas) == (1, 1)


def test_more_copies_than_the_cluster_has_brokers_stop_the_worker_naming_the_setting(
    broker: Engine, tmp_path: Path
) -> None:
    result = _run_worker(broker, tmp_path, BLACKROAD_REPLICATION_FACTOR="3")
    assert result.returncode == 2
    assert (
        f"BLACKROAD_REPLICATION_FACTOR: is 3, but the cluster at 127.0.0.1:{broker.port} has 1 broker(s) up"
        in result.stderr
    )


def test_a_worker_told_the_wrong_engine_refuses_to_start_naming_the_setting(broker: Engine, tmp_path: Path) -> None:
    wrong = "kafka" if broker.engine == "tansu" else "tansu"
    settings = Settings.from_env({"BLACKROAD_EMBEDDED_BROKER_PORT": str(broker.port), "BLACKROAD_ENGINE": wrong})
    with pytest.raises(SettingsError, match="BLACKROAD_ENGINE"):
        asyncio.run(engine_in_use(settings))
    result = _run_worker(broker, tmp_path, BLACKROAD_ENGINE=wrong)
    assert result.returncode != 0
    assert f"BLACKROAD_ENGINE: is '{wrong}', but the broker at 127.0.0.1:{broker.port} is {broker.engine}" in (
        result.stderr
    )


def test_changelog_topics_are_compacted_on_the_broker(deployment: Deployment) -> None:
    """And every topic has the replication resolved for the cluster: one broker, one copy, one in sync."""
    deployment.worker().start().wait_ready()
    app_id = deployment.env["BLACKROAD_APP_ID"]
    changelogs = [f"{app_id}-{table}-changelog" for table in ("agents", "tasks", "memory", "memory_entries", "stats")]
    others = [deployment.topic(name) for name in ("tasks", "events", "deadletter", "memory-archive")]

    async def configs() -> dict[str, dict[str, str]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=deployment.bootstrap)
        await admin.start()
        try:
            responses = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic) for topic in changelogs + others]
            )
        finally:
            await admin.close()
        found: dict[str, dict[str, str]] = {}
        for response in responses:
            for _code, _message, _kind, name, entries in (resource[:5] for resource in response.resources):
                found[name] = {entry[0]: entry[1] for entry in entries}
        return found

    found = asyncio.run(configs())
    assert {name: found[name].get("cleanup.policy") for name in changelogs} == dict.fromkeys(changelogs, "compact")
    assert {name: found[name].get("min.insync.replicas") for name in found} == dict.fromkeys(changelogs + others, "1")


def test_auto_falls_back_to_tansu_in_one_line_where_kafka_cannot_start(tmp_path: Path) -> None:
    """Without Java on the PATH, `blackroad broker` runs Tansu and says once that state is in memory only."""
    env = {
        **{k: v for k, v in os.environ.items() if k != "JAVA_HOME"},
        "PATH": str(tmp_path / "no-java"),
        "BLACKROAD_EMBEDDED_BROKER_PORT": str(free_port()),
        "BLACKROAD_DATA_DIR": str(tmp_path / "data"),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "broker"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().strip() for _ in range(2)]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    assert lines[0].startswith("blackroad: Apache Kafka cannot start here (no `java` found"), lines
    assert lines[0].endswith("using Tansu: state is in memory only"), lines
    assert lines[1].startswith("embedded broker: tansu (in memory only) on 127.0.0.1:"), lines


def test_the_engine_setting_picks_the_engine_and_auto_prefers_kafka() -> None:
    assert choose(Settings(engine="tansu")) == ("tansu", None)
    assert choose(Settings(engine="kafka")) == ("kafka", None)
    engine, note = choose(Settings())
    if kafka_jars.unavailable() is None:
        assert (engine, note) == ("kafka", None)
    else:
        assert engine == "tansu" and note is not None and "in memory only" in note


def test_the_class_path_is_refused_once_the_pom_changed_or_a_jar_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jar = tmp_path / "kafka.jar"
    jar.write_bytes(b"jar")
    pom = tmp_path / "pom.xml"
    pom.write_text("<project/>")
    monkeypatch.setattr(kafka_jars, "ROOT", tmp_path)
    monkeypatch.setattr(kafka_jars, "POM", pom)
    monkeypatch.setattr(kafka_jars, "CLASSPATH_FILE", tmp_path / "classpath.txt")
    monkeypatch.setattr(kafka_jars, "DIGEST_FILE", tmp_path / "pom.sha256")
    with pytest.raises(kafka_jars.KafkaUnavailable, match="not provisioned"):
        kafka_jars.class_path()
    (tmp_path / "classpath.txt").write_text(str(jar))
    (tmp_path / "pom.sha256").write_text(kafka_jars.pom_digest())
    assert kafka_jars.class_path() == str(jar)
    pom.write_text("<project><!-- another version --></project>")
    with pytest.raises(kafka_jars.KafkaUnavailable, match=r"pom\.xml changed"):
        kafka_jars.class_path()
    (tmp_path / "pom.sha256").write_text(kafka_jars.pom_digest())
    jar.unlink()
    with pytest.raises(kafka_jars.KafkaUnavailable, match="missing"):
        kafka_jars.class_path()


def test_java_versions_are_read_from_java_dash_version(tmp_path: Path) -> None:
    """Java 8 calls itself 1.8; Kafka 4 needs 17 or later."""
    for shown, major in (('openjdk version "17.0.15" 2025-04-15', 17), ('java version "1.8.0_402"', 8)):
        java = tmp_path / f"java{major}"
        java.write_text(f"#!/bin/sh\necho '{shown}' >&2\n")
        java.chmod(0o755)
        assert kafka_jars.java_major(str(java)) == major


def test_a_cluster_node_names_every_voter_and_sizes_internal_topics_for_three() -> None:
    """The one-node engine keeps one copy of everything; a node of three keeps three, two in sync."""
    single = server_properties(19092, 19093, Path("records"))
    assert single["controller.quorum.voters"] == "1@127.0.0.1:19093"
    for key in ("default.replication.factor", "offsets.topic.replication.factor", "min.insync.replicas"):
        assert single[key] == "1"
    voters = Quorum("id", {1: 1001, 2: 1002, 3: 1003}).voters
    assert voters == "1@127.0.0.1:1001,2@127.0.0.1:1002,3@127.0.0.1:1003"
    node = server_properties(2002, 1002, Path("records"), node_id=2, voters=voters, brokers=3)
    assert node["node.id"] == "2"
    assert node["controller.quorum.voters"] == voters
    assert node["listeners"] == "PLAINTEXT://127.0.0.1:2002,CONTROLLER://127.0.0.1:1002"
    for key in (
        "default.replication.factor",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "share.coordinator.state.topic.replication.factor",
    ):
        assert node[key] == "3"
    for key in ("min.insync.replicas", "transaction.state.log.min.isr", "share.coordinator.state.topic.min.isr"):
        assert node[key] == "2"


def _run_worker(broker: Engine, tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """``blackroad worker`` on ``broker`` with ``settings``, run until it exits (at most 60 s)."""
    env = {
        **os.environ,
        "BLACKROAD_EMBEDDED_BROKER_PORT": str(broker.port),
        "BLACKROAD_DATA_DIR": str(tmp_path),
        "BLACKROAD_WEB_PORT": str(free_port()),
        **settings,
    }
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", "worker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_embedded_kafka_formats_and_starts_in_a_relative_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``make run`` keeps its data in ``data/`` (relative): the broker's JVM runs in its own
    directory, so every path it is given must still name the same files from there."""
    monkeypatch.chdir(tmp_path)
    broker = KafkaBroker(free_port(), Path("data") / "kafka")
    try:
        broker.start()
        assert (tmp_path / "data" / "kafka" / "records" / "meta.properties").exists()
    finally:
        broker.stop()
