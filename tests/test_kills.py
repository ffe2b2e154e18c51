"""Worker processes SIGKILLed at random under a load of memory writes and tools: every row exact."""

from __future__ import annotations

from tests.chaos import run_kills
from tests.harness import Deployment


def test_random_worker_kills_lose_nothing_and_count_nothing_twice(deployment: Deployment) -> None:
    supervisor = deployment.worker(processes=2).start()
    for port in (supervisor.port, supervisor.port + 1):
        supervisor.at(port).wait_ready(90)
    run = run_kills(deployment, supervisor, agents=1000, rate=300.0, kills=6, every=(5.0, 9.0), seed=12)
    print(run.summary())
    assert run.exact, run.summary()
    assert len(run.kills.killed_at) == 6
    # Every kill's partitions were processed again (the figures are in the summary above).
    assert None not in run.kills.served_again_s, run.summary()
