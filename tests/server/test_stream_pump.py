"""SSE through the sidecar's pump: slow readers, HTTP/1.0 clients, clients that leave mid-stream."""

from __future__ import annotations

import json
import socket
import time

import pytest
from aiohttp import web

from srvutil import AppThread
from waiting import wait_for

EVENTS = 3000
PAD = "x" * 3000  # ~3 kB per event: 9 MB per stream, past what the kernel buffers and the transport hold


def _event(i: int) -> bytes:
    ev = {"id": "chatcmpl-big", "object": "chat.completion.chunk", "model": "m",
          "choices": [{"index": 0, "delta": {"content": f"{i:04d}{PAD}"}, "finish_reason": None}]}
    return b"data: " + json.dumps(ev).encode() + b"\n\n"


@pytest.fixture
def big_stream_upstream():
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(EVENTS):
            await resp.write(_event(i))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def make() -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app

    t = AppThread(make).start()
    yield t
    t.stop()


def _request(port: int, version: str = "1.1") -> bytes:
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    return (f"POST /v1/chat/completions HTTP/{version}\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _dechunk(raw: bytes) -> bytes:
    out, i = bytearray(), 0
    while True:
        j = raw.index(b"\r\n", i)
        n = int(raw[i:j], 16)
        if n == 0:
            return bytes(out)
        out += raw[j + 2:j + 2 + n]
        assert raw[j + 2 + n:j + 4 + n] == b"\r\n"
        i = j + 4 + n


def _read_until(sock: socket.socket, marker: bytes, slow: bool) -> bytes:
    if slow:
        time.sleep(1.0)  # the engine writes 9 MB at once while nobody reads: the sidecar must wait, not drop
    buf = bytearray()
    while marker not in buf[-64:]:
        data = sock.recv(65536)
        if not data:
            break
        buf += data
    return bytes(buf)


def test_slow_reader_gets_every_event_in_order(big_stream_upstream, sidecar_factory):
    t, _, _ = sidecar_factory(big_stream_upstream.url)
    with socket.create_connection(("127.0.0.1", t.port)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(_request(t.port))
        raw = _read_until(s, b"\r\n0\r\n\r\n", slow=True)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"transfer-encoding: chunked" in head.lower()
    data = _dechunk(body)
    assert data == b"".join(_event(i) for i in range(EVENTS)) + b"data: [DONE]\n\n"


def test_http10_client_gets_an_unframed_stream(big_stream_upstream, sidecar_factory):
    t, _, _ = sidecar_factory(big_stream_upstream.url)
    with socket.create_connection(("127.0.0.1", t.port)) as s:
        s.sendall(_request(t.port, "1.0"))
        raw = _read_until(s, b"data: [DONE]\n\n", slow=False)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower()
    assert body == b"".join(_event(i) for i in range(EVENTS)) + b"data: [DONE]\n\n"


def test_client_leaving_mid_stream_is_captured_and_the_sidecar_keeps_serving(big_stream_upstream, sidecar_factory):
    t, sc, _ = sidecar_factory(big_stream_upstream.url)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", t.port)) as s:
            s.sendall(_request(t.port))
            s.recv(65536)  # the head and the first events, then gone
    with socket.create_connection(("127.0.0.1", t.port)) as s:
        s.sendall(_request(t.port))
        raw = _read_until(s, b"\r\n0\r\n\r\n", slow=False)
    assert _dechunk(raw.partition(b"\r\n\r\n")[2]).endswith(b"data: [DONE]\n\n")
    wait_for(lambda: sc.metrics.captured_interaction._value.get() >= 4, message="four streams captured")
    assert sc.metrics.captured_interaction._value.get() == 4  # the three cut streams are kept too
