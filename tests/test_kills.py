"""Worker processes SIGKILLed at random under a load of memory writes and tools: every row exact."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.engines.choice import Engine
from streams.runtime.broker import free_port
from tests.chaos import run_kills
from tests.conftest import new_broker
from tests.harness import Deployment


@pytest.fixture
def own_deployment(broker: Engine, tmp_path: Path) -> Iterator[Deployment]:
    """A deployment on a fresh broker of the engine, so that its six kills and rebalances
    meet no group state that other tests left on the shared broker."""
    running = new_broker(broker.engine, free_port(), tmp_path / "broker")
    running.start()
    try:
        deployed = Deployment(running.port, tmp_path, engine=running.engine)
        yield deployed
        deployed.close()
    finally:
        running.stop()


def test_random_worker_kills_lose_nothing_and_count_nothing_twice(own_deployment: Deployment) -> None:
    deployment = own_deployment
    supervisor = deployment.worker(processes=2).start()
    for port in (supervisor.port, supervisor.port + 1):
        supervisor.at(port).wait_ready(90)
    run = run_kills(deployment, supervisor, agents=1000, rate=300.0, kills=6, every=(5.0, 9.0), seed=12)
    print(run.summary())
    assert run.exact, run.summary()
