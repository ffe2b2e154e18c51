"""How far the history sink is behind: its topics' ends less the sink group's committed offsets.

Read from the broker, so every worker answers the same (``GET /v1/stats``, ``/metrics``),
whichever sink processes run and wherever.
"""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.processing.transport import fetch_highwaters
from streams.runtime import kafka_clients
from streams.runtime.settings import Settings

#: The changelogs the sink copies.
SUNK_TABLES = ("tasks", "agents")


def changelog_topic(settings: Settings, table: str) -> str:
    return f"{settings.app_id}-{table}-changelog"


def archive_topic(settings: Settings) -> str:
    """Where the workers send memory entries that left working memory (see :mod:`streams.processing.agent_runner`)."""
    return settings.topic("memory-archive")


def sunk_topics(settings: Settings) -> tuple[str, ...]:
    """Every topic the sink copies: the changelogs of :data:`SUNK_TABLES` and the memory archive."""
    return (*(changelog_topic(settings, table) for table in SUNK_TABLES), archive_topic(settings))


def history_group(settings: Settings) -> str:
    return f"{settings.app_id}-history"


def lag_reader(settings: Settings) -> AIOKafkaConsumer:
    """A consumer (not started) that reads the sink group's committed offsets and the changelogs'
    ends. It is assigned its partitions by :func:`history_lag` and never joins the group nor
    commits (the admin client's OffsetFetch is not understood by every broker: Tansu's answer
    fails to decode; the consumer's is)."""
    return kafka_clients.consumer(
        settings,
        group_id=history_group(settings),
        enable_auto_commit=False,
        # Under exactly-once the ends are the last stable offsets, as the sink reads.
        isolation_level="read_committed" if settings.exactly_once else "read_uncommitted",
    )


async def topic_ends(
    settings: Settings, reader: AIOKafkaConsumer, tps: list[TopicPartition]
) -> dict[TopicPartition, int]:
    """The ends of ``tps`` as the sink reads them: ListOffsets through ``reader``, or on Tansu,
    which answers that too low, the high-water marks of a Fetch response."""
    if settings.on_tansu:
        return await fetch_highwaters(settings, tps)
    ends: dict[TopicPartition, int] = await reader.end_offsets(tps)
    return ends


async def history_lag(settings: Settings, reader: AIOKafkaConsumer) -> int:
    """Records of the sunk topics not yet in PostgreSQL (a partition the sink never committed counts whole)."""
    tps = [
        TopicPartition(topic, partition) for topic in sunk_topics(settings) for partition in range(settings.partitions)
    ]
    if reader.assignment() != set(tps):
        reader.assign(tps)
    ends = await topic_ends(settings, reader, tps)
    behind = 0
    for tp in tps:
        committed = await reader.committed(tp)
        behind += max(0, ends.get(tp, 0) - (committed or 0))
    return behind
