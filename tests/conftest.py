from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from streams import native
from streams.broker import EmbeddedBroker, free_port
from tests.harness import Deployment


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test compiled modules older than their source (see streams/native.py)."""
    try:
        native.check()
    except native.StaleBuild as exc:
        pytest.exit(str(exc), returncode=2)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One real embedded broker (Tansu) for the whole run, on a free port."""
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(free_port(), log) as running:
        yield running


@pytest.fixture
def deployment(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[Deployment]:
    """An isolated app (own topics and consumer group) on the shared broker."""
    deployed = Deployment(broker.port, tmp_path)
    yield deployed
    deployed.close()
