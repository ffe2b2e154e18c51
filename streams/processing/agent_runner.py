"""Running one agent's tasks of a batch and folding each outcome into the rows.

An agent's tasks start in offset order, at most ``max_concurrent_tasks`` of them inside
a handler at once. A handler that returns a plain result (a synchronous handler) runs
inline with no asyncio task; one that returns an awaitable gets a window of concurrent
attempts. Each outcome changes the task row, the agent's counters, its memory and its
partition's stats row, unless a crash replay finds that row already has the event
(see :mod:`streams.processing.state`).

Memory entries that leave working memory go to episodic memory (the ``memory_entries``
table) and to the memory-archive topic (and on to the history in PostgreSQL), one record
per agent per batch. Under exactly-once the record is in
the flush's transaction with the memory row's changelog: both or neither. Under
at-least-once they are not atomic:

* the records go only once the rest of the flush is on the broker, and the next flush
  only once they are (:class:`streams.processing.tables.DirectSender`), so an entry is never
  archived from a version of the row that a crash undid;
* the memory row's changelog record of the flush carries them too (``"leaving"``:
  ``[offset, entries]`` groups; the live row does not hold them): a crash after that
  record is written but before the archive record is loses the latter, and the replay,
  which finds the restored row already past its events, sends the groups again.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any

from agents import memory as working_memory
from agents.base import Handler, TaskContext, TaskFailed
from agents.registry import HandlerRegistry, UnknownHandler
from schemas import wire
from schemas.wire import TaskEvent, json_problem
from streams.processing import histogram, state
from streams.processing.metrics import Metrics
from streams.processing.tables import CachedTable, Records, TableWriter, frozen_offset, thaw
from streams.runtime.settings import Settings

#: ``(agent_id, query, limit)`` -> the agent's most similar memory entries, best first.
MemorySearcher = Callable[[str, str, int], list[dict[str, Any]]]

_now_ms = wire.now_ms
_perf = time.perf_counter


class Item:
    """One task event of a batch and which rows still lack its effects.

    Plain classes with their own ``__init__`` (not dataclasses) here and in
    :class:`Outcome`: compiled (see :mod:`streams.runtime.native`), they are built natively,
    while a dataclass's generated ``__init__`` stays interpreted.
    """

    __slots__ = (
        "apply_agent",
        "apply_memory",
        "apply_stats",
        "apply_task",
        "event",
        "offset",
        "outcome",
        "partition",
        "queued_ms",
        "started_ms",
        "task",
    )

    def __init__(self, partition: int, offset: int, event: TaskEvent) -> None:
        self.partition = partition
        self.offset = offset
        self.event = event
        self.apply_task = True
        self.apply_agent = True
        self.apply_memory = True
        self.apply_stats = True
        #: When the first attempt started (ms since the epoch).
        self.started_ms = 0
        #: The task's row while it waits in its handler (``in_progress``); None otherwise.
        self.task: dict[str, Any] | None = None
        #: How its attempt in this batch ended, kept for traced tasks only (see
        #: ``AgentRunner.keep_outcomes``); None until it has.
        self.outcome: Outcome | None = None
        #: When its record was sent (ms since the epoch), kept for traced tasks only.
        self.queued_ms = 0


class Outcome:
    """How one attempt (or the last of them) ended."""

    __slots__ = ("attempts", "error", "finished_ms", "handler_ms", "memory_written", "result", "status")

    def __init__(
        self,
        status: str,
        result: Any = None,
        error: str | None = None,
        attempts: int = 1,
        handler_ms: float = 0.0,
        memory_written: list[dict[str, Any]] | None = None,
        finished_ms: int = 0,
    ) -> None:
        self.status = status
        self.result = result
        self.error = error
        self.attempts = attempts
        self.handler_ms = handler_ms
        self.memory_written: list[dict[str, Any]] = memory_written if memory_written is not None else []
        self.finished_ms = finished_ms


class BatchStats:
    """The stats rows one batch changes (one per partition) and their offsets before it."""

    def __init__(self, table: CachedTable) -> None:
        self._table = table
        self.rows: dict[int, dict[str, Any]] = {}
        #: The row's ``"o"`` before this batch: events at or below it are already counted.
        self.base: dict[int, int] = {}

    def reset(self) -> None:
        self.rows = {}
        self.base = {}

    def row(self, partition: int) -> dict[str, Any]:
        row = self.rows.get(partition)
        if row is not None:
            return row
        key = state.stats_key(partition)
        row = self._table.writable(key, partition, state.copy_row)
        if row is None:
            row = state.new_stats(partition)
            self._table.put(key, row, partition)
        self.base[partition] = row["o"]
        self.rows[partition] = row
        return row


class _AgentRun:
    """One agent's part of a batch: its rows and how far its earlier events got."""

    __slots__ = (
        "accesses",
        "agent",
        "agent_base",
        "agent_id",
        "agent_type",
        "events",
        "in_flight",
        "key",
        "left",
        "memory",
        "memory_base",
        "memory_table",
        "partition",
        "resent",
        "runner",
        "stored",
    )

    def __init__(
        self,
        agent_id: str,
        partition: int,
        agent: dict[str, Any],
        runner: AgentRunner,
        events: Records,
        accesses: list[tuple[int, int, wire.MemoryAccess]] | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.runner = runner
        self.key = agent_id.encode()
        self.partition = partition
        self.agent = agent
        self.agent_type: str = agent["type"]
        self.agent_base: int = agent["o"]
        memory_table = self.memory_table = runner.memory
        #: The batch's ``memory.accessed`` events of this agent not yet counted, in offset order.
        self.accesses = accesses
        #: The agent's memory row as stored (perhaps frozen), and the private copy once a handler writes.
        self.stored: Any = memory_table.rows.get(agent_id)
        stored = self.stored
        self.memory_base = -1 if stored is None else frozen_offset(stored) if type(stored) is bytes else stored["o"]
        self.memory: dict[str, Any] | None = None
        self.events = events
        self.in_flight = 0
        #: Entries that left working memory in this run, oldest first (None: none).
        self.left: list[dict[str, Any]] | None = None
        #: Whether this run sent the stored row's leaving entries again (a replay).
        self.resent = False

    def emit(self, event: bytes) -> None:
        """Queue a lifecycle event of this agent for the events topic (sent with the next flush)."""
        self.events.append(self.key)
        self.events.append(event)

    def consolidated(self, from_tier: str, to_tier: str, **details: Any) -> None:
        """Queue a ``memory.consolidated`` event: entries of this agent moved between tiers."""
        self.emit(
            wire.lifecycle_event(
                "memory.consolidated",
                _now_ms(),
                agent_id=self.agent_id,
                from_tier=from_tier,
                to_tier=to_tier,
                **details,
            )
        )

    def read_memory(self) -> dict[str, Any] | None:
        """The memory as a handler sees it: this batch's copy, else the stored row (decoded once)."""
        if self.memory is not None:
            return self.memory
        if type(self.stored) is bytes:
            self.stored = thaw(self.stored)
        stored: dict[str, Any] | None = self.stored
        return stored

    def open_memory(self, keep: bool) -> dict[str, Any]:
        """The agent's memory row, writable in this batch (opened on the first write); with
        ``keep`` False, for a replay whose memory writes are already in, a copy nobody keeps."""
        if not keep:
            current = self.read_memory()
            return state.copy_row(current) if current is not None else state.new_memory()
        if self.memory is None:
            row = self.memory_table.writable(self.agent_id, self.partition, state.copy_row)
            if row is None:
                row = state.new_memory()
                self.memory_table.put(self.agent_id, row, self.partition)
            if "leaving" in row:  # restored from its changelog: sent again by a replay, if need be
                del row["leaving"]
            self.memory = row
        return self.memory

    def search(self, query: str, limit: int) -> list[dict[str, Any]]:
        """The agent's memory entries most similar to ``query`` (the memory search index)."""
        searcher = self.runner.searcher
        return [] if searcher is None else searcher(self.agent_id, query, limit)

    def count_accesses(self, offset: int, entry_ids: list[str]) -> None:
        """A handler's search (of the task at ``offset``) returned these entries."""
        self.runner.count_access(self, offset, set(entry_ids), _now_ms())

    def archive(self, entries: list[dict[str, Any]]) -> None:
        """Entries that left the memory this run writes (sent when the run settles)."""
        if self.left is None:
            self.left = list(entries)
        else:
            self.left.extend(entries)


class AgentRunner:
    def __init__(
        self,
        settings: Settings,
        writer: TableWriter,
        registry: HandlerRegistry,
        metrics: Metrics,
        stats: BatchStats,
    ) -> None:
        self.settings = settings
        self.writer = writer
        self.registry = registry
        self.metrics = metrics
        self.stats = stats
        self.agents = writer.tables["agents"]
        self.tasks = writer.tables["tasks"]
        self.memory = writer.tables["memory"]
        self.entries = writer.tables["memory_entries"]
        #: Memory entries this batch wrote (by partition) and that left working memory, for
        #: the memory search index (:meth:`take_memory_changes`).
        self.memory_written: list[tuple[int, list[dict[str, Any]]]] = []
        self.memory_left: list[dict[str, Any]] = []
        #: Agents whose episodic entries created before a time became semantic.
        self.memory_promoted: list[tuple[str, int]] = []
        #: Searches an agent's memory for handlers (set with memory search on).
        self.searcher: MemorySearcher | None = None
        #: Whether each item keeps its outcome (for its spans, with tracing on): untraced, an
        #: outcome is dropped as soon as it is applied rather than living as long as the batch.
        self.keep_outcomes = False
        self.tasks_topic = settings.topic("tasks")
        self.events_topic = settings.topic("events")
        self.dead_letter_topic = settings.topic("deadletter")
        self.retry_topic = settings.topic("retries")
        self.archive_topic = settings.topic("memory-archive")
        #: Whether memory changelog records carry what left the rows (at-least-once).
        self._carry_leaving = not settings.exactly_once
        self._max_concurrent = settings.max_concurrent_tasks
        self._memory_budget = settings.working_memory_tokens
        self._episodic_limit = settings.memory_episodic_limit
        self._semantic_after_ms = int(settings.memory_semantic_after * 1000)
        self._handlers: dict[tuple[str, str], Handler | UnknownHandler] = {}
        #: Tasks inside handlers right now on this worker.
        self.in_flight = 0
        #: Tallies of the current batch, handed to the metrics once per batch.
        self.finished: Counter[str] = Counter()

    def run(
        self,
        agent_id: str,
        items: list[Item],
        now: int,
        accesses: list[tuple[int, int, wire.MemoryAccess]] | None = None,
    ) -> Awaitable[None] | None:
        """Run ``items`` (one agent's tasks, in offset order) and count ``accesses`` (the agent's
        ``memory.accessed`` events of the batch) in their place among them; an awaitable if
        any task must wait."""
        partition = items[0].partition
        agent = self.agents.writable(agent_id, partition, dict)
        if agent is None:
            agent = state.new_agent(agent_id, items[0].event.agent_type, now, self._max_concurrent)
            self.agents.put(agent_id, agent, partition)
        run = _AgentRun(agent_id, partition, agent, self, self.writer.outbox(self.events_topic, partition), accesses)
        stats_base = self.stats.base[partition]
        if len(items) > 1:
            items = self._first_copies(items, run, stats_base)
        runnable = [item for item in items if self._prepare(item, run, stats_base)]
        if not runnable:
            if accesses:
                self._count_accesses_before(run, None)
            return None
        if agent["status"] == "offline" and run.agent_base < runnable[0].offset:
            self._wake(run, runnable[0], now)
        agent["status"] = "busy"
        for index, item in enumerate(runnable):
            if run.accesses:
                self._count_accesses_before(run, item.offset)
            started = self._start(item, run)
            if type(started) is not Outcome:
                return self._run_rest(run, runnable, index, started)  # type: ignore[arg-type]
            self._finish(item, run, started)
        self._settle(run, runnable[-1].offset)
        return None

    def _first_copies(self, items: list[Item], run: _AgentRun, stats_base: int) -> list[Item]:
        """``items`` without repeated task ids: a client's retry may land in the same batch as the first copy.

        Rows only tell a repeat from an earlier batch; within one, no row exists yet when
        the copies are prepared. Only for agents with several tasks in the batch.

        A repeat that is a ``task.retry`` is no client's duplicate: after a kill the task's
        first copy comes again, and the relay may have put its due retry right behind it.
        The first copy runs its attempt again and asks for a retry of its own.
        """
        seen: set[str] = set()
        first: list[Item] = []
        for item in items:
            task_id = item.event.task_id
            if task_id in seen:
                if item.event.attempt == 1:
                    self._count_duplicate(item.offset, run, stats_base)
                continue
            seen.add(task_id)
            first.append(item)
        return first

    def _count_duplicate(self, offset: int, run: _AgentRun, stats_base: int) -> None:
        if offset > stats_base:
            self.stats.row(run.partition)["duplicates"] += 1
        self.metrics.duplicates.inc()

    def _prepare(self, item: Item, run: _AgentRun, stats_base: int) -> bool:
        """Decide which rows this event still has to change; False when none."""
        event = item.event
        task = self.tasks.get(event.task_id)
        offset = item.offset
        if task is not None and task["o"] != offset:
            if event.attempt > 1:
                # A task.retry: it runs if the task still waits for exactly that attempt
                # (another copy of it, or one for an attempt already made, changes nothing).
                if task["status"] != "queued" or task["attempts"] != event.attempt - 1:
                    return False
            else:
                # The same task id again (a client retry): the first one counts.
                self._count_duplicate(offset, run, stats_base)
                return False
        item.apply_task = task is None or task["status"] not in state.TERMINAL_TASK_STATUSES
        item.apply_agent = offset > run.agent_base
        item.apply_memory = offset > run.memory_base
        if not item.apply_memory and not run.resent:
            self._resend_leaving(run)
        item.apply_stats = offset > stats_base
        return item.apply_task or item.apply_agent or item.apply_memory or item.apply_stats

    def _resend_leaving(self, run: _AgentRun) -> None:
        """A replay of events the memory row already has: its archive records may be lost."""
        run.resent = True
        stored = run.read_memory()
        for offset, entries in stored.get("leaving", ()) if stored is not None else ():
            self._archive(run, offset, entries)

    def take_memory_changes(
        self,
    ) -> tuple[list[tuple[int, list[dict[str, Any]]]], list[dict[str, Any]], list[tuple[str, int]]]:
        """The memory entries written since the last call (by partition), those that left working
        memory, and the agents whose episodic entries created before a time became semantic."""
        changes = self.memory_written, self.memory_left, self.memory_promoted
        self.memory_written, self.memory_left, self.memory_promoted = [], [], []
        return changes

    def _archive(self, run: _AgentRun, offset: int, entries: list[dict[str, Any]]) -> None:
        """Move ``entries`` to episodic memory, and send them to the memory archive (under
        at-least-once with the row's changelog too)."""
        stored = self.entries.rows
        for entry in entries:
            entry_id: str = entry["id"]
            if entry_id not in stored:  # a replay finds it there, perhaps in a later tier
                self.entries.put_final(entry_id, {**entry, "o": offset, "tier": "episodic"}, run.partition)
        self.memory_left.extend(entries)
        if self._carry_leaving:
            self.memory.carry(run.agent_id, "leaving", [offset, entries])
        self.writer.emit(
            self.archive_topic, run.partition, run.key, wire.memory_archived(run.agent_id, offset, entries)
        )

    def _wake(self, run: _AgentRun, item: Item, now: int) -> None:
        run.agent["status"] = "idle"
        if item.apply_stats:
            self.stats.row(run.partition)["agents_awake"] += 1
        event = wire.lifecycle_event("agent.status_changed", now, agent_id=run.agent_id, old="offline", new="idle")
        run.emit(event)

    async def _run_rest(self, run: _AgentRun, items: list[Item], index: int, first: Awaitable[Outcome]) -> None:
        window: deque[tuple[Item, asyncio.Future[Outcome]]] = deque()
        window.append((items[index], asyncio.ensure_future(first)))
        try:
            for item in items[index + 1 :]:
                if len(window) >= self._max_concurrent:
                    done_item, future = window.popleft()
                    self._finish(done_item, run, await future)
                run.in_flight = len(window) + 1
                run.agent["peak_concurrent_tasks"] = max(run.agent["peak_concurrent_tasks"], run.in_flight)
                if run.accesses:
                    self._count_accesses_before(run, item.offset)
                started = self._start(item, run)
                window.append((item, _done(started) if type(started) is Outcome else asyncio.ensure_future(started)))  # type: ignore[arg-type]
            while window:
                done_item, future = window.popleft()
                self._finish(done_item, run, await future)
        finally:
            for _, future in window:
                future.cancel()
        self._settle(run, items[-1].offset)

    def _handler(self, kind: str, agent_type: str) -> Handler | UnknownHandler:
        """The registry's answer for this kind and agent type (remembered, errors too)."""
        key = (kind, agent_type)
        try:
            return self._handlers[key]
        except KeyError:
            try:
                found: Handler | UnknownHandler = self.registry.resolve(kind, agent_type)
            except UnknownHandler as exc:
                found = exc
            self._handlers[key] = found
            return found

    def _start(self, item: Item, run: _AgentRun) -> Outcome | Awaitable[Outcome]:
        event = item.event
        self.in_flight += 1
        started_ms = item.started_ms = _now_ms()
        if run.in_flight == 0:
            run.in_flight = 1
            if run.agent["peak_concurrent_tasks"] < 1:
                run.agent["peak_concurrent_tasks"] = 1
        handler = self._handler(event.kind, run.agent_type)
        if isinstance(handler, UnknownHandler):
            return Outcome("failed", error=str(handler), finished_ms=_now_ms())
        return self._attempt(handler, item, run, event.attempt, started_ms)

    def _attempt(
        self, handler: Handler, item: Item, run: _AgentRun, attempt: int, now: int
    ) -> Outcome | Awaitable[Outcome]:
        context = TaskContext(
            run.agent_id,
            run.agent_type,
            now,
            run.memory,
            self._memory_budget,
            attempt,
            run,
            item.apply_memory,
            item.offset,
        )
        started = _perf()
        try:
            # Any: a handler may break its contract; a result that cannot be stored fails the task.
            result: Any = handler(item.event, context)
        except TaskFailed as failed:
            return Outcome("failed", None, str(failed), attempt, (_perf() - started) * 1000.0, [], _now_ms())
        except Exception as exc:  # noqa: BLE001 - any handler error is retried, then dead-lettered
            return self._failed_attempt(attempt, exc)
        if type(result) is not dict and inspect.isawaitable(result):
            if item.apply_task and item.task is None:
                self._open_task(item, run)
            return self._await_attempt(attempt, result, context, started)
        return Outcome("completed", result, None, attempt, (_perf() - started) * 1000.0, context.written, _now_ms())

    def _open_task(self, item: Item, run: _AgentRun) -> None:
        """A task that waits in its handler: its ``in_progress`` row and ``task.started`` event.

        A task whose handler answers at once gets only its finished row (see :meth:`_finish`).
        """
        event = item.event
        task_id = event.task_id
        item.task = state.new_task(event, item.offset, "in_progress", item.started_ms)
        self.tasks.put(task_id, item.task, run.partition)
        started = wire.lifecycle_event(
            "task.started",
            item.started_ms,
            wire.task_event_id(task_id, "started", event.attempt),
            task_id=task_id,
            agent_id=run.agent_id,
            **({} if event.trace is None else {"trace_id": event.trace_id}),
        )
        run.emit(started)

    async def _await_attempt(
        self, attempt: int, pending: Awaitable[Any], context: TaskContext, started: float
    ) -> Outcome:
        try:
            result: Any = await pending
        except TaskFailed as failed:
            return Outcome("failed", None, str(failed), attempt, (_perf() - started) * 1000.0, [], _now_ms())
        except Exception as exc:  # noqa: BLE001
            return self._failed_attempt(attempt, exc)
        return Outcome("completed", result, None, attempt, (_perf() - started) * 1000.0, context.written, _now_ms())

    def _failed_attempt(self, attempt: int, exc: Exception) -> Outcome:
        """The next attempt waits its backoff (the task is ``queued`` meanwhile), unless this was the last."""
        self.metrics.handler_errors.inc()
        status = "queued" if attempt < self.settings.max_attempts else "dead"
        return Outcome(status, error=f"{type(exc).__name__}: {exc}", attempts=attempt, finished_ms=_now_ms())

    def _finish(self, item: Item, run: _AgentRun, outcome: Outcome) -> None:
        self.in_flight -= 1
        if self.keep_outcomes:
            item.outcome = outcome
        event = item.event
        now = outcome.finished_ms
        handler_ms = outcome.handler_ms
        histogram.record(self.metrics.handler_ms, handler_ms)
        if outcome.status == "queued":
            self._queue_retry(item, run, outcome)
            return
        if item.apply_task:
            outcome = self._store_task(item, run, outcome)
            status = outcome.status
            run.emit(
                wire.task_finished_event(
                    event.task_id, run.agent_id, status, outcome.error, item.started_ms, now, event.trace_id
                )
            )
            if status == "dead":
                self._dead_letter_task(item, run, outcome)
            created_at = event.created_ms
        else:  # a replay: the task row already has its outcome, which is what counts
            stored = self.tasks.get(event.task_id)
            status = stored["status"] if stored is not None else outcome.status
            created_at = stored["created_at"] if stored is not None else event.created_ms
        written = outcome.memory_written
        if written and item.apply_memory:
            self.memory_written.append((run.partition, written))
            for entry in written:
                memory_event = wire.lifecycle_event(
                    "memory.written", now, agent_id=run.agent_id, memory_id=entry["id"], hash=entry["hash"]
                )
                run.emit(memory_event)
        if item.apply_agent:
            state.apply_outcome_to_agent(run.agent, status, handler_ms, now)
        if item.apply_stats:
            memory_ops = len(written) + (1 if event.kind == "memory_operation" else 0)
            state.apply_outcome_to_stats(self.stats.row(run.partition), status, created_at, handler_ms, memory_ops, now)
        self.finished[status] += 1

    def _queue_retry(self, item: Item, run: _AgentRun, outcome: Outcome) -> None:
        """A failed attempt with attempts left: the task waits, queued, for its next attempt.

        The ``task.retry`` event goes to the retries topic with the flush (in its
        transaction under exactly-once), and :class:`~streams.processing.retry_relay.RetryRelay`
        puts it back on the tasks topic once its backoff is over: the agent's other tasks
        and the partition go on meanwhile. Nothing else counts the task before it finishes.
        """
        if not item.apply_task:
            return  # a replay: the row already waits, and the retry is on its way
        event = item.event
        attempts = outcome.attempts
        now = outcome.finished_ms
        task = item.task
        if task is None:
            task = state.new_task(event, item.offset, "queued", item.started_ms)
        task["o"] = item.offset
        task["status"] = "queued"
        task["error"] = outcome.error
        task["attempts"] = attempts
        self.tasks.put(event.task_id, task, run.partition)
        due = now + int(self.settings.retry_delay(attempts) * 1000)
        self.writer.emit(self.retry_topic, run.partition, run.key, wire.task_retry(event, attempts + 1, due))
        run.emit(
            wire.task_retrying_event(event.task_id, run.agent_id, outcome.error, attempts, due, now, event.trace_id)
        )
        self.metrics.task_retries.inc()

    def _store_task(self, item: Item, run: _AgentRun, outcome: Outcome) -> Outcome:
        """Write the finished task's row; a result that cannot be stored fails the task instead.

        The task view serves the result as JSON, so a result it could not serve (bytes, a
        map keyed by numbers, too deep: see :func:`wire.json_problem`) is refused here, once,
        rather than failing every lookup; so is one msgpack cannot encode. Returns the
        outcome as stored.
        """
        result = outcome.result
        problem = None if result is None else json_problem(result)
        if problem is None:
            try:
                self._put_task(item, run, outcome)
                return outcome
            except (TypeError, ValueError, OverflowError) as exc:  # what msgpack raises, e.g. for a lone surrogate
                error = f"the handler's result cannot be stored: {exc}"
        else:
            error = "the handler's result cannot be stored: result" + problem
        written = outcome.memory_written  # the memory writes did happen
        failed = Outcome("failed", None, error, outcome.attempts, outcome.handler_ms, written, outcome.finished_ms)
        self._put_task(item, run, failed)
        return failed

    def _put_task(self, item: Item, run: _AgentRun, outcome: Outcome) -> None:
        event = item.event
        now = outcome.finished_ms
        task = item.task
        if task is None:
            values = state.finished_task_values(
                event,
                item.offset,
                outcome.status,
                outcome.result,
                outcome.error,
                outcome.attempts,
                item.started_ms,
                now,
            )
            self.tasks.put_finished(event.task_id, values, now, run.partition)
        else:
            task["status"] = outcome.status
            task["result"] = outcome.result
            task["error"] = outcome.error
            task["attempts"] = outcome.attempts
            task["completed_at"] = now
            self.tasks.put_final(event.task_id, task, run.partition)

    def _dead_letter_task(self, item: Item, run: _AgentRun, outcome: Outcome) -> None:
        value = wire.dead_letter(
            f"handler failed after {outcome.attempts} attempts: {outcome.error}",
            self.tasks_topic,
            run.partition,
            item.offset,
            run.key,
            wire.encode_task(item.event),
        )
        self.writer.emit(self.dead_letter_topic, run.partition, run.key, value)
        self.metrics.dead_letter("handler")

    def _settle(self, run: _AgentRun, last_offset: int) -> None:
        if run.accesses:
            self._count_accesses_before(run, None)
        agent = run.agent
        agent["status"] = "idle"
        if last_offset > agent["o"]:
            agent["o"] = last_offset
        memory = run.memory
        if memory is not None:
            if last_offset > memory["o"]:
                memory["o"] = last_offset
            if run.left is not None:
                self._archive(run, last_offset, run.left)
                run.consolidated("working", "episodic", memory_ids=[entry["id"] for entry in run.left])
                self._promote(run, memory, run.left)
        run.in_flight = 0

    def count_accesses(self, agent_id: str, accesses: list[tuple[int, int, wire.MemoryAccess]]) -> None:
        """Count the ``memory.accessed`` events of an agent with no task in the batch."""
        partition = accesses[0][0]
        agent = self.agents.get(agent_id) or {"type": "", "o": -1}  # the row itself is not changed
        run = _AgentRun(agent_id, partition, agent, self, self.writer.outbox(self.events_topic, partition), accesses)
        self._count_accesses_before(run, None)

    def _count_accesses_before(self, run: _AgentRun, offset: int | None) -> None:
        """Count the run's access events from before ``offset`` (None: all of them)."""
        pending = run.accesses
        while pending and (offset is None or pending[0][1] < offset):
            _, at, access = pending.pop(0)
            self.count_access(run, at, set(access.ids), access.ts)

    def count_access(self, run: _AgentRun, offset: int, ids: set[str], at_ms: int) -> None:
        """Count one access of each of the agent's entries in ``ids`` (by the event at
        ``offset``) wherever the entry is now: in working memory, leaving it in this run, or
        in the ``memory_entries`` table. Each row counts an event once (its ``"o"``), so a
        replay counts nothing twice."""
        if offset > run.memory_base:
            memory = run.read_memory()
            if memory is not None and any(entry["id"] in ids for entry in working_memory.entries(memory)):
                memory = run.open_memory(True)
                ids = ids - working_memory.count_accesses(memory, ids, at_ms)
                if offset > memory["o"]:
                    memory["o"] = offset
            left = run.left
            if ids and left is not None and any(entry["id"] in ids for entry in left):
                run.left = [working_memory.accessed(entry, at_ms) if entry["id"] in ids else entry for entry in left]
                ids = ids - {entry["id"] for entry in left}
        rows = self.entries.rows
        for entry_id in ids:
            stored = thaw(rows.get(entry_id))
            if stored is not None and stored["agent_id"] == run.agent_id and stored["o"] < offset:
                self.entries.put_final(entry_id, {**working_memory.accessed(stored, at_ms), "o": offset}, run.partition)

    def _promote(self, run: _AgentRun, memory: dict[str, Any], left: list[dict[str, Any]]) -> None:
        """Count the entries that left into the episodic tier; move its old ones to the semantic tier
        once it holds too many (timed by the newest entry, so a replay decides the same)."""
        newest = memory["turns"][-1]["created_at"] if memory["turns"] else left[-1]["created_at"]
        promoted = working_memory.file_episodic(memory, left, newest, self._episodic_limit, self._semantic_after_ms)
        if promoted is not None:
            before, count = promoted
            self.memory_promoted.append((run.agent_id, before))
            run.consolidated("episodic", "semantic", created_before=before, count=count)


def _done(outcome: Outcome) -> asyncio.Future[Outcome]:
    future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    future.set_result(outcome)
    return future
