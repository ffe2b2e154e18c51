"""Requests to other workers' web views over kept-open, pipelined HTTP/1.1 connections.

A lookup for an agent another worker owns is forwarded there. A general HTTP client
builds a request object, a timer, headers and a response object for each call; at
thousands of lookups a second that costs more than answering the lookup. Here each
peer has one connection that stays open; requests are written back to back and the
responses, which arrive in order, complete them one by one. Only what the web views
send is understood: responses with a ``Content-Length``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from yarl import URL

#: Largest response head (status line and headers) accepted from a peer.
_MAX_HEAD = 64 * 1024


class PeerError(ConnectionError):
    """A peer could not be reached or answered with something that is not HTTP."""


class _Connection(asyncio.Protocol):
    """One connection to a peer; requests on it are answered in the order they were sent."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[tuple[int, bytes]]] = deque()
        self.closed = False
        self._buffer = bytearray()
        #: The response being read: its status and body length, once its head is in.
        self._status = 0
        self._length = -1
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.transport.write(request)
        return future

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            while self._next_response():
                pass
        except PeerError as exc:
            self.fail(exc)

    def _next_response(self) -> bool:
        """Complete the oldest request if its whole response is buffered."""
        buffer = self._buffer
        if self._length < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    raise PeerError(f"{self.peer} sent a response head over {_MAX_HEAD} bytes")
                return False
            self._read_head(bytes(buffer[:end]))
            del buffer[: end + 4]
        if len(buffer) < self._length:
            return False
        body = bytes(buffer[: self._length])
        del buffer[: self._length]
        status, self._length = self._status, -1
        if not self.waiting:
            raise PeerError(f"{self.peer} sent a response nobody asked for")
        future = self.waiting.popleft()
        if not future.done():
            future.set_result((status, body))
        if self._close_after:
            self.fail(PeerError(f"{self.peer} closed the connection"))
            return False
        return True

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise PeerError(f"{self.peer} answered with something that is not HTTP: {lines[0][:80]!r}")
        self._status = int(parts[1])
        length = -1
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip()) if value.strip().isdigit() else -1
            elif name == b"connection" and value.strip().lower() == b"close":
                self._close_after = True
            elif name == b"transfer-encoding":
                raise PeerError(f"{self.peer} sent a body without a length (transfer-encoding)")
        if length < 0:
            raise PeerError(f"{self.peer} sent a response without a valid Content-Length")
        self._length = length

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(PeerError(f"{self.peer} closed the connection" + (f": {exc}" if exc else "")))

    def fail(self, exc: Exception) -> None:
        """Fail every request still waiting and drop the connection (it cannot be resynchronised)."""
        self.closed = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class PeerClient:
    """Sends requests to peers' web views, one kept-open connection per peer."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._connections: dict[tuple[str, int], _Connection] = {}
        self._connecting: dict[tuple[str, int], asyncio.Future[_Connection]] = {}

    async def get(self, url: URL, path_qs: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """GET ``path_qs`` (path and query string) from the peer at ``url``: its status and body."""
        return await self.request("GET", url, path_qs, headers)

    async def post(self, url: URL, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """POST ``body`` (JSON) to ``path`` of the peer at ``url``: its status and body."""
        sent = {**(headers or {}), "Content-Type": "application/json", "Content-Length": str(len(body))}
        return await self.request("POST", url, path, sent, body)

    async def request(
        self, method: str, url: URL, path_qs: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> tuple[int, bytes]:
        host, port = url.host or "localhost", url.port or 80
        connection = self._connections.get((host, port))
        if connection is None or connection.closed:
            connection = await self._connect(host, port)
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        request = f"{method} {path_qs} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode() + body
        future = connection.send(request)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.timeout, _expire, connection, future, self.timeout)
        try:
            return await future
        finally:
            timer.cancel()

    async def _connect(self, host: str, port: int) -> _Connection:
        key = (host, port)
        pending = self._connecting.get(key)
        if pending is None:
            pending = self._connecting[key] = asyncio.ensure_future(self._open(host, port))
            pending.add_done_callback(lambda _: self._connecting.pop(key, None))
        return await asyncio.shield(pending)

    async def _open(self, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(f"{host}:{port}"), host, port), self.timeout
            )
        except (TimeoutError, OSError) as exc:
            raise PeerError(f"cannot connect to {host}:{port}: {exc!r}") from exc
        self._connections[(host, port)] = connection
        return connection

    def close(self) -> None:
        for connection in self._connections.values():
            connection.fail(PeerError("the client is closing"))
        self._connections.clear()


def _expire(connection: _Connection, future: asyncio.Future[Any], timeout: float) -> None:
    """A request took too long: the responses behind it cannot be matched up any more."""
    if not future.done():
        connection.fail(PeerError(f"{connection.peer} did not answer within {timeout:g}s"))


class PartitionOwners:
    """Which worker serves each partition of a table, as the group's assignment says.

    The map is rebuilt when a rebalance hands out a new assignment, not per request.
    """

    def __init__(self, assignor: Any, changelog_topic: str, own_url: URL) -> None:
        self._assignor = assignor
        self._topic = changelog_topic
        self._own = (own_url.host, own_url.port)
        self._built_from: Any = None
        self._urls: dict[int, URL | None] = {}

    def url(self, partition: int) -> URL | None:
        """The owner's web URL; None when it is this worker or no one owns the partition now."""
        distribution = self._assignor.changelog_distribution
        if distribution is not self._built_from:
            urls: dict[int, URL | None] = {}
            for host, topics in distribution.items():
                url = URL(str(host))
                for owned in topics.get(self._topic, ()):
                    urls[owned] = None if (url.host, url.port) == self._own else url
            self._urls, self._built_from = urls, distribution
        return self._urls.get(partition)
