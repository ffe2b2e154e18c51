"""Write where every thread and asyncio task of a worker is, for SIGUSR1 and SIGUSR2.

Faust's service library answers SIGUSR1 with its own dump, which fails on the compiled hot
path's coroutines (they have no ``cr_frame``) and crashes the worker, and SIGUSR2 with a
debugger that holds the event loop while a terminal is on stdin. A worker answers both with
this dump instead, and goes on.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback
from typing import TextIO


def dump_stacks(out: TextIO, loop: asyncio.AbstractEventLoop) -> None:
    """Each thread's stack, then each task of ``loop`` with the frames asyncio can see."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    lines = ["=== stacks of the worker's threads"]
    for ident, frame in sys._current_frames().items():  # noqa: SLF001 - the one way to see other threads
        lines.append(f"--- thread {names.get(ident, ident)}")
        lines.extend(line.rstrip("\n") for line in traceback.format_stack(frame))
    tasks = asyncio.all_tasks(loop)
    lines.append(f"=== {len(tasks)} asyncio tasks")
    for task in sorted(tasks, key=lambda task: task.get_name()):
        coro = task.get_coro()
        lines.append(f"--- {task.get_name()}: {getattr(coro, '__qualname__', type(coro).__name__)}")
        # Compiled coroutines show no frames here; their task's name and coroutine still do.
        for frame in task.get_stack(limit=20):
            lines.append(f"    {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        lines.extend(awaited(coro))
    out.write("\n".join(lines) + "\n")
    out.flush()


def awaited(coro: object, limit: int = 30) -> list[str]:
    """Where a task's coroutine waits: each coroutine it awaits, down to the innermost one.

    A task's stack shows only its own coroutine's frame; what holds it up (a service's
    stop waiting for one of its tasks, say) is further down the chain of awaits.
    """
    lines: list[str] = []
    current = getattr(coro, "cr_await", None)
    while current is not None and len(lines) < limit:
        frame = getattr(current, "cr_frame", None) or getattr(current, "gi_frame", None)
        if frame is not None:
            lines.append(f"      awaits {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        else:
            lines.append(f"      awaits {type(current).__qualname__}")
        current = getattr(current, "cr_await", None) or getattr(current, "gi_yieldfrom", None)
    return lines
