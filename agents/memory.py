"""Working memory of one agent: recent entries trimmed to a token budget.

The system message is always kept; the oldest other turns are dropped first. Entries that
leave (dropped turns, a system message replaced) are handed to the caller, which archives
them (see :mod:`streams.processing.agent_runner`). Entries form a per-agent integrity chain:
``hash = sha256(f"{content}|{timestamp}|{prev_hash}")``, starting at ``"GENESIS"``.
The state is a plain dict so that it serialises straight into the memory table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

GENESIS = "GENESIS"
CHARS_PER_TOKEN = 4
#: Consolidation (working -> episodic): once an agent holds more than this many entries,
#: those older than ``CONSOLIDATE_AFTER_MS`` leave working memory.
CONSOLIDATE_ABOVE = 100
CONSOLIDATE_AFTER_MS = 3_600_000
#: Consolidation (episodic -> semantic): once an agent holds more than this many episodic
#: entries, those older than ``PROMOTE_AFTER_MS`` become semantic (settings can change both).
PROMOTE_ABOVE = 1000
PROMOTE_AFTER_MS = 7 * 86_400_000
#: Episodic entries are tallied by creation time in spans of a seventh of the promotion age
#: (a day at the default): a promotion moves whole spans, so each entry it moves is older
#: than the promotion age, and the memory row stays small whatever the episodic tier holds.
SPANS_PER_PROMOTION_AGE = 7
#: How long an entry stays in a tier (DOMAIN.md): a turn older than a day leaves working
#: memory at the agent's next memory write, and an episodic entry older than 30 days becomes
#: semantic when the agent's episodic tier next changes, whatever the counts.
WORKING_LIFETIME_MS = 86_400_000
EPISODIC_LIFETIME_MS = 30 * 86_400_000
TIER_LIFETIME_MS: dict[str, int] = {"working": WORKING_LIFETIME_MS, "episodic": EPISODIC_LIFETIME_MS}
#: An entry's importance (0..1) unless its writer says otherwise; stored only when it differs.
DEFAULT_IMPORTANCE = 0.5


def token_count(text: str) -> int:
    return max(1, len(text) // CHARS_PER_TOKEN)


def empty_memory() -> dict[str, Any]:
    return {"system": None, "turns": [], "tokens": 0, "head": GENESIS, "written": 0}


def file_episodic(
    memory: dict[str, Any],
    left: list[dict[str, Any]],
    now_ms: int,
    promote_above: int = PROMOTE_ABOVE,
    promote_after_ms: int = PROMOTE_AFTER_MS,
    lifetime_ms: int = EPISODIC_LIFETIME_MS,
) -> tuple[int, int] | None:
    """Count ``left`` (entries that left working memory) into ``memory``'s episodic tier, then
    promote its old entries to the semantic tier: those older than ``promote_after_ms`` if it
    holds more than ``promote_above``, and those older than ``lifetime_ms`` in any case.

    The row keeps ``episodic``, a flat list ``[span, count, span, count, ...]`` (oldest span
    first), ``semantic``, the entries promoted so far, and ``semantic_before``: an episodic
    entry created before it is semantic (:func:`tier_of`). Returns ``(semantic_before,
    promoted)`` when entries were promoted, else None. Lists are replaced, never changed in
    place (rows share them with their stored copies).
    """
    span_ms = max(1, promote_after_ms // SPANS_PER_PROMOTION_AGE)
    before: int = memory.get("semantic_before", 0)
    tally = dict(zip(memory.get("episodic", ())[::2], memory.get("episodic", ())[1::2], strict=True))
    semantic: int = memory.get("semantic", 0)
    for entry in left:
        created: int = entry["created_at"]
        if created < before:
            semantic += 1  # an old entry (a system message) leaving after its time was promoted
        else:
            span = created // span_ms
            tally[span] = tally.get(span, 0) + 1
    promoted = 0
    cutoff = (now_ms - lifetime_ms) // span_ms  # spans before it are wholly old enough
    if sum(tally.values()) > promote_above:
        cutoff = max(cutoff, (now_ms - promote_after_ms) // span_ms)
    for span in [span for span in tally if span < cutoff]:
        promoted += tally.pop(span)
    if promoted:
        before = max(before, cutoff * span_ms)
        memory["semantic_before"] = before
    memory["episodic"] = [number for span in sorted(tally) for number in (span, tally[span])]
    memory["semantic"] = semantic + promoted
    return (before, promoted) if promoted else None


def tier_counts(memory: dict[str, Any]) -> dict[str, int]:
    """The agent's entries in each tier."""
    return {
        "working": len(memory["turns"]) + (1 if memory["system"] else 0),
        "episodic": sum(memory.get("episodic", ())[1::2]),
        "semantic": memory.get("semantic", 0),
    }


def tier_of(entry: dict[str, Any], memory: dict[str, Any] | None, semantic_before: int | None = None) -> str:
    """The tier of a stored entry (a row of ``memory_entries``), given its agent's memory row
    (or the row's ``semantic_before``)."""
    tier: str = entry.get("tier", "episodic")
    if semantic_before is None:
        semantic_before = 0 if memory is None else memory.get("semantic_before", 0)
    if tier == "episodic" and entry["created_at"] < semantic_before:
        return "semantic"
    return tier


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
    importance: float = DEFAULT_IMPORTANCE,
) -> dict[str, Any]:
    """Append one entry to ``memory`` (in place), trim it, and return the entry.

    The entries that leave working memory meanwhile are added to ``left``, oldest first.
    """
    prev_hash = memory["head"]
    digest = chain_hash(content, timestamp_ms, prev_hash)
    tokens = token_count(content)
    entry = {
        "id": entry_id(digest),
        "agent_id": agent_id,
        "key": f"{agent_id}:{key or digest[:12]}",
        "role": role,
        "content": content,
        "memory_type": memory_type,
        "tokens": tokens,
        "created_at": timestamp_ms,
        "seq": memory["written"] + 1,  # its place on the agent's chain, from 1
        "hash": digest,
        "prev_hash": prev_hash,
    }
    if importance != DEFAULT_IMPORTANCE:
        entry["importance"] = importance
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
    """Move turns out of working memory and return how many: those older than a day (its
    lifetime), and those older than an hour once it holds over 100 entries.

    The system message stays, as with trimming; what leaves is added to ``left``.
    """
    turns = memory["turns"]
    crowded = len(turns) + (1 if memory["system"] else 0) > CONSOLIDATE_ABOVE
    cutoff = now_ms - (CONSOLIDATE_AFTER_MS if crowded else WORKING_LIFETIME_MS)
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


def walk_chain(
    memory: dict[str, Any],
    find: Callable[[str], dict[str, Any] | None],
    store: str,
    problems: list[str],
) -> tuple[set[str], bool]:
    """Walk an agent's memory chain from its head back to ``GENESIS``; returns the hashes
    walked, and whether the walk got there (not stopped by a missing entry or a loop).

    ``memory`` is the agent's memory row with its ``agent_id``; entries not in working memory
    are looked up by hash with ``find`` in the store named ``store``. What is wrong is added to
    ``problems``, the first broken link first.
    """
    what = f"memory of {memory['agent_id']}"
    written: int = memory["written"]
    held = {entry["hash"]: entry for entry in entries(memory)}
    on_chain: set[str] = set()
    digest: str = memory["head"]
    while digest != GENESIS:
        number = written - len(on_chain)  # 1: the first entry written
        entry = held.get(digest) or find(digest)
        if entry is None:
            problems.append(
                f"{what}: entry {number} of {written} ({digest[:12]}) left working memory but is not in {store}"
            )
            return on_chain, False
        if digest in on_chain or number < 1:
            problems.append(f"{what}: the chain is longer than the {written} entries written")
            return on_chain, False
        if chain_hash(entry["content"], entry["created_at"], entry["prev_hash"]) != digest:
            where = "working memory" if digest in held else store
            problems.append(f"{what}: entry {number} ({digest[:12]}) in {where} does not match its hash")
        on_chain.add(digest)
        digest = entry["prev_hash"]
    if len(on_chain) != written:
        problems.append(f"{what}: the chain holds {len(on_chain)} entries, the row counts {written} written")
    return on_chain, True


def describe(entry: dict[str, Any], tier: str) -> dict[str, Any]:
    """An entry as the API serves it: DOMAIN.md's fields (defaults filled in), its tier, and
    when it leaves that tier (``expires_at``; None for the tiers kept forever)."""
    lifetime = TIER_LIFETIME_MS.get(tier)
    created: int = entry["created_at"]
    return {
        "id": entry["id"],
        "agent_id": entry["agent_id"],
        "key": entry["key"],
        "content": entry["content"],
        "memory_type": entry["memory_type"],
        "role": entry["role"],
        "importance": entry.get("importance", DEFAULT_IMPORTANCE),
        "access_count": entry.get("access_count", 0),
        "last_accessed": entry.get("last_accessed"),
        "tier": tier,
        "tokens": entry["tokens"],
        "seq": entry.get("seq"),
        "hash": entry["hash"],
        "prev_hash": entry["prev_hash"],
        "created_at": created,
        "expires_at": None if lifetime is None else created + lifetime,
    }


def accessed(entry: dict[str, Any], at_ms: int) -> dict[str, Any]:
    """A copy of ``entry`` with one more access, at ``at_ms``."""
    return {**entry, "access_count": entry.get("access_count", 0) + 1, "last_accessed": at_ms}


def count_accesses(memory: dict[str, Any], ids: set[str], at_ms: int) -> set[str]:
    """Count an access of each working-memory entry whose id is in ``ids`` (the lists are
    replaced, not changed in place); returns the ids found there."""
    found: set[str] = set()
    system = memory["system"]
    if system is not None and system["id"] in ids:
        memory["system"] = accessed(system, at_ms)
        found.add(system["id"])
    if any(turn["id"] in ids for turn in memory["turns"]):
        turns = [accessed(turn, at_ms) if turn["id"] in ids else turn for turn in memory["turns"]]
        found.update(turn["id"] for turn in turns if turn["id"] in ids)
        memory["turns"] = turns
    return found


def chain_order(entry: dict[str, Any]) -> tuple[int, int]:
    """A sort key that puts an agent's entries in the order they were written."""
    return entry.get("seq", 0), entry["created_at"]


def entry_id(digest: str) -> str:
    """The id of the entry whose hash is ``digest``."""
    return f"mem_{digest[:20]}"


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
