"""The HTTP ingress's own producer: a request's tasks reach the broker, or the caller hears which may not have.

``POST /v1/tasks`` and ``POST /v1/batch`` must answer quickly whatever the broker does: 202
only once the broker has acknowledged every task of the request, otherwise a refusal the web
view turns into 503. So the ingress does not share the changelog producer (its long timeouts
suit flushes, not a waiting client): it has a producer of its own with short timeouts, and
waits for each acknowledgement at most ``ingress_timeout`` seconds.

Each task goes straight to its agent's partition: a request's tasks of one partition travel
as one record (a ``task.created`` event, or a ``task.batch`` for several), so no worker has
to forward them. A request of more than :data:`SLICE` tasks goes out in slices of that many,
at least :data:`SLICE_GAP` seconds apart: a batch of 1,000 tasks then reaches the workers as
forty small pieces over 100 ms, and a task another client posts meanwhile waits behind one piece
in its partition, not behind the whole batch (a partition is processed in order). A refusal
names the tasks not known to have arrived; they may still arrive (a record already written to
a hung broker's socket is read when it resumes), and task ids make a retry safe, since a task
id seen before is counted once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka.errors import KafkaError

from schemas import wire
from streams.runtime import kafka_clients
from streams.runtime.settings import Settings
from streams.tracing.spans import TaskTracer

#: Tasks of a request sent to the broker together; a larger request goes out in slices.
SLICE = 25
#: Seconds at least between two slices of one request: at most 10,000 tasks a second per
#: request, about a third of what one worker process does (25 tasks are ~1 ms of its loop).
SLICE_GAP = 0.0025


class BrokerUnavailable(Exception):
    """The broker did not acknowledge a request's tasks in time (or refused them)."""

    def __init__(self, reason: str, task_ids: list[str]) -> None:
        super().__init__(reason)
        #: The request's tasks not known to have reached the broker.
        self.task_ids = task_ids


class IngressProducer:
    def __init__(self, settings: Settings, tracer: TaskTracer | None = None) -> None:
        #: Records the requests' ``ingress`` spans; None without a trace collector.
        self.tracer = tracer
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

    async def send(self, events: list[wire.TaskEvent], trace: str | None = None) -> dict[int, int]:
        """Put ``events`` on the broker, each in its agent's partition, in slices of
        :data:`SLICE` at least :data:`SLICE_GAP` apart; return the offset of the last record
        written to each partition, or raise :class:`BrokerUnavailable` naming the tasks not
        acknowledged in time. Every record carries ``trace`` (a W3C traceparent) as its
        ``traceparent`` header."""
        headers = None if trace is None else [(wire.TRACEPARENT_HEADER, trace.encode())]
        loop = asyncio.get_running_loop()
        due = loop.time()
        reached: dict[int, int] = {}
        for start in range(0, len(events), SLICE):
            if start:
                await asyncio.sleep(max(0.0, due - loop.time()))
            due = loop.time() + SLICE_GAP
            try:
                sent = self._send_slice(events[start : start + SLICE], headers)
                reached.update(await asyncio.wait_for(sent, self.timeout))
            except TimeoutError:
                reason = f"the broker did not acknowledge the tasks within {self.timeout:g} s"
            except KafkaError as exc:
                reason = f"the broker did not take the tasks: {exc}"
            else:
                continue
            raise BrokerUnavailable(reason, [event.task_id for event in events[start:]])
        return reached

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

    async def _send_slice(
        self, events: list[wire.TaskEvent], headers: list[tuple[str, bytes]] | None
    ) -> dict[int, int]:
        """One record per partition the tasks belong to, all handed to the producer before any
        is awaited; returns each partition's record's offset."""
        by_partition: dict[int, list[wire.TaskEvent]] = {}
        for event in events:
            by_partition.setdefault(self.partition_for(event.agent_id.encode()), []).append(event)
        deliveries: list[asyncio.Future[Any]] = []
        for partition, group in by_partition.items():
            value = wire.encode_task(group[0]) if len(group) == 1 else wire.encode_batch(group)
            key = group[0].agent_id.encode()
            delivery = await self._producer.send(self.topic, value, key=key, partition=partition, headers=headers)
            deliveries.append(delivery)
        return {written.partition: written.offset for written in await asyncio.gather(*deliveries)}
