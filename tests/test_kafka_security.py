"""Kafka security: SASL/SSL settings reach every client, and ACLs keep changelogs to the workers.

One Apache Kafka broker for the module, its port a SASL_PLAINTEXT listener (PLAIN) with the
authorizer on: ``admin`` is the super user, ``worker`` gets the workers' ACLs and
``ingest`` may only write the tasks topic (:mod:`streams.runtime.kafka_acls`).
"""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka.errors import TopicAuthorizationFailedError

from streams.engines import kafka_jars
from streams.engines.kafka import KafkaBroker, Keystore, sasl_plain_properties
from streams.runtime import kafka_clients
from streams.runtime.broker import free_port
from streams.runtime.kafka_acls import create_acls, producer_acls, worker_acls
from streams.runtime.settings import Settings, SettingsError
from tests.conftest import require_kafka
from tests.factories import record, task
from tests.harness import ROOT, Deployment, wait_until

PASSWORDS = {"admin": "admin-secret-4711", "worker": "worker-secret-0815", "ingest": "ingest-secret-2342"}
WRONG_PASSWORD = "not-the-password-9999"


def _security(bootstrap: str, user: str, password: str) -> dict[str, str]:
    return {
        "BLACKROAD_KAFKA_BOOTSTRAP": bootstrap,
        "BLACKROAD_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "BLACKROAD_KAFKA_SASL_MECHANISM": "PLAIN",
        "BLACKROAD_KAFKA_SASL_USERNAME": user,
        "BLACKROAD_KAFKA_SASL_PASSWORD": password,
    }


@dataclass(frozen=True)
class SecuredBroker:
    #: The SASL_PLAINTEXT listener.
    bootstrap: str
    #: The SASL_SSL listener, and the (self-signed) certificate its clients trust.
    ssl_bootstrap: str
    cafile: Path


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredBroker]:
    require_kafka()
    home = tmp_path_factory.mktemp("sasl-kafka")
    keystore, cafile = _self_signed(home)
    port = free_port()
    ssl_port = free_port()
    while ssl_port == port:
        ssl_port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    admin = Settings.from_env(_security(bootstrap, "admin", PASSWORDS["admin"]))
    broker = KafkaBroker(
        port,
        home,
        properties=sasl_plain_properties(port, PASSWORDS, "admin", ssl_port, keystore),
        client=admin,
    )
    broker.start()
    try:
        yield SecuredBroker(bootstrap, f"127.0.0.1:{ssl_port}", cafile)
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def sasl_broker(secured: SecuredBroker) -> str:
    return secured.bootstrap


def _self_signed(home: Path) -> tuple[Keystore, Path]:
    """A PKCS#12 keystore with a self-signed certificate for 127.0.0.1, and that certificate (PEM)."""
    java = kafka_jars.java_executable()
    assert java is not None
    keytool = str(Path(java).resolve().parent / "keytool")
    keystore = Keystore(home / "broker.p12", "keystore-secret-31337")
    common = ["-keystore", str(keystore.path), "-storepass", keystore.password, "-alias", "broker"]
    key = ["-keyalg", "RSA", "-keysize", "2048", "-validity", "2", "-storetype", "PKCS12"]
    key += ["-keypass", keystore.password]
    subprocess.run(
        [keytool, "-genkeypair", *common, *key, "-dname", "CN=127.0.0.1", "-ext", "SAN=IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    cafile = home / "ca.pem"
    subprocess.run(
        [keytool, "-exportcert", "-rfc", *common, "-file", str(cafile)], check=True, capture_output=True, timeout=60
    )
    return keystore, cafile


# --- settings ---------------------------------------------------------------------------


def test_security_settings_are_checked_at_start_naming_the_setting(tmp_path: Path) -> None:
    external = {"BLACKROAD_KAFKA_BOOTSTRAP": "kafka.example:9093"}
    missing = str(tmp_path / "missing.pem")
    cases = [
        ({"BLACKROAD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "BLACKROAD_KAFKA_SECURITY_PROTOCOL"),  # embedded broker
        ({**external, "BLACKROAD_KAFKA_SECURITY_PROTOCOL": "TLS"}, "BLACKROAD_KAFKA_SECURITY_PROTOCOL"),
        ({**external, "BLACKROAD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "BLACKROAD_KAFKA_SASL_USERNAME"),
        (
            {**external, "BLACKROAD_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "BLACKROAD_KAFKA_SASL_USERNAME": "w"},
            "BLACKROAD_KAFKA_SASL_PASSWORD",
        ),
        (
            {**_security("kafka.example:9093", "w", "p"), "BLACKROAD_KAFKA_SASL_MECHANISM": "GSSAPI"},
            "BLACKROAD_KAFKA_SASL_MECHANISM",
        ),
        ({**external, "BLACKROAD_KAFKA_SASL_USERNAME": "w"}, "BLACKROAD_KAFKA_SASL_USERNAME"),  # PLAINTEXT
        (
            {
                **external,
                "BLACKROAD_KAFKA_SECURITY_PROTOCOL": "SSL",
                "BLACKROAD_KAFKA_SSL_CAFILE": missing,
            },
            "BLACKROAD_KAFKA_SSL_CAFILE",
        ),
        ({**external, "BLACKROAD_KAFKA_SSL_CAFILE": __file__}, "BLACKROAD_KAFKA_SSL_CAFILE"),  # not an SSL protocol
        (
            {**external, "BLACKROAD_KAFKA_SECURITY_PROTOCOL": "SSL", "BLACKROAD_KAFKA_SSL_CERTFILE": __file__},
            "BLACKROAD_KAFKA_SSL_KEYFILE",
        ),
        (
            {**_security("kafka.example:9093", "w", "p"), "BLACKROAD_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "no")},
            "BLACKROAD_KAFKA_SASL_PASSWORD_FILE",
        ),
    ]
    for environ, setting in cases:
        with pytest.raises(SettingsError) as raised:
            Settings.from_env(environ)
        assert raised.value.setting == setting, (environ, str(raised.value))


def test_the_password_comes_from_a_file_and_never_shows_in_the_settings(tmp_path: Path) -> None:
    secret = tmp_path / "kafka-password"
    secret.write_text("from-the-file-1234\n")
    environ = _security("kafka.example:9093", "worker", "unused")
    del environ["BLACKROAD_KAFKA_SASL_PASSWORD"]
    settings = Settings.from_env({**environ, "BLACKROAD_KAFKA_SASL_PASSWORD_FILE": str(secret)})
    options = kafka_clients.client_options(settings)
    assert options["sasl_plain_password"] == "from-the-file-1234"
    assert options["security_protocol"] == "SASL_PLAINTEXT" and options["sasl_plain_username"] == "worker"
    inline = Settings.from_env(_security("kafka.example:9093", "worker", "inline-secret-5678"))
    assert "inline-secret-5678" not in repr(inline) and "inline-secret-5678" not in str(inline)
    assert "inline-secret-5678" not in repr(kafka_clients.faust_credentials(inline))
    # Plain text: only the bootstrap servers.
    assert kafka_clients.client_options(Settings()) == {
        "bootstrap_servers": "127.0.0.1:19092",
        "security_protocol": "PLAINTEXT",
    }


def test_every_kafka_client_is_made_by_the_one_factory() -> None:
    """No module but streams/runtime/kafka_clients.py constructs an aiokafka client or a Faust
    app without the security settings."""
    constructors = {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient", "AIOKafkaClient", "KafkaAdminClient"}
    offenders: list[str] = []
    apps: list[str] = []
    for path in sorted((ROOT / "streams").rglob("*.py")):
        if path.name == "kafka_clients.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in constructors:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if name in ("App", "BlackroadApp"):
                keywords = {keyword.arg for keyword in node.keywords}
                apps.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                assert "broker_credentials" in keywords, f"{apps[-1]} makes a Faust app without broker_credentials"
    assert offenders == [], f"Kafka clients made outside streams.runtime.kafka_clients: {offenders}"
    assert apps, "the Faust app's construction was not found"


# --- a real broker with SASL and ACLs --------------------------------------------------


def test_a_worker_with_sasl_credentials_and_its_acls_processes_tasks(sasl_broker: str, tmp_path: Path) -> None:
    deployment = Deployment(sasl_broker, tmp_path, partitions=2)
    deployment.env.update(_security(sasl_broker, "worker", PASSWORDS["worker"]))
    prefix = Settings.from_env(
        {
            **_security(sasl_broker, "admin", PASSWORDS["admin"]),
            "BLACKROAD_APP_ID": deployment.env["BLACKROAD_APP_ID"],
            "BLACKROAD_TOPIC_PREFIX": deployment.prefix,
        }
    )
    asyncio.run(create_acls(prefix, worker_acls(prefix, "worker") + producer_acls(prefix, "ingest")))
    try:
        worker = deployment.worker().start().wait_ready(90)
        # Through the HTTP ingress: the worker's own producer, as user worker.
        status, body = worker.post("/v1/tasks", {"agent_id": "agent_http_001", "kind": "tool_execution", "payload": {}})
        assert status in (200, 201, 202), body
        # A producer-only client, as user ingest: the tasks topic is its to write.
        ingest = Settings.from_env(
            {**_security(sasl_broker, "ingest", PASSWORDS["ingest"]), "BLACKROAD_TOPIC_PREFIX": deployment.prefix}
        )
        asyncio.run(_send(ingest, deployment.topic("tasks"), [record(task("agent_ingest_001")) for _ in range(5)]))

        def processed() -> bool:
            status, agent = worker.get("/v1/agents/agent_ingest_001")
            return status == 200 and agent["stats"]["tasks_completed"] == 5

        wait_until(processed, 60, what="the ingest user's tasks to be processed")
        wait_until(lambda: worker.get("/v1/agents/agent_http_001")[0] == 200, 30, what="the HTTP task to be processed")
        # `blackroad produce` as the producer-only user.
        before = worker.stats()["completed_tasks"]
        produced = subprocess.run(
            [sys.executable, "-m", "streams.cli", "produce", "--count", "40", "--rate", "0", "--agents", "8"],
            cwd=ROOT,
            env={**deployment.env, **_security(sasl_broker, "ingest", PASSWORDS["ingest"])},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert produced.returncode == 0, produced.stdout + produced.stderr
        assert PASSWORDS["ingest"] not in produced.stdout + produced.stderr
        wait_until(lambda: worker.stats()["completed_tasks"] >= before + 40, 60, what="the produced tasks to complete")
        # ...but a changelog row it forges is refused by the broker.
        changelog = f"{deployment.env['BLACKROAD_APP_ID']}-agents-changelog"
        with pytest.raises(TopicAuthorizationFailedError):
            asyncio.run(_send(ingest, changelog, [(b"agent_ingest_001", b'{"tasks_completed": 999999}')]))
    finally:
        deployment.close()


def test_a_worker_with_a_wrong_password_fails_at_start_in_one_clear_line(sasl_broker: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        **_security(sasl_broker, "worker", WRONG_PASSWORD),
        "BLACKROAD_DATA_DIR": str(tmp_path),
        "BLACKROAD_WEB_PORT": str(free_port()),
        "BLACKROAD_HISTORY": "off",
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli", "worker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert time.monotonic() - started < 30, output  # not the broker wait's timeout: the refusal is final
    assert WRONG_PASSWORD not in output
    errors = [line for line in result.stderr.splitlines() if line.startswith("blackroad:")]
    assert len(errors) == 1, output
    assert errors[0].startswith("blackroad: BLACKROAD_KAFKA_SASL_PASSWORD: the broker at"), errors
    assert "refused user 'worker'" in errors[0] and "authentication failed" in errors[0], errors


async def _send(target: Settings, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = kafka_clients.producer(target, acks="all", request_timeout_ms=10_000)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


def test_clients_and_a_worker_talk_sasl_ssl_with_the_ca_file(secured: SecuredBroker, tmp_path: Path) -> None:
    deployment = Deployment(secured.ssl_bootstrap, tmp_path, partitions=2)
    tls = {
        **_security(secured.ssl_bootstrap, "admin", PASSWORDS["admin"]),
        "BLACKROAD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "BLACKROAD_KAFKA_SSL_CAFILE": str(secured.cafile),
    }
    deployment.env.update(tls)
    try:
        worker = deployment.worker().start().wait_ready(90)
        status, body = worker.post("/v1/tasks", {"agent_id": "agent_tls_001", "kind": "tool_execution", "payload": {}})
        assert status in (200, 201, 202), body
        wait_until(lambda: worker.get("/v1/agents/agent_tls_001")[0] == 200, 30, what="the task sent over TLS")
    finally:
        deployment.close()
    # Without the CA file the broker's certificate is not trusted: one line naming the setting.
    untrusted = {key: value for key, value in tls.items() if key != "BLACKROAD_KAFKA_SSL_CAFILE"}
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli", "worker"],
        cwd=ROOT,
        env={**os.environ, **untrusted, "BLACKROAD_DATA_DIR": str(tmp_path / "untrusted"), "BLACKROAD_HISTORY": "off"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("blackroad:")]
    assert result.returncode == 2 and len(errors) == 1, result.stdout + result.stderr
    assert errors[0].startswith("blackroad: BLACKROAD_KAFKA_SSL_CAFILE: the TLS handshake"), errors


def test_no_password_reaches_the_debug_log(sasl_broker: str, caplog: pytest.LogCaptureFixture) -> None:
    """aiokafka logs every request at debug level, the SASL one (which holds the password) included."""
    settings = Settings.from_env(_security(sasl_broker, "worker", PASSWORDS["worker"]))

    async def connect() -> None:
        admin = kafka_clients.admin(settings)
        await admin.start()
        await admin.close()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(connect())
    assert "SaslAuthenticateRequest redacted" in caplog.text
    assert PASSWORDS["worker"] not in caplog.text


async def test_a_transactional_producer_asks_again_soon_while_its_last_transaction_closes() -> None:
    """aiokafka waits its BACKOFF_OVERRIDE (20 ms) when the broker answers CONCURRENT_TRANSACTIONS; the
    factory shortens it once a transactional producer is made (a plain producer leaves it alone)."""
    from aiokafka.producer import sender

    saved = sender.BACKOFF_OVERRIDE
    try:
        sender.BACKOFF_OVERRIDE = 0.02
        kafka_clients.producer("127.0.0.1:1", acks="all")
        assert sender.BACKOFF_OVERRIDE == 0.02
        kafka_clients.producer("127.0.0.1:1", transactional_id="blackroad-test-0")
        assert sender.BACKOFF_OVERRIDE == kafka_clients.TRANSACTION_BUSY_RETRY
    finally:
        sender.BACKOFF_OVERRIDE = saved
