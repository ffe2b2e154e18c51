"""Memory search: the index and the embedding cache (pure logic), the built-in model, and
``POST /v1/memory/search`` end to end on the real brokers."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from agents import memory as working_memory
from benchmarks.memory_corpus import sentences
from streams.memory_search.embedding import CachedEmbedder, WordLlamaEmbedder
from streams.memory_search.index import VectorIndex
from streams.memory_search.indexer import MemoryIndexer
from streams.memory_search.rows_by_id import RowsById
from streams.memory_search.word_tokens import WordTokens
from streams.serve.web import ApiError, parse_search
from tests.factories import record, task
from tests.harness import Deployment, consume_all, produce, wait_until

LABELLED = Path(__file__).parent / "data" / "memory_relevance.json"


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _filled_index(count: int, dimensions: int = 64, seed: int = 1) -> tuple[VectorIndex, np.ndarray]:
    vectors = _unit(np.random.default_rng(seed).normal(size=(count, dimensions)))
    index = VectorIndex(dimensions, candidates=count)  # every row scored: results equal exact search
    index.add(
        [f"mem_{i}" for i in range(count)],
        [f"agent_a_{i % 10:03d}" for i in range(count)],
        ["conversation" if i % 2 else "decision" for i in range(count)],
        ["working" if i % 3 else "episodic" for i in range(count)],
        [i % 4 for i in range(count)],
        vectors,
    )
    return index, vectors


def _exact(vectors: np.ndarray, query: np.ndarray, rows: list[int], limit: int) -> list[str]:
    scores = vectors[rows] @ query
    return [f"mem_{rows[i]}" for i in np.argsort(-scores, kind="stable")[:limit]]


def test_index_search_equals_exact_search_with_and_without_filters() -> None:
    index, vectors = _filled_index(3000)
    query = vectors[17] + 0.1 * vectors[901]
    query /= np.linalg.norm(query)
    everything = list(range(3000))
    assert [hit.entry_id for hit in index.search(query, 10, -1.0)] == _exact(vectors, query, everything, 10)
    agent_rows = [i for i in everything if i % 10 == 7]
    found = index.search(query, 5, -1.0, agent_id="agent_a_007")
    assert [hit.entry_id for hit in found] == _exact(vectors, query, agent_rows, 5)
    assert {hit.agent_id for hit in found} == {"agent_a_007"}
    typed = [i for i in everything if i % 2 == 0 and i % 3 == 0]
    found = index.search(query, 5, -1.0, memory_type="decision", tier="episodic")
    assert [hit.entry_id for hit in found] == _exact(vectors, query, typed, 5)
    assert {hit.tier for hit in found} == {"episodic"}
    # Scores are cosine similarities (float16 vectors): the top one is entry 17's.
    assert index.search(query, 1, -1.0)[0].score == pytest.approx(float(vectors[17] @ query), abs=2e-3)
    assert index.search(query, 10, 2.0) == []
    assert index.search(query, 5, -1.0, agent_id="agent_nobody_001") == []


@pytest.mark.parametrize("merge_at", [100, 16_384])  # ids found in the sorted hashes, or in the recent dict
def test_index_tiers_removal_partitions_and_compaction(monkeypatch: pytest.MonkeyPatch, merge_at: int) -> None:
    monkeypatch.setattr("streams.memory_search.rows_by_id.MERGE_AT", merge_at)
    index, vectors = _filled_index(2400)
    named = "".join(["mem_", "1"])  # equal to the index's id, not the same string
    index.set_tier([named, "mem_2"], "semantic")
    assert index.tier_of("mem_1") == "semantic"
    assert index.search(vectors[1], 1, -1.0)[0].entry_id is named  # the index keeps the string it was given
    semantic = index.search(vectors[1], 10, -1.0, tier="semantic")
    assert {hit.entry_id for hit in semantic} == {"mem_1", "mem_2"}
    index.remove(["mem_1"])
    assert "mem_1" not in index
    assert all(hit.entry_id != "mem_1" for hit in index.search(vectors[1], 50, -1.0))
    index.drop_partitions({0, 1})  # over a quarter of the rows: compacted
    assert len(index) == 1200  # partitions 2 and 3 (mem_1 was in partition 1)
    remaining = [i for i in range(2400) if i % 4 in (2, 3)]
    query = vectors[2]
    assert [hit.entry_id for hit in index.search(query, 10, -1.0)] == _exact(vectors, query, remaining, 10)
    assert [hit.entry_id for hit in index.search(query, 3, -1.0, agent_id="agent_a_002")] == _exact(
        vectors, query, [i for i in remaining if i % 10 == 2], 3
    )
    # An id added again replaces its row.
    index.add(["mem_2"], ["agent_a_002"], ["decision"], ["episodic"], [2], vectors[5:6])
    assert index.search(vectors[5], 1, -1.0, agent_id="agent_a_002")[0].entry_id == "mem_2"
    assert index.tier_of("mem_2") == "episodic"


class _SameHash(str):
    """An id whose hash every other such id shares."""

    def __hash__(self) -> int:
        return 7


@pytest.mark.parametrize("merge_at", [1, 3, 1000])
def test_rows_by_id_finds_each_live_id_and_only_it(monkeypatch: pytest.MonkeyPatch, merge_at: int) -> None:
    monkeypatch.setattr("streams.memory_search.rows_by_id.MERGE_AT", merge_at)
    ids: list[str | None] = []
    rows = RowsById(ids)
    named = [_SameHash(f"mem_{n}") for n in range(5)] + [f"mem_x{n}" for n in range(5)]
    for entry_id in named:
        ids.append(entry_id)
        rows.add(entry_id, len(ids) - 1)
    assert [rows.get(entry_id) for entry_id in named] == list(range(10))
    assert rows.find([*named, _SameHash("mem_9"), "mem_y"]) == [*range(10), None, None]
    ids[2] = None  # removed from the index: not found, with or without discard
    rows.discard(named[3])
    ids[3] = None
    assert rows.get(named[2]) is None and rows.get(named[3]) is None
    ids.append(named[2])  # added again at a new row
    rows.add(named[2], 10)
    assert rows.find(named[:5]) == [0, 1, 10, None, 4]
    rows.rebuild([named[4], None, named[0]])  # renumbered
    assert rows.find(named[:5]) == [2, None, None, None, 0]


class _CountingModel:
    name = "counting"
    dimensions = 4
    default_threshold = 0.0

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def embed(self, texts: Any) -> np.ndarray:
        self.calls.append(list(texts))
        return _unit(np.array([[len(t), 1.0, 2.0, 3.0] for t in texts], dtype=np.float32))


def test_the_embedding_cache_embeds_each_text_once_and_forgets_the_oldest() -> None:
    model = _CountingModel()
    cache = CachedEmbedder(model, capacity=2)
    first = cache.embed(["a", "bb", "a"])
    assert model.calls == [["a", "bb"]]
    assert np.array_equal(first[0], first[2]) and not np.array_equal(first[0], first[1])
    again = cache.embed(["bb", "a"])
    assert model.calls == [["a", "bb"]]
    assert np.array_equal(again, first[[1, 0]])
    cache.embed(["ccc"])  # takes the place of "a", the oldest
    both = cache.embed(["a", "bb"])
    assert model.calls == [["a", "bb"], ["ccc"], ["a"]]
    assert np.array_equal(both, first[[0, 1]])
    assert len(cache) == 2 and (cache.embedded, cache.hits) == (4, 4)


def test_a_half_precision_cache_gives_back_the_vectors_rounded_as_the_index_keeps_them() -> None:
    model = _CountingModel()
    cache = CachedEmbedder(model, capacity=4, half=True)
    first = cache.embed(["a", "bb"])
    again = cache.embed(["a", "bb"])
    assert model.calls == [["a", "bb"]]
    assert again.dtype == np.float32
    assert np.array_equal(again, first.astype(np.float16).astype(np.float32))


def test_the_compact_model_gives_the_same_vectors_in_half_the_memory() -> None:
    texts = ["where is my parcel being delivered", "the package ships to Berlin tomorrow", "", "I like apples"]
    full, compact = WordLlamaEmbedder(), WordLlamaEmbedder(compact=True)
    assert np.array_equal(full.embed(texts), compact.embed(texts))
    assert compact._rows.nbytes * 2 == full._rows.nbytes


_ODD_TEXTS = [
    "  two  spaces here",
    " leading space",
    "trailing space ",
    " ",
    "",
    "a  b",
    "tab\there and a\nnewline",
    "café naïve 日本語 😀 done",
    "no\u00a0break space",
    "don't stop-believing, e.g. U.S.A. 3.14 $5 #42 (order 4471)",
    "▁already marked ▁ words",
]


def test_words_tokenized_once_give_the_tokenizers_ids_for_whole_texts() -> None:
    """The word cache's ids equal the tokenizer's on whole texts, through many turns of the cache."""
    tokenizer = WordLlamaEmbedder(words=0)._tokens
    pairs = json.loads(LABELLED.read_text())["pairs"]
    texts = sentences(3_000) + [p["query"] for p in pairs] + [p["memory"] for p in pairs] + _ODD_TEXTS
    texts += [f"{text} (entry {number})" for number, text in enumerate(texts[:1_000])]
    words = WordTokens(tokenizer._tokenizer, capacity=500)
    expected = tokenizer.encode(texts)
    for first in range(0, len(texts), 300):  # in batches, as the stream sends them
        ids, lengths = words.encode(texts[first : first + 300])
        starts = sum(expected[1][:first])
        assert lengths == expected[1][first : first + 300]
        assert ids == expected[0][starts : starts + sum(lengths)]
        assert len(words) <= 2 * 500 + 300 * 20  # two generations, and a batch's words


def test_the_model_with_its_word_cache_gives_the_same_vectors() -> None:
    texts = sentences(2_000) + _ODD_TEXTS
    cached, plain = WordLlamaEmbedder(), WordLlamaEmbedder(words=0)
    assert np.array_equal(cached.embed(texts), plain.embed(texts))
    assert np.array_equal(cached.embed(texts[::-1]), plain.embed(texts[::-1]))
    assert not np.any(plain.embed(["", " "])[0])  # no token: a zero vector, which matches nothing
    # A text alone (a query) is summed in one call: the same vector as in a batch.
    batch = plain.embed(texts[:40] + _ODD_TEXTS)
    assert all(np.array_equal(plain.embed([text])[0], batch[n]) for n, text in enumerate(texts[:40] + _ODD_TEXTS))


def test_the_built_in_model_loads_offline_and_ranks_related_text_first() -> None:
    model = WordLlamaEmbedder()
    vectors = model.embed(
        ["where is my parcel being delivered", "the package ships to Berlin tomorrow", "I like apples"]
    )
    assert vectors.shape == (3, model.dimensions)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_the_labelled_queries_find_their_memory_among_ten_thousand_distractors() -> None:
    """The relevance check of the built-in model (the figure: benchmarks/memory_relevance.py).

    The issue's bar is 90% in the top 5; WordLlama reaches 73% on this set (docs/memory-search.md).
    This guards against a change to the model or the index making it worse.
    """
    model = WordLlamaEmbedder()
    pairs = json.loads(LABELLED.read_text())["pairs"]
    assert len(pairs) >= 50
    distractors = sentences(10_000)
    texts = distractors + [pair["memory"] for pair in pairs]
    index = VectorIndex(model.dimensions)
    count = len(texts)
    index.add(
        [f"e{i}" for i in range(count)],
        ["agent_x_001"] * count,
        ["observation"] * count,
        ["episodic"] * count,
        [0] * count,
        model.embed(texts),
    )
    queries = model.embed([pair["query"] for pair in pairs])
    found = sum(
        f"e{len(distractors) + number}" in [hit.entry_id for hit in index.search(query, 5, -1.0)]
        for number, query in enumerate(queries)
    )
    assert found / len(pairs) >= 0.70


HOUR_MS = 3_600_000


def _memory_with(ages_ms: list[int], now_ms: int) -> dict[str, Any]:
    memory = working_memory.empty_memory()
    for number, age in enumerate(ages_ms):
        working_memory.append(
            memory, "agent_c_001", f"note {number}", role="user", memory_type="observation",
            timestamp_ms=now_ms - age, budget_tokens=10**6,
        )  # fmt: skip
    return memory


@pytest.mark.parametrize(
    ("ages", "leaving"),
    [
        ([2 * HOUR_MS] * 100 + [0], 100),  # 101 entries, the oldest over an hour: the old ones leave
        ([2 * HOUR_MS] * 60 + [HOUR_MS - 1000] * 41, 60),  # only those over an hour
        ([2 * HOUR_MS] * 100, 0),  # 100 entries: not over the threshold
        ([HOUR_MS - 1000] * 150, 0),  # many, none over an hour
    ],
)
def test_working_memory_consolidates_into_episodic_at_the_thresholds(ages: list[int], leaving: int) -> None:
    now = 10 * HOUR_MS
    memory = _memory_with(ages[:-1], now)
    left: list[dict[str, Any]] = []
    working_memory.append(
        memory, "agent_c_001", "the last note", role="user", memory_type="observation",
        timestamp_ms=now - ages[-1], budget_tokens=10**6, left=left,
    )  # fmt: skip
    assert len(left) == leaving
    assert [entry["content"] for entry in left] == [f"note {n}" for n in range(leaving)]
    kept = working_memory.entries(memory)
    assert len(kept) == len(ages) - leaving
    assert memory["tokens"] == sum(entry["tokens"] for entry in kept)
    assert memory["written"] == len(ages)


DAY_MS = 86_400_000


def _left(ages_ms: list[int], now_ms: int) -> list[dict[str, Any]]:
    return [{"created_at": now_ms - age} for age in ages_ms]


@pytest.mark.parametrize(
    ("ages", "promoted"),
    [
        ([8 * DAY_MS] * 600 + [DAY_MS] * 401, 600),  # 1001 episodic: those over 7 days become semantic
        ([8 * DAY_MS] * 600 + [DAY_MS] * 400, 0),  # 1000: not over the threshold
        ([6 * DAY_MS] * 2000, 0),  # many, none over 7 days
        ([7 * DAY_MS + 1000] * 1001, 0),  # just over 7 days, in the span that is not wholly old: wait
        ([9 * DAY_MS] * 1 + [0] * 1000, 1),
    ],
)
def test_episodic_memory_becomes_semantic_at_the_thresholds(ages: list[int], promoted: int) -> None:
    now = 100 * DAY_MS + DAY_MS // 2  # midday
    memory = working_memory.empty_memory()
    # The entries leave working memory over two batches; promotion is decided after each.
    assert working_memory.file_episodic(memory, _left(ages[:500], now), now) is None
    moved = working_memory.file_episodic(memory, _left(ages[500:], now), now)
    counts = working_memory.tier_counts(memory)
    assert counts == {"working": 0, "episodic": len(ages) - promoted, "semantic": promoted}
    if promoted:
        assert moved is not None and moved[1] == promoted
        before = memory["semantic_before"]
        assert before <= now - 7 * DAY_MS  # everything promoted is over 7 days old
        tiers = [working_memory.tier_of({"created_at": now - age, "tier": "episodic"}, memory) for age in ages]
        assert tiers.count("semantic") == promoted
    else:
        assert moved is None and memory.get("semantic_before", 0) == 0
    # An old entry that leaves later (a system message kept all along) is semantic at once.
    if promoted:
        working_memory.file_episodic(memory, _left([30 * DAY_MS], now), now)
        assert working_memory.tier_counts(memory)["semantic"] == promoted + 1


def test_entries_leave_a_tier_when_its_lifetime_is_over_whatever_the_counts() -> None:
    now = 100 * DAY_MS
    # Working memory (3 entries, far below 100): a turn over a day old leaves at the next write.
    memory = _memory_with([DAY_MS + 1000, DAY_MS - 1000], now)
    left: list[dict[str, Any]] = []
    working_memory.append(
        memory, "agent_c_001", "now", role="user", memory_type="observation",
        timestamp_ms=now, budget_tokens=10**6, left=left,
    )  # fmt: skip
    assert [entry["content"] for entry in left] == ["note 0"]
    assert [entry["content"] for entry in working_memory.entries(memory)] == ["note 1", "now"]
    # Episodic memory (far below 1000 entries): entries over 30 days old become semantic.
    episodic = working_memory.empty_memory()
    moved = working_memory.file_episodic(episodic, _left([31 * DAY_MS] * 3 + [29 * DAY_MS] * 2, now), now)
    assert moved is not None and moved[1] == 3 and moved[0] <= now - 30 * DAY_MS
    assert working_memory.tier_counts(episodic) == {"working": 0, "episodic": 2, "semantic": 3}


def test_an_entry_is_served_with_every_field_of_the_domain_and_counts_its_accesses() -> None:
    memory = working_memory.empty_memory()
    for number, importance in enumerate((0.9, 0.5)):
        working_memory.append(
            memory, "agent_c_001", f"note {number}", role="user", memory_type="decision",
            timestamp_ms=1000 + number, budget_tokens=10**6, importance=importance,
        )  # fmt: skip
    first, second = working_memory.entries(memory)
    assert "importance" not in second  # the default is not stored
    shown = working_memory.describe(first, "working")
    assert shown["importance"] == 0.9 and working_memory.describe(second, "episodic")["importance"] == 0.5
    assert (shown["access_count"], shown["last_accessed"], shown["expires_at"]) == (0, None, 1000 + DAY_MS)
    assert working_memory.describe(second, "episodic")["expires_at"] == 1001 + 30 * DAY_MS
    assert working_memory.describe(second, "semantic")["expires_at"] is None
    assert set(shown) >= {
        "id", "agent_id", "key", "content", "memory_type", "importance", "access_count", "last_accessed",
        "hash", "prev_hash", "created_at", "expires_at",
    }  # fmt: skip
    turns = memory["turns"]
    found = working_memory.count_accesses(memory, {first["id"], "mem_00000000000000000000"}, 5000)
    assert found == {first["id"]}
    assert (
        memory["turns"] is not turns and turns[0] is first and "access_count" not in first
    )  # nothing changed in place
    assert [working_memory.describe(e, "working")["access_count"] for e in working_memory.entries(memory)] == [1, 0]
    again = working_memory.accessed(working_memory.entries(memory)[0], 6000)
    assert (again["access_count"], again["last_accessed"]) == (2, 6000)


def _forge_entry(bootstrap: str, topic: str, partitions: int, entry_id: str, content: str) -> None:
    """Write a changed copy of an entry's changelog record (as anyone who can write the topic could)."""
    from aiokafka import AIOKafkaProducer

    records = consume_all(bootstrap, topic, partitions, expect=10**6, timeout=3)
    [original] = [r for r in records if r.key == entry_id.encode()][-1:]
    forged = {**msgpack.unpackb(original.value), "content": content}

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topic, msgpack.packb(forged), key=original.key, partition=original.partition)
        finally:
            await producer.stop()

    asyncio.run(send())


def test_episodic_memory_becomes_semantic_in_the_stream_and_verify_walks_the_tables(deployment: Deployment) -> None:
    # Consolidation at small thresholds: over 3 episodic entries, those over a second old.
    deployment.env.update(
        BLACKROAD_WORKING_MEMORY_TOKENS="16", BLACKROAD_MEMORY_EPISODIC_LIMIT="3", BLACKROAD_MEMORY_SEMANTIC_AFTER="1"
    )
    worker = deployment.worker().start().wait_ready()
    agent = "agent_tiers_001"
    notes = [
        task(agent, "memory_operation", {"op": "write", "content": text, "memory_type": "observation"})
        for text in sentences(2 * NOTES, seed=5)
    ]
    first, second = notes[:NOTES], notes[NOTES:]
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in first])
    wait_until(_finished(worker, NOTES), 60, what="the first notes written")
    time.sleep(1.5)
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in second])
    wait_until(_finished(worker, 2 * NOTES), 60, what="the second notes written")

    def tiers(worker: Any) -> dict[str, list[str]]:
        """The agent's entries by tier ({} while the worker indexes its memory)."""
        found: dict[str, list[str]] = {}
        for tier in ("semantic", "episodic", "working"):
            status, answer = worker.get(f"/v1/agents/{agent}/memory?tier={tier}&limit=100")
            if status == 503:
                return {}
            assert status == 200, answer
            found[tier] = [entry["content"] for entry in answer["entries"]]
        return found

    written = [event.payload["content"] for event in first + second]
    found = wait_until(lambda: (t := tiers(worker)).get("semantic") and t, 30, what="semantic memory")
    assert found["semantic"] == written[:NOTES]  # every entry of the first notes, over a second older
    assert found["semantic"] + found["episodic"] + found["working"] == written
    status, row = worker.get(f"/v1/agents/{agent}/memory")
    assert row["tiers"] == {tier: len(found[tier]) for tier in ("working", "episodic", "semantic")}
    query = {"query": written[2], "threshold": -1.0, "filters": {"agent_id": agent, "tier": "semantic"}}
    answer = _search(worker, query)
    assert answer["total"] == NOTES and {r["metadata"]["tier"] for r in answer["results"]} == {"semantic"}
    assert answer["results"][0]["content"] == written[2]
    # verify walks the chain through working memory and the memory_entries table (no PostgreSQL here).
    status, chain = worker.get(f"/v1/agents/{agent}/memory/verify")
    assert status == 200 and chain["valid"] and chain["verified"] == chain["written"] == 2 * NOTES, chain
    # A semantic entry rewritten in its changelog, restored by a restarted worker: verify names it.
    forged = answer["results"][0]["id"]
    topic = f"{deployment.env['BLACKROAD_APP_ID']}-memory_entries-changelog"
    _forge_entry(deployment.bootstrap, topic, deployment.partitions, forged, "rewritten")
    worker.kill()
    worker = deployment.worker().start().wait_ready()
    assert wait_until(lambda: (t := tiers(worker)).get("semantic") and t, 60, what="the tiers again")["semantic"] == [
        "rewritten" if n == 2 else text for n, text in enumerate(written[:NOTES])
    ]
    status, chain = worker.get(f"/v1/agents/{agent}/memory/verify")
    assert status == 200 and not chain["valid"], chain
    assert chain["first_broken"] == (
        f"memory of {agent}: entry 3 ({forged[4:16]}) in the tables does not match its hash"
    ), chain


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], None),
        ({"query": ""}, "query"),
        ({"query": "x", "limit": 0}, "limit"),
        ({"query": "x", "limit": True}, "limit"),
        ({"query": "x", "threshold": "high"}, "threshold"),
        ({"query": "x", "filters": {"tier": "cold"}}, "filters.tier"),
        ({"query": "x", "filters": {"memory_type": "dream"}}, "filters.memory_type"),
        ({"query": "x", "filters": {"colour": "red"}}, None),
        ({"query": "x", "filters": []}, "filters"),
        ({"query": "x", "filters": {"agent_id": "bob"}}, "filters.agent_id"),
        ({"query": "x", "extra": 1}, None),
    ],
)
def test_a_bad_search_request_is_refused_naming_the_field(body: Any, field: str | None) -> None:
    with pytest.raises(ApiError) as refused:
        parse_search(body)
    assert refused.value.status == 400
    if field is not None:
        assert refused.value.details["field"] == field


def _search(worker: Any, body: dict[str, Any]) -> dict[str, Any]:
    status, answer = worker.post("/v1/memory/search", body)
    assert status == 200, answer
    return answer  # type: ignore[no-any-return]


def _searchable(worker: Any, body: dict[str, Any]):  # type: ignore[no-untyped-def]
    def check():  # type: ignore[no-untyped-def]
        status, answer = worker.post("/v1/memory/search", body)
        return status == 200 and answer

    return check


def _without_accesses(answer: dict[str, Any]) -> dict[str, Any]:
    """A search answer without what searches change (the entries' access counts and times)."""
    drop = {"access_count", "last_accessed"}
    results = [
        {**result, "metadata": {k: v for k, v in result["metadata"].items() if k not in drop}}
        for result in answer["results"]
    ]
    return {**answer, "results": results}


def _finished(worker: Any, expected: int):  # type: ignore[no-untyped-def]
    def check():  # type: ignore[no-untyped-def]
        status, stats = worker.get("/v1/stats")
        return status == 200 and stats["completed_tasks"] >= expected

    return check


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, whichever of its threads started them."""
    return [
        int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()
    ]


#: Notes written per agent: with a 16-token working memory most of them leave it (episodic).
NOTES = 6


def _notes(agents: list[str]) -> list[Any]:
    texts = sentences(len(agents) * NOTES, seed=3)
    return [
        task(agent, "memory_operation", {"op": "write", "content": texts[i * NOTES + n], "memory_type": "observation"})
        for i, agent in enumerate(agents)
        for n in range(NOTES)
    ]


def test_search_answers_the_same_from_either_worker_across_tiers(deployment: Deployment) -> None:
    deployment.env["BLACKROAD_WORKING_MEMORY_TOKENS"] = "16"
    first, second = deployment.worker().start(), deployment.worker().start()
    first.wait_ready()
    second.wait_ready()
    agents = [f"agent_recall_{i:03d}" for i in range(40)]
    events = _notes(agents)
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in events])
    for worker in (first, second):
        wait_until(_finished(worker, len(events)), 90, what="every note written")
    target = events[7].payload["content"]
    query = {"query": target, "limit": 20, "threshold": -1.0}
    answers = [wait_until(_searchable(worker, query), 60, what="memory indexed") for worker in (first, second)]
    assert _without_accesses(answers[0]) == _without_accesses(answers[1])
    results = answers[0]["results"]
    assert len(results) == 20 and answers[0]["total"] == 20
    assert results[0]["content"] == target and results[0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert results[0]["metadata"]["agent_id"] == events[7].agent_id
    scores = [result["score"] for result in results]
    assert scores == sorted(scores, reverse=True)
    assert len({result["metadata"]["agent_id"] for result in results}) > 1  # both workers' agents
    # Each agent's first notes left working memory (16 tokens) for episodic memory.
    tiers = {result["metadata"]["tier"] for result in results}
    assert tiers == {"working", "episodic"}
    agent = events[7].agent_id
    for worker in (first, second):
        own = _search(worker, {"query": target, "limit": 10, "threshold": -1.0, "filters": {"agent_id": agent}})
        assert own["total"] == NOTES
        assert {result["metadata"]["agent_id"] for result in own["results"]} == {agent}
        assert own["results"][0]["content"] == target
        episodic = _search(worker, {"query": target, "threshold": -1.0, "filters": {"tier": "episodic"}})
        assert {result["metadata"]["tier"] for result in episodic["results"]} == {"episodic"}
        # The agent's memory by tier: episodic then working is every note, in order.
        working = worker.get(f"/v1/agents/{agent}/memory")[1]["entries"]
        status, older = worker.get(f"/v1/agents/{agent}/memory?tier=episodic")
        assert status == 200 and older["total"] == NOTES - len(working)
        contents = [entry["content"] for entry in older["entries"] + working]
        assert contents == [event.payload["content"] for event in events if event.agent_id == agent]
        assert worker.get(f"/v1/agents/{agent}/memory?tier=cold")[0] == 400
    # A new entry is searchable once its task is done.
    fresh = task(agent, "memory_operation", {"op": "write", "content": "the submarine surfaced near Reykjavik"})
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(fresh)])
    wait_until(_finished(first, len(events) + 1), 30, what="the new note written and flushed")
    memory_id = first.get(f"/v1/tasks/{fresh.task_id}")[1]["result"]["memory_id"]
    # Searchable by the flush after its own: within a flush interval or two (0.2 s each).
    search = _searchable(second, {"query": "the submarine surfaced near Reykjavik", "limit": 1})
    found = wait_until(
        lambda: (answer := search()) and answer["results"] and answer["results"][0]["id"] == memory_id,
        5,
        0.05,
        what="it",
    )
    assert found


def _entries_by_id(worker: Any, agent: str) -> dict[str, dict[str, Any]]:
    """The agent's entries of every tier (as the memory views serve them) by id; {} while indexing."""
    found: dict[str, dict[str, Any]] = {}
    for tier in ("working", "episodic", "semantic"):
        status, answer = worker.get(f"/v1/agents/{agent}/memory?tier={tier}")
        if status == 503:
            return {}
        assert status == 200, answer
        found.update((entry["id"], entry) for entry in answer["entries"])
    return found


def test_searches_count_accesses_of_what_they_return_exactly_across_workers_and_kills(deployment: Deployment) -> None:
    deployment.env["BLACKROAD_WORKING_MEMORY_TOKENS"] = "16"  # most notes leave working memory
    first, second = deployment.worker().start(), deployment.worker().start()
    first.wait_ready()
    second.wait_ready()
    agent = "agent_access_001"
    texts = sentences(NOTES, seed=11)
    notes = [
        task(agent, "memory_operation", {"op": "write", "content": text, "importance": 0.9 if n == 0 else 0.5})
        for n, text in enumerate(texts)
    ]
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in notes])
    wait_until(_finished(first, NOTES), 60, what="the notes written")
    every = {"query": texts[0], "limit": 10, "threshold": -1.0, "filters": {"agent_id": agent}}
    counts: dict[str, int] = {}
    # An agent filter from each worker (one of them forwards it to the owner), and a fan-out.
    for worker in (first, second):
        _wait_indexed(worker, [agent])  # a search while indexing would count what it returns too
    searches = ((first, every, NOTES), (second, every, NOTES), (first, {"query": texts[2], "limit": 3}, 3))
    for worker, body, expected in searches:
        answer = _search(worker, {"threshold": -1.0, **body})
        assert len(answer["results"]) == expected
        for result in answer["results"]:
            counts[result["id"]] = counts.get(result["id"], 0) + 1
    assert sum(counts.values()) == 2 * NOTES + 3
    # A handler's search counts too, as its task runs; a bad access event is dead-lettered.
    searching = task(agent, "memory_operation", {"op": "search", "query": texts[4], "limit": 2})
    bad = {"v": 1, "type": "memory.accessed", "agent_id": agent, "ts": 1, "ids": ["mem_nope"]}
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(searching), (agent.encode(), msgpack.packb(bad))])
    wait_until(_finished(first, NOTES + 1), 30, what="the search task")
    found = first.get(f"/v1/tasks/{searching.task_id}")[1]["result"]["entries"]
    assert [entry["content"] for entry in found][:1] == [texts[4]]
    for entry in found:
        counts[entry["id"]] += 1

    def counted(worker: Any) -> dict[str, int] | None:
        entries = _entries_by_id(worker, agent)
        seen = {entry_id: entry["access_count"] for entry_id, entry in entries.items() if entry["access_count"]}
        return entries if seen == counts else None

    entries = wait_until(lambda: counted(second), 30, what=f"the access counts {sorted(counts.values())}")
    assert len(entries) == NOTES and all(entry["last_accessed"] for entry in entries.values())
    by_content = {entry["content"]: entry for entry in entries.values()}
    assert [by_content[text]["importance"] for text in texts] == [0.9] + [0.5] * (NOTES - 1)
    for entry in entries.values():
        lifetime = {"working": DAY_MS, "episodic": 30 * DAY_MS}[entry["tier"]]
        assert entry["expires_at"] == entry["created_at"] + lifetime
    status, stats = first.get("/v1/memory/stats")
    assert status == 200 and (stats["accesses_recorded"], stats["accesses_dropped"]) == (3, 0)
    [letter] = consume_all(deployment.bootstrap, deployment.topic("deadletter"), deployment.partitions, expect=1)
    assert "invalid memory id" in msgpack.unpackb(letter.value)["reason"]
    # The counts are in the tables: a SIGKILLed worker's replacement serves them, none counted twice.
    first.kill()
    first = deployment.worker().start().wait_ready()
    wait_until(lambda: counted(first) and counted(second), 60, what="the same counts after the kill")


def test_the_vector_log_gives_back_the_vectors_sent_to_it(deployment: Deployment) -> None:
    """Vectors sent for a few batches come back, per partition, with nothing else."""
    from streams.memory_search.vector_log import VectorLog, vector_topic
    from streams.runtime.broker import create_topic

    topic = vector_topic(deployment.prefix, "test model/1")
    assert topic == f"{deployment.prefix}.memory-vectors.test-model-1"
    vectors = _unit(np.random.default_rng(5).normal(size=(300, 16))).astype(np.float16)

    async def scenario() -> None:
        await create_topic(deployment.bootstrap, topic, 4)
        log = VectorLog(deployment.bootstrap, topic, 16, "test")
        await log.start()
        try:
            for start in range(0, 300, 50):  # six batches, spread over the partitions
                for partition in range(4):
                    rows = [row for row in range(start, start + 50) if row % 4 == partition]
                    log.send(partition, [f"mem_{row}" for row in rows], vectors[rows])
            deadline = asyncio.get_running_loop().time() + 30
            while log.sent < 300 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            assert (log.sent, log.dropped) == (300, 0)
            stored = await log.read({1, 3})
            assert len(stored) == 150
            for row in range(300):
                found = stored.get(f"mem_{row}")
                if row % 4 in (1, 3):
                    assert found is not None and np.array_equal(found, vectors[row])
                else:
                    assert found is None
        finally:
            await log.stop()

    asyncio.run(scenario())


def test_the_vector_log_keeps_a_batch_larger_than_the_brokers_record_limit(deployment: Deployment) -> None:
    """A batch of thousands of entries (a backlog's) is stored whole: its vectors are sent in
    records under the broker's 1 MB default, not dropped as one record too large."""
    from streams.memory_search.vector_log import VectorLog, vector_topic
    from streams.runtime.broker import create_topic

    topic = vector_topic(deployment.prefix, "big batches")
    count, dimensions = 5_000, 256
    vectors = _unit(np.random.default_rng(6).normal(size=(count, dimensions))).astype(np.float16)
    ids = [f"mem_{row:020x}" for row in range(count)]

    async def scenario() -> None:
        await create_topic(deployment.bootstrap, topic, 4)
        log = VectorLog(deployment.bootstrap, topic, dimensions, "test")
        await log.start()
        try:
            log.send(2, ids, vectors)
            deadline = asyncio.get_running_loop().time() + 30
            while log.sent + log.dropped < count and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            assert (log.sent, log.dropped) == (count, 0)
            stored = await log.read({2})
            assert len(stored) == count
            found = stored.get(ids[-1])
            assert found is not None and np.array_equal(found, vectors[-1])
        finally:
            await log.stop()

    asyncio.run(scenario())


def _wait_indexed(worker: Any, agents: list[str]) -> None:
    """Wait until the worker's index holds the agents' memory as their rows do now, each entry in its tier."""
    tiers: dict[str, int] = {"working": 0, "episodic": 0, "semantic": 0}
    for agent in agents:
        status, row = worker.get(f"/v1/agents/{agent}/memory")
        assert status == 200, row
        for tier, count in row["tiers"].items():
            tiers[tier] += count

    def indexed() -> bool:
        status, stats = worker.get("/v1/memory/stats")
        return status == 200 and stats["entries"] == tiers

    wait_until(indexed, 60, what=f"the index to hold {tiers}")


def test_memory_and_its_index_survive_a_sigkill_exactly(deployment: Deployment) -> None:
    deployment.env["BLACKROAD_WORKING_MEMORY_TOKENS"] = "16"
    worker = deployment.worker().start().wait_ready()
    agents = [f"agent_keep_{i:03d}" for i in range(30)]
    events = _notes(agents)
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in events])
    wait_until(_finished(worker, len(events)), 90, what="every note written")
    queries = [{"query": events[n].payload["content"], "limit": 10, "threshold": -1.0} for n in (0, 50, 111)]
    _wait_indexed(worker, agents)
    before = [_search(worker, query) for query in queries]
    # Every vector reached the broker (sent in the background: one lost with the worker is
    # computed again, which this test would not tell from a vector log that does not work).
    wait_until(lambda: worker.get("/v1/memory/stats")[1]["vectors_stored"] == len(events), 30, what="the vectors sent")
    helpers = _descendants(worker.process.pid)  # the embedding process and multiprocessing's resource tracker
    assert helpers
    worker.kill()
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in helpers), 10, what="its helpers to exit")
    worker = deployment.worker().start().wait_ready()
    after = [wait_until(_searchable(worker, query), 60, what="memory indexed again") for query in queries]
    assert [_without_accesses(answer) for answer in after] == [_without_accesses(answer) for answer in before]
    # The vectors came back from the broker (the vector log) instead of being embedded again.
    status, stats = worker.get("/v1/memory/stats")
    assert status == 200 and stats["total"] == len(events)
    assert stats["vectors_reused"] + stats["embedded"] == len(events) and stats["vectors_reused"] >= 0.9 * len(events)
    assert sum(len(answer["results"]) for answer in after) == 30


class _GatedModel(_CountingModel):
    """Embeds only once let through (a rebuild that takes a while)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def embed(self, texts: Any) -> np.ndarray:
        if not self.gate.wait(10):
            raise TimeoutError("never let through")
        return super().embed(texts)


def test_a_partition_is_indexed_while_processing_goes_on_and_later_changes_follow_in_order() -> None:
    from tests.test_units import _cached_table

    memory, entries = _cached_table("memory"), _cached_table("memory_entries")
    agent = "agent_idx_001"
    row = working_memory.empty_memory()
    for number in range(3):
        working_memory.append(
            row, agent, f"note {number}", role="user", memory_type="observation", timestamp_ms=number, budget_tokens=99
        )
    memory.put(agent, {**row, "o": 3}, 0)
    old = {**working_memory.entries(row)[0], "id": "mem_old", "o": 1, "tier": "episodic"}
    entries.put("mem_old", old, 0)
    model = _GatedModel()
    indexer = MemoryIndexer(CachedEmbedder(model, 100), memory, entries, queries=None)
    working = working_memory.entries(row)

    async def scenario() -> None:
        assert indexer.start_build({0}) == 4
        assert not indexer.ready({0}) and indexer.missing({0}) == set()
        # A batch meanwhile: a new entry, and the first note leaves working memory.
        new = {**working[1], "id": "mem_new", "content": "a new note"}
        indexer.batch_done([(0, [new])], [working[0]])
        await asyncio.wait_for(indexer.flushing(), 1)  # does not wait for the rebuild
        await asyncio.wait_for(indexer.flushing(), 1)
        assert len(indexer.index) == 0
        model.gate.set()
        await asyncio.wait_for(indexer.settle(), 10)
        assert indexer.ready({0})
        tiers = {entry_id: indexer.index.tier_of(entry_id) for entry_id in [e["id"] for e in working]}
        assert tiers == {working[0]["id"]: "episodic", working[1]["id"]: "working", working[2]["id"]: "working"}
        assert indexer.index.tier_of("mem_old") == "episodic" and indexer.index.tier_of("mem_new") == "working"
        assert len(indexer.index) == 5
        # Handed away while being indexed again: nothing of it stays.
        model.gate.clear()
        indexer.drop({0})
        indexer.start_build({0})
        indexer.drop({0})
        model.gate.set()
        await asyncio.wait_for(indexer.settle(), 10)
        assert len(indexer.index) == 0 and not indexer.ready({0}) and indexer.missing({0}) == {0}

    try:
        asyncio.run(scenario())
    finally:
        indexer.close()
