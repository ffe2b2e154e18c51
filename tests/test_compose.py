"""The compose files run the Kafka the tests run: the pom's version, the engine's settings.

Read without a YAML library: the files use only block maps and lists of plain or quoted
scalars, one per line, which :func:`services` reads by indentation.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streams.engines.kafka import server_properties
from tests.harness import ROOT

SINGLE = ROOT / "docker-compose.kafka.yml"
CLUSTER = ROOT / "docker-compose.kafka-cluster.yml"
#: Settings of the engine that name this machine's ports, paths or listeners, which the
#: containers name their own way; every other setting must be the same in the compose files.
LOCAL = {
    "node.id",
    "controller.quorum.voters",
    "listeners",
    "advertised.listeners",
    "listener.security.protocol.map",
    "controller.listener.names",
    "inter.broker.listener.name",
    "log.dirs",
}


def _scalar(text: str) -> str:
    text = text.split(" #", 1)[0].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def services(path: Path) -> dict[str, dict[str, object]]:
    """Each service's keys: a scalar as its text, a map as a dict, a list as a list of texts."""
    found: dict[str, dict[str, object]] = {}
    section = service = key = None
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        body = line.strip()
        if indent == 0:
            section = body.rstrip(":")
            continue
        if section != "services":
            continue
        if indent == 2:
            service = body.rstrip(":")
            found[service] = {}
        elif indent == 4:
            assert service is not None
            key, _, value = body.partition(":")
            found[service][key] = _scalar(value) if value.strip() else None
        else:
            assert service is not None and key is not None, line
            current = found[service][key]
            if body.startswith("- "):
                items = current if isinstance(current, list) else []
                items.append(_scalar(body[2:]))
                found[service][key] = items
            else:
                entries = current if isinstance(current, dict) else {}
                name, _, value = body.partition(":")
                entries[name.strip()] = _scalar(value)
                found[service][key] = entries
    return found


def top_level_names(path: Path, section: str) -> list[str]:
    names: list[str] = []
    inside = False
    for line in path.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            inside = line.rstrip(":") == section
        elif inside and re.match(r"^  \S", line):
            names.append(line.strip().rstrip(":"))
    return names


def pom_kafka_version() -> str:
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", (ROOT / "engines/kafka/pom.xml").read_text())
    assert found is not None
    return found.group(1)


def kafka_services(path: Path) -> dict[str, dict[str, object]]:
    return {name: spec for name, spec in services(path).items() if str(spec["image"]).startswith("apache/kafka:")}


def environment(spec: dict[str, object]) -> dict[str, str]:
    env = spec["environment"]
    assert isinstance(env, dict)
    return env


def as_env(key: str) -> str:
    return "KAFKA_" + key.upper().replace(".", "_")


def test_the_reader_reads_what_the_files_hold() -> None:
    single = services(SINGLE)
    assert set(single) == {"kafka", "postgres"}
    assert single["kafka"]["ports"] == ["127.0.0.1:9092:9092"]
    assert environment(single["kafka"])["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert top_level_names(SINGLE, "volumes") == ["kafka-data", "postgres-data"]


def test_compose_runs_the_postgresql_major_version_of_the_embedded_server() -> None:
    import re
    import subprocess

    from streams.history.embedded import binaries

    version = subprocess.run(
        [str(binaries() / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"PostgreSQL\) (\d+)\.", version)
    assert match is not None, version
    postgres = services(SINGLE)["postgres"]
    assert postgres["image"] == f"postgres:{match.group(1)}"
    assert postgres["ports"] == ["127.0.0.1:5432:5432"]


@pytest.mark.parametrize(("path", "nodes"), [(SINGLE, 1), (CLUSTER, 3)])
def test_compose_runs_the_kafka_version_and_settings_of_the_engine(path: Path, nodes: int) -> None:
    kafkas = kafka_services(path)
    assert len(kafkas) == nodes
    expected = {
        key: value
        for key, value in server_properties(9092, 9093, Path("records"), brokers=nodes).items()
        if key not in LOCAL
    }
    volumes = top_level_names(path, "volumes")
    voters: set[str] = set()
    for name, spec in kafkas.items():
        assert spec["image"] == f"apache/kafka:{pom_kafka_version()}", name
        env = environment(spec)
        assert {key: env.get(as_env(key)) for key in expected} == expected, name
        voters.add(env["KAFKA_CONTROLLER_QUORUM_VOTERS"])
        # Containers on the compose network reach the broker by its service name; the host
        # on loopback, on the port published there.
        (published,) = spec["ports"]  # type: ignore[misc]
        host_port = published.rsplit(":", 1)[1]
        assert published == f"127.0.0.1:{host_port}:{host_port}", name
        advertised = env["KAFKA_ADVERTISED_LISTENERS"].split(",")
        assert advertised == [f"INTERNAL://{name}:29092", f"HOST://127.0.0.1:{host_port}"], name
        assert env["KAFKA_LISTENERS"] == f"INTERNAL://:29092,HOST://:{host_port},CONTROLLER://:9093", name
        assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] == "INTERNAL", name
        # Records kept in a named volume of their own.
        (mount,) = spec["volumes"]  # type: ignore[misc]
        volume, _, target = mount.partition(":")
        assert target == env["KAFKA_LOG_DIRS"] and volume in volumes, name
    # One static quorum of every node, one cluster id, distinct node ids and volumes.
    ids = sorted(int(environment(spec)["KAFKA_NODE_ID"]) for spec in kafkas.values())
    assert ids == list(range(1, nodes + 1))
    assert voters == {",".join(f"{node}@{name}:9093" for node, name in zip(ids, sorted(kafkas), strict=True))}
    assert len({environment(spec)["CLUSTER_ID"] for spec in kafkas.values()}) == 1
    assert len({str(spec["volumes"]) for spec in kafkas.values()}) == nodes
