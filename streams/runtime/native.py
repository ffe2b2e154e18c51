"""The hot path compiled ahead of time with mypyc: the same source, as C extension modules.

``make`` runs ``python -m streams.runtime.native build`` whenever a source file of the three
packages changes; mypyc turns each of :data:`MODULES` into a C extension beside its
source, which Python then imports instead of the ``.py`` file. The code stays plain,
type-checked Python and runs unchanged without the build (``python -m streams.runtime.native
clean`` removes it); compiled, the per-task work costs about a quarter less CPU (see
README, "A compiled hot path").

A compiled module older than its source would run code that is no longer there, so the
worker and the test suite refuse to start on one (:func:`check`).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The modules every task passes through, compiled as one group (calls between them are native).
MODULES = (
    "schemas/wire.py",
    "agents/base.py",
    "agents/builtin.py",
    "streams/cold_rows/row_file.py",
    "streams/processing/histogram.py",
    "streams/processing/state.py",
    "streams/processing/tables.py",
    "streams/processing/agent_runner.py",
    "streams/processing/processor.py",
)
#: The group's shared library, ``streams/hotpath__mypyc.*.so``.
GROUP = "streams.hotpath"
_BUILD_DIR = ROOT / "build" / "native"


class StaleBuild(RuntimeError):
    """A compiled module is older than its source."""


def compiled(source: Path) -> list[Path]:
    """The extension modules built from ``source`` (none when it runs as plain Python)."""
    return sorted(source.parent.glob(f"{source.stem}.*.so"))


def stale(root: Path = ROOT, modules: tuple[str, ...] = MODULES) -> list[str]:
    """Modules whose compiled form is older than their source."""
    found = []
    for name in modules:
        source = root / name
        found += [name for built in compiled(source) if built.stat().st_mtime < source.stat().st_mtime]
    return found


def describe() -> str:
    """Whether the hot path runs compiled, for reports."""
    built = sum(1 for name in MODULES if compiled(ROOT / name))
    if built == len(MODULES):
        return "compiled with mypyc"
    return "plain Python" if built == 0 else f"{built} of {len(MODULES)} modules compiled with mypyc"


def check() -> None:
    """Raise :class:`StaleBuild` when a compiled module would run outdated code."""
    outdated = stale()
    if outdated:
        raise StaleBuild(
            f"compiled modules are older than their source: {', '.join(outdated)}; "
            "run `make native` to rebuild, or `python -m streams.runtime.native clean` to run as plain Python"
        )


def clean() -> None:
    """Remove the build: every module runs as plain Python again."""
    for name in MODULES:
        for built in compiled(ROOT / name):
            built.unlink()
    for shared in (ROOT / "streams").glob("hotpath__mypyc.*.so"):
        shared.unlink()
    shutil.rmtree(_BUILD_DIR, ignore_errors=True)


def build() -> None:
    """Compile :data:`MODULES` in place (needs mypy, a C compiler and the Python headers)."""
    from mypyc.build import mypycify
    from setuptools import setup

    clean()
    os.chdir(ROOT)  # build_ext --inplace writes each module beside its source, relative to here
    _BUILD_DIR.mkdir(parents=True, exist_ok=True)
    extensions = mypycify([str(ROOT / name) for name in MODULES], group_name=GROUP, target_dir=str(_BUILD_DIR))
    setup(
        name="blackroad-streams-native",
        ext_modules=extensions,
        script_args=[
            "build_ext",
            "--inplace",
            "--build-temp",
            str(_BUILD_DIR / "temp"),
            "--build-lib",
            str(_BUILD_DIR / "lib"),
        ],
    )


def main(argv: list[str]) -> int:
    commands = {"build": build, "clean": clean, "check": check}
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: python -m streams.runtime.native {{{'|'.join(commands)}}}", file=sys.stderr)
        return 2
    commands[argv[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
