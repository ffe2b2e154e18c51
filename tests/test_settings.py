"""Settings are validated at start-up and name the bad variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streams.runtime.settings import Settings, SettingsError

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


def test_the_session_timeout_is_short_with_the_embedded_broker_unless_set() -> None:
    assert Settings(engine="tansu").group_session_timeout == 3.0
    assert Settings(engine="kafka").group_session_timeout == 3.0
    assert Settings(engine="kafka", kafka_bootstrap="kafka:9092").group_session_timeout == 6.0  # Kafka's least
    assert Settings(engine="tansu", session_timeout=10.0).group_session_timeout == 10.0
    assert Settings(engine="tansu").heartbeat_interval == 1.0


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
        ("BLACKROAD_WORKING_MEMORY_CACHE_MB", "-1"),
        ("BLACKROAD_NO_SUCH_THING", "1"),
        ("BLACKROAD_BACKLOG_FLUSH_INTERVAL", "0.1"),  # shorter than the flush interval
        ("BLACKROAD_REPLICATION_FACTOR", "-1"),
        ("BLACKROAD_REPLICATION_FACTOR", "three"),
        ("BLACKROAD_MIN_INSYNC_REPLICAS", "-2"),
        ("BLACKROAD_API_TOKENS", "short"),
        ("BLACKROAD_API_TOKENS", "a token with spaces in it"),
        ("BLACKROAD_API_TOKENS_FILE", "/no/such/file"),
        ("BLACKROAD_API_READS", "token"),  # and no token set
        ("BLACKROAD_API_READS", "closed"),
        ("BLACKROAD_PEER_SECRET", "short"),
        ("BLACKROAD_RATE_LIMIT_TASKS", "400"),  # a bucket that could never take a whole batch
        ("BLACKROAD_RATE_LIMIT_REQUESTS", "-1"),
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


def test_the_api_guard_lets_in_by_token_and_tells_workers_by_the_peer_secret() -> None:
    from streams.serve.web_auth import ApiGuard, Refused, client_name

    token = "t" * 24
    guard = ApiGuard([token, "u" * 24], reads_need_token=False, peer_secret="p" * 20)
    assert guard.client(f"Bearer {token}", writes=True) == client_name(token)
    assert client_name(token).startswith("tok_") and token not in client_name(token)
    assert guard.client(None, writes=False) is None  # reads are open
    for header in (None, "Bearer " + "x" * 24, f"Basic {token}", "Bearer"):
        with pytest.raises(Refused) as refused:
            guard.client(header, writes=True)
        assert refused.value.status == 401
    strict = ApiGuard([token], reads_need_token=True, peer_secret="p" * 20)
    with pytest.raises(Refused):
        strict.client(None, writes=False)
    assert guard.is_peer("p" * 20) and not guard.is_peer("p" * 19) and not guard.is_peer("1")
    open_guard = ApiGuard([], reads_need_token=False, peer_secret="p" * 20)
    assert open_guard.client(None, writes=True) is None and not open_guard.enabled


def test_token_buckets_refill_at_their_rate_and_refuse_without_taking() -> None:
    from streams.serve.rate_limit import TokenBuckets, retry_after

    buckets = TokenBuckets(rate=10, burst=20, clients=2)
    assert buckets.take("a", 20, now=0.0) == 0.0  # a full bucket to start
    assert buckets.take("a", 5, now=0.0) == pytest.approx(0.5)  # empty: 5 more in half a second
    assert buckets.blocked("a", now=0.25) == pytest.approx(0.25) and buckets.blocked("b", now=0.25) == 0.0
    assert buckets.take("a", 1, now=0.25) == pytest.approx(0.25)  # refused until then, whatever it asks
    assert buckets.take("a", 5, now=0.5) == 0.0  # refilled meanwhile; the refusals took nothing
    assert buckets.take("b", 20, now=0.5) == 0.0  # each client its own bucket
    assert buckets.take("a", 100, now=0.5) == pytest.approx(2.0)  # more than a bucket holds: wait for a full one
    buckets.take("c", 1, now=0.5)  # a third client: the one idle longest ("b") is forgotten
    assert buckets.take("b", 20, now=0.5) == 0.0
    assert TokenBuckets(rate=0, burst=0).take("a", 10**6) == 0.0  # off
    assert (retry_after(0.01), retry_after(1.0), retry_after(1.2)) == (1, 1, 2)


def test_token_buckets_take_back_what_a_refused_request_was_charged() -> None:
    from streams.serve.rate_limit import TokenBuckets

    buckets = TokenBuckets(rate=10, burst=20)
    assert buckets.take("a", 15, now=0.0) == 0.0  # 5 left
    buckets.give_back("a", 15)
    assert buckets.take("a", 20, now=0.0) == 0.0  # full again, never above the burst
    buckets.give_back("a", 100)
    assert buckets.take("a", 20, now=0.0) == 0.0
    assert buckets.take("a", 1, now=0.0) > 0  # what was given back filled it only to the burst
    buckets.give_back("unknown", 5)  # a client never charged has nothing to get back


def test_the_command_says_its_version_and_takes_the_log_level_in_any_case() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streams.cli", "--version"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and done.stdout.startswith("blackroad ") and done.stdout.strip() != "blackroad unknown"
    assert Settings.from_env({"BLACKROAD_LOG_LEVEL": "INFO"}).log_level == "info"


def test_retries_back_off_as_the_domain_says_and_bad_backoffs_name_their_setting() -> None:
    settings = Settings.from_env({})
    assert [settings.retry_delay(n) for n in (1, 2, 3, 8, 9, 50)] == [20.0, 40.0, 80.0, 2560.0, 3600.0, 3600.0]
    with pytest.raises(SettingsError, match="BLACKROAD_RETRY_BACKOFF:"):
        Settings.from_env({"BLACKROAD_RETRY_BACKOFF": "0"})
    with pytest.raises(SettingsError, match="BLACKROAD_RETRY_BACKOFF_MAX:"):
        Settings.from_env({"BLACKROAD_RETRY_BACKOFF": "10", "BLACKROAD_RETRY_BACKOFF_MAX": "5"})
