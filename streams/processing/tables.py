"""The materialized tables and the writer that keeps their changelogs.

| table   | key                  | value (msgpack map; tasks: an array of ``state.TASK_FIELDS``) |
|---------|----------------------|--------------------------------------------------------------|
| agents  | agent id             | status, type, counters, avg response, last activity          |
| tasks   | task id              | status, result or error, attempts, timestamps, request       |
| memory  | agent id             | working memory: system message + recent turns, token count   |
| memory_entries | entry id      | an entry that left working memory: its tier (episodic, semantic) |
| stats   | ``partition-NNNN``   | counters, latency histograms, per-second completion windows  |

All five are Faust tables with changelog topics partitioned like the tasks topic.
A row lives in the partition of the event that wrote it (its agent's partition).

Faust writes one changelog record per table write, each awaited; :class:`TableWriter`
instead keeps a record cache like Kafka Streams: rows change in the stores at once and
their changelog records are produced in bulk, one per changed key per flush interval.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faust
import msgpack
from faust.serializers import codecs

from schemas import wire
from streams.cold_rows import ColdRow, RowFile
from streams.processing import state
from streams.processing.state import TERMINAL_TASK_STATUSES

TABLE_NAMES = ("agents", "tasks", "memory", "memory_entries", "stats")
_MISSING = object()
#: Flushes that may be on their way to the producer at once; the next waits for the oldest.
MAX_HANDOVERS = 2


#: A frozen row: a row kept as its changelog bytes between the batches that change it.
#:
#: A finished task is read rarely (a lookup, a duplicate, the retention sweep) but stays
#: for the whole retention period; an agent's working memory is read only by the tasks
#: that use it. One bytes object instead of a tree of dicts and strings cuts their memory
#: several times, and bytes are not tracked by the garbage collector at all: hundreds of
#: thousands of finished tasks cost its collections nothing. The value is a header of
#: the row's ``"o"`` and a task's completion time (:data:`_FROZEN_HEADER`), then the
#: changelog value, so neither replay checks nor the retention sweep decode it.
FrozenRow = bytes
_FROZEN_HEADER = struct.Struct("<qq")
_FROZEN_VALUE_AT = _FROZEN_HEADER.size


def frozen_row(offset: int, finished_at: int, packed: bytes) -> FrozenRow:
    """A row frozen as its changelog value ``packed``, its ``"o"`` and its finish time (0: none)."""
    return _FROZEN_HEADER.pack(offset, finished_at) + packed


def frozen_offset(row: FrozenRow) -> int:
    """A frozen row's ``"o"``."""
    offset: int = _FROZEN_HEADER.unpack_from(row)[0]
    return offset


def frozen_finished_at(row: FrozenRow) -> int:
    """A frozen task's completion time (ms)."""
    finished_at: int = _FROZEN_HEADER.unpack_from(row)[1]
    return finished_at


def frozen_value(row: FrozenRow) -> bytes:
    """A frozen row's changelog value."""
    return row[_FROZEN_VALUE_AT:]


def decode_row(packed: bytes | memoryview) -> Any:
    """A changelog value as a row: a map as it is, a task row's array as its map."""
    row = msgpack.unpackb(packed, raw=False, strict_map_key=False)
    return state.task_from_values(row) if type(row) is list else row


def row_offset(row: Any) -> int:
    """The source offset of the last event applied to a stored row (frozen, in a file, or not)."""
    if type(row) is bytes:
        return frozen_offset(row)
    if type(row) is ColdRow:
        return frozen_offset(row.read())
    offset: int = row["o"]
    return offset


def newer(incoming: dict[str, Any], current: Any) -> bool:
    """Whether a changelog row may replace the stored one: it has applied at least as much.

    Rows of a partition change only with that partition's events, so a row's ``"o"``
    orders its versions; a record with a lower one is an older copy (written late by a
    worker that had lost the partition) and must not win over the newer row.
    """
    return current is None or incoming["o"] >= row_offset(current)


def thaw(value: Any) -> Any:
    """A row as a plain value (a frozen row decoded, read from its file first if it is there;
    anything else as is)."""
    if type(value) is bytes:
        return decode_row(memoryview(value)[_FROZEN_VALUE_AT:])
    if type(value) is ColdRow:
        return decode_row(memoryview(value.read())[_FROZEN_VALUE_AT:])
    return value


def task_expired(value: Any, cutoff_ms: int) -> bool:
    """Whether a stored task (frozen or not) is past retention; frozen ones are not decoded."""
    if type(value) is bytes:
        return frozen_finished_at(value) < cutoff_ms
    if type(value) is ColdRow:
        return frozen_finished_at(value.read()) < cutoff_ms
    return state.task_expired(value, cutoff_ms)


def expired_task_ids(rows: dict[str, Any], cutoff_ms: int, limit: int) -> list[str]:
    """Up to ``limit`` ids of tasks past retention, oldest first, without scanning every row.

    Rows sit in the order tasks started (and, after a restore, finished), so the scan
    stops at the first finished task that is not expired yet and skips running ones. A
    task that finished sooner but started later waits for a later sweep; until then
    readers already treat it as gone (:func:`task_expired`).
    """
    expired: list[str] = []
    for task_id, row in rows.items():
        if task_expired(row, cutoff_ms):
            expired.append(task_id)
            if len(expired) >= limit:
                break
        elif type(row) is bytes or type(row) is ColdRow or row["status"] in TERMINAL_TASK_STATUSES:
            break
    return expired


def _task_finished_at(row: Any) -> int | None:
    """When a task row stopped changing: its completion time once it is terminal."""
    if row.get("status") in TERMINAL_TASK_STATUSES:
        finished: int | None = row.get("completed_at")
        return finished
    return None


def _memory_finished_at(row: Any) -> int:
    """Working memory freezes whenever its batch ends; it has no finish time (0)."""
    return 0


#: Per table: which rows freeze once packed for the changelog (and a task's finish time);
#: None leaves a row as it is. Agent and stats rows change with nearly every batch; a
#: memory entry that left working memory changes only when it moves to another tier.
FREEZE_WHEN: dict[str, Callable[[Any], int | None]] = {
    "tasks": _task_finished_at,
    "memory": _memory_finished_at,
    "memory_entries": _memory_finished_at,
}


#: Tables whose every row is kept frozen: restoring one needs only its ``"o"`` from the record.
ALWAYS_FROZEN = frozenset(name for name, rule in FREEZE_WHEN.items() if rule is _memory_finished_at)


#: Tables whose changed rows freeze when their batch ends, not at the flush. Task rows
#: that freeze are put frozen as they finish (:meth:`CachedTable.put_final`).
FREEZE_AT_BATCH_END = frozenset({"memory"})

#: Rows of a table that freezes at the batch's end may stay thawed between batches (the
#: ``hot_limit`` of its :class:`CachedTable`, in bytes of their changelog values): an agent
#: that writes memory in batch after batch would otherwise have its working memory decoded
#: and encoded again at every batch, which was a third of a memory-heavy stream's time over
#: 30,000 agents. A new row counts as this many bytes until its first flush packs it.
NEW_ROW_BYTES = 512
#: What a thawed working-memory row takes in the heap, for its changelog value's size
#: (measured: 2.6 times for 40 entries, 4.2 for one); see ``WORKING_MEMORY_CACHE_MB``.
THAWED_PER_PACKED = 3


def freeze(freeze_when: Callable[[Any], int | None] | None, row: Any, packed: bytes) -> Any:
    """``row`` frozen as ``packed`` if its table's rule freezes it, else as is."""
    finished_at = freeze_when(row) if freeze_when is not None else None
    return row if finished_at is None else frozen_row(row["o"], finished_at, packed)


#: Tables whose frozen rows move to a file (:mod:`streams.cold_rows`) once their changelog
#: record is packed, out of the Python heap: a finished task and a memory entry that left
#: working memory are written once and read now and then (a lookup, a duplicate, a search
#: hit), and a worker holds hundreds of thousands of them for the whole retention period
#: (a memory entry took 690 bytes in the heap; a :class:`ColdRow` takes 56). Kept in
#: the heap, they also pinned the allocator's arenas long after they were gone: the small
#: objects that outlive them land in the same arenas.
ROWS_IN_FILES = frozenset({"tasks", "memory_entries"})


def in_row_file(row_file: RowFile | None, row: Any) -> Any:
    """A row as its table's store keeps it once its changelog record is packed (or restored):
    in the table's row file if the row is frozen and the table has one, else as is."""
    if row_file is not None and type(row) is bytes:
        return row_file.keep(row)
    return row


def apply_changelog(
    table: str,
    rows: dict[str, Any],
    records: list[Any],
    row_file: RowFile | None = None,
    key_partition: dict[str, int] | None = None,
    partition: int = 0,
) -> None:
    """Apply one partition's changelog records of ``table`` to ``rows``, in offset order, as
    recovery, standbys and read replicas do (``key_partition`` notes each key's partition).

    A row is replaced only by a record at least as new (see :func:`newer`). A row of a table
    whose rows are all kept frozen is not decoded: only its ``"o"`` is read (its strings
    left as bytes): 0.70 instead of 1.14 microseconds for a memory entry of 414 bytes.
    """
    freeze_when = FREEZE_WHEN.get(table)
    frozen = table in ALWAYS_FROZEN
    for record in records:
        key = record.key.decode()
        value = record.value
        if value is None:
            rows.pop(key, None)
            if key_partition is not None:
                key_partition.pop(key, None)
            continue
        current = rows.get(key)
        if frozen:
            offset: int = msgpack.unpackb(value, raw=True)[b"o"]
            if current is not None and offset < row_offset(current):
                continue
            rows[key] = in_row_file(row_file, frozen_row(offset, 0, value))
        else:
            row = decode_row(value)
            if not newer(row, current):
                continue
            rows[key] = in_row_file(row_file, freeze(freeze_when, row, value))
        if key_partition is not None:
            key_partition[key] = partition


#: Per table whose changelog values are arrays rather than maps: a row as its array.
AS_ARRAY: dict[str, Callable[[dict[str, Any]], list[Any]]] = {"tasks": state.task_values}


class MsgpackCodec(codecs.Codec):
    def _dumps(self, obj: Any) -> bytes:
        return msgpack.packb(obj, use_bin_type=True)

    def _loads(self, s: bytes) -> Any:
        return decode_row(s)


_pack = wire.encode


@dataclass(frozen=True)
class Tables:
    agents: Any
    tasks: Any
    memory: Any
    memory_entries: Any
    stats: Any

    def all(self) -> dict[str, Any]:
        return {
            "agents": self.agents,
            "tasks": self.tasks,
            "memory": self.memory,
            "memory_entries": self.memory_entries,
            "stats": self.stats,
        }


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
        memory_entries=table("memory_entries", "Entries that left working memory, by entry id."),
        stats=table("stats", "Precomputed stats by partition."),
    )


class CachedTable:
    """One table's in-memory rows, with what the writer tracks for it.

    Keeps Faust's key->partition index, so Faust still knows which partition each row
    belongs to. ``undo`` holds each row's value from before the current batch (for
    :meth:`TableWriter.rollback`); ``dirty`` the keys changed since the last flush;
    ``carried`` what the keys' next changelog records carry beside the rows (:meth:`carry`).
    """

    __slots__ = (
        "_as_array",
        "_key_partition",
        "carried",
        "carrying",
        "changelog_topic",
        "dirty",
        "freeze_when",
        "hot",
        "hot_bytes",
        "hot_limit",
        "name",
        "row_file",
        "rows",
        "undo",
    )

    def __init__(self, name: str, table: Any, row_file: RowFile | None = None, hot_limit: int = 0) -> None:
        store = table.data
        self.name = name
        #: Where the table's frozen rows go, if not in the heap (see :data:`ROWS_IN_FILES`).
        self.row_file = row_file
        self.freeze_when = FREEZE_WHEN.get(name)
        #: Rows kept thawed, least recently changed first, with their changelog values' size
        #: when last packed (see :data:`NEW_ROW_BYTES`), up to ``hot_limit`` bytes in all.
        self.hot: dict[str, int] = {}
        self.hot_bytes = 0
        self.hot_limit = hot_limit
        self._as_array = AS_ARRAY.get(name)
        self.rows: dict[str, Any] = store.data
        self._key_partition: dict[str, int] = store._key_partition  # noqa: SLF001
        self.changelog_topic: str = table.changelog_topic.get_topic_name()
        self.undo: dict[str, tuple[int, Any]] = {}
        self.dirty: dict[str, int] = {}
        #: Fields for the keys' next changelog records: of the batches since the last flush,
        #: and of the batch in progress (moved over when it ends, dropped if it is rolled back).
        self.carried: dict[str, dict[str, list[Any]]] = {}
        self.carrying: dict[str, dict[str, list[Any]]] = {}

    def carry(self, key: str, name: str, item: Any) -> None:
        """Add ``item`` to the list ``name`` that the key's next changelog record carries beside
        the row. The row itself never holds it (a row restored from that record does), and it
        is dropped at that flush, whether the key's row is written then or not."""
        fields = self.carrying.get(key)
        if fields is None:
            self.carrying[key] = {name: [item]}
        else:
            fields.setdefault(name, []).append(item)

    def end_carrying(self) -> None:
        """The batch ended: what it carries waits for the flush."""
        for key, fields in self.carrying.items():
            held = self.carried.setdefault(key, {})
            for name, items in fields.items():
                held.setdefault(name, []).extend(items)
        self.carrying = {}

    def get(self, key: str) -> Any:
        """The row as a plain value (frozen rows decoded), or None."""
        return thaw(self.rows.get(key))

    def touched(self, key: str) -> bool:
        """Whether this batch already changed the row (and so owns a private copy)."""
        return key in self.undo

    def put(self, key: str, value: Any, partition: int) -> None:
        """Change a row now (web views see it at once); its changelog record follows at the next flush."""
        if key not in self.undo:
            self.undo[key] = (partition, self.rows.get(key, _MISSING))
            self.dirty[key] = partition
        self.rows[key] = value
        self._key_partition[key] = partition

    def put_final(self, key: str, value: Any, partition: int) -> None:
        """Put a row this batch will not change again, frozen at once if the table's rule says so.

        Its dicts then die with the batch instead of living until the next flush.
        """
        self.put(key, self.frozen(value, self.pack(value)), partition)

    def put_finished(self, key: str, values: list[Any], finished_at: int, partition: int) -> None:
        """Put a row that is finished for good, given as its changelog array (``values[0]`` is
        its ``"o"``): frozen at once, without a map ever being built."""
        self.put(key, frozen_row(values[0], finished_at, _pack(values)), partition)

    def pack(self, row: dict[str, Any]) -> bytes:
        """A row as its changelog value."""
        return _pack(row) if self._as_array is None else _pack(self._as_array(row))

    def frozen(self, value: Any, packed: bytes) -> Any:
        """``value`` frozen as ``packed`` if this table freezes it now, else as is."""
        return freeze(self.freeze_when, value, packed)

    def wants_compaction(self) -> bool:
        """Whether the table's row file holds as much dead as live and may be compacted now:
        between batches, so that the rows to move are the store's alone."""
        return self.row_file is not None and not self.undo and self.row_file.needs_compaction()

    async def compact_row_file(self) -> None:
        """Move the live rows to a new segment of the row file, on a thread (processing goes on)."""
        row_file = self.row_file
        assert row_file is not None
        new = row_file.start_compaction()
        # Taken here, on the event loop: the rows change only there.
        live = [row for row in self.rows.values() if type(row) is ColdRow]
        await asyncio.to_thread(row_file.move, live, new)
        row_file.end_compaction()

    def freeze_changed(self) -> None:
        """Freeze the rows this batch changed that the table's rule freezes (at the batch's end),
        except those changed most recently, which stay thawed until they cool: up to
        ``hot_limit`` bytes of their changelog values.

        Frozen at once rather than at the flush, a second or more later under load: an
        agent's working memory is read and written again only by its next tasks, and
        thousands of them live as dicts meanwhile would hold over 100 MB.
        """
        rows = self.rows
        hot = self.hot
        for key, (_, before) in self.undo.items():
            if type(rows.get(key)) is dict:
                size = hot.pop(key, -1)
                if size < 0:  # thawed by this batch, or new
                    size = len(before) if type(before) is bytes else NEW_ROW_BYTES
                    self.hot_bytes += size
                hot[key] = size  # now the most recently changed
        while self.hot_bytes > self.hot_limit and hot:
            key = next(iter(hot))
            self.hot_bytes -= hot.pop(key)
            value = rows.get(key)
            if type(value) is dict:
                rows[key] = self.frozen(value, self.pack(value))

    def packed_thawed(self, key: str, size: int) -> None:
        """A row that stays thawed was packed for its changelog: its value's ``size`` counts now."""
        before = self.hot.get(key)
        if before is not None:
            self.hot[key] = size
            self.hot_bytes += size - before

    def keeps_thawed(self, key: str) -> bool:
        """Whether the row stays thawed after its changelog record is packed."""
        return key in self.hot

    def writable(self, key: str, partition: int, copy: Callable[[Any], Any]) -> Any:
        """The row to change in this batch, in place; None if absent.

        On first touch in a batch a ``copy`` of the row goes to the undo log. The live row
        keeps its identity: a long-lived row stays in the collector's old generation, and
        only the copy, dropped when the batch ends, is young.
        """
        if key in self.undo:
            return self.rows.get(key)
        current = self.rows.get(key)
        if current is None:
            return None
        if type(current) is bytes or type(current) is ColdRow:
            row = thaw(current)
            self.put(key, row, partition)
            return row
        self.undo[key] = (partition, copy(current))
        self.dirty[key] = partition
        return current

    def partition_of(self, key: str) -> int | None:
        """The partition of a row this table holds (None when it holds no such row)."""
        return self._key_partition.get(key)

    def delete(self, key: str) -> None:
        """Remove a row; its changelog gets a tombstone at the next flush."""
        partition = self._key_partition.get(key)
        if partition is None:
            return
        if key not in self.undo:
            self.undo[key] = (partition, self.rows.get(key, _MISSING))
            self.dirty[key] = partition
        self.rows.pop(key, None)
        self._key_partition.pop(key, None)

    def rollback(self) -> None:
        for key, (partition, before) in self.undo.items():
            if before is _MISSING:
                self.rows.pop(key, None)
                self._key_partition.pop(key, None)
            else:
                self.rows[key] = before
                self._key_partition[key] = partition
        # Rows stay dirty: re-sending a restored value is harmless.
        self.undo = {}
        self.carrying = {}


#: Records to produce as one flat list of keys and values: key, value, key, value, ...
#: Records wait for their flush (up to a second under load); a tuple each would be one more
#: object per record for the garbage collector to walk in the meantime.
Records = list[bytes | None]

#: Records to produce, by (topic, partition, source partition): the source partition is the
#: input partition whose records caused them (their transaction's, under exactly-once).
Outgoing = dict[tuple[str, int, int], Records]


class DirectSender:
    """At-least-once: a flush's records go straight to the producer.

    The input offsets are committed by the consumer once the broker has every record
    (:meth:`streams.processing.processor.BatchProcessor.acknowledge`), so a crash in between replays
    them: rows stay exact (see :mod:`streams.processing.state`), other records may appear twice.
    """

    #: Whether a flush carries the input offsets (it does not: the consumer commits them).
    takes_offsets = False

    def __init__(self, producer: Any, last: frozenset[str] = frozenset()) -> None:
        self._producer = producer
        #: Topics whose records of a flush go once the broker has the rest of it, and that the
        #: next flush waits for: a record there must never outlive, through a crash, the row
        #: versions it comes from, and a row's next version must not land before it.
        self._last = last

    def sends_for(self, partition: int) -> bool:
        """Whether a flush may hold records caused by input partition ``partition``: any."""
        return True

    async def send(self, outgoing: Outgoing, offsets: dict[Any, int]) -> list[asyncio.Future[Any]]:
        """Hand every record to the producer; return the futures of their acknowledgements."""
        futures: list[asyncio.Future[Any]] = []
        held: list[tuple[str, int, Records]] = []
        for (topic, partition, _source), records in outgoing.items():
            if topic in self._last:
                held.append((topic, partition, records))
            else:
                futures.extend(await send_bulk(self._producer, topic, partition, records))
        if held:
            await asyncio.gather(*futures)
            last: list[asyncio.Future[Any]] = []
            for topic, partition, records in held:
                last.extend(await send_bulk(self._producer, topic, partition, records))
            await asyncio.gather(*last)
            futures.extend(last)
        return futures


class TableWriter:
    """A record cache over the table stores: writes coalesce per key across batches.

    * rows change in their :class:`CachedTable` at once; the first change of a key in a
      batch remembers its old value for :meth:`rollback`;
    * :meth:`outbox` queues records for other topics (lifecycle events, dead letters);
    * :meth:`end_batch` closes a batch and returns what its offsets must wait for: the
      next flush;
    * :meth:`flush` produces one changelog record per dirty key, the row's latest value
      however many events changed it since the last flush, and the queued records of
      every batch since, then resolves the waiting batches once the broker has them all.

    How a flush reaches the broker is the sender's: :class:`DirectSender` (at-least-once)
    or :class:`streams.processing.exactly_once.TransactionalSender`, whose flushes also carry the
    input offsets of the batches they close.

    Outgoing records wait for the flush like Kafka Streams' producer lingers: a few
    large produce requests instead of one per batch, which costs the broker and the
    worker far less at a light load.
    """

    def __init__(self, sender: Any, tables: dict[str, CachedTable]) -> None:
        self._sender = sender
        self._takes_offsets: bool = sender.takes_offsets
        self.tables = tables
        # (topic, partition, source) -> [(key, value)] of other records (lifecycle, dead letters):
        # those of the batch in progress, and those of finished batches waiting for the flush.
        self._batch: Outgoing = {}
        self._outgoing: Outgoing = {}
        self._outgoing_count = 0
        #: Input offsets of the batches since the last flush (when the sender takes them).
        self._offsets: dict[Any, int] = {}
        self._next_flush: asyncio.Future[None] | None = None
        #: Flushes whose records are on their way to the producer, oldest first.
        self._handovers: deque[asyncio.Future[None]] = deque()
        #: Row file compactions in progress (see :meth:`CachedTable.compact_row_file`).
        self._compactions: list[asyncio.Future[None]] = []

    def sends_for(self, partition: int) -> bool:
        """Whether rows of input partition ``partition`` may change now: under exactly-once,
        only while this worker holds the partition's producer (not between a revoke and the
        next claim, while the rows of a partition given away are still in the stores)."""
        sends: bool = self._sender.sends_for(partition)
        return sends

    def outbox(self, topic: str, partition: int) -> Records:
        """The records queued for ``topic``/``partition`` in this batch (append keys and values).

        They belong to the input partition of the same number.
        """
        records = self._batch.get((topic, partition, partition))
        if records is None:
            records = self._batch[(topic, partition, partition)] = []
        return records

    def emit(self, topic: str, partition: int, key: bytes | None, value: bytes, source: int = -1) -> None:
        """Queue one record for another topic, sent with the next flush.

        ``source`` is the input partition it comes from, when not ``partition`` itself.
        """
        origin = partition if source < 0 else source
        records = self._batch.get((topic, partition, origin))
        if records is None:
            records = self._batch[(topic, partition, origin)] = []
        records.append(key)
        records.append(value)

    @property
    def dirty(self) -> int:
        """Changed rows, queued records and input offsets waiting for the next flush."""
        return sum(len(table.dirty) for table in self.tables.values()) + self._outgoing_count + len(self._offsets)

    def end_batch(self, offsets: dict[Any, int] | None = None) -> list[asyncio.Future[Any]]:
        """Close the batch; return what its offsets wait for (the next flush), if anything.

        ``offsets`` are the batch's next input offsets, kept for the flush when the sender
        commits them with it.
        """
        changed = bool(self._batch)
        for key, records in self._batch.items():
            if records:
                self._outgoing.setdefault(key, []).extend(records)
                self._outgoing_count += len(records) // 2
        self._batch = {}
        for table in self.tables.values():
            if table.carrying:
                table.end_carrying()
            if table.undo:
                changed = True
                if table.name in FREEZE_AT_BATCH_END:
                    table.freeze_changed()
                table.undo = {}
        if offsets and self._takes_offsets:
            self._offsets.update(offsets)
            changed = True
        if not changed:
            return []
        if self._next_flush is None:
            self._next_flush = asyncio.get_running_loop().create_future()
        return [self._next_flush]

    async def flush(self) -> int:
        """Hand the changelog of every dirty row and the queued records to the producer.

        Rows are packed now; the records go to the producer in the background, in flush
        order, so the next batches are processed while the broker takes this one. A flush
        waits only while ``MAX_HANDOVERS`` earlier ones are still being handed over.
        Returns how many records this flush sends.
        """
        outgoing = self._take_outgoing()
        self._compact_row_files()
        offsets, self._offsets = self._offsets, {}
        waiting, self._next_flush = self._next_flush, None
        while len(self._handovers) >= MAX_HANDOVERS:
            await self._handovers.popleft()
        previous = self._handovers[-1] if self._handovers else None
        self._handovers.append(asyncio.ensure_future(self._send_all(outgoing, offsets, waiting, previous)))
        return sum(len(records) for records in outgoing.values()) // 2

    def _compact_row_files(self) -> None:
        """Start compacting the row files that need it; a compaction that failed fails the flush."""
        running = []
        for compaction in self._compactions:
            if compaction.done():
                compaction.result()
            else:
                running.append(compaction)
        for table in self.tables.values():
            if table.wants_compaction():
                running.append(asyncio.ensure_future(table.compact_row_file()))
        self._compactions = running

    async def sent(self) -> None:
        """Wait until every flush so far is with the producer, and every compaction is done
        (raising the first failure)."""
        if self._compactions:
            compactions, self._compactions = self._compactions, []
            await asyncio.gather(*compactions)
        failure: Exception | None = None
        while self._handovers:
            try:
                await self._handovers.popleft()
            except Exception as exc:  # noqa: BLE001 - the rest are still awaited, then it is raised
                failure = failure or exc
        if failure is not None:
            raise failure

    def _take_outgoing(self) -> Outgoing:
        """Pack every dirty row (freezing those the table freezes) and take the queued records."""
        outgoing: Outgoing = {}
        for table in self.tables.values():
            rows = table.rows
            topic = table.changelog_topic
            freezes = table.freeze_when is not None
            row_file = table.row_file
            carried = table.carried
            by_partition: dict[int, Records] = {}
            for key, partition in table.dirty.items():
                records = by_partition.get(partition)
                if records is None:
                    records = by_partition[partition] = outgoing[(topic, partition, partition)] = []
                value = rows.get(key)
                extra = carried.get(key) if carried else None
                if value is None:
                    packed = None
                elif extra is not None:
                    packed = table.pack({**thaw(value), **extra})  # the row stays without them
                elif type(value) is bytes:
                    packed = frozen_value(value)
                    if row_file is not None:
                        rows[key] = row_file.keep(value)
                elif type(value) is ColdRow:
                    packed = frozen_value(value.read())
                else:
                    packed = table.pack(value)
                    if freezes and table.keeps_thawed(key):
                        table.packed_thawed(key, len(packed))
                    elif freezes:
                        rows[key] = in_row_file(row_file, table.frozen(value, packed))
                records.append(key.encode())
                records.append(packed)
            table.dirty = {}
            table.carried = {}
        outgoing.update(self._outgoing)
        self._outgoing = {}
        self._outgoing_count = 0
        return outgoing

    async def _send_all(
        self,
        outgoing: Outgoing,
        offsets: dict[Any, int],
        waiting: asyncio.Future[None] | None,
        previous: asyncio.Future[None] | None,
    ) -> None:
        """Send one flush's records after the previous flush's (a failed one fails this too)."""
        try:
            if previous is not None:
                await asyncio.shield(previous)
            futures = await self._sender.send(outgoing, offsets)
        except BaseException as exc:
            if waiting is not None and not waiting.done():
                waiting.set_exception(exc)
            raise
        if waiting is not None:
            _resolve_when_all_done(waiting, futures)

    def rollback(self) -> None:
        """Put every row this batch changed back as it was before the batch."""
        for table in self.tables.values():
            table.rollback()
        self._batch = {}


async def send_bulk(producer: Any, topic: str, partition: int, records: Records) -> list[asyncio.Future[Any]]:
    """Hand ``records`` to ``producer`` in as few batches as fit; return their delivery futures."""
    futures = []
    batch = producer.create_batch()
    append = batch.append
    for index in range(0, len(records), 2):
        key = records[index]
        value = records[index + 1]
        if append(key=key, value=value, timestamp=None) is None:
            futures.append(await producer.send_batch(batch, topic, partition=partition))
            batch = producer.create_batch()
            append = batch.append
            if append(key=key, value=value, timestamp=None) is None:
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
