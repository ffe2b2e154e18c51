"""The materialized tables and the writer that keeps their changelogs.

| table   | key                  | value (msgpack map)                                          |
|---------|----------------------|--------------------------------------------------------------|
| agents  | agent id             | status, type, counters, avg response, last activity          |
| tasks   | task id              | status, result or error, attempts, timestamps, request       |
| memory  | agent id             | working memory: system message + recent turns, token count   |
| stats   | ``partition-NNNN``   | counters, latency histograms, per-second completion windows  |

All four are Faust tables with changelog topics partitioned like the tasks topic.
A row lives in the partition of the event that wrote it (its agent's partition).

:class:`TableWriter` writes rows straight into the table stores (visible to web views
at once) and remembers which keys a batch touched. :meth:`TableWriter.send` then
produces one changelog record per touched key - the row's final value, however many
events changed it - in bulk. The batch's offsets are committed only once the broker has
all of them (see :class:`streams.processor.BatchProcessor`). :meth:`TableWriter.rollback` undoes a batch that could
not be flushed, so the stores never hold effects that the changelog lacks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import faust
import msgpack
from faust.serializers import codecs

from schemas import wire

TABLE_NAMES = ("agents", "tasks", "memory", "stats")
_MISSING = object()


class MsgpackCodec(codecs.Codec):
    def _dumps(self, obj: Any) -> bytes:
        return msgpack.packb(obj, use_bin_type=True)

    def _loads(self, s: bytes) -> Any:
        return msgpack.unpackb(s, raw=False, strict_map_key=False)


def pack(value: Any) -> bytes:
    return wire.encode(value)


@dataclass(frozen=True)
class Tables:
    agents: Any
    tasks: Any
    memory: Any
    stats: Any

    def all(self) -> dict[str, Any]:
        return {"agents": self.agents, "tasks": self.tasks, "memory": self.memory, "stats": self.stats}


def define_tables(app: faust.App, partitions: int) -> Tables:
    codecs.register("msgpack", MsgpackCodec())

    def table(name: str, help_text: str) -> Any:
        changelog = app.topic(
            f"{app.conf.id}-{name}-changelog",
            key_type=str,
            key_serializer="raw",
            value_serializer="msgpack",
            partitions=partitions,
            compacting=True,
            acks=False,
            internal=True,
        )
        return app.Table(
            name, default=None, key_type=str, partitions=partitions, changelog_topic=changelog, help=help_text
        )

    return Tables(
        agents=table("agents", "Agent state and counters by agent id."),
        tasks=table("tasks", "Task status and outcome by task id."),
        memory=table("memory", "Working memory by agent id."),
        stats=table("stats", "Precomputed stats by partition."),
    )


class RowStore:
    """Direct access to one table's in-memory rows, keeping Faust's key->partition index."""

    def __init__(self, table: Any) -> None:
        self.table = table
        store = table.data
        self.rows: dict[str, Any] = store.data
        self._key_partition: dict[str, int] = store._key_partition  # noqa: SLF001
        self.changelog_topic: str = table.changelog_topic.get_topic_name()

    def get(self, key: str) -> Any:
        return self.rows.get(key)

    def put(self, key: str, value: Any, partition: int) -> None:
        self.rows[key] = value
        self._key_partition[key] = partition

    def delete(self, key: str) -> None:
        self.rows.pop(key, None)
        self._key_partition.pop(key, None)


class TableWriter:
    """Coalesced table writes within a batch, flushed to the changelogs in bulk."""

    def __init__(self, producer: Any, stores: dict[str, RowStore]) -> None:
        self._producer = producer
        self.stores = stores
        # (table, key) -> (partition, value before the batch or _MISSING)
        self._touched: dict[tuple[str, str], tuple[int, Any]] = {}
        # (topic, partition) -> [(key, value)] of other records (lifecycle, dead letters)
        self._records: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = {}

    def get(self, table: str, key: str) -> Any:
        return self.stores[table].rows.get(key)

    def touched(self, table: str, key: str) -> bool:
        return (table, key) in self._touched

    def put(self, table: str, key: str, value: Any, partition: int) -> None:
        store = self.stores[table]
        marker = (table, key)
        if marker not in self._touched:
            self._touched[marker] = (partition, store.rows.get(key, _MISSING))
        store.put(key, value, partition)

    def emit(self, topic: str, partition: int, key: bytes | None, value: bytes) -> None:
        """Queue one record for another topic, sent with the batch's changelog."""
        self._records.setdefault((topic, partition), []).append((key, value))

    @property
    def pending(self) -> int:
        return len(self._touched) + sum(len(r) for r in self._records.values())

    async def send(self) -> tuple[int, list[asyncio.Future[Any]]]:
        """Hand the batch's changelog and queued records to the producer.

        Returns how many records were sent and the futures that resolve once the broker
        has them; the batch's offsets may be committed only after that.
        """
        outgoing = self._records
        for (table, key), (partition, _) in self._touched.items():
            store = self.stores[table]
            value = store.rows.get(key)
            packed = None if value is None else pack(value)
            outgoing.setdefault((store.changelog_topic, partition), []).append((key.encode(), packed))
        sent = 0
        futures = []
        for (topic, partition), records in outgoing.items():
            sent += len(records)
            futures.extend(await self._send_bulk(topic, partition, records))
        self._touched = {}
        self._records = {}
        return sent, futures

    def rollback(self) -> None:
        """Put every row the batch touched back as it was before the batch."""
        for (table, key), (partition, before) in self._touched.items():
            store = self.stores[table]
            if before is _MISSING:
                store.delete(key)
            else:
                store.put(key, before, partition)
        self._touched = {}
        self._records = {}

    async def _send_bulk(
        self, topic: str, partition: int, records: list[tuple[bytes | None, bytes | None]]
    ) -> list[Any]:
        producer = self._producer
        futures = []
        batch = producer.create_batch()
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"record for {topic} larger than the producer's max batch size")
        if batch.record_count():
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        return futures
