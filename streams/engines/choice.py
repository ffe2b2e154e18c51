"""Which engine to start, and which one a worker reached (see :mod:`streams.engines`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from streams.engines import kafka_jars
from streams.engines.kafka import KafkaBroker
from streams.engines.tansu import CLUSTER_ID as TANSU_CLUSTER_ID
from streams.engines.tansu import TansuBroker
from streams.runtime import kafka_clients
from streams.runtime.broker import wait_for_broker
from streams.runtime.settings import Settings, SettingsError

ENGINES = ("kafka", "tansu")


class Engine(Protocol):
    """An embedded broker: started and stopped by its owner, on ``127.0.0.1:port``."""

    engine: str
    durable: bool
    port: int

    @property
    def bootstrap(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def on_unexpected_exit(self, callback: Callable[[int], None]) -> None: ...


def choose(settings: Settings) -> tuple[str, str | None]:
    """The engine to start, and a line to print when ``auto`` had to fall back to Tansu."""
    if settings.engine != "auto":
        return settings.engine, None
    reason = kafka_jars.unavailable()
    if reason is None:
        return "kafka", None
    return "tansu", f"Apache Kafka cannot start here ({reason}); using Tansu: state is in memory only"


def embedded_broker(settings: Settings, engine: str) -> Engine:
    """The engine ``engine`` on the configured port, keeping its files in the data directory."""
    if engine == "kafka":
        return KafkaBroker(settings.embedded_broker_port, settings.data_dir / "kafka")
    if engine == "tansu":
        return TansuBroker(settings.embedded_broker_port, settings.data_dir / "broker.log")
    raise ValueError(f"no engine {engine!r} (known: {', '.join(ENGINES)})")


async def identify(bootstrap: Settings | str) -> str:
    """Which engine the broker at ``bootstrap`` is: ``tansu`` (by its cluster id) or ``kafka``."""
    engine, _ = await describe(bootstrap)
    return engine


async def describe(bootstrap: Settings | str) -> tuple[str, int]:
    """Which engine the cluster at ``bootstrap`` runs, and how many brokers it has up (one request)."""

    admin = kafka_clients.admin(bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    engine = "tansu" if cluster.get("cluster_id") == TANSU_CLUSTER_ID else "kafka"
    return engine, len(cluster.get("brokers") or ())


async def engine_in_use(settings: Settings, timeout: float = 30.0) -> Settings:
    """Wait for the broker, then return ``settings`` resolved for the cluster it belongs to.

    ``engine`` names what the broker is. A set ``BLACKROAD_ENGINE`` that contradicts the
    broker is an error: the Tansu corrections must follow the broker, and a mismatch means
    a setting is wrong. The replication factor and ``min.insync.replicas`` of the topics
    the project creates are resolved for the brokers the cluster has now
    (:meth:`Settings.for_cluster`); a factor set above them is an error too.
    """
    await wait_for_broker(settings, timeout)
    found, brokers = await describe(settings)
    if settings.engine not in ("auto", found):
        raise SettingsError("ENGINE", f"is {settings.engine!r}, but the broker at {settings.bootstrap} is {found}")
    return settings.replace(engine=found).for_cluster(brokers)
