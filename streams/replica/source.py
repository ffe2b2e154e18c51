"""What a reader's web views read through: its copy of the tables (:class:`ChangelogFollower`).

A reader holds every partition, so it forwards no lookup to a worker; only memory search and
its index (``POST /v1/memory/search``, ``GET /v1/memory/stats``, the episodic and semantic
tiers of an agent's memory) live in the workers, and go to the reader's ``upstream`` worker
as the client sent them. ``POST /v1/tasks`` and ``/v1/batch`` are served here: the ingress is
only a producer, and the token a write returns is then waited for by this same reader.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg
from yarl import URL

from streams.processing.metrics import Metrics
from streams.replica.follower import ChangelogFollower
from streams.runtime.settings import Settings
from streams.serve.consistency import Token
from streams.serve.ingress import IngressProducer
from streams.serve.peers import PeerClient
from streams.serve.stats_view import summarize
from streams.serve.view_source import HistoryPool, TableRows
from streams.serve.web_auth import ApiGuard

#: Seconds a folded stats document is served before it is folded again (as a worker's stats view).
_STATS_REFRESH = 0.1


class ReplicaSource:
    def __init__(self, settings: Settings, follower: ChangelogFollower, upstream: URL) -> None:
        self.settings = settings
        self.follower = follower
        self.upstream: URL | None = upstream
        self.metrics = Metrics()
        tables = follower.tables
        self.rows = TableRows(
            agents=tables["agents"],
            tasks=tables["tasks"],
            memory=tables["memory"],
            memory_entries=tables["memory_entries"],
        )
        self.guard: ApiGuard | None = None
        self.ingress: IngressProducer | None = None
        self.peers = PeerClient()
        self.indexer: Any = None
        self.accesses: Any = None
        self._history = HistoryPool(settings)
        self._stats: dict[str, Any] = summarize({}, 0)
        self._stats_at = 0.0

    def tables_ready(self) -> bool:
        return self.follower.ready.is_set()

    def memory_search_ready(self) -> bool:
        return False

    def owner_url(self, partition: int) -> URL | None:
        return None

    def peer_urls(self) -> list[URL]:
        return []

    async def history_pool(self) -> asyncpg.Pool:
        return await self._history.get()

    def stats_snapshot(self, refresh: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        if refresh or now - self._stats_at >= _STATS_REFRESH:
            rows = {int(row["partition"]): row for row in self.follower.tables["stats"].values()}
            self._stats = summarize(rows, 0)
            self._stats_at = now
        return self._stats

    async def wait_applied(self, token: Token, view: str, timeout: float) -> bool:
        return await self.follower.wait_applied(token, timeout)

    def staleness_ms(self) -> int:
        return self.follower.staleness_ms()

    def staleness(self) -> dict[str, Any]:
        return {
            "process": "reader",
            "url": self.settings.web_url,
            "staleness_ms": self.follower.staleness_ms(),
            "lag_records": self.follower.lag_records,
        }

    def update_lag_metrics(self) -> None:
        self.metrics.replica_lag_records.set(self.follower.lag_records)
        self.metrics.replica_lag_seconds.set(self.follower.staleness_ms() / 1000)

    async def close(self) -> None:
        self.peers.close()
        await self._history.close()
