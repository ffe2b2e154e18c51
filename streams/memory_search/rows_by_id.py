"""Which row of the vector index holds each entry id, in about 12 bytes an entry.

A ``dict`` of id to row costs about 100 bytes an entry: its slot and an ``int`` object
per row (the id strings themselves are shared with the tables). Here the ids' 64-bit
hashes are kept sorted in one array, their rows beside them in another, and the ids added
since the last merge wait in a small dict. A hash found is confirmed against the index's
id list, so a hash that two ids share never answers for the wrong one, and a row removed
from the index (its id is None there) is never found again: removing needs no change here.
"""

from __future__ import annotations

import numpy as np

#: Ids added since the last merge, at most (a merge copies the arrays once: about 1 ms for
#: 500,000 ids on the machine of docs/memory-search.md).
MERGE_AT = 16_384


class RowsById:
    """Rows by entry id, confirmed against ``ids`` (the index's id of each row, None once removed)."""

    def __init__(self, ids: list[str | None]) -> None:
        self._ids = ids
        self._recent: dict[str, int] = {}
        self._hashes = np.zeros(0, dtype=np.int64)
        self._rows = np.zeros(0, dtype=np.int32)

    @property
    def nbytes(self) -> int:
        """Bytes of the sorted arrays (the dict of recent ids not included)."""
        return int(self._hashes.nbytes + self._rows.nbytes)

    def get(self, entry_id: str) -> int | None:
        row = self._recent_row(entry_id)
        if row is not None:
            return row
        key = hash(entry_id)
        return self._scan(entry_id, key, int(np.searchsorted(self._hashes, key)))

    def find(self, entry_ids: list[str]) -> list[int | None]:
        """:meth:`get` for many ids, with one search of the sorted hashes for all of them."""
        found = [self._recent_row(entry_id) for entry_id in entry_ids]
        count = len(self._hashes)
        if count == 0:
            return found
        keys = np.fromiter(map(hash, entry_ids), dtype=np.int64, count=len(entry_ids))
        positions = np.searchsorted(self._hashes, keys)
        matching = self._hashes[np.minimum(positions, count - 1)] == keys
        for number in np.flatnonzero(matching).tolist():
            if found[number] is None:
                found[number] = self._scan(entry_ids[number], int(keys[number]), int(positions[number]))
        return found

    def _recent_row(self, entry_id: str) -> int | None:
        row = self._recent.get(entry_id)
        return row if row is not None and self._ids[row] == entry_id else None

    def _scan(self, entry_id: str, key: int, position: int) -> int | None:
        hashes, rows, ids = self._hashes, self._rows, self._ids
        while position < len(hashes) and hashes[position] == key:
            row = int(rows[position])
            if ids[row] == entry_id:
                return row
            position += 1
        return None

    def add(self, entry_id: str, row: int) -> None:
        """``entry_id`` is at ``row`` now (any row it had before must have been removed)."""
        self._recent[entry_id] = row
        if len(self._recent) >= MERGE_AT:
            self._merge()

    def discard(self, entry_id: str) -> None:
        """Forget a removed id early (it would not be found anyway)."""
        self._recent.pop(entry_id, None)

    def rebuild(self, ids: list[str | None]) -> None:
        """Start again from ``ids`` (after the index renumbered its rows)."""
        self._ids = ids
        self._recent = {entry_id: row for row, entry_id in enumerate(ids) if entry_id is not None}
        self._hashes = np.zeros(0, dtype=np.int64)
        self._rows = np.zeros(0, dtype=np.int32)
        self._merge()

    def _merge(self) -> None:
        """Move the recent ids into the sorted arrays: their hashes sorted, then inserted in place."""
        recent = self._recent
        keys = np.fromiter(map(hash, recent), dtype=np.int64, count=len(recent))
        rows = np.fromiter(recent.values(), dtype=np.int32, count=len(recent))
        order = np.argsort(keys, kind="stable")
        keys, rows = keys[order], rows[order]
        at = np.searchsorted(self._hashes, keys, side="right")
        self._hashes = np.insert(self._hashes, at, keys)
        self._rows = np.insert(self._rows, at, rows)
        self._recent = {}
