"""Keeps one worker's memory search index in step with its memory tables.

* After each processing batch the entries it wrote are embedded in one call and added
  (tier ``working``), and those that left working memory move to ``episodic``: an entry
  is searchable once its batch ends, before its flush.
* A partition the worker gets (at start, or from a rebalance) is indexed from its restored
  rows: every working-memory entry of its agents and every row of ``memory_entries``.
  Until each owned partition is, searches answer 503.
* A partition handed away is dropped from the index.

Embedding runs on one thread of its own, so the event loop keeps serving (web views,
heartbeats) while a partition's rows are embedded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from agents.memory import entries as working_entries
from streams.memory_search.embedding import CachedEmbedder
from streams.memory_search.index import Hit, VectorIndex
from streams.tables import CachedTable, thaw

#: Entries embedded per call while a partition is indexed from its rows.
REBUILD_CHUNK = 4096

Written = list[tuple[int, list[dict[str, Any]]]]


class MemoryIndexer:
    def __init__(self, embedder: CachedEmbedder, memory: CachedTable, entries: CachedTable) -> None:
        self.embedder = embedder
        self.index = VectorIndex(embedder.dimensions)
        self._memory = memory
        self._entries = entries
        #: Partitions whose rows are in the index.
        self.built: set[int] = set()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedding")

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def embed(self, texts: list[str]) -> np.ndarray:
        """The texts' vectors, computed on the embedding thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self.embedder.embed, texts)

    async def batch_done(self, written: Written, left: list[dict[str, Any]]) -> None:
        """Index a batch's memory changes (entries of partitions not indexed yet come with them later)."""
        ids: list[str] = []
        agents: list[str] = []
        types: list[str] = []
        partitions: list[int] = []
        texts: list[str] = []
        for partition, entries in written:
            if partition not in self.built:
                continue
            for entry in entries:
                ids.append(entry["id"])
                agents.append(entry["agent_id"])
                types.append(entry["memory_type"])
                partitions.append(partition)
                texts.append(entry["content"])
        if texts:
            vectors = await self.embed(texts)
            self.index.add(ids, agents, types, ["working"] * len(ids), partitions, vectors)
        if left:
            self.index.set_tier([entry["id"] for entry in left], "episodic")

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
