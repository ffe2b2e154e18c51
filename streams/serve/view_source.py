"""What the web views read through: a processing worker and a read replica both provide it.

The views (:mod:`streams.serve.web`) answer from the rows of four tables, the stats
snapshot and a few services (the ingress, the API guard, the history database). A worker
(:class:`streams.app.Pipeline`) provides them from the stores its processing writes; a
reader (:class:`streams.replica.source.ReplicaSource`) from its copy of the changelogs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
from yarl import URL

from streams.processing.metrics import Metrics
from streams.runtime.settings import Settings
from streams.serve.consistency import Token
from streams.serve.ingress import IngressProducer
from streams.serve.peers import PeerClient
from streams.serve.web_auth import ApiGuard


@dataclass(frozen=True)
class TableRows:
    """The rows the views read, by key (values as the stores keep them: maps or frozen rows)."""

    agents: dict[str, Any]
    tasks: dict[str, Any]
    memory: dict[str, Any]
    memory_entries: dict[str, Any]


class ViewSource(Protocol):
    settings: Settings
    metrics: Metrics
    rows: TableRows
    #: None until the process has started (the views answer 503 meanwhile).
    guard: ApiGuard | None
    ingress: IngressProducer | None
    peers: PeerClient
    #: The memory search index (None on a reader, and with memory search off).
    indexer: Any
    accesses: Any
    #: Where requests this process cannot answer itself go (a reader's worker); None on a worker.
    upstream: URL | None

    def tables_ready(self) -> bool:
        """Whether the rows may be served (recovered on a worker, caught up on a reader)."""

    def memory_search_ready(self) -> bool: ...

    def owner_url(self, partition: int) -> URL | None:
        """The web URL of the worker owning ``partition``; None when this process answers for it."""

    def peer_urls(self) -> list[URL]:
        """The other workers a lookup that misses here asks (none on a reader: it holds every partition)."""

    async def history_pool(self) -> asyncpg.Pool: ...

    def stats_snapshot(self, refresh: bool = False) -> dict[str, Any]:
        """The ``GET /v1/stats`` document (folded again first with ``refresh``)."""

    async def wait_applied(self, token: Token, view: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until this process has applied the token's offsets
        to what ``view`` reads; False if it has not by then."""

    def staleness(self) -> dict[str, Any]:
        """How far behind the stream this process answers: ``{"process", "staleness_ms", "lag_records"}``."""

    def staleness_ms(self) -> int: ...


class HistoryPool:
    """The connections the history views read PostgreSQL through, opened at the first request
    (a process starts and serves its live views whether or not PostgreSQL is up)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> asyncpg.Pool:
        async with self._lock:
            if self._pool is None:
                settings = self._settings
                self._pool = await asyncpg.create_pool(
                    settings.postgres_url,
                    min_size=0,
                    max_size=settings.postgres_pool_max_size,
                    command_timeout=settings.postgres_command_timeout,
                    timeout=settings.postgres_command_timeout,
                )
            return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()


class Progress:
    """Wakes whoever waits for a condition each time what it depends on changes."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def notify(self) -> None:
        # set() resolves every current waiter; clearing at once readies the event for the next change.
        self._changed.set()
        self._changed.clear()

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``condition()`` holds (checked at each change); False if it does not within ``timeout`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return condition()
        return True
