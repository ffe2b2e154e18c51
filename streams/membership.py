"""A restarted worker takes its predecessor's place in the consumer group at once.

A worker that is SIGKILLed stays a member of the consumer group until its session
times out. A rebalance in that time waits for it or, on some brokers, hands it
partitions that nobody then processes until the session expires and the group
rebalances again. Each worker process keeps its member id in its state directory
(one per web port, so a restarted process finds its predecessor's); on start, a
worker asks the group coordinator to remove that member (a LeaveGroup on its
behalf, as the member itself sends when it stops cleanly), so the rebalance that
its own join starts can complete at once.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.group import LeaveGroupRequest

log = logging.getLogger(__name__)

MEMBER_FILE = "group-member-id"


def remember_member(state_dir: Path, member_id: str) -> None:
    """Note this process's member id, for the process that may replace it."""
    path = state_dir / MEMBER_FILE
    if member_id and (not path.exists() or path.read_text() != member_id):
        path.write_text(member_id)


async def evict_predecessor(bootstrap: str, group: str, state_dir: Path, timeout_ms: int = 3000) -> str | None:
    """Remove the member a previous process in ``state_dir`` left in ``group``; returns its id.

    Best effort: a member that already left or timed out is unknown to the coordinator,
    which is fine (None is returned). Errors are logged, never raised: the worker then
    joins as before.
    """
    path = state_dir / MEMBER_FILE
    if not path.exists():
        return None
    member_id = path.read_text().strip()
    path.unlink()
    if not member_id:
        return None
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    try:
        await client.bootstrap()
        coordinator = await client.coordinator_lookup(CoordinationType.GROUP, group)
        response = await client.send(coordinator, LeaveGroupRequest(group, member_id))
        error = for_code(response.error_code)
        if error.errno != 0:
            return None  # it already left or timed out
    except (KafkaError, OSError, TimeoutError) as exc:
        log.warning("could not remove the previous member %s from %s: %r", member_id, group, exc)
        return None
    finally:
        await client.close()
    return member_id
