"""The connection limit under a connection flood (connections.py), in-process with a tiny limit.

At the limit the longest-idle connection makes room, but never one younger than the eviction grace: a client
whose connection was accepted in the middle of a flood (many connections accepted in one burst, before the
loop read any of them) must not be closed before its request is even read -- it failed about 1 run in 5 of
test_hostile_clients' fd-exhaustion test on a loaded machine. A newcomer that finds only young idle
connections is answered 503 with Retry-After (an answer, not a silent close)."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from aiohttp import web
from perennial_server.connections import GuardedAppRunner, Limits


async def _serve(limits: Limits) -> tuple[GuardedAppRunner, int]:
    async def hello(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/healthz", hello)
    runner = GuardedAppRunner(app, limits=limits, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), 10)
    except (TimeoutError, ConnectionResetError):
        return b""


def _flood(port: int, n: int) -> list[socket.socket]:
    """n connections opened back to back, nothing sent (they queue in the listen backlog: the server then
    accepts them in one burst)."""
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]


@pytest.mark.asyncio
async def test_a_connection_accepted_in_a_flood_is_not_closed_before_its_request_is_read() -> None:
    runner, port = await _serve(Limits(max_connections=4, eviction_grace_s=60))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # a client, accepted first
        await asyncio.sleep(0.05)
        flood = await asyncio.to_thread(_flood, port, 12)
        await asyncio.sleep(0.3)  # every flood connection accepted (or refused) meanwhile
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        got = await _read_all(reader)
        assert got.startswith(b"HTTP/1.1 200"), f"the client was closed to make room for the flood: {got[:200]!r}"
        # the connections over the limit were answered: 503, Retry-After, a JSON error, closed
        answers = []
        for s in flood:
            s.settimeout(1)
            try:
                answers.append(s.recv(4096))
            except (TimeoutError, ConnectionResetError):
                answers.append(b"")
            s.close()
        refused = [a for a in answers if a]
        assert len(refused) >= 12 - 3, answers  # at most 3 flood connections fit beside the client
        for a in refused:
            head, _, body = a.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503"), a[:200]
            assert b"\r\nRetry-After: 1\r\n" in head, head
            assert json.loads(body)["error"]["code"] == "too_many_connections"
        writer.close()
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_idle_connections_older_than_the_grace_still_make_room() -> None:
    runner, port = await _serve(Limits(max_connections=4, eviction_grace_s=0.2))
    try:
        idle = await asyncio.to_thread(_flood, port, 4)
        await asyncio.sleep(0.6)  # older than the grace: evictable, the oldest first
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        got = await _read_all(reader)
        assert got.startswith(b"HTTP/1.1 200"), got[:200]
        closed = 0
        for s in idle:
            s.settimeout(2)
            try:
                closed += s.recv(4096) == b""
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed += 1
            s.close()
        assert closed == 1, "exactly one idle connection made room"
        writer.close()
    finally:
        await runner.cleanup()
