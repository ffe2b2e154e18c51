"""Canonical names and values of the domain, and the variants accepted on input."""

from __future__ import annotations

import itertools
import re
import secrets

TASK_KINDS = frozenset({"inference", "code_analysis", "memory_operation", "tool_execution", "coordination"})
AGENT_TYPES = frozenset({"worker", "reasoning", "security", "analytics", "memory", "creative"})
PRIORITIES: dict[str, int] = {"critical": 0, "high": 1, "normal": 5, "low": 8, "bulk": 10}
_PRIORITY_BY_NUMBER = {number: name for name, number in PRIORITIES.items()}
PRIORITY_VARIANTS = {"medium": "normal"}

TASK_STATUSES = ("queued", "in_progress", "completed", "failed", "dead", "cancelled")
TASK_STATUS_VARIANTS = {"pending": "queued", "available": "queued", "running": "in_progress", "claimed": "in_progress"}
AGENT_STATUSES = ("offline", "idle", "busy", "paused")
AGENT_STATUS_VARIANTS = {"online": "idle", "ready": "idle", "standby": "offline"}

MEMORY_TYPES = frozenset({"conversation", "task_completion", "decision", "observation", "feedback", "error"})

#: Ids are checked with ``fullmatch``: ``match`` with ``$`` would let a trailing newline in.
AGENT_ID = re.compile(r"agent_[a-z0-9]+(?:_[a-z0-9]+)*_\d{3,}")
#: The longest agent id accepted (a task id's pattern caps it at 5 + 64 characters).
MAX_AGENT_ID = 128
TASK_ID = re.compile(r"task_[A-Za-z0-9_\-]{1,64}")
MAX_TASK_ID = 69
#: A memory entry's id: ``mem_`` and the first 20 hex digits of its chain hash.
MEMORY_ID = re.compile(r"mem_[0-9a-f]{20}")

#: The built-in named agents and their types.
NAMED_AGENTS = {
    "lucidia": "reasoning",
    "alice": "worker",
    "octavia": "analytics",
    "prism": "analytics",
    "echo": "memory",
    "cipher": "security",
}


def canonical_priority(value: object) -> str | None:
    """Map a priority name, variant or number to its canonical name (None if unknown)."""
    if isinstance(value, str):
        name = value.lower()
        name = PRIORITY_VARIANTS.get(name, name)
        return name if name in PRIORITIES else None
    if isinstance(value, int) and not isinstance(value, bool):
        return _PRIORITY_BY_NUMBER.get(value)
    return None


def canonical_agent_status(value: str) -> str | None:
    name = value.lower()
    name = AGENT_STATUS_VARIANTS.get(name, name)
    return name if name in AGENT_STATUSES else None


def canonical_task_status(value: str) -> str | None:
    name = value.lower()
    name = TASK_STATUS_VARIANTS.get(name, name)
    return name if name in TASK_STATUSES else None


class _IdSource:
    """Unique ids without a system call each: a random per-process stem and a counter."""

    def __init__(self) -> None:
        self._stem = secrets.token_hex(6)
        self._next = itertools.count(1).__next__

    def __call__(self, prefix: str) -> str:
        return f"{prefix}_{self._stem}{self._next():x}"


#: A fresh unique id such as ``evt_3f9a0c21b7d41a`` (prefix without the underscore).
new_id = _IdSource()
