"""Client connections, held to the limits a production proxy sets (nginx, Envoy at the edge).

* header timeout (`client_header_timeout_s`, default 10 s; Envoy's edge recommendation, nginx's
  `client_header_timeout`): a request head must be complete within this long of the connection
  opening, or of its first byte on a kept-alive connection -- however slowly it trickles in
  (slowloris). Then 408 (if anything arrived) and the connection is closed.
* body timeout (`client_body_timeout_s`, default 60 s): the whole body within this long of the head
  (body.py). Then 408 and close.
* keep-alive idle timeout (`keepalive_timeout_s`, default 75 s, nginx's `keepalive_timeout`): an idle
  connection between requests is closed.
* connection limit (`max_connections`; default from RLIMIT_NOFILE, raised to its hard limit at
  start: half of what is left after 64 descriptors for the spool, logs and listeners, because each
  proxied request also holds an engine connection). At the limit a new connection is not refused:
  the connection idle the longest (between requests, or still sending its head) is closed to make
  room, so that probes (/healthz, /readyz) and /metrics stay answerable while idle connections pile
  up -- but never one idle for less than `eviction_grace_s` (1 s): a flood's connections are accepted
  in bursts before the loop reads any of them, and a client accepted in the middle of one would
  otherwise be closed before its request was even read. When no connection can make room (all busy
  with a request, or idle for less than the grace), the new one is answered 503 with `Retry-After`
  and closed.
* protocol errors (a malformed request line or header, a header too large) are answered with an
  OpenAI-style JSON body that never repeats the request's bytes, and logged at DEBUG only.

aiohttp has the keep-alive timeout but no header or body timeout and no connection limit: the
request handler below adds them (its hooks are aiohttp's RequestHandler/Server, 3.9+)."""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from .errors import error_body, raw_error

log = logging.getLogger(__name__)

RESERVED_FDS = 64


@dataclass(frozen=True)
class Limits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 1024
    eviction_grace_s: float = 1.0  # a connection idle for less than this is never closed to make room


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def auto_max_connections(nofile: int) -> int:
    return max(8, (nofile - RESERVED_FDS) // 2)


_AT_LIMIT = raw_error(503, "the server is at its connection limit; retry later", "too_many_connections", retry_after=1)
_data_received = RequestHandler.data_received
_resume_reading = RequestHandler.resume_reading


class GuardedRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol, with a header timeout, the connection limit and JSON errors."""

    def __init__(self, manager: GuardedServer, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(manager, keepalive_timeout=limits.keepalive_timeout_s, **kwargs)
        self._limits = limits
        self._guard: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._last_active = 0.0
        self._counted = False

    # ------------------------------------------------------------ lifecycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server: GuardedServer = self._manager  # type: ignore[assignment]
        if server.live >= self._limits.max_connections and not server.evict_idle():
            server.refused += 1
            try:
                transport.write(_AT_LIMIT)  # type: ignore[attr-defined]
            finally:
                transport.close()
            self._manager = None  # connection_lost: nothing to undo
            return
        server.live += 1
        self._counted = True
        super().connection_made(transport)
        self._last_active = self._loop.time()
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            server = self._manager
            if isinstance(server, GuardedServer):
                server.live -= 1
        self._disarm()
        super().connection_lost(exc)

    # ------------------------------------------------------------ header timeout
    def _arm(self) -> None:
        self._disarm()
        self._head_bytes = 0
        self._guard = self._loop.call_later(self._limits.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None

    def _header_timeout(self) -> None:
        self._guard = None
        if self._force_close or self.transport is None:
            return
        if self._head_bytes:
            self.transport.write(raw_error(408, f"the request head must arrive within {self._limits.header_timeout_s:g} s", "header_timeout"))
        self.force_close()

    def idle(self) -> bool:
        """Between requests (or still receiving a head): may be closed to make room."""
        w = self._waiter
        return not self._force_close and w is not None and not w.done() and not self._messages

    def data_received(self, data: bytes) -> None:
        # the header clock starts with the first byte of a request head; a head that arrives whole
        # (the usual case) never arms it. Called for every read (and with b"" whenever aiohttp resumes
        # reading a body): idle() inlined, no super() object, and whether the bytes began a new head is
        # decided after aiohttp's parser, only when no request was completed: the parser sets nothing
        # that decides it (the waiter, the queue, force-close) unless it completes a request.
        # `_last_active` (who is evicted first at the connection limit) moves when a head starts or a request
        # is read, never for the bytes trickled into a head in progress: a slowloris would look fresher than a
        # client whose request the server has not read yet, and that client would be closed instead.
        before = self._request_count
        guard = self._guard
        _data_received(self, data)
        if self._request_count != before:
            self._last_active = self._loop.time()
            if self._guard is not None:
                self._disarm()  # a head is complete (or was rejected): the handler owns the clock now
        elif guard is not None:
            self._head_bytes += len(data)
        elif data:
            w = self._waiter
            if w is not None and not self._force_close and not w.done() and not self._messages:  # idle(): a new head
                self._last_active = self._loop.time()
                self._arm()
                self._head_bytes = len(data)

    def resume_reading(self, *args: Any, **kwargs: Any) -> None:
        # aiohttp (3.14) calls this whenever a handler reads a body below its low-water mark, paused or not, and
        # resumes by parsing b"" and resuming the transport: work for nothing when reading is not paused (the
        # parser pauses only through pause_reading(), which sets `_reading_paused`; a transport paused for the
        # message queue is resumed by that queue, not here). About 4% of a feedback request's Python.
        if self._reading_paused:
            _resume_reading(self, *args, **kwargs)

    # ------------------------------------------------------------ errors
    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            self.log_exception("Failed to handle request", exc_info=exc)
            body = error_body(status, "the server failed to handle the request", "internal_error")
        else:
            log.debug("Rejected malformed request status=%d error=%s", status, type(exc).__name__ if exc else message)
            if isinstance(exc, LineTooLong):
                body = error_body(431, "a request line or header field is too large", "header_too_large")
                status = 431
            else:
                name = type(exc).__name__ if exc is not None else "BadRequest"
                body = error_body(status, f"malformed HTTP request ({name})", "malformed_request")
        resp = web.json_response(body, status=status)
        resp.force_close()
        return resp


class GuardedServer(Server):
    def __init__(self, *args: Any, limits: Limits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.live = 0
        self.evicted = 0
        self.refused = 0

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, limits=self.limits, **self._kwargs)

    def evict_idle(self) -> bool:
        """Close the connection idle the longest, if idle for at least the grace; False when none is."""
        best: GuardedRequestHandler | None = None
        for h in self._connections:
            if isinstance(h, GuardedRequestHandler) and h.idle() and (best is None or h._last_active < best._last_active):
                best = h
        if best is None or self._loop.time() - best._last_active < self.limits.eviction_grace_s:
            return False
        best.force_close()
        self.evicted += 1
        return True


Around = Callable[[web.BaseRequest, Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]], Awaitable[web.StreamResponse]]


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose connections are GuardedRequestHandlers.

    `around(request, handler)`: a coroutine function run around the whole application for every
    request (the router included), like a middleware, at the cost of one coroutine: an aiohttp
    middleware costs a cached chain lookup, a functools.partial call and aiohttp's own
    current-app middleware (added to any app with middlewares) on every request."""

    def __init__(self, app: web.Application, *, limits: Limits, around: Around | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits
        self.around = around

    async def _make_server(self) -> Server:
        plain = await super()._make_server()  # the app's startup, its handler_args merged in
        handler = plain.request_handler
        if self.around is not None:
            handler = functools.partial(self.around, handler=handler)
        return GuardedServer(handler, request_factory=plain.request_factory, loop=plain._loop, limits=self.limits, **plain._kwargs)
