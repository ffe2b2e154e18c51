"""The supervisor brings a killed worker process back at once, every time."""

from __future__ import annotations

import os
import pty
import signal
import time

from streams.processing.retry_relay import relay_group
from streams.runtime.membership import takes_over_from_predecessors
from streams.runtime.settings import Settings
from tests.factories import record, task
from tests.harness import Deployment, Worker, produce, wait_until


def test_a_worker_killed_again_and_again_is_started_again_at_once(deployment: Deployment) -> None:
    supervisor = deployment.worker(processes=2).start()
    for port in (supervisor.port, supervisor.port + 1):
        supervisor.at(port).wait_ready(90)
    restarts = []
    for _ in range(3):
        victim = supervisor.children()[0]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(
            lambda v=victim: len(supervisor.children()) == 2 and v not in supervisor.children(),
            30,
            0.05,
            what="the killed process to be started again",
        )
        restarts.append(time.monotonic() - killed)
        supervisor.at(supervisor.port).wait_ready(60)
        supervisor.at(supervisor.port + 1).wait_ready(60)
    # Today's pause for a process that exits by itself doubles from 1 s; a killed one has none.
    assert all(seconds < 1.0 for seconds in restarts), restarts
    log = supervisor.log_path.read_text()
    assert log.count("killed by signal 9; starting it again") == 3
    # The restarted process took its predecessor's place in the group (on Kafka; see the next tests).
    assert ("removed the member" in log) == takes_over(deployment)


def test_a_process_killed_while_it_joined_the_group_does_not_hold_up_its_successor(deployment: Deployment) -> None:
    """Killed after joining but before any assignment, a process never ran a line of ours as a member."""
    first = deployment.worker().start().wait_ready()
    joining = deployment.worker().start()
    # The tasks' group, not the retry relay's (``<app id>-retries``), which may join first.
    joined = f"Joined group '{deployment.env['BLACKROAD_APP_ID']}' "
    wait_until(lambda: joined in joining.log(), 60, 0.01, what="the second worker to join the group")
    joining.kill()  # just joined: its member is in the group, perhaps with no partitions yet
    restarted = deployment.worker()  # the same web port, so the same client id as the killed one
    restarted.port = joining.port
    restarted.log_path = joining.log_path
    restarted.start()
    restarted.wait_ready(30)
    assert ("removed the member" in restarted.log_path.read_text()) == takes_over(deployment), restarted.log()
    events = [task(f"agent_join_{i:03d}") for i in range(40)]
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in events])

    def all_completed(worker: Worker) -> bool:  # a worker still recovering after a rebalance answers 503
        status, stats = worker.get("/v1/stats")
        return status == 200 and stats["completed_tasks"] == len(events)

    for worker in (first, restarted):  # the group settled: every partition is processed
        wait_until(lambda w=worker: all_completed(w), 30, what="tasks after the restart")


def test_workers_killed_together_leave_no_member_in_either_group_for_their_successors(deployment: Deployment) -> None:
    """Each worker process is in two groups: the tasks' and the retry relay's. On Kafka its
    successor removes its members from both, so neither group's join waits for the dead
    members' sessions (the relay's used to: retries were held up meanwhile)."""
    settings = Settings.from_env(deployment.env)
    groups = (settings.app_id, relay_group(settings))
    supervisor = deployment.worker(processes=2).start()
    for port in (supervisor.port, supervisor.port + 1):
        supervisor.at(port).wait_ready(90)
    for group in groups:
        wait_until(
            lambda g=group: supervisor.log_path.read_text().count(f"Joined group '{g}'") >= 2,
            60,
            what=f"both processes to join {group}",
        )
    again = _killed_together_and_started_again(deployment, supervisor)
    log = again.log_path.read_text()
    for group in groups:
        removed = log.count(f"a previous worker process left in {group}\n")
        assert removed == (2 if takes_over(deployment) else 0), (group, removed, log[-3000:])


def test_the_groups_leader_killed_while_the_group_rebalances_is_replaced_and_the_group_forms_again(
    deployment: Deployment,
) -> None:
    """Tansu's group coordinator keeps a member removed while the group is forming as its
    leader, and then names that dead leader to every member that joins: removing the
    killed leader's member on its successor's behalf, as on Kafka, left the group looping
    for good. On Tansu the successor waits for the dead member's session to end instead."""
    leader = deployment.worker().start().wait_ready(90)  # the first member leads the group
    second = deployment.worker().start().wait_ready(90)
    third = deployment.worker().start()
    # The tasks' group (the retry relay's is ``<app id>-retries``): the rebalance has begun.
    rebalancing = f"(Re-)joining group {deployment.env['BLACKROAD_APP_ID']} "
    wait_until(lambda: rebalancing in third.log_path.read_text(), 60, 0.01, what="the third worker to join")
    leader.kill()
    successor = deployment.worker()  # the same web port, so the same client id as the killed one
    successor.port, successor.log_path = leader.port, leader.log_path
    successor.start()
    for worker in (successor, second, third):
        worker.wait_ready(60)
    assert ("removed the member" in successor.log_path.read_text()) == takes_over(deployment)


def _killed_together_and_started_again(deployment: Deployment, supervisor: Worker) -> Worker:
    """SIGKILL every process of a two-process ``supervisor`` and start them again on the same
    ports (so the same client ids); returns the new supervisor once both processes serve."""
    for child in supervisor.children():
        os.kill(child, signal.SIGKILL)
    supervisor.kill()
    again = deployment.worker(processes=2)
    again.port, again.log_path = supervisor.port, supervisor.log_path
    again.start()
    for port in (again.port, again.port + 1):
        again.at(port).wait_ready(90)
    return again


def takes_over(deployment: Deployment) -> bool:
    """Whether a restarted worker removes its predecessor's member (not on Tansu)."""
    return takes_over_from_predecessors(Settings.from_env(deployment.env))


def test_sigusr1_and_sigusr2_dump_the_stacks_and_leave_a_worker_with_a_terminal_serving(
    deployment: Deployment,
) -> None:
    """Faust's service library answers SIGUSR1 with a dump that fails on compiled coroutines
    and SIGUSR2 with a debugger that holds the event loop while a terminal is the worker's
    standard input; a worker writes its threads' and tasks' stacks instead and goes on."""
    terminal, worker_side = pty.openpty()
    try:
        worker = deployment.worker().start(stdin=worker_side).wait_ready()
        for number, sig in enumerate((signal.SIGUSR1, signal.SIGUSR2), start=1):
            worker.signal(sig)
            wait_until(
                lambda n=number: (
                    worker.log_path.read_text(errors="replace").count("=== stacks of the worker's threads") >= n
                ),
                10,
                what=f"the stacks after {sig.name}",
            )
            worker.stats()  # answers: the event loop runs
        assert "Starting debugger" not in worker.log() and "cr_frame" not in worker.log()
        events = [task(f"agent_usr_{n:03d}") for n in range(5)]
        produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in events])
        wait_until(lambda: worker.stats()["completed_tasks"] >= 5, 30, what="the tasks after the signals")
    finally:
        os.close(terminal)
        os.close(worker_side)


def test_a_supervisor_passes_sigusr1_on_to_its_workers_and_keeps_them(deployment: Deployment) -> None:
    supervisor = deployment.worker(processes=2).start().wait_ready()
    children = supervisor.children()
    supervisor.signal(signal.SIGUSR1)
    wait_until(
        lambda: supervisor.log_path.read_text(errors="replace").count("=== stacks of the worker's threads") >= 2,
        10,
        what="both workers' stacks",
    )
    assert supervisor.process is not None and supervisor.process.poll() is None
    assert supervisor.children() == children  # none restarted
    for port in (supervisor.port, supervisor.port + 1):
        supervisor.at(port).stats()  # answers (after the two processes' rebalance, if it is still on)


def test_workers_started_again_after_a_sigkill_stop_in_time_when_asked(deployment: Deployment) -> None:
    """Right after a restart the retry relay's consumer is joining its group (on Kafka the dead
    members held that join until their sessions ended; on Tansu a join takes seconds): a stop
    meanwhile waited for the join, past the stop timeout, and warned that the broker might be
    unreachable."""
    supervisor = deployment.worker(processes=2).start()
    for port in (supervisor.port, supervisor.port + 1):
        supervisor.at(port).wait_ready(90)
    again = _killed_together_and_started_again(deployment, supervisor)
    asked = time.monotonic()
    again.signal(signal.SIGINT)
    code = again.exited_within(10)
    took = time.monotonic() - asked
    assert code is not None, "the workers did not stop"
    # Within BLACKROAD_STOP_TIMEOUT (4 s), so without its warning.
    assert took < 4.0 and "did not stop within" not in again.log(), (took, again.log()[-3000:])
