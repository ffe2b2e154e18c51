"""Every Kafka client the project makes, made here, with the security settings applied.

A client is made for a *target*: the :class:`Settings` of a deployment (its bootstrap
servers, and the ``KAFKA_SECURITY_PROTOCOL``, SASL and SSL settings of
docs/kafka-security.md), or a bare ``host:port`` string for a plain-text broker (the
embedded one, benchmarks). ``tests/test_kafka_security.py`` checks that no other module
constructs an aiokafka client itself.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.client import AIOKafkaClient
    from faust.types.auth import CredentialsT

    from streams.runtime.settings import Settings


def address(target: Settings | str) -> str:
    """The bootstrap servers of ``target`` (safe to print: no credentials)."""
    return target if isinstance(target, str) else target.bootstrap


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of the SSL protocols (None without SSL)."""
    if not settings.kafka_ssl:
        return None
    from aiokafka.helpers import create_ssl_context

    return create_ssl_context(
        cafile=settings.kafka_ssl_cafile,
        certfile=settings.kafka_ssl_certfile,
        keyfile=settings.kafka_ssl_keyfile,
    )


def client_options(target: Settings | str) -> dict[str, Any]:
    """The options every aiokafka client of ``target`` gets: bootstrap servers and security."""
    if isinstance(target, str):
        return {"bootstrap_servers": target}
    options: dict[str, Any] = {
        "bootstrap_servers": target.bootstrap,
        "security_protocol": target.kafka_security_protocol,
    }
    if target.kafka_ssl:
        options["ssl_context"] = ssl_context(target)
    if target.kafka_sasl:
        options["sasl_mechanism"] = target.kafka_sasl_mechanism
        options["sasl_plain_username"] = target.kafka_sasl_username
        options["sasl_plain_password"] = target.kafka_password()
    return options


def faust_credentials(settings: Settings) -> CredentialsT | ssl.SSLContext | None:
    """The same security as Faust's ``broker_credentials`` (None: plain text)."""
    import faust

    context = ssl_context(settings)
    if settings.kafka_sasl:
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_password(),
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=context,
        )
    return context


def producer(target: Settings | str, **options: Any) -> AIOKafkaProducer:
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(**client_options(target), **options)


def consumer(target: Settings | str, *topics: str, **options: Any) -> AIOKafkaConsumer:
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer(*topics, **client_options(target), **options)


def admin(target: Settings | str, **options: Any) -> AIOKafkaAdminClient:
    from aiokafka.admin import AIOKafkaAdminClient

    return AIOKafkaAdminClient(**client_options(target), **options)


def client(target: Settings | str, **options: Any) -> AIOKafkaClient:
    from aiokafka.client import AIOKafkaClient

    return AIOKafkaClient(**client_options(target), **options)
