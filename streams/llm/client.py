"""A chat client for Ollama-compatible (``/api/chat``) and OpenAI-compatible
(``/v1/chat/completions``) servers.

One pool of kept-open connections per worker; each request has a deadline; connection
errors, timeouts, 429 and 5xx answers are retried with exponential backoff; after
repeated failures a circuit breaker fails calls at once instead of queueing them on a
server that is down, and lets one trial through once its open time is over.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from streams.runtime.circuit import CircuitBreaker

APIS = {"ollama": "/api/chat", "openai": "/v1/chat/completions"}
#: Seconds before the first retry; each further retry waits twice as long.
BACKOFF = 0.2

Message = dict[str, str]


class ModelUnavailable(RuntimeError):
    """The server could not be reached or kept failing (retried), or the breaker is open."""


class ModelRefused(RuntimeError):
    """The server refused the request (a 4xx other than 429) or answered nonsense: no retry helps."""


class _Retryable(Exception):
    pass


class ChatClient:
    def __init__(
        self,
        api: str,
        url: str,
        model: str,
        *,
        timeout: float,
        retries: int,
        api_key: str | None = None,
        connections: int = 16,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        if api not in APIS:
            raise ValueError(f"unknown chat API {api!r}; known: {sorted(APIS)}")
        self.api = api
        self.endpoint = url.rstrip("/") + APIS[api]
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.breaker = breaker or CircuitBreaker(failure_threshold=5, reset_timeout=5.0, max_reset_timeout=60.0)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._connections, keepalive_timeout=60.0)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout), headers=self._headers
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def chat(self, messages: list[Message]) -> str:
        """The model's answer to ``messages``."""
        breaker = self.breaker
        if breaker.state == "open":
            raise ModelUnavailable(
                f"{self.endpoint} failed {breaker.failures} times in a row; not called for "
                f"another {breaker.wait_seconds():.1f}s (circuit open)"
            )
        attempt = 0
        while True:
            try:
                answer = await self._post(messages)
            except _Retryable as exc:
                breaker.failed()
                attempt += 1
                if attempt > self.retries or breaker.state != "closed":
                    raise ModelUnavailable(f"{self.endpoint}: {exc} (after {attempt} attempts)") from None
                await asyncio.sleep(BACKOFF * 2 ** (attempt - 1))
                continue
            breaker.succeeded()
            return answer

    async def _post(self, messages: list[Message]) -> str:
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.api == "ollama":
            body["stream"] = False
        try:
            async with self._client().post(self.endpoint, json=body) as response:
                if response.status == 429 or response.status >= 500:
                    raise _Retryable(f"HTTP {response.status}")
                text = await response.text()
                if response.status >= 400:
                    raise ModelRefused(f"{self.endpoint} answered HTTP {response.status}: {text[:200]}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
        return self._answer(text)

    def _answer(self, text: str) -> str:
        try:
            data: Any = orjson.loads(text)
            if self.api == "ollama":
                content = data["message"]["content"]
            else:
                content = data["choices"][0]["message"]["content"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            raise ModelRefused(f"{self.endpoint} answered without a message: {text[:200]!r}") from None
        if not isinstance(content, str):
            raise ModelRefused(f"{self.endpoint} answered a message without text content")
        return content
