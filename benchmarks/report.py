"""What every baseline app prints: one JSON line when it has processed the expected count.

Run as a script, it prints the report of a ``make bench`` run again from its JSON,
one section per engine: ``python -m benchmarks.report [bench-results/latest.json]``.
"""

from __future__ import annotations

import json
import math
import sys
import time


class Tally:
    """Counts processed tasks and their end-to-end latency (event ts -> state written)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.first: float | None = None
        self.latencies_ms: list[float] = []
        self.reported = False

    def done_one(self, created_ms: int) -> None:
        now = time.time()
        if self.first is None:
            self.first = now
            emit({"event": "first", "at": now})
        self.count += 1
        self.latencies_ms.append(now * 1000.0 - created_ms)
        if self.count >= self.expected and not self.reported:
            self.reported = True
            self.report(now)

    def report(self, now: float) -> None:
        ordered = sorted(self.latencies_ms)

        def pct(q: float) -> float:
            return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 2)

        line = {
            "event": "done",
            "count": self.count,
            "first": self.first,
            "last": now,
            "latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99)},
        }
        emit(line)


def emit(line: dict[str, object]) -> None:
    """Write one JSON line to the real stdout (Faust redirects ``sys.stdout`` to its log)."""
    stream = sys.__stdout__
    assert stream is not None
    stream.write(json.dumps(line) + "\n")
    stream.flush()


def main(argv: list[str]) -> int:
    """Print the report of a bench run from its JSON (default ``bench-results/latest.json``)."""
    from pathlib import Path

    from benchmarks.bench import render

    path = Path(argv[0] if argv else "bench-results/latest.json")
    print(render(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
