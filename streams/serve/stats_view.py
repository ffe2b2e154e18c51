"""The global stats snapshot, kept up to date from the stats changelog.

Each partition's stats row is written by whichever worker owns that partition.
Every worker follows the whole stats changelog (a few records per batch) and
folds the latest row of each partition into one snapshot, recomputed when rows
change; ``GET /v1/stats`` only serves it. So any worker answers for all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from mode import Service

from streams.history.lag import history_lag, lag_reader
from streams.processing import histogram
from streams.processing.tables import newer
from streams.runtime import kafka_clients
from streams.runtime.settings import Settings
from streams.serve.view_source import Progress

log = logging.getLogger(__name__)

_REFRESH_SECONDS = 0.1


class StatsView(Service):
    def __init__(self, settings: Settings, changelog_topic: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.topic = changelog_topic
        self.rows: dict[int, dict[str, Any]] = {}
        #: Reads this worker's count of tasks inside handlers.
        self.in_progress: Callable[[], int] = lambda: 0
        self._consumer: AIOKafkaConsumer | None = None
        self._lag_reader: AIOKafkaConsumer | None = None
        self._changed = asyncio.Event()
        #: Notified whenever rows were applied (reads with a consistency token wait on it).
        self.progress = Progress()
        #: Changelog records the history sink has yet to write (None: off, or not known yet).
        self.history_lag: int | None = None
        #: Sets the Prometheus gauge of the history lag.
        self.on_history_lag: Callable[[int], None] = lambda lag: None
        self.snapshot: dict[str, Any] = summarize({}, 0)

    async def on_start(self) -> None:
        self._consumer = kafka_clients.consumer(
            self.settings,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
            # Under exactly-once, only committed flushes count (streams.processing.exactly_once).
            isolation_level="read_committed" if self.settings.exactly_once else "read_uncommitted",
        )
        await self._consumer.start()
        tps = [TopicPartition(self.topic, p) for p in range(self.settings.partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        if self.settings.history_enabled:
            self._lag_reader = lag_reader(self.settings)
            await self._lag_reader.start()

    async def on_stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._lag_reader is not None:
            await self._lag_reader.stop()

    @Service.timer(2.0)
    async def _follow_history(self) -> None:
        if self._lag_reader is None:
            return
        try:
            lag = await history_lag(self.settings, self._lag_reader)
        except (KafkaError, OSError, TimeoutError) as exc:
            log.debug("history lag not known: %r", exc)
            self.history_lag = None
            return
        self.history_lag = lag
        self.on_history_lag(lag)

    @Service.task
    async def _follow(self) -> None:
        assert self._consumer is not None
        while not self.should_stop:
            fetched = await self._consumer.getmany(timeout_ms=500, max_records=5000)
            for records in fetched.values():
                for record in records:
                    if record.value is None:
                        continue
                    row = msgpack.unpackb(record.value, raw=False, strict_map_key=False)
                    partition = int(row["partition"])
                    # The newest row wins, not the last record: a worker that lost the
                    # partition may still write an older copy after the new owner's.
                    if newer(row, self.rows.get(partition)):
                        self.rows[partition] = row
            if fetched:
                self._changed.set()
                self.progress.notify()

    @Service.task
    async def _summarize(self) -> None:
        while not self.should_stop:
            await self._changed.wait()
            self._changed.clear()
            self.refresh()
            await self.sleep(_REFRESH_SECONDS)

    @Service.timer(1.0)
    async def _tick(self) -> None:
        # Per-minute rates move with the clock even when nothing arrives.
        self.refresh()

    def reached(self, token: dict[int, int]) -> bool:
        """Whether every partition's row has applied the token's offset (``"o"``) of it."""
        rows = self.rows
        return all(partition in rows and rows[partition]["o"] >= offset for partition, offset in token.items())

    def refresh(self) -> None:
        self.snapshot = summarize(self.rows, self.in_progress(), self.history_lag)


def summarize(rows: dict[int, dict[str, Any]], in_progress: int, history_lag: int | None = None) -> dict[str, Any]:
    """Fold per-partition stats rows into the ``GET /v1/stats`` document (``history_lag``:
    changelog records the history sink has yet to write, None when off or not known)."""
    now_s = int(time.time())
    parts = list(rows.values())
    task_hist = histogram.merge(r["task_latency"] for r in parts)
    handler_hist = histogram.merge(r["handler_latency"] for r in parts)
    tp50, tp95, tp99 = histogram.percentiles(task_hist, (0.5, 0.95, 0.99))
    hp50, hp95, hp99 = histogram.percentiles(handler_hist, (0.5, 0.95, 0.99))
    per_minute = sum(
        count for r in parts for second, count in r["completed_per_second"].items() if now_s - 60 < int(second) <= now_s
    )
    memory_ops = sum(
        count
        for r in parts
        for second, count in r["memory_ops_per_second"].items()
        if now_s - 60 < int(second) <= now_s
    )
    return {
        "active_agents": sum(r["agents_awake"] for r in parts),
        "pending_tasks": sum(r.get("pending", 0) for r in parts),
        "in_progress_tasks": in_progress,
        "completed_tasks": sum(r["completed"] for r in parts),
        "failed_tasks": sum(r["failed"] for r in parts),
        "dead_tasks": sum(r["dead"] for r in parts),
        "dead_lettered_events": sum(r["invalid_events"] + r["dead"] for r in parts),
        "duplicate_tasks": sum(r["duplicates"] for r in parts),
        "tasks_per_minute": per_minute,
        "memory_ops_per_second": round(memory_ops / 60.0, 3),
        "task_latency_ms": {"p50": tp50, "p95": tp95, "p99": tp99},
        "handler_latency_ms": {"p50": hp50, "p95": hp95, "p99": hp99},
        "partitions_reporting": len(parts),
        "history_lag": history_lag,
        "as_of": now_s,
    }
