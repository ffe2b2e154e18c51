"""A mergeable latency histogram with about 4% relative resolution.

Buckets are sparse ``{index: count}`` maps so they serialise small and merge by
adding counts; percentiles are read from the merged buckets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

_SCALE = 24.0
_log1p = math.log1p


def bucket(value_ms: float) -> int:
    return int(_log1p(value_ms) * _SCALE) if value_ms > 0 else 0


def bucket_value(index: int) -> float:
    """The middle of a bucket, in milliseconds."""
    return math.expm1((index + 0.5) / _SCALE)


def record(histogram: dict[int, int], value_ms: float) -> None:
    index = bucket(value_ms)
    histogram[index] = histogram.get(index, 0) + 1


def merge(histograms: Iterable[Mapping[int, int]]) -> dict[int, int]:
    merged: dict[int, int] = {}
    for histogram in histograms:
        for index, count in histogram.items():
            merged[index] = merged.get(index, 0) + count
    return merged


def percentiles(histogram: Mapping[int, int], quantiles: Iterable[float]) -> list[float | None]:
    """Values (ms, rounded to 0.01) at each quantile in 0..1; None when empty."""
    wanted = list(quantiles)
    total = sum(histogram.values())
    if total == 0:
        return [None] * len(wanted)
    ordered = sorted(histogram.items())
    answers: list[float | None] = []
    for q in wanted:
        rank = max(1, math.ceil(q * total))
        seen = 0
        for index, count in ordered:
            seen += count
            if seen >= rank:
                answers.append(round(bucket_value(index), 2))
                break
    return answers
