"""Web views under load with locust (``pip install locust``).

    locust -f benchmarks/locustfile.py --host http://127.0.0.1:6066 \\
        --users 200 --spawn-rate 50 --run-time 2m --headless

Start the worker and a load first (``blackroad up --demo --agents 30000 --rate 500``);
agent ids follow the load generator's (``agent_load_00001`` ...).
"""

from __future__ import annotations

import random

from locust import FastHttpUser, between, task

AGENTS = 30_000


class BlackRoadUser(FastHttpUser):
    wait_time = between(0.0, 0.01)

    def _agent(self) -> str:
        return f"agent_load_{random.randint(1, AGENTS):05d}"  # noqa: S311 - load shape only

    @task(10)
    def agent(self) -> None:
        self.client.get(f"/v1/agents/{self._agent()}", name="/v1/agents/{id}")

    @task(10)
    def stats(self) -> None:
        self.client.get("/v1/stats")

    @task(3)
    def agent_list(self) -> None:
        self.client.get("/v1/agents?limit=20&status=idle")

    @task(3)
    def memory(self) -> None:
        self.client.get(f"/v1/agents/{self._agent()}/memory", name="/v1/agents/{id}/memory")

    @task(1)
    def create_task(self) -> None:
        self.client.post(
            "/v1/tasks",
            json={
                "agent_id": self._agent(),
                "kind": "tool_execution",
                "title": "load test",
                "payload": {"tool": "echo"},
            },
        )

    @task(3)
    def search_memory(self) -> None:
        """The seed's memory search: across all agents, or (one in three) within one agent's memory."""
        body: dict[str, object] = {"query": random.choice(QUERIES), "limit": 10}  # noqa: S311
        if random.random() < 1 / 3:  # noqa: S311
            body["filters"] = {"agent_id": self._agent()}
        self.client.post("/v1/memory/search", json=body, name="/v1/memory/search")


QUERIES = (
    "what did the agent note about the last task",
    "demo task results and context",
    "which notes mention the quarterly report",
    "answers about coordination plans",
    "memory of earlier conversations with the user",
)
