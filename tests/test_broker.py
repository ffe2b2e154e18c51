"""Broker helpers, and the Tansu engine's high-water correction that table recovery relies on there."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from faust.types import TP

from streams.engines.tansu import TansuBroker
from streams.processing.transport import fetch_highwaters
from streams.runtime.broker import free_port


@pytest.mark.parametrize("broker", ["tansu"], indirect=True)
def test_tansu_fetch_highwaters_counts_every_record_of_a_multi_record_batch(broker: TansuBroker) -> None:
    topic = "highwater-check"

    async def run() -> tuple[int, int]:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=50)
        await producer.start()
        try:
            # Ten records in one produce batch (same partition, inside the linger window).
            futures = [await producer.send(topic, b"v", key=b"k", partition=0) for _ in range(10)]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
        await consumer.start()
        try:
            listed = await consumer.end_offsets([TopicPartition(topic, 0)])
        finally:
            await consumer.stop()
        fetched = await fetch_highwaters(broker.bootstrap, [TP(topic, 0)])
        return listed[TopicPartition(topic, 0)], fetched[TP(topic, 0)]

    listed, fetched = asyncio.run(run())
    assert fetched == 10
    # The broker's ListOffsets answer is the reason the correction exists.
    assert listed <= fetched


def test_free_port_gives_a_bindable_run_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    first = free_port(3)
    assert 10_000 <= first and first + 3 <= low
    sockets = [socket.socket() for _ in range(3)]
    try:
        for offset, sock in enumerate(sockets):
            sock.bind(("127.0.0.1", first + offset))
    finally:
        for sock in sockets:
            sock.close()
