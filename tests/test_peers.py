"""The peer client: pipelined GETs against a real aiohttp server, and peers that misbehave."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from yarl import URL

from streams.serve.peers import PeerClient, PeerError


@asynccontextmanager
async def aiohttp_server() -> AsyncIterator[URL]:
    async def echo(request: web.Request) -> web.Response:
        delay = float(request.query.get("delay", "0"))
        if delay:
            await asyncio.sleep(delay)
        body = f'{{"path": "{request.path}", "n": "{request.query.get("n", "")}", '
        body += f'"forwarded": "{request.headers.get("X-Test", "")}"}}'
        return web.Response(body=body.encode(), status=int(request.query.get("status", "200")))

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield URL(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


@asynccontextmanager
async def raw_server(reply: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> AsyncIterator[URL]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reply(writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield URL(f"http://127.0.0.1:{port}")
    finally:
        server.close()


def test_many_requests_in_flight_on_one_connection_get_their_own_answers() -> None:
    async def scenario() -> None:
        client = PeerClient()
        async with aiohttp_server() as url:
            answers = await asyncio.gather(
                *(client.get(url, f"/v1/agents/a{i}?n={i}", {"X-Test": "yes"}) for i in range(200))
            )
            assert [body for _, body in answers] == [
                f'{{"path": "/v1/agents/a{i}", "n": "{i}", "forwarded": "yes"}}'.encode() for i in range(200)
            ]
            assert {status for status, _ in answers} == {200}
            assert len(client._connections) == 1
            status, _ = await client.get(url, "/missing?status=404")
            assert status == 404
        client.close()

    asyncio.run(scenario())


def test_a_slow_peer_times_out_and_the_next_request_reconnects() -> None:
    async def scenario() -> None:
        client = PeerClient(timeout=0.2)
        async with aiohttp_server() as url:
            with pytest.raises(PeerError, match="did not answer within"):
                await client.get(url, "/slow?delay=1")
            status, body = await client.get(url, "/fast?n=2")
            assert (status, body) == (200, b'{"path": "/fast", "n": "2", "forwarded": ""}')
        client.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not HTTP"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "without a length"),
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", "without a valid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed the connection"),
    ],
)
def test_a_peer_that_does_not_speak_our_http_fails_the_request(response: bytes, reason: str) -> None:
    async def reply(writer: asyncio.StreamWriter) -> None:
        writer.write(response)
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        client = PeerClient(timeout=2)
        async with raw_server(reply) as url:
            with pytest.raises(PeerError, match=reason):
                await client.get(url, "/v1/agents/x")
        client.close()

    asyncio.run(scenario())


def test_no_peer_listening_is_a_peer_error() -> None:
    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(PeerError, match="cannot connect"):
            await PeerClient(timeout=1).get(URL(f"http://127.0.0.1:{port}"), "/")

    asyncio.run(scenario())
