"""Working memory of one agent: recent entries trimmed to a token budget.

The system message is always kept; the oldest other turns are dropped first. Entries that
leave (dropped turns, a system message replaced) are handed to the caller, which archives
them (see :mod:`streams.agent_runner`). Entries form a per-agent integrity chain:
``hash = sha256(f"{content}|{timestamp}|{prev_hash}")``, starting at ``"GENESIS"``.
The state is a plain dict so that it serialises straight into the memory table.
"""

from __future__ import annotations

import hashlib
from typing import Any

GENESIS = "GENESIS"
CHARS_PER_TOKEN = 4
#: Consolidation (working -> episodic): once an agent holds more than this many entries,
#: those older than ``CONSOLIDATE_AFTER_MS`` leave working memory.
CONSOLIDATE_ABOVE = 100
CONSOLIDATE_AFTER_MS = 3_600_000


def token_count(text: str) -> int:
    return max(1, len(text) // CHARS_PER_TOKEN)


def empty_memory() -> dict[str, Any]:
    return {"system": None, "turns": [], "tokens": 0, "head": GENESIS, "written": 0}


def chain_hash(content: str, timestamp_ms: int, prev_hash: str) -> str:
    return hashlib.sha256(f"{content}|{timestamp_ms}|{prev_hash}".encode()).hexdigest()


def append(
    memory: dict[str, Any],
    agent_id: str,
    content: str,
    *,
    role: str,
    memory_type: str,
    timestamp_ms: int,
    budget_tokens: int,
    key: str | None = None,
    left: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Append one entry to ``memory`` (in place), trim it, and return the entry.

    The entries that leave working memory meanwhile are added to ``left``, oldest first.
    """
    prev_hash = memory["head"]
    digest = chain_hash(content, timestamp_ms, prev_hash)
    tokens = token_count(content)
    entry = {
        "id": f"mem_{digest[:20]}",
        "agent_id": agent_id,
        "key": f"{agent_id}:{key or digest[:12]}",
        "role": role,
        "content": content,
        "memory_type": memory_type,
        "tokens": tokens,
        "created_at": timestamp_ms,
        "hash": digest,
        "prev_hash": prev_hash,
    }
    memory["head"] = digest
    memory["written"] += 1
    if role == "system":
        old = memory["system"]
        memory["tokens"] += tokens - (old["tokens"] if old else 0)
        memory["system"] = entry
        if old is not None and left is not None:
            left.append(old)
    else:
        memory["turns"].append(entry)
        memory["tokens"] += tokens
    _trim(memory, budget_tokens, left)
    consolidate(memory, timestamp_ms, left)
    return entry


def consolidate(memory: dict[str, Any], now_ms: int, left: list[dict[str, Any]] | None) -> int:
    """Move turns older than an hour out of a memory holding over 100 entries; return how many.

    The system message stays, as with trimming; what leaves is added to ``left``.
    """
    turns = memory["turns"]
    if len(turns) + (1 if memory["system"] else 0) <= CONSOLIDATE_ABOVE:
        return 0
    cutoff = now_ms - CONSOLIDATE_AFTER_MS
    old = 0
    while old < len(turns) and turns[old]["created_at"] < cutoff:
        old += 1
    if old:
        if left is not None:
            left.extend(turns[:old])
        memory["tokens"] -= sum(turn["tokens"] for turn in turns[:old])
        del turns[:old]
    return old


def _trim(memory: dict[str, Any], budget_tokens: int, left: list[dict[str, Any]] | None) -> None:
    turns = memory["turns"]
    drop = 0
    total = memory["tokens"]
    while total > budget_tokens and drop < len(turns):
        total -= turns[drop]["tokens"]
        drop += 1
    if drop:
        if left is not None:
            left.extend(turns[:drop])
        del turns[:drop]
        memory["tokens"] = total


def entries(memory: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries in order: system message first, then turns oldest to newest."""
    system = memory["system"]
    return ([system] if system else []) + list(memory["turns"])


def verify_chain(memory: dict[str, Any]) -> bool:
    """Check that the retained turns link to each other through their hashes."""
    previous: str | None = None
    for entry in memory["turns"]:
        if entry["hash"] != chain_hash(entry["content"], entry["created_at"], entry["prev_hash"]):
            return False
        if previous is not None and entry["prev_hash"] != previous:
            # A system message written in between sits outside the turn list.
            system = memory["system"]
            if not (system and system["prev_hash"] == previous and entry["prev_hash"] == system["hash"]):
                return False
        previous = entry["hash"]
    return True
