"""State size and recovery: 30,000 agents with working memory, then SIGKILL and restart.

Usage: python benchmarks/recovery.py [--processes N] [--agents 30000] [--writes-per-agent 6] [--task-retention 5]
       [--engine tansu|kafka]

Starts a fresh embedded broker of ``--engine`` and ``blackroad worker`` (N processes), writes
``agents * writes-per-agent`` memory entries, reports each worker process's RSS, SIGKILLs
every worker process, starts them again and reports the time until every process serves
its web views again (tables recovered from the changelogs), and checks the recovered
counts and one agent's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas import wire  # noqa: E402
from streams.engines import choice  # noqa: E402
from streams.runtime import loadgen  # noqa: E402
from streams.runtime.broker import free_port  # noqa: E402
from streams.runtime.settings import Settings  # noqa: E402


def get(port: int, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return orjson.loads(response.read())
    except OSError:
        return None


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def rss_mb(pid: int) -> tuple[float, float]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values["VmRSS"], values["VmHWM"]


async def write_memory(bootstrap: str, topic: str, agents: int, per_agent: int) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=512 * 1024)
    await producer.start()
    rng = random.Random(3)  # noqa: S311 - a repeatable load, not secrets
    pending = []
    try:
        for i in range(agents * per_agent):
            agent = f"agent_mem_{i % agents:05d}"
            event = loadgen.make_task(agent, i, rng, "memory_operation")
            event.payload = {"op": "write", "content": f"note {i} " + "lorem ipsum dolor sit amet " * 4}
            pending.append(await producer.send(topic, wire.encode_task(event), key=agent.encode()))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return len(pending)


def wait_serving(ports: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(get(port, "/v1/stats") is None for port in ports):
        if time.monotonic() > deadline:
            raise TimeoutError("workers did not serve in time")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=0, help="worker processes (0 = one per core)")
    parser.add_argument("--agents", type=int, default=30_000)
    parser.add_argument("--writes-per-agent", type=int, default=6)
    parser.add_argument(
        "--task-retention", type=float, default=5, help="seconds finished tasks stay live (long: they count in RSS)"
    )
    parser.add_argument("--engine", choices=("tansu", "kafka"), default="tansu", help="the embedded broker")
    args = parser.parse_args()
    processes = args.processes or max(1, min(os.cpu_count() or 1, 4))
    web = free_port(processes)
    ports = [web + i for i in range(processes)]
    with tempfile.TemporaryDirectory(prefix="blackroad-recovery-") as tmp:
        # The broker as `blackroad up` configures it (not the bench's, which holds a new
        # group's first join for 3 s): the restart is timed as a user meets it.
        home = Path(tmp) / "broker"
        broker = choice.embedded_broker(Settings(embedded_broker_port=free_port(), data_dir=home), args.engine)
        broker.start()
        try:
            return measure(args, broker, Path(tmp), web, ports, processes)
        finally:
            broker.stop()


def measure(args: argparse.Namespace, broker: Any, tmp: Path, web: int, ports: list[int], processes: int) -> int:
    """Fill the tables, note RSS, SIGKILL every worker process, time the restart, check the counts."""
    env = {
        **os.environ,
        "BLACKROAD_EMBEDDED_BROKER_PORT": str(broker.port),
        "BLACKROAD_ENGINE": broker.engine,
        "BLACKROAD_WEB_PORT": str(web),
        "BLACKROAD_DATA_DIR": str(tmp / "data"),
        "BLACKROAD_WORKER_PROCESSES": str(processes),
        "BLACKROAD_TASK_RETENTION": f"{args.task_retention:g}",
        # The tables' state and recovery alone; the history has its own benchmark.
        "BLACKROAD_HISTORY": "off",
    }
    command = [sys.executable, "-m", "streams.cli", "worker"]
    worker = subprocess.Popen(command, cwd=ROOT, env=env)  # noqa: S603
    try:
        wait_serving(ports, 120)
        started = time.monotonic()
        sent = asyncio.run(write_memory(broker.bootstrap, "blackroad.tasks", args.agents, args.writes_per_agent))
        while (get(web, "/v1/stats") or {}).get("completed_tasks", 0) < sent:
            time.sleep(0.2)
        print(f"{sent:,} memory writes over {args.agents:,} agents done in {time.monotonic() - started:.1f} s")
        if args.task_retention < 60:
            time.sleep(args.task_retention + 3)  # past the retention: finished tasks leave the live table
        pids = children(worker.pid) if processes > 1 else [worker.pid]
        for pid in pids:
            rss, peak = rss_mb(pid)
            print(f"worker process {pid}: RSS {rss:.0f} MB, peak {peak:.0f} MB")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        worker.kill()
        worker.wait()
        started = time.monotonic()
        worker = subprocess.Popen(command, cwd=ROOT, env=env)  # noqa: S603
        wait_serving(ports, 300)
        print(f"SIGKILL + restart to every process serving again: {time.monotonic() - started:.1f} s")
        stats = get(web, "/v1/stats")
        memory = get(web, "/v1/agents/agent_mem_00007/memory")
        print(
            f"after recovery: completed {stats['completed_tasks']:,} of {sent:,}; agent_mem_00007: "
            f"{memory['written']} memory writes, {len(memory['entries'])} entries in working memory"
        )
        exact = stats["completed_tasks"] == sent and memory["written"] == args.writes_per_agent
        return 0 if exact else 1
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
