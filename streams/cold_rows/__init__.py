"""Rows kept in a file instead of the Python heap.

A table whose rows are written once and read rarely (finished tasks, memory entries that
left working memory: hundreds of thousands per worker) keeps each frozen row in a
:class:`RowFile`, and holds only a small :class:`ColdRow` (the row's place in the file) in
its store (see ``ROWS_IN_FILES`` in :mod:`streams.processing.tables`). The
file is scratch: unlinked as soon as it is created, gone with the process, and rebuilt
from the changelogs like every other store. Reads go through the operating system's page
cache, not the process's memory.

* :mod:`.row_file`: the file, its rows' handles, and its compaction.
"""

from streams.cold_rows.row_file import ColdRow, RowFile

__all__ = ["ColdRow", "RowFile"]
