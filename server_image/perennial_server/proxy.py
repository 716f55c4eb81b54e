"""The proxy to the engine (every path the sidecar does not answer itself): forwards the request,
streams the answer back, makes sure a completion has an id (the id a client rates), and hands
chat/completions to the capture. Engine errors become OpenAI-style JSON (502/504), or, mid-stream,
an in-band error event."""

from __future__ import annotations

import json
import logging
import random
import time
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict
from perennial_records import random_hex
from pydantic_core import from_json

from .capture import assemble_json, sse_data
from .errors import json_error
from .middleware import BodyTimeout, BodyTooLarge, body_error, read_body, send_and_close
from .routes import MANAGED_PATHS, Renamer, Routed, managed_path_error
from .upstream import UpstreamError, UpstreamResponse, UpstreamTimeout

if TYPE_CHECKING:
    from .api_server import Sidecar

log = logging.getLogger("perennial_server.proxy")

# request headers not forwarded to the engine (lower-case bytes, as aiohttp's raw_headers compare);
# Content-Encoding too: aiohttp decodes a compressed request body, the engine gets the decoded bytes;
# X-Perennial-Token: the operator's token is the sidecar's (routes.TOKEN_HEADER)
HOP_BY_HOP = frozenset(
    h.lower().encode()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Trailers", "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Accept-Encoding", "Content-Encoding",
        "X-Perennial-Token",
    )
)
RESP_DROP = frozenset(h.lower() for h in ("Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Content-Encoding", "Date", "Server", "X-Request-Id"))
CAPTURED = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions"}


class ProxyHandler:
    def __init__(self, sidecar: Sidecar) -> None:
        self.s = sidecar

    def _fwd_headers(self, request: web.Request) -> list[tuple[str, str]]:
        h = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers if k.lower() not in HOP_BY_HOP]
        h.append(("X-Forwarded-For", request.remote or ""))
        return h

    @staticmethod
    def _resp_headers(up: UpstreamResponse, rid: str) -> CIMultiDict[str]:
        h: CIMultiDict[str] = CIMultiDict((k, v) for k, v in up.headers if k.lower() not in RESP_DROP)
        h["X-Request-Id"] = rid
        return h

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        path = request.path
        try:
            resp = await self._proxy(request, t0)
        except BodyTooLarge as e:
            resp = body_error(e, self.s.cfg.max_body_bytes, self.s.cfg.client_body_timeout_s)
        except BodyTimeout as e:
            resp = await send_and_close(request, body_error(e, self.s.cfg.max_body_bytes, self.s.cfg.client_body_timeout_s))
        self.s.metrics.count(path, resp.status)
        return resp

    async def _proxy(self, request: web.Request, t0: float) -> web.StreamResponse:
        assert self.s.pool is not None
        body = await read_body(request, self.s.cfg.max_body_bytes, self.s.cfg.client_body_timeout_s)
        rt: Routed | None = None
        routes = self.s.routes
        if routes is not None:  # served name -> adapter (routes.py); None: the engine's own names
            if request.path in MANAGED_PATHS:
                return managed_path_error(request.path)
            if body and request.method == "POST":
                r = routes.route(body, request.headers)
                if r is not None and not isinstance(r, Routed):
                    return r  # not a served model (404), a preview name without the operator's token (401): not the engine's
                rt = r
        endpoint = CAPTURED.get(request.path) if request.method == "POST" else None
        # the request is parsed (and redacted) later, in the capture batch, not on the response path
        capture = bool(endpoint and body) and self.s.sample > 0 and (self.s.sample >= 1 or random.random() < self.s.sample)
        t_send = time.perf_counter()
        up: UpstreamResponse | None = None
        try:
            headers = self._fwd_headers(request)
            if rt is not None and rt.preview:  # the operator's token stops here
                headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
            up = await self.s.pool.request(request.method, self.s.upstream_prefix + request.raw_path, headers,
                                           (rt.body if rt is not None else body) or None)
            if rt is not None and up.status == 404 and rt.adapter is not None:
                routes.kick()  # type: ignore[union-attr]  # the engine lost the adapter (restarted): reload it soon
            ctype = up.header("Content-Type") or ""
            if endpoint and ctype.startswith("text/event-stream"):
                return await self._stream(request, up, endpoint, body, capture, t0, t_send, rt)
            if endpoint:
                return await self._json(request, up, endpoint, ctype, body, capture, t0, t_send, rt)
            return await self._passthrough(request, up, t0, t_send, rt.renamer if rt is not None else None)
        except UpstreamTimeout:
            self.s.metrics.upstream_errors.labels("timeout").inc()
            return json_error(504, "the engine did not answer in time", "upstream_timeout")
        except UpstreamError as e:
            self.s.metrics.upstream_errors.labels("connection").inc()
            log.debug("Engine request failed error=%s", e)
            return json_error(502, "the engine is unavailable", "upstream_unavailable")
        finally:
            if up is not None:
                up.release()
            if rt is not None:
                routes.done(rt)  # type: ignore[union-attr]

    async def _json(self, request: web.Request, up: UpstreamResponse, endpoint: str, ctype: str, req_body: bytes,
                    capture: bool, t0: float, t_send: float, rt: Routed | None = None) -> web.StreamResponse:
        """A whole (non-streamed) completion: make sure it has an id, answer, capture."""
        data = await up.read()
        t_done = time.perf_counter()
        rid = None
        out_json = None
        if ctype.startswith("application/json"):
            try:
                out_json = from_json(data)
            except ValueError:
                out_json = None
        if isinstance(out_json, dict) and up.status < 400:
            rid = out_json.get("id") if isinstance(out_json.get("id"), str) and out_json.get("id") else None
            if rid is None:
                rid = self._new_id(endpoint)
                out_json["id"] = rid
                data = json.dumps(out_json).encode()
        rid = rid or self._new_id(endpoint)
        if up.status < 400:
            self.s.seen_responses.add(rid)
        if rt is not None and rt.renamer is not None:
            data = rt.renamer.whole(data)  # the answer names the served model, not the adapter
        resp = web.Response(body=data, status=up.status, headers=self._resp_headers(up, rid))
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away; the interaction still happened
        t_end = time.perf_counter()
        self.s.metrics.added_latency.observe((t_send - t0) + (t_end - t_done))
        if capture and up.status == 200 and isinstance(out_json, dict):
            item = {"id": rid, "endpoint": endpoint, "request": req_body, "out": assemble_json(out_json, endpoint), "latency_s": t_end - t0, "stream": False}
            if rt is not None:
                item["adapter"] = rt.adapter
            self.s.capture.submit(item)
        return resp

    async def _passthrough(self, request: web.Request, up: UpstreamResponse, t0: float, t_send: float, ren: Renamer | None = None) -> web.StreamResponse:
        """Any other path: stream it through untouched (but for a routed request's `model`)."""
        rid = up.header("X-Request-Id") or random_hex()
        resp = web.StreamResponse(status=up.status, headers=self._resp_headers(up, rid))
        if up.content_length is not None and ren is None:
            resp.content_length = up.content_length
        await resp.prepare(request)
        try:
            async for chunk in up.iter_chunks():
                if ren is not None:
                    chunk = ren.feed(chunk)
                    if not chunk:
                        continue
                await resp.write(chunk)
            if ren is not None and (rest := ren.flush()):
                await resp.write(rest)
            await resp.write_eof()
        except (UpstreamError, OSError):
            # headers are out: nothing to do but cut the connection
            self.s.metrics.upstream_errors.labels("stream").inc()
            if request.transport is not None:
                request.transport.close()
        self.s.metrics.added_latency.observe(t_send - t0)
        return resp

    @staticmethod
    def _new_id(endpoint: str) -> str:
        return ("chatcmpl-" if endpoint == "chat.completions" else "cmpl-") + random_hex()

    async def _stream(self, request: web.Request, up: UpstreamResponse, endpoint: str, req_body: bytes,
                      capture: bool, t0: float, t_send: float, rt: Routed | None = None) -> web.StreamResponse:
        """SSE: forward chunk by chunk; the response id is the engine's first chunk id (or one we assign)."""
        pending = bytearray()
        rid: str | None = None
        rewrite = False
        resp: web.StreamResponse | None = None
        raw_all = bytearray() if capture else None
        added = t_send - t0
        ren = rt.renamer if rt is not None else None
        try:
            passthrough = False
            chunks = up.iter_chunks()
            try:
                async for chunk in chunks:
                    pending += chunk
                    if resp is None:
                        rid, rewrite = self._first_id(pending, endpoint)
                        if rid is None:
                            continue  # no complete event yet
                        t = time.perf_counter()
                        if up.status < 400:
                            self.s.seen_responses.add(rid)
                        resp = web.StreamResponse(status=up.status, headers=self._resp_headers(up, rid))
                        await resp.prepare(request)
                        added += time.perf_counter() - t
                    if rewrite:
                        pending = await self._write_rewritten(resp, pending, rid, raw_all, final=False, ren=ren)
                    else:
                        head = bytes(pending) if ren is None else ren.feed(bytes(pending))
                        if head:
                            await resp.write(head)  # the head goes out with it
                        if raw_all is not None:
                            raw_all += head
                        pending = bytearray()
                        passthrough = True
                        break
            finally:
                await chunks.aclose()
            if passthrough:
                assert resp is not None
                await self._pump(request, resp, up, raw_all, ren)
                if ren is not None and (rest := ren.flush()):
                    await resp.write(rest)
                    if raw_all is not None:
                        raw_all += rest
            if resp is None:
                rid = self._new_id(endpoint)
                resp = web.StreamResponse(status=up.status, headers=self._resp_headers(up, rid))
                await resp.prepare(request)
                rewrite = True
            if rewrite and pending:
                await self._write_rewritten(resp, pending, rid, raw_all, final=True, ren=ren)
            await resp.write_eof()
        except (UpstreamError, ConnectionResetError) as e:
            if isinstance(e, ConnectionResetError) or request.transport is None or request.transport.is_closing():
                # the client went away (often right after reading `[DONE]`): keep what it was sent
                if capture and up.status == 200 and raw_all and rid:
                    self._capture_stream(rid, endpoint, req_body, raw_all, t0, rt=rt)
                if resp is None:
                    raise ConnectionResetError("client went away") from e
                return resp
            # engine failed mid-stream: tell the client in-band, then end the stream; what the client
            # was sent is captured (finish reason `error`): it may rate it like any other answer
            self.s.metrics.upstream_errors.labels("stream").inc()
            if resp is None:
                raise
            if capture and up.status == 200 and raw_all and rid:
                self._capture_stream(rid, endpoint, req_body, raw_all, t0, finish_reason="error", rt=rt)
            err = {"error": {"message": "the engine stream ended abnormally", "type": "upstream_error", "code": "upstream_stream_error"}}
            try:
                await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
                await resp.write_eof()
            except ConnectionResetError:
                pass
            return resp
        self.s.metrics.added_latency.observe(added)
        if capture and up.status == 200 and raw_all is not None and rid:
            self._capture_stream(rid, endpoint, req_body, raw_all, t0, rt=rt)
        return resp

    def _capture_stream(self, rid: str, endpoint: str, req_body: bytes, raw: bytearray, t0: float, finish_reason: str | None = None,
                        rt: Routed | None = None) -> None:
        item = {"id": rid, "endpoint": endpoint, "request": req_body, "raw": bytes(raw), "latency_s": time.perf_counter() - t0, "stream": True}
        if finish_reason:
            item["finish_reason"] = finish_reason
        if rt is not None:
            item["adapter"] = rt.adapter
        self.s.capture.submit(item)

    @staticmethod
    async def _pump(request: web.Request, resp: web.StreamResponse, up: UpstreamResponse, raw_all: bytearray | None, ren: Renamer | None = None) -> None:
        """The rest of an SSE stream whose id needs no rewriting, event by event as the engine sends them.

        Written to the client's transport from the engine connection's callback (HTTP/1.1 chunked
        framing, as aiohttp's writer would, which still writes the last chunk): no task wake-up
        per event. When the client reads slower than the engine writes, waits for it to drain."""
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("client went away")
        # aiohttp chose the framing in prepare(): chunked for HTTP/1.1 (no Content-Length is known)
        chunked = "chunked" in resp.headers.get("Transfer-Encoding", "").lower()
        high = transport.get_write_buffer_limits()[1]

        def sink(data: bytes) -> bool:
            if transport.is_closing():
                return False
            if ren is not None:
                data = ren.feed(data)
                if not data:
                    return True  # all held back (a `"model"` cut in two): never an empty chunk, the stream's end
            transport.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
            if raw_all is not None:
                raw_all.extend(data)
            return transport.get_write_buffer_size() <= high

        while not await up.pump(sink):
            if transport.is_closing():
                raise ConnectionResetError("client went away")
            await request.writer.drain()

    def _first_id(self, buf: bytearray, endpoint: str) -> tuple[str | None, bool]:
        """Once a complete data event is buffered: (id, must_rewrite)."""
        text = bytes(buf).replace(b"\r\n", b"\n")
        if b"\n\n" not in text:
            return None, False
        for ev in text.split(b"\n\n")[:-1]:
            for line in ev.split(b"\n"):
                is_data, j = sse_data(line)
                if is_data:
                    if isinstance(j, dict) and isinstance(j.get("id"), str) and j["id"]:
                        return j["id"], False
                    return self._new_id(endpoint), True
        return self._new_id(endpoint), True

    async def _write_rewritten(self, resp: web.StreamResponse, buf: bytearray, rid: str, raw_all: bytearray | None, final: bool,
                               ren: Renamer | None = None) -> bytearray:
        """Write every complete event with `id` set to `rid`; return the incomplete rest."""
        text = bytes(buf).replace(b"\r\n", b"\n")
        events = text.split(b"\n\n")
        rest = events.pop() if not final else b""
        out = bytearray()
        for ev in events:
            if not ev:
                continue
            lines = []
            for line in ev.split(b"\n"):
                _, j = sse_data(line)
                if isinstance(j, dict):
                    j["id"] = rid
                    line = b"data: " + json.dumps(j).encode()
                lines.append(line)
            out += b"\n".join(lines) + b"\n\n"
        if final and rest:
            out += rest
        if ren is not None:
            out = bytearray(ren.whole(bytes(out)))  # whole events: nothing to hold back
        if out:
            await resp.write(bytes(out))
            if raw_all is not None:
                raw_all += out
        return bytearray(rest)

