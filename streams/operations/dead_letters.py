"""The dead-letter topic: list its letters, show one, send chosen ones back to the tasks topic.

A letter (see README, "Wire format") holds the reason and the original record's key and
value. Sending one back ("replay") is for letters whose cause is fixed:

* a task whose handler failed on every attempt (``handler failed after ...``) is sent
  again under a new task id (its own id is taken: a task id seen before is counted once),
  its ``metadata`` naming the original (``replay_of``) and the letter (``dead_letter``);
* a record refused at the door (undecodable, invalid) is sent as it was if it now decodes
  to valid tasks (it never ran, so its ids are free), and skipped, with the reason, if it
  still does not;
* a ``task.batch`` with refused tasks is skipped: its other tasks ran, and what was
  refused needs fixing by whoever sent it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.types import TP

from schemas import domain, wire
from streams.processing.transport import fetch_highwaters
from streams.runtime import kafka_clients
from streams.runtime.settings import Settings

#: Seconds without a record after which a read of the topic takes what it has as its end.
_IDLE = 2.0
HANDLER_FAILED = "handler failed"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    partition: int
    offset: int
    ts: int
    reason: str
    source_topic: str
    source_partition: int
    source_offset: int
    key: bytes | None
    value: bytes | None

    @property
    def ref(self) -> str:
        """How the commands name it: ``partition:offset`` in the dead-letter topic."""
        return f"{self.partition}:{self.offset}"

    def summary(self) -> str:
        source = f"{self.source_topic}[{self.source_partition}]@{self.source_offset}"
        reason = self.reason if len(self.reason) <= 100 else self.reason[:97] + "..."
        return f"{self.ref:>10}  {self.ts}  from {source}  {reason}"

    def details(self) -> dict[str, Any]:
        """Everything the letter holds, its value decoded where msgpack can."""
        try:
            value: Any = msgpack.unpackb(self.value, raw=False) if self.value is not None else None
        except Exception:  # noqa: BLE001 - any undecodable value is shown as bytes
            value = {"undecodable": (self.value or b"").hex()}
        return {
            "letter": self.ref,
            "ts": self.ts,
            "reason": self.reason,
            "source": {"topic": self.source_topic, "partition": self.source_partition, "offset": self.source_offset},
            "key": self.key.decode(errors="replace") if self.key is not None else None,
            "value": value,
        }


def parse_letter(partition: int, offset: int, raw: bytes | None) -> DeadLetter:
    data = msgpack.unpackb(raw or b"\xc0", raw=False)
    return DeadLetter(
        partition,
        offset,
        int(data.get("ts") or 0),
        str(data.get("reason", "")),
        str(data.get("topic", "")),
        int(data.get("partition", -1)),
        int(data.get("offset", -1)),
        data.get("key"),
        data.get("value"),
    )


async def read_dead_letters(bootstrap: Settings | str, topic: str, partitions: int) -> list[DeadLetter]:
    """Every committed letter of ``topic``, partition by partition, oldest first."""
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    highwaters = await fetch_highwaters(bootstrap, [TP(topic, p) for p in range(partitions)])
    ends = {TopicPartition(tp.topic, tp.partition): end for tp, end in highwaters.items()}
    consumer = kafka_clients.consumer(bootstrap, enable_auto_commit=False, isolation_level="read_committed")
    await consumer.start()
    letters: list[DeadLetter] = []
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        while await _short_of(consumer, ends):
            batch = await consumer.getmany(timeout_ms=200)
            records = [record for found in batch.values() for record in found]
            if records:
                idle_since = loop.time()
            elif loop.time() - idle_since > _IDLE:
                break  # the rest are transaction markers or aborted records
            letters.extend(parse_letter(r.partition, r.offset, r.value) for r in records)
    finally:
        await consumer.stop()
    letters.sort(key=lambda letter: (letter.partition, letter.offset))
    return letters


async def _short_of(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    """Whether the consumer is still short of any partition's end."""
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return True
    return False


def replay_record(letter: DeadLetter) -> tuple[bytes, bytes] | str:
    """The record (key, value) that sends ``letter`` back to the tasks topic, or why it cannot."""
    try:
        tasks, refused, access = wire.decode_record(letter.value)
    except wire.WireError as exc:
        return f"still not a valid event: {exc}"
    if access is not None:
        return "a memory.accessed event: not replayed"
    if refused:
        return "a task.batch with refused tasks: its other tasks ran; fix and resend what was refused"
    if letter.reason.startswith(HANDLER_FAILED):
        tasks = [_renamed(task, letter) for task in tasks]
    value = wire.encode_task(tasks[0]) if len(tasks) == 1 else wire.encode_batch(tasks)
    return tasks[0].agent_id.encode(), value


def _renamed(task: wire.TaskEvent, letter: DeadLetter) -> wire.TaskEvent:
    metadata = {**task.metadata, "replay_of": task.task_id, "dead_letter": letter.ref}
    return wire.TaskEvent(
        domain.new_id("task"),
        task.agent_id,
        task.kind,
        task.priority,
        task.title,
        task.description,
        task.payload,
        wire.now_ms(),
        task.agent_type,
        task.deadline_ms,
        metadata,
    )


async def send_records(
    bootstrap: Settings | str, topic: str, records: list[tuple[bytes, bytes]], partitions: int
) -> None:
    """Put ``records`` on the tasks topic, each in its agent's partition, acknowledged by the broker."""
    partition_for = wire.Partitioner(partitions)
    producer = kafka_clients.producer(bootstrap, acks="all")
    await producer.start()
    try:
        sent = [await producer.send(topic, value, key=key, partition=partition_for(key)) for key, value in records]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
