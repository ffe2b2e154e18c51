"""What every broker the project runs needs: owned child processes, ports, readiness.

The embedded engines (:mod:`streams.engines`) start their broker as a child process on
loopback. The child is told by the kernel to exit when its parent dies
(``PR_SET_PDEATHSIG``), so even a SIGKILLed parent leaves no orphan broker behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

from streams.runtime import kafka_clients
from streams.runtime.settings import Settings

_PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    """A broker could not be started or reached."""


def die_with_parent() -> None:
    """In a child process (``preexec_fn``): have the kernel stop it when its parent dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM a child, wait up to ``timeout`` seconds, then SIGKILL it."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def watch_exit(
    process: subprocess.Popen[bytes], still_owned: Callable[[], bool], callback: Callable[[int], None]
) -> None:
    """Call ``callback(exit code)`` from a thread of its own if ``process`` exits while ``still_owned()``.

    An owner that stops its child on purpose drops it first, so only an unexpected exit is reported.
    """

    def watch() -> None:
        code = process.wait()
        if still_owned():
            callback(code)

    threading.Thread(target=watch, name="embedded-broker-watch", daemon=True).start()


class ChildBroker:
    """A broker run as this process's child on ``127.0.0.1:port``: what every engine shares.

    Subclasses start ``_process`` in ``start()``; ``stop_timeout`` is how long a SIGTERM
    may take before SIGKILL.
    """

    engine = ""
    #: Whether records survive a restart of the broker.
    durable = False
    stop_timeout = 5.0

    def __init__(self, port: int) -> None:
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout`` seconds."""
        process, self._process = self._process, None
        if process is not None:
            terminate(process, timeout=self.stop_timeout)

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would (nothing flushed, nothing closed), and wait for it to end."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.kill()
            process.wait()

    def on_unexpected_exit(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(exit code)`` from a thread of its own if the broker exits without :meth:`stop`."""
        process = self._process
        if process is not None:
            watch_exit(process, lambda: self._process is process, callback)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def free_port(count: int = 1) -> int:
    """The first of ``count`` consecutive ports free on 127.0.0.1, below the ephemeral range.

    The kernel hands ports of the ephemeral range to outgoing connections at any moment,
    so a port picked there and bound later by another process (a worker's web ports
    P..P+N-1) can be taken in between by any client socket. Below that range it cannot.
    """
    below = _ephemeral_low()
    chooser = random.Random()  # noqa: S311 - picking a port, not a secret
    for _ in range(500):
        first = chooser.randrange(10_000, below - count)
        if all(_can_bind(first + offset) for offset in range(count)):
            return first
    raise BrokerError(f"no run of {count} free ports found between 10000 and {below}")


def _ephemeral_low(default: int = 32768) -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def _can_bind(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def wait_for_broker(bootstrap: Settings | str, timeout: float = 30.0) -> None:
    """Wait until a Kafka broker answers metadata requests."""

    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        admin = kafka_clients.admin(bootstrap, request_timeout_ms=2000)
        try:
            await admin.start()
            await admin.list_topics()
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last_error = exc
            if not isinstance(bootstrap, str):
                # Refused credentials are no "not yet": fail now, naming the setting.
                await kafka_clients.check_credentials(bootstrap)
        finally:
            await admin.close()
        await asyncio.sleep(0.2)
    raise BrokerError(f"no Kafka broker answered at {kafka_clients.address(bootstrap)}: {last_error}")


async def create_topic(
    bootstrap: Settings | str,
    name: str,
    partitions: int,
    configs: dict[str, str] | None = None,
    replication_factor: int = 1,
) -> None:
    """Create a topic unless it exists.

    The project creates every topic it uses before using it, so no client depends on a
    broker creating topics on first use (the embedded Kafka does not: a topic created
    that way gets the broker's defaults, e.g. no compaction for a changelog). Its callers
    pass the replication resolved for the cluster (``Settings.replication_factor`` and
    ``Settings.topic_configs``).
    """
    from aiokafka.admin import NewTopic
    from aiokafka.errors import (
        InvalidReplicationFactorError,
        TopicAlreadyExistsError,
        TopicAuthorizationFailedError,
        for_code,
    )

    from streams.runtime.settings import SettingsError

    admin = kafka_clients.admin(bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, partitions, replication_factor, topic_configs=dict(configs or {}))]
        )
    finally:
        await admin.close()
    for topic, code, *_ in response.topic_errors:
        if code == InvalidReplicationFactorError.errno:
            raise SettingsError(
                "REPLICATION_FACTOR",
                f"the cluster at {kafka_clients.address(bootstrap)} refused {replication_factor} copies of {topic}; "
                "set it at most the number of brokers",
            )
        if code == TopicAuthorizationFailedError.errno:
            # A principal that may only write the topic (docs/kafka-security.md): whether it
            # exists is for its first write to tell.
            continue
        if code not in (0, TopicAlreadyExistsError.errno):
            raise BrokerError(f"could not create topic {topic}: {for_code(code).__name__}")
