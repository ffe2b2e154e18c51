"""Failed tasks back on the tasks topic once their backoff is over, without holding anything up.

A failed attempt with attempts left does not wait in the worker: the agent runner writes
the task's row as ``queued`` and, in the same flush, a ``task.retry`` event (the task, the
attempt it asks for and when it is due) to the retries topic, whose partitions match the
tasks topic's. The relay, one in every worker process and all of them one consumer group
over the retries topic, reads those events as they come, holds each until it is due and
then puts it on the tasks topic's partition of the same number, where the agent's worker
runs it in its turn like any other event.

Offsets are committed up to the oldest event not yet relayed, so a relay that dies or
loses a partition leaves the rest to the next owner, who relays them again from there.
An event relayed twice changes nothing the second time: the runner takes a ``task.retry``
only while the task's row still waits for exactly that attempt.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from schemas import wire
from streams.runtime import kafka_clients
from streams.runtime.membership import client_id
from streams.runtime.settings import Settings

log = logging.getLogger(__name__)

#: Longest a relay waits in one fetch, so a due event is relayed at most this late (seconds).
FETCH_WAIT = 0.1
#: Seconds the relay's consumer gets to leave its group when the relay stops. Its group
#: (``<app id>-retries``) may be in a rebalance (after a SIGKILL of every worker, until the
#: dead members' sessions end; on Tansu, a join takes seconds), and aiokafka's stop waits
#: for the join to finish. Nothing is lost by not waiting: the relay commits an offset only
#: once the records before it are delivered.
STOP_WAIT = 0.5


class _Pending(ConsumerRebalanceListener):  # type: ignore[misc]
    """The events read and not yet relayed, by partition, due-first across partitions."""

    def __init__(self) -> None:
        self.due: list[tuple[int, int, int, bytes | None, bytes]] = []
        #: Offsets read and not relayed yet, by partition.
        self.open: dict[int, set[int]] = {}
        #: The next offset to read, by partition (commits go no further).
        self.read_to: dict[int, int] = {}

    def add(self, partition: int, offset: int, key: bytes | None, value: bytes) -> None:
        try:
            due = wire.retry_due_ms(value)
        except wire.WireError as exc:
            log.warning("retries topic partition %d offset %d skipped: %s", partition, offset, exc)
            due = 0  # relayed at once: the tasks topic dead-letters what it cannot take
        heapq.heappush(self.due, (due, partition, offset, key, value))
        self.open.setdefault(partition, set()).add(offset)
        self.read_to[partition] = offset + 1

    def commit_points(self) -> dict[int, int]:
        """By partition, the offset up to which every event was relayed."""
        return {p: min(self.open.get(p) or {end}) for p, end in self.read_to.items()}

    async def on_partitions_revoked(self, revoked: Any) -> None:
        lost = {tp.partition for tp in revoked}
        self.due = [entry for entry in self.due if entry[1] not in lost]
        heapq.heapify(self.due)
        for partition in lost:
            self.open.pop(partition, None)
            self.read_to.pop(partition, None)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None


class RetryRelay:
    """Moves due ``task.retry`` events from the retries topic to the tasks topic."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.retries_topic = settings.topic("retries")
        self.tasks_topic = settings.topic("tasks")
        self.pending = _Pending()
        self.relayed = 0

    async def run(self) -> None:
        """Relay until cancelled."""
        settings = self.settings
        self.pending = _Pending()  # what an earlier run read and did not relay is read again
        consumer = self.consumer()
        producer = kafka_clients.producer(settings, acks="all", client_id=relay_client_id(settings))
        await producer.start()
        try:
            await consumer.start()
            try:
                consumer.subscribe([self.retries_topic], listener=self.pending)
                await self._relay(consumer, producer)
            finally:
                await _stop_within(consumer, STOP_WAIT)
        finally:
            await producer.stop()

    def consumer(self) -> AIOKafkaConsumer:
        """The relay's consumer, in its group with the liveness settings of the tasks' group.

        With aiokafka's own (a 10 s session) a killed worker's relay partitions waited 10 s
        for the group to notice, and Tansu holds a join for half the session: 5 s.
        """
        settings = self.settings
        return kafka_clients.consumer(
            settings,
            group_id=relay_group(settings),
            client_id=relay_client_id(settings),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed" if settings.exactly_once else "read_uncommitted",
            session_timeout_ms=int(settings.group_session_timeout * 1000),
            heartbeat_interval_ms=int(settings.heartbeat_interval * 1000),
        )

    async def _relay(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        pending = self.pending
        committed: dict[int, int] = {}
        loop = asyncio.get_running_loop()
        while True:
            wait = FETCH_WAIT if not pending.due else max(0.0, min(FETCH_WAIT, pending.due[0][0] / 1000 - _now()))
            asked = loop.time()
            fetched = await consumer.getmany(timeout_ms=int(wait * 1000), max_records=10_000)
            if not fetched and (idle := wait - (loop.time() - asked)) > 0:
                # A consumer with no partitions yet (or none at all: more workers than
                # partitions) answers at once; the relay must not spin on the worker's loop.
                await asyncio.sleep(idle)
            for tp, records in fetched.items():
                for record in records:
                    if record.value is not None:
                        pending.add(tp.partition, record.offset, record.key, record.value)
            now_ms = wire.now_ms()
            sends = []
            while pending.due and pending.due[0][0] <= now_ms:
                _, partition, offset, key, value = heapq.heappop(pending.due)
                sends.append((partition, offset, await producer.send(self.tasks_topic, value, key, partition)))
            for partition, offset, delivery in sends:
                await delivery
                opened = pending.open.get(partition)
                if opened is not None:
                    opened.discard(offset)
                self.relayed += 1
            points = {p: o for p, o in pending.commit_points().items() if committed.get(p) != o}
            assigned = consumer.assignment()
            points = {p: o for p, o in points.items() if TopicPartition(self.retries_topic, p) in assigned}
            if points:
                await consumer.commit({TopicPartition(self.retries_topic, p): o for p, o in points.items()})
                committed.update(points)


def relay_group(settings: Settings) -> str:
    """The consumer group of the relays of every worker process."""
    return f"{settings.app_id}-retries"


def relay_client_id(settings: Settings) -> str:
    """This process's relay consumer's client id: per worker process, like the tasks' group's
    (:mod:`streams.runtime.membership`), so that a restarted process removes the member its
    predecessor's relay left instead of the group's join waiting for that member's session."""
    return f"{client_id(settings)}-retries"


async def _stop_within(consumer: AIOKafkaConsumer, seconds: float) -> None:
    try:
        await asyncio.wait_for(consumer.stop(), seconds)
    except TimeoutError:
        log.info("the retry relay's consumer did not leave its group within %g s; not waiting for it", seconds)


def _now() -> float:
    return wire.now_ms() / 1000


async def run_until_cancelled(relay: RetryRelay) -> None:
    """Run ``relay``; errors other than cancellation are logged and it starts again."""
    while True:
        try:
            await relay.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the broker may come and go; the relay resumes
            log.warning("retry relay stopped (%s: %s); starting again in 1 s", type(exc).__name__, exc)
            await asyncio.sleep(1.0)
