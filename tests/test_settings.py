"""Settings are validated at start-up and name the bad variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streams.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_embedded() -> None:
    settings = Settings.from_env({})
    assert settings.embedded
    assert settings.bootstrap == "127.0.0.1:19092"
    assert settings.engine == "auto"
    assert not settings.on_tansu  # until a worker learns which engine it reached


def test_the_fetch_wait_suits_the_engine_unless_set() -> None:
    """Tansu holds an empty fetch for half the wait even when records arrive; Kafka answers at once."""
    assert Settings(engine="tansu").fetch_wait_ms == 10
    assert Settings(engine="kafka").fetch_wait_ms == 100
    settings = Settings.from_env({"BLACKROAD_FETCH_MAX_WAIT_MS": "40"})
    assert settings.replace(engine="tansu").fetch_wait_ms == settings.replace(engine="kafka").fetch_wait_ms == 40


def test_kafka_bootstrap_switches_off_the_embedded_broker() -> None:
    settings = Settings.from_env({"BLACKROAD_KAFKA_BOOTSTRAP": "kafka1:9092,kafka2:9092"})
    assert not settings.embedded
    assert settings.bootstrap == "kafka1:9092,kafka2:9092"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BLACKROAD_PARTITIONS", "zero"),
        ("BLACKROAD_PARTITIONS", "0"),
        ("BLACKROAD_WEB_PORT", "70000"),
        ("BLACKROAD_KAFKA_BOOTSTRAP", "not a host"),
        ("BLACKROAD_DATA_DIR", ""),
        ("BLACKROAD_LOG_LEVEL", "loud"),
        ("BLACKROAD_ENGINE", "zookeeper"),
        ("BLACKROAD_FETCH_MAX_WAIT_MS", "soon"),
        ("BLACKROAD_FETCH_MAX_WAIT_MS", "0"),
        ("BLACKROAD_MAX_CONCURRENT_TASKS", "-1"),
        ("BLACKROAD_NO_SUCH_THING", "1"),
        ("BLACKROAD_BACKLOG_FLUSH_INTERVAL", "0.1"),  # shorter than the flush interval
        ("BLACKROAD_REPLICATION_FACTOR", "-1"),
        ("BLACKROAD_REPLICATION_FACTOR", "three"),
        ("BLACKROAD_MIN_INSYNC_REPLICAS", "-2"),
    ],
)
def test_bad_values_name_the_setting(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: value})
    assert name in str(caught.value)


@pytest.mark.parametrize(
    ("brokers", "factor", "in_sync"),
    [(1, 1, 1), (2, 2, 1), (3, 3, 2), (5, 3, 2), (12, 3, 2)],
)
def test_replication_defaults_follow_the_brokers_in_the_cluster(brokers: int, factor: int, in_sync: int) -> None:
    """Unset: three copies (or one per broker), of which all but one must have a record."""
    settings = Settings.from_env({"BLACKROAD_REPLICATION_FACTOR": "0", "BLACKROAD_MIN_INSYNC_REPLICAS": "0"})
    assert not settings.replication_resolved
    resolved = settings.for_cluster(brokers)
    assert (resolved.replication_factor, resolved.min_insync_replicas) == (factor, in_sync)
    assert resolved.topic_configs == {"min.insync.replicas": str(in_sync)}
    assert resolved.for_cluster(brokers) == resolved


def test_replication_settings_are_kept_when_set() -> None:
    settings = Settings.from_env({"BLACKROAD_REPLICATION_FACTOR": "2"})
    assert (settings.for_cluster(3).replication_factor, settings.for_cluster(3).min_insync_replicas) == (2, 1)
    settings = Settings.from_env({"BLACKROAD_MIN_INSYNC_REPLICAS": "1"})
    assert (settings.for_cluster(3).replication_factor, settings.for_cluster(3).min_insync_replicas) == (3, 1)
    settings = Settings.from_env({"BLACKROAD_REPLICATION_FACTOR": "3", "BLACKROAD_MIN_INSYNC_REPLICAS": "3"})
    assert settings.for_cluster(4).topic_configs == {"min.insync.replicas": "3"}


def test_topic_configs_need_the_cluster_first() -> None:
    """Nothing may create a topic before the replication is resolved for the cluster it reached."""
    with pytest.raises(RuntimeError, match="for_cluster"):
        _ = Settings().topic_configs


def test_more_copies_than_brokers_is_refused_naming_the_setting() -> None:
    settings = Settings.from_env({"BLACKROAD_REPLICATION_FACTOR": "3", "BLACKROAD_KAFKA_BOOTSTRAP": "k1:9092"})
    with pytest.raises(SettingsError, match="BLACKROAD_REPLICATION_FACTOR: is 3, but the cluster at k1:9092 has 1"):
        settings.for_cluster(1)


def test_more_in_sync_copies_than_copies_is_refused_naming_the_setting() -> None:
    with pytest.raises(SettingsError, match="BLACKROAD_MIN_INSYNC_REPLICAS"):
        Settings.from_env({"BLACKROAD_REPLICATION_FACTOR": "2", "BLACKROAD_MIN_INSYNC_REPLICAS": "3"})
    # Known only once the factor is: one broker gets one copy, of which two cannot be in sync.
    settings = Settings.from_env({"BLACKROAD_MIN_INSYNC_REPLICAS": "2"})
    with pytest.raises(SettingsError, match="BLACKROAD_MIN_INSYNC_REPLICAS"):
        settings.for_cluster(1)


def test_worker_refuses_to_start_with_a_bad_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli", "worker"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "BLACKROAD_WEB_PORT": "http"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "BLACKROAD_WEB_PORT" in result.stderr
