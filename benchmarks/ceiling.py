"""The ceiling: a raw aiokafka consumer updating plain dicts (no changelog, no durability).

Usage: python benchmarks/ceiling.py BOOTSTRAP TOPIC EXPECTED
"""

from __future__ import annotations

import asyncio
import sys

import msgpack
from aiokafka import AIOKafkaConsumer

from benchmarks.report import Tally, emit


async def main(bootstrap: str, topic: str, expected: int) -> None:
    tally = Tally(expected)
    tasks: dict[str, str] = {}
    agents: dict[str, int] = {}
    stats = {"completed": 0}
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id="bench-ceiling",
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    emit({"event": "ready"})
    try:
        while tally.count < expected:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for records in batches.values():
                for record in records:
                    event = msgpack.unpackb(record.value)
                    tasks[event["task_id"]] = "completed"
                    agents[event["agent_id"]] = agents.get(event["agent_id"], 0) + 1
                    stats["completed"] += 1
                    tally.done_one(event["ts"])
        await asyncio.Event().wait()  # stay up until the runner has read CPU and memory
    finally:
        await consumer.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
