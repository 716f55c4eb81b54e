"""The sidecar's engine connections (perennial_server.upstream) against a scripted raw HTTP server."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import pytest

from perennial_server.upstream import UpstreamConnectError, UpstreamPool, UpstreamProtocolError, UpstreamTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[bool]]


async def _read_request(r: asyncio.StreamReader) -> bytes | None:
    try:
        head = await r.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    n = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
    return head + (await r.readexactly(n) if n else b"")


class Scripted:
    """Answers each request with `handler(reader, writer, request)`; False closes the connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def __aenter__(self) -> "Scripted":
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                while (req := await _read_request(r)) is not None:
                    self.requests.append(req)
                    if not await self.handler(r, w, req):
                        break
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        self.server.close()


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> Handler:
    async def h(r, w, req) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await w.drain()
        return True
    return h


async def test_requests_reuse_one_keep_alive_connection():
    async with Scripted(ok()) as srv:
        pool = UpstreamPool("127.0.0.1", srv.port)
        for _ in range(5):
            resp = await pool.request("POST", "/v1/chat/completions", [("Content-Type", "application/json")], b'{"a":1}')
            assert resp.status == 200 and resp.header("content-type") == "application/json"
            assert await resp.read() == b'{"ok":true}'
            resp.release()
        assert srv.connections == 1 and pool.idle == 1
        req = srv.requests[0]
        assert req.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{srv.port}\r\n".encode() in req and b"Content-Length: 7\r\n" in req and req.endswith(b'{"a":1}')
        await pool.close()


async def test_chunked_body_arrives_chunk_by_chunk():
    gate = asyncio.Event()

    async def h(r, w, req) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        w.write(b"d\r\ndata: first\n\n\r\n")
        await w.drain()
        await gate.wait()  # the second event only once the first was seen by the reader
        w.write(b"e\r\ndata: second\n\n\r\n0\r\n\r\n")
        await w.drain()
        return True

    async with Scripted(h) as srv:
        pool = UpstreamPool("127.0.0.1", srv.port, read_timeout_s=5)
        resp = await pool.request("POST", "/v1/chat/completions", [], b"{}")
        got = []
        async for chunk in resp.iter_chunks():
            got.append(chunk)
            gate.set()
        resp.release()
        assert b"".join(got) == b"data: first\n\ndata: second\n\n" and got[0] == b"data: first\n\n"
        assert pool.idle == 1
        await pool.close()


async def test_close_delimited_head_and_no_content_responses():
    async def h(r, w, req) -> bool:
        if req.startswith(b"HEAD"):
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")  # no body follows a HEAD
            await w.drain()
            return True
        if b"/204" in req:
            w.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await w.drain()
            return True
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        await w.drain()
        return False  # body delimited by closing

    async with Scripted(h) as srv:
        pool = UpstreamPool("127.0.0.1", srv.port, read_timeout_s=5)
        resp = await pool.request("HEAD", "/x", [])
        assert resp.status == 200 and resp.content_length == 1234 and await resp.read() == b""
        resp.release()
        resp = await pool.request("GET", "/204", [])
        assert resp.status == 204 and await resp.read() == b""
        resp.release()
        resp = await pool.request("GET", "/v1/models", [])
        assert await resp.read() == b"until the end"
        resp.release()
        await pool.close()


async def test_interim_100_continue_is_skipped():
    async def h(r, w, req) -> bool:
        w.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        return True

    async with Scripted(h) as srv:
        pool = UpstreamPool("127.0.0.1", srv.port)
        resp = await pool.request("POST", "/x", [], b"{}")
        assert resp.status == 201 and resp.headers == [("X-A", "1"), ("Content-Length", "2")]
        assert await resp.read() == b"ok"
        resp.release()
        await pool.close()


async def test_idle_connection_closed_by_the_engine_is_retried_once():
    async def h(r, w, req) -> bool:
        await ok()(r, w, req)
        return False  # close after every answer, although the response said keep-alive

    async with Scripted(h) as srv:
        pool = UpstreamPool("127.0.0.1", srv.port)
        for _ in range(3):
            resp = await pool.request("GET", "/health", [])
            assert await resp.read() == b'{"ok":true}'
            resp.release()
            await asyncio.sleep(0.05)  # the close reaches the idle connection
        assert srv.connections == 3
        await pool.close()


async def test_stale_retry_when_engine_closes_without_answering():
    state = {"n": 0}

    async def h(r, w, req) -> bool:
        state["n"] += 1
        if state["n"] == 2:
            return False  # second request: the engine drops the reused connection without a byte
        return await ok()(r, w, req)

    async with Scripted(h) as srv:
        pool = UpstreamPool("127.0.0.1", srv.port)
        for _ in range(2):
            resp = await pool.request("GET", "/health", [])
            assert resp.status == 200 and await resp.read() == b'{"ok":true}'
            resp.release()
        assert state["n"] == 3 and srv.connections == 2
        await pool.close()


async def test_errors_are_typed():
    async def silent(r, w, req) -> bool:
        await asyncio.sleep(10)
        return False

    async def garbage(r, w, req) -> bool:
        w.write(b"NOT HTTP AT ALL\r\n\r\n")
        await w.drain()
        return False

    async def cut(r, w, req) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await w.drain()
        return False

    async def stall(r, w, req) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await w.drain()
        await asyncio.sleep(10)
        return False

    async with Scripted(silent) as srv:
        pool = UpstreamPool("127.0.0.1", srv.port, read_timeout_s=0.3)
        with pytest.raises(UpstreamTimeout):
            await pool.request("GET", "/", [])
        await pool.close()
    async with Scripted(garbage) as srv:
        pool = UpstreamPool("127.0.0.1", srv.port)
        with pytest.raises(UpstreamProtocolError):
            await pool.request("GET", "/", [])
        await pool.close()
    async with Scripted(cut) as srv:
        pool = UpstreamPool("127.0.0.1", srv.port)
        resp = await pool.request("GET", "/", [])
        with pytest.raises(UpstreamProtocolError, match="mid-response"):
            await resp.read()
        resp.release()
        assert pool.idle == 0
        await pool.close()
    async with Scripted(stall) as srv:
        pool = UpstreamPool("127.0.0.1", srv.port, read_timeout_s=0.3)
        resp = await pool.request("GET", "/", [])
        chunks = resp.iter_chunks()
        assert await chunks.__anext__() == b"abc"
        with pytest.raises(UpstreamTimeout):
            await chunks.__anext__()
        resp.release()
        await pool.close()
    async with Scripted(ok()) as srv:
        port = srv.port
    pool = UpstreamPool("127.0.0.1", port, connect_timeout_s=1)
    with pytest.raises(UpstreamConnectError):
        await pool.request("GET", "/", [])


async def test_read_timeout_counts_silence_not_stream_length():
    """A stream pumped for longer than the read timeout, one chunk per 0.05 s (a twentieth of it),
    is not cut; a stream that then falls silent for far longer than the read timeout is."""
    read_timeout = 1.0

    def steady(stall_after: int | None):
        async def h(r, w, req) -> bool:
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(30):
                if stall_after is not None and i == stall_after:
                    await asyncio.sleep(60)
                w.write(b"2\r\n%02d\r\n" % i)
                await w.drain()
                await asyncio.sleep(0.05)
            w.write(b"0\r\n\r\n")
            await w.drain()
            return True
        return h

    for stall_after, expect_timeout in ((None, False), (4, True)):
        async with Scripted(steady(stall_after)) as srv:
            pool = UpstreamPool("127.0.0.1", srv.port, read_timeout_s=read_timeout)
            resp = await pool.request("GET", "/", [])
            got: list[bytes] = []
            t0 = asyncio.get_running_loop().time()
            if expect_timeout:
                with pytest.raises(UpstreamTimeout):  # (not the 60 s stall ending: the test would time out first)
                    await resp.pump(lambda d: got.append(d) is None)
                assert b"".join(got) == b"00010203"
            else:
                assert await resp.pump(lambda d: got.append(d) is None) is True
                assert b"".join(got) == b"".join(b"%02d" % i for i in range(30))
                # the premise, guaranteed by the engine's 29 sleeps: the stream outlasted the read timeout
                assert asyncio.get_running_loop().time() - t0 > read_timeout
            resp.release()
            await pool.close()


async def test_unread_response_closes_its_connection_and_large_bodies_flow():
    big = b"x" * (5 << 20)

    async def h(r, w, req) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big))
        w.write(big)
        await w.drain()
        return True

    async with Scripted(h) as srv:
        pool = UpstreamPool("127.0.0.1", srv.port)
        resp = await pool.request("GET", "/big", [])
        assert len(await resp.read()) == len(big)  # past the high-water mark: paused and resumed
        resp.release()
        assert pool.idle == 1
        resp = await pool.request("GET", "/big", [])
        resp.release()  # given back unread: not reusable
        assert pool.idle == 0
        await pool.close()


@pytest.mark.parametrize("url", ["https://127.0.0.1:8000", "127.0.0.1:8000", "http://:8000", "http://127.0.0.1:99999", "http://127.0.0.1:8000/?a=1"])
def test_sidecar_refuses_an_upstream_it_cannot_reach_plainly(url):
    from perennial_server.config import SidecarConfig

    with pytest.raises(ValueError, match="upstream"):
        SidecarConfig(upstream=url).validate()


def test_upstream_path_prefix_is_kept():
    from perennial_server.config import SidecarConfig

    u = SidecarConfig(upstream="http://localhost:8001/engine/").upstream_url()
    assert (u.hostname, u.port, u.path.rstrip("/")) == ("localhost", 8001, "/engine")
