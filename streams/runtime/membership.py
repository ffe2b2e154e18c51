"""A restarted worker takes its predecessor's place in the consumer group at once.

A worker that is SIGKILLed stays a member of the consumer group until its session
times out. A rebalance in that time waits for it or hands it partitions that nobody
then processes. So each worker process has a client id of its own that
a process replacing it has too (:func:`client_id`: the app, the host and the web
port), and brokers name members after their client id (``<client id>-<uuid>``). On
start, before it joins, a worker asks the group coordinator to remove every member
under its client id (a LeaveGroup on their behalf, as a member sends itself when it
stops cleanly), so the rebalance its own join starts can complete at once.

Not on Tansu (:func:`takes_over_from_predecessors`): its group coordinator (0.6.0), when a
member leaves while the group is forming, removes the member but keeps it as the group's
leader, and then answers every join with that dead leader, so the group never forms
again. A worker killed during a rebalance, or two killed together and removed one by
one, left the others looping that way for good. Tansu expires a member whose heartbeats
stopped after the session timeout (and clears it as leader then), so there the
successor waits for that.
"""

from __future__ import annotations

import logging
import socket

from aiokafka.client import CoordinationType
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.group import LeaveGroupRequest

from streams.runtime import kafka_clients
from streams.runtime.settings import Settings

log = logging.getLogger(__name__)


def takes_over_from_predecessors(settings: Settings) -> bool:
    """Whether a starting worker removes its predecessors' members (see above)."""
    return not settings.on_tansu


def client_id(settings: Settings) -> str:
    """This worker process's Kafka client id: the same for the process that replaces it, and only for it."""
    return f"{settings.app_id}-{socket.gethostname()}-{settings.web_port}"


async def evict_predecessors(
    bootstrap: Settings | str, group: str, own_client_id: str, timeout_ms: int = 3000
) -> list[str]:
    """Remove the members an earlier process with ``own_client_id`` left in ``group``; returns their ids.

    Best effort: errors are logged, never raised (the worker then joins as before).
    """
    try:
        stale = await _members_named(bootstrap, group, own_client_id + "-", timeout_ms)
        if stale:
            await _leave(bootstrap, group, stale, timeout_ms)
    except (KafkaError, OSError, TimeoutError) as exc:
        log.warning("could not remove earlier members of %s from %s: %r", own_client_id, group, exc)
        return []
    return stale


async def _members_named(bootstrap: Settings | str, group: str, prefix: str, timeout_ms: int) -> list[str]:
    admin = kafka_clients.admin(bootstrap, request_timeout_ms=timeout_ms)
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    members: list[str] = []
    for response in described:
        for found in response.groups:
            # (error_code, group, state, protocol_type, protocol, members[, operations])
            if found[1] == group:
                members += [member[0] for member in found[5] if str(member[0]).startswith(prefix)]
    return members


async def _leave(bootstrap: Settings | str, group: str, members: list[str], timeout_ms: int) -> None:
    client = kafka_clients.client(bootstrap, request_timeout_ms=timeout_ms)
    try:
        await client.bootstrap()
        coordinator = await client.coordinator_lookup(CoordinationType.GROUP, group)
        for member in members:
            response = await client.send(coordinator, LeaveGroupRequest(group, member))
            error = for_code(response.error_code)
            if error.errno != 0:
                log.info("member %s of %s was already gone (%s)", member, group, error.__name__)
    finally:
        await client.close()
