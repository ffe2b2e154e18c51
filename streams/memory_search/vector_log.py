"""The memory entries' vectors, kept on the broker so that indexing a partition need not embed again.

An entry's vector depends only on its content and the model, and an entry's id never
changes its content, so vectors are derived state that is never wrong, only missing.
Each worker sends the vectors it computed for a batch, one record per partition and
batch (several for a batch too large for one: :data:`RECORD_BYTES`), to a topic per
model (``<prefix>.memory-vectors.<model>``) partitioned like the
tasks topic. A worker that gets a partition (at start, after a rebalance or a failover)
reads that partition of the topic first and embeds only the entries it does not find
there: on this machine reading is tens of times faster than embedding.

Records are sent on their own, after the batch: neither in the flush's transaction nor
awaited by it. A vector lost with a crash is computed again by the next rebuild; one
sent by a worker that lost the partition is as right as any other.

| key | value (msgpack) |
|---|---|
| the first entry id of the record | ``{"ids": [entry id, ...], "v": float16 rows, C order}`` |
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import msgpack
import numpy as np
from aiokafka import AIOKafkaProducer, TopicPartition

from streams.processing.transport import fetch_highwaters
from streams.runtime import kafka_clients
from streams.runtime.settings import Settings

log = logging.getLogger(__name__)

#: Records waiting to be sent; beyond this a batch's vectors are dropped (the next rebuild
#: embeds them): a broker that is away must not make the worker hold vectors without end.
MAX_WAITING = 10_000
#: Bytes of vectors per record: half of Kafka's default record limit (``max.message.bytes``,
#: 1 MB), so a backlog's batch of thousands of entries goes in several records, not one
#: the broker refuses.
RECORD_BYTES = 512 * 1024


def vector_topic(prefix: str, model: str) -> str:
    """The topic of one model's vectors (a vector of another model is of no use)."""
    return f"{prefix}.memory-vectors.{re.sub(r'[^a-zA-Z0-9_-]+', '-', model).strip('-').lower()}"


def encode(ids: list[str], vectors: np.ndarray) -> bytes:
    packed: bytes = msgpack.packb({"ids": ids, "v": np.ascontiguousarray(vectors, dtype=np.float16).tobytes()})
    return packed


def decode(value: bytes, dimensions: int) -> tuple[list[str], np.ndarray]:
    record = msgpack.unpackb(value)
    ids: list[str] = record["ids"]
    vectors = np.frombuffer(record["v"], dtype=np.float16)
    if vectors.size != len(ids) * dimensions:
        raise ValueError(f"{len(ids)} ids but {vectors.size} values for {dimensions} dimensions")
    return ids, vectors.reshape(len(ids), dimensions)


class StoredVectors:
    """Vectors read back from the topic, by entry id."""

    def __init__(self, dimensions: int) -> None:
        self.dimensions = dimensions
        self._row_of: dict[str, tuple[int, int]] = {}
        self._chunks: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._row_of)

    def add(self, ids: list[str], vectors: np.ndarray) -> None:
        chunk = len(self._chunks)
        self._chunks.append(vectors)
        row_of = self._row_of
        for row, entry_id in enumerate(ids):
            row_of[entry_id] = (chunk, row)

    def get(self, entry_id: str) -> np.ndarray | None:
        where = self._row_of.get(entry_id)
        return None if where is None else self._chunks[where[0]][where[1]]


class VectorLog:
    def __init__(self, bootstrap: Settings | str, topic: str, dimensions: int, client_id: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.dimensions = dimensions
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._waiting: asyncio.Queue[tuple[int, int, bytes, bytes]] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None
        #: Vectors the broker has, and those dropped (the queue was full or the broker refused them).
        self.sent = 0
        self.dropped = 0

    async def start(self) -> None:
        self._producer = kafka_clients.producer(
            self.bootstrap,
            acks=1,
            linger_ms=50,
            max_request_size=8 * 1024 * 1024,
            client_id=f"{self.client_id}-vectors",
        )
        await self._producer.start()
        self._sender = asyncio.create_task(self._send_waiting(self._producer), name="memory-vectors")

    async def stop(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            try:
                await self._sender
            except asyncio.CancelledError:
                pass
        if self._producer is not None:
            await self._producer.stop()

    def send(self, partition: int, ids: list[str], vectors: np.ndarray) -> None:
        """Queue one partition's vectors of a batch (sent in the background)."""
        rows = max(1, RECORD_BYTES // (2 * self.dimensions))
        for start in range(0, len(ids), rows):
            part = ids[start : start + rows]
            if self._waiting.qsize() >= MAX_WAITING:
                self.dropped += len(part)
                continue
            value = encode(part, vectors[start : start + rows])
            self._waiting.put_nowait((partition, len(part), part[0].encode(), value))

    async def _send_waiting(self, producer: AIOKafkaProducer) -> None:
        while True:
            partition, count, key, value = await self._waiting.get()
            try:
                delivered = await producer.send(self.topic, value, key=key, partition=partition)
            except Exception as exc:  # noqa: BLE001 - a cache: what is not sent is embedded again
                self._dropped(partition, count, exc)
            else:
                delivered.add_done_callback(lambda done, p=partition, n=count: self._delivered(done, p, n))

    def _delivered(self, done: asyncio.Future[Any], partition: int, count: int) -> None:
        if done.cancelled():
            self.dropped += count
        elif (exc := done.exception()) is not None:
            self._dropped(partition, count, exc)
        else:
            self.sent += count

    def _dropped(self, partition: int, count: int, exc: BaseException) -> None:
        self.dropped += count
        log.warning("%d memory vectors not sent to %s[%d]: %s", count, self.topic, partition, exc)

    async def read(self, partitions: set[int], timeout: float = 60.0) -> StoredVectors:
        """The vectors stored for ``partitions``, read to the end the topic had when called.

        What cannot be read in ``timeout`` seconds (a broker away) is left out: the caller
        embeds those entries instead.
        """
        stored = StoredVectors(self.dimensions)
        consumer = kafka_clients.consumer(
            self.bootstrap,
            enable_auto_commit=False,
            # From the start, never from the end: a reset to "latest" racing the seek below
            # would skip every record.
            auto_offset_reset="earliest",
            client_id=f"{self.client_id}-vectors-reader",
            max_partition_fetch_bytes=16 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
        )
        deadline = time.monotonic() + timeout
        try:
            await asyncio.wait_for(consumer.start(), timeout)
            tps = [TopicPartition(self.topic, partition) for partition in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await fetch_highwaters(self.bootstrap, tps, max(0.1, deadline - time.monotonic()))
            waiting = {tp for tp in tps if ends[tp] > 0}
            while waiting and time.monotonic() < deadline:
                fetched: dict[Any, list[Any]] = await consumer.getmany(*waiting, timeout_ms=200)
                for tp, records in fetched.items():
                    for record in records:
                        if record.offset < ends[tp] and record.value is not None:
                            self._add_record(stored, record.value)
                    if records and records[-1].offset >= ends[tp] - 1:
                        waiting.discard(tp)
                for tp in list(waiting):
                    if await consumer.position(tp) >= ends[tp]:
                        waiting.discard(tp)
            log.info(
                "read %d memory vectors of partitions %s (to offsets %s)",
                len(stored),
                sorted(partitions),
                [ends[tp] for tp in tps],
            )
            if waiting:
                unread = sorted(tp.partition for tp in waiting)
                log.warning("memory vectors of partitions %s not read within %.0f s", unread, timeout)
        except Exception as exc:  # noqa: BLE001 - a cache: what is not read is embedded
            log.warning("memory vectors of partitions %s not read: %s", sorted(partitions), exc)
        finally:
            await consumer.stop()
        return stored

    def _add_record(self, stored: StoredVectors, value: bytes) -> None:
        try:
            ids, vectors = decode(value, self.dimensions)
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            log.warning("a record of %s is not a vector record: %s", self.topic, exc)
            return
        stored.add(ids, vectors)
