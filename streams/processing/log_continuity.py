"""Noticing a broker that lost its data: its logs restart below offsets this worker already has.

Every row carries the source offset of the last event applied to it (``"o"``), and replayed
offsets at or below it are skipped as already applied (see :mod:`streams.processing.state`). That makes
replays idempotent, but it also means that if the broker loses its data (an embedded broker
restarted with its in-memory storage, a topic deleted and created again) and its offsets
restart at 0, a worker that kept its tables would skip every new record up to the old
offsets and silently stop counting. A Kafka log never shrinks at its end and never changes
a record at an offset, so each of these means the log is not the one this worker read:

* a fetch's high-water mark at or below the offset a partition's stats row says was
  processed (the log ends below it);
* the record at that offset, fetched again (as a replay after a rebalance or restart is),
  is not the one that was processed there (checked by a fingerprint kept in the stats row);
* the broker acknowledges this worker's write to a changelog partition at an offset not
  above one it acknowledged before (:class:`VerifiedProducer`). This catches the loss even
  while no input arrives, and whatever offset the consumer resumed from.

The checks cost one comparison per partition per batch or per produced batch. The worker
that notices says so in one CRITICAL line and stops (exit code 3) rather than serve counts
the broker no longer matches; nothing is committed for the batches it did not finish.
"""

from __future__ import annotations

import asyncio
import functools
import zlib
from typing import Any

LOST_DATA_ADVICE = (
    "the broker lost its data (restarted with empty storage, or the topic was deleted and created again). "
    "This worker's tables no longer match what the broker holds, and new records at offsets it already "
    "counted would be skipped, so it stops instead of serving wrong counts. Start afresh: restart "
    "`blackroad up` (a new embedded broker), or on a broker that stays, delete this app's changelog "
    "topics or use a new BLACKROAD_APP_ID"
)


class BrokerLostData(Exception):
    """The broker's log for a partition is not the one this worker processed or wrote."""

    def __init__(self, topic: str, partition: int, what: str) -> None:
        super().__init__(f"the broker's log for {topic}[{partition}] restarted: {what}; {LOST_DATA_ADVICE}")
        self.topic = topic
        self.partition = partition


def fingerprint(record: Any) -> int:
    """A checksum of a consumed record (its value and timestamp), to tell it from another at its offset."""
    return zlib.crc32(record.value or b"", record.timestamp & 0xFFFFFFFF)


def ends_below(topic: str, partition: int, highwater: int, processed: int) -> BrokerLostData:
    return BrokerLostData(
        topic,
        partition,
        f"it ends at offset {highwater}, not above offset {processed} that this worker already processed",
    )


def other_record(topic: str, partition: int, processed: int) -> BrokerLostData:
    return BrokerLostData(
        topic,
        partition,
        f"it holds another record at offset {processed} than the one this worker processed there",
    )


class VerifiedProducer:
    """The changelog producer, checking every acknowledgement against the offsets acknowledged before.

    Only what :class:`~streams.processing.tables.TableWriter` uses. Acknowledgements of one partition
    arrive in the order its batches were sent, so each must be above the last.
    """

    def __init__(self, producer: Any) -> None:
        self._producer = producer
        #: The highest offset acknowledged per (topic, partition).
        self._acknowledged: dict[tuple[str, int], int] = {}

    def create_batch(self) -> Any:
        return self._producer.create_batch()

    async def send_batch(self, batch: Any, topic: str, partition: int) -> asyncio.Future[Any]:
        delivered = await self._producer.send_batch(batch, topic, partition=partition)
        checked: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        delivered.add_done_callback(functools.partial(self._check, checked))
        return checked

    def _check(self, checked: asyncio.Future[Any], delivered: asyncio.Future[Any]) -> None:
        if checked.done():
            return
        if delivered.cancelled():
            checked.cancel()
            return
        failure = delivered.exception()
        if failure is not None:
            checked.set_exception(failure)
            return
        metadata = delivered.result()
        key = (metadata.topic, metadata.partition)
        before = self._acknowledged.get(key)
        if before is not None and metadata.offset <= before:
            checked.set_exception(
                BrokerLostData(
                    metadata.topic,
                    metadata.partition,
                    f"it took a write of this worker at offset {metadata.offset}, not above offset {before} "
                    "where it had taken one before",
                )
            )
            return
        self._acknowledged[key] = metadata.offset
        checked.set_result(metadata)
