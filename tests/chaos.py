"""Worker kills under a steady load, and the exact check that follows.

Used by the kill test in the suite (a short run) and, with bigger figures, by
``python -m tests.chaos`` (the full run documented in the README).

* :class:`SteadyLoad` sends tasks at a fixed rate from a thread: for every agent, in
  turn, a ``tool_execution`` echo and a ``memory_operation`` write with unique content,
  and remembers what each agent was sent and the offset each record got.
* :class:`StatsFollower` reads the stats changelog from a thread and notes when each
  partition's processed offset moved, to time how long partitions went unserved after
  a kill.
* :func:`check_exact` compares every agent's counters and memory chain, every task row
  and the stats with what was sent.
* :func:`check_events` reads the lifecycle events and dead letters as a
  ``read_committed`` consumer: every task's events and every bad record's dead letter
  are there, and under exactly-once each exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from agents.memory import chain_hash
from schemas import wire
from schemas.wire import TaskEvent, partition_for

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class AgentLoad:
    """What one agent was sent, in order."""

    tasks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class SteadyLoad(threading.Thread):
    """Sends ``rate`` tasks/s over ``agents`` agents until :meth:`stop`."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        agents: int,
        rate: float,
        partitions: int,
        bad_every: int = 0,
        idempotent: bool = False,
    ) -> None:
        super().__init__(daemon=True, name="steady-load")
        self.bootstrap = bootstrap
        self.topic = topic
        self.rate = rate
        self.partitions = partitions
        #: Every ``bad_every``-th record is undecodable (0: none); their (partition, offset).
        self.bad_every = bad_every
        self.bad: list[tuple[int, int]] = []
        #: An idempotent producer (Kafka only): a send retried after a broker died mid-request
        #: cannot put a task on the topic twice, so every duplicate counted is the worker's own.
        self.idempotent = idempotent
        self.agent_ids = [f"agent_chaos_{i:05d}" for i in range(agents)]
        self.sent: dict[str, AgentLoad] = {agent: AgentLoad() for agent in self.agent_ids}
        #: Highest offset the broker acknowledged per partition.
        self.acked: dict[int, int] = {}
        self.count = 0
        self.error: BaseException | None = None
        self._stop_requested = threading.Event()

    def stop(self) -> None:
        self._stop_requested.set()
        self.join(60)
        if self.error is not None:
            raise self.error

    def acked_now(self) -> dict[int, int]:
        return dict(self.acked)

    def run(self) -> None:
        try:
            asyncio.run(self._send())
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def _next(self, sequence: int) -> TaskEvent:
        agent_id = self.agent_ids[sequence % len(self.agent_ids)]
        turn = sequence // len(self.agent_ids)
        load = self.sent[agent_id]
        task_id = f"task_chaos{sequence:08d}"
        if turn % 2 == 0:
            note = f"{agent_id} note {turn}"
            load.notes.append(note)
            kind, payload = "memory_operation", {"op": "write", "content": note}
        else:
            kind, payload = "tool_execution", {"tool": "echo", "input": turn}
        load.tasks.append(task_id)
        return TaskEvent(task_id, agent_id, kind, "normal", f"chaos {sequence}", "", payload, wire.now_ms())

    async def _send(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, linger_ms=5, acks="all", enable_idempotence=self.idempotent
        )
        await producer.start()
        started = time.monotonic()
        pending: list[asyncio.Future[Any]] = []
        try:
            sequence = 0
            while not self._stop_requested.is_set():
                if self.bad_every and sequence and sequence % self.bad_every == 0:
                    pending.append(await self._send_bad(producer, sequence))
                event = self._next(sequence)
                key = event.agent_id.encode()
                future = await producer.send(
                    self.topic, wire.encode_task(event), key=key, partition=partition_for(key, self.partitions)
                )
                future.add_done_callback(self._note_ack)
                pending.append(future)
                sequence += 1
                self.count = sequence
                ahead = sequence / self.rate - (time.monotonic() - started)
                if ahead > 0.002:
                    await asyncio.sleep(ahead)
                if len(pending) > 1000:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)
        finally:
            await producer.stop()

    async def _send_bad(self, producer: AIOKafkaProducer, sequence: int) -> asyncio.Future[Any]:
        key = self.agent_ids[sequence % len(self.agent_ids)].encode()
        partition = partition_for(key, self.partitions)
        future = await producer.send(self.topic, b"\xc1 not msgpack", key=key, partition=partition)
        future.add_done_callback(self._note_bad)
        return future

    def _note_bad(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.bad.append((future.result().partition, future.result().offset))
        self._note_ack(future)

    def _note_ack(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        metadata = future.result()
        if metadata.offset > self.acked.get(metadata.partition, -1):
            self.acked[metadata.partition] = metadata.offset


class StatsFollower(threading.Thread):
    """Notes, per partition, when its stats row (the processed offset ``o``) moved."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, isolation_level: str = "read_uncommitted") -> None:
        super().__init__(daemon=True, name="stats-follower")
        self.bootstrap = bootstrap
        self.isolation_level = isolation_level
        self.topic = topic
        self.partitions = partitions
        #: (monotonic time seen, partition, processed offset)
        self.timeline: list[tuple[float, int, int]] = []
        self._stop_requested = threading.Event()

    def stop(self) -> None:
        self._stop_requested.set()
        self.join(30)

    def run(self) -> None:
        asyncio.run(self._follow())

    async def _follow(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=20,
            isolation_level=self.isolation_level,
        )
        await consumer.start()
        try:
            tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while not self._stop_requested.is_set():
                fetched = await consumer.getmany(timeout_ms=100)
                now = time.monotonic()
                for records in fetched.values():
                    for rec in records:
                        if rec.value is not None:
                            row = msgpack.unpackb(rec.value, raw=False, strict_map_key=False)
                            self.timeline.append((now, int(row["partition"]), int(row["o"])))
        finally:
            await consumer.stop()

    def served_again(self, killed_at: float, offsets: dict[int, int]) -> float | None:
        """Seconds from ``killed_at`` until every partition had processed ``offsets`` (None: never)."""
        reached: dict[int, float] = {}
        for seen, partition, processed in self.timeline:
            if seen >= killed_at and partition not in reached and processed >= offsets.get(partition, -1):
                reached[partition] = seen
        if set(reached) != set(offsets):
            return None
        return max(reached.values()) - killed_at


def get_json(url: str, refusals: int = 20) -> tuple[int, Any]:
    """GET ``url`` as a polite client: a 429 is waited out (its ``Retry-After``) and asked again."""
    import urllib.error
    import urllib.request

    import orjson

    for _ in range(refusals):
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 429:
                return exc.code, exc.read()
            time.sleep(max(float(exc.headers.get("Retry-After") or 0), 0.05))
        except OSError as exc:
            return 0, str(exc)
    return 429, f"refused {refusals} times"


def check_exact(urls: list[str], load: SteadyLoad, memory_budget_entries: int | None = None) -> list[str]:
    """Every view on every worker against what was sent; returns the mismatches (empty: exact)."""
    problems: list[str] = []
    total = load.count
    for url in urls:
        status, stats = get_json(f"{url}/v1/stats")
        if status != 200:
            problems.append(f"{url}/v1/stats answered {status}")
            continue
        for name, expected in (("completed_tasks", total), ("failed_tasks", 0), ("dead_tasks", 0)):
            if stats[name] != expected:
                problems.append(f"{url}: {name} {stats[name]} != {expected}")
        if stats["duplicate_tasks"] != 0:
            problems.append(f"{url}: duplicate_tasks {stats['duplicate_tasks']}")
        if stats["active_agents"] != len(load.agent_ids):
            problems.append(f"{url}: active_agents {stats['active_agents']} != {len(load.agent_ids)}")

    def check_agent(job: tuple[str, str]) -> list[str]:
        url, agent_id = job
        sent = load.sent[agent_id]
        found: list[str] = []
        status, agent = get_json(f"{url}/v1/agents/{agent_id}")
        if status != 200:
            return [f"{agent_id}: agent view answered {status}"]
        counters = agent["stats"]
        if (counters["tasks_completed"], counters["tasks_failed"], counters["tasks_dead"]) != (len(sent.tasks), 0, 0):
            found.append(f"{agent_id}: tasks_completed {counters['tasks_completed']} != {len(sent.tasks)}")
        status, memory = get_json(f"{url}/v1/agents/{agent_id}/memory")
        if not sent.notes:
            return found
        if status != 200:
            return [*found, f"{agent_id}: memory view answered {status}"]
        contents = [entry["content"] for entry in memory["entries"]]
        if memory["written"] != len(sent.notes) or not contents or contents != sent.notes[-len(contents) :]:
            found.append(f"{agent_id}: memory written {memory['written']}/{len(sent.notes)}, holds {contents}")
        found.extend(_chain_breaks(agent_id, memory))
        return found

    def check_task(job: tuple[str, str]) -> list[str]:
        url, task_id = job
        status, row = get_json(f"{url}/v1/tasks/{task_id}")
        if status != 200 or row.get("status") != "completed":
            return [f"{task_id}: task view answered {status} {row!r:.200}"]
        return []

    with ThreadPoolExecutor(8) as pool:
        agent_jobs = [(url, agent) for url in urls for agent in load.agent_ids]
        task_ids = [task_id for sent in load.sent.values() for task_id in sent.tasks]
        # Every task on one worker (the others forward or ask their peers the same way).
        task_jobs = [(urls[i % len(urls)], task_id) for i, task_id in enumerate(task_ids)]
        for found in pool.map(check_agent, agent_jobs):
            problems.extend(found)
        for found in pool.map(check_task, task_jobs):
            problems.extend(found)
    return problems


def read_topic(bootstrap: str, topic: str, partitions: int, isolation_level: str) -> list[Any]:
    """Every record of ``topic`` up to its end now, as a consumer of ``isolation_level`` sees it."""

    async def run() -> list[Any]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level=isolation_level
        )
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            records: list[Any] = []
            deadline = time.monotonic() + 120
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{topic}: not read to its end {ends} within 120 s")
                for recs in (await consumer.getmany(timeout_ms=200)).values():
                    records.extend(recs)
            return records
        finally:
            await consumer.stop()

    return asyncio.run(run())


def check_events(deployment: Any, load: SteadyLoad, exactly_once: bool) -> list[str]:
    """The lifecycle events and dead letters a ``read_committed`` consumer reads, against what was sent.

    Every task has its ``task.completed``, every memory write its
    ``memory.written``, every undecodable record its dead letter; under exactly-once none
    of them twice (at-least-once may repeat those of records replayed after a kill).
    """
    problems: list[str] = []
    events = read_topic(deployment.bootstrap, deployment.topic("events"), deployment.partitions, "read_committed")
    by_id: Counter[str] = Counter()
    memory_writes: Counter[tuple[str, str]] = Counter()
    for record in events:
        event = msgpack.unpackb(record.value, raw=False)
        if event["type"] in ("task.started", "task.completed", "task.failed"):
            by_id[event["event_id"]] += 1
        elif event["type"] == "memory.written":
            memory_writes[(event["agent_id"], event["memory_id"])] += 1
    for agent_id, sent in load.sent.items():
        for task_id in sent.tasks:
            # Only a task that waits in its handler has a task.started (echo and memory writes do not).
            started = by_id.get(wire.task_event_id(task_id, "started"), 0)
            completed = by_id.get(wire.task_event_id(task_id, "completed"), 0)
            if completed == 0 or (exactly_once and (completed > 1 or started > 1)):
                problems.append(f"{task_id}: task.started read {started} times, task.completed {completed} times")
        written = sum(count for (agent, _), count in memory_writes.items() if agent == agent_id)
        distinct = sum(1 for agent, _ in memory_writes if agent == agent_id)
        if distinct < len(sent.notes) or (exactly_once and written != len(sent.notes)):
            problems.append(f"{agent_id}: {len(sent.notes)} memory writes, {written} memory.written events")
    letters = read_topic(deployment.bootstrap, deployment.topic("deadletter"), deployment.partitions, "read_committed")
    lettered: dict[tuple[int, int], list[str]] = {}
    for record in letters:
        letter = msgpack.unpackb(record.value, raw=False)
        copy = f"offset {record.offset} at {letter['ts']}"
        lettered.setdefault((letter["partition"], letter["offset"]), []).append(copy)
    for where in load.bad:
        copies = lettered.pop(where, [])
        if not copies or (exactly_once and len(copies) > 1):
            problems.append(f"undecodable record at {where}: dead-lettered {len(copies)} times {copies}")
    problems.extend(f"dead letter for {where}, which was not a bad record" for where in lettered)
    return problems


def _chain_breaks(agent_id: str, memory: dict[str, Any]) -> list[str]:
    previous: str | None = None
    for entry in memory["entries"]:
        if entry["hash"] != chain_hash(entry["content"], entry["created_at"], entry["prev_hash"]):
            return [f"{agent_id}: entry {entry['id']} does not match its hash"]
        if previous is not None and entry["prev_hash"] != previous:
            return [f"{agent_id}: entry {entry['id']} does not link to the entry before it"]
        previous = entry["hash"]
    if previous != memory["head"]:
        return [f"{agent_id}: the chain does not end at the memory's head"]
    return []


def child_pids(supervisor_pid: int) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text().split()]


@dataclass
class KillReport:
    killed_at: list[float] = field(default_factory=list)
    served_again_s: list[float | None] = field(default_factory=list)


def kill_randomly(
    supervisor_pid: int,
    load: SteadyLoad,
    kills: int,
    every: tuple[float, float],
    rng: random.Random,
    report: KillReport,
) -> dict[float, dict[int, int]]:
    """SIGKILL a random worker process ``kills`` times, ``every`` seconds apart (uniform)."""
    acked_at_kill: dict[float, dict[int, int]] = {}
    for _ in range(kills):
        time.sleep(rng.uniform(*every))
        pids = child_pids(supervisor_pid)
        if not pids:
            continue
        victim = rng.choice(pids)
        acked = load.acked_now()
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        report.killed_at.append(killed_at)
        acked_at_kill[killed_at] = acked
    return acked_at_kill


def served_again(follower: StatsFollower, acked_at_kill: dict[float, dict[int, int]]) -> list[float | None]:
    return [follower.served_again(killed_at, acked) for killed_at, acked in sorted(acked_at_kill.items())]


def wait_all_completed(urls: Iterable[str], total: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending and time.monotonic() < deadline:
        status, stats = get_json(f"{pending[0]}/v1/stats")
        if status == 200 and stats["completed_tasks"] >= total:
            pending.pop(0)
        else:
            time.sleep(0.5)
    if pending:
        status, stats = get_json(f"{pending[0]}/v1/stats")
        raise AssertionError(f"not every {total} tasks completed within {timeout}s on {pending}: {status} {stats}")


def main() -> int:
    """The full kill run: ``python -m tests.chaos`` (see README, "Guarantees")."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=30_000)
    parser.add_argument("--rate", type=float, default=850.0)
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--every", type=float, nargs=2, default=(15.0, 30.0), metavar=("MIN", "MAX"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--engine", choices=("tansu", "kafka"), default="tansu", help="the embedded broker to run on")
    parser.add_argument(
        "--failover",
        action="store_true",
        help="instead: one worker stays, a second joins and is killed for good, --kills times (see run_failover)",
    )
    args = parser.parse_args()
    import tempfile

    from streams.engines.choice import embedded_broker
    from streams.runtime.broker import free_port
    from streams.runtime.settings import Settings
    from tests.harness import Deployment

    tmp = tempfile.mkdtemp(prefix="blackroad-chaos-")
    print(f"logs and data in {tmp}", flush=True)
    home = Settings(embedded_broker_port=free_port(), data_dir=Path(tmp) / "broker")
    broker = embedded_broker(home, args.engine)
    broker.start()
    deployment = Deployment(broker.port, Path(tmp), log_level="warning", engine=args.engine)
    try:
        if args.failover:
            failover = run_failover(deployment, args.agents, args.rate, args.kills, settle=min(args.every))
            print(failover.summary())
            return 0 if not failover.problems else 1
        supervisor = deployment.worker(processes=args.processes).start()
        workers = [supervisor.at(supervisor.port + i) for i in range(args.processes)]
        for worker in workers:
            worker.wait_ready(120)
        result = run_kills(deployment, supervisor, args.agents, args.rate, args.kills, tuple(args.every), args.seed)
    finally:
        deployment.close()  # the workers first: they must not outlive the run
        broker.stop()
    print(result.summary())
    return 0 if result.exact else 1


@dataclass
class KillRun:
    sent: int
    kills: KillReport
    problems: list[str]
    seconds: float

    @property
    def exact(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        served = ", ".join("never" if s is None else f"{s:.1f}" for s in self.kills.served_again_s)
        lines = [
            f"{self.sent} tasks in {self.seconds:.0f} s, {len(self.kills.killed_at)} kills;"
            f" seconds from each kill until every partition was processed past it: {served}",
            "exact: every counter, memory chain, task row, stat, lifecycle event and dead letter"
            if self.exact
            else f"{len(self.problems)} problems:",
        ]
        lines += self.problems[:50]
        return "\n".join(lines)


#: One record in this many of the kill runs' load is undecodable (it must be dead-lettered once).
BAD_EVERY = 97
#: What kills something during a run: called with the load (to note the offsets it had acknowledged
#: at each kill) and the report to fill; returns those offsets by kill time.
Killer = Callable[[SteadyLoad, KillReport], dict[float, dict[int, int]]]


def run_kills(
    deployment: Any, supervisor: Any, agents: int, rate: float, kills: int, every: tuple[float, float], seed: int
) -> KillRun:
    """``kills`` SIGKILLs of a random worker process ``every`` seconds apart, under load; then the exact check."""
    rng = random.Random(seed)
    pid = supervisor.process.pid

    def killer(load: SteadyLoad, report: KillReport) -> dict[float, dict[int, int]]:
        return kill_randomly(pid, load, kills, every, rng, report)

    return run_with_kills(deployment, supervisor, agents, rate, killer, settle=every[0])


def run_with_kills(
    deployment: Any, supervisor: Any, agents: int, rate: float, killer: Killer, settle: float
) -> KillRun:
    """A steady load while ``killer`` kills, then ``settle`` seconds more; then every row checked exactly."""
    started = time.monotonic()
    stats_changelog = f"{deployment.env['BLACKROAD_APP_ID']}-stats-changelog"
    exactly_once = deployment.env.get("BLACKROAD_ENGINE") == "kafka"
    isolation = "read_committed" if exactly_once else "read_uncommitted"
    follower = StatsFollower(deployment.bootstrap, stats_changelog, deployment.partitions, isolation)
    follower.start()
    load = SteadyLoad(
        deployment.bootstrap,
        deployment.topic("tasks"),
        agents,
        rate,
        deployment.partitions,
        bad_every=BAD_EVERY,
        idempotent=exactly_once,
    )
    load.start()
    report = KillReport()
    try:
        acked = killer(load, report)
        time.sleep(settle)
    finally:
        load.stop()
    urls = [supervisor.at(supervisor.port + i).url for i in range(supervisor.processes)]
    wait_all_completed(urls, load.count, 300)
    time.sleep(1.0)  # the stats changelog reaches the follower a flush later
    follower.stop()
    report.served_again_s = served_again(follower, acked)
    problems = check_exact(urls, load)
    problems += check_events(deployment, load, exactly_once)
    return KillRun(load.count, report, problems, time.monotonic() - started)


@dataclass
class FailoverRun:
    sent: int
    #: Seconds from each kill until the survivor had processed every partition past it.
    served_again_s: list[float | None]
    problems: list[str]

    def summary(self) -> str:
        served = ", ".join("never" if s is None else f"{s:.1f}" for s in self.served_again_s)
        verdict = "exact" if not self.problems else f"{len(self.problems)} problems:"
        return "\n".join(
            [
                f"{self.sent} tasks, {len(self.served_again_s)} workers killed for good;"
                f" their partitions served again after: {served} s",
                verdict,
                *self.problems[:50],
            ]
        )


def run_failover(deployment: Any, agents: int, rate: float, rounds: int, settle: float) -> FailoverRun:
    """One worker stays; ``rounds`` times a second one joins, takes half the partitions and is SIGKILLed.

    Nothing restarts the killed worker: its partitions wait for the group to notice (the
    session timeout), move to the survivor, and are restored there from the changelogs.
    """
    exactly_once = deployment.env.get("BLACKROAD_ENGINE") == "kafka"
    isolation = "read_committed" if exactly_once else "read_uncommitted"
    stats_changelog = f"{deployment.env['BLACKROAD_APP_ID']}-stats-changelog"
    survivor = deployment.worker().start().wait_ready(90)
    follower = StatsFollower(deployment.bootstrap, stats_changelog, deployment.partitions, isolation)
    follower.start()
    load = SteadyLoad(
        deployment.bootstrap, deployment.topic("tasks"), agents, rate, deployment.partitions, bad_every=BAD_EVERY
    )
    load.start()
    kills: dict[float, dict[int, int]] = {}
    try:
        for _ in range(rounds):
            second = deployment.worker().start().wait_ready(90)
            time.sleep(settle)
            acked = load.acked_now()
            second.kill()
            kills[time.monotonic()] = acked
            time.sleep(settle)
    finally:
        load.stop()
    wait_all_completed([survivor.url], load.count, 300)
    time.sleep(1.0)  # the stats changelog reaches the follower a flush later
    follower.stop()
    problems = check_exact([survivor.url], load) + check_events(deployment, load, exactly_once)
    return FailoverRun(load.count, served_again(follower, kills), problems)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
