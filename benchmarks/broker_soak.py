"""How the embedded broker copes with a steady light load as its topic fills up.

Tansu 0.6.0 (memory engine) lists every stored batch of a partition on each fetch that
returns records, so the cost of a fetch grows with the number of batches ever produced
to that partition, and nothing deletes them (no retention, no DeleteRecords). A producer
at a light rate sends about one record per batch, which is the worst case.

This script measures it with no project code in the path: one aiokafka producer sending
RATE records/s (one per request, as any client at light load does) and one raw consumer.
Every WINDOW seconds it prints the delivery latency (producer timestamp to consumer) and
the broker's CPU.

Usage: python -m benchmarks.broker_soak [--rate 500] [--seconds 120] [--window 10] [--partitions 4]
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from benchmarks import bench
from streams.engines.tansu import TansuBroker
from streams.processing.histogram import percentiles, record
from streams.runtime.broker import free_port

TOPIC = "soak"


async def soak(
    bootstrap: str, broker: bench.ProcessProbe, rate: float, seconds: float, window: float, partitions: int
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, partitions, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
    consumer = AIOKafkaConsumer(TOPIC, bootstrap_servers=bootstrap, fetch_max_wait_ms=10, auto_offset_reset="earliest")
    await producer.start()
    await consumer.start()
    current: dict[int, int] = {}
    received = 0

    async def consume() -> None:
        nonlocal received
        while True:
            fetched = await consumer.getmany(timeout_ms=100)
            now_ns = time.time_ns()
            for records in fetched.values():
                for message in records:
                    (sent_ns,) = struct.unpack(">q", message.value[:8])
                    record(current, (now_ns - sent_ns) / 1e6)
                    received += 1

    consuming = asyncio.create_task(consume())
    print(f"{'seconds':>7} {'sent':>8} {'received':>8} {'p50 ms':>8} {'p99 ms':>8} {'broker cpu':>10}", flush=True)
    padding = b"x" * 200
    started = time.monotonic()
    window_end = started + window
    cpu_before = broker.cpu_seconds()
    sent = 0
    try:
        while time.monotonic() - started < seconds:
            due = started + sent / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await producer.send(TOPIC, struct.pack(">q", time.time_ns()) + padding, partition=sent % partitions)
            sent += 1
            if time.monotonic() >= window_end:
                cpu_now = broker.cpu_seconds()
                p50, p99 = percentiles(current, (0.5, 0.99))
                busy = (cpu_now - cpu_before) / window * 100
                print(
                    f"{window_end - started:7.0f} {sent:8d} {received:8d} {p50!s:>8} {p99!s:>8} {busy:9.0f}%",
                    flush=True,
                )
                current = {}
                cpu_before = cpu_now
                window_end += window
    finally:
        consuming.cancel()
        await producer.stop()
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500.0, help="records per second")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--window", type=float, default=10.0, help="seconds per line")
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    print(f"embedded broker soak: {args.rate:g} records/s for {args.seconds:g}s, {args.partitions} partitions")
    print("machine:", ", ".join(f"{key} {value}" for key, value in bench.machine().items()))
    with TansuBroker(free_port()) as broker:
        assert broker.pid is not None
        asyncio.run(
            soak(
                broker.bootstrap, bench.ProcessProbe(broker.pid), args.rate, args.seconds, args.window, args.partitions
            )
        )


if __name__ == "__main__":
    main()
