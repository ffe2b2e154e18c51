"""The batch processor: decode, run agent handlers, write tables, commit.

One call handles everything one fetch returned, across partitions:

1. decode and validate each record; bad ones go to the dead-letter topic;
2. group tasks by agent and run each agent's tasks in offset order, at most
   ``max_concurrent_tasks`` of one agent in a handler at once, agents concurrently;
   synchronous handlers run inline without creating a task;
3. fold each outcome into the task, agent, memory and stats rows;
4. send the lifecycle events and dead letters, and go on with the next batch; changed
   rows reach their changelogs in bulk once per flush interval (see
   :class:`streams.tables.TableWriter`). Once the broker has all the records a batch
   depends on, its offsets are marked processed so the next commit includes them.

Replays after a crash are idempotent: see :mod:`streams.state`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from agents.base import TaskContext, TaskFailed
from agents.registry import HandlerRegistry, UnknownHandler
from schemas import wire
from schemas.wire import TaskEvent, WireError
from streams import state
from streams.metrics import Metrics
from streams.settings import Settings
from streams.tables import TableWriter

Partitioner = Callable[[bytes], int]
#: Changed rows that force a changelog flush before the flush interval is up.
_MAX_DIRTY_ROWS = 50_000
#: Bytes of record values processed in one go: a fetch of packed ``task.batch`` events
#: can hold far more tasks than records, and web views must not wait for all of them.
_CHUNK_BYTES = 1024 * 1024


@dataclass(slots=True)
class _Item:
    partition: int
    offset: int
    event: TaskEvent
    # Which rows still lack this event's effects (False after a crash replay).
    apply_task: bool = True
    apply_agent: bool = True
    apply_memory: bool = True
    apply_stats: bool = True
    task: dict[str, Any] | None = None


@dataclass(slots=True)
class _Outcome:
    status: str
    result: Any = None
    error: str | None = None
    attempts: int = 1
    handler_ms: float = 0.0
    memory_written: list[dict[str, Any]] = field(default_factory=list)
    finished_ms: int = 0


@dataclass(slots=True)
class _AgentRun:
    agent_id: str
    partition: int
    agent: dict[str, Any]
    #: The agent's memory row as stored, and the private copy once a handler writes.
    stored_memory: dict[str, Any] | None
    agent_base: int
    memory_base: int
    memory: dict[str, Any] | None = None
    in_flight: int = 0


class BatchProcessor:
    def __init__(
        self,
        settings: Settings,
        writer: TableWriter,
        registry: HandlerRegistry,
        metrics: Metrics,
        partition_for: Partitioner,
        on_processed: Callable[[dict[Any, int]], None],
        highwater: Callable[[Any], int | None],
        lock: asyncio.Lock,
    ) -> None:
        self.settings = settings
        self.writer = writer
        self.registry = registry
        self.metrics = metrics
        self.partition_for = partition_for
        self.on_processed = on_processed
        self.highwater = highwater
        self.lock = lock
        #: Tasks inside handlers right now on this worker.
        self.in_flight = 0
        # Per-batch tallies, handed to the metrics once per batch.
        self._finished: Counter[str] = Counter()
        self._handler_ms: list[float] = []
        #: Batches whose records are not all acknowledged by the broker yet.
        self._unacked: asyncio.Queue[tuple[list[asyncio.Future[Any]], dict[Any, int]]] = asyncio.Queue()
        self._last_flush = time.monotonic()
        self.tasks_topic = settings.topic("tasks")
        self.events_topic = settings.topic("events")
        self.dead_letter_topic = settings.topic("deadletter")
        self._stats_base: dict[int, int] = {}
        self._batch_stats: dict[int, dict[str, Any]] = {}

    async def __call__(self, batch: dict[Any, list[Any]]) -> None:
        for chunk in _chunks(batch, _CHUNK_BYTES):
            await self._process_chunk(chunk)

    async def _process_chunk(self, batch: dict[Any, list[Any]]) -> None:
        async with self.lock:
            started = time.perf_counter()
            try:
                offsets, count = await self._process(batch)
                produced, waits = await self.writer.end_batch()
            except BaseException:
                self.writer.rollback()
                raise
            # The next batch starts while this one's records travel to the broker.
            self._unacked.put_nowait((waits, offsets))
            if self._flush_due():
                produced += await self._flush()
            self.metrics.batch_done(count, produced, time.perf_counter() - started, self._finished, self._handler_ms)
            self._finished = Counter()
            self._handler_ms = []

    def _flush_due(self) -> bool:
        dirty = self.writer.dirty
        return dirty > 0 and (
            dirty >= _MAX_DIRTY_ROWS or time.monotonic() - self._last_flush >= self.settings.flush_interval
        )

    async def _flush(self) -> int:
        self._last_flush = time.monotonic()
        return await self.writer.flush()

    async def flush_if_due(self) -> None:
        """Called on a timer, so rows changed by the last batch of a burst reach the changelog."""
        async with self.lock:
            if self._flush_due():
                self.metrics.events_out.inc(await self._flush())

    async def acknowledge(self) -> None:
        """Mark batches processed, in order, once the broker has all their records.

        Runs for the life of the worker. A failed delivery raises here and stops the
        worker: its stores hold effects the changelog may lack, so it must restart
        from the changelog and the last committed offsets.
        """
        while True:
            waits, offsets = await self._unacked.get()
            try:
                for future in waits:
                    await future
                self.on_processed(offsets)
            finally:
                self._unacked.task_done()

    async def expire_tasks(self, older_than_ms: int, limit: int = 20_000) -> int:
        """Remove finished tasks completed before ``older_than_ms`` from the live table.

        Takes at most ``limit`` rows per call so the event loop is never held for long.
        """
        async with self.lock:
            rows = self.writer.stores["tasks"].rows
            expired = []
            for task_id, row in rows.items():
                finished = row["completed_at"]
                if finished is not None and finished < older_than_ms and row["status"] in state.TERMINAL_TASK_STATUSES:
                    expired.append(task_id)
                    if len(expired) >= limit:
                        break
            for task_id in expired:
                self.writer.delete("tasks", task_id)
            await self.writer.end_batch()
            self.metrics.tasks_expired.inc(len(expired))
            return len(expired)

    async def flush_changed_rows(self) -> None:
        """Send every changed row now (on shutdown; caller holds the lock)."""
        await self._flush()

    async def drain(self) -> None:
        """Flush and wait until every batch so far is acknowledged (caller holds the lock)."""
        await self._flush()
        await self._unacked.join()

    async def _process(self, batch: dict[Any, list[Any]]) -> tuple[dict[Any, int], int]:
        now = wire.now_ms()
        by_agent: dict[str, list[_Item]] = {}
        offsets: dict[Any, int] = {}
        count = 0
        self._stats_base = {}
        self._batch_stats = {}
        for tp, records in batch.items():
            partition = tp.partition
            stats = self._stats_row(partition)
            base = self._stats_base[partition]
            for record in records:
                count += 1
                self._route(record, partition, stats, base, by_agent)
            offsets[tp] = records[-1].offset + 1
            stats["o"] = max(stats["o"], records[-1].offset)
            end = self.highwater(tp)
            stats["pending"] = max(0, end - offsets[tp]) if end is not None else 0
            self.metrics.consumer_lag.labels(partition=str(partition)).set(stats["pending"])
        self.metrics.events_in.inc(count)
        pending = []
        for agent_id, items in by_agent.items():
            remainder = self._run_agent(agent_id, items, now)
            if remainder is not None:
                pending.append(remainder)
        if pending:
            await asyncio.gather(*pending)
        return offsets, count

    # -- decoding and routing -------------------------------------------------

    def _route(
        self, record: Any, partition: int, stats: dict[str, Any], stats_base: int, by_agent: dict[str, list[_Item]]
    ) -> None:
        try:
            events, refused = wire.decode_tasks(record.value)
        except WireError as exc:
            self._dead_letter(record, partition, str(exc), stats, stats_base)
            return
        for reason in refused:
            self._dead_letter(record, partition, reason, stats, stats_base)
        single = len(events) == 1 and not refused
        for event in events:
            key = event.agent_id.encode()
            if (record.key != key) if single else (self.partition_for(key) != partition):
                # Keyed by something else: send it on to its agent's partition.
                self.writer.emit(self.tasks_topic, self.partition_for(key), key, wire.encode_task(event))
                self.metrics.repartitioned.inc()
                continue
            by_agent.setdefault(event.agent_id, []).append(_Item(partition, record.offset, event))

    def _dead_letter(self, record: Any, partition: int, reason: str, stats: dict[str, Any], stats_base: int) -> None:
        value = wire.dead_letter(reason, record.topic, partition, record.offset, record.key, record.value)
        self.writer.emit(self.dead_letter_topic, partition, record.key, value)
        self.metrics.dead_lettered.labels(reason=reason.split(" ", 1)[0]).inc()
        if record.offset > stats_base:
            stats["invalid_events"] += 1

    # -- rows -------------------------------------------------------------------

    def _stats_row(self, partition: int) -> dict[str, Any]:
        row = self._batch_stats.get(partition)
        if row is not None:
            return row
        key = state.stats_key(partition)
        row = self._writable("stats", key, partition)
        if row is None:
            row = state.new_stats(partition)
            self.writer.put("stats", key, row, partition)
        self._stats_base.setdefault(partition, row["o"])
        self._batch_stats[partition] = row
        return row

    def _writable(self, table: str, key: str, partition: int) -> Any:
        """The row to change in this batch: a private copy on first touch."""
        if self.writer.touched(table, key):
            return self.writer.get(table, key)
        current = self.writer.get(table, key)
        if current is None:
            return None
        row = _COPY[table](current)
        self.writer.put(table, key, row, partition)
        return row

    # -- running an agent's tasks ----------------------------------------------

    def _run_agent(self, agent_id: str, items: list[_Item], now: int) -> Awaitable[None] | None:
        partition = items[0].partition
        agent = self._writable("agents", agent_id, partition)
        if agent is None:
            agent = state.new_agent(agent_id, items[0].event.agent_type, now, self.settings.max_concurrent_tasks)
            self.writer.put("agents", agent_id, agent, partition)
        stored_memory = self.writer.get("memory", agent_id)
        memory_base = -1 if stored_memory is None else stored_memory["o"]
        run = _AgentRun(agent_id, partition, agent, stored_memory, agent["o"], memory_base)
        stats_base = self._stats_base[partition]
        runnable: list[_Item] = []
        for item in items:
            if self._prepare(item, run, stats_base):
                runnable.append(item)
        if not runnable:
            return None
        if agent["status"] == "offline" and run.agent_base < runnable[0].offset:
            self._wake(run, runnable[0], now)
        agent["status"] = "busy"
        for index, item in enumerate(runnable):
            started = self._start(item, run)
            if not isinstance(started, _Outcome):
                return self._run_rest(run, runnable, index, started)
            self._finish(item, run, started)
        self._settle(run, runnable[-1].offset)
        return None

    def _prepare(self, item: _Item, run: _AgentRun, stats_base: int) -> bool:
        """Decide which rows this event still has to change; False when none."""
        task = self.writer.get("tasks", item.event.task_id)
        if task is not None and task["o"] != item.offset:
            # The same task id again (a client retry): the first one counts.
            if item.offset > stats_base:
                self._stats_row(run.partition)["duplicates"] += 1
            self.metrics.duplicates.inc()
            return False
        item.apply_task = task is None or task["status"] not in state.TERMINAL_TASK_STATUSES
        item.apply_agent = item.offset > run.agent_base
        item.apply_memory = item.offset > run.memory_base
        item.apply_stats = item.offset > stats_base
        return item.apply_task or item.apply_agent or item.apply_memory or item.apply_stats

    def _wake(self, run: _AgentRun, item: _Item, now: int) -> None:
        run.agent["status"] = "idle"
        if item.apply_stats:
            self._stats_row(run.partition)["agents_awake"] += 1
        self.writer.emit(
            self.events_topic,
            run.partition,
            run.agent_id.encode(),
            wire.lifecycle_event("agent.status_changed", now, agent_id=run.agent_id, old="offline", new="idle"),
        )

    async def _run_rest(self, run: _AgentRun, items: list[_Item], index: int, first: Awaitable[_Outcome]) -> None:
        limit = self.settings.max_concurrent_tasks
        window: deque[tuple[_Item, asyncio.Future[_Outcome]]] = deque()
        window.append((items[index], asyncio.ensure_future(first)))
        try:
            for item in items[index + 1 :]:
                if len(window) >= limit:
                    done_item, future = window.popleft()
                    self._finish(done_item, run, await future)
                run.in_flight = len(window) + 1
                run.agent["peak_concurrent_tasks"] = max(run.agent["peak_concurrent_tasks"], run.in_flight)
                started = self._start(item, run)
                window.append(
                    (item, _done(started) if isinstance(started, _Outcome) else asyncio.ensure_future(started))
                )
            while window:
                done_item, future = window.popleft()
                self._finish(done_item, run, await future)
        finally:
            for _, future in window:
                future.cancel()
        self._settle(run, items[-1].offset)

    def _start(self, item: _Item, run: _AgentRun) -> _Outcome | Awaitable[_Outcome]:
        event = item.event
        self.in_flight += 1
        if item.apply_task:
            task = state.new_task(event, item.offset)
            task["status"] = "in_progress"
            task["started_at"] = wire.now_ms()
            self.writer.put("tasks", event.task_id, task, run.partition)
            item.task = task
        if run.in_flight == 0:
            run.in_flight = 1
            run.agent["peak_concurrent_tasks"] = max(run.agent["peak_concurrent_tasks"], 1)
        try:
            handler = self.registry.resolve(event.kind, run.agent["type"])
        except UnknownHandler as exc:
            return _Outcome("failed", error=str(exc), attempts=1, finished_ms=wire.now_ms())
        return self._attempt(handler, item, run, 1)

    def _open_memory(self, run: _AgentRun) -> dict[str, Any]:
        """The agent's memory row, writable in this batch (opened on the first write)."""
        if run.memory is None:
            row = self._writable("memory", run.agent_id, run.partition)
            if row is None:
                row = state.new_memory()
                self.writer.put("memory", run.agent_id, row, run.partition)
            run.memory = row
        return run.memory

    def _attempt(self, handler: Any, item: _Item, run: _AgentRun, attempt: int) -> _Outcome | Awaitable[_Outcome]:
        current = run.memory if run.memory is not None else run.stored_memory
        if item.apply_memory:
            opener = partial(self._open_memory, run)
        else:  # a replay whose memory writes are already in: write to a scratch copy
            opener = partial(_scratch_memory, current)
        context = TaskContext(
            run.agent_id,
            run.agent["type"],
            wire.now_ms(),
            current,
            self.settings.working_memory_tokens,
            attempt,
            opener,
        )
        started = time.perf_counter()
        try:
            result = handler(item.event, context)
        except TaskFailed as exc:
            return _Outcome(
                "failed", error=str(exc), attempts=attempt, handler_ms=_ms_since(started), finished_ms=wire.now_ms()
            )
        except Exception as exc:  # noqa: BLE001 - any handler error is retried, then dead-lettered
            return self._retry_or_die(handler, item, run, attempt, exc)
        if type(result) is not dict and inspect.isawaitable(result):
            if attempt == 1 and item.apply_task:
                self._emit_started(item, run)
            return self._await_attempt(handler, item, run, attempt, result, context, started)
        return _Outcome("completed", result, None, attempt, _ms_since(started), context.written, wire.now_ms())

    def _emit_started(self, item: _Item, run: _AgentRun) -> None:
        """``task.started`` for a task that waits in its handler (others only complete)."""
        task = item.task
        assert task is not None
        self.writer.emit(
            self.events_topic,
            run.partition,
            run.agent_id.encode(),
            wire.lifecycle_event("task.started", task["started_at"], task_id=item.event.task_id, agent_id=run.agent_id),
        )

    async def _await_attempt(
        self,
        handler: Any,
        item: _Item,
        run: _AgentRun,
        attempt: int,
        pending: Awaitable[Any],
        context: TaskContext,
        started: float,
    ) -> _Outcome:
        try:
            result = await pending
        except TaskFailed as exc:
            return _Outcome(
                "failed", error=str(exc), attempts=attempt, handler_ms=_ms_since(started), finished_ms=wire.now_ms()
            )
        except Exception as exc:  # noqa: BLE001
            outcome = self._retry_or_die(handler, item, run, attempt, exc)
            return outcome if isinstance(outcome, _Outcome) else await outcome
        return _Outcome("completed", result, None, attempt, _ms_since(started), context.written, wire.now_ms())

    def _retry_or_die(
        self, handler: Any, item: _Item, run: _AgentRun, attempt: int, exc: Exception
    ) -> _Outcome | Awaitable[_Outcome]:
        self.metrics.handler_errors.inc()
        if attempt < self.settings.max_attempts:
            return self._attempt(handler, item, run, attempt + 1)
        return _Outcome("dead", error=f"{type(exc).__name__}: {exc}", attempts=attempt, finished_ms=wire.now_ms())

    def _finish(self, item: _Item, run: _AgentRun, outcome: _Outcome) -> None:
        event = item.event
        self.in_flight -= 1
        now = outcome.finished_ms
        self._handler_ms.append(outcome.handler_ms)
        task = item.task
        if task is not None:
            task["status"] = outcome.status
            task["result"] = outcome.result
            task["error"] = outcome.error
            task["attempts"] = outcome.attempts
            task["completed_at"] = now
            event_type = "task.completed" if outcome.status == "completed" else "task.failed"
            self.writer.emit(
                self.events_topic,
                run.partition,
                run.agent_id.encode(),
                wire.lifecycle_event(
                    event_type,
                    now,
                    task_id=event.task_id,
                    agent_id=run.agent_id,
                    status=outcome.status,
                    error=outcome.error,
                    started_at=task["started_at"],
                ),
            )
            if outcome.status == "dead":
                self.writer.emit(
                    self.dead_letter_topic,
                    run.partition,
                    run.agent_id.encode(),
                    wire.dead_letter(
                        f"handler failed after {outcome.attempts} attempts: {outcome.error}",
                        self.tasks_topic,
                        run.partition,
                        item.offset,
                        run.agent_id.encode(),
                        wire.encode_task(event),
                    ),
                )
                self.metrics.dead_lettered.labels(reason="handler").inc()
        else:
            task = self.writer.get("tasks", event.task_id) or {"status": outcome.status, "created_at": event.created_ms}
        if item.apply_memory and outcome.memory_written:
            for entry in outcome.memory_written:
                self.writer.emit(
                    self.events_topic,
                    run.partition,
                    run.agent_id.encode(),
                    wire.lifecycle_event(
                        "memory.written", now, agent_id=run.agent_id, memory_id=entry["id"], hash=entry["hash"]
                    ),
                )
        if item.apply_agent:
            state.apply_outcome_to_agent(run.agent, task, outcome.handler_ms, now)
        if item.apply_stats:
            memory_ops = len(outcome.memory_written) + (1 if event.kind == "memory_operation" else 0)
            state.apply_outcome_to_stats(self._stats_row(run.partition), task, outcome.handler_ms, memory_ops, now)
        self._finished[outcome.status] += 1

    def _settle(self, run: _AgentRun, last_offset: int) -> None:
        run.agent["status"] = "idle"
        run.agent["o"] = max(run.agent["o"], last_offset)
        if run.memory is not None:
            run.memory["o"] = max(run.memory["o"], last_offset)
        run.in_flight = 0


#: How each table's row is copied on its first change in a batch (only what changes).
_COPY: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "agents": dict,  # flat apart from "config", which the processor never changes
    "memory": state.copy_row,
    "stats": state.copy_row,
    "tasks": state.copy_row,
}


def _chunks(batch: dict[Any, list[Any]], budget: int) -> list[dict[Any, list[Any]]]:
    """Split a fetch into pieces of about ``budget`` bytes, keeping each partition in order."""
    chunks: list[dict[Any, list[Any]]] = []
    current: dict[Any, list[Any]] = {}
    size = 0
    for tp, records in batch.items():
        for record in records:
            if size >= budget and current:
                chunks.append(current)
                current, size = {}, 0
            current.setdefault(tp, []).append(record)
            size += len(record.value or b"")
    if current:
        chunks.append(current)
    return chunks


def _scratch_memory(current: dict[str, Any] | None) -> dict[str, Any]:
    return state.copy_row(current) if current is not None else state.new_memory()


def _done(outcome: _Outcome) -> asyncio.Future[_Outcome]:
    future: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
    future.set_result(outcome)
    return future


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
