"""Durable history in PostgreSQL: every task's states, agent snapshots and memory entries.

The live tables (:mod:`streams.processing.tables`) serve the current state and forget a task after
``BLACKROAD_TASK_RETENTION``; this package keeps the history users query, join and
report on: the schema and its migrations (:mod:`.schema`), the writes (:mod:`.store`),
the sink that copies the changelogs into it (:mod:`.sink`), and the private server of the
embedded default (:mod:`.embedded`).
"""
