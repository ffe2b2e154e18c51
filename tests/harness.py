"""Real processes for the tests: the embedded broker and `blackroad worker` subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.runtime.broker import free_port

ROOT = Path(__file__).resolve().parents[1]


def wait_until(
    predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


class Deployment:
    """One isolated app (own topic prefix and group) on the shared broker.

    ``broker`` is the port of an embedded broker on 127.0.0.1, or the bootstrap servers of
    a cluster (``"host:port,host:port"``), which the workers then reach as an external one
    (``BLACKROAD_KAFKA_BOOTSTRAP``).
    """

    def __init__(self, broker: int | str, tmp: Path, partitions: int = 4, **settings: str) -> None:
        tag = uuid.uuid4().hex[:8]
        if isinstance(broker, int):
            self.bootstrap = f"127.0.0.1:{broker}"
            where = {"BLACKROAD_EMBEDDED_BROKER_PORT": str(broker)}
        else:
            self.bootstrap = broker
            where = {"BLACKROAD_KAFKA_BOOTSTRAP": broker}
        self.prefix = f"t{tag}"
        self.tmp = tmp
        self.partitions = partitions
        self.env = {
            **os.environ,
            **where,
            "BLACKROAD_APP_ID": f"app{tag}",
            "BLACKROAD_TOPIC_PREFIX": self.prefix,
            "BLACKROAD_PARTITIONS": str(partitions),
            "BLACKROAD_DATA_DIR": str(tmp / "data"),
            "BLACKROAD_LOG_LEVEL": "info",
            "BLACKROAD_WORKER_PROCESSES": "1",
            # The history (PostgreSQL) has tests of its own (tests/test_history.py), which turn it on.
            "BLACKROAD_HISTORY": "off",
            # Retries after a few milliseconds, not DOMAIN.md's 20 s (tests/test_retries.py times them).
            "BLACKROAD_RETRY_BACKOFF": "0.005",
            **{f"BLACKROAD_{k.upper()}": v for k, v in settings.items()},
        }
        self.workers: list[Worker] = []

    def topic(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def worker(self, processes: int = 1, command: str = "worker", readers: int = 0) -> Worker:
        """A ``blackroad worker``; with ``processes`` > 1, a supervisor of that many worker processes.

        ``command="up"`` runs ``blackroad up`` instead (with its own embedded broker if none listens).
        ``readers`` read replicas run beside them, on the web ports after the workers'.
        """
        port = free_port(processes + readers)
        worker = Worker(self, port, self.tmp / f"{command}-{len(self.workers)}.log", processes, command)
        worker.readers = readers
        self.workers.append(worker)
        return worker

    def history_sink(self) -> Worker:
        """A ``blackroad history`` process (not started): the sink into PostgreSQL."""
        sink = Worker(self, free_port(), self.tmp / f"history-{len(self.workers)}.log", 1, "history")
        self.workers.append(sink)
        return sink

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()


class Web:
    """Requests to one web port of the worker processes."""

    def __init__(self, port: int) -> None:
        self.port = port
        #: Sent as ``Authorization: Bearer`` with every request (for workers with API tokens).
        self.token: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        status, decoded, _ = self.exchange(method, path, body)
        return status, decoded

    def exchange(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        """One request: status (0 if no answer), decoded body and response headers."""
        if body is not None and not isinstance(body, bytes):
            body = orjson.dumps(body)
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", "application/json")
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
                status = response.status
                headers = dict(response.headers)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            status = exc.code
            headers = dict(exc.headers)
        except OSError:
            return 0, None, {}
        try:
            return status, orjson.loads(raw), headers
        except orjson.JSONDecodeError:
            return status, raw.decode(errors="replace"), headers

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        return self.request("POST", path, raw)

    def stats(self, recovering_for: float = 15.0) -> dict[str, Any]:
        """``GET /v1/stats``; a worker recovering its tables after a rebalance (503) is asked again for a while."""
        deadline = time.monotonic() + recovering_for
        status, body = self.get("/v1/stats")
        while status == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
            status, body = self.get("/v1/stats")
        assert status == 200, body
        return body  # type: ignore[no-any-return]


class Worker(Web):
    def __init__(
        self, deployment: Deployment, port: int, log_path: Path, processes: int = 1, command: str = "worker"
    ) -> None:
        super().__init__(port)
        self.deployment = deployment
        self.log_path = log_path
        self.processes = processes
        self.command = command
        self.readers = 0
        self.process: subprocess.Popen[bytes] | None = None

    def at(self, port: int) -> Worker:
        """A handle on another web port of the same worker processes (for requests only)."""
        other = Worker(self.deployment, port, self.log_path, self.processes, self.command)
        other.process = self.process
        other.token = self.token
        return other

    def children(self) -> list[int]:
        """Pids of the worker processes a supervisor runs."""
        assert self.process is not None
        pid = self.process.pid
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    def start(self, stdin: int | None = None) -> Worker:
        """Start the processes (``stdin``: a file descriptor for their standard input)."""
        env = {
            **self.deployment.env,
            "BLACKROAD_WEB_PORT": str(self.port),
            "BLACKROAD_WORKER_PROCESSES": str(self.processes),
            "BLACKROAD_READERS": str(self.readers),
        }
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", self.command], cwd=ROOT, env=env, stdin=stdin, stdout=log, stderr=log
        )
        return self

    def wait_ready(self, timeout: float = 60.0) -> Worker:
        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}; log:\n{self.log()}")
            status, _ = self.get("/v1/stats")
            return status == 200

        wait_until(ready, timeout, what=f"worker on {self.port} to serve")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def exited_within(self, seconds: float) -> int | None:
        """The exit code if the process ends within ``seconds``, else None (left running)."""
        assert self.process is not None
        try:
            return self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def produce(
    bootstrap: str,
    topic: str,
    records: list[tuple[bytes | None, bytes]],
    headers: list[tuple[str, bytes]] | None = None,
) -> None:
    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=256 * 1024)
        await producer.start()
        try:
            futures = [await producer.send(topic, value, key=key, headers=headers) for key, value in records]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(run())


def consume_all(bootstrap: str, topic: str, partitions: int, expect: int, timeout: float = 30.0) -> list[Any]:
    """Read a topic from the beginning until ``expect`` records arrived."""

    async def run() -> list[Any]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            records: list[Any] = []
            deadline = time.monotonic() + timeout
            while len(records) < expect and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=200)
                for recs in batch.values():
                    records.extend(recs)
            return records
        finally:
            await consumer.stop()

    return asyncio.run(run())


class Up:
    """``blackroad up`` as a user runs it: its own broker and worker, in a session of its own."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.web = Web(int(env["BLACKROAD_WEB_PORT"]))

    def start(self) -> Up:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "up"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        return self

    def wait_serving(self, timeout: float = 90.0) -> float:
        """Seconds from now until the web views answer (tables recovered)."""
        started = time.monotonic()

        def serving() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"blackroad up exited with {self.process.returncode}; log:\n{self.log()}")
            return self.web.get("/v1/stats")[0] == 200

        wait_until(serving, timeout, 0.05, what="blackroad up to serve")
        return time.monotonic() - started

    def broker_pid(self) -> int:
        """The embedded broker: the child of ``up`` running ``kafka.Kafka``."""
        assert self.process is not None
        pid = self.process.pid
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            if b"kafka.Kafka" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
        raise AssertionError("no kafka.Kafka child of blackroad up")

    def interrupt(self, timeout: float = 60.0) -> int:
        """Ctrl-C: SIGINT to ``up``, which stops its worker, then its broker. Returns its exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=timeout)

    def kill_everything(self) -> None:
        """SIGKILL ``up``'s process group and the broker's (its own session), both at once."""
        assert self.process is not None
        broker = self.broker_pid()
        os.killpg(broker, signal.SIGKILL)
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]
