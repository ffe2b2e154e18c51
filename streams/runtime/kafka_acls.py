"""The Kafka ACLs of a deployment: what its workers need, and what a producer of tasks may do.

With an authorizer on the broker and ``allow.everyone.if.no.acl.found=false``, only these
ACLs (and the super users) let a client in. The workers' principal gets every topic of
the deployment (``<TOPIC_PREFIX>.*`` and the changelogs ``<APP_ID>-*``), its consumer
groups and transactional ids (``<APP_ID>*``); a producer-only principal gets writes to the
tasks topic and nothing else, so it cannot forge a changelog row a restarted worker would
serve. docs/kafka-security.md gives the same ACLs as ``kafka-acls.sh`` commands.
"""

from __future__ import annotations

from dataclasses import dataclass

from streams.runtime import kafka_clients
from streams.runtime.settings import Settings

# Kafka's protocol codes (org.apache.kafka.common.resource / acl).
TOPIC, GROUP, CLUSTER, TRANSACTIONAL_ID = 2, 3, 4, 5
LITERAL, PREFIXED = 3, 4
ALL, WRITE, DESCRIBE, DESCRIBE_CONFIGS = 2, 4, 8, 10
ALLOW = 3


@dataclass(frozen=True, slots=True)
class Acl:
    """One ALLOW rule: ``principal`` may do ``operation`` on the resource (by name or by prefix)."""

    resource_type: int
    name: str
    pattern: int
    principal: str
    operation: int


def worker_acls(settings: Settings, user: str) -> list[Acl]:
    """What the workers (and ``dlq``, the history sink, the ingress) need, for SASL user ``user``."""
    principal = f"User:{user}"
    return [
        Acl(TOPIC, f"{settings.topic_prefix}.", PREFIXED, principal, ALL),
        Acl(TOPIC, f"{settings.app_id}-", PREFIXED, principal, ALL),
        Acl(GROUP, settings.app_id, PREFIXED, principal, ALL),
        Acl(TRANSACTIONAL_ID, settings.app_id, PREFIXED, principal, ALL),
        Acl(CLUSTER, "kafka-cluster", LITERAL, principal, DESCRIBE),
        Acl(CLUSTER, "kafka-cluster", LITERAL, principal, DESCRIBE_CONFIGS),
    ]


def producer_acls(settings: Settings, user: str) -> list[Acl]:
    """A producer of tasks (and nothing else) for SASL user ``user``: write the tasks topic."""
    principal = f"User:{user}"
    tasks = settings.topic("tasks")
    return [Acl(TOPIC, tasks, LITERAL, principal, WRITE), Acl(TOPIC, tasks, LITERAL, principal, DESCRIBE)]


async def create_acls(admin: Settings, acls: list[Acl]) -> None:
    """Create ``acls`` on the cluster, connecting as ``admin`` (a super user); raises on a refusal."""
    from aiokafka.errors import for_code
    from aiokafka.protocol.admin import CreateAclsRequest

    client = kafka_clients.client(admin, request_timeout_ms=10_000)
    try:
        await client.bootstrap()
        node = client.get_random_node()
        for acl in acls:
            request = CreateAclsRequest(
                acl.resource_type, acl.name, acl.pattern, acl.principal, "*", acl.operation, ALLOW
            )
            response = await client.send(node, request)
            for code, message in response.creation_responses:
                if code:
                    raise for_code(code)(f"creating {acl}: {message}")
    finally:
        await client.close()
