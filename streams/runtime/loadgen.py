"""The load generator behind ``blackroad produce``: task events for many agents at a set rate."""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from schemas import domain, wire
from schemas.wire import TaskEvent, partition_for
from streams.runtime import kafka_clients
from streams.runtime.broker import create_topic
from streams.runtime.settings import Settings

_KIND_MIX = (
    ("tool_execution", 40),
    ("memory_operation", 25),
    ("inference", 20),
    ("code_analysis", 10),
    ("coordination", 5),
)
_TOOLS = ("echo", "upper", "reverse", "wordcount")


def agent_ids(count: int) -> list[str]:
    return [f"agent_load_{i:05d}" for i in range(1, count + 1)]


def make_task(agent_id: str, sequence: int, rng: random.Random, kind: str | None = None) -> TaskEvent:
    """One task of the demo mix, deterministic for a given generator state."""
    kind = kind or rng.choices([k for k, _ in _KIND_MIX], weights=[w for _, w in _KIND_MIX])[0]
    payload: dict[str, object]
    if kind == "tool_execution":
        payload = {"tool": rng.choice(_TOOLS), "input": f"task {sequence} for {agent_id}"}
    elif kind == "memory_operation":
        payload = {"op": "recall", "limit": 3} if sequence % 3 == 0 else {"op": "write", "content": f"note {sequence}"}
    elif kind == "code_analysis":
        payload = {"code": "def f(x):\n    return x  # TODO\n" * (1 + sequence % 3)}
    elif kind == "coordination":
        payload = {"agents": [agent_id]}
    else:
        payload = {}
    return TaskEvent(
        task_id=domain.new_id("task"),
        agent_id=agent_id,
        kind=kind,
        priority="normal",
        title=f"{kind} #{sequence}",
        description=f"demo task {sequence}",
        payload=payload,
        created_ms=wire.now_ms(),
    )


@dataclass
class Progress:
    sent: int = 0
    started: float = 0.0


async def produce(
    bootstrap: Settings | str,
    topic: str,
    agents: int,
    rate: float,
    count: int,
    seed: int = 7,
    progress: Progress | None = None,
    kind: str | None = None,
    pack: int = 1,
    partitions: int = 4,
    replication_factor: int = 1,
    topic_configs: dict[str, str] | None = None,
) -> int:
    """Send ``count`` tasks (0 = until cancelled) at ``rate`` per second (0 = as fast as possible).

    With ``pack`` > 1, tasks of one partition travel together as ``task.batch`` events of up
    to ``pack`` tasks (``partitions`` must match the topic's).
    """
    rng = random.Random(seed)  # noqa: S311 - load generation, not security
    ids = agent_ids(agents)
    progress = progress or Progress()
    progress.started = time.monotonic()
    # Throttled loads send at once (latency); backlogs linger a little to batch (throughput).
    linger_ms = 0 if rate > 0 else 5
    # It may run before any worker declared the topic: then it creates it as a worker would.
    await create_topic(bootstrap, topic, partitions, topic_configs, replication_factor)
    producer = kafka_clients.producer(bootstrap, linger_ms=linger_ms, max_batch_size=512 * 1024, acks=1)
    await producer.start()
    try:
        pending = []
        packs: dict[int, list[TaskEvent]] = {}
        for sequence in itertools.count(1) if count == 0 else range(1, count + 1):
            agent_id = ids[(sequence - 1) % len(ids)]
            event = make_task(agent_id, sequence, rng, kind)
            if pack > 1:
                pending.extend(await add_to_pack(producer, topic, packs, event, pack, partitions))
            else:
                pending.append(await producer.send(topic, wire.encode_task(event), key=agent_id.encode()))
            progress.sent = sequence
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
            if rate > 0:
                ahead = sequence / rate - (time.monotonic() - progress.started)
                if ahead > 0.002:
                    await asyncio.sleep(ahead)
        pending.extend(await send_packs(producer, topic, packs))
        await asyncio.gather(*pending)
        await producer.flush()
    finally:
        await producer.stop()
    return progress.sent


async def add_to_pack(
    producer: AIOKafkaProducer,
    topic: str,
    packs: dict[int, list[TaskEvent]],
    event: TaskEvent,
    pack: int,
    partitions: int,
) -> list[asyncio.Future[object]]:
    """Add ``event`` to its partition's pack, and send the pack once it holds ``pack`` tasks
    (:func:`send_packs` sends what is left at the end)."""
    partition = partition_for(event.agent_id.encode(), partitions)
    packed = packs.setdefault(partition, [])
    packed.append(event)
    return await send_packs(producer, topic, packs, only=partition) if len(packed) >= pack else []


async def send_packs(
    producer: AIOKafkaProducer, topic: str, packs: dict[int, list[TaskEvent]], only: int | None = None
) -> list[asyncio.Future[object]]:
    """Send the packed tasks of partition ``only`` (or of every partition) as ``task.batch`` events."""
    sent = []
    for partition in [only] if only is not None else list(packs):
        events = packs.pop(partition, [])
        if events:
            value = wire.encode_batch(events)
            sent.append(await producer.send(topic, value, key=events[0].agent_id.encode(), partition=partition))
    return sent


def print_line(text: str) -> None:
    stream = sys.stderr
    if stream.isatty():
        stream.write("\r\x1b[2K" + text)
    else:
        stream.write(text + "\n")
    stream.flush()
