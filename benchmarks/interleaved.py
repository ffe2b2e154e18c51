"""The project's own bench phases, run alternately on two checkouts of the project.

Usage: python benchmarks/interleaved.py OTHER_CHECKOUT [--rounds 2] [--count 300000] [--engine tansu|kafka]

Changes are judged by interleaved runs on this noisy, shared 2-core host (see README,
"Figures"): each round runs the backlog (one process, and two processes with
``task.batch`` of 100) and the 500 tasks/s latency phase of ``make bench`` first on
OTHER_CHECKOUT, then on this one, each on a fresh embedded broker of ``--engine`` (Tansu
by default; an OTHER_CHECKOUT whose bench predates engines runs on Tansu only). Both
checkouts must have their hot path built (``make native``) if it is to be compared compiled.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

_PHASES = """
import json, sys, tempfile
from pathlib import Path
try:  # the layout since streams/ was grouped by concern, then the one before
    from benchmarks import bench
    from streams.runtime import native
except ImportError:
    from streams import bench, native
count, agents, packed_only, engine = int(sys.argv[1]), 30_000, sys.argv[2] == "1", sys.argv[3]
on = {"engine": engine} if engine != "tansu" else {}
out = []
systems = [(bench.Project(), True), (bench.Project(pack=100, processes=2), False)]
with tempfile.TemporaryDirectory() as tmp:
    for i, (system, latency) in enumerate(systems[1:] if packed_only else systems):
        work = Path(tmp) / f"{i}-backlog"; work.mkdir()
        m = bench.measure_backlog(system, count, agents, work, **on)
        out.append([system.name, "backlog", m.tasks_per_second, None])
        if latency:
            work = Path(tmp) / f"{i}-latency"; work.mkdir()
            m = bench.measure_latency(system, 500.0, 20.0, agents, work, **on)
            out.append([system.name, "500/s", m.tasks_per_second, m.latency_ms])
print("RESULT " + json.dumps({"hot_path": native.describe(), "rows": out}))
"""


def run_phases(checkout: Path, count: int, packed_only: bool, engine: str = "tansu") -> dict[str, object]:
    venv = HERE / ".venv" / "bin" / "python"
    python = venv if venv.exists() else Path(sys.executable)  # a worktree uses its main checkout's venv
    done = subprocess.run(  # noqa: S603 - our own interpreter and script
        [str(python), "-c", _PHASES, str(count), "1" if packed_only else "0", engine],
        cwd=checkout,
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--count", type=int, default=300_000)
    parser.add_argument("--packed-only", action="store_true", help="only the two-process task.batch backlog")
    parser.add_argument("--engine", choices=("tansu", "kafka"), default="tansu", help="the embedded broker")
    args = parser.parse_args()
    for round_no in range(1, args.rounds + 1):
        for label, checkout in (("other", args.other.resolve()), ("this", HERE)):
            result = run_phases(checkout, args.count, args.packed_only, args.engine)
            print(f"round {round_no} {label} ({checkout}, {result['hot_path']}):", flush=True)
            for name, phase, rate, latency in result["rows"]:  # type: ignore[union-attr]
                print(f"  {name} | {phase} | {rate:,} tasks/s | {latency or ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
