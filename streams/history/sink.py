"""The sink stage: the tasks and agents changelogs and the memory archive, copied into PostgreSQL.

The sink is a process of its own (``blackroad history``; ``blackroad up`` starts one), a
consumer of its own group (``<app id>-history``) on the tasks and agents changelogs and
the memory-archive topic, read ``read_committed`` where flushes are transactions: each
committed version of a row reaches it once, in order per partition. Beside the workers it has a core to itself on a
small machine, and PostgreSQL being slow or gone never holds a worker's event loop.
Several sink processes (on several machines) share the changelogs' partitions.

A fetch becomes one :class:`~streams.history.store.HistoryBatch` (the newest version of
each row in it), written in one PostgreSQL transaction; only then are the fetch's
offsets committed to Kafka. A crash in between re-reads the fetch, and the merge, which
keeps the newer version of each row only, makes the second write a no-op: each task is
in the database once, at its latest state; a memory entry is inserted once. Tombstones (a finished task leaving the live
table after its retention) are not deletions of history and are skipped.

When PostgreSQL is slow or down, the write is retried through a circuit breaker and the
sink reads nothing more meanwhile: its lag grows on the broker (``/v1/stats``,
``/metrics``) while task processing and the live views go on; it catches up when the
server answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import msgpack
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from streams.history import schema, store
from streams.history.lag import archive_topic, changelog_topic, history_group, sunk_topics
from streams.runtime import kafka_clients
from streams.runtime.circuit import CircuitBreaker
from streams.runtime.settings import Settings

log = logging.getLogger(__name__)

#: What a failed write or connection to PostgreSQL raises (the client's own protocol errors
#: too: a connection cut mid-statement can leave one; the connection is closed, not reused).
POSTGRES_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
#: Seconds between the sink's progress lines in its log.
REPORT_EVERY = 10.0

T = TypeVar("T")


async def open_pool(settings: Settings) -> asyncpg.Pool:
    """The sink's connection pool (sizes and command timeout from the settings), schema migrated."""
    pool = await asyncpg.create_pool(
        settings.postgres_url,
        min_size=settings.postgres_pool_min_size,
        max_size=settings.postgres_pool_max_size,
        command_timeout=settings.postgres_command_timeout,
        timeout=settings.postgres_command_timeout,
        init=store.prepare,
    )
    try:
        async with pool.acquire() as conn:
            await schema.migrate(conn)
    except BaseException:
        await pool.close()
        raise
    return pool


def collect(
    records: dict[TopicPartition, list[Any]], tasks_topic: str, archive: str, batch: store.HistoryBatch
) -> None:
    """Add one fetch to ``batch``: from a changelog the last version of each key in the fetch
    (earlier ones are not even decoded: an agent's row is written at every flush), tombstones
    skipped; from the memory archive (``archive``) every entry."""
    unpack = msgpack.unpackb
    for tp, partition_records in records.items():
        partition = tp.partition
        if tp.topic == archive:
            for record in partition_records:
                batch.add_memory(unpack(record.value, raw=False), partition)
            continue
        add = batch.add_task_values if tp.topic == tasks_topic else batch.add_agent
        seen: set[bytes] = set()
        for record in reversed(partition_records):
            key = record.key
            if record.value is None or key in seen:
                continue  # a tombstone: the version before it, if this fetch has one, is still history
            seen.add(key)
            add(unpack(record.value, raw=False, strict_map_key=False), partition)


async def _positions(consumer: AIOKafkaConsumer, records: dict[TopicPartition, list[Any]]) -> dict[TopicPartition, int]:
    """Where the fetch leaves each partition: the position, not the last record + 1, since it
    is past transaction markers too (a partition revoked meanwhile is left to its next owner)."""
    positions = {}
    for tp in records:
        with contextlib.suppress(IllegalStateError):
            positions[tp] = await consumer.position(tp)
    return positions


async def _put_unless_done(queue: asyncio.Queue[Any], item: Any, consumer_of_queue: asyncio.Task[None]) -> None:
    """Put ``item`` on ``queue`` (waiting for room), unless the task that empties it has ended."""
    put = asyncio.ensure_future(queue.put(item))
    await asyncio.wait({put, consumer_of_queue}, return_when=asyncio.FIRST_COMPLETED)
    if not put.done():
        put.cancel()


class AgentSnapshots:
    """Agent rows held back between writes: an agent's row changes at every flush that touches
    it, and writing only its newest version every ``interval`` seconds saves most of the writes
    under load (a backlog over 30,000 agents touches most of them in every flush)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.rows: dict[str, tuple[Any, ...]] = {}
        self.offsets: dict[TopicPartition, int] = {}
        self._clock = clock
        self._last_written = clock()

    def hold(self, batch: store.HistoryBatch, offsets: dict[TopicPartition, int], agents_topic: str) -> None:
        """Take ``batch``'s agent rows and their changelog's offsets out of it and ``offsets``."""
        self.rows.update(batch.agents)
        batch.agents = {}
        for tp in [tp for tp in offsets if tp.topic == agents_topic]:
            self.offsets[tp] = offsets.pop(tp)

    def due(self) -> bool:
        return bool(self.offsets) and self.seconds_to_due() == 0.0

    def seconds_to_due(self) -> float | None:
        """Until the held rows are to be written (None: none held, nothing to wait for)."""
        if not self.offsets:
            return None
        return max(0.0, self.interval - (self._clock() - self._last_written))

    def release_into(self, batch: store.HistoryBatch, offsets: dict[TopicPartition, int]) -> None:
        """Put the held rows and offsets into ``batch`` and ``offsets`` (to be written now)."""
        batch.agents = self.rows
        offsets.update(self.offsets)
        self.rows, self.offsets = {}, {}
        self._last_written = self._clock()


class HistorySink:
    """Copies the changelogs into PostgreSQL until ``stop`` is set (see the module's docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.breaker = CircuitBreaker()
        self.pool: asyncpg.Pool | None = None
        self._tasks_topic = changelog_topic(settings, "tasks")
        self._agents_topic = changelog_topic(settings, "agents")
        self._archive_topic = archive_topic(settings)
        self._topics = sunk_topics(settings)
        #: Agent rows held back between writes (see :class:`AgentSnapshots`).
        self.snapshots = AgentSnapshots(settings.history_agent_interval)
        #: Row versions written so far.
        self.rows_written = 0
        #: Why the last attempt to reach PostgreSQL failed (None once one succeeded).
        self.last_error: str | None = None
        self._reported_at = time.monotonic()
        self._reported_rows = 0

    async def run(self, stop: asyncio.Event) -> None:
        self.pool = await self._until_done(lambda: open_pool(self.settings), "connect to", stop)
        if self.pool is None:
            return
        consumer = kafka_clients.consumer(
            self.settings,
            *self._topics,
            group_id=history_group(self.settings),
            client_id=f"{self.settings.app_id}-history",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed" if self.settings.exactly_once else "read_uncommitted",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            session_timeout_ms=int(self.settings.group_session_timeout * 1000),
            heartbeat_interval_ms=int(self.settings.heartbeat_interval * 1000),
            # Waiting out a PostgreSQL outage is not a stuck consumer.
            max_poll_interval_ms=24 * 3600 * 1000,
        )
        await self._wait_for_changelogs(stop)
        await consumer.start()
        # While PostgreSQL writes one batch, the next gathers every fetch that arrives meanwhile:
        # batches grow with the load (few large transactions) and stay small when it is light.
        written: asyncio.Queue[tuple[store.HistoryBatch, dict[TopicPartition, int]]] = asyncio.Queue(maxsize=1)
        writer = asyncio.create_task(self._write_in_order(consumer, written, stop))
        limit = self.settings.history_batch_rows
        gathering, offsets = store.HistoryBatch(), {}
        try:
            while not stop.is_set() and not writer.done():
                records = await consumer.getmany(timeout_ms=100 if len(gathering) else 200, max_records=limit)
                if records:
                    collect(records, self._tasks_topic, self._archive_topic, gathering)
                    offsets.update(await _positions(consumer, records))
                if offsets and (written.empty() or len(gathering) >= limit):
                    await _put_unless_done(written, (gathering, offsets), writer)
                    gathering, offsets = store.HistoryBatch(), {}
                self._report()
        finally:
            stop.set()
            writer.cancel()
            try:
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
                await self._write_held_agents(consumer)
            finally:
                await consumer.stop()
                await self.pool.close()

    async def _write_held_agents(self, consumer: AIOKafkaConsumer) -> None:
        """On a clean stop, the agent rows still held back: written and committed, within the
        stop timeout (if not, the next sink re-reads them from the last committed offsets)."""
        if not self.snapshots.offsets or self.pool is None:
            return
        batch, offsets = store.HistoryBatch(), dict[TopicPartition, int]()
        self.snapshots.release_into(batch, offsets)
        pool = self.pool
        try:
            async with asyncio.timeout(self.settings.stop_timeout):
                await store.write_concurrently(pool, batch, 1)
                await consumer.commit(offsets)
        except (*POSTGRES_ERRORS, CommitFailedError, IllegalStateError, KafkaError) as exc:
            log.info("history: the held agent rows were not written at the stop (%r); the next sink re-reads them", exc)
            return
        self.rows_written += len(batch)

    async def _wait_for_changelogs(self, stop: asyncio.Event) -> None:
        """Wait until the workers have created the changelogs (a sink may start first)."""

        admin = kafka_clients.admin(self.settings)
        await admin.start()
        try:
            told = False
            while not stop.is_set():
                missing = set(self._topics) - set(await admin.list_topics())
                if not missing:
                    return
                if not told:
                    log.info("history: waiting for the workers to create %s", ", ".join(sorted(missing)))
                    told = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
        finally:
            await admin.close()

    async def _write_in_order(
        self,
        consumer: AIOKafkaConsumer,
        written: asyncio.Queue[tuple[store.HistoryBatch, dict[TopicPartition, int]]],
        stop: asyncio.Event,
    ) -> None:
        """Write each batch's task rows and memory entries, then commit their offsets, in fetch order. Agent rows
        wait in ``snapshots`` (the newest per agent) and go with the first batch at least
        ``BLACKROAD_HISTORY_AGENT_INTERVAL`` after the last went, or alone once that time is up;
        their offsets are committed once they are in."""
        snapshots = self.snapshots
        while not stop.is_set():
            try:
                batch, offsets = await asyncio.wait_for(written.get(), snapshots.seconds_to_due())
            except TimeoutError:
                batch, offsets = store.HistoryBatch(), {}
            snapshots.hold(batch, offsets, self._agents_topic)
            if snapshots.due():
                snapshots.release_into(batch, offsets)
            if len(batch) and not await self._write(batch, stop):
                return
            self.rows_written += len(batch)
            if offsets:
                try:
                    await consumer.commit(offsets)
                except (CommitFailedError, IllegalStateError, KafkaError) as exc:
                    # The partitions moved on: their next owner re-reads these records, and the
                    # merge makes writing them again a no-op.
                    log.info("history: offsets not committed (%r); the partitions' next owner re-reads them", exc)

    async def _write(self, batch: store.HistoryBatch, stop: asyncio.Event) -> bool:
        """Write one batch (retried until it is in); False if stopped before."""
        pool = self.pool
        assert pool is not None

        async def write() -> bool:
            await store.write_concurrently(pool, batch, self.settings.postgres_pool_max_size)
            return True

        return await self._until_done(write, "write to", stop) is not None

    async def _until_done(self, attempt: Callable[[], Awaitable[T]], what: str, stop: asyncio.Event) -> T | None:
        """``attempt()`` until it succeeds, through the circuit breaker; None if stopped first."""
        while not stop.is_set():
            try:
                result = await attempt()
            except POSTGRES_ERRORS as exc:
                self.breaker.failed()
                reason = f"{type(exc).__name__}: {exc}"
                if self.last_error is None:
                    log.warning("history: cannot %s PostgreSQL (%s); retrying, task processing goes on", what, reason)
                self.last_error = reason
                try:
                    await asyncio.wait_for(stop.wait(), self.breaker.wait_seconds())
                except TimeoutError:
                    pass
                continue
            if self.last_error is not None:
                log.warning("history: PostgreSQL answers again; catching up")
            self.last_error = None
            self.breaker.succeeded()
            return result
        return None

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._reported_at < REPORT_EVERY:
            return
        rate = (self.rows_written - self._reported_rows) / (now - self._reported_at)
        if rate:
            log.info("history: %d row versions written, %.0f/s lately", self.rows_written, rate)
        self._reported_at, self._reported_rows = now, self.rows_written
