"""Running a handler on one task without Kafka, for the tests of a handler's author.

Like Faust's ``test_context`` or Kafka Streams' TopologyTestDriver: the handler gets the
same :class:`~agents.base.TaskContext` a worker gives it, over a memory snapshot of your
choosing, and you get back its result, the memory as it left it, the entries it wrote and
those that left working memory::

    from agents.testing import make_task, run_handler

    run = run_handler(my_handler, make_task("code_analysis", {"code": "print(1)"}))
    assert run.result == {...}

Synchronous and asynchronous handlers alike; an exception the handler raises is raised
here (a worker would retry it, then dead-letter the task).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
from dataclasses import dataclass, field
from typing import Any

from agents import memory as working_memory
from agents.base import Handler, TaskContext
from schemas import domain, wire


@dataclass
class HandlerRun:
    result: Any
    #: The agent's memory after the task (a copy of the snapshot given, changed by the handler).
    memory: dict[str, Any]
    #: Entries the handler wrote, and those that left working memory meanwhile, oldest first.
    written: list[dict[str, Any]] = field(default_factory=list)
    left: list[dict[str, Any]] = field(default_factory=list)


class _Snapshot:
    """The memory a context reads and writes: a private copy of the snapshot."""

    def __init__(self, memory: dict[str, Any] | None, found: list[dict[str, Any]]) -> None:
        self.memory = copy.deepcopy(memory) if memory is not None else working_memory.empty_memory()
        self.found = found
        self.left: list[dict[str, Any]] = []

    def read_memory(self) -> dict[str, Any] | None:
        return self.memory

    def open_memory(self, keep: bool) -> dict[str, Any]:
        return self.memory

    def archive(self, entries: list[dict[str, Any]]) -> None:
        self.left.extend(entries)

    def search(self, query: str, limit: int) -> list[dict[str, Any]]:
        return self.found[:limit]

    def count_accesses(self, offset: int, entry_ids: list[str]) -> None:
        pass


def make_task(
    kind: str,
    payload: dict[str, Any] | None = None,
    *,
    agent_id: str = "agent_test_001",
    agent_type: str = "worker",
    title: str = "",
    task_id: str | None = None,
) -> wire.TaskEvent:
    """A valid task event (checked as the wire format checks one)."""
    return wire.task_from_map(
        {
            "v": wire.SCHEMA_VERSION,
            "type": wire.TASK_CREATED,
            "ts": wire.now_ms(),
            "task_id": task_id or domain.new_id("task"),
            "agent_id": agent_id,
            "agent_type": agent_type,
            "kind": kind,
            "title": title,
            "payload": payload or {},
        }
    )


def run_handler(
    handler: Handler,
    task: wire.TaskEvent,
    memory: dict[str, Any] | None = None,
    *,
    search_results: list[dict[str, Any]] | None = None,
    now_ms: int | None = None,
    budget_tokens: int = 2048,
    attempt: int = 1,
) -> HandlerRun:
    """Run ``handler`` on ``task`` as a worker would, over a copy of ``memory`` (a memory
    row: :func:`agents.memory.empty_memory` and :func:`agents.memory.append` build one).
    ``search_results`` are what ``context.search`` returns (best first)."""
    snapshot = _Snapshot(memory, search_results or [])
    context = TaskContext(
        task.agent_id,
        task.agent_type,
        wire.now_ms() if now_ms is None else now_ms,
        None,
        budget_tokens,
        attempt,
        snapshot,
    )
    result = handler(task, context)
    if inspect.isawaitable(result):
        result = asyncio.run(_awaited(result))
    return HandlerRun(result, snapshot.memory, list(context.written), snapshot.left)


async def _awaited(pending: Any) -> Any:
    return await pending
