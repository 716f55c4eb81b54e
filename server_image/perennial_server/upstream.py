"""Keep-alive HTTP/1.1 connections from the sidecar to its engine on localhost.

The proxy's hot path. aiohttp's client is general (redirects, cookies, TLS, auth,
multidict headers, tracing) and cost the sidecar about 350 µs of CPU per proxied
request, more than everything else it does together; here a request is one
`transport.write` of prebuilt bytes and the response is parsed by `httptools`
(the llhttp bindings uvicorn uses) straight into a small object. Plain HTTP to
one host and port only: the engine sits in the same pod.

    pool = UpstreamPool("127.0.0.1", 8000, connect_timeout_s=5, read_timeout_s=600)
    resp = await pool.request("POST", "/v1/chat/completions", [("Content-Type", "application/json")], body)
    resp.status, resp.headers                 # once the head has arrived
    data = await resp.read()                  # or: async for chunk in resp.iter_chunks()
    resp.release()                            # idempotent; the connection is reused when it can be

Errors: `UpstreamConnectError` (cannot connect), `UpstreamTimeout` (no data for
`read_timeout_s`), `UpstreamProtocolError` (the engine broke the protocol or the
connection mid-response). A reused idle connection that the engine has closed
is retried once on a fresh one when not a byte of its response arrived.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, AsyncIterator, Callable

import httptools


class UpstreamError(Exception):
    pass


class UpstreamConnectError(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamProtocolError(UpstreamError):
    pass


class _Stale(Exception):
    """A reused connection died before a byte of the response: safe to retry on a new one."""


_HIGH_WATER = 1 << 20  # pause reading from the engine past this much unconsumed body


class UpstreamResponse:
    """Status and headers of one response; its body arrives in chunks."""

    __slots__ = ("status", "headers", "_conn", "_chunks", "_buffered", "_done", "_error", "_waiter", "_released", "_sink")

    def __init__(self, conn: "_Connection") -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self._conn = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False
        self._sink: Callable[[bytes], bool] | None = None

    def header(self, name: str, default: str | None = None) -> str | None:
        n = name.lower()
        for k, v in self.headers:
            if k.lower() == n:
                return v
        return default

    @property
    def content_length(self) -> int | None:
        v = self.header("content-length")
        return int(v) if v is not None and v.isdigit() else None

    # ---------------------------------------------------------- fed by the connection
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _feed(self, data: bytes) -> None:
        if self._sink is not None and not self._chunks:
            try:
                keep = self._sink(data)
            except Exception as e:  # noqa: BLE001 - the consumer failed: hand it the error
                keep, self._error = False, e
            if not keep:
                self._sink = None
                self._wake()
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _finish(self, error: Exception | None = None) -> None:
        if not self._done:
            self._done = True
            self._error = error
        self._wake()

    # ---------------------------------------------------------- read by the proxy
    async def _wait(self, idle: bool = False) -> None:
        """Wait for the next event, at most the read timeout. `idle`: chunks may go to a sink
        meanwhile, so the timeout counts from the connection's last received byte, not from now."""
        conn = self._conn
        loop = conn.loop
        limit = conn.pool.read_timeout_s
        waiter = self._waiter = loop.create_future()
        since = conn.last_rx if idle else time.monotonic()
        timer: asyncio.TimerHandle | None = None

        def check() -> None:  # one timer handle, re-armed while data flows (asyncio.timeout costs more per wait)
            nonlocal timer
            if waiter.done():
                return
            quiet = time.monotonic() - (conn.last_rx if idle else since)
            if quiet < limit:
                timer = loop.call_later(limit - quiet, check)
                return
            waiter.set_exception(TimeoutError())

        timer = loop.call_later(max(0.0, limit - (time.monotonic() - since)), check)
        try:
            await waiter
        except TimeoutError:
            conn.close()
            raise UpstreamTimeout(f"the engine sent nothing for {limit:g}s") from None
        finally:
            timer.cancel()
            self._waiter = None

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as the engine sends them (SSE events pass through as they come)."""
        while True:
            if self._chunks:
                data = self._chunks.popleft()
                self._buffered -= len(data)
                if self._buffered <= _HIGH_WATER // 4:
                    self._conn.resume()
                yield data
                continue
            if self._done:
                if self._error is not None:
                    raise self._error
                self.release()
                return
            await self._wait()

    async def pump(self, sink: Callable[[bytes], bool]) -> bool:
        """Hand every body chunk to `sink` as it arrives, from the connection's callback: no task
        wake-up per chunk (an SSE stream is many small ones). `sink` returns False to stop (its
        consumer is full or gone). Returns True once the body is complete, False when stopped."""
        while self._chunks:  # what arrived before
            data = self._chunks.popleft()
            self._buffered -= len(data)
            if not sink(data):
                self._conn.resume()
                return False
        self._conn.resume()
        self._sink = sink
        try:
            while not self._done and self._sink is not None and self._error is None:
                await self._wait(idle=True)
        finally:
            self._sink = None
        if self._error is not None:
            raise self._error
        if self._done and not self._chunks:
            self.release()
            return True
        return False

    async def read(self) -> bytes:
        parts = [c async for c in self.iter_chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Give the connection back (reusable only when the response was read to its end)."""
        if self._released:
            return
        self._released = True
        self._conn.response_released(self, complete=self._done and self._error is None and not self._chunks)


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class _Connection(asyncio.Protocol):
    def __init__(self, pool: "UpstreamPool") -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: UpstreamResponse | None = None
        self.head: asyncio.Future[UpstreamResponse] | None = None
        self.closed = False
        self.reused = False
        self.received = False  # any byte of the current response
        self.keep_alive = False
        self.head_only = False
        self.idle_since = 0.0
        self.last_rx = time.monotonic()
        self._paused = False
        self._length_known = False

    # ---------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        self.last_rx = time.monotonic()
        if self.resp is None:  # bytes nobody asked for: the connection is unusable
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamProtocolError(f"the engine sent an invalid response: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        resp = self.resp
        if resp is None:
            return
        if self.head is not None and not self.head.done():
            err: Exception = _Stale() if (self.reused and not self.received) else UpstreamProtocolError("the engine closed the connection before answering")
            self.head.set_exception(err)
        elif not resp._done:
            if self.head_only or not self._length_known:
                resp._finish()  # a body delimited by the end of the connection
            else:
                resp._finish(UpstreamProtocolError("the engine closed the connection mid-response"))

    # ---------------------------------------------------------- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        n = name.decode("latin-1")
        if n.lower() in ("content-length", "transfer-encoding"):
            self._length_known = True
        self.resp.headers.append((n, value.decode("latin-1")))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        resp.status = self.parser.get_status_code()
        if resp.status < 200:  # 1xx interim response: not ours to forward, wait for the real one
            resp.headers = []
            return
        self.keep_alive = self.parser.should_keep_alive()
        if resp.status in (204, 304):
            self._length_known = True
        if self.head is not None and not self.head.done():
            self.head.set_result(resp)
        if self.head_only:  # no body follows a HEAD response, whatever its headers say
            self.keep_alive = False
            resp._finish()

    def on_body(self, body: bytes) -> None:
        if self.resp is not None and not self.head_only:
            self.resp._feed(body)

    def on_message_complete(self) -> None:
        if self.resp is not None and self.resp.status >= 200:
            self.resp._finish()

    # ---------------------------------------------------------- control
    def _fail(self, err: Exception) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_exception(err)
        elif self.resp is not None:
            self.resp._finish(err)

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self.pool._forget(self)

    def start(self, request: bytes, head_only: bool) -> "asyncio.Future[UpstreamResponse]":
        self.resp = UpstreamResponse(self)
        self.head = self.loop.create_future()
        self.received = False
        self.head_only = head_only
        self._length_known = False
        self.keep_alive = False
        self.transport.write(request)  # type: ignore[union-attr]
        return self.head

    def response_released(self, resp: UpstreamResponse, complete: bool) -> None:
        if resp is not self.resp:
            return
        self.resp = None
        self.head = None
        self.resume()
        if complete and self.keep_alive and not self.closed:
            self.reused = True
            self.idle_since = time.monotonic()
            self.pool._put_idle(self)
        else:
            self.close()


class UpstreamPool:
    """Keep-alive connections to one engine; LIFO reuse, idle ones closed before the engine would."""

    def __init__(self, host: str, port: int, *, connect_timeout_s: float = 5.0, read_timeout_s: float = 600.0,
                 idle_timeout_s: float = 4.0, max_idle: int = 512) -> None:
        self.host = host
        self.port = port
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        # engines close idle keep-alive connections themselves (uvicorn, under vLLM: after 5 s);
        # dropping ours first avoids sending a request into a connection being closed
        self.idle_timeout_s = idle_timeout_s
        self.max_idle = max_idle
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._host_header = f"Host: {host}:{port}\r\n".encode()

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    def _put_idle(self, conn: _Connection) -> None:
        if len(self._idle) >= self.max_idle:
            conn.close()
            return
        self._idle.append(conn)

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await self.loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except TimeoutError:
            raise UpstreamConnectError(f"connecting to the engine at {self.host}:{self.port} timed out") from None
        except OSError as e:
            raise UpstreamConnectError(f"cannot connect to the engine at {self.host}:{self.port}: {e.strerror or e}") from None
        self._all.add(conn)
        return conn

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self.idle_timeout_s:
                conn.close()
                continue
            return conn
        return None

    def build(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes | None) -> bytes:
        lines = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1"), self._host_header]
        for k, v in headers:
            lines.append(f"{k}: {v}\r\n".encode("latin-1"))
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(b"Content-Length: %d\r\n" % len(body or b""))
        lines.append(b"\r\n")
        if body:
            lines.append(body)
        return b"".join(lines)

    async def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes | None = None) -> UpstreamResponse:
        """Send one request; returns once the response head has arrived."""
        data = self.build(method, target, headers, body)
        head_only = method == "HEAD"
        for _ in range(2):
            conn = self._take_idle() or await self._connect()
            fut = conn.start(data, head_only)
            timer = self.loop.call_later(self.read_timeout_s, _expire, fut)
            try:
                return await fut
            except _Stale:
                continue  # the engine had closed this idle connection: once more on a fresh one
            except TimeoutError:
                conn.close()
                raise UpstreamTimeout(f"the engine did not answer within {self.read_timeout_s:g}s") from None
            except BaseException:
                conn.close()
                raise
            finally:
                timer.cancel()
        raise UpstreamProtocolError("the engine closed two connections in a row without answering")

    async def close(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)

    @property
    def idle(self) -> int:
        return len(self._idle)
