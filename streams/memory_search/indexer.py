"""Keeps one worker's memory search index in step with its memory tables.

* After each processing batch the entries it wrote are embedded in one call, on the
  embedding thread while the next batches run, then added (tier ``working``); those that
  left working memory move to ``episodic``, in batch order. Each flush first waits for
  the batches of the flush before it to be in the index: an entry is searchable by the
  flush after its own (usually well before), so embedding overlaps a whole flush interval
  of processing, and a worker whose embedding falls behind slows down to it.
* A partition the worker gets (at start, or from a rebalance) is indexed from its restored
  rows: every working-memory entry of its agents and every row of ``memory_entries``.
  Until each owned partition is, searches answer 503.
* A partition handed away is dropped from the index.

Embedding is waited for on one thread of its own (the model itself runs in a process of
its own, :class:`ProcessEmbedder`), so the event loop keeps serving (web views,
heartbeats) while a batch's or a partition's entries are embedded.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from agents.memory import entries as working_entries
from streams.memory_search.embedding import CachedEmbedder, Embedder
from streams.memory_search.index import Hit, VectorIndex
from streams.tables import CachedTable, thaw

#: Entries embedded per call while a partition is indexed from its rows.
REBUILD_CHUNK = 4096

Written = list[tuple[int, list[dict[str, Any]]]]


class MemoryIndexer:
    def __init__(
        self, embedder: CachedEmbedder, memory: CachedTable, entries: CachedTable, queries: Embedder | None = None
    ) -> None:
        self.embedder = embedder
        #: Embeds search queries in this process, at once: a query must not wait behind
        #: the batches queued for the embedding process.
        self.queries = queries
        self.index = VectorIndex(embedder.dimensions)
        self._memory = memory
        self._entries = entries
        #: Partitions whose rows are in the index.
        self.built: set[int] = set()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedding")
        #: Batches' changes not in the index yet, oldest first: (embedding, entries) of the
        #: entries a batch wrote, or (None, ids) of those that left working memory.
        self._queue: deque[tuple[asyncio.Future[np.ndarray] | None, list[Any]]] = deque()
        #: Changes ever queued and applied, and how many were queued at the last flush.
        self._queued = 0
        self._applied = 0
        self._mark = 0

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.embedder.model, "close", None)
        if close is not None:
            close()

    async def embed(self, texts: list[str]) -> np.ndarray:
        """The texts' vectors, computed on the embedding thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self.embedder.embed, texts)

    async def embed_query(self, text: str) -> np.ndarray:
        """A search query's vector."""
        if self.queries is not None:
            vector: np.ndarray = self.queries.embed([text])[0]
            return vector
        return (await self.embed([text]))[0]

    def batch_done(self, written: Written, left: list[dict[str, Any]]) -> None:
        """Queue a batch's memory changes: its entries are embedded meanwhile (see :meth:`settle`)."""
        self._apply_done()
        entries = [(partition, entry) for partition, batch in written for entry in batch]
        if entries:
            loop = asyncio.get_running_loop()
            texts = [entry["content"] for _, entry in entries]
            self._queue.append((loop.run_in_executor(self._thread, self.embedder.embed, texts), entries))
            self._queued += 1
        if left:
            self._queue.append((None, [entry["id"] for entry in left]))
            self._queued += 1

    async def settle(self) -> None:
        """Wait until every queued batch is in the index."""
        await self._settle_until(self._queued)

    async def flushing(self) -> None:
        """A flush begins: wait until the batches queued before the previous flush are in the index."""
        await self._settle_until(self._mark)
        self._mark = self._queued

    async def _settle_until(self, count: int) -> None:
        """Wait until the first ``count`` changes ever queued are in the index."""
        while self._applied < count:
            future, _ = self._queue[0]
            if future is not None:
                await asyncio.shield(future)
            self._apply_done()

    def apply_done(self) -> None:
        """Apply what is embedded already (called on a timer, so an idle worker catches up too)."""
        self._apply_done()

    def _apply_done(self) -> None:
        """Apply the queued changes whose embeddings are done, in batch order."""
        queue = self._queue
        while queue:
            future, items = queue[0]
            if future is None:
                self.index.set_tier(items, "episodic")
            elif future.done():
                self._add_working(items, future.result())
            else:
                return
            queue.popleft()
            self._applied += 1

    def _add_working(self, entries: list[tuple[int, dict[str, Any]]], vectors: np.ndarray) -> None:
        """Add a batch's new entries, those of partitions still indexed (the rest come with a rebuild)."""
        built = self.built
        keep = [row for row, (partition, _) in enumerate(entries) if partition in built]
        if not keep:
            return
        chosen = [entries[row] for row in keep]
        self.index.add(
            [entry["id"] for _, entry in chosen],
            [entry["agent_id"] for _, entry in chosen],
            [entry["memory_type"] for _, entry in chosen],
            ["working"] * len(chosen),
            [partition for partition, _ in chosen],
            vectors[keep] if len(keep) < len(entries) else vectors,
        )

    def stats(self) -> dict[str, Any]:
        """What this worker's index holds (``GET /v1/memory/stats``)."""
        return {
            "entries": self.index.tier_counts(),
            "index_bytes": self.index.nbytes,
            "partitions": sorted(self.built),
            "model": self.embedder.name,
            "embedded": self.embedder.embedded,
            "embedding_cache_hits": self.embedder.hits,
        }

    def drop(self, partitions: set[int]) -> None:
        """Partitions handed away: their entries leave the index."""
        gone = partitions & self.built
        if gone:
            self.index.drop_partitions(gone)
            self.built -= gone

    def missing(self, owned: set[int]) -> set[int]:
        return owned - self.built

    async def build(self, partitions: set[int]) -> int:
        """Index every entry of ``partitions`` from the tables; returns how many.

        The caller keeps batches out meanwhile (the rows must not change under it).
        """
        partitions = partitions - self.built
        if not partitions:
            return 0
        await self.settle()  # queued batches of these partitions are in the rows read below
        self.index.drop_partitions(partitions)  # anything left from an earlier ownership
        count = 0
        rows = list(self._rows_of(partitions))
        for start in range(0, len(rows), REBUILD_CHUNK):
            chunk = rows[start : start + REBUILD_CHUNK]
            vectors = await self.embed([entry["content"] for _, _, entry in chunk])
            self.index.add(
                [entry["id"] for _, _, entry in chunk],
                [entry["agent_id"] for _, _, entry in chunk],
                [entry["memory_type"] for _, _, entry in chunk],
                [tier for _, tier, _ in chunk],
                [partition for partition, _, _ in chunk],
                vectors,
            )
            count += len(chunk)
        self.built |= partitions
        return count

    def _rows_of(self, partitions: set[int]) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """(partition, tier, entry) of every memory entry of ``partitions``."""
        memory_rows = self._memory.rows
        for agent_id, partition in list(self._memory._key_partition.items()):  # noqa: SLF001
            if partition in partitions:
                row = thaw(memory_rows.get(agent_id))
                if row is not None:
                    for entry in working_entries(row):
                        yield partition, "working", entry
        entry_rows = self._entries.rows
        for entry_id, partition in list(self._entries._key_partition.items()):  # noqa: SLF001
            if partition in partitions:
                row = thaw(entry_rows.get(entry_id))
                if row is not None:
                    yield partition, row["tier"], row

    def search_agent(self, agent_id: str, query: str, limit: int) -> list[dict[str, Any]]:
        """The agent's entries most similar to ``query``, best first, each with its ``score``
        (for handlers: the agent's partition is this worker's)."""
        if self.queries is None:
            return []
        vector = self.queries.embed([query])[0]
        found = []
        for hit in self.index.search(vector, limit, self.embedder.default_threshold, agent_id=agent_id):
            entry = self.entry(hit)
            if entry is not None:
                found.append({**entry, "score": hit.score})
        return found

    def entry(self, hit: Hit) -> dict[str, Any] | None:
        """The stored entry a hit stands for (None if it is gone meanwhile)."""
        stored = thaw(self._entries.rows.get(hit.entry_id))
        if stored is not None:
            return dict(stored)
        row = thaw(self._memory.rows.get(hit.agent_id))
        if row is not None:
            for entry in working_entries(row):
                if entry["id"] == hit.entry_id:
                    return {**entry, "tier": "working"}
        return None
