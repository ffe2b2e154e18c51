"""The batch processor: decode, route, run agent handlers, commit.

One call handles everything one fetch returned, across partitions:

1. decode and validate each record; bad ones go to the dead-letter topic, tasks keyed
   by something other than their agent go on to the agent's partition;
2. group tasks by agent and hand each agent's tasks to :class:`AgentRunner`, which
   runs them and folds the outcomes into the task, agent, memory and stats rows;
3. go on with the next batch: changed rows reach their changelogs, and lifecycle events
   and dead letters their topics, in bulk once per flush interval (see
   :class:`streams.processing.tables.TableWriter`). Under exactly-once each flush is a transaction
   that also commits the batches' input offsets (:mod:`streams.processing.exactly_once`); under
   at-least-once, once the broker has all the records a batch depends on, its offsets
   are marked processed so the consumer's next commit includes them.

Flushes are frequent (``flush_interval``) while the worker keeps up with its input, so
events and stats follow the tasks closely, and five times rarer by default
(``backlog_flush_interval``) while a batch leaves records waiting on the broker: then
most rows change several times between flushes and each is written once.

Replays after a crash are idempotent either way: see :mod:`streams.processing.state`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from agents.registry import HandlerRegistry
from schemas import trace_context, wire
from schemas.wire import TaskEvent, WireError
from streams.processing.agent_runner import AgentRunner, BatchStats, Item
from streams.processing.log_continuity import ends_below, fingerprint, other_record
from streams.processing.metrics import Metrics
from streams.processing.tables import TableWriter, expired_task_ids
from streams.runtime.settings import Settings
from streams.tracing.spans import TaskTracer

Partitioner = Callable[[bytes], int]
#: Changed rows and queued records that force a flush before the flush interval is up.
_MAX_DIRTY_ROWS = 100_000
#: Bytes of record values processed in one go: a fetch of packed ``task.batch`` events
#: can hold far more tasks than records, and web views must not wait for all of them.
_CHUNK_BYTES = 1024 * 1024
#: Most tasks in one record of those a ``task.batch``'s tasks of other partitions are sent on in.
SPREAD = 64
#: Expired tasks removed per call of :meth:`BatchProcessor.expire_tasks`.
EXPIRY_CHUNK = 5_000


class BatchProcessor:
    def __init__(
        self,
        settings: Settings,
        writer: TableWriter,
        registry: HandlerRegistry,
        metrics: Metrics,
        partition_for: Partitioner,
        on_processed: Callable[[dict[Any, int]], None],
        highwater: Callable[[Any], int | None],
        lock: asyncio.Lock,
        rebalances: Callable[[], int] = lambda: 0,
    ) -> None:
        self.settings = settings
        self.writer = writer
        self.metrics = metrics
        self.partition_for = partition_for
        self.on_processed = on_processed
        self.highwater = highwater
        self.lock = lock
        #: How many rebalances this worker has seen so far (see :meth:`__call__`).
        self.rebalances = rebalances
        self.stats = BatchStats(writer.tables["stats"])
        self.runner = AgentRunner(settings, writer, registry, metrics, self.stats)
        #: Batches whose records are not all acknowledged by the broker yet.
        #: With their traced tasks (whose last span ends when the broker has their rows).
        self._unacked: asyncio.Queue[tuple[list[asyncio.Future[Any]], dict[Any, int], list[Item]]] = asyncio.Queue()
        self._last_flush = time.monotonic()
        #: Whether the last batch left records waiting on the broker (then flushes are rarer).
        self.behind = False
        self.tasks_topic = settings.topic("tasks")
        self.dead_letter_topic = settings.topic("deadletter")
        #: The batch's ``memory.accessed`` events by agent: ``(partition, offset, event)``.
        self.accesses: dict[str, list[tuple[int, int, wire.MemoryAccess]]] = {}
        #: The memory search index's keeper (:class:`streams.memory_search.indexer.MemoryIndexer`),
        #: told of each batch's memory changes; None with memory search off.
        self.indexer: Any = None
        #: Records the spans of traced tasks (streams.tracing); None without a trace collector.
        self.tracer: TaskTracer | None = None
        #: The batch's traced tasks, with a tracer.
        self.traced: list[Item] = []

    def trace_with(self, tracer: TaskTracer) -> None:
        """Record the spans of the traced tasks from now on."""
        self.tracer = tracer
        self.runner.keep_outcomes = True

    @property
    def in_flight(self) -> int:
        """Tasks inside handlers right now on this worker."""
        return self.runner.in_flight

    async def __call__(self, batch: dict[Any, list[Any]], fetched_in: int | None = None) -> None:
        """Process a fetch; ``fetched_in`` is :attr:`rebalances` when it was fetched.

        A fetch that waited for the lock while a rebalance went on is dropped: its
        partitions were drained and may have moved (or come back); their records come
        again from the committed offsets, and processing this copy too would emit its
        lifecycle events and dead letters twice.
        """
        if fetched_in is None:
            fetched_in = self.rebalances()
        for chunk in _chunks(batch, _CHUNK_BYTES):
            if not await self._process_chunk(chunk, fetched_in):
                return

    async def _process_chunk(self, batch: dict[Any, list[Any]], fetched_in: int) -> bool:
        async with self.lock:
            if self.rebalances() != fetched_in:
                self.metrics.stale_batches.inc()
                return False
            started = time.perf_counter()
            try:
                offsets, count = await self._process(batch)
                waits = self.writer.end_batch(offsets)
            except BaseException:
                self.writer.rollback()
                self.runner.take_memory_changes()
                self.traced = []
                raise
            written, left, promoted = self.runner.take_memory_changes()
            if self.indexer is not None and (written or left or promoted):
                self.indexer.batch_done(written, left, promoted)
            # The next batch starts while this one's records wait for the flush.
            self._unacked.put_nowait((waits, offsets, self.traced))
            self.traced = []
            produced = await self._flush() if self._flush_due() else 0
            self.metrics.batch_done(count, produced, time.perf_counter() - started, self.runner.finished)
            self.runner.finished = Counter()
            return True

    def _flush_due(self) -> bool:
        dirty = self.writer.dirty
        settings = self.settings
        interval = settings.backlog_flush_interval if self.behind else settings.flush_interval
        return dirty > 0 and (dirty >= _MAX_DIRTY_ROWS or time.monotonic() - self._last_flush >= interval)

    async def _flush(self) -> int:
        if self.indexer is not None:
            await self.indexer.flushing()  # the previous flush's entries are searchable
        self._last_flush = time.monotonic()
        return await self.writer.flush()

    async def flush_if_due(self) -> None:
        """Called on a timer, so rows changed by the last batch of a burst reach the changelog."""
        async with self.lock:
            if self._flush_due():
                self.metrics.events_out.inc(await self._flush())

    async def acknowledge(self) -> None:
        """Mark batches processed, in order, once the broker has all their records.

        Runs for the life of the worker. A failed delivery raises here and stops the
        worker: its stores hold effects the changelog may lack, so it must restart
        from the changelog and the last committed offsets.
        """
        while True:
            waits, offsets, traced = await self._unacked.get()
            try:
                for future in waits:
                    await future
                self.on_processed(offsets)
                if traced and self.tracer is not None:
                    self.tracer.tasks_written(traced, time.time_ns())
            finally:
                self._unacked.task_done()

    async def expire_tasks(self, older_than_ms: int, limit: int = EXPIRY_CHUNK) -> int:
        """Remove finished tasks completed before ``older_than_ms`` from the live table.

        Takes at most ``limit`` rows per call and holds the batch lock only while it finds
        and deletes them, so processing is never held up for long.
        """
        async with self.lock:
            tasks = self.writer.tables["tasks"]
            found = expired_task_ids(tasks.rows, older_than_ms, limit)
            # Rows of a partition being given away or taken over stay for its owner's sweep.
            sends_for = self.writer.sends_for
            expired = [
                task_id for task_id in found if (part := tasks.partition_of(task_id)) is not None and sends_for(part)
            ]
            for task_id in expired:
                tasks.delete(task_id)
            waits = self.writer.end_batch()
            if expired:
                await self._flush()
        # The tombstones are on the broker before the rows count as expired.
        for wait in waits:
            await wait
        self.metrics.tasks_expired.inc(len(expired))
        return len(expired)

    async def flush_changed_rows(self) -> None:
        """Hand every changed row to the producer now (on shutdown; caller holds the lock)."""
        await self._flush()
        await self.writer.sent()

    async def drain(self) -> None:
        """Flush and wait until every batch so far is acknowledged (caller holds the lock)."""
        await self._flush()
        await self.writer.sent()
        await self._unacked.join()

    async def _process(self, batch: dict[Any, list[Any]]) -> tuple[dict[Any, int], int]:
        now = wire.now_ms()
        by_agent: dict[str, list[Item]] = {}
        offsets: dict[Any, int] = {}
        count = 0
        behind = False
        self.stats.reset()
        accesses = self.accesses = {}
        for tp, records in batch.items():
            partition = tp.partition
            stats = self.stats.row(partition)
            base = self.stats.base[partition]
            end = self.highwater(tp)
            _check_continuity(tp, records, stats, end)
            for record in records:
                self._route(record, partition, stats, base, by_agent)
            count += len(records)
            last = records[-1]
            offsets[tp] = last.offset + 1
            if last.offset > stats["o"]:
                stats["o"] = last.offset
                stats["f"] = fingerprint(last)
            stats["pending"] = max(0, end - offsets[tp]) if end is not None else 0
            behind = behind or stats["pending"] > 0
            self.metrics.consumer_lag.labels(partition=str(partition)).set(stats["pending"])
        self.behind = behind
        self.metrics.events_in.inc(count)
        pending: list[Awaitable[None]] = []
        run = self.runner.run
        for agent_id, items in by_agent.items():
            remainder = run(agent_id, items, now, accesses.pop(agent_id, None) if accesses else None)
            if remainder is not None:
                pending.append(remainder)
        for agent_id, agent_accesses in accesses.items():  # agents with no task in the batch
            self.runner.count_accesses(agent_id, agent_accesses)
        if pending:
            await asyncio.gather(*pending)
        return offsets, count

    def _route(
        self, record: Any, partition: int, stats: dict[str, Any], stats_base: int, by_agent: dict[str, list[Item]]
    ) -> None:
        try:
            events, refused, access = wire.decode_record(record.value)
        except WireError as exc:
            self._dead_letter(record, partition, str(exc), stats, stats_base)
            return
        if access is not None:
            self._route_access(record, partition, access)
            return
        for reason in refused:
            self._dead_letter(record, partition, reason, stats, stats_base)
        if record.headers:  # the trace context of a record sent by the ingress or a traced client
            trace = wire.header_trace(record.headers)
            if trace is not None:
                wire.add_trace(events, trace)
        offset = record.offset
        if len(events) == 1 and not refused:
            event = events[0]
            key = event.agent_id.encode()
            if record.key != key:  # keyed by something else: send it on to its agent's partition
                self.writer.emit(
                    self.tasks_topic, self.partition_for(key), key, wire.encode_task(event), source=partition
                )
                self.metrics.repartitioned.inc()
                return
        else:
            events = self._spread(events, partition)
        tracing = self.tracer is not None
        for event in events:
            agent_id = event.agent_id
            item = Item(partition, offset, event)
            items = by_agent.get(agent_id)
            if items is None:
                by_agent[agent_id] = [item]
            else:
                items.append(item)
            if tracing and event.trace is not None and trace_context.sampled(event.trace):
                item.queued_ms = record.timestamp
                self.traced.append(item)

    def _spread(self, events: list[TaskEvent], partition: int) -> list[TaskEvent]:
        """The tasks of a ``task.batch`` of this partition; the others go on to their partitions,
        packed by partition in records of at most :data:`SPREAD` tasks (a ``POST /v1/batch``
        of a thousand tasks for agents everywhere becomes a few records, not a thousand)."""
        partition_for = self.partition_for
        here: list[TaskEvent] = []
        by_partition: dict[int, list[TaskEvent]] = {}
        for event in events:
            destination = partition_for(event.agent_id.encode())
            if destination == partition:
                here.append(event)
                continue
            found = by_partition.get(destination)
            if found is None:
                by_partition[destination] = [event]
            else:
                found.append(event)
        for destination, moving in by_partition.items():
            for start in range(0, len(moving), SPREAD):
                piece = moving[start : start + SPREAD]
                value = wire.encode_task(piece[0]) if len(piece) == 1 else wire.encode_batch(piece)
                self.writer.emit(self.tasks_topic, destination, piece[0].agent_id.encode(), value, source=partition)
            self.metrics.repartitioned.inc(len(moving))
        return here

    def _route_access(self, record: Any, partition: int, access: wire.MemoryAccess) -> None:
        key = access.agent_id.encode()
        if record.key != key:  # keyed by something else: send it on to its agent's partition
            self.writer.emit(self.tasks_topic, self.partition_for(key), key, record.value, source=partition)
            self.metrics.repartitioned.inc()
            return
        found = self.accesses.get(access.agent_id)
        if found is None:
            self.accesses[access.agent_id] = [(partition, record.offset, access)]
        else:
            found.append((partition, record.offset, access))

    def _dead_letter(self, record: Any, partition: int, reason: str, stats: dict[str, Any], stats_base: int) -> None:
        value = wire.dead_letter(reason, record.topic, partition, record.offset, record.key, record.value)
        self.writer.emit(self.dead_letter_topic, partition, record.key, value)
        self.metrics.dead_letter(reason)
        if record.offset > stats_base:
            stats["invalid_events"] += 1


def _check_continuity(tp: Any, records: list[Any], stats: dict[str, Any], end: int | None) -> None:
    """Raise ``BrokerLostData`` if the broker's log for ``tp`` is not the one processed so far.

    O(1) per partition (see :mod:`streams.processing.log_continuity`): the log may not end at or below
    the last offset processed, and a replay must bring the same record back at that offset.
    """
    processed: int = stats["o"]
    if processed < 0:
        return
    if end is not None and end <= processed:
        raise ends_below(tp.topic, tp.partition, end, processed)
    seen = stats.get("f")
    first: int = records[0].offset
    if seen is None or not first <= processed <= records[-1].offset:
        return
    index = processed - first
    if index >= len(records) or records[index].offset != processed:
        return  # offsets with gaps (transaction markers): nothing to compare without a search
    if fingerprint(records[index]) != seen:
        raise other_record(tp.topic, tp.partition, processed)


def _chunks(batch: dict[Any, list[Any]], budget: int) -> list[dict[Any, list[Any]]]:
    """Split a fetch into pieces of about ``budget`` bytes, keeping each partition in order."""
    chunks: list[dict[Any, list[Any]]] = []
    current: dict[Any, list[Any]] = {}
    size = 0
    for tp, records in batch.items():
        for record in records:
            if size >= budget and current:
                chunks.append(current)
                current, size = {}, 0
            current.setdefault(tp, []).append(record)
            size += len(record.value or b"")
    if current:
        chunks.append(current)
    return chunks
