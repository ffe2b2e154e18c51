"""Every Kafka client the project makes, made here, with the security settings applied.

A client is made for a *target*: the :class:`Settings` of a deployment (its bootstrap
servers, and the ``KAFKA_SECURITY_PROTOCOL``, SASL and SSL settings of
docs/kafka-security.md), or a bare ``host:port`` string for a plain-text broker (the
embedded one, benchmarks). ``tests/test_kafka_security.py`` checks that no other module
constructs an aiokafka client itself.
"""

from __future__ import annotations

import logging
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


class _RedactSaslRequests(logging.Filter):
    """Hides the SASL requests aiokafka logs at debug level (their bytes hold the password)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(_is_sasl(arg) for arg in record.args):
            record.args = tuple("<SaslAuthenticateRequest redacted>" if _is_sasl(arg) else arg for arg in record.args)
        return True


def _is_sasl(value: object) -> bool:
    return type(value).__name__.startswith("SaslAuthenticateRequest")


_REDACTION = _RedactSaslRequests()


def protect_logs() -> None:
    """Keep SASL credentials out of aiokafka's debug log (done once a SASL client is made)."""
    connection_log = logging.getLogger("aiokafka.conn")
    if _REDACTION not in connection_log.filters:
        connection_log.addFilter(_REDACTION)


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
        protect_logs()
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


#: Seconds a transactional producer waits before it asks again to add a partition to its next
#: transaction while the broker still writes the markers of its last one (the broker answers
#: CONCURRENT_TRANSACTIONS until they are written, a millisecond or two). aiokafka waits 20 ms;
#: a flush begins its transaction as soon as the last one commits, so under load most flushes
#: met that wait: back-to-back transactions took 23.3 ms at the median with it and 3.1 ms with
#: 1 ms (docs/performance.md, "Back-to-back transactions").
TRANSACTION_BUSY_RETRY = 0.001


def producer(target: Settings | str, **options: Any) -> AIOKafkaProducer:
    from aiokafka import AIOKafkaProducer

    if options.get("transactional_id"):
        shorten_busy_transaction_wait()
    return AIOKafkaProducer(**client_options(target), **options)


def shorten_busy_transaction_wait() -> None:
    """Set aiokafka's wait after CONCURRENT_TRANSACTIONS to :data:`TRANSACTION_BUSY_RETRY`.

    aiokafka keeps it in a module constant (``BACKOFF_OVERRIDE`` of its sender), used for that
    one answer only; it is set when the first transactional producer is made, not at import.
    """
    from aiokafka.producer import sender

    if hasattr(sender, "BACKOFF_OVERRIDE"):
        sender.BACKOFF_OVERRIDE = TRANSACTION_BUSY_RETRY
    else:  # an aiokafka this was not made for: transactions keep its own wait
        logging.getLogger(__name__).warning("this aiokafka has no BACKOFF_OVERRIDE: its transactions keep its own wait")


def consumer(target: Settings | str, *topics: str, **options: Any) -> AIOKafkaConsumer:
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer(*topics, **client_options(target), **options)


def admin(target: Settings | str, **options: Any) -> AIOKafkaAdminClient:
    from aiokafka.admin import AIOKafkaAdminClient

    return AIOKafkaAdminClient(**client_options(target), **options)


def client(target: Settings | str, **options: Any) -> AIOKafkaClient:
    from aiokafka.client import AIOKafkaClient

    return AIOKafkaClient(**client_options(target), **options)


async def check_credentials(settings: Settings) -> None:
    """Raise :class:`SettingsError` naming the setting when the broker refuses this client's
    SASL credentials or TLS handshake; return quietly otherwise (also when it is unreachable).

    A Kafka client retries a refused connection like a lost one, so without this a worker
    with a wrong password would wait for a broker that will never let it in.
    """
    from aiokafka import errors
    from aiokafka.conn import create_conn

    from streams.runtime.settings import SettingsError

    host, _, port = settings.bootstrap.split(",")[0].strip().rpartition(":")
    options = client_options(settings)
    del options["bootstrap_servers"]
    try:
        connection = await create_conn(host.strip("[]"), int(port), request_timeout_ms=5000, **options)
    except (errors.SaslAuthenticationFailed, errors.AuthenticationFailedError):
        raise SettingsError(
            "KAFKA_SASL_PASSWORD",
            f"the broker at {settings.bootstrap} refused user {settings.kafka_sasl_username!r} "
            f"({settings.kafka_sasl_mechanism}): authentication failed; check BLACKROAD_KAFKA_SASL_USERNAME "
            "and BLACKROAD_KAFKA_SASL_PASSWORD (or _FILE)",
        ) from None
    except errors.UnsupportedSaslMechanismError:
        raise SettingsError(
            "KAFKA_SASL_MECHANISM", f"the broker at {settings.bootstrap} does not offer {settings.kafka_sasl_mechanism}"
        ) from None
    except ssl.SSLError as exc:
        raise SettingsError(
            "KAFKA_SSL_CAFILE",
            f"the TLS handshake with the broker at {settings.bootstrap} failed: {exc.reason or exc}",
        ) from None
    except (errors.KafkaError, OSError, TimeoutError, ValueError):
        return  # not reachable (yet): the caller waits and asks again
    connection.close()
