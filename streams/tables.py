"""The materialized tables and the writer that keeps their changelogs.

| table   | key                  | value (msgpack map)                                          |
|---------|----------------------|--------------------------------------------------------------|
| agents  | agent id             | status, type, counters, avg response, last activity          |
| tasks   | task id              | status, result or error, attempts, timestamps, request       |
| memory  | agent id             | working memory: system message + recent turns, token count   |
| stats   | ``partition-NNNN``   | counters, latency histograms, per-second completion windows  |

All four are Faust tables with changelog topics partitioned like the tasks topic.
A row lives in the partition of the event that wrote it (its agent's partition).

Faust writes one changelog record per table write, each awaited; :class:`TableWriter`
instead keeps a record cache like Kafka Streams: rows change in the stores at once and
their changelog records are produced in bulk, one per changed key per flush interval.
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

    def put(self, key: str, value: Any, partition: int) -> None:
        self.rows[key] = value
        self._key_partition[key] = partition

    def delete(self, key: str) -> None:
        self.rows.pop(key, None)
        self._key_partition.pop(key, None)

    def partition_of(self, key: str) -> int | None:
        return self._key_partition.get(key)


class TableWriter:
    """A record cache over the table stores: writes coalesce per key across batches.

    * :meth:`put` changes a row in its store at once (web views see it) and marks the key
      dirty; the first change of a key in a batch remembers its old value for
      :meth:`rollback`.
    * :meth:`end_batch` sends the batch's other records (lifecycle events, dead letters)
      and returns what the batch's offsets must wait for: those records and the next
      changelog flush.
    * :meth:`flush` produces one changelog record per dirty key, the row's latest value
      however many events changed it since the last flush, and resolves the waiting
      batches once the broker has them all.
    """

    def __init__(self, producer: Any, stores: dict[str, RowStore]) -> None:
        self._producer = producer
        self.stores = stores
        # (table, key) -> partition, for rows changed since the last flush
        self._dirty: dict[tuple[str, str], int] = {}
        # (table, key) -> (partition, value before this batch or _MISSING)
        self._undo: dict[tuple[str, str], tuple[int, Any]] = {}
        # (topic, partition) -> [(key, value)] of other records (lifecycle, dead letters)
        self._records: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = {}
        self._next_flush: asyncio.Future[None] | None = None

    def get(self, table: str, key: str) -> Any:
        return self.stores[table].rows.get(key)

    def touched(self, table: str, key: str) -> bool:
        """Whether this batch already changed the row (and so owns a private copy)."""
        return (table, key) in self._undo

    def put(self, table: str, key: str, value: Any, partition: int) -> None:
        store = self.stores[table]
        marker = (table, key)
        if marker not in self._undo:
            self._undo[marker] = (partition, store.rows.get(key, _MISSING))
            self._dirty[marker] = partition
        store.put(key, value, partition)

    def delete(self, table: str, key: str) -> None:
        """Remove a row; its changelog gets a tombstone at the next flush."""
        store = self.stores[table]
        partition = store.partition_of(key)
        if partition is None:
            return
        marker = (table, key)
        if marker not in self._undo:
            self._undo[marker] = (partition, store.rows.get(key, _MISSING))
            self._dirty[marker] = partition
        store.delete(key)

    def emit(self, topic: str, partition: int, key: bytes | None, value: bytes) -> None:
        """Queue one record for another topic, sent at the end of the batch."""
        self._records.setdefault((topic, partition), []).append((key, value))

    @property
    def dirty(self) -> int:
        return len(self._dirty)

    async def end_batch(self) -> tuple[int, list[asyncio.Future[Any]]]:
        """Send the batch's queued records; return their count and what to wait for."""
        sent = 0
        waits: list[asyncio.Future[Any]] = []
        for (topic, partition), records in self._records.items():
            sent += len(records)
            waits.extend(await self._send_bulk(topic, partition, records))
        self._records = {}
        if self._undo:
            if self._next_flush is None:
                self._next_flush = asyncio.get_running_loop().create_future()
            waits.append(self._next_flush)
        self._undo = {}
        return sent, waits

    async def flush(self) -> int:
        """Produce the changelog of every dirty row; return how many records were sent."""
        outgoing: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = {}
        for (table, key), partition in self._dirty.items():
            store = self.stores[table]
            value = store.rows.get(key)
            packed = None if value is None else pack(value)
            outgoing.setdefault((store.changelog_topic, partition), []).append((key.encode(), packed))
        self._dirty = {}
        waiting, self._next_flush = self._next_flush, None
        futures: list[asyncio.Future[Any]] = []
        try:
            for (topic, partition), records in outgoing.items():
                futures.extend(await self._send_bulk(topic, partition, records))
        except BaseException as exc:
            if waiting is not None and not waiting.done():
                waiting.set_exception(exc)
            raise
        if waiting is not None:
            _resolve_when_all_done(waiting, futures)
        return sum(len(records) for records in outgoing.values())

    def rollback(self) -> None:
        """Put every row this batch changed back as it was before the batch."""
        for (table, key), (partition, before) in self._undo.items():
            store = self.stores[table]
            if before is _MISSING:
                store.delete(key)
            else:
                store.put(key, before, partition)
        # Rows stay dirty: re-sending a restored value is harmless.
        self._undo = {}
        self._records = {}

    async def _send_bulk(
        self, topic: str, partition: int, records: list[tuple[bytes | None, bytes | None]]
    ) -> list[asyncio.Future[Any]]:
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


def _resolve_when_all_done(target: asyncio.Future[None], futures: list[asyncio.Future[Any]]) -> None:
    """Resolve ``target`` once every future is done (failing it if any failed)."""

    def copy_outcome(gathered: asyncio.Future[Any]) -> None:
        if target.done():
            return
        if gathered.cancelled():
            target.cancel()
        elif gathered.exception() is not None:
            target.set_exception(gathered.exception())  # type: ignore[arg-type]
        else:
            target.set_result(None)

    asyncio.gather(*futures).add_done_callback(copy_outcome)
