"""A restarted worker takes its predecessor's place in the consumer group at once.

A worker that is SIGKILLed stays a member of the consumer group until its session
times out (and Tansu, the embedded broker, does not always expire a member that was
killed while it joined). A rebalance in that time waits for it or hands it partitions
that nobody then processes. So each worker process has a client id of its own that
a process replacing it has too (:func:`client_id`: the app, the host and the web
port), and brokers name members after their client id (``<client id>-<uuid>``). On
start, before it joins, a worker asks the group coordinator to remove every member
under its client id (a LeaveGroup on their behalf, as a member sends itself when it
stops cleanly), so the rebalance its own join starts can complete at once.

The members are removed in one LeaveGroup request (version 3, a batch). Several processes
killed together have one leader among their members, and Tansu's group coordinator, on a
leave one member at a time, clears the leader only while the group is formed: once the
first leave set it forming, the leader's own leave left its id in place, and every later
join was answered with that dead leader, so the group never formed again. Removed in one
request, the members leave the formed group together, and a new leader is elected. The
supervisor (:mod:`streams.runtime.supervisor`) therefore removes the predecessors of all
its worker processes at once before it starts them.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

from aiokafka.client import CoordinationType
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Int16, Int32, Schema, String

from streams.runtime import kafka_clients
from streams.runtime.settings import Settings

log = logging.getLogger(__name__)


def client_id(settings: Settings, web_port: int | None = None) -> str:
    """The Kafka client id of the worker process on ``web_port`` (default: this one's):
    the same for the process that replaces it, and only for it."""
    return f"{settings.app_id}-{socket.gethostname()}-{settings.web_port if web_port is None else web_port}"


async def evict_predecessors(
    bootstrap: Settings | str, group: str, client_ids: Sequence[str], timeout_ms: int = 3000
) -> list[str]:
    """Remove the members earlier processes with ``client_ids`` left in ``group``, in one
    request; returns their ids.

    Best effort: errors are logged, never raised (the workers then join as before).
    """
    prefixes = tuple(f"{name}-" for name in client_ids)
    try:
        stale = await _members_named(bootstrap, group, prefixes, timeout_ms)
        if stale:
            await _leave(bootstrap, group, stale, timeout_ms)
    except (KafkaError, OSError, TimeoutError) as exc:
        log.warning("could not remove earlier members of %s from %s: %r", ", ".join(client_ids), group, exc)
        return []
    return stale


def report_evicted(members: list[str]) -> None:
    for member in members:
        print(f"blackroad: removed the member {member} a previous worker process left in the group", flush=True)


async def _members_named(
    bootstrap: Settings | str, group: str, prefixes: tuple[str, ...], timeout_ms: int
) -> list[str]:
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
                members += [member[0] for member in found[5] if str(member[0]).startswith(prefixes)]
    return members


async def _leave(bootstrap: Settings | str, group: str, members: list[str], timeout_ms: int) -> None:
    client = kafka_clients.client(bootstrap, request_timeout_ms=timeout_ms)
    try:
        await client.bootstrap()
        coordinator = await client.coordinator_lookup(CoordinationType.GROUP, group)
        response = await client.send(coordinator, _LeaveMembers(group, members))
        error = for_code(response.error_code)
        if error.errno != 0:
            raise error(f"LeaveGroup for {len(members)} members of {group}")
        for member, _instance, code in response.members:
            if code != 0:
                log.info("member %s of %s was already gone (%s)", member, group, for_code(code).__name__)
    finally:
        await client.close()


class _LeaveGroupResponse_v3(Response):
    API_KEY = 13
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        (
            "members",
            Array(("member_id", String("utf-8")), ("group_instance_id", String("utf-8")), ("error_code", Int16)),
        ),
    )


class _LeaveGroupRequest_v3(RequestStruct):
    API_KEY = 13
    API_VERSION = 3
    RESPONSE_TYPE = _LeaveGroupResponse_v3
    SCHEMA = Schema(
        ("group_id", String("utf-8")),
        ("members", Array(("member_id", String("utf-8")), ("group_instance_id", String("utf-8")))),
    )


class _LeaveMembers(Request[_LeaveGroupRequest_v3]):
    """LeaveGroup for several members at once (KIP-345; Kafka 2.4 and later, and Tansu)."""

    API_KEY = 13

    def __init__(self, group: str, members: Sequence[str]) -> None:
        self._group = group
        self._members = list(members)

    def build(self, request_struct_class: type[_LeaveGroupRequest_v3]) -> _LeaveGroupRequest_v3:
        return request_struct_class(self._group, [(member, None) for member in self._members])
