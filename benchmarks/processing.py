"""The processing path alone: the CPU a worker spends on a task before any broker I/O.

Usage: python -m benchmarks.processing [--count 300000] [--agents 15000] [--pack 100] [--rounds 3]

Generates the bench's backlog (``tool_execution`` tasks over ``--agents`` agents, the agents
one worker of two owns in ``make bench``), encodes it as ``task.batch`` events of ``--pack``
tasks (``--pack 1``: one task per event), and hands it to a :class:`BatchProcessor` over fresh
tables in fetches of the size a worker's consumer hands over. Everything a worker does for
a task runs: decoding and validation, the handler, the task, agent and stats rows, the
lifecycle events, the flushes that pack the changed rows into aiokafka record batches (keys,
values, CRC). Only the network is left out: the batches are built and dropped, and no
consumer parses fetched records.

Prints the CPU time per task of each round: a floor under what one worker process spends
on a task, and so a ceiling on the tasks per second a core can give it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import time
import types
from collections import Counter
from typing import Any

from aiokafka.producer.message_accumulator import BatchBuilder
from faust.types import TP

from agents.registry import default_registry
from benchmarks.bench import machine
from schemas import wire
from streams.processing import tables
from streams.processing.metrics import Metrics
from streams.processing.processor import BatchProcessor
from streams.runtime import loadgen
from streams.runtime.settings import Settings

#: Record values a worker's fetch hands the processor at once (its 1 MiB chunks hold about
#: 60 packed events of 100 tasks; unpacked, the consumer's record limit).
PACKED_RECORDS_PER_FETCH = 60
RECORDS_PER_FETCH = 6_000
#: What every flush writes into: a record batch as the producer's, with no broker behind it.
MAX_BATCH_BYTES = 1024 * 1024


class BuildingProducer:
    """Takes a flush's record batches, builds each one's bytes as aiokafka's sender would, and
    drops it."""

    def __init__(self) -> None:
        self.batches = 0
        self.records = 0
        self.records_by_topic: Counter[str] = Counter()

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(MAX_BATCH_BYTES, 0, is_transactional=1)

    async def send_batch(self, batch: BatchBuilder, topic: str, partition: int) -> asyncio.Future[None]:
        batch._build()  # noqa: SLF001 - the sender's step: the batch's header, records and CRC
        self.batches += 1
        self.records += batch.record_count()
        self.records_by_topic[topic] += batch.record_count()
        delivered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        delivered.set_result(None)
        return delivered


def fresh_table(name: str) -> tables.CachedTable:
    """An empty table of ``name`` as :class:`tables.CachedTable` sees a Faust table."""
    store = types.SimpleNamespace(data={}, _key_partition={})
    changelog = types.SimpleNamespace(get_topic_name=lambda: f"{name}-changelog")
    return tables.CachedTable(name, types.SimpleNamespace(data=store, changelog_topic=changelog))


def task_records(topic: str, count: int, agents: int, pack: int) -> list[Any]:
    """The backlog as fetched records of partition 0: ``task.batch`` events of ``pack`` tasks."""
    rng = random.Random(7)  # noqa: S311 - load generation
    ids = loadgen.agent_ids(agents)
    events = [loadgen.make_task(ids[index % agents], index + 1, rng, "tool_execution") for index in range(count)]
    if pack > 1:
        values = [(events[at].agent_id, wire.encode_batch(events[at : at + pack])) for at in range(0, count, pack)]
    else:
        values = [(event.agent_id, wire.encode_task(event)) for event in events]
    return [
        types.SimpleNamespace(
            headers=(), topic=topic, partition=0, offset=offset, timestamp=0, key=agent.encode(), value=value
        )
        for offset, (agent, value) in enumerate(values)
    ]


async def one_round(records: list[Any], count: int, per_fetch: int) -> tuple[float, BuildingProducer]:
    """CPU seconds the processor took for ``records`` (``count`` tasks), and what it produced."""
    settings = Settings(partitions=1)
    stores = {name: fresh_table(name) for name in tables.TABLE_NAMES}
    producer = BuildingProducer()
    processor = BatchProcessor(
        settings,
        tables.TableWriter(tables.DirectSender(producer), stores),
        default_registry(),
        Metrics(),
        wire.Partitioner(1),
        lambda offsets: None,
        lambda tp: 1 << 62,  # a backlog: records always wait, so flushes are a backlog's
        asyncio.Lock(),
    )
    acknowledging = asyncio.ensure_future(processor.acknowledge())
    tp = TP(settings.topic("tasks"), 0)
    started = time.process_time()
    for at in range(0, len(records), per_fetch):
        await processor({tp: records[at : at + per_fetch]})
    async with processor.lock:
        await processor.drain()
    seconds = time.process_time() - started
    acknowledging.cancel()
    finished = sum(1 for row in stores["tasks"].rows.values() if tables.frozen_finished_at(row) > 0)
    if finished != count:
        raise RuntimeError(f"{finished} of {count} tasks finished")
    return seconds, producer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300_000, help="tasks per round")
    parser.add_argument("--agents", type=int, default=15_000, help="agents the tasks go to")
    parser.add_argument("--pack", type=int, default=100, help="tasks per task.batch event (1: one per event)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.count < 1 or args.agents < 1 or not 1 <= args.pack <= wire.MAX_BATCH_TASKS or args.rounds < 1:
        parser.error(f"--count, --agents and --rounds must be positive, --pack 1 to {wire.MAX_BATCH_TASKS}")
    print(f"machine: {machine()}")
    records = task_records(Settings(partitions=1).topic("tasks"), args.count, args.agents, args.pack)
    per_fetch = PACKED_RECORDS_PER_FETCH if args.pack > 1 else RECORDS_PER_FETCH
    shape = f"task.batch of {args.pack}" if args.pack > 1 else "one task per event"
    # The worker's collector settings (streams.cli), and the load's objects out of its way.
    gc.set_threshold(50_000, 20, 100)
    gc.freeze()
    for round_number in range(1, args.rounds + 1):
        seconds, producer = asyncio.run(one_round(records, args.count, per_fetch))
        print(
            f"round {round_number}: {args.count:,} tasks ({shape}, {args.agents:,} agents) in {seconds:.2f} s of CPU: "
            f"{seconds / args.count * 1e6:.2f} us a task, {args.count / seconds:,.0f} tasks/s on one core; "
            f"{producer.records:,} records in {producer.batches:,} batches",
            flush=True,
        )


if __name__ == "__main__":
    main()
