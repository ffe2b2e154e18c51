"""A copy of every table, kept by following all partitions of the tables' changelogs.

A reader holds no partition of the consumer group and processes no task: it assigns itself
every partition of the five changelogs (agents, tasks, memory, memory_entries, stats), reads
them from the beginning (they are compacted) and applies each record as table recovery does
(:func:`streams.processing.transport._restore` and :func:`streams.processing.tables.newer`):
in offset order, a tombstone removes the row, and a row is replaced only by a record that
has applied at least as much of the partition's input. Under exactly-once it reads
``read_committed``, so a flush's records appear all at once or not at all.

It is ready once it has reached the changelogs' end offsets taken when it started, and
keeps following. After every fetch it compares its positions with the end offsets the broker
reported in its latest fetch responses (the last stable offset under read_committed): that
is how far behind the stream it answers (:meth:`staleness_ms`, :attr:`lag_records`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from streams.processing.state import stats_key
from streams.processing.tables import TABLE_NAMES, apply_changelog, row_offset
from streams.processing.transport import fetch_highwaters
from streams.runtime import kafka_clients
from streams.runtime.settings import Settings
from streams.serve.consistency import Token
from streams.serve.view_source import Progress

log = logging.getLogger(__name__)

#: Most records one fetch hands over; each is applied before the next fetch is taken.
_MAX_RECORDS = 20_000
#: How long one wait for records may last while the changelogs are quiet (ms).
_POLL_MS = 50
#: Seconds a staleness measurement is served before it is taken again (reads ask it each time).
_MEASURE_EVERY = 0.005


def changelog_topic(settings: Settings, table: str) -> str:
    """A table's changelog topic (as :func:`streams.processing.tables.define_tables` names it)."""
    return f"{settings.app_id}-{table}-changelog"


class ChangelogFollower:
    """Every table's rows, from its changelog; started and stopped by its owner."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: Rows by table name, then key (values as a worker's stores keep them).
        self.tables: dict[str, dict[str, Any]] = {name: {} for name in TABLE_NAMES}
        self._table_of = {changelog_topic(settings, name): name for name in TABLE_NAMES}
        self.partitions = [
            TopicPartition(topic, partition) for topic in self._table_of for partition in range(settings.partitions)
        ]
        #: Notified after every fetch applied (reads with a consistency token wait on it).
        self.progress = Progress()
        #: The next offset to read of each changelog partition (past transaction markers too).
        self.positions: dict[TopicPartition, int] = {}
        #: Records of the changelogs not applied yet, as of the latest fetch responses.
        self.lag_records = 0
        self.ready = asyncio.Event()
        self._targets: dict[TopicPartition, int] = {}
        #: When the follower last found itself caught up with every partition (monotonic s).
        self._caught_up_at: float | None = None
        self._caught_up = False
        self._started_at = self._measured_at = time.monotonic()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._read_committed = settings.exactly_once

    async def start(self) -> None:
        self._consumer = kafka_clients.consumer(
            self.settings,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.settings.fetch_wait_ms,
            isolation_level="read_committed" if self._read_committed else "read_uncommitted",
            client_id=f"{self.settings.app_id}-reader",
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name="changelog-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()

    def failed(self) -> BaseException | None:
        """What ended the follower, if it ended (it runs until stopped otherwise)."""
        if self._task is None or not self._task.done() or self._task.cancelled():
            return None
        return self._task.exception()

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        await self._wait_for_topics(consumer)
        consumer.assign(self.partitions)
        await consumer.seek_to_beginning(*self.partitions)
        self._targets = await self.end_offsets(self.partitions)
        log.info(
            "following %d changelog partitions up to %d records", len(self.partitions), sum(self._targets.values())
        )
        while True:
            fetched = await consumer.getmany(timeout_ms=_POLL_MS, max_records=_MAX_RECORDS)
            for tp, records in fetched.items():
                table = self._table_of[tp.topic]
                apply_changelog(table, self.tables[table], records)  # as recovery does
            await self._note_positions(consumer)
            if not self.ready.is_set() and all(self.positions[tp] >= end for tp, end in self._targets.items()):
                log.info("caught up with the changelogs")
                self.ready.set()
            self.progress.notify()

    async def _wait_for_topics(self, consumer: AIOKafkaConsumer) -> None:
        """The changelogs exist once a worker declared them: wait for that (a reader may start first)."""
        wanted = set(self._table_of)
        said = False
        while True:
            try:
                missing = wanted - await consumer.topics()
            except KafkaError as exc:
                missing = {f"(metadata: {exc!r})"}
            if not missing:
                return
            if not said:
                log.info("waiting for the changelog topics %s (a worker creates them)", ", ".join(sorted(missing)))
                said = True
            await asyncio.sleep(0.5)

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The partitions' end offsets now: last stable offsets under read_committed, else high-water marks."""
        assert self._consumer is not None
        if self.settings.on_tansu:
            # Tansu's ListOffsets answers too low (streams.processing.transport.fetch_highwaters).
            return await fetch_highwaters(self.settings, partitions)
        ends: dict[TopicPartition, int] = await self._consumer.end_offsets(partitions)
        return ends

    async def _note_positions(self, consumer: AIOKafkaConsumer) -> None:
        for tp in self.partitions:
            self.positions[tp] = await consumer.position(tp)
        self._measure()

    def _measure(self) -> None:
        """Compare what is applied with the end offsets of the latest fetch responses, which the
        consumer notes as they arrive: records fetched but not applied yet count as behind."""
        consumer = self._consumer
        assert consumer is not None
        now = time.monotonic()
        lag = 0
        caught_up = bool(self.positions)
        for tp, position in self.positions.items():
            end = consumer.last_stable_offset(tp) if self._read_committed else consumer.highwater(tp)
            if end is None or end < 0:
                caught_up = False  # no fetch answer for it yet
            elif position < end:
                caught_up = False
                lag += end - position
        self.lag_records = lag
        self._caught_up = caught_up
        self._measured_at = now
        if caught_up:
            self._caught_up_at = now

    def staleness_ms(self) -> int:
        """0 when, as of the latest fetch responses, every partition is applied up to its end
        offset; else the milliseconds since the follower was last found so (since its start,
        before the first time). Measured at most every :data:`_MEASURE_EVERY` seconds."""
        now = time.monotonic()
        if self.positions and now - self._measured_at >= _MEASURE_EVERY:
            self._measure()
        if self._caught_up:
            return 0
        since = self._started_at if self._caught_up_at is None else self._caught_up_at
        return int((now - since) * 1000)

    def stats_offset(self, partition: int) -> int:
        """The tasks-topic offset the partition's stats row (as applied here) has processed up to."""
        row = self.tables["stats"].get(stats_key(partition))
        return -1 if row is None else row_offset(row)

    async def wait_applied(self, token: Token, timeout: float) -> bool:
        """Wait until the effects of the token's tasks-topic offsets are applied here.

        A partition's stats row is written with every flush that processed its records and
        carries the last offset processed (``"o"``), so a stats row at or past the token's
        offset means the flush with the write's effects reached the broker. The other
        changelogs are read independently, though: the follower then takes their end offsets
        of that partition (everything of that flush is below them: under exactly-once the
        flush is one committed transaction, under at-least-once the stats row is sent only once
        the broker has the rest) and waits until it has read up to them.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        stats_reached = await self.progress.wait_until(
            lambda: all(self.stats_offset(p) >= offset for p, offset in token.items()), timeout
        )
        if not stats_reached:
            return False
        others = [
            TopicPartition(topic, partition)
            for topic, table in self._table_of.items()
            if table != "stats"
            for partition in token
        ]
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                ends = await self.end_offsets(others)
        except (TimeoutError, KafkaError):
            return False
        return await self.progress.wait_until(
            lambda: all(self.positions.get(tp, -1) >= end for tp, end in ends.items()),
            max(0.0, deadline - loop.time()),
        )
