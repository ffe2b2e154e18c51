"""``inference`` with a real model: the agent's memory as the conversation's context.

The messages sent are, in order: a system message (the agent's working-memory system
message, if any, and the memories that a search of the agent's memory returns for the
task), the working-memory turns that fit the model's token budget (newest kept), and the
task's prompt. The prompt and the answer are written to working memory.
"""

from __future__ import annotations

from typing import Any

from agents.base import Result, TaskContext, TaskFailed
from agents.memory import token_count
from schemas.wire import TaskEvent
from streams.llm.client import ChatClient, Message, ModelRefused

_ROLES = {"user", "assistant", "system"}


class ModelInference:
    def __init__(self, client: ChatClient, context_tokens: int, memories: int) -> None:
        self.client = client
        self.context_tokens = context_tokens
        self.memories = memories

    async def __call__(self, task: TaskEvent, context: TaskContext) -> Result:
        prompt = task.description or task.title
        found = context.search(prompt, self.memories) if self.memories else []
        messages, turns = build_messages(context.recall(10_000), found, prompt, self.context_tokens)
        try:
            answer = await self.client.chat(messages)
        except ModelRefused as exc:
            raise TaskFailed(str(exc)) from None
        context.remember(prompt, role="user")
        context.remember(answer, role="assistant")
        return {
            "text": answer,
            "model": self.client.model,
            "context_turns": turns,
            "memories": [entry["id"] for entry in found],
        }


def build_messages(
    working: list[dict[str, Any]], found: list[dict[str, Any]], prompt: str, budget_tokens: int
) -> tuple[list[Message], int]:
    """The chat messages for ``prompt`` and how many working-memory turns they hold."""
    system_parts = [entry["content"] for entry in working if entry["role"] == "system"]
    turns = [entry for entry in working if entry["role"] != "system"]
    if found:
        recalled = "\n".join(f"- {entry['content']}" for entry in found)
        system_parts.append(f"Relevant memories:\n{recalled}")
    system = "\n\n".join(system_parts)
    left = budget_tokens - token_count(prompt) - (token_count(system) if system else 0)
    kept: list[Message] = []
    for entry in reversed(turns):
        cost = token_count(entry["content"])
        if cost > left:
            break
        left -= cost
        role = entry["role"] if entry["role"] in _ROLES else "user"
        kept.append({"role": role, "content": entry["content"]})
    kept.reverse()
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    return [*messages, *kept, {"role": "user", "content": prompt}], len(kept)
