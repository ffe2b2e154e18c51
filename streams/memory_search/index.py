"""One worker's vector index over the memory entries of the partitions it owns.

Each entry is held twice: a binary code (one bit per dimension, its sign) and its unit
vector in float16. A search without an agent filter ranks every row by the Hamming
distance of codes (XOR and popcount over 64-bit words, 32 bytes a row at 256
dimensions), takes the nearest ``candidates`` rows, scores them by cosine similarity
with the float16 vectors, and keeps the top ``limit`` at or above the threshold. With an
agent filter only that agent's rows are scored, all of them. Per entry that is
``dimensions / 8 + 2 * dimensions + 11`` bytes of arrays (555 at 256 dimensions), 16 more
to find its row by id and by agent (:mod:`~streams.memory_search.rows_by_id`, arrays of
rows per agent), and a pointer to its id string (shared with the tables).

Rows are appended; a removed row is marked dead and the arrays are compacted once a
quarter of them are dead.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np

from streams.memory_search.rows_by_id import RowsById

TIERS = ("working", "episodic", "semantic")
MEMORY_TYPES = ("conversation", "task_completion", "decision", "observation", "feedback", "error")
_TIER_CODE = {name: code for code, name in enumerate(TIERS)}
_TYPE_CODE = {name: code for code, name in enumerate(MEMORY_TYPES)}
_MIN_CAPACITY = 1024
#: Per-row arrays (the codes are kept a word per array, row after row, for the Hamming pass).
_ROW_ARRAYS = ("vectors", "agents", "types", "tiers", "partitions", "alive")


@dataclass(frozen=True, slots=True)
class Hit:
    entry_id: str
    agent_id: str
    tier: str
    score: float


class VectorIndex:
    """Entries' vectors by id, with their agent, memory type, tier and partition."""

    def __init__(self, dimensions: int, candidates: int = 2048) -> None:
        self.dimensions = dimensions
        #: Rows scored by cosine after the Hamming pass (at least ``limit`` of them).
        self.candidates = candidates
        self._words = (dimensions + 63) // 64
        #: The distance given to rows a filter excludes: above any real one.
        self._excluded = self._words * 64 + 1
        self._size = 0
        self._dead = 0
        self.codes = np.zeros((self._words, 0), dtype=np.uint64)
        self.vectors = np.zeros((0, dimensions), dtype=np.float16)
        self.agents = np.zeros(0, dtype=np.int32)
        self.types = np.zeros(0, dtype=np.int8)
        self.tiers = np.zeros(0, dtype=np.int8)
        self.partitions = np.zeros(0, dtype=np.int32)
        self.alive = np.zeros(0, dtype=np.bool_)
        self._resize(_MIN_CAPACITY)
        self.ids: list[str | None] = []
        self._row_of = RowsById(self.ids)
        self._agent_code: dict[str, int] = {}
        self._agent_names: list[str] = []
        #: Each agent's rows, as C ints (4 bytes a row, no ``int`` object each).
        self._agent_rows: dict[int, array[int]] = {}

    def _resize(self, capacity: int) -> None:
        used = self._size
        codes = np.zeros((self._words, capacity), dtype=np.uint64)
        codes[:, :used] = self.codes[:, :used]
        self.codes = codes
        for name in _ROW_ARRAYS:
            old = getattr(self, name)
            new = np.zeros((capacity, *old.shape[1:]), dtype=old.dtype)
            new[:used] = old[:used]
            setattr(self, name, new)

    def __len__(self) -> int:
        return self._size - self._dead

    def __contains__(self, entry_id: str) -> bool:
        return self._row_of.get(entry_id) is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the index's row arrays and id lookup (its Python lists and dicts not included)."""
        return int(self.codes.nbytes + sum(getattr(self, name).nbytes for name in _ROW_ARRAYS) + self._row_of.nbytes)

    def add(
        self,
        ids: list[str],
        agent_ids: list[str],
        memory_types: list[str],
        tiers: list[str],
        partitions: list[int],
        vectors: np.ndarray,
    ) -> None:
        """Add entries (an id already held is replaced); ``vectors`` are unit length, one row each."""
        count = len(ids)
        if count == 0:
            return
        row_of = self._row_of
        for entry_id, held in zip(ids, row_of.find(ids), strict=True):
            if held is not None:
                row_of.discard(entry_id)
                self._kill(held)
        if self._size + count > len(self.alive):
            self._resize(max(2 * len(self.alive), self._size + count))
        start, end = self._size, self._size + count
        self.codes[:, start:end] = binary_codes(vectors, self._words).T
        self.vectors[start:end] = vectors
        self.types[start:end] = [_TYPE_CODE.get(t, 0) for t in memory_types]
        self.tiers[start:end] = [_TIER_CODE[t] for t in tiers]
        self.partitions[start:end] = partitions
        self.alive[start:end] = True
        agent_codes = self.agents[start:end]
        for offset, (entry_id, agent_id) in enumerate(zip(ids, agent_ids, strict=True)):
            code = self._agent_code.get(agent_id)
            if code is None:
                code = self._agent_code[agent_id] = len(self._agent_names)
                self._agent_names.append(agent_id)
                self._agent_rows[code] = array("i")
            row = start + offset
            agent_codes[offset] = code
            self._agent_rows[code].append(row)
            self.ids.append(entry_id)
            row_of.add(entry_id, row)
        self._size = end

    def agent_entries(self, agent_id: str, tier: str | None = None) -> list[str]:
        """The ids of the agent's live entries (of ``tier``, if given)."""
        code = self._agent_code.get(agent_id)
        if code is None:
            return []
        rows = np.array(self._agent_rows[code], dtype=np.int64)
        keep = self.alive[rows]
        if tier is not None:
            keep &= self.tiers[rows] == _TIER_CODE.get(tier, -1)
        return [entry_id for row in rows[keep].tolist() if (entry_id := self.ids[row]) is not None]

    def tier_counts(self) -> dict[str, int]:
        """Live entries per tier."""
        size = self._size
        counts = np.bincount(self.tiers[:size][self.alive[:size]], minlength=len(TIERS))
        return {name: int(counts[code]) for code, name in enumerate(TIERS)}

    def set_tier(self, ids: list[str], tier: str) -> None:
        """Move entries to another tier (ids not held are skipped).

        The index keeps the given id strings from then on: an entry that left working memory
        is named by the same string as its row in the tables, and one string is 80 bytes
        less than two.
        """
        code = _TIER_CODE[tier]
        row_of = self._row_of
        for entry_id in ids:
            row = row_of.get(entry_id)
            if row is not None:
                self.tiers[row] = code
                self.ids[row] = entry_id

    def tier_of(self, entry_id: str) -> str | None:
        row = self._row_of.get(entry_id)
        return None if row is None else TIERS[self.tiers[row]]

    def remove(self, ids: list[str]) -> None:
        for entry_id in ids:
            row = self._row_of.get(entry_id)
            if row is not None:
                self._row_of.discard(entry_id)
                self._kill(row)
        self._maybe_compact()

    def drop_partitions(self, partitions: set[int]) -> None:
        """Forget every entry of ``partitions`` (handed to another worker)."""
        if not partitions or self._size == 0:
            return
        size = self._size
        doomed = np.flatnonzero(self.alive[:size] & np.isin(self.partitions[:size], list(partitions)))
        for row in doomed.tolist():
            entry_id = self.ids[row]
            if entry_id is not None:
                self._row_of.discard(entry_id)
            self._kill(row)
        self._maybe_compact()

    def _kill(self, row: int) -> None:
        if self.alive[row]:
            self.alive[row] = False
            self.ids[row] = None
            self._dead += 1

    def _maybe_compact(self) -> None:
        if self._dead > max(_MIN_CAPACITY, self._size // 4):
            self.compact()

    def compact(self) -> None:
        """Drop dead rows from the arrays."""
        keep = np.flatnonzero(self.alive[: self._size])
        count = len(keep)
        self.codes[:, :count] = self.codes[:, keep]
        for name in _ROW_ARRAYS:
            values = getattr(self, name)
            values[:count] = values[keep]
        self.alive[count : self._size] = False
        self.ids = [self.ids[row] for row in keep.tolist()]
        self._row_of.rebuild(self.ids)
        self._agent_rows = {code: array("i") for code in self._agent_rows}
        agents = self.agents[:count]
        by_agent = np.argsort(agents, kind="stable").astype(np.intc)
        for rows in np.split(by_agent, np.flatnonzero(np.diff(agents[by_agent])) + 1):
            if len(rows):
                self._agent_rows[int(agents[rows[0]])] = array("i", rows.tobytes())
        self._size = count
        self._dead = 0

    def search(
        self,
        query: np.ndarray,
        limit: int,
        threshold: float,
        agent_id: str | None = None,
        memory_type: str | None = None,
        tier: str | None = None,
    ) -> list[Hit]:
        """The ``limit`` entries most similar to ``query`` (a unit vector) at or above ``threshold``,
        best first (equal scores in the order they were added)."""
        if limit <= 0 or self._size == 0:
            return []
        query = np.asarray(query, dtype=np.float32)
        if agent_id is not None:
            candidates = self._agent_candidates(agent_id, memory_type, tier)
        else:
            candidates = self._nearest_codes(query, limit, memory_type, tier)
        if len(candidates) == 0:
            return []
        # einsum, not ``@``: a matrix product goes to BLAS, whose threads spin-wait for cores
        # the broker and the other worker hold (measured: 4 ms instead of 0.02 under load).
        scores = np.einsum("ij,j->i", self.vectors[candidates].astype(np.float32), query)
        order = np.lexsort((candidates, -scores))[:limit]
        hits = []
        for position in order.tolist():
            score = float(scores[position])
            if score < threshold:
                break
            row = int(candidates[position])
            entry_id = self.ids[row]
            assert entry_id is not None
            hits.append(Hit(entry_id, self._agent_names[self.agents[row]], TIERS[self.tiers[row]], score))
        return hits

    def _agent_candidates(self, agent_id: str, memory_type: str | None, tier: str | None) -> np.ndarray:
        """Every live row of the agent that passes the filters."""
        code = self._agent_code.get(agent_id)
        if code is None:
            return np.zeros(0, dtype=np.int64)
        rows = np.array(self._agent_rows[code], dtype=np.int64)
        keep = self.alive[rows]
        if memory_type is not None:
            keep &= self.types[rows] == _TYPE_CODE.get(memory_type, -1)
        if tier is not None:
            keep &= self.tiers[rows] == _TIER_CODE.get(tier, -1)
        selected: np.ndarray = rows[keep]
        return selected

    def _nearest_codes(self, query: np.ndarray, limit: int, memory_type: str | None, tier: str | None) -> np.ndarray:
        """About ``candidates`` live rows passing the filters whose codes are nearest the query's."""
        size = self._size
        distances = hamming(self.codes[:, :size], binary_codes(query[None, :], self._words)[0])
        excluded = ~self.alive[:size]
        if memory_type is not None:
            excluded |= self.types[:size] != _TYPE_CODE.get(memory_type, -1)
        if tier is not None:
            excluded |= self.tiers[:size] != _TIER_CODE.get(tier, -1)
        distances[excluded] = self._excluded
        wanted = max(self.candidates, limit)
        # Distances are small integers: count them, and keep every row up to the distance
        # where the count reaches ``wanted`` (cheaper than a partial sort of every row).
        counts = np.bincount(distances, minlength=self._excluded + 1)
        cutoff = min(int(np.searchsorted(np.cumsum(counts), wanted)), self._excluded - 1)
        nearer = np.flatnonzero(distances < cutoff)
        # Rows at the cutoff distance only as many as make up ``wanted``: near-duplicate
        # entries can put tens of thousands at one distance.
        at_cutoff = np.flatnonzero(distances == cutoff)[: max(0, wanted - len(nearer))]
        selected: np.ndarray = np.concatenate((nearer, at_cutoff))
        return selected


def binary_codes(vectors: np.ndarray, words: int) -> np.ndarray:
    """One bit per dimension (set where the value is positive), packed into ``words`` uint64s a row."""
    bits = np.packbits(np.asarray(vectors) > 0, axis=1, bitorder="little")
    padded = np.zeros((len(bits), words * 8), dtype=np.uint8)
    padded[:, : bits.shape[1]] = bits
    return padded.view(np.uint64)


def hamming(codes: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The Hamming distance of every column of ``codes`` (a row per word) to ``query`` (uint16)."""
    size = codes.shape[1]
    total = np.zeros(size, dtype=np.uint16)
    differing = np.empty(size, dtype=np.uint64)
    counted = np.empty(size, dtype=np.uint8)
    for word in range(codes.shape[0]):
        np.bitwise_xor(codes[word], query[word], out=differing)
        np.bitwise_count(differing, out=counted)
        np.add(total, counted, out=total)
    return total
