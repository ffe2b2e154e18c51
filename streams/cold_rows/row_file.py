"""An append-only file of rows, with the handles that find them again.

Rows are appended to the newest segment: to an in-memory buffer first, written out in
pieces of :data:`WRITE_AT` bytes, so a row costs no system call of its own. A row read
back costs one ``pread`` (or a slice of the buffer while it is still there).

A row replaced or removed leaves its bytes behind. Once the file holds more than twice
what was live after the last compaction (and at least :data:`COMPACT_FROM` bytes), it is
compacted: new rows go to a new segment from then on (:meth:`RowFile.start_compaction`),
the live rows are copied there :data:`MOVE_CHUNK` at a time (:meth:`RowFile.move`, on a
thread, so readers and writers wait for one chunk at most), and their handles point there.
Handles that were not moved (rows already replaced, still held by a reader) keep their old
segment, which stays open until the last of them is gone.

Every segment of a file shares one lock: a row may be read from another thread (the
memory indexer's) while the event loop appends or compacts.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

#: Bytes buffered before they are written to the file.
WRITE_AT = 1 << 20
#: The smallest file that compaction looks at.
COMPACT_FROM = 64 << 20
#: Rows moved by a compaction at a time, holding the lock.
MOVE_CHUNK = 1024
#: A handle is the row's position shifted left by this many bits, plus its length.
_LENGTH_BITS = 24
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
#: Rows this long or longer stay in memory (their length does not fit a handle).
LONGEST = 1 << _LENGTH_BITS


class Segment:
    """One unlinked file of rows; only the newest segment of a :class:`RowFile` is appended to."""

    __slots__ = ("_buffer", "_fd", "_file", "_written", "lock")

    def __init__(self, directory: Path, lock: threading.Lock) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # Unlinked at once (O_TMPFILE where the system has it): nothing to clean up after a kill.
        self._file = tempfile.TemporaryFile(dir=directory, prefix="cold-rows-")
        self._fd = self._file.fileno()
        self._buffer = bytearray()
        self._written = 0
        self.lock = lock

    @property
    def size(self) -> int:
        return self._written + len(self._buffer)

    def append(self, row: bytes) -> int:
        """Add ``row`` (the caller holds the lock); returns its handle."""
        at = self._written + len(self._buffer)
        self._buffer += row
        if len(self._buffer) >= WRITE_AT:
            self._write_out()
        return at << _LENGTH_BITS | len(row)

    def read(self, handle: int) -> bytes:
        """The row at ``handle`` (the caller holds the lock)."""
        at, length = handle >> _LENGTH_BITS, handle & _LENGTH_MASK
        if at >= self._written:
            start = at - self._written
            return bytes(self._buffer[start : start + length])
        row = os.pread(self._fd, length, at)
        if len(row) != length:
            raise OSError(f"cold row file: {len(row)} of {length} bytes at {at}")
        return row

    def _write_out(self) -> None:
        with memoryview(self._buffer) as pending:
            done = 0
            while done < len(pending):
                done += os.pwrite(self._fd, pending[done:], self._written + done)
        self._written += done
        self._buffer.clear()


class ColdRow:
    """Where a row is: its segment and its handle there (both move when the file is compacted)."""

    __slots__ = ("handle", "segment")

    def __init__(self, segment: Segment, handle: int) -> None:
        self.segment = segment
        self.handle = handle

    def read(self) -> bytes:
        with self.segment.lock:
            # Read again under the lock: compaction may have moved the row meanwhile.
            return self.segment.read(self.handle)


class RowFile:
    """One table's rows out of the Python heap, in a file under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._segment: Segment | None = None
        #: Bytes of the newest segment right after the last compaction.
        self._live = 0
        self._compacting = False
        #: Compactions so far (for the metrics and the tests).
        self.compactions = 0

    @property
    def size(self) -> int:
        """Bytes in the newest segment, live or not."""
        return 0 if self._segment is None else self._segment.size

    def keep(self, row: bytes) -> ColdRow | bytes:
        """``row`` kept in the file: its :class:`ColdRow` (a row too long for a handle stays as it is)."""
        if len(row) >= LONGEST:
            return row
        with self._lock:
            segment = self._segment
            if segment is None:
                segment = self._segment = Segment(self.directory, self._lock)
            return ColdRow(segment, segment.append(row))

    def needs_compaction(self) -> bool:
        size = self.size
        return not self._compacting and size >= COMPACT_FROM and size > 2 * self._live

    def start_compaction(self) -> Segment:
        """Start a compaction: rows kept from now on go to a new segment, which is returned."""
        with self._lock:
            new = self._segment = Segment(self.directory, self._lock)
            self._compacting = True
            return new

    def move(self, rows: list[ColdRow], new: Segment) -> None:
        """Copy ``rows`` into ``new`` (those not there yet) and point them there; any thread."""
        for start in range(0, len(rows), MOVE_CHUNK):
            with self._lock:
                for row in rows[start : start + MOVE_CHUNK]:
                    if row.segment is not new:
                        row.handle = new.append(row.segment.read(row.handle))
                        row.segment = new

    def end_compaction(self) -> None:
        with self._lock:
            self._live = self.size
            self._compacting = False
            self.compactions += 1
