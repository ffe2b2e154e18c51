"""Faust's aiokafka transport, tuned for batch delivery.

Faust hands every record to its streams one at a time (an ``Event`` object, a
``wait_first`` and an ack per record), which caps a worker far below what the
broker and aiokafka can do. :class:`BatchConsumer` keeps Faust's consumer group,
assignor, rebalancing, table recovery and offset commits, but delivers each fetch
as one batch per call to the app's :class:`~streams.processing.processor.BatchProcessor`,
which reports back the offsets whose effects are in the tables; only those are
committed.

:class:`TunedConsumerThread` lets the fetch wait be configured (Faust hard-codes
1,500 ms) and, on the Tansu engine only, reads high-water marks from a Fetch
response instead of ListOffsets, which Tansu answers too low.
:class:`InLoopConsumerThread` runs it on the worker's own event loop instead of a
thread of its own, and paused partitions are paused in aiokafka too (see
:meth:`BatchConsumer._set_fetching`): together they took a worker at 500 tasks/s
from about 35% to 27% of a core and removed 100 ms delivery stalls.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from time import monotonic
from typing import Any

import aiokafka
from aiokafka.errors import InvalidReplicationFactorError
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from streams.processing.tables import apply_changelog
from streams.runtime import kafka_clients
from streams.runtime.settings import Settings, SettingsError

#: Takes a fetch, and how many rebalances the worker had seen when it was fetched.
BatchSink = Callable[[dict[TP, list[Any]], int], Awaitable[None]]


class TunedConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        settings = self.app.settings  # type: ignore[attr-defined]
        consumer._fetch_max_wait_ms = settings.fetch_wait_ms  # noqa: SLF001
        if settings.exactly_once:
            # Tasks and changelogs as committed (streams.processing.exactly_once); the fetcher that
            # reads it is made when the consumer starts.
            consumer._isolation_level = "read_committed"  # noqa: SLF001
        return consumer

    async def _highwaters(self, partitions: list[TP]) -> Mapping[TP, int]:
        if not self.app.settings.on_tansu:  # type: ignore[attr-defined]
            return await super()._highwaters(partitions)
        return await fetch_highwaters(self.app.settings, partitions)  # type: ignore[attr-defined]


async def fetch_highwaters(bootstrap: Settings | str, partitions: Iterable[TP], timeout: float = 10.0) -> dict[TP, int]:
    """High-water marks as a Fetch response reports them (correct on Tansu).

    Tansu answers ListOffsets(latest) with the base offset of the last
    batch + 1, too low when that batch held several records; its Fetch response carries
    the true high-water mark. A fetch from that too-low offset returns only the last
    batch, so this stays cheap however long the partition is.
    """
    requested = list(partitions)
    if not requested:
        return {}
    tps = [aiokafka.TopicPartition(tp.topic, tp.partition) for tp in requested]
    consumer = kafka_clients.consumer(
        bootstrap,
        enable_auto_commit=False,
        fetch_max_wait_ms=10,
        max_partition_fetch_bytes=64 * 1024,
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        listed = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(0, listed[tp] - 1))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            missing = [tp for tp in tps if consumer.highwater(tp) is None]
            if not missing:
                break
            if loop.time() > deadline:
                raise TimeoutError(f"no fetch answer for {missing} within {timeout}s")
            await consumer.getmany(*missing, timeout_ms=50, max_records=1)
        return {
            original: max(int(consumer.highwater(tp)), listed[tp]) for original, tp in zip(requested, tps, strict=True)
        }
    finally:
        await consumer.stop()


class InLoopConsumerThread(TunedConsumerThread):
    """Faust's consumer "thread", run as a service on the worker's own event loop.

    Faust runs the aiokafka consumer in a thread of its own and reaches it through a
    method queue: every fetch crosses threads twice, and the two threads take turns
    on the GIL. Here each call is a plain await on one loop.
    """

    def __init__(self, consumer: Any, *, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(consumer, loop=loop, thread_loop=loop, **kwargs)
        self._serving: asyncio.Future[None] | None = None

    async def start(self) -> None:
        self._thread_started.set()
        self._thread_running = self.parent_loop.create_future()
        self._serving = asyncio.ensure_future(self._serve())
        # A crash is reported by ``_serve`` itself (to start() and to the worker).
        self._serving.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            await self._thread_running
        finally:
            self._thread_running = None

    async def stop(self) -> None:
        await super().stop()
        if self._serving is not None:
            await asyncio.wait([self._serving])

    async def _gather_remaining_tasks(self) -> None:
        """The loop is the worker's: its other tasks are not this service's to cancel."""

    async def call_thread(self, fun: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        result = fun(*args, **kwargs)
        if inspect.isawaitable(result):
            return await result
        return result


class BatchConsumer(faust_aiokafka.Consumer):
    """Faust's consumer with batch delivery and offsets reported by the processor."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._processed: dict[TP, int] = {}
        #: Batch partitions assigned but not yet sought to their committed offsets, and
        #: those of them Faust asked to resume meanwhile (see :meth:`hold_until_sought`).
        self._unsought: set[TP] = set()
        self._resume_when_sought: set[TP] = set()
        #: The last changelog record applied per partition in the recovery in progress.
        self._last_restored: dict[TP, Any] = {}

    def _new_consumer_thread(self) -> InLoopConsumerThread:
        return InLoopConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def pause_partitions(self, tps: Iterable[TP]) -> None:
        tps = set(tps)
        super().pause_partitions(tps)
        self._set_fetching(tps, fetch=False)

    def _set_fetching(self, tps: set[TP], fetch: bool) -> None:
        """Pause or resume partitions in aiokafka too, not only in Faust's own bookkeeping.

        Faust pauses a partition only by not asking for it, while aiokafka keeps
        fetching it: records of a paused partition (a table's changelog after
        recovery, which this worker itself writes) then wait unconsumed, and while
        any do, aiokafka holds every fetch from that broker for up to 100 ms.
        """
        consumer = self._thread._consumer  # noqa: SLF001 - runs on this loop (InLoopConsumerThread)
        if consumer is None:
            return
        assigned = consumer.assignment()
        chosen = [aiokafka.TopicPartition(tp.topic, tp.partition) for tp in tps]
        chosen = [tp for tp in chosen if tp in assigned]
        if not chosen:
            return
        if fetch:
            consumer.resume(*chosen)
        else:
            consumer.pause(*chosen)

    def verify_event_path(self, now: float, tp: TP) -> None:
        """Faust's periodic liveness check, for the partitions this worker does fetch.

        Paused partitions (table changelogs once recovered) are left unfetched on
        purpose; Faust would report each one as an error every few seconds.
        """
        if tp not in self._paused_partitions:
            super().verify_event_path(now, tp)

    def hold_until_sought(self, assigned: Iterable[TP]) -> None:
        """Keep the batch partitions of a new assignment paused until they are sought.

        After a rebalance Faust resumes the partitions a moment before it seeks them to
        their committed offsets; records fetched in between come from the positions the
        consumer took at the join, which may be older than what the partitions' previous
        owner committed last. Processed, they would be processed twice. So they stay
        paused until :meth:`perform_seek`.
        """
        batch_topics: frozenset[str] = self.app.batch_topics  # type: ignore[attr-defined]
        self._unsought = {tp for tp in assigned if tp.topic in batch_topics}
        self._resume_when_sought = set()

    async def perform_seek(self) -> None:
        """Seek the assigned partitions to their committed offsets, then resume those held."""
        async with self.app.processing_stopped():  # type: ignore[attr-defined]
            await super().perform_seek()
            held, self._resume_when_sought = self._resume_when_sought, set()
            self._unsought = set()
            self._resume(held)

    def resume_partitions(self, tps: Iterable[TP]) -> None:
        tps = set(tps)
        held = tps & self._unsought
        self._resume_when_sought |= held
        self._resume(tps - held)

    def _resume(self, tps: set[TP]) -> None:
        if tps:
            super().resume_partitions(tps)
            self._set_fetching(tps, fetch=True)

    def mark_processed(self, offsets: Mapping[TP, int]) -> None:
        """Record the next offset to commit for each partition (effects are in the tables)."""
        self._processed.update(offsets)

    def _filter_tps_with_pending_acks(self, topics: Any = None) -> Iterator[TP]:
        return iter([tp for tp in self._processed if topics is None or tp in topics or tp.topic in topics])

    def _new_offset(self, tp: TP) -> int | None:
        return self._processed.pop(tp, None)

    async def _drain_messages(self, fetcher: Any) -> None:
        sink: BatchSink = self.app.batch_sink  # type: ignore[attr-defined]
        batch_topics: frozenset[str] = self.app.batch_topics  # type: ignore[attr-defined]
        consumer_stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set  # noqa: SLF001 - mode's own service flag
        recovery = self.app.tables.recovery  # type: ignore[attr-defined]
        while not (consumer_stopped() or fetcher_stopped()):
            records, active = await self._wait_next_records(1.0)
            fetched_in: int = self.app.rebalances  # type: ignore[attr-defined]
            if self.should_stop:
                continue
            assignment = self.assignment()
            batch: dict[TP, list[Any]] = {}
            changelogs: dict[TP, list[Any]] = {}
            for tp, recs in (records or {}).items():
                if not recs or tp not in assignment or (active is not None and tp not in active):
                    continue
                if tp.topic in batch_topics:
                    batch[tp] = recs
                else:
                    changelogs[tp] = recs
            if changelogs or recovery.in_recovery:
                await self._restore(changelogs)
            if batch:
                self._mark_inbound(batch)
                await sink(batch, fetched_in)

    async def _restore(self, records: Mapping[TP, list[Any]]) -> None:
        """Apply changelog records (of partitions in recovery), and tell Faust how far each got.

        All go straight into the store, in order. The last applied one is then handed to
        Faust's recovery only to wake it: it finds the offset already reached, applies
        nothing, and checks whether recovery is complete.

        Transactional changelogs (exactly-once) end with a commit marker, which takes an
        offset but is no record: the consumer moves past it without returning anything.
        A partition whose consumer position passed the recovery high-water mark therefore
        counts as restored up to that mark; Faust itself would wait 10 s to guess so.
        """
        recovery = self.app.tables.recovery  # type: ignore[attr-defined]
        woken: dict[TP, Any] = {}
        for tp, recs in records.items():
            last_applied = bulk_restore(recovery, tp, recs)
            if last_applied is not None:
                self._last_restored[tp] = woken[tp] = last_applied
                self.app.rows_restored(tp)  # type: ignore[attr-defined]
            self._read_offset[tp] = recs[-1].offset
        for tp, offsets, highwaters in _in_recovery(recovery):
            highwater = highwaters.get(tp)
            seen = offsets.get(tp)
            if highwater is None or (seen is not None and seen >= highwater):
                continue
            position = self._position(tp)
            if position is not None and position > highwater:
                offsets[tp] = highwater
                last = self._last_restored.get(tp)
                if last is not None:
                    woken[tp] = last
        for tp, record in woken.items():
            await self.callback(self._to_message(tp, record))
        if not recovery.in_recovery:
            self._last_restored.clear()

    def _position(self, tp: TP) -> int | None:
        """The aiokafka consumer's next offset to return for ``tp``, if it has one."""
        consumer = self._thread._consumer  # noqa: SLF001 - runs on this loop (InLoopConsumerThread)
        subscription = consumer._subscription.subscription if consumer is not None else None  # noqa: SLF001
        if subscription is None or subscription.assignment is None:
            return None
        try:
            state = subscription.assignment.state_value(aiokafka.TopicPartition(tp.topic, tp.partition))
        except KeyError:
            return None
        if state is None or not state.has_valid_position:
            return None
        return int(state.position)

    def _mark_inbound(self, batch: Mapping[TP, list[Any]]) -> None:
        """Tell Faust's monitor the batch's partitions are being processed.

        Faust's liveness check reports a partition with records waiting but none
        processed for ``BLACKROAD_STALL_TIMEOUT``; batches bypass the per-event
        streams that would otherwise record this.
        """
        now = monotonic()
        inbound = self.app.monitor.stream_inbound_time
        for tp in batch:
            inbound[tp] = now


def bulk_restore(recovery: Any, tp: TP, records: list[Any]) -> Any:
    """Apply changelog records to their table's store in one pass; return the last one applied.

    Faust's recovery costs a task and a ``wait_for`` per record. Here the records of one
    fetch are decoded and applied directly, in offset order, and the partition's
    recovery offset is moved past them. Only records up to the high-water mark taken
    when recovery started are applied: later ones are this worker's own writes (it owns
    the partition once recovered) and must not land on top of the live rows.

    A row is replaced only by a record at least as new (see :func:`streams.processing.tables.newer`):
    a worker that lost a partition without knowing it yet can still write older copies
    of rows into the changelog after the new owner's; the next restore must not keep them.
    """
    if not records:
        return None
    if tp in recovery.active_tps:
        offsets, highwaters = recovery.active_offsets, recovery.active_highwaters
    elif tp in recovery.standby_tps:
        offsets, highwaters = recovery.standby_offsets, recovery.standby_highwaters
    else:
        return None  # a partition no longer assigned: its records are not this worker's to apply
    seen = offsets.get(tp)
    last = highwaters.get(tp)
    fresh = [r for r in records if (seen is None or r.offset > seen) and (last is None or r.offset <= last)]
    if not fresh:
        return None
    recovery.flush_buffers()  # nothing should wait there (all records come this way); never after these
    table = recovery.tp_to_table[tp]
    store = table.data
    apply_changelog(
        table.name,
        store.data,
        fresh,
        recovery.app.row_files.get(table.name),
        store._key_partition,  # noqa: SLF001 - the memory store's own index
        tp.partition,
    )
    offsets[tp] = fresh[-1].offset
    return fresh[-1]


def _in_recovery(recovery: Any) -> Iterator[tuple[TP, dict[TP, int], dict[TP, int]]]:
    """Each partition being restored, with the offsets and high-water marks its recovery tracks."""
    for tp in recovery.active_tps:
        yield tp, recovery.active_offsets, recovery.active_highwaters
    for tp in recovery.standby_tps:
        yield tp, recovery.standby_offsets, recovery.standby_highwaters


class BatchTransport(faust_aiokafka.Transport):
    Consumer = BatchConsumer

    async def _create_topic(
        self, owner: Any, client: aiokafka.AIOKafkaClient, topic: str, partitions: int, replication: int, **kwargs: Any
    ) -> None:
        """Declare a topic with the project's replication, whoever in Faust declares it.

        Every topic a worker creates (the changelogs, the tasks, events and dead-letter
        topics, Faust's leader topic) gets the replication factor and ``min.insync.replicas``
        resolved for the cluster (:meth:`Settings.for_cluster`), beside its own configs (a
        changelog keeps its compaction).
        """
        settings = self.app.settings  # type: ignore[attr-defined]
        kwargs["config"] = {**settings.topic_configs, **(kwargs.get("config") or {})}
        try:
            await super()._create_topic(owner, client, topic, partitions, settings.replication_factor, **kwargs)
        except InvalidReplicationFactorError as exc:
            raise SettingsError(
                "REPLICATION_FACTOR",
                f"the cluster refused {settings.replication_factor} copies of {topic} ({exc}); "
                "set it at most the number of brokers",
            ) from exc
