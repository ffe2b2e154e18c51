"""Relevance and speed of an embedding model for memory search.

Scores the labelled queries of ``tests/data/memory_relevance.json`` (each written
differently from the one memory it should find) against that memory hidden among 10,000
generated distractors, through the worker's own index, and times the model on the
distractors. Prints one JSON line.

    python benchmarks/memory_relevance.py [--model wordllama|minilm]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.memory_corpus import sentences  # noqa: E402
from streams.memory_search.embedding import load_embedder  # noqa: E402
from streams.memory_search.index import VectorIndex  # noqa: E402

LABELLED = ROOT / "tests" / "data" / "memory_relevance.json"
DISTRACTORS = 10_000


def top_k_share(model: str, k: int = 5) -> dict[str, object]:
    embedder = load_embedder(model)
    pairs = json.loads(LABELLED.read_text())["pairs"]
    distractors = sentences(DISTRACTORS)
    started = time.perf_counter()
    vectors = embedder.embed(distractors)
    per_second = DISTRACTORS / (time.perf_counter() - started)
    index = VectorIndex(embedder.dimensions)
    ids = [f"d{i}" for i in range(DISTRACTORS)]
    index.add(
        ids,
        ["agent_x_001"] * DISTRACTORS,
        ["observation"] * DISTRACTORS,
        ["episodic"] * DISTRACTORS,
        [0] * DISTRACTORS,
        vectors,
    )
    memories = embedder.embed([pair["memory"] for pair in pairs])
    index.add(
        [f"m{i}" for i in range(len(pairs))],
        ["agent_x_001"] * len(pairs),
        ["observation"] * len(pairs),
        ["episodic"] * len(pairs),
        [0] * len(pairs),
        memories,
    )
    queries = embedder.embed([pair["query"] for pair in pairs])
    found = 0
    missed = []
    for number, query in enumerate(queries):
        hits = [hit.entry_id for hit in index.search(query, k, -1.0)]
        if f"m{number}" in hits:
            found += 1
        else:
            missed.append(pairs[number]["query"])
    return {
        "model": embedder.name,
        "queries": len(pairs),
        "distractors": DISTRACTORS,
        f"top{k}": round(found / len(pairs), 3),
        "embedded_per_second": round(per_second),
        "missed": missed,
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wordllama")
    args = parser.parse_args()
    print(json.dumps(top_k_share(args.model)))


if __name__ == "__main__":
    main()
