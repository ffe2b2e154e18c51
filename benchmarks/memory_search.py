"""Memory search against its bars, on this machine.

Usage:
  python benchmarks/memory_search.py stream [--engine kafka] [--count 200000] [--agents 1000] [--processes 1]
                                           [--reads 0.0] [--pack 1]
  python benchmarks/memory_search.py search [--engine kafka] [--count 1000000] [--agents 30000] [--rate 500]
  python benchmarks/memory_search.py recall [--count 1000000] [--workers 2]

* ``stream``: a backlog of ``memory_operation`` writes, each a distinct generated sentence
  (benchmarks/memory_corpus.py), through the worker with memory search on and then off:
  tasks/s is entries embedded and indexed per second: from the first completion (read from
  the tasks changelog, as ``make bench`` does) to the last completion or, if later, the
  moment the workers' indexes hold every entry (``GET /v1/memory/stats``, polled).
  ``--reads``: that share of the operations recall the agent's last 10 entries instead
  (the seed's "memory ops" count writes and reads). ``--pack N``: the operations travel as
  ``task.batch`` events of N per partition, as ``blackroad produce --pack`` sends tasks.
* ``search``: ``--count`` entries over ``--agents`` agents written through two worker
  processes, then a load of ``--rate`` tasks/s (the demo mix) while one client searches
  over HTTP, one request at a time, without and with an agent filter: P50/P95/P99, and
  each worker's RSS and index size (``GET /v1/memory/stats``).
* ``recall``: in one process, the index over one worker's share of ``--count`` entries
  (``--workers`` share them) against exact float32 search: recall@10 and latency.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaProducer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bench  # noqa: E402
from benchmarks.memory_corpus import sentences  # noqa: E402
from schemas import wire  # noqa: E402
from schemas.wire import TaskEvent  # noqa: E402
from streams.memory_search.embedding import WordLlamaEmbedder  # noqa: E402
from streams.memory_search.index import VectorIndex  # noqa: E402
from streams.runtime import loadgen  # noqa: E402
from streams.runtime.broker import create_topic  # noqa: E402

TASK_RETENTION = 30


def is_read(number: int, reads: float) -> bool:
    """Whether operation ``number`` of a stream with ``reads`` of them reads (spread evenly)."""
    return int((number + 1) * reads) > int(number * reads)


def note(agents: list[str], number: int, texts: list[str], reads: float = 0.0) -> TaskEvent:
    agent = agents[number % len(agents)]
    # Unique text per entry: the embedding cache must not make the stream look faster.
    content = f"{texts[number % len(texts)]} (entry {number} of {agent})"
    payload: dict[str, Any] = {"op": "write", "content": content, "memory_type": "observation"}
    if is_read(number, reads):
        payload = {"op": "recall", "limit": 10}
    return TaskEvent(
        task_id=f"task_m{number:09d}",
        agent_id=agent,
        kind="memory_operation",
        priority="normal",
        title="note",
        description="",
        payload=payload,
        created_ms=wire.now_ms(),
    )


async def produce_notes(bootstrap: str, count: int, agents: int, reads: float = 0.0, pack: int = 1) -> None:
    """Send the operations, one ``task.created`` each, or ``task.batch`` events of ``pack`` per partition."""
    names = loadgen.agent_ids(agents)
    texts = sentences(min(count, 200_000), seed=11)
    await create_topic(bootstrap, bench.TOPIC, bench.PARTITIONS, None, 1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=512 * 1024, acks=1)
    await producer.start()
    try:
        pending = []
        packs: dict[int, list[TaskEvent]] = {}
        for number in range(count):
            event = note(names, number, texts, reads)
            if pack > 1:
                pending.extend(await loadgen.add_to_pack(producer, bench.TOPIC, packs, event, pack, bench.PARTITIONS))
            else:
                pending.append(await producer.send(bench.TOPIC, wire.encode_task(event), key=event.agent_id.encode()))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        pending.extend(await loadgen.send_packs(producer, bench.TOPIC, packs))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


def get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return json.loads(response.read())


_connections: dict[int, http.client.HTTPConnection] = {}


def post(port: int, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POST over a kept-open connection (as a client that searches often would)."""
    connection = _connections.get(port)
    if connection is None:
        connection = _connections[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)

    def at(share: float) -> float:
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    return f"P50 {at(0.5):.2f} / P95 {at(0.95):.2f} / P99 {at(0.99):.2f} ms over {len(ordered)}"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker_pids(process: Any, processes: int) -> list[int]:
    if processes == 1:
        return [process.pid]
    return [int(c) for c in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]


def wait_indexed(port: int, count: int, timeout: float = 300.0) -> tuple[float, Any]:
    """When (wall clock) the workers' indexes first held ``count`` entries, and their stats then."""
    deadline = time.monotonic() + timeout
    while True:
        stats = get(port, "/v1/memory/stats")
        if sum(stats["entries"].values()) >= count:
            return time.time(), stats
        if time.monotonic() > deadline:
            raise TimeoutError(f"the indexes hold {sum(stats['entries'].values()):,} of {count:,} entries")
        time.sleep(0.05)


def stream(engine: str, count: int, agents: int, processes: int, reads: float, pack: int, tmp: Path) -> None:
    writes = sum(1 for number in range(count) if not is_read(number, reads))
    for search in ("on", "off"):
        workdir = tmp / f"stream-{search}"
        workdir.mkdir()
        with bench.running_broker(engine, workdir) as broker:
            asyncio.run(produce_notes(broker.bootstrap, count, agents, reads, pack))
            system = bench.Project(processes=processes, env={"BLACKROAD_MEMORY_SEARCH": search})
            process = system.start(broker, count, workdir)
            try:
                system.wait_first(process, 120)
                system.wait_done(process, 900)
                indexed_at, stats = wait_indexed(system.web_port, writes) if search == "on" else (0.0, None)
                _, first, last = system.completion_span(broker)
                last = max(last, indexed_at)
            finally:
                bench._stop(process)  # noqa: SLF001 - the bench's own helper
        rate = count / max(1e-6, last - first)
        extra = f"; {stats['embedded']:,} embedded, {stats['embedding_cache_hits']:,} from the cache" if stats else ""
        what = f"{writes:,} memory writes" + (f" and {count - writes:,} recalls" if writes < count else "")
        what += f" in task.batch events of {pack}" if pack > 1 else ""
        print(
            f"stream, memory search {search}, {processes} process(es): {what} over {agents:,} agents"
            f" in {last - first:.2f}s: {rate:,.0f} operations/s{extra}",
            flush=True,
        )


def search_load(engine: str, count: int, agents: int, rate: float, queries: int, tmp: Path) -> None:
    processes = 2
    workdir = tmp / "search"
    workdir.mkdir()
    with bench.running_broker(engine, workdir) as broker:
        started = time.monotonic()
        asyncio.run(produce_notes(broker.bootstrap, count, agents))
        print(f"produced {count:,} notes in {time.monotonic() - started:.1f}s", flush=True)
        # A 64-token working memory: most of each agent's notes are episodic by the end.
        # Finished tasks leave the live table after 30 s, so RSS is the memory's, not theirs.
        env = {"BLACKROAD_WORKING_MEMORY_TOKENS": "64", "BLACKROAD_TASK_RETENTION": str(TASK_RETENTION)}
        system = bench.Project(processes=processes, env=env)
        process = system.start(broker, count, workdir)
        try:
            system.wait_first(process, 120)
            done = system.wait_done(process, 1800)
            print(f"written and indexed in {done['last'] - done['first']:.1f}s", flush=True)
            port = system.web_port
            while not (memory := get(port, "/v1/memory/stats"))["ready"]:
                time.sleep(0.5)
            rng = random.Random(5)  # noqa: S311 - load, not secrets
            texts = sentences(queries, seed=99)
            names = loadgen.agent_ids(agents)
            load = _background_load(broker.bootstrap, agents, rate) if rate > 0 else None  # 0: no load
            time.sleep(TASK_RETENTION + 5.0)  # the backlog's finished tasks swept
            unfiltered, filtered = [], []
            for number in range(queries):
                body = {"query": texts[number], "limit": 10}
                begin = time.perf_counter()
                status, answer = post(port + number % processes, "/v1/memory/search", body)
                unfiltered.append((time.perf_counter() - begin) * 1000)
                assert status == 200, answer
                body["filters"] = {"agent_id": rng.choice(names)}
                begin = time.perf_counter()
                status, answer = post(port + number % processes, "/v1/memory/search", body)
                filtered.append((time.perf_counter() - begin) * 1000)
                assert status == 200, answer
            memory = get(port, "/v1/memory/stats")
            rss = [rss_mb(pid) for pid in worker_pids(process, processes)]
            recovered = _kill_and_time_recovery(process, port + 1)
            if load is not None:
                load.cancel()
        finally:
            bench._stop(process)  # noqa: SLF001
    where = f"{memory['total']:,} entries {memory['entries']} on {processes} workers"
    print(f"search over {where}, {rate:g} tasks/s meanwhile:")
    print(f"  without a filter: {percentiles(unfiltered)}")
    print(f"  with an agent filter: {percentiles(filtered)}")
    per_worker = [w["index_bytes"] / 1e6 for w in memory["workers"].values()]
    print(
        f"  one worker SIGKILLed: its web views back after {recovered[0]:.1f}s, its partitions indexed and"
        f" searched again after {recovered[1]:.1f}s"
    )
    arrays = ", ".join(f"{b:.0f} MB" for b in per_worker)
    print(f"  RSS per worker: {', '.join(f'{r:.0f} MB' for r in rss)}; index arrays {arrays}")


def _kill_and_time_recovery(process: Any, port: int) -> tuple[float, float]:
    """SIGKILL the second worker process (its supervisor starts it again); seconds until it
    serves its web views again, and until it answers searches (its partitions indexed)."""
    victim = worker_pids(process, 2)[1]
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    serving = searching = None
    while searching is None and time.monotonic() - killed < 600:
        time.sleep(0.2)
        try:
            if serving is None:
                get(port, "/v1/stats")
                serving = time.monotonic() - killed
            _connections.pop(port, None)
            status, _ = post(port, "/v1/memory/search", {"query": "the quarterly report", "limit": 10})
            if status == 200:
                searching = time.monotonic() - killed
        except (OSError, urllib.error.HTTPError, http.client.HTTPException):
            continue
    return serving or -1.0, searching or -1.0


class _Load:
    """A throttled load of the demo mix in a process of its own (stopped at the end).

    Not a thread of this process, so that the measuring client shares no GIL with the
    load (measured on 2026-12-05: the latencies came out the same either way).
    """

    def __init__(self, bootstrap: str, agents: int, rate: float) -> None:
        import multiprocessing

        self._process = multiprocessing.get_context("spawn").Process(
            target=_run_load, args=(bootstrap, agents, rate), name="search-load", daemon=True
        )
        self._process.start()

    def cancel(self) -> None:
        self._process.terminate()
        self._process.join(10)


def _run_load(bootstrap: str, agents: int, rate: float) -> None:
    coroutine = loadgen.produce(bootstrap, bench.TOPIC, agents, rate, 0, seed=3, partitions=bench.PARTITIONS)
    asyncio.run(coroutine)


def _background_load(bootstrap: str, agents: int, rate: float) -> _Load:
    return _Load(bootstrap, agents, rate)


def recall(count: int, workers: int, queries: int) -> None:
    model = WordLlamaEmbedder()
    share = count // workers
    texts = sentences(min(share, 200_000), seed=11)
    started = time.perf_counter()
    vectors = model.embed([f"{texts[i % len(texts)]} (entry {i})" for i in range(share)])
    print(f"embedded {share:,} entries in {time.perf_counter() - started:.1f}s", flush=True)
    index = VectorIndex(model.dimensions)
    started = time.perf_counter()
    for start in range(0, share, 50_000):
        end = min(share, start + 50_000)
        index.add(
            [f"e{i}" for i in range(start, end)],
            [f"agent_{i % 15_000}" for i in range(start, end)],
            ["observation"] * (end - start),
            ["episodic"] * (end - start),
            [0] * (end - start),
            vectors[start:end],
        )
    print(f"indexed in {time.perf_counter() - started:.1f}s: {index.nbytes / 1e6:.0f} MB of arrays", flush=True)
    query_vectors = model.embed(sentences(queries, seed=99))
    found, times, exact_times = 0, [], []
    for query in query_vectors:
        begin = time.perf_counter()
        hits = index.search(query, 10, -1.0)
        times.append((time.perf_counter() - begin) * 1000)
        begin = time.perf_counter()
        scores = vectors @ query
        best = np.argpartition(-scores, 10)[:10]
        exact_times.append((time.perf_counter() - begin) * 1000)
        tenth = np.sort(scores[best])[0]
        # Tie-aware: a hit counts if it scores at least the exact tenth best (float16 rounding allowed).
        found += sum(1 for hit in hits if scores[int(hit.entry_id[1:])] >= tenth - 1e-3)
    print(f"recall@10 over {share:,} entries (one of {workers} workers' share): {found / (10 * queries):.4f}")
    print(f"  index search: {percentiles(times)}; exact float32 search: {percentiles(exact_times)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("stream", "search", "recall"))
    parser.add_argument("--engine", choices=("kafka", "tansu"), default="kafka")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--agents", type=int, default=None)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reads", type=float, default=0.0, help="stream: the share of operations that recall")
    parser.add_argument("--pack", type=int, default=1, help="stream: operations per task.batch event (per partition)")
    args = parser.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, {bench.machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="memory-search-") as tmp:
        if args.part == "stream":
            count, agents = args.count or 200_000, args.agents or 1000
            stream(args.engine, count, agents, args.processes, args.reads, args.pack, Path(tmp))
        elif args.part == "search":
            search_load(args.engine, args.count or 1_000_000, args.agents or 30_000, args.rate, args.queries, Path(tmp))
        else:
            recall(args.count or 1_000_000, args.workers, args.queries)


if __name__ == "__main__":
    main()
