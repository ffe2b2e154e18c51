"""The Apache Kafka engine: a single-node Kafka 4 broker run from its jars, durable on disk.

(:class:`KafkaCluster` runs three such nodes as one cluster on loopback, for the tests of
replication and broker failures; see its docstring.)

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from streams.engines.kafka_jars import class_path, java_executable
from streams.runtime import kafka_clients
from streams.runtime.broker import BrokerError, ChildBroker, die_with_parent, free_port, port_is_open, wait_for_broker
from streams.runtime.settings import Settings, default_min_insync_replicas, default_replication_factor

#: A small heap and flags for a quick start: this is one machine's broker, not a tuned
#: cluster. C1 alone (TieredStopAtLevel=1) starts serving about 2 s sooner on 2 cores. G1
#: with a 5 ms pause goal: the serial collector stopped the broker for 10-44 ms every few
#: seconds under exactly-once at 500 tasks/s, which set the tasks' P99 latency (13-16 ms
#: against 8-11 ms with G1; docs/performance.md, "The broker's collector").
JVM_OPTIONS = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=5",
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


def server_properties(
    port: int, controller_port: int, records: Path, node_id: int = NODE_ID, voters: str | None = None, brokers: int = 1
) -> dict[str, str]:
    """A node's configuration: loopback, internal topics sized for the cluster's ``brokers``.

    One node (the default) is its own quorum, with one copy of everything. A node of a
    cluster (:class:`KafkaCluster`) names every controller in ``voters``; the internal
    topics then get three copies (two in sync) as the project's topics do by default.
    """
    replicas = default_replication_factor(brokers)
    in_sync = default_min_insync_replicas(replicas)
    return {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": voters or f"{node_id}@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(records),
        # One broker holds one copy of everything, the internal topics included; a cluster
        # three (or one per broker), of which all but one must have a record.
        "default.replication.factor": str(replicas),
        "min.insync.replicas": str(in_sync),
        "offsets.topic.replication.factor": str(replicas),
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.replication.factor": str(replicas),
        "transaction.state.log.min.isr": str(in_sync),
        "transaction.state.log.num.partitions": "8",
        "share.coordinator.state.topic.replication.factor": str(replicas),
        "share.coordinator.state.topic.min.isr": str(in_sync),
        # After a SIGKILL the controller keeps the dead broker's registration until its
        # session expires, and the restarted broker cannot register before that: 9 s by
        # default. One process is both, so a short session costs nothing. In a cluster it
        # is also how soon a dead broker's partitions get other leaders.
        "broker.session.timeout.ms": "3000",
        "broker.heartbeat.interval.ms": "750",
        # A group forms as soon as its first member joins (the default waits 3 s for more).
        "group.initial.rebalance.delay.ms": "0",
        # Workers here use a 3 s session (BLACKROAD_SESSION_TIMEOUT), so the partitions of one
        # killed for good move on quickly; Kafka refuses sessions under 6 s by default.
        "group.min.session.timeout.ms": "1000",
        # The project creates its topics with their partitions and configs; a topic created
        # on a client's first request would get the broker's defaults (no compaction).
        "auto.create.topics.enable": "false",
        # The log cleaner (compacting the table changelogs) reserves this much heap; the
        # default 128 MB is a quarter of the heap here.
        "log.cleaner.dedupe.buffer.size": str(32 * 1024 * 1024),
    }


@dataclass(frozen=True)
class Keystore:
    """A PKCS#12 keystore holding a broker's TLS key and certificate."""

    path: Path
    password: str


def sasl_plain_properties(
    port: int, users: Mapping[str, str], admin: str, ssl_port: int | None = None, keystore: Keystore | None = None
) -> dict[str, str]:
    """Properties that make the broker's port a ``SASL_PLAINTEXT`` listener with the PLAIN mechanism,
    and ``ssl_port`` (with ``keystore``) a ``SASL_SSL`` one.

    ``users`` maps each user name to its password; ``admin`` (one of them) is the broker's own
    principal between brokers and a super user. The authorizer is on and refuses whatever no
    ACL allows (docs/kafka-security.md). The controller listener stays plain text on loopback;
    its principal (``ANONYMOUS``, the broker reaching its controller) is a super user too.
    """
    entries = " ".join(f'user_{name}="{password}"' for name, password in users.items())
    jaas = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'username="{admin}" password="{users[admin]}" {entries};'
    )
    listeners = {"SASL_PLAINTEXT": port}
    if ssl_port is not None:
        listeners["SASL_SSL"] = ssl_port
    endpoints = ",".join(f"{name}://127.0.0.1:{number}" for name, number in listeners.items())
    values = {
        "listeners": f"{endpoints},CONTROLLER://127.0.0.1:{{controller_port}}",
        "advertised.listeners": endpoints,
        "listener.security.protocol.map": ",".join(f"{name}:{name}" for name in listeners) + ",CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "SASL_PLAINTEXT",
        "sasl.enabled.mechanisms": "PLAIN",
        "sasl.mechanism.inter.broker.protocol": "PLAIN",
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": f"User:{admin};User:ANONYMOUS",
        "allow.everyone.if.no.acl.found": "false",
    }
    for name in listeners:
        values[f"listener.name.{name.lower()}.plain.sasl.jaas.config"] = jaas
    if ssl_port is not None:
        if keystore is None:
            raise ValueError("a SASL_SSL listener needs a keystore")
        values |= {
            "listener.name.sasl_ssl.ssl.keystore.type": "PKCS12",
            "listener.name.sasl_ssl.ssl.keystore.location": str(keystore.path),
            "listener.name.sasl_ssl.ssl.keystore.password": keystore.password,
            "listener.name.sasl_ssl.ssl.key.password": keystore.password,
        }
    return values


def write_properties(path: Path, values: dict[str, str]) -> None:
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))


def new_cluster_id() -> str:
    """A cluster id as Kafka writes them: 16 random bytes, URL-safe base64 without padding."""
    while True:
        text = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka avoids these too: they read as an option on a command line
            return text


async def _wait_serving(bootstrap: Settings | str, deadline: float, brokers: int = 1) -> None:
    """Wait until ``brokers`` brokers answer metadata requests and there is a group coordinator.

    Kafka creates its offsets topic on the first request for a group coordinator, and
    answers "not available" until it exists: asking once here keeps that wait (and its
    error lines) out of the first worker's start. A cluster's offsets topic needs all its
    copies' brokers, and a worker sizes its topics by the brokers it finds, so a cluster
    serves once every node has registered.
    """
    from aiokafka.client import CoordinationType
    from aiokafka.errors import KafkaError

    await wait_for_broker(bootstrap, max(1.0, deadline - time.monotonic()))
    client = kafka_clients.client(bootstrap, request_timeout_ms=5000)
    try:
        await client.bootstrap()
        while len(client.cluster.brokers()) < brokers:
            if time.monotonic() > deadline:
                raise BrokerError(f"only {len(client.cluster.brokers())} of {brokers} Kafka brokers registered")
            await asyncio.sleep(0.1)
            await client.force_metadata_update()
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


@dataclass(frozen=True)
class Quorum:
    """What the nodes of one :class:`KafkaCluster` share: its id and every node's controller port."""

    cluster_id: str
    #: Node id -> the port its controller listens on (127.0.0.1).
    controller_ports: dict[int, int]

    @property
    def voters(self) -> str:
        """``controller.quorum.voters``: every node, a static quorum."""
        return ",".join(f"{node}@127.0.0.1:{port}" for node, port in sorted(self.controller_ports.items()))


class KafkaBroker(ChildBroker):
    """An Apache Kafka 4 broker on ``127.0.0.1:port`` keeping its data under ``home``.

    On its own it is a one-node cluster; as a node of a :class:`KafkaCluster` it has the
    cluster's ``quorum`` and ``node_id``. A SIGTERM lets Kafka shut down cleanly (flush and
    close its logs): up to 30 s before SIGKILL.
    """

    engine = "kafka"
    durable = True
    stop_timeout = 30.0

    def __init__(
        self,
        port: int,
        home: Path,
        node_id: int = NODE_ID,
        properties: Mapping[str, str] | None = None,
        client: Settings | None = None,
    ) -> None:
        super().__init__(port)
        #: How start() reaches the broker to see it serve: a secured listener's admin settings
        #: (e.g. :func:`sasl_plain_properties`); None: plain text on ``port``.
        self.client = client
        # Absolute: the JVM runs in this directory, so a relative path (``make run`` keeps its
        # data in ``data/``) would name other files from there.
        self.home = home.absolute()
        self.node_id = node_id
        #: Broker properties that replace or add to :func:`server_properties` (e.g. for the bench);
        #: ``{controller_port}`` in a value becomes the port the controller listens on at this start.
        self.properties = dict(properties or {})
        self.records = self.home / "records"
        self.log_path = self.home / "broker.log"
        self.console_path = self.home / "console.log"
        self.controller_port: int | None = None
        #: Set by a KafkaCluster before each start; None: a one-node cluster of its own.
        self.quorum: Quorum | None = None

    def configuration(self, controller_port: int) -> dict[str, str]:
        """The broker's properties: :func:`server_properties` with ``properties`` over them."""
        if self.quorum is None:
            values = server_properties(self.port, controller_port, self.records, self.node_id)
        else:
            brokers = len(self.quorum.controller_ports)
            values = server_properties(
                self.port, controller_port, self.records, self.node_id, self.quorum.voters, brokers
            )
        extra = {
            key: value.replace("{controller_port}", str(controller_port)) for key, value in self.properties.items()
        }
        return {**values, **extra}

    @property
    def formatted(self) -> bool:
        return (self.records / "meta.properties").exists()

    @property
    def cluster_id(self) -> str | None:
        """The id of the cluster the log directory was formatted for (None before the first start)."""
        if not self.formatted:
            return None
        for line in (self.records / "meta.properties").read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "cluster.id":
                return value.strip()
        return None

    def start(self, timeout: float = 60.0) -> None:
        """Start the broker; returns once it answers metadata requests and has a group coordinator."""
        started = time.monotonic()
        self.launch(self.prepare())
        try:
            self.wait_listening(started + timeout)
            asyncio.run(_wait_serving(self.client or self.bootstrap, started + timeout))
        except BaseException:
            self.stop()
            raise

    def prepare(self) -> list[str]:
        """Write the configuration and format the log directory the first time; returns the JVM's command.

        Any thread may prepare; :meth:`launch` must run in a thread that outlives the
        broker (the kernel stops the child when the thread that started it ends).
        """
        if port_is_open(self.port):
            raise BrokerError(
                f"port {self.port} is already in use; stop what holds it or set "
                "BLACKROAD_EMBEDDED_BROKER_PORT (or BLACKROAD_KAFKA_BOOTSTRAP to use that broker)"
            )
        classes = class_path()
        java = java_executable()
        if java is None:
            raise BrokerError("no `java` found (Apache Kafka needs Java 17+)")
        self.home.mkdir(parents=True, exist_ok=True)
        if self.quorum is None:
            self.controller_port = free_port()
            while self.controller_port == self.port:
                self.controller_port = free_port()
        else:
            self.controller_port = self.quorum.controller_ports[self.node_id]
        config = self.home / "server.properties"
        write_properties(config, self.configuration(self.controller_port))
        log4j = self.home / "log4j2.properties"
        log4j.write_text(_LOG4J2.format(log=self.log_path))
        jvm = [java, *JVM_OPTIONS, f"-Dlog4j2.configurationFile={log4j}", "-cp", classes]
        if not self.formatted:
            self._format(jvm, config)
        return [*jvm, "kafka.Kafka", str(config)]

    def launch(self, command: list[str]) -> None:
        """Start the JVM ``prepare`` made ready (not waiting for it to serve)."""
        with self.console_path.open("ab") as console:
            self._process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                command,
                cwd=self.home,  # where a crashing JVM leaves its hs_err file
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl, fork-safe
                # Its own session: a terminal's Ctrl-C reaches the worker, which stops first;
                # the broker is stopped after it.
                start_new_session=True,
            )

    def wait_listening(self, deadline: float) -> None:
        """Wait until the broker's port accepts connections (then it may not serve yet)."""
        process = self._process
        if process is None:
            raise BrokerError("Apache Kafka was not started")
        while not port_is_open(self.port):
            if process.poll() is not None:
                raise BrokerError(f"Apache Kafka exited with code {process.returncode}{self._last_lines()}")
            if time.monotonic() > deadline:
                raise BrokerError(f"Apache Kafka not listening on {self.port} in time{self._last_lines()}")
            time.sleep(0.05)

    def _format(self, jvm: list[str], config: Path) -> None:
        """Format the log directory for a new cluster, or the node's share of its quorum's (done once)."""
        cluster_id = self.quorum.cluster_id if self.quorum is not None else new_cluster_id()
        command = [*jvm, "kafka.tools.StorageTool", "format", "--cluster-id", cluster_id, "--config", str(config)]
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


class KafkaCluster:
    """``size`` Kafka nodes on loopback forming one cluster, each both broker and controller.

    The quorum is static (``controller.quorum.voters`` names every node), so the controller
    ports may change between starts, as the single node's does. Each node keeps its data in
    ``home/node-<id>``, formatted the first time for the cluster's shared id (the formats
    run side by side: each is a JVM start). Internal topics get three copies, two in sync
    (:func:`server_properties`). The cluster serves once every node has registered and
    there is a group coordinator. Used by the tests of replication and broker failures;
    ``docker-compose.kafka.yml --profile cluster`` runs the same for users with Docker.
    """

    engine = "kafka"
    durable = True

    def __init__(self, home: Path, size: int = 3, ports: list[int] | None = None) -> None:
        if ports is None:
            ports = []
            while len(ports) < size:
                port = free_port()
                if port not in ports:
                    ports.append(port)
        self.home = home
        self.nodes = [KafkaBroker(port, home / f"node-{node}", node) for node, port in enumerate(ports, start=1)]

    @property
    def bootstrap(self) -> str:
        """Every node's address: a client then still reaches the cluster while one is down."""
        return ",".join(node.bootstrap for node in self.nodes)

    def node(self, node_id: int) -> KafkaBroker:
        return next(node for node in self.nodes if node.node_id == node_id)

    def start(self, timeout: float = 120.0) -> None:
        """Start every node; returns once all have registered and there is a group coordinator."""
        started = time.monotonic()
        taken = {node.port for node in self.nodes}
        controller_ports: dict[int, int] = {}
        for node in self.nodes:
            port = free_port()
            while port in taken:
                port = free_port()
            taken.add(port)
            controller_ports[node.node_id] = port
        known = [node.cluster_id for node in self.nodes if node.cluster_id is not None]
        quorum = Quorum(known[0] if known else new_cluster_id(), controller_ports)
        for node in self.nodes:
            node.quorum = quorum
        try:
            # Side by side: a first start formats each node's directory, a JVM start each.
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                commands = list(pool.map(KafkaBroker.prepare, self.nodes))
            # From this thread: a child is stopped by the kernel when the thread that started it ends.
            for node, command in zip(self.nodes, commands, strict=True):
                node.launch(command)
            for node in self.nodes:
                node.wait_listening(started + timeout)
            asyncio.run(_wait_serving(self.bootstrap, started + timeout, brokers=len(self.nodes)))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node at once (each SIGTERM, then SIGKILL after its ``stop_timeout``)."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for stopped in [pool.submit(node.stop) for node in self.nodes]:
                stopped.result()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
