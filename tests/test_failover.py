"""A worker SIGKILLed for good (nothing restarts it): the other takes its partitions over, exactly."""

from __future__ import annotations

from tests.chaos import run_failover
from tests.harness import Deployment


def test_a_worker_killed_for_good_has_its_partitions_taken_over_exactly(deployment: Deployment) -> None:
    run = run_failover(deployment, agents=1000, rate=300.0, rounds=2, settle=6.0)
    print(run.summary())
    assert not run.problems, run.summary()
    # Both kills' partitions were processed again by the survivor (the figures are in the summary).
    assert None not in run.served_again_s, run.summary()
