"""The model-backed ``inference`` handler against a real HTTP server (tests/model_server.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from streams.llm.client import ChatClient, ModelRefused, ModelUnavailable
from streams.llm.handler import build_messages
from streams.runtime.circuit import CircuitBreaker
from tests.factories import record, task
from tests.harness import Deployment, produce, wait_until
from tests.model_server import ModelServer

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def server() -> Any:
    with ModelServer() as running:
        yield running


def _client(server: ModelServer, api: str = "ollama", **options: Any) -> ChatClient:
    settings = {"timeout": 2.0, "retries": 2, **options}
    return ChatClient(api, server.url, "tiny", **settings)


async def _chats(client: ChatClient, count: int, messages: list[dict[str, str]] = HELLO) -> list[str]:
    try:
        return [await client.chat(messages) for _ in range(count)]
    finally:
        await client.close()


@pytest.mark.parametrize(("api", "path"), [("ollama", "/api/chat"), ("openai", "/v1/chat/completions")])
def test_both_apis_answer_over_one_kept_open_connection(server: ModelServer, api: str, path: str) -> None:
    answers = asyncio.run(_chats(_client(server, api), 5))
    assert answers == ["echo: hello"] * 5
    assert [p for p, _, _ in server.requests] == [path] * 5
    assert server.requests[0][1]["model"] == "tiny" and server.requests[0][1]["messages"] == HELLO
    assert server.connections == 1


def test_server_errors_are_retried_with_backoff_and_client_errors_are_not(server: ModelServer) -> None:
    server.fail_next(2, 503)
    started = time.monotonic()
    assert asyncio.run(_chats(_client(server), 1)) == ["echo: hello"]
    assert len(server.requests) == 3
    assert time.monotonic() - started >= 0.2 + 0.4  # backoff 0.2 s, then 0.4 s
    server.fail_next(1, 404)
    with pytest.raises(ModelRefused, match="404"):
        asyncio.run(_chats(_client(server), 1))
    assert len(server.requests) == 4


def test_a_stalled_server_times_out_and_each_retry_has_its_deadline(server: ModelServer) -> None:
    server.stall_next(3, 5.0)
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match="after 3 attempts"):
        asyncio.run(_chats(_client(server, timeout=0.3), 1))
    assert time.monotonic() - started < 3.0
    assert len(server.requests) == 3


def test_the_breaker_opens_after_repeated_failures_and_a_trial_closes_it(server: ModelServer) -> None:
    async def scenario() -> None:
        breaker = CircuitBreaker(failure_threshold=3, reset_timeout=0.5, max_reset_timeout=5.0)
        client = _client(server, retries=0, breaker=breaker)
        try:
            server.fail_next(3, 500)
            for _ in range(3):
                with pytest.raises(ModelUnavailable):
                    await client.chat(HELLO)
            assert breaker.state == "open"
            with pytest.raises(ModelUnavailable, match="circuit open"):
                await client.chat(HELLO)
            assert len(server.requests) == 3  # not called while open
            await asyncio.sleep(0.55)
            assert await client.chat(HELLO) == "echo: hello"  # the trial call
            assert breaker.state == "closed"
        finally:
            await client.close()

    asyncio.run(scenario())


def test_the_context_keeps_the_newest_turns_within_the_budget_and_the_memories_found() -> None:
    working = [{"role": "system", "content": "You are terse."}] + [
        {"role": "user" if n % 2 == 0 else "assistant", "content": f"turn {n} " + "x" * 36} for n in range(10)
    ]
    found = [{"id": "mem_1", "content": "the parcel ships to Berlin"}]
    messages, turns = build_messages(working, found, "where does it ship?", budget_tokens=50)
    assert messages[0] == {
        "role": "system",
        "content": "You are terse.\n\nRelevant memories:\n- the parcel ships to Berlin",
    }
    assert messages[-1] == {"role": "user", "content": "where does it ship?"}
    # 50 tokens less the prompt (4) and the system message (15) leave 31: three turns of 10.
    assert turns == 3
    assert [m["content"][:6] for m in messages[1:-1]] == ["turn 7", "turn 8", "turn 9"]


def _finished_task(worker: Any, task_id: str):  # type: ignore[no-untyped-def]
    def check():  # type: ignore[no-untyped-def]
        status, row = worker.get(f"/v1/tasks/{task_id}")
        return status == 200 and row["status"] in ("completed", "failed", "dead") and row

    return check


def test_inference_tasks_run_on_the_model_with_the_agents_memory(deployment: Deployment, server: ModelServer) -> None:
    deployment.env["BLACKROAD_LLM_URL"] = server.url
    deployment.env["BLACKROAD_LLM_API"] = "openai"
    deployment.env["BLACKROAD_LLM_RETRIES"] = "0"
    deployment.env["BLACKROAD_MAX_ATTEMPTS"] = "1"
    worker = deployment.worker().start().wait_ready()
    agent = "agent_model_001"
    notes = ["The package for order 4471 ships to Berlin on Thursday.", "Maria enjoys writing Rust."]
    writes = [task(agent, "memory_operation", {"op": "write", "content": note}) for note in notes]
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(e) for e in writes])
    wait_until(lambda: worker.stats()["completed_tasks"] >= 2, 60, what="the notes written")
    time.sleep(1.0)  # indexed by the next flushes
    question = task(agent, "inference", {})
    question.description = "where does order 4471 ship to"
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(question)])
    done = wait_until(_finished_task(worker, question.task_id), 60, what="the answer")
    assert done["status"] == "completed", done
    assert done["result"]["text"] == "echo: where does order 4471 ship to"
    assert done["result"]["model"] == "llama3.2" and done["result"]["context_turns"] == 2
    path, body, _ = server.requests[-1]
    assert path == "/v1/chat/completions"
    assert body["messages"][0]["role"] == "system" and notes[0] in body["messages"][0]["content"]
    assert [m["content"] for m in body["messages"][1:]] == [*notes, "where does order 4471 ship to"]
    # The exchange is in working memory now.
    memory = worker.get(f"/v1/agents/{agent}/memory")[1]
    assert [e["content"] for e in memory["entries"]][-2:] == [
        "where does order 4471 ship to",
        "echo: where does order 4471 ship to",
    ]
    # A server that fails: the task is dead-lettered with the reason, and the worker goes on.
    server.fail_next(1, 500)
    failing = task(agent, "inference", {})
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(failing)])
    dead = wait_until(_finished_task(worker, failing.task_id), 60, what="the failure")
    assert dead["status"] == "dead" and "HTTP 500" in dead["error"], dead
