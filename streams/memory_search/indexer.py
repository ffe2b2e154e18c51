"""Keeps one worker's memory search index in step with its memory tables.

* After each processing batch the entries it wrote are embedded in one call, on the
  embedding thread while the next batches run, then added (tier ``working``); those that
  left working memory move to ``episodic``, in batch order. Each flush first waits for
  the batches of the flush before it to be in the index: an entry is searchable by the
  flush after its own (usually well before), so embedding overlaps a whole flush interval
  of processing, and a worker whose embedding falls behind slows down to it.
* A partition the worker gets (at start, or from a rebalance) is indexed from its restored
  rows: every working-memory entry of its agents and every row of ``memory_entries``,
  read at one moment between batches and embedded in chunks while processing goes on;
  the batches' changes after that moment follow in order. Until each owned partition is
  indexed, searches answer 503, and flushes do not wait for the index.
* A partition handed away is dropped from the index.

Embedding is waited for on one thread of its own (the model itself runs in a process of
its own, :class:`ProcessEmbedder`), so the event loop keeps serving (web views,
heartbeats) while a batch's or a partition's entries are embedded.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from agents.memory import chain_order, tier_of
from agents.memory import entries as working_entries
from streams.memory_search.embedding import CachedEmbedder, Embedder
from streams.memory_search.index import Hit, VectorIndex
from streams.memory_search.vector_log import StoredVectors, VectorLog
from streams.processing.tables import CachedTable, thaw

#: Entries embedded per call while a partition is indexed from its rows.
REBUILD_CHUNK = 4096

Written = list[tuple[int, list[dict[str, Any]]]]


class MemoryIndexer:
    def __init__(
        self,
        embedder: CachedEmbedder,
        memory: CachedTable,
        entries: CachedTable,
        queries: Embedder | None = None,
        vector_log: VectorLog | None = None,
    ) -> None:
        self.embedder = embedder
        #: Where computed vectors are kept, and read back from when a partition is indexed.
        self.vector_log = vector_log
        #: Entries a rebuild took from the vector log rather than embedding them again.
        self.reused = 0
        #: Embeds search queries in this process, at once: a query must not wait behind
        #: the batches queued for the embedding process.
        self.queries = queries
        self.index = VectorIndex(embedder.dimensions)
        self._memory = memory
        self._entries = entries
        #: Partitions whose rows are in the index, and those being indexed.
        self.built: set[int] = set()
        self.building: set[int] = set()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedding")
        #: Changes not in the index yet, oldest first, as (kind, embedding or None, what):
        #: ``batch``: the entries a batch wrote, [(partition, entry)];
        #: ``left``: the ids of entries that left working memory;
        #: ``rebuild``: a chunk of partitions being indexed, (partitions, first, last), whose
        #: embedding gives the chunk's [(partition, tier, entry)] and their vectors.
        self._queue: deque[tuple[str, asyncio.Future[Any] | None, Any]] = deque()
        #: Changes ever queued and applied, and how many were queued at the last flush.
        self._queued = 0
        self._applied = 0
        self._mark = 0

    def close(self) -> None:
        for _, future, _ in self._queue:
            if future is not None:
                future.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.embedder.model, "close", None)
        if close is not None:
            close()

    async def embed(self, texts: list[str]) -> np.ndarray:
        """The texts' vectors, computed on the embedding thread."""
        vectors: np.ndarray = await self._on_thread(self.embedder.embed, texts)
        return vectors

    async def embed_query(self, text: str) -> np.ndarray:
        """A search query's vector."""
        if self.queries is not None:
            vector: np.ndarray = self.queries.embed([text])[0]
            return vector
        return (await self.embed([text]))[0]

    def batch_done(
        self, written: Written, left: list[dict[str, Any]], promoted: list[tuple[str, int]] | None = None
    ) -> None:
        """Queue a batch's memory changes: its entries are embedded meanwhile (see :meth:`flushing`).

        ``promoted``: agents whose episodic entries created before a time became semantic.
        """
        self.apply_done()
        # Entries of a partition neither indexed nor being indexed are not embedded: its
        # rebuild, when it starts, reads them from the tables.
        wanted = self.built | self.building
        entries = [(partition, entry) for partition, batch in written if partition in wanted for entry in batch]
        if entries:
            texts = [entry["content"] for _, entry in entries]
            self._enqueue("batch", self._on_thread(self.embedder.embed, texts), entries)
        if left:
            self._enqueue("left", None, left)
        if promoted:
            self._enqueue("promoted", None, promoted)

    def _enqueue(self, kind: str, future: asyncio.Future[Any] | None, what: Any) -> None:
        self._queue.append((kind, future, what))
        self._queued += 1

    def _on_thread(self, function: Any, *args: Any) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    async def settle(self) -> None:
        """Wait until every queued change is in the index."""
        await self._settle_until(self._queued, wait_for_rebuilds=True)

    async def flushing(self) -> None:
        """A flush begins: wait until the changes queued before the previous flush are in the
        index (unless a partition being indexed holds them up: then not at all)."""
        await self._settle_until(self._mark, wait_for_rebuilds=False)
        self._mark = self._queued

    async def _settle_until(self, count: int, wait_for_rebuilds: bool) -> None:
        """Wait until the first ``count`` changes ever queued are in the index."""
        while self._applied < count:
            kind, future, _ = self._queue[0]
            if future is not None and not future.done():
                if kind == "rebuild" and not wait_for_rebuilds:
                    return
                await asyncio.shield(future)
            self.apply_done()

    def apply_done(self) -> None:
        """Apply the queued changes whose embeddings are done, in order (also called on a timer,
        so an idle worker catches up too)."""
        queue = self._queue
        while queue:
            kind, future, what = queue[0]
            if future is not None and not future.done():
                return
            if kind == "batch":
                assert future is not None
                vectors = future.result()
                self._keep(what, vectors)
                self._add_batch(what, vectors)
            elif kind == "left":
                self._leave_working(what)
            elif kind == "promoted":
                self._promote(what)
            else:
                self._add_rebuilt(future, *what)
            queue.popleft()
            self._applied += 1

    def _leave_working(self, left: list[dict[str, Any]]) -> None:
        """Entries that left working memory: episodic, or semantic if their agent's are by then."""
        befores: dict[str, int] = {}
        tiers: dict[str, list[str]] = {"episodic": [], "semantic": []}
        for entry in left:
            old = entry["created_at"] < self._semantic_before(entry["agent_id"], befores)
            tiers["semantic" if old else "episodic"].append(entry["id"])
        for tier, ids in tiers.items():
            if ids:
                self.index.set_tier(ids, tier)

    def _semantic_before(self, agent_id: str, befores: dict[str, int]) -> int:
        """Episodic entries of the agent created before this are semantic (kept in ``befores``)."""
        before = befores.get(agent_id)
        if before is None:
            memory = thaw(self._memory.rows.get(agent_id))
            before = befores[agent_id] = 0 if memory is None else memory.get("semantic_before", 0)
        return before

    def _promote(self, promoted: list[tuple[str, int]]) -> None:
        """Move agents' episodic entries created before a time to the semantic tier."""
        rows = self._entries.rows
        for agent_id, before in promoted:
            old = []
            for entry_id in self.index.agent_entries(agent_id, "episodic"):
                entry = thaw(rows.get(entry_id))
                if entry is not None and entry["created_at"] < before:
                    old.append(entry_id)
            self.index.set_tier(old, "semantic")

    def _keep(self, entries: list[tuple[int, dict[str, Any]]], vectors: np.ndarray) -> None:
        """Send computed vectors to the vector log, one record per partition."""
        if self.vector_log is None or not entries:
            return
        rows: dict[int, list[int]] = {}
        for row, (partition, _) in enumerate(entries):
            rows.setdefault(partition, []).append(row)
        for partition, chosen in rows.items():
            self.vector_log.send(partition, [entries[row][1]["id"] for row in chosen], vectors[chosen])

    def _add_batch(self, entries: list[tuple[int, dict[str, Any]]], vectors: np.ndarray) -> None:
        """Add a batch's new entries, those of indexed partitions (a rebuild brings the rest:
        a partition handed away and back meanwhile is rebuilt from rows that hold them)."""
        built = self.built
        keep = [row for row, (partition, _) in enumerate(entries) if partition in built]
        if keep:
            chosen = [entries[row] for row in keep]
            self._add([(partition, "working", entry) for partition, entry in chosen], vectors[keep])

    def _add_rebuilt(
        self, future: asyncio.Future[Any] | None, partitions: frozenset[int], first: bool, last: bool
    ) -> None:
        """Add a chunk of a rebuild (of the partitions still wanted); the last one completes it."""
        wanted = partitions & self.building
        if first and wanted:
            self.index.drop_partitions(set(wanted))  # anything left from an earlier ownership
        if future is not None and wanted:
            entries, vectors, fresh = future.result()
            self._keep([(entries[row][0], entries[row][2]) for row in fresh], vectors[fresh])
            keep = [row for row, (partition, _, _) in enumerate(entries) if partition in wanted]
            if keep:
                self._add([entries[row] for row in keep], vectors[keep])
        if last:
            self.built |= wanted
            self.building -= partitions

    def _add(self, entries: list[tuple[int, str, dict[str, Any]]], vectors: np.ndarray) -> None:
        self.index.add(
            [entry["id"] for _, _, entry in entries],
            [entry["agent_id"] for _, _, entry in entries],
            [entry["memory_type"] for _, _, entry in entries],
            [tier for _, tier, _ in entries],
            [partition for partition, _, _ in entries],
            vectors,
        )

    def stats(self) -> dict[str, Any]:
        """What this worker's index holds (``GET /v1/memory/stats``)."""
        return {
            "entries": self.index.tier_counts(),
            "index_bytes": self.index.nbytes,
            "partitions": sorted(self.built),
            "indexing": sorted(self.building),
            "model": self.embedder.name,
            "embedded": self.embedder.embedded,
            "embedding_cache_hits": self.embedder.hits,
            "vectors_reused": self.reused,
            "vectors_stored": 0 if self.vector_log is None else self.vector_log.sent,
        }

    def drop(self, partitions: set[int]) -> None:
        """Partitions handed away (or restored anew): their entries leave the index."""
        gone = partitions & (self.built | self.building)
        if gone:
            self.index.drop_partitions(gone)
            self.built -= gone
            self.building -= gone

    def missing(self, owned: set[int]) -> set[int]:
        """Owned partitions neither indexed nor being indexed."""
        return owned - self.built - self.building

    def ready(self, owned: set[int]) -> bool:
        """Whether every owned partition is in the index."""
        return owned <= self.built

    def start_build(self, partitions: set[int]) -> int:
        """Start indexing ``partitions`` from the tables as they are now; returns the entries read.

        Call it between batches: working memory is read at once; ``memory_entries`` rows
        (which do not change) are read on the embedding thread, chunk by chunk.
        """
        partitions = partitions - self.built - self.building
        if not partitions:
            return 0
        self.building |= partitions
        sources: list[tuple[int, str, dict[str, Any]] | tuple[int, str]] = []
        memory_rows = self._memory.rows
        for agent_id, partition in list(self._memory._key_partition.items()):  # noqa: SLF001
            if partition in partitions:
                row = thaw(memory_rows.get(agent_id))
                if row is not None:
                    sources.extend((partition, "working", entry) for entry in working_entries(row))
        for entry_id, partition in list(self._entries._key_partition.items()):  # noqa: SLF001
            if partition in partitions:
                sources.append((partition, entry_id))
        frozen = frozenset(partitions)
        chunks = [sources[start : start + REBUILD_CHUNK] for start in range(0, len(sources), REBUILD_CHUNK)]
        if not chunks:
            self._enqueue("rebuild", None, (frozen, True, True))
        stored = (
            asyncio.ensure_future(self.vector_log.read(partitions)) if chunks and self.vector_log is not None else None
        )
        # Each agent's memory row is read once for the whole rebuild (its entries are spread
        # over every chunk), not once per chunk.
        befores: dict[str, int] = {}
        for number, chunk in enumerate(chunks):
            future = asyncio.ensure_future(self._rebuild_chunk(chunk, stored, befores))
            self._enqueue("rebuild", future, (frozen, number == 0, number == len(chunks) - 1))
        self.apply_done()
        return len(sources)

    async def _rebuild_chunk(
        self, chunk: list[Any], stored: asyncio.Future[StoredVectors] | None, befores: dict[str, int]
    ) -> tuple[list[tuple[int, str, dict[str, Any]]], np.ndarray, list[int]]:
        """A chunk of a rebuild: its entries, their vectors, and which of them were embedded now."""
        vectors = await asyncio.shield(stored) if stored is not None else None
        result: tuple[list[tuple[int, str, dict[str, Any]]], np.ndarray, list[int]]
        result = await self._on_thread(self._embed_sources, chunk, vectors, befores)
        return result

    def _embed_sources(
        self,
        sources: list[tuple[int, str, dict[str, Any]] | tuple[int, str]],
        stored: StoredVectors | None = None,
        befores: dict[str, int] | None = None,
    ) -> tuple[list[tuple[int, str, dict[str, Any]]], np.ndarray, list[int]]:
        """On the embedding thread: the chunk's entries (rows of ``memory_entries`` read now), their
        vectors (from ``stored`` where it has them), and the rows embedded now; ``befores``
        keeps what agents' memory rows say of tiers, across the chunks of a rebuild."""
        rows = self._entries.rows
        befores = {} if befores is None else befores
        entries: list[tuple[int, str, dict[str, Any]]] = []
        for source in sources:
            if len(source) == 3:
                entries.append(source)  # type: ignore[arg-type]
            else:
                partition, entry_id = source  # type: ignore[misc]
                row = thaw(rows.get(entry_id))
                if row is not None:
                    row["id"] = entry_id  # the table's own string, which the index then shares
                    entries.append(
                        (partition, tier_of(row, None, self._semantic_before(row["agent_id"], befores)), row)
                    )
        vectors = np.empty((len(entries), self.embedder.dimensions), dtype=np.float32)
        fresh: list[int] = []
        for row, (_, _, entry) in enumerate(entries):
            vector = stored.get(entry["id"]) if stored is not None else None
            if vector is None:
                fresh.append(row)
            else:
                vectors[row] = vector
        self.reused += len(entries) - len(fresh)
        if fresh:
            vectors[fresh] = self.embedder.embed([entries[row][2]["content"] for row in fresh])
        return entries, vectors, fresh

    def search_agent(self, agent_id: str, query: str, limit: int) -> list[dict[str, Any]]:
        """The agent's entries most similar to ``query``, best first, each with its ``score``
        (for handlers: the agent's partition is this worker's)."""
        if self.queries is None:
            return []
        vector = self.queries.embed([query])[0]
        found = []
        befores: dict[str, int] = {}
        for hit in self.index.search(vector, limit, self.embedder.default_threshold, agent_id=agent_id):
            entry = self.entry(hit, befores)
            if entry is not None:
                found.append({**entry, "score": hit.score})
        return found

    def agent_entries(self, agent_id: str, tier: str) -> list[dict[str, Any]]:
        """The agent's entries of a tier beyond working memory, oldest first."""
        rows = self._entries.rows
        found = [thaw(rows.get(entry_id)) for entry_id in self.index.agent_entries(agent_id, tier)]
        return sorted(({**entry, "tier": tier} for entry in found if entry is not None), key=chain_order)

    def entry(self, hit: Hit, befores: dict[str, int] | None = None) -> dict[str, Any] | None:
        """The stored entry a hit stands for (None if it is gone meanwhile); ``befores`` keeps
        what the agents' memory rows say of tiers across the hits of one search."""
        stored = thaw(self._entries.rows.get(hit.entry_id))
        if stored is not None:
            before = self._semantic_before(stored["agent_id"], {} if befores is None else befores)
            return {**stored, "tier": tier_of(stored, None, before)}
        row = thaw(self._memory.rows.get(hit.agent_id))
        if row is not None:
            for entry in working_entries(row):
                if entry["id"] == hit.entry_id:
                    return {**entry, "tier": "working"}
        return None
