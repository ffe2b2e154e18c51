"""Exactly-once on Kafka: each flush is one transaction per input partition.

A flush (see :class:`streams.processing.tables.TableWriter`) carries everything the batches since
the last one did: changed rows for the changelogs, lifecycle events, dead letters, tasks
sent on to their agent's partition, and the batches' next input offsets. Here the part
caused by each input partition is one Kafka transaction, offsets included
(``send_offsets_to_transaction``): a reader with ``isolation.level=read_committed``, and
the next owner of the partition, see all of it or none of it. A crash before the commit
replays the batches on top of state that never saw them; nothing appears twice.

Fencing. Every input partition has its own transactional id, ``<app id>-<tasks
topic>-<partition>``. A worker assigned a partition starts that id's producer before it
restores the partition's tables or reads its committed offset: the broker then aborts
whatever transaction the previous owner left open and refuses that owner's producer from
then on (``ProducerFenced``), so a worker that lost its partitions without noticing
(stalled past its session, say) cannot commit rows or offsets on top of the new owner's.
Kafka Streams' exactly-once v2 fences with one producer per worker and the consumer
group's generation in each offset commit; aiokafka's transactional offset commit does
not carry the generation, so the fencing here is per partition, as Kafka Streams'
original exactly-once was. It costs a producer per assigned partition.

A failed transaction stops the worker (the flush's waiters get the error): its stores
hold effects the broker does not, so it starts again from the changelogs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from streams.processing.log_continuity import VerifiedProducer
from streams.processing.tables import Outgoing, Records, send_bulk
from streams.runtime import kafka_clients
from streams.runtime.settings import Settings

log = logging.getLogger(__name__)

#: How long a transaction may stay open before the broker aborts it. A worker killed in a
#: flush leaves one open until the partition's next owner starts its producer, or this.
TRANSACTION_TIMEOUT_MS = 30_000
#: Seconds a transactional producer keeps trying to start while the broker is coming back
#: (a claim runs inside a rebalance: it may wait, but not without end).
START_PATIENCE = 15.0


class NotOwner(RuntimeError):
    """A flush has records of an input partition this worker has no producer for."""


def transactional_id(settings: Settings, partition: int) -> str:
    """The transactional id of input partition ``partition``: the same for every owner."""
    return f"{settings.app_id}-{settings.topic('tasks')}-{partition}"


class TransactionalSender:
    """Sends each flush as one transaction per input partition, offsets included."""

    takes_offsets = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.group_id = settings.app_id
        self.tasks_topic = settings.topic("tasks")
        #: The transactional producer of each input partition this worker owns.
        self._producers: dict[int, AIOKafkaProducer] = {}
        self._verified: dict[int, VerifiedProducer] = {}

    @property
    def partitions(self) -> set[int]:
        return set(self._producers)

    def sends_for(self, partition: int) -> bool:
        """Whether a flush may hold records caused by input partition ``partition``."""
        return partition in self._producers

    async def claim(self, partitions: set[int]) -> None:
        """Start the producers of newly assigned input partitions, fencing their previous owners.

        Returns once the broker has aborted any transaction a previous owner left open, so
        the changelogs and committed offsets read next are final.
        """
        new = sorted(partitions - set(self._producers))
        started = await asyncio.gather(*(self._start(partition) for partition in new), return_exceptions=True)
        failure: BaseException | None = None
        for partition, outcome in zip(new, started, strict=True):
            if isinstance(outcome, BaseException):
                failure = failure or outcome
            else:
                self._producers[partition] = outcome
                self._verified[partition] = VerifiedProducer(outcome)
        if failure is not None:
            raise failure

    async def release(self, partitions: set[int]) -> None:
        """Stop the producers of input partitions this worker no longer owns."""
        gone = [self._producers.pop(partition) for partition in sorted(partitions) if partition in self._producers]
        for partition in partitions:
            self._verified.pop(partition, None)
        await asyncio.gather(*(_stop_quietly(producer) for producer in gone))

    async def stop(self) -> None:
        await self.release(set(self._producers))

    async def _start(self, partition: int) -> AIOKafkaProducer:
        """A started transactional producer for ``partition``; a broker that is coming back
        (no metadata yet, no coordinator) is tried again for up to :data:`START_PATIENCE` s."""
        deadline = asyncio.get_running_loop().time() + START_PATIENCE
        delay = 0.2
        while True:
            try:
                return await self._start_once(partition)
            except (KafkaError, AssertionError) as exc:
                # aiokafka asserts "Did we not perform bootstrap?" when a metadata response
                # named no broker, as a broker resumed after a hang may answer at first.
                retriable = isinstance(exc, AssertionError) or isinstance(exc, KafkaConnectionError) or exc.retriable
                if not retriable or asyncio.get_running_loop().time() + delay > deadline:
                    raise
                log.warning("transactional producer of partition %d not started (%r); trying again", partition, exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def _start_once(self, partition: int) -> AIOKafkaProducer:
        producer = kafka_clients.producer(
            self.settings,
            transactional_id=transactional_id(self.settings, partition),
            transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
            acks="all",
            linger_ms=0,
            max_batch_size=1024 * 1024,
            max_request_size=4 * 1024 * 1024,
            client_id=f"{self.settings.app_id}-tables-{partition}",
        )
        try:
            await producer.start()
        except BaseException:
            await _stop_quietly(producer)
            raise
        return producer

    async def send(self, outgoing: Outgoing, offsets: dict[Any, int]) -> list[asyncio.Future[Any]]:
        """Commit the flush, one transaction per input partition (concurrently); return once all are."""
        records: dict[int, list[tuple[str, int, Records]]] = {}
        for (topic, partition, source), batch in outgoing.items():
            records.setdefault(source, []).append((topic, partition, batch))
        positions: dict[int, dict[TopicPartition, int]] = {}
        for tp, offset in offsets.items():
            positions.setdefault(tp.partition, {})[TopicPartition(tp.topic, tp.partition)] = offset
        sources = sorted(set(records) | set(positions))
        missing = [source for source in sources if source not in self._producers]
        if missing:
            raise NotOwner(f"a flush has records of input partitions {missing}, which this worker does not own")
        await asyncio.gather(
            *(self._commit(source, records.get(source, []), positions.get(source, {})) for source in sources)
        )
        return []

    async def _commit(
        self,
        source: int,
        records: list[tuple[str, int, Records]],
        offsets: dict[TopicPartition, int],
    ) -> None:
        producer = self._producers[source]
        verified = self._verified[source]
        await producer.begin_transaction()
        futures: list[asyncio.Future[Any]] = []
        for topic, partition, batch in records:
            futures.extend(await send_bulk(verified, topic, partition, batch))
        if offsets:
            await producer.send_offsets_to_transaction(offsets, self.group_id)
        await producer.commit_transaction()
        # Delivered with the commit; a broker that lost data fails these (log_continuity).
        await asyncio.gather(*futures)


async def _stop_quietly(producer: AIOKafkaProducer) -> None:
    try:
        await producer.stop()
    except Exception as exc:  # noqa: BLE001 - a fenced or cut-off producer still has to be let go
        log.debug("producer stopped with %r", exc)
