"""The handler interface: what an agent does with one task."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol

from agents import memory as working_memory
from schemas.wire import TaskEvent

Result = dict[str, Any]


class TaskFailed(Exception):
    """Raised by a handler for a task that must fail now, without retries."""


class MemorySource(Protocol):
    """Where a context gets the agent's working memory, asked only when a handler uses it."""

    def read_memory(self) -> dict[str, Any] | None:
        """The memory as stored (None: the agent has none yet)."""
        ...

    def open_memory(self, keep: bool) -> dict[str, Any]:
        """The memory to write to; with ``keep`` False a copy nobody keeps (a replay whose
        writes are already in)."""
        ...

    def archive(self, entries: list[dict[str, Any]]) -> None:
        """Take entries that left the memory opened with ``keep`` (dropped turns, a system
        message replaced), oldest first, to keep them beyond working memory."""
        ...

    def search(self, query: str, limit: int) -> list[dict[str, Any]]:
        """The agent's ``limit`` memory entries most similar to ``query``, best first (each
        with its ``score``); none when memory search is off."""
        ...

    def count_accesses(self, offset: int, entry_ids: list[str]) -> None:
        """Count an access of each entry (a search by the task at ``offset`` returned it)."""
        ...


class TaskContext:
    """What a handler may use besides the task: the agent's working memory and the clock.

    Memory is read only when a handler recalls it and opened for writing only when a
    handler writes to it, so handlers that never touch memory cost the memory table
    nothing.
    """

    __slots__ = (
        "_budget",
        "_keep",
        "_memory",
        "_source",
        "_unopened",
        "_unread",
        "agent_id",
        "agent_type",
        "attempt",
        "now_ms",
        "offset",
        "written",
    )

    def __init__(
        self,
        agent_id: str,
        agent_type: str,
        now_ms: int,
        memory: dict[str, Any] | None,
        budget_tokens: int,
        attempt: int = 1,
        source: MemorySource | None = None,
        keep_writes: bool = True,
        offset: int = -1,
    ) -> None:
        self.agent_id = agent_id
        self.agent_type = agent_type
        self.now_ms = now_ms
        self.attempt = attempt
        #: The task's offset in its partition (-1 outside a stream).
        self.offset = offset
        self._memory = memory
        self._source = source
        self._keep = keep_writes
        self._unread = source is not None
        self._unopened = source is not None
        self._budget = budget_tokens
        self.written: list[dict[str, Any]] = []

    def recall(self, limit: int = 10) -> list[dict[str, Any]]:
        """The most recent ``limit`` working-memory entries, oldest first."""
        if self._unread:
            self._unread = False
            if self._memory is None and self._source is not None:
                self._memory = self._source.read_memory()
        if self._memory is None or limit <= 0:
            return []
        return working_memory.entries(self._memory)[-limit:]

    def search(self, query: str, limit: int = 5) -> list[dict[str, Any]]:
        """The agent's memory entries (any tier) most similar to ``query``, best first; each
        counts as accessed (``access_count``, ``last_accessed``)."""
        if self._source is None or limit <= 0:
            return []
        found = self._source.search(query, limit)
        if found and self._keep and self.offset >= 0:
            self._source.count_accesses(self.offset, [entry["id"] for entry in found])
        return found

    def remember(
        self,
        content: str,
        *,
        role: str = "assistant",
        memory_type: str = "conversation",
        key: str | None = None,
        importance: float = working_memory.DEFAULT_IMPORTANCE,
    ) -> dict[str, Any]:
        """Write one entry into the agent's working memory (``importance`` from 0 to 1)."""
        if not 0.0 <= importance <= 1.0:
            raise TaskFailed(f"importance must be from 0 to 1, got {importance!r}")
        if self._unopened and self._source is not None:
            self._memory = self._source.open_memory(self._keep)
        elif self._memory is None:
            self._memory = working_memory.empty_memory()
        self._unopened = False
        left: list[dict[str, Any]] = []
        entry = working_memory.append(
            self._memory,
            self.agent_id,
            content,
            role=role,
            memory_type=memory_type,
            timestamp_ms=self.now_ms,
            budget_tokens=self._budget,
            key=key,
            left=left,
            importance=importance,
        )
        if left and self._keep and self._source is not None:
            self._source.archive(left)
        self.written.append(entry)
        return entry


class Handler(Protocol):
    """Does one task. May be a plain function (fast path) or return an awaitable."""

    def __call__(self, task: TaskEvent, context: TaskContext) -> Result | Awaitable[Result]: ...
