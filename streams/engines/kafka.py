"""The Apache Kafka engine: a single-node Kafka 4 broker run from its jars, durable on disk.

One JVM is both the KRaft controller and the broker (``process.roles=broker,controller``),
listening on loopback only: the broker on the configured port, the controller on a
second free port chosen at each start. The controller quorum is the static one-voter set
``controller.quorum.voters`` written with that port, so a restart may pick another
controller port (a dynamic quorum records its voters' endpoints in the log at format
time). Records, offsets and the cluster metadata live in ``<data dir>/kafka/records``:
formatted once with Kafka's storage tool, then kept, so a restart on the same data
directory serves everything as before, also after a SIGKILL (Kafka recovers its log).

Everything runs from the class path Maven provisioned (:mod:`streams.engines.kafka_jars`);
the broker logs to ``<data dir>/kafka/broker.log`` (log4j2, rolled at 10 MB), and the
JVM's own output goes to ``console.log`` beside it.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from streams.broker import BrokerError, ChildBroker, die_with_parent, free_port, port_is_open, wait_for_broker
from streams.engines.kafka_jars import class_path, java_executable

#: A small heap and flags for a quick start: this is one machine's broker, not a tuned
#: cluster. C1 alone (TieredStopAtLevel=1) starts serving about 2 s sooner on 2 cores.
JVM_OPTIONS = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:-UsePerfData",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)
NODE_ID = 1

_LOG4J2 = """\
status = error
# Kafka logs its own shutdown from a shutdown hook; log4j2 must not stop before it.
shutdownHook = disable
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = {log}
appender.file.filePattern = {log}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 10MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 2
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
# Every partition's leadership change, one line each: too much for one machine's log.
logger.state.name = state.change.logger
logger.state.level = warn
"""


def server_properties(port: int, controller_port: int, records: Path) -> dict[str, str]:
    """The broker's configuration: one node, loopback, internal topics sized for one broker."""
    return {
        "process.roles": "broker,controller",
        "node.id": str(NODE_ID),
        "controller.quorum.voters": f"{NODE_ID}@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(records),
        # One broker holds one copy of everything, the internal topics included.
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "8",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # After a SIGKILL the controller keeps the dead broker's registration until its
        # session expires, and the restarted broker cannot register before that: 9 s by
        # default. One process is both, so a short session costs nothing.
        "broker.session.timeout.ms": "3000",
        "broker.heartbeat.interval.ms": "750",
        # A group forms as soon as its first member joins (the default waits 3 s for more).
        "group.initial.rebalance.delay.ms": "0",
        # The project creates its topics with their partitions and configs; a topic created
        # on a client's first request would get the broker's defaults (no compaction).
        "auto.create.topics.enable": "false",
        # The log cleaner (compacting the table changelogs) reserves this much heap; the
        # default 128 MB is a quarter of the heap here.
        "log.cleaner.dedupe.buffer.size": str(32 * 1024 * 1024),
    }


def write_properties(path: Path, values: dict[str, str]) -> None:
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))


def new_cluster_id() -> str:
    """A cluster id as Kafka writes them: 16 random bytes, URL-safe base64 without padding."""
    while True:
        text = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka avoids these too: they read as an option on a command line
            return text


async def _wait_serving(bootstrap: str, deadline: float) -> None:
    """Wait until the broker answers metadata requests and has a group coordinator.

    Kafka creates its offsets topic on the first request for a group coordinator, and
    answers "not available" until it exists: asking once here keeps that wait (and its
    error lines) out of the first worker's start.
    """
    from aiokafka.client import AIOKafkaClient, CoordinationType
    from aiokafka.errors import KafkaError

    await wait_for_broker(bootstrap, max(1.0, deadline - time.monotonic()))
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await client.bootstrap()
        while True:
            try:
                await client.coordinator_lookup(CoordinationType.GROUP, "blackroad-engine-ready")
                return
            except KafkaError as exc:
                if time.monotonic() > deadline:
                    raise BrokerError(f"Apache Kafka has no group coordinator yet: {exc!r}") from exc
                await asyncio.sleep(0.1)
    finally:
        await client.close()


class KafkaBroker(ChildBroker):
    """An Apache Kafka 4 broker on ``127.0.0.1:port`` keeping its data under ``home``.

    A SIGTERM lets Kafka shut down cleanly (flush and close its logs): up to 30 s before SIGKILL.
    """

    engine = "kafka"
    durable = True
    stop_timeout = 30.0

    def __init__(self, port: int, home: Path, properties: Mapping[str, str] | None = None) -> None:
        super().__init__(port)
        self.home = home
        #: Broker properties that replace or add to :func:`server_properties` (e.g. for the bench).
        self.properties = dict(properties or {})
        self.records = home / "records"
        self.log_path = home / "broker.log"
        self.console_path = home / "console.log"
        self.controller_port: int | None = None

    @property
    def formatted(self) -> bool:
        return (self.records / "meta.properties").exists()

    def start(self, timeout: float = 60.0) -> None:
        """Start the broker; returns once it answers metadata requests and has a group coordinator."""
        if port_is_open(self.port):
            raise BrokerError(
                f"port {self.port} is already in use; stop what holds it or set "
                "BLACKROAD_EMBEDDED_BROKER_PORT (or BLACKROAD_KAFKA_BOOTSTRAP to use that broker)"
            )
        started = time.monotonic()
        classes = class_path()
        java = java_executable()
        if java is None:
            raise BrokerError("no `java` found (Apache Kafka needs Java 17+)")
        self.home.mkdir(parents=True, exist_ok=True)
        self.controller_port = free_port()
        while self.controller_port == self.port:
            self.controller_port = free_port()
        config = self.home / "server.properties"
        write_properties(
            config, {**server_properties(self.port, self.controller_port, self.records), **self.properties}
        )
        log4j = self.home / "log4j2.properties"
        log4j.write_text(_LOG4J2.format(log=self.log_path))
        jvm = [java, *JVM_OPTIONS, f"-Dlog4j2.configurationFile={log4j}", "-cp", classes]
        if not self.formatted:
            self._format(jvm, config)
        with self.console_path.open("ab") as console:
            self._process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [*jvm, "kafka.Kafka", str(config)],
                cwd=self.home,  # where a crashing JVM leaves its hs_err file
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl, fork-safe
                # Its own session: a terminal's Ctrl-C reaches the worker, which stops first;
                # the broker is stopped after it.
                start_new_session=True,
            )
        deadline = started + timeout
        try:
            while not port_is_open(self.port):
                if self._process.poll() is not None:
                    raise BrokerError(f"Apache Kafka exited with code {self._process.returncode}{self._last_lines()}")
                if time.monotonic() > deadline:
                    raise BrokerError(f"Apache Kafka not listening on {self.port} after {timeout}s{self._last_lines()}")
                time.sleep(0.05)
            asyncio.run(_wait_serving(self.bootstrap, deadline))
        except BaseException:
            self.stop()
            raise

    def _format(self, jvm: list[str], config: Path) -> None:
        """Format the log directory for a new single-node cluster (done once per data directory)."""
        command = [*jvm, "kafka.tools.StorageTool", "format", "--cluster-id", new_cluster_id(), "--config", str(config)]
        with self.console_path.open("ab") as console:
            result = subprocess.run(  # noqa: S603 - fixed argv, no shell
                command,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                timeout=120,
                check=False,
            )
        if result.returncode != 0:
            raise BrokerError(f"formatting {self.records} failed (code {result.returncode}); see {self.console_path}")

    def _last_lines(self, count: int = 15) -> str:
        lines: list[str] = []
        for path in (self.console_path, self.log_path):
            if path.exists():
                lines += path.read_text(errors="replace").splitlines()[-count:]
        return ":\n" + "\n".join(lines) if lines else ""
