"""The HTTP ingress's own producer: a request's tasks reach the broker whole, or the caller hears so in time.

``POST /v1/tasks`` and ``POST /v1/batch`` must answer quickly whatever the broker does: 202
only once the broker has acknowledged the request's record, otherwise a refusal the web view
turns into 503. So the ingress does not share the changelog producer (its long timeouts suit
flushes, not a waiting client): it has a producer of its own with short timeouts, and waits
for the acknowledgement at most ``ingress_timeout`` seconds.

A whole request travels as ONE record (a ``task.created`` event, or a ``task.batch`` event for
several tasks), keyed by its first task's agent, so a request is never half-sent: the worker
owning that partition forwards tasks of other partitions to theirs (as it does for any
``task.batch``). A refused record may still reach the broker later (one already written to a
hung broker's socket is read when it resumes); task ids make a retry safe, since a task id seen
before is counted once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka.errors import KafkaError

from schemas import wire
from streams.runtime import kafka_clients
from streams.runtime.settings import Settings


class BrokerUnavailable(Exception):
    """The broker did not acknowledge a request's record in time (or refused it)."""


class IngressProducer:
    def __init__(self, settings: Settings) -> None:
        self.timeout = settings.ingress_timeout
        self.topic = settings.topic("tasks")
        self.partition_for = wire.Partitioner(settings.partitions)
        timeout_ms = max(100, int(self.timeout * 1000))
        self._producer = kafka_clients.producer(
            settings,
            acks="all",
            linger_ms=0,
            # A record not acknowledged by then is given up, not retried for the client defaults' 40 s.
            request_timeout_ms=timeout_ms,
            retry_backoff_ms=min(100, timeout_ms // 4),
            client_id=f"{settings.app_id}-ingress",
        )
        self._checked_at = -1.0
        self._broker_answered = False

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, events: list[wire.TaskEvent]) -> None:
        """Put ``events`` on the broker as one record; raise :class:`BrokerUnavailable` if not acknowledged in time."""
        value = wire.encode_task(events[0]) if len(events) == 1 else wire.encode_batch(events)
        key = events[0].agent_id.encode()
        try:
            await asyncio.wait_for(self._send(value, key, self.partition_for(key)), self.timeout)
        except TimeoutError:
            raise BrokerUnavailable(f"the broker did not acknowledge the tasks within {self.timeout:g} s") from None
        except KafkaError as exc:
            raise BrokerUnavailable(f"the broker did not take the tasks: {exc}") from None

    async def enqueue(self, key: bytes, value: bytes) -> asyncio.Future[Any]:
        """Hand one record keyed by an agent to the producer without waiting for the broker;
        the future it returns resolves once the broker has the record (or fails)."""
        delivery: asyncio.Future[Any] = await self._producer.send(
            self.topic, value, key=key, partition=self.partition_for(key)
        )
        return delivery

    async def broker_answers(self) -> bool:
        """Whether the broker answered a metadata request within the ingress timeout (checked
        at most once a second; the answer in between is the last one)."""
        now = time.monotonic()
        if now - self._checked_at >= 1.0:
            self._checked_at = now
            try:
                await asyncio.wait_for(self._producer.client.fetch_all_metadata(), self.timeout)
                self._broker_answered = True
            except (TimeoutError, KafkaError, OSError):
                self._broker_answered = False
        return self._broker_answered

    async def _send(self, value: bytes, key: bytes, partition: int) -> None:
        delivered = await self._producer.send(self.topic, value, key=key, partition=partition)
        await delivered
