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
    ],
)
def test_bad_values_name_the_setting(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: value})
    assert name in str(caught.value)


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
