"""Built-in handlers. Deterministic for a given task, so results can be checked exactly."""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from statistics import NormalDist

from agents.base import Result, TaskContext, TaskFailed
from agents.memory import DEFAULT_IMPORTANCE
from schemas.domain import MEMORY_TYPES
from schemas.wire import TaskEvent

_TOOLS = {
    "echo": lambda value: value,
    "upper": lambda value: str(value).upper(),
    "reverse": lambda value: str(value)[::-1],
    "wordcount": lambda value: len(str(value).split()),
    "sum": lambda value: sum(float(x) for x in value),
}


def run_tool(task: TaskEvent, context: TaskContext) -> Result:
    """``tool_execution``: payload ``{"tool": "echo|upper|reverse|wordcount|sum", "input": ...}``."""
    name = task.payload.get("tool", "echo")
    tool = _TOOLS.get(name)
    if tool is None:
        raise TaskFailed(f"unknown tool {name!r}; known: {sorted(_TOOLS)}")
    try:
        output = tool(task.payload.get("input", task.title))
    except (TypeError, ValueError) as exc:
        raise TaskFailed(f"tool {name!r} cannot take this input: {exc}") from None
    return {"tool": name, "output": output}


def coordinate(task: TaskEvent, context: TaskContext) -> Result:
    """``coordination``: splits the work over ``payload["agents"]`` in a stable order."""
    agents = sorted(str(a) for a in task.payload.get("agents", []))
    steps = [{"agent_id": agent, "step": i + 1} for i, agent in enumerate(agents)]
    return {"plan": steps, "coordinator": context.agent_id}


def analyse_code(task: TaskEvent, context: TaskContext) -> Result:
    """``code_analysis``: simple static facts about ``payload["code"]``."""
    code = str(task.payload.get("code", ""))
    lines = code.splitlines()
    return {
        "lines": len(lines),
        "chars": len(code),
        "functions": sum(1 for line in lines if line.lstrip().startswith(("def ", "async def "))),
        "todo": sum(1 for line in lines if "TODO" in line),
    }


def memory_operation(task: TaskEvent, context: TaskContext) -> Result:
    """``memory_operation``: ``{"op": "write"|"system"|"recall"|"search", ...}`` on the agent's memory."""
    op = task.payload.get("op", "write")
    if op in ("write", "system"):
        content = task.payload.get("content")
        if not isinstance(content, str) or not content:
            raise TaskFailed("memory write needs a non-empty string 'content'")
        memory_type = task.payload.get("memory_type", "conversation")
        if memory_type not in MEMORY_TYPES:
            raise TaskFailed(f"unknown memory_type {memory_type!r}")
        role = "system" if op == "system" else str(task.payload.get("role", "user"))
        key = task.payload.get("key")
        importance = task.payload.get("importance", DEFAULT_IMPORTANCE)
        if type(importance) not in (int, float) or not 0 <= importance <= 1:
            raise TaskFailed("memory write 'importance' must be a number from 0 to 1")
        entry = context.remember(
            content,
            role=role,
            memory_type=memory_type,
            key=key if isinstance(key, str) else None,
            importance=float(importance),
        )
        return {"op": op, "memory_id": entry["id"], "hash": entry["hash"]}
    if op == "recall":
        limit = task.payload.get("limit", 10)
        if not isinstance(limit, int) or limit < 0:
            raise TaskFailed("recall 'limit' must be a non-negative integer")
        recalled = context.recall(limit)
        return {"op": op, "entries": [{"id": e["id"], "role": e["role"], "content": e["content"]} for e in recalled]}
    if op == "search":
        query = task.payload.get("query")
        limit = task.payload.get("limit", 5)
        if not isinstance(query, str) or not query:
            raise TaskFailed("memory search needs a non-empty string 'query'")
        if type(limit) is not int or not 1 <= limit <= 100:
            raise TaskFailed("memory search 'limit' must be an integer from 1 to 100")
        found = context.search(query, limit)
        return {"op": op, "entries": [{"id": e["id"], "score": e.get("score"), "content": e["content"]} for e in found]}
    raise TaskFailed(f"unknown memory op {op!r}; expected write, system, recall or search")


class SimulatedInference:
    """``inference`` without a model: a log-normal latency, then a deterministic answer.

    The latency of a task is drawn from a generator seeded by its id, so reruns of the
    same task take the same time. ``payload["latency_ms"]`` overrides the draw;
    ``payload["fail_attempts"] = n`` makes the first ``n`` attempts raise (to exercise retries).
    """

    def __init__(self, p50_ms: float, p99_ms: float) -> None:
        self.p50_ms = p50_ms
        self._mu = math.log(max(p50_ms, 1e-3))
        z99 = NormalDist().inv_cdf(0.99)
        self._sigma = math.log(max(p99_ms, 1e-3) / max(p50_ms, 1e-3)) / z99 if p50_ms > 0 else 0.0

    def latency_ms(self, task: TaskEvent) -> float:
        override = task.payload.get("latency_ms")
        if isinstance(override, (int, float)) and not isinstance(override, bool):
            return max(0.0, float(override))
        if self.p50_ms <= 0:
            return 0.0
        seed = int.from_bytes(hashlib.blake2b(task.task_id.encode(), digest_size=8).digest(), "big")
        return random.Random(seed).lognormvariate(self._mu, self._sigma)  # noqa: S311 - simulation

    async def __call__(self, task: TaskEvent, context: TaskContext) -> Result:
        delay = self.latency_ms(task)
        if delay > 0:
            await asyncio.sleep(delay / 1000.0)
        fail_attempts = task.payload.get("fail_attempts", 0)
        if isinstance(fail_attempts, int) and context.attempt <= fail_attempts:
            raise RuntimeError(f"simulated model error on attempt {context.attempt}")
        prompt = task.description or task.title
        recalled = context.recall(3)
        answer = f"{context.agent_id} answered {prompt!r} with {len(recalled)} turns of context"
        context.remember(prompt, role="user")
        context.remember(answer, role="assistant")
        return {"text": answer, "latency_ms": round(delay, 3), "context_turns": len(recalled)}
