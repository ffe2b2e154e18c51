"""A small real HTTP server that speaks the Ollama (``/api/chat``) and OpenAI
(``/v1/chat/completions``) chat APIs, for the model-backed handler's tests.

It answers ``"echo: <last user message>"``, records every request (and the connection
it came on), and can be told to fail or stall the next requests.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web

from streams.runtime.broker import free_port


class ModelServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        #: (path, body, client port) of every request, in arrival order.
        self.requests: list[tuple[str, dict[str, Any], int]] = []
        self._failures: list[int] = []
        self._delay = 0.0
        self._delayed = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ModelServer:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the model server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def fail_next(self, count: int, status: int = 500) -> None:
        """Answer the next ``count`` requests with ``status``."""
        self._failures.extend([status] * count)

    def stall_next(self, count: int, seconds: float) -> None:
        """Hold the next ``count`` requests for ``seconds`` before answering."""
        self._delay, self._delayed = seconds, count

    @property
    def connections(self) -> int:
        return len({client for _, _, client in self.requests})

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/api/chat", self._chat)
        app.router.add_post("/v1/chat/completions", self._chat)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append((request.path, body, peer[1] if peer else 0))
        if self._delayed > 0:
            self._delayed -= 1
            await asyncio.sleep(self._delay)
        if self._failures:
            return web.json_response({"error": "failing on purpose"}, status=self._failures.pop(0))
        last = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
        message = {"role": "assistant", "content": f"echo: {last}"}
        if request.path == "/api/chat":
            return web.json_response({"model": body["model"], "message": message, "done": True})
        return web.json_response({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
