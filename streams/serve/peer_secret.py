"""The secret workers send each other with forwarded requests, shared through the broker.

``BLACKROAD_PEER_SECRET`` sets it. Unset, every worker of a deployment (any machine) takes
the first record of the topic ``<prefix>.peer-secret``, which the first worker to find it
empty writes: a random value. Two workers starting together may both write one; both then
read the log from its start and take the first, so they agree. The topic keeps its
records (no compaction, no retention limit), so the first record stays the first. Whoever
may read that topic may pass for a worker: restrict it with ACLs, or set the secret.
"""

from __future__ import annotations

import asyncio
import secrets

from aiokafka import TopicPartition

from streams.runtime import kafka_clients
from streams.runtime.broker import create_topic
from streams.runtime.settings import Settings

_KEY = b"peer-secret"
#: Seconds to wait for the topic's first record once it is known to hold one.
_READ_TIMEOUT = 30.0


async def shared_peer_secret(settings: Settings) -> str:
    """The deployment's peer secret: as set, else the broker's (written first if need be)."""
    if settings.peer_secret is not None:
        return settings.peer_secret
    topic = settings.topic("peer-secret")
    await create_topic(
        settings,
        topic,
        1,
        {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1", **settings.topic_configs},
        settings.replication_factor or 1,
    )
    found = await _first_record(settings, topic)
    if found is None:
        producer = kafka_clients.producer(settings, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topic, secrets.token_urlsafe(32).encode(), key=_KEY, partition=0)
        finally:
            await producer.stop()
        found = await _first_record(settings, topic)
    if found is None:
        raise RuntimeError(f"the peer secret written to {topic} cannot be read back")
    return found


async def _first_record(bootstrap: Settings, topic: str) -> str | None:
    """The value of the topic's first record, or None if it has none."""
    consumer = kafka_clients.consumer(bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        ends = await consumer.end_offsets([partition])
        if ends[partition] == 0:
            return None
        record = await asyncio.wait_for(consumer.getone(partition), _READ_TIMEOUT)
        return bytes(record.value or b"").decode()
    finally:
        await consumer.stop()
