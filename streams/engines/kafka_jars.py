"""The Apache Kafka engine's jars: provisioned by Maven from the project's own pom.

``engines/kafka/pom.xml`` pins the broker (``org.apache.kafka:kafka_2.13``) and the log
binding it needs. Maven resolves them into its local repository (``~/.m2``, with its
own cache and checksum checks) and writes their class path to ``build/kafka/``, once,
and again only when the pom changes (its digest is kept beside the class path).
``make`` runs this before ``run`` and ``test``; without Java 17+ or Maven it says so in
one line and the project falls back to Tansu (see :mod:`streams.engines`).

    python -m streams.engines.kafka_jars provision   # resolve (when the pom changed)
    python -m streams.engines.kafka_jars status      # whether the engine can start, and why not
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from streams.runtime.broker import BrokerError

ROOT = Path(__file__).resolve().parents[2]
POM = ROOT / "engines" / "kafka" / "pom.xml"
BUILD_DIR = ROOT / "build" / "kafka"
CLASSPATH_FILE = BUILD_DIR / "classpath.txt"
#: The sha256 of the pom the class path was resolved from.
DIGEST_FILE = BUILD_DIR / "pom.sha256"
#: Kafka 4 brokers need Java 17.
MIN_JAVA = 17
_JAVA_VERSION = re.compile(r'version "(\d+)(?:\.(\d+))?')


class KafkaUnavailable(BrokerError):
    """The Apache Kafka engine cannot start here (no Java 17+, or its jars are not provisioned)."""


def java_executable() -> str | None:
    """``$JAVA_HOME/bin/java`` when JAVA_HOME is set (as Kafka's own scripts do), else ``java`` on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home and os.access(Path(home) / "bin" / "java", os.X_OK):
        return str(Path(home) / "bin" / "java")
    return shutil.which("java")


def java_major(java: str) -> int | None:
    """The major version of ``java`` (8 for "1.8.0_x"), or None when it cannot tell."""
    try:
        result = subprocess.run(  # noqa: S603 - the JVM found above, fixed arguments
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = _JAVA_VERSION.search(result.stderr + result.stdout)
    if found is None:
        return None
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major


def pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def class_path() -> str:
    """The broker's class path; raises :class:`KafkaUnavailable` saying why it cannot be used."""
    hint = "run `make install` (or `python -m streams.engines.kafka_jars provision`)"
    if not CLASSPATH_FILE.exists() or not DIGEST_FILE.exists():
        raise KafkaUnavailable(f"the Apache Kafka jars are not provisioned; {hint}")
    if DIGEST_FILE.read_text().strip() != pom_digest():
        raise KafkaUnavailable(f"{POM.relative_to(ROOT)} changed since its jars were provisioned; {hint}")
    entries = CLASSPATH_FILE.read_text().strip().split(os.pathsep)
    # A cleaned Maven repository leaves a class path naming jars that are gone.
    missing = [entry for entry in entries if not Path(entry).is_file()]
    if not entries or missing:
        raise KafkaUnavailable(f"{len(missing)} jar(s) of the class path are missing, e.g. {missing[:1]}; {hint}")
    return os.pathsep.join(entries)


def unavailable() -> str | None:
    """Why the Apache Kafka engine cannot start on this machine, or None when it can."""
    java = java_executable()
    if java is None:
        return "no `java` found (Apache Kafka needs Java 17+)"
    major = java_major(java)
    if major is None or major < MIN_JAVA:
        return f"{java} is Java {major or 'of an unknown version'}; Apache Kafka needs Java {MIN_JAVA}+"
    try:
        class_path()
    except KafkaUnavailable as exc:
        return str(exc)
    return None


def provision() -> bool:
    """Resolve the jars if the pom changed since the last time; False when Java or Maven is missing."""
    java, mvn = java_executable(), shutil.which("mvn")
    major = java_major(java) if java else None
    if mvn is None or major is None or major < MIN_JAVA:
        missing = "Maven (mvn)" if mvn is None else f"Java {MIN_JAVA}+"
        print(f"no {missing}: skipping the Apache Kafka engine; the embedded broker will be Tansu (in memory only)")
        return False
    try:
        class_path()
        return True  # already provisioned from this pom
    except KafkaUnavailable:
        pass
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    digest = pom_digest()
    written = CLASSPATH_FILE.with_suffix(".tmp")
    command = [
        mvn,
        "--batch-mode",
        "--quiet",
        "--file",
        str(POM),
        "dependency:build-classpath",
        "-Dmdep.includeScope=runtime",
        f"-Dmdep.outputFile={written}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603 - fixed argv
    if result.returncode != 0 or not written.exists():
        output = (result.stdout + result.stderr).strip().splitlines()
        raise KafkaUnavailable("Maven could not resolve the Apache Kafka jars:\n" + "\n".join(output[-30:]))
    written.replace(CLASSPATH_FILE)
    DIGEST_FILE.write_text(digest + "\n")
    count = len(CLASSPATH_FILE.read_text().strip().split(os.pathsep))
    print(f"Apache Kafka engine provisioned: {count} jars, class path in {CLASSPATH_FILE.relative_to(ROOT)}")
    return True


def main(argv: list[str]) -> int:
    if argv == ["provision"]:
        try:
            provision()
        except KafkaUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if argv == ["status"]:
        reason = unavailable()
        print("the Apache Kafka engine can start here" if reason is None else f"it cannot start here: {reason}")
        return 0 if reason is None else 1
    print("usage: python -m streams.engines.kafka_jars {provision|status}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
