"""The feedback sidecar: the pod's front door, in front of the engine on localhost.

Routes (thin) -> `Sidecar` handlers:
    POST /v1/feedback        ratings, authenticated by a bearer token, answered once fsync'd
    GET  /healthz            process alive (and its spool writer)
    GET  /readyz             ready only when the engine answers
    GET  /metrics            Prometheus
    *    /{anything else}    proxied to the engine; chat/completions captured

The sidecar needs no Kubernetes API access and never reads a service-account token.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import hmac
import json
import logging
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any, NamedTuple

import pydantic
from aiohttp import web
from pydantic_core import from_json
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from multidict import CIMultiDict

from perennial.api.records import FeedbackRecord, InteractionRecord, random_hex

from .config import SidecarConfig
from .errors import json_error
from .redact import Redactor
from .shipper import Shipper, Store
from .spool import Spool, closed_segments
from .upstream import UpstreamError, UpstreamPool, UpstreamResponse, UpstreamTimeout

log = logging.getLogger("perennial_server.sidecar")

# request headers not forwarded to the engine (lower-case bytes, as aiohttp's raw_headers compare)
HOP_BY_HOP = frozenset(
    h.lower().encode()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Trailers", "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Accept-Encoding",
    )
)
RESP_DROP = frozenset(h.lower() for h in ("Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Content-Encoding", "Date", "Server", "X-Request-Id"))
CAPTURED = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions"}
KNOWN_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/feedback", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/healthz", "/readyz", "/metrics", "/health")
FEEDBACK_FIELDS = {
    "id": "id", "response_id": "response_id", "responseId": "response_id", "type": "type", "score": "score",
    "thumbs": "thumbs", "label": "label", "correction": "correction", "other_response_id": "other_response_id",
    "otherResponseId": "other_response_id", "chosen": "chosen", "comment": "comment", "user": "user",
}
FEEDBACK_TEXT = ("label", "correction", "comment")


class Metrics:
    def __init__(self, multiprocess: bool = False) -> None:
        """`multiprocess`: one of several worker processes (prometheus_client's multiprocess mode,
        PROMETHEUS_MULTIPROC_DIR set before the import): /metrics sums every worker's files."""
        self.multiprocess = multiprocess
        self.registry = r = CollectorRegistry()
        self.requests = Counter("perennial_sidecar_requests", "Requests by route and status code.", ["route", "code"], registry=r)
        self.added_latency = Histogram(
            "perennial_sidecar_proxy_added_latency_seconds", "Time the sidecar adds to a proxied request (excluding the engine).",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5), registry=r,
        )
        self.captured = Counter("perennial_sidecar_captured_records", "Records handed to the spool.", ["kind"], registry=r)
        self.capture_dropped = Counter("perennial_sidecar_capture_dropped", "Interactions not captured (queue full or unparseable).", ["reason"], registry=r)
        self.feedback = Counter("perennial_sidecar_feedback", "Accepted feedback by type.", ["type"], registry=r)
        self.backlog_bytes = Gauge("perennial_sidecar_spool_backlog_bytes", "Bytes in the spool not yet shipped.", registry=r, multiprocess_mode="livesum")
        self.backlog_segments = Gauge("perennial_sidecar_spool_backlog_segments", "Segments in the spool not yet shipped.", registry=r, multiprocess_mode="livesum")
        self.ship_failures = Counter("perennial_sidecar_ship_failures", "Failed segment uploads.", registry=r)
        self.shipped = Counter("perennial_sidecar_shipped_segments", "Segments uploaded to the store.", registry=r)
        self.upstream_errors = Counter("perennial_sidecar_upstream_errors", "Engine errors by kind.", ["kind"], registry=r)
        self._req_children: dict[tuple[str, int], Any] = {}
        self.captured_interaction = self.captured.labels("interaction")
        self.captured_feedback = self.captured.labels("feedback")

    def exposition(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        r = CollectorRegistry()
        multiprocess.MultiProcessCollector(r)
        return generate_latest(r)

    def route(self, path: str) -> str:
        return path if path in KNOWN_ROUTES else "other"

    def count(self, path: str, code: int) -> None:
        """requests{route, code} += 1, with the labelled child cached (labels() costs a lock and a dict build)."""
        key = (path, code)
        child = self._req_children.get(key)
        if child is None:
            child = self.requests.labels(self.route(path), str(code))
            if len(self._req_children) < 4096:
                self._req_children[key] = child
        child.inc()


class TokenFile:
    """Bearer token from a mounted Secret file, re-read when the file changes."""

    def __init__(self, path: str, check_interval_s: float = 1.0) -> None:
        self.path = path
        self.check_interval_s = check_interval_s
        self._token: bytes | None = None
        self._stamp: tuple | None = None
        self._checked = -1e9

    def token(self) -> bytes | None:
        if not self.path:
            return None
        now = time.monotonic()
        if now - self._checked >= self.check_interval_s:
            self._checked = now
            try:
                st = os.stat(self.path)
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                if stamp != self._stamp:
                    with open(self.path, "rb") as f:
                        tok = f.read().strip()
                    self._token = tok or None
                    self._stamp = stamp
            except OSError:
                self._token, self._stamp = None, None
        return self._token

    def check(self, authorization: str | None) -> bool:
        expected = self.token()
        if expected is None or not authorization:
            return False
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer":
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
        now = time.monotonic()
        b = self._b.get(key)
        if b is None:
            b = [self.burst, now]
            self._b[key] = b
            if len(self._b) > self.max_clients:
                self._b.popitem(last=False)
        else:
            self._b.move_to_end(key)
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
        if b[0] >= 1.0:
            b[0] -= 1.0
            return True, 0.0
        return False, (1.0 - b[0]) / self.rate


class BodyTooLarge(Exception):
    pass


class FeedbackError(NamedTuple):
    message: str
    code: str
    param: str | None = None


async def read_body(request: web.Request, limit: int) -> bytes:
    cl = request.content_length
    if cl is not None and cl > limit:
        raise BodyTooLarge
    chunks = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def sse_data(line: bytes) -> tuple[bool, Any]:
    """(is it a `data:` line, its JSON value; None when it is not JSON, e.g. `[DONE]`)."""
    if not line.startswith(b"data:"):
        return False, None
    try:
        return True, from_json(line[5:].strip())
    except ValueError:
        return True, None


def _sse_events(raw: bytes) -> list[dict]:
    """The JSON objects of an SSE stream's `data:` lines, in order.

    All payloads are parsed in one call (a JSON array of them); a stream with a line that is
    not exactly one JSON value falls back to line by line, skipping what does not parse."""
    payloads = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            p = line[5:].strip()
            if p and p != b"[DONE]":
                payloads.append(p)
    if not payloads:
        return []
    try:
        events = from_json(b"[" + b",".join(payloads) + b"]")
    except ValueError:
        events = None
    if events is None or len(events) != len(payloads):
        events = []
        for p in payloads:
            try:
                events.append(from_json(p))
            except ValueError:
                pass
    return [e for e in events if isinstance(e, dict)]


def assemble_stream(raw: bytes, endpoint: str) -> dict:
    """Response text, finish reason, usage and model from an SSE stream (choice 0)."""
    parts: list[str] = []
    finish = usage = model = None
    for ev in _sse_events(raw):
        model = ev.get("model") or model
        if isinstance(ev.get("usage"), dict):
            usage = ev["usage"]
        for ch in ev.get("choices") or []:
            if not isinstance(ch, dict) or ch.get("index", 0) != 0:
                continue
            if endpoint == "chat.completions":
                delta = ch.get("delta") or {}
                if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                    parts.append(delta["content"])
            elif isinstance(ch.get("text"), str):
                parts.append(ch["text"])
            if ch.get("finish_reason"):
                finish = ch["finish_reason"]
    return {"response": "".join(parts), "finish_reason": finish, "usage": usage, "model": model}


def assemble_json(body: dict, endpoint: str) -> dict:
    text = ""
    finish = None
    choices = body.get("choices") or []
    if choices and isinstance(choices[0], dict):
        ch = choices[0]
        if endpoint == "chat.completions":
            msg = ch.get("message") or {}
            text = msg.get("content") or "" if isinstance(msg, dict) else ""
        else:
            text = ch.get("text") or ""
        finish = ch.get("finish_reason")
    return {"response": text if isinstance(text, str) else str(text), "finish_reason": finish, "usage": body.get("usage"), "model": body.get("model")}


class Capture:
    """Builds, redacts and spools interaction records off the response path."""

    def __init__(self, sidecar: "Sidecar") -> None:
        self.s = sidecar
        self.q: collections.deque[dict] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batch_wait_s = 0.02

    def submit(self, item: dict) -> None:
        if len(self.q) >= self.s.cfg.capture_queue_max:
            self.s.metrics.capture_dropped.labels("queue_full").inc()
            return
        self.q.append(item)
        self._wake.set()

    def build(self, it: dict) -> InteractionRecord:
        """Parse what the response path kept as bytes, redact, validate. ValueError: not capturable."""
        cfg, red = self.s.cfg, self.s.redactor
        req = from_json(it["request"])
        if not isinstance(req, dict):
            raise ValueError("the request body is not a JSON object")
        model = req.get("model") if isinstance(req.get("model"), str) else ""
        params = {k: v for k, v in req.items() if k not in ("messages", "prompt", "model")}
        messages = prompt = None
        if it["endpoint"] == "chat.completions":
            messages = red.value(req.get("messages"))
        else:
            p = req.get("prompt")
            prompt = red.text(p) if isinstance(p, str) else red.text(json.dumps(p))
        out = it["out"] if it.get("out") is not None else assemble_stream(it["raw"], it["endpoint"])
        usage = out.get("usage") if isinstance(out.get("usage"), dict) else None
        return InteractionRecord(
            id=it["id"], deployment=cfg.deployment, namespace=cfg.namespace, revision=cfg.revision, region=cfg.region,
            model=model or "", adapter=(model if model and model != cfg.base_model_name else None),
            endpoint=it["endpoint"], messages=messages, prompt=prompt, params=red.value(params),
            response=red.text(out.get("response") or ""), finish_reason=out.get("finish_reason"),
            usage=usage, latency_ms=round(it["latency_s"] * 1000.0, 3), stream=it["stream"],
        )

    def drain_some(self, n: int = 64, budget_s: float = 0.0005) -> None:
        """Build up to `n` records, stopping after `budget_s`: responses wait at most about that long."""
        deadline = time.perf_counter() + budget_s
        for _ in range(min(n, len(self.q))):
            if time.perf_counter() > deadline:
                break
            it = self.q.popleft()
            try:
                line = self.build(it).to_json()
            except (pydantic.ValidationError, ValueError, TypeError) as e:
                log.debug("Dropped uncapturable interaction id=%s error=%s", it.get("id"), e)
                self.s.metrics.capture_dropped.labels("invalid").inc()
                continue
            self.s.spool.append_nowait(line)
            self.s.metrics.captured_interaction.inc()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            # let interactions gather for a moment: one wake-up then builds many (the records are
            # written every 50 ms anyway), instead of a task switch per response
            await asyncio.sleep(self.batch_wait_s)
            self._wake.clear()
            while self.q:
                self.drain_some()
                await asyncio.sleep(0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="capture")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        while self.q:
            self.drain_some(len(self.q), budget_s=math.inf)


class Sidecar:
    def __init__(self, cfg: SidecarConfig) -> None:
        cfg.validate()
        self.root_cfg = cfg  # the spool dir and pod name of the pod, not of this worker
        self.cfg = cfg = cfg.for_worker()
        self.metrics = Metrics(multiprocess=cfg.worker_index >= 0 and bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR")))
        self.redactor = Redactor.from_config(cfg.redaction_enabled, cfg.redaction_extra_patterns)
        self.token = TokenFile(cfg.token_file)
        self.limiter = RateLimiter(cfg.rate_limit_per_second, burst=max(1.0, cfg.rate_limit_per_second))
        self.spool = Spool(cfg.spool_dir, max_segment_bytes=cfg.segment_max_bytes, max_segment_age_s=cfg.segment_max_age_s,
                           coalesce_s=0.05)  # interactions: one write per 50 ms (their fsync is once a second anyway)
        self.shipper: Shipper | None = None
        self.adopted: list[Shipper] = []
        self.capture = Capture(self)
        self.pool: UpstreamPool | None = None
        up = cfg.upstream_url()
        self.upstream_host, self.upstream_port, self.upstream_prefix = up.hostname or "127.0.0.1", up.port or 80, up.path.rstrip("/")
        self._sample = cfg.sample_percent / 100.0

    # ------------------------------------------------------------ lifecycle
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes, handler_args={"max_field_size": 16384})
        app.router.add_post("/v1/feedback", self.feedback)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_route("*", "/v1/feedback", self.method_not_allowed)
        app.router.add_route("*", "/{tail:.*}", self.proxy)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, _app: web.Application) -> None:
        if self.cfg.store_uri:
            self.shipper = self._shipper(self.cfg.spool_dir, self.cfg.pod, on_backlog=self._set_backlog)
            self.spool.on_closed = self.shipper.kick
        await self.spool.start()  # recovers a crashed predecessor's segments
        if self.shipper:
            self.shipper.start()  # ships them
        if self.cfg.worker_index <= 0:
            for d, pod in await asyncio.to_thread(self._recover_orphans):
                sh = self._shipper(d, pod)
                sh.start()
                self.adopted.append(sh)
                log.info("Shipping the spool of a former worker dir=%s", d)
        self.capture.start()
        self.pool = UpstreamPool(self.upstream_host, self.upstream_port, connect_timeout_s=self.cfg.upstream_connect_timeout_s,
                                 read_timeout_s=self.cfg.upstream_timeout_s)
        log.info("Started sidecar upstream=%s spool=%s store=%s", self.cfg.upstream, self.cfg.spool_dir, self.cfg.store_uri or "-")

    def _shipper(self, spool_dir: str, pod: str, **kw: Any) -> Shipper:
        return Shipper(spool_dir, Store(self.cfg.store_uri), deployment=self.cfg.deployment, pod=pod, interval_s=self.cfg.ship_interval_s,
                       on_shipped=lambda s, w: self.metrics.shipped.inc(), on_failure=lambda s, e: self.metrics.ship_failures.inc(), **kw)

    def _recover_orphans(self) -> list[tuple[str, str]]:
        """Spools of workers this configuration no longer runs (the pod ran more workers before):
        close what they left open; return (dir, pod name) of those with segments to ship."""
        out = []
        for i, d, pod in self.root_cfg.worker_spools():
            if i < self.cfg.workers:
                continue
            Spool(d).recover()
            if self.cfg.store_uri and closed_segments(Path(d)):
                out.append((d, pod))
        return out

    def _set_backlog(self, segments: int, size: int) -> None:
        self.metrics.backlog_segments.set(segments)
        self.metrics.backlog_bytes.set(size)

    async def _cleanup(self, _app: web.Application) -> None:
        await self.capture.stop()
        await self.spool.close()
        if self.shipper:
            await self.shipper.stop()
        for sh in self.adopted:
            await sh.stop()
        if self.pool:
            await self.pool.close()
        log.info("Stopped sidecar records=%d fsyncs=%d", self.spool.records, self.spool.fsyncs)

    # ------------------------------------------------------------ small routes
    def _count(self, path: str, code: int) -> None:
        self.metrics.count(path, code)

    async def healthz(self, request: web.Request) -> web.Response:
        t = self.spool._task
        ok = t is not None and not t.done()
        self._count("/healthz", 200 if ok else 503)
        if not ok:
            return json_error(503, "spool writer is not running", "spool_dead")
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        assert self.pool is not None
        ok = False
        try:
            async with asyncio.timeout(2.0):
                r = await self.pool.request("GET", self.upstream_prefix + self.cfg.engine_health_path, [])
                try:
                    await r.read()
                    ok = r.status == 200
                finally:
                    r.release()
        except (UpstreamError, TimeoutError, OSError):
            ok = False
        self._count("/readyz", 200 if ok else 503)
        if not ok:
            return json_error(503, "engine is not ready", "engine_not_ready")
        return web.json_response({"status": "ready"})

    async def metrics_handler(self, request: web.Request) -> web.Response:
        self._count("/metrics", 200)
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def method_not_allowed(self, request: web.Request) -> web.Response:
        self._count(request.path, 405)
        return json_error(405, f"method `{request.method}` is not allowed on `{request.path}`; use `POST`", "method_not_allowed", headers={"Allow": "POST"})

    # ------------------------------------------------------------ feedback
    async def feedback(self, request: web.Request) -> web.Response:
        resp = await self._feedback(request)
        self._count("/v1/feedback", resp.status)
        return resp

    async def _feedback(self, request: web.Request) -> web.Response:
        """One feedback object, or a JSON array of up to `feedback_batch_max` of them (all or none)."""
        ok, retry = self.limiter.allow(request.remote or "?")
        if not ok:
            return json_error(429, "too many feedback requests; slow down", "rate_limit_exceeded", headers={"Retry-After": str(max(1, math.ceil(retry)))})
        if not self.token.check(request.headers.get("Authorization")):
            return json_error(401, "a valid bearer token is required (`Authorization: Bearer <token>`)", "invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="perennial-feedback"'})
        try:
            raw = await read_body(request, self.cfg.max_body_bytes)
        except BodyTooLarge:
            return json_error(413, f"request body must not exceed {self.cfg.max_body_bytes} bytes", "body_too_large")
        try:
            body = json.loads(raw)
        except ValueError:
            return json_error(400, "request body must be a JSON object (or an array of them)", "invalid_json")
        batch = isinstance(body, list)
        items = body if batch else [body]
        if batch and not 1 <= len(items) <= self.cfg.feedback_batch_max:
            return json_error(400, f"a feedback array must hold 1 to {self.cfg.feedback_batch_max} objects, not {len(items)}", "invalid_batch_size")
        recs: list[FeedbackRecord] = []
        lines: list[str] = []
        for i, item in enumerate(items):
            res = self._feedback_record(item)
            if isinstance(res, FeedbackError):
                where = f"[{i}]" if batch else ""
                param = (where + ("." if res.param and batch else "") + (res.param or "")) or None
                return json_error(400, (f"feedback{where}: " if batch else "") + res.message, res.code, param=param)
            recs.append(res[0])
            lines.append(res[1])
        try:
            for line in lines:  # no await in between: one write and one fsync carry the whole batch
                self.spool.append_nowait(line)
            await self.spool.sync()
        except (OSError, RuntimeError) as e:
            return json_error(503, f"feedback could not be stored: {e}"[:300], "storage_unavailable")
        for rec in recs:
            self.metrics.feedback.labels(rec.type).inc()
        self.metrics.captured_feedback.inc(len(recs))
        out = [{"id": r.id, "object": "feedback", "response_id": r.response_id, "type": r.type, "status": "recorded"} for r in recs]
        return web.json_response({"object": "list", "data": out} if batch else out[0])

    def _feedback_record(self, body: Any) -> tuple[FeedbackRecord, str] | "FeedbackError":
        if not isinstance(body, dict):
            return FeedbackError("request body must be a JSON object (or an array of them)", "invalid_json")
        fields: dict[str, Any] = {}
        for k, v in body.items():
            name = FEEDBACK_FIELDS.get(k)
            if name is None:
                return FeedbackError(f"unknown field `{k}`", "unknown_field", k[:64])
            fields[name] = v
        if "type" not in fields:
            present = [t for t in ("score", "thumbs", "label", "correction") if fields.get(t) is not None]
            if fields.get("other_response_id") is not None or fields.get("chosen") is not None:
                present.append("preference")
            if len(present) != 1:
                return FeedbackError("`type` must be one of 'score', 'thumbs', 'label', 'correction', 'preference'", "missing_type", "type")
            fields["type"] = present[0]
        sc = fields.get("score")
        if isinstance(sc, float) and not math.isfinite(sc):
            return FeedbackError("`score` must be a finite number", "invalid_value", "score")
        if isinstance(sc, bool):
            return FeedbackError("`score` must be a number", "invalid_value", "score")
        for t in FEEDBACK_TEXT:
            if isinstance(fields.get(t), str):
                fields[t] = self.redactor.text(fields[t])
        try:
            rec = FeedbackRecord(**fields, deployment=self.cfg.deployment, namespace=self.cfg.namespace)
            return rec, rec.to_json()
        except pydantic.ValidationError as e:
            err = e.errors()[0] if e.errors() else {}
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "__root__")
            msg = str(err.get("msg", "invalid feedback")).removeprefix("Value error, ")
            return FeedbackError(f"`{loc}`: {msg}" if loc else msg, "invalid_feedback", loc or None)
        except (ValueError, TypeError) as e:  # e.g. unencodable strings
            return FeedbackError(f"invalid feedback: {e}"[:300], "invalid_feedback")

    # ------------------------------------------------------------ proxy
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
        except BodyTooLarge:
            resp = json_error(413, f"request body must not exceed {self.cfg.max_body_bytes} bytes", "body_too_large")
        self._count(path, resp.status)
        return resp

    async def _proxy(self, request: web.Request, t0: float) -> web.StreamResponse:
        assert self.pool is not None
        body = await read_body(request, self.cfg.max_body_bytes)
        endpoint = CAPTURED.get(request.path) if request.method == "POST" else None
        # the request is parsed (and redacted) later, in the capture batch, not on the response path
        capture = bool(endpoint and body) and self._sample > 0 and (self._sample >= 1 or random.random() < self._sample)
        t_send = time.perf_counter()
        up: UpstreamResponse | None = None
        try:
            up = await self.pool.request(request.method, self.upstream_prefix + request.raw_path, self._fwd_headers(request), body or None)
            ctype = up.header("Content-Type") or ""
            if endpoint and ctype.startswith("text/event-stream"):
                return await self._stream(request, up, endpoint, body, capture, t0, t_send)
            if endpoint:
                return await self._json(request, up, endpoint, ctype, body, capture, t0, t_send)
            return await self._passthrough(request, up, t0, t_send)
        except UpstreamTimeout:
            self.metrics.upstream_errors.labels("timeout").inc()
            return json_error(504, "the engine did not answer in time", "upstream_timeout")
        except UpstreamError as e:
            self.metrics.upstream_errors.labels("connection").inc()
            log.debug("Engine request failed error=%s", e)
            return json_error(502, "the engine is unavailable", "upstream_unavailable")
        finally:
            if up is not None:
                up.release()

    async def _json(self, request: web.Request, up: UpstreamResponse, endpoint: str, ctype: str, req_body: bytes,
                    capture: bool, t0: float, t_send: float) -> web.StreamResponse:
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
        resp = web.Response(body=data, status=up.status, headers=self._resp_headers(up, rid))
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away; the interaction still happened
        t_end = time.perf_counter()
        self.metrics.added_latency.observe((t_send - t0) + (t_end - t_done))
        if capture and up.status == 200 and isinstance(out_json, dict):
            self.capture.submit({"id": rid, "endpoint": endpoint, "request": req_body, "out": assemble_json(out_json, endpoint), "latency_s": t_end - t0, "stream": False})
        return resp

    async def _passthrough(self, request: web.Request, up: UpstreamResponse, t0: float, t_send: float) -> web.StreamResponse:
        """Any other path: stream it through untouched."""
        rid = up.header("X-Request-Id") or random_hex()
        resp = web.StreamResponse(status=up.status, headers=self._resp_headers(up, rid))
        if up.content_length is not None:
            resp.content_length = up.content_length
        await resp.prepare(request)
        try:
            async for chunk in up.iter_chunks():
                await resp.write(chunk)
            await resp.write_eof()
        except (UpstreamError, OSError):
            # headers are out: nothing to do but cut the connection
            self.metrics.upstream_errors.labels("stream").inc()
            if request.transport is not None:
                request.transport.close()
        self.metrics.added_latency.observe(t_send - t0)
        return resp

    @staticmethod
    def _new_id(endpoint: str) -> str:
        return ("chatcmpl-" if endpoint == "chat.completions" else "cmpl-") + random_hex()

    async def _stream(self, request: web.Request, up: UpstreamResponse, endpoint: str, req_body: bytes,
                      capture: bool, t0: float, t_send: float) -> web.StreamResponse:
        """SSE: forward chunk by chunk; the response id is the engine's first chunk id (or one we assign)."""
        pending = bytearray()
        rid: str | None = None
        rewrite = False
        resp: web.StreamResponse | None = None
        raw_all = bytearray() if capture else None
        added = t_send - t0
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
                        resp = web.StreamResponse(status=up.status, headers=self._resp_headers(up, rid))
                        await resp.prepare(request)
                        added += time.perf_counter() - t
                    if rewrite:
                        pending = await self._write_rewritten(resp, pending, rid, raw_all, final=False)
                    else:
                        await resp.write(bytes(pending))  # the head goes out with it
                        if raw_all is not None:
                            raw_all += pending
                        pending = bytearray()
                        passthrough = True
                        break
            finally:
                await chunks.aclose()
            if passthrough:
                assert resp is not None
                await self._pump(request, resp, up, raw_all)
            if resp is None:
                rid = self._new_id(endpoint)
                resp = web.StreamResponse(status=up.status, headers=self._resp_headers(up, rid))
                await resp.prepare(request)
                rewrite = True
            if rewrite and pending:
                await self._write_rewritten(resp, pending, rid, raw_all, final=True)
            await resp.write_eof()
        except (UpstreamError, ConnectionResetError) as e:
            if isinstance(e, ConnectionResetError) or request.transport is None or request.transport.is_closing():
                # the client went away (often right after reading `[DONE]`): keep what it was sent
                if capture and up.status == 200 and raw_all and rid:
                    self._capture_stream(rid, endpoint, req_body, raw_all, t0)
                if resp is None:
                    raise ConnectionResetError("client went away") from e
                return resp
            # engine failed mid-stream: tell the client in-band, then end the stream
            self.metrics.upstream_errors.labels("stream").inc()
            if resp is None:
                raise
            err = {"error": {"message": "the engine stream ended abnormally", "type": "upstream_error", "code": "upstream_stream_error"}}
            try:
                await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
                await resp.write_eof()
            except ConnectionResetError:
                pass
            return resp
        self.metrics.added_latency.observe(added)
        if capture and up.status == 200 and raw_all is not None and rid:
            self._capture_stream(rid, endpoint, req_body, raw_all, t0)
        return resp

    def _capture_stream(self, rid: str, endpoint: str, req_body: bytes, raw: bytearray, t0: float) -> None:
        self.capture.submit({"id": rid, "endpoint": endpoint, "request": req_body, "raw": bytes(raw), "latency_s": time.perf_counter() - t0, "stream": True})

    @staticmethod
    async def _pump(request: web.Request, resp: web.StreamResponse, up: UpstreamResponse, raw_all: bytearray | None) -> None:
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

    async def _write_rewritten(self, resp: web.StreamResponse, buf: bytearray, rid: str, raw_all: bytearray | None, final: bool) -> bytearray:
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
        if out:
            await resp.write(bytes(out))
            if raw_all is not None:
                raw_all += out
        return bytearray(rest)


# ---------------------------------------------------------------- entrypoint
async def serve(cfg: SidecarConfig, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    sidecar = Sidecar(cfg)
    app = sidecar.make_app()
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=cfg.drain_timeout_s, access_log=None)
    await runner.setup()
    # several workers (see workers.py) share the port; the kernel spreads connections over them
    site = web.TCPSite(runner, cfg.host, cfg.port, backlog=2048, reuse_address=True, reuse_port=cfg.workers > 1 or None)
    await site.start()
    log.info("Listening host=%s port=%d", cfg.host, cfg.port)
    # Everything allocated so far (modules, pydantic schemas, the app) lives as long as the process:
    # move it out of the collector's sight, so that a full collection under load does not stall the
    # loop scanning it (about 20 ms for ~54k objects on a slow core; a p99 spike on every request in flight).
    gc.collect()
    gc.freeze()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})  # held by a worker until now (cli.py)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("Draining in-flight requests timeout=%.0fs", cfg.drain_timeout_s)
    await runner.cleanup()  # stop listening, drain handlers, flush + ship (on_cleanup)


def loop_factory():
    """uvloop when installed (the `server` extra): a C event loop and transports roughly halve
    the sidecar's CPU per proxied request; plain asyncio otherwise."""
    if os.environ.get("PERENNIAL_SIDECAR_UVLOOP", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(cfg: SidecarConfig) -> None:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(cfg))
