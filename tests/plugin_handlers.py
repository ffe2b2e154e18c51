"""A handler plug-in as a user's package would ship one (used by the plug-in tests)."""

from __future__ import annotations

from agents.base import Result, TaskContext
from agents.registry import HandlerRegistry
from schemas.wire import TaskEvent


def shout(task: TaskEvent, context: TaskContext) -> Result:
    """``code_analysis`` done differently: the code, upper-cased, remembered."""
    code = str(task.payload.get("code", ""))
    context.remember(code.upper(), role="assistant", memory_type="observation", importance=0.8)
    return {"plugin": "shout", "code": code.upper()}


def register(registry: HandlerRegistry) -> None:
    registry.register("code_analysis", shout)


def broken(registry: HandlerRegistry) -> None:
    raise RuntimeError("this plug-in cannot start")
