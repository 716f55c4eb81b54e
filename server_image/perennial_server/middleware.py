"""What every route shares: bearer-token auth, the per-client rate limit, reading a body within
its limits, and the error middleware that keeps every answer OpenAI-style JSON.

Order on /v1/feedback: authenticate, then rate-limit. A request without a valid token is refused
(401) before it can use anything of a client's budget; the budget is per client address among
authenticated requests (behind an ingress every client shares the ingress's address: then the
limit is per ingress replica)."""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from .errors import json_error

log = logging.getLogger("perennial_server.middleware")
_monotonic = time.monotonic


class TokenFile:
    """Bearer token from a mounted Secret file, re-read when the file changes."""

    def __init__(self, path: str, check_interval_s: float = 1.0) -> None:
        self.path = path
        self.check_interval_s = check_interval_s
        self._token: bytes | None = None
        self._header = b""  # `Bearer <token>`: the usual Authorization value, compared whole first
        self._stamp: tuple | None = None
        self._checked = -1e9

    def token(self) -> bytes | None:
        if not self.path:
            return None
        now = _monotonic()
        if now - self._checked >= self.check_interval_s:
            self._refresh(now)
        return self._token

    def _refresh(self, now: float) -> None:
        if self.path:
            self._checked = now
            try:
                st = os.stat(self.path)
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                if stamp != self._stamp:
                    with open(self.path, "rb") as f:
                        tok = f.read().strip()
                    self._token = tok or None
                    self._header = b"Bearer " + tok if tok else b""
                    self._stamp = stamp
            except OSError:
                self._token, self._stamp, self._header = None, None, b""

    def check(self, authorization: str | None) -> bool:
        now = _monotonic()  # token() inlined: this runs for every feedback request
        if now - self._checked >= self.check_interval_s:
            self._refresh(now)
        expected = self._token
        if expected is None or not authorization:
            return False
        raw = authorization.encode("utf-8", "surrogateescape")
        if hmac.compare_digest(raw, self._header):  # exactly `Bearer <token>` (constant time, like the parse below)
            return True
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(presented.strip().encode("utf-8", "surrogateescape"), expected)

    def check_raw(self, presented: str | None) -> bool:
        """The token itself (no scheme), as in the `X-Perennial-Token` header (constant time)."""
        expected = self.token()
        if expected is None or not presented:
            return False
        return hmac.compare_digest(presented.strip().encode("utf-8", "surrogateescape"), expected)


class RateLimiter:
    """Token bucket per client key; bounded number of tracked clients."""

    def __init__(self, rate: float, burst: float | None = None, max_clients: int = 10000) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self.max_clients = max_clients
        self._b: collections.OrderedDict[str, list[float]] = collections.OrderedDict()

    def allow(self, key: str) -> tuple[bool, float]:
        """(allowed, seconds until the next token when not)."""
        wait = self.wait(key)
        return wait == 0.0, wait

    def wait(self, key: str) -> float:
        """0.0: allowed (a token taken); else the seconds until the next token (nothing taken)."""
        now = _monotonic()
        b = self._b.get(key)
        if b is None:
            b = self._b[key] = [self.burst, now]
            if len(self._b) > self.max_clients:
                self._b.popitem(last=False)
            tokens = b[0]
        else:
            self._b.move_to_end(key)
            tokens = b[0] + (now - b[1]) * self.rate
            if tokens > self.burst:  # noqa: PLR1730 -- no min() call: this runs for every feedback request
                tokens = self.burst
            b[1] = now
        if tokens >= 1.0:
            b[0] = tokens - 1.0
            return 0.0
        b[0] = tokens
        return (1.0 - tokens) / self.rate


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class ClientGone(Exception):
    """The client closed its connection before its request was read: nothing to answer, nothing to log above DEBUG."""


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """The whole body: at most `limit` bytes (BodyTooLarge), within `timeout_s` (BodyTimeout),
    ClientGone if the client went away meanwhile."""
    cl = request.content_length
    if cl is not None and cl > limit:
        raise BodyTooLarge
    if cl == 0:
        return b""
    content = request.content
    if cl is not None and content.is_eof():
        # the usual small body: it arrived with the head, nothing to wait for
        data = content.read_nowait(-1)
        if len(data) > limit:
            raise BodyTooLarge
        return data
    chunks = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout from None
    except (ConnectionError, asyncio.IncompleteReadError) as e:
        raise ClientGone(str(e)) from None
    except Exception as e:  # aiohttp's payload errors (a client cut mid-chunk)
        if type(e).__module__.startswith("aiohttp"):
            raise ClientGone(str(e)) from None
        raise
    return b"".join(chunks)


def body_error(e: Exception, limit: int, timeout_s: float) -> web.Response:
    """The answer to a body that could not be read (the connection is closed after it)."""
    if isinstance(e, BodyTooLarge):
        resp = json_error(413, f"request body must not exceed {limit} bytes", "body_too_large")
    elif isinstance(e, BodyTimeout):
        resp = json_error(408, f"the request body must arrive within {timeout_s:g} s", "body_timeout")
    else:
        resp = json_error(400, "the client closed the connection", "client_closed")
    resp.force_close()
    return resp


async def send_and_close(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """Send `resp`, then close the connection at once (aiohttp would otherwise linger, reading what
    is left of the body for up to 10 s: a slow-body client would keep its connection)."""
    try:
        await resp.prepare(request)
        await resp.write_eof()
    except ConnectionError:
        pass
    request.protocol.force_close()
    return resp


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Router errors as JSON; a client gone mid-request logged at DEBUG, not as an ERROR traceback;
    any other exception a JSON 500 (logged once, with its traceback: that one is a bug).

    The sidecar runs it around its whole app (connections.GuardedAppRunner `around`, see
    api_server.Sidecar.runner), not as an aiohttp middleware: one coroutine per request instead of
    the middleware chain; it still works as one."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return json_error(e.status, e.reason, "http_error")
    except (ClientGone, ConnectionError) as e:
        log.debug("Client went away path=%s error=%s", request.path, e)
        resp = web.Response(status=499)
        resp.force_close()
        return resp
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("Failed to handle request path=%s", request.path)
        return json_error(500, "the server failed to handle the request", "internal_error")
