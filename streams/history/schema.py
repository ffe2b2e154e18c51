"""The history database's schema, as numbered migrations the project owns.

``migrate`` applies the ones a database has not had yet, each in its own transaction, and
records them in ``schema_migrations``; on a current database it changes nothing. Workers
starting together take turns through an advisory lock, so each migration runs once.
Migrations are only ever added: one already released is never edited.

Times are ``timestamptz``; the changelogs carry milliseconds since the epoch, converted
by the server as rows are written. Every row keeps where it came from (``source_partition``,
``source_offset``: the tasks-topic offset of the last event applied to it), which orders
its versions: a write never replaces a row with an older version of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Key of the advisory lock migrations run under (any constant the project alone uses).
MIGRATION_LOCK = 0x626C6B7264  # "blkrd"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS = (
    Migration(
        1,
        "tasks, agents and memory entries",
        """
        CREATE TABLE tasks (
            id               text PRIMARY KEY,
            agent_id         text NOT NULL,
            title            text,
            description      text,
            kind             text NOT NULL,
            priority         text NOT NULL,
            payload          jsonb,
            status           text NOT NULL,
            result           jsonb,
            error            text,
            attempts         integer NOT NULL,
            created_at       timestamptz NOT NULL,
            started_at       timestamptz,
            completed_at     timestamptz,
            deadline         timestamptz,
            metadata         jsonb,
            source_partition integer NOT NULL,
            source_offset    bigint NOT NULL,
            recorded_at      timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        -- By agent, newest first, and the keyset after a (created_at, id) cursor.
        CREATE INDEX tasks_by_agent ON tasks (agent_id, created_at, id);
        -- By created time, for GET /v1/tasks?since=.
        CREATE INDEX tasks_by_created ON tasks (created_at, id);
        -- By status (and since a time), for GET /v1/tasks?status=, and by agent and status,
        -- for GET /v1/agents/{id}/tasks?status=. Partial: most rows end completed, and a
        -- filter on that reads the two indexes above and skips the few others; every row
        -- written costs an insert into each index it is in.
        CREATE INDEX tasks_by_status ON tasks (status, created_at, id) WHERE status <> 'completed';
        CREATE INDEX tasks_by_agent_status ON tasks (agent_id, status, created_at, id) WHERE status <> 'completed';
        -- The queued tasks of an agent: a small partial index.
        CREATE INDEX tasks_queued_by_agent ON tasks (agent_id) WHERE status = 'queued';
        -- Per-day reports (the day in UTC; DATE() of a timestamptz depends on the session). A
        -- BRIN index: rows arrive about in creation order, so a summary of the days in each
        -- range of pages finds a day's rows at a fraction of a B-tree's upkeep.
        CREATE INDEX tasks_by_created_day ON tasks USING brin (((created_at AT TIME ZONE 'UTC')::date));

        CREATE TABLE agents (
            id                    text PRIMARY KEY,
            name                  text NOT NULL,
            type                  text NOT NULL,
            status                text NOT NULL,
            config                jsonb,
            tasks_completed       bigint NOT NULL,
            tasks_failed          bigint NOT NULL,
            tasks_dead            bigint NOT NULL,
            avg_response_ms       double precision NOT NULL,
            peak_concurrent_tasks integer NOT NULL,
            last_activity         timestamptz,
            created_at            timestamptz NOT NULL,
            updated_at            timestamptz NOT NULL,
            source_partition      integer NOT NULL,
            source_offset         bigint NOT NULL
        ) WITH (fillfactor = 50);  -- room on each page: a snapshot's update stays there (HOT)
        CREATE INDEX agents_by_status ON agents (status, id);

        CREATE TABLE memory_entries (
            id               text PRIMARY KEY,
            agent_id         text NOT NULL,
            key              text NOT NULL,
            role             text NOT NULL,
            content          text NOT NULL,
            memory_type      text NOT NULL,
            tokens           integer NOT NULL,
            hash             text NOT NULL,
            prev_hash        text NOT NULL,
            created_at       timestamptz NOT NULL,
            source_partition integer NOT NULL,
            source_offset    bigint NOT NULL
        );
        CREATE INDEX memory_entries_by_agent ON memory_entries (agent_id, created_at, id);
        """,
    ),
    Migration(
        2,
        "a task's trace id",
        """
        -- The W3C trace id the task came with (32 hex digits); NULL: untraced.
        ALTER TABLE tasks ADD COLUMN trace_id text;
        """,
    ),
)


async def applied_versions(conn: Any) -> set[int]:
    """The migrations a database has had (none if it has no ``schema_migrations`` yet)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    return {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}


async def migrate(conn: Any) -> list[Migration]:
    """Apply the migrations ``conn``'s database lacks, in order; return those applied now."""
    applied: list[Migration] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = await applied_versions(conn)
        for migration in MIGRATIONS:
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", migration.version, migration.name
                )
            applied.append(migration)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied


def latest_version() -> int:
    return MIGRATIONS[-1].version
