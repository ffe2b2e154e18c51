"""Counting the memory entries that searches return: ``memory.accessed`` events.

An entry's ``access_count`` and ``last_accessed`` change when a search returns it: a search
over HTTP, or a handler's (``TaskContext.search``). A handler's search is counted by its own
worker as the task runs. A search over HTTP is served by any worker, so the worker that answers
the client names the entries it returned in ``memory.accessed`` events on the tasks topic, one
per agent, keyed by the agent like its tasks; the agent's worker counts them as it processes
its partition (:meth:`streams.processing.agent_runner.AgentRunner.count_access`). So the counts live in
the tables, survive restarts, and count each event once.

The search does not wait for the broker: its events wait in a bounded queue, a task of the
recorder hands them to the ingress producer, and they are counted as recorded or dropped when
the broker answers (``GET /v1/memory/stats``); a full queue drops them too.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka.errors import KafkaError

from schemas import wire
from streams.serve.ingress import IngressProducer

log = logging.getLogger(__name__)


class AccessRecorder:
    def __init__(self, ingress: IngressProducer, queued: int = 10_000) -> None:
        self._ingress = ingress
        self._queue: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue(queued)
        self._sender: asyncio.Task[None] | None = None
        #: ``memory.accessed`` events the broker took, and those it did not (their accesses are not counted).
        self.sent = 0
        self.dropped = 0

    def start(self) -> None:
        self._sender = asyncio.create_task(self._send_queued(), name="memory-access-recorder")

    async def stop(self) -> None:
        """Hand what is queued to the producer (whose stop waits for it), then end the sender."""
        sender, self._sender = self._sender, None
        if sender is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), 1.0)
        except TimeoutError:
            pass
        sender.cancel()
        try:
            await sender
        except asyncio.CancelledError:
            pass

    def record(self, results: list[dict[str, Any]]) -> None:
        """Queue the accesses of a search's ``results`` (as the API serves them), one event per agent."""
        by_agent: dict[str, list[str]] = {}
        for result in results:
            by_agent.setdefault(result["metadata"]["agent_id"], []).append(result["id"])
        now = wire.now_ms()
        for agent_id, ids in by_agent.items():
            try:
                self._queue.put_nowait((agent_id.encode(), wire.memory_accessed(agent_id, ids, now)))
            except asyncio.QueueFull:
                self._dropped(None)

    async def _send_queued(self) -> None:
        while True:
            key, value = await self._queue.get()
            try:
                delivery = await self._ingress.enqueue(key, value)
            except KafkaError as exc:
                self._dropped(exc)
            else:
                delivery.add_done_callback(self._delivered)
            finally:
                self._queue.task_done()

    def _delivered(self, delivery: asyncio.Future[Any]) -> None:
        if delivery.cancelled():
            self._dropped(asyncio.CancelledError("the producer stopped first"))
        elif (exc := delivery.exception()) is not None:
            self._dropped(exc)
        else:
            self.sent += 1

    def _dropped(self, exc: BaseException | None) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.warning("memory accesses not recorded (%d events so far): %s", self.dropped, exc or "queue full")

    def stats(self) -> dict[str, int]:
        return {"accesses_recorded": self.sent, "accesses_dropped": self.dropped}
