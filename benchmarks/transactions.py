"""Back-to-back Kafka transactions: how long one takes with aiokafka's wait and with the project's.

Usage: python -m benchmarks.transactions [--transactions 500] [--gap-ms 0]

Starts a fresh embedded Apache Kafka and runs, on one transactional producer, what a worker's
flush does for one input partition: begin, send a record, add the input offset, commit, and
wait for the record's acknowledgement; the next transaction begins ``--gap-ms`` after the last
commits (0: at once, as flushes under load do). It does so with aiokafka's own wait after the
broker answers CONCURRENT_TRANSACTIONS (the last transaction's markers are still being written)
and with the wait the project's transactional producers use
(``streams.runtime.kafka_clients.TRANSACTION_BUSY_RETRY``), each on a transactional id of its own,
and prints P50 / P90 / P99 / max of a transaction in milliseconds (the first 20 left out).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import tempfile
import time
from pathlib import Path

from aiokafka import TopicPartition
from aiokafka.producer import sender

from benchmarks.bench import TOPIC, running_broker
from streams.runtime import kafka_clients

WARM_UP = 20


async def transaction_times(bootstrap: str, transactional_id: str, wait: float, count: int, gap: float) -> list[float]:
    """Milliseconds each of ``count`` transactions took on a new producer of ``transactional_id``
    that waits ``wait`` seconds after CONCURRENT_TRANSACTIONS."""
    producer = kafka_clients.producer(bootstrap, transactional_id=transactional_id, acks="all", linger_ms=0)
    sender.BACKOFF_OVERRIDE = wait  # after the factory, which sets the project's
    await producer.start()
    source = TopicPartition(TOPIC, 0)
    times: list[float] = []
    try:
        for offset in range(count + WARM_UP):
            began = time.perf_counter()
            await producer.begin_transaction()
            sent = await producer.send(TOPIC, b"x" * 200, partition=1)
            await producer.send_offsets_to_transaction({source: offset + 1}, f"{transactional_id}-group")
            await producer.commit_transaction()
            await sent
            times.append((time.perf_counter() - began) * 1000)
            await asyncio.sleep(gap)
    finally:
        await producer.stop()
    return sorted(times[WARM_UP:])


def summary(times: list[float]) -> str:
    def at(share: float) -> float:
        return times[min(len(times) - 1, int(len(times) * share))]

    return f"P50 {at(0.5):.2f}  P90 {at(0.9):.2f}  P99 {at(0.99):.2f}  max {times[-1]:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=500)
    parser.add_argument("--gap-ms", type=float, default=0.0)
    args = parser.parse_args()
    aiokafka_wait = sender.BACKOFF_OVERRIDE
    print(f"{platform.node()}, {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp, running_broker("kafka", Path(tmp)) as broker:
        for name, wait in [("aiokafka", aiokafka_wait), ("project", kafka_clients.TRANSACTION_BUSY_RETRY)]:
            gap = args.gap_ms / 1000
            times = asyncio.run(transaction_times(broker.bootstrap, f"bench-{name}", wait, args.transactions, gap))
            print(f"{name} wait {wait * 1000:g} ms, gap {args.gap_ms:g} ms: {summary(times)}", flush=True)


if __name__ == "__main__":
    main()
