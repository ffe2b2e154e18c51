"""The sink stage: the tasks and agents changelogs, copied into PostgreSQL.

Every worker process runs one sink, a consumer of its own group (``<app id>-history``)
on the tasks and agents changelogs, read ``read_committed`` where flushes are
transactions: each committed version of a row reaches it once, in order per partition.
A fetch becomes one :class:`~streams.history.store.HistoryBatch` (the newest version of
each row in it), written in one PostgreSQL transaction; only then are the fetch's
offsets committed to Kafka. A crash in between re-reads the fetch, and the merge, which
keeps the newer version of each row only, makes the second write a no-op: each task is
in the database once, at its latest state. Tombstones (a finished task leaving the live
table after its retention) are not deletions of history and are skipped.

When PostgreSQL is slow or down, the write is retried through a circuit breaker and the
sink reads nothing more meanwhile: its lag grows on the broker (shown in ``/v1/stats``
and ``/metrics``) while task processing and the live views go on; it catches up when the
server answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from mode import Service

from streams.history import schema, store
from streams.history.circuit import CircuitBreaker
from streams.metrics import Metrics
from streams.settings import Settings
from streams.tables import decode_row

log = logging.getLogger(__name__)

#: What a failed write or connection to PostgreSQL raises.
POSTGRES_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def changelog_topic(settings: Settings, table: str) -> str:
    return f"{settings.app_id}-{table}-changelog"


def history_group(settings: Settings) -> str:
    return f"{settings.app_id}-history"


async def open_pool(settings: Settings) -> asyncpg.Pool:
    """The worker's connection pool (sizes and command timeout from the settings), schema migrated."""
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


def collect(records: dict[TopicPartition, list[Any]], tasks_topic: str) -> store.HistoryBatch:
    """One fetch of the changelogs as a batch of rows (tombstones skipped)."""
    batch = store.HistoryBatch()
    for tp, partition_records in records.items():
        tasks = tp.topic == tasks_topic
        for record in partition_records:
            if record.value is None:
                continue
            row = decode_row(record.value)
            if tasks:
                batch.add_task(row, tp.partition)
            else:
                batch.add_agent(row, tp.partition)
    return batch


class HistorySink(Service):
    """Copies the changelogs into PostgreSQL (see the module's docstring); owned by the worker app."""

    def __init__(self, settings: Settings, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.metrics = metrics
        self.breaker = CircuitBreaker()
        self.pool: asyncpg.Pool | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks_topic = changelog_topic(settings, "tasks")
        self._topics = (self._tasks_topic, changelog_topic(settings, "agents"))
        #: Rows written so far by this worker's sink.
        self.rows_written = 0
        #: Changelog records this worker's sink has yet to write (as of its last fetch).
        self.lag = 0
        #: Whether the last attempt to reach PostgreSQL failed (and why).
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self.pool is not None and self.last_error is None

    async def _measure_lag(self, consumer: AIOKafkaConsumer) -> None:
        """Changelog records this worker's sink has yet to write (over its assigned partitions)."""
        behind = 0
        for tp in consumer.assignment():
            end = consumer.last_stable_offset(tp) if self.settings.exactly_once else consumer.highwater(tp)
            if end is not None:
                behind += max(0, end - await consumer.position(tp))
        self.lag = behind
        self.metrics.history_lag.set(behind)

    @Service.task
    async def _copy(self) -> None:
        self.pool = await self._until_written(lambda: open_pool(self.settings), "connect")
        consumer = AIOKafkaConsumer(
            *self._topics,
            bootstrap_servers=self.settings.bootstrap,
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
        await consumer.start()
        self._consumer = consumer
        try:
            while not self.should_stop:
                records = await consumer.getmany(timeout_ms=200, max_records=self.settings.history_batch_rows)
                if records:
                    await self._write(consumer, records)
                await self._measure_lag(consumer)
        finally:
            self._consumer = None
            await consumer.stop()

    async def _write(self, consumer: AIOKafkaConsumer, records: dict[TopicPartition, list[Any]]) -> None:
        batch = collect(records, self._tasks_topic)
        started = time.perf_counter()
        if len(batch):
            pool = self.pool
            assert pool is not None

            async def write() -> None:
                async with pool.acquire() as conn:
                    await store.write(conn, batch)

            await self._until_written(write, "write")
        self.metrics.history_write_seconds.observe(time.perf_counter() - started)
        self.metrics.history_rows.inc(len(batch))
        self.rows_written += len(batch)
        offsets = {tp: partition_records[-1].offset + 1 for tp, partition_records in records.items()}
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # The partitions moved on: their next owner re-reads these records, and the
            # merge makes writing them again a no-op.
            log.info("history sink: offsets not committed (%r); the next owner re-reads them", exc)

    async def _until_written(self, attempt: Any, what: str) -> Any:
        """Run ``attempt()`` until it succeeds, through the circuit breaker (waits while it is open)."""
        while True:
            try:
                result = await attempt()
            except POSTGRES_ERRORS as exc:
                self.breaker.failed()
                self.metrics.history_failures.inc()
                reason = f"{type(exc).__name__}: {exc}"
                if self.last_error is None:
                    log.warning("history sink: cannot %s PostgreSQL (%s); retrying, processing goes on", what, reason)
                self.last_error = reason
                await asyncio.sleep(self.breaker.wait_seconds())
                continue
            if self.last_error is not None:
                log.warning("history sink: PostgreSQL answers again; catching up")
            self.last_error = None
            self.breaker.succeeded()
            return result

    async def on_stop(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            await pool.close()
