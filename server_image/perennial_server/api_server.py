"""The feedback sidecar's server: routes, lifecycle and entrypoint, as vLLM's `entrypoints/openai/api_server.py`.

Routes (thin) -> handlers, on the client port (`--port`, the one a Service exposes):
    POST /v1/feedback        serving_feedback.FeedbackHandler: ratings, bearer token, answered once fsync'd
    GET  /healthz            process alive (and its spool writer)
    GET  /readyz             ready only when the engine answers (and, with --routes-file, the first routes applied)
    GET  /v1/models          with --routes-file: the base and the served names (else proxied)
    *    /metrics, /perennial/*   404: the admin port's (never proxied to the engine either)
    *    /{anything else}    proxy.ProxyHandler: proxied to the engine; chat/completions captured (capture.py)

and on the admin port (`--admin-port`, 9090; no Service exposes it: Prometheus and the operator reach the pod):
    GET  /metrics            Prometheus: the sidecar's metrics and the engine's own (relayed from its localhost
                             /metrics, bounded in time and size: engine_metrics.py)
    GET  /perennial/routes   with --routes-file: the applied routes revision, loaded adapters, errors (routes.py)

Request models: protocol.py. Auth, rate limit, body reading, JSON errors: middleware.py. Client
connection timeouts and limits: connections.py. The sidecar needs no Kubernetes API access and
never reads a service-account token.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web

from .capture import Capture, SeenResponses
from .config import SidecarConfig
from .connections import GuardedAppRunner, Limits, auto_max_connections, raise_nofile
from .engine_metrics import EngineMetrics
from .errors import json_error
from .idempotency import FeedbackIds
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .middleware import RateLimiter, TokenFile, errors_as_json
from .proxy import ProxyHandler
from .redact import Redactor
from .routes import EngineAdapters, Routes
from .serving_feedback import FeedbackHandler
from .shipper import Shipper, Store
from .spool import Segment, Spool, closed_segments
from .upstream import UpstreamError, UpstreamPool

log = logging.getLogger("perennial_server.sidecar")

#: connections the admin port keeps at most (Prometheus, the operator, a person with port-forward)
ADMIN_MAX_CONNECTIONS = 16
#: paths only the admin port answers (the client port answers 404 and never proxies them to the engine)
ADMIN_PATHS = ("/metrics", "/perennial/")
_EXPECT = hdrs.EXPECT


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
                           coalesce_s=0.05,  # interactions: one write per 50 ms (their fsync is once a second anyway)
                           # the feedback ids the shipper journals (idempotency.py): none held where nothing ships
                           max_keys=cfg.feedback_dedupe_max_ids if cfg.store_uri else 0)
        self.shipper: Shipper | None = None
        self.adopted: list[Shipper] = []
        self.capture = Capture(self)
        self.feedback_ids = FeedbackIds(cfg.spool_dir, cfg.feedback_dedupe_max_ids)
        self.seen_responses = SeenResponses()
        self.pool: UpstreamPool | None = None
        up = cfg.upstream_url()
        self.upstream_host, self.upstream_port, self.upstream_prefix = up.hostname or "127.0.0.1", up.port or 80, up.path.rstrip("/")
        self.sample = cfg.sample_percent / 100.0
        self.routes = self._routes() if cfg.routes_file else None  # served name -> adapter (routes.py)
        self.feedback = FeedbackHandler(self).create_feedback
        self.proxy = ProxyHandler(self).proxy
        self.engine_metrics = EngineMetrics(cfg.engine_metrics_path, timeout_s=cfg.engine_metrics_timeout_s,
                                            max_bytes=cfg.engine_metrics_max_bytes, own_prefix="perennial_sidecar_")

    def _routes(self) -> Routes:
        cfg, root = self.cfg, self.root_cfg
        state = peers = None
        if cfg.workers > 1:  # worker 0 loads and unloads; it waits for the others' state (routes.py)
            state = os.path.join(cfg.spool_dir, "routes-state.json")
            peers = [os.path.join(root.worker_spool(i)[0], "routes-state.json") for i in range(1, cfg.workers)] if cfg.worker_index <= 0 else []
        return Routes(cfg.routes_file, base_name=cfg.base_model_name, adapters_dir=cfg.adapters_dir, max_bytes=cfg.adapter_max_bytes,
                      manage=cfg.worker_index <= 0, state_file=state, peer_state_files=peers or (), token=self.token,
                      local_roots=cfg.local_adapter_roots(), denied=[*cfg.sidecar_folders(), *root.sidecar_folders()],
                      fetch_timeout_s=cfg.adapter_fetch_timeout_s)

    # ------------------------------------------------------------ lifecycle
    def make_app(self) -> web.Application:
        # no middlewares: errors_as_json runs around the whole app in the runner (runner())
        app = web.Application(client_max_size=self.cfg.max_body_bytes, handler_args={"max_field_size": 16384})
        app.router.add_post("/v1/feedback", self.feedback)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_route("*", "/metrics{tail:.*}", self.admin_only)
        app.router.add_route("*", "/perennial/{tail:.*}", self.admin_only)
        if self.routes is not None:
            app.router.add_get("/v1/models", self.routes.models_handler)
            app.router.add_get("/v1/models/{model:.+}", self.routes.model_handler)
        app.router.add_route("*", "/v1/feedback", self.method_not_allowed)
        app.router.add_route("*", "/{tail:.*}", self.proxy)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    def make_admin_app(self) -> web.Application:
        """The admin port's app: /metrics (the sidecar's and the engine's) and /perennial/routes. Served next to
        make_app()'s, by the same process and loop (serve()); it has no lifecycle of its own."""
        app = web.Application(client_max_size=1024, handler_args={"max_field_size": 8192})
        app.router.add_get("/metrics", self.metrics_handler)
        if self.routes is not None:
            app.router.add_get("/perennial/routes", self.routes.routes_handler)
        return app

    async def _startup(self, _app: web.Application) -> None:
        if self.cfg.store_uri:
            self.shipper = self._shipper(self.cfg.spool_dir, self.cfg.pod, on_backlog=self._set_backlog)
            self.spool.on_closed = self.shipper.kick
        await self.spool.start()  # recovers a crashed predecessor's segments
        n = await asyncio.to_thread(self.feedback_ids.load)  # before anything ships: see idempotency.py
        log.info("Loaded feedback ids for idempotency ids=%d", n)
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
        if self.routes is not None:
            self.routes.start(EngineAdapters(self.pool, self.upstream_prefix))
        log.info("Started sidecar upstream=%s spool=%s store=%s", self.cfg.upstream, self.cfg.spool_dir, self.cfg.store_uri or "-")

    def _shipper(self, spool_dir: str, pod: str, **kw: Any) -> Shipper:
        if spool_dir == self.cfg.spool_dir:
            kw["before_delete"] = self._journal_shipped
        return Shipper(spool_dir, Store(self.cfg.store_uri), deployment=self.cfg.deployment, pod=pod, interval_s=self.cfg.ship_interval_s,
                       on_shipped=lambda s, w: self.metrics.shipped.inc(), on_failure=lambda s, e: self.metrics.ship_failures.inc(), **kw)

    def _journal_shipped(self, seg: Segment, data: bytes) -> None:
        """The shipper's thread, before a segment of this process's spool leaves it: journal its feedback ids."""
        self.feedback_ids.journal_segment(data, self.spool.take_keys(seg.seq))

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
        if self.routes is not None:
            await self.routes.stop()
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

    def runner(self, app: web.Application, **kwargs: Any) -> GuardedAppRunner:
        """The runner that serves `app`: client connection limits (connections.py) and every answer
        OpenAI-style JSON (errors_as_json around every request, router errors included)."""
        first = next(iter(app.router.routes()), None)  # the route the router tries first
        fast = (not app.middlewares and not app.on_response_prepare and first is not None and first.method == "POST" and first.handler is self.feedback
                and first.resource is not None and first.resource.canonical == "/v1/feedback")
        return GuardedAppRunner(app, limits=self.limits(), around=self._around if fast else errors_as_json, access_log=None, **kwargs)

    def _around(self, request: web.Request, handler: Any) -> Any:
        """errors_as_json around every request. The hot path, a request for exactly `POST /v1/feedback`
        (no query, no `Expect`), goes straight to the handler the router would pick for it: resolving the
        route and the app's dispatch (Application._handle: the match info, a getpid() system call in
        asyncio.get_event_loop, middlewares the app does not have) cost ~7% of such a request, and the
        feedback handler uses none of what they set (`request.match_info` stays unset). Anything else,
        `Expect: 100-continue` included, takes the router."""
        if request.raw_path == "/v1/feedback" and request.method == "POST" and _EXPECT not in request.headers:
            return errors_as_json(request, self.feedback)
        return errors_as_json(request, handler)

    def admin_runner(self, app: web.Application, **kwargs: Any) -> GuardedAppRunner:
        """The runner of the admin port: the same guards, at most ADMIN_MAX_CONNECTIONS connections."""
        return GuardedAppRunner(app, limits=self.limits(admin=True), around=errors_as_json, access_log=None, **kwargs)

    def limits(self, admin: bool = False) -> Limits:
        """Client connection limits (connections.py); the connection limit derived from RLIMIT_NOFILE unless set
        (what the admin port may hold is set aside first)."""
        cfg = self.cfg
        if admin:
            max_conn = ADMIN_MAX_CONNECTIONS
        else:
            max_conn = cfg.max_connections or auto_max_connections(raise_nofile() - 2 * ADMIN_MAX_CONNECTIONS)
        return Limits(header_timeout_s=cfg.client_header_timeout_s, body_timeout_s=cfg.client_body_timeout_s,
                      keepalive_timeout_s=cfg.keepalive_timeout_s, max_connections=max_conn)

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
        if ok and self.routes is not None and not self.routes.ready:
            self._count("/readyz", 503)
            return json_error(503, "the routes file has not been applied yet (see GET /perennial/routes)", "routes_not_applied")
        self._count("/readyz", 200 if ok else 503)
        if not ok:
            return json_error(503, "engine is not ready", "engine_not_ready")
        return web.json_response({"status": "ready"})

    async def metrics_handler(self, request: web.Request) -> web.Response:
        """The sidecar's metrics, then the engine's (when it answers in time, within the size limit, in the text
        format; `perennial_sidecar_engine_metrics_up` says whether they are there)."""
        self._count("/metrics", 200)
        engine = await self.engine_metrics.scrape(self.pool, self.upstream_prefix)
        return web.Response(body=self.metrics.exposition() + engine, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def admin_only(self, request: web.Request) -> web.Response:
        self._count(request.path, 404)
        return json_error(404, f"`{request.path}` is served on the sidecar's admin port only", "admin_port_only")

    async def method_not_allowed(self, request: web.Request) -> web.Response:
        self._count(request.path, 405)
        return json_error(405, f"method `{request.method}` is not allowed on `{request.path}`; use `POST`", "method_not_allowed", headers={"Allow": "POST"})


# ---------------------------------------------------------------- entrypoint
async def serve(cfg: SidecarConfig, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    sidecar = Sidecar(cfg)
    app = sidecar.make_app()
    runner = sidecar.runner(app, handle_signals=False, shutdown_timeout=cfg.drain_timeout_s)
    admin_runner = sidecar.admin_runner(sidecar.make_admin_app(), handle_signals=False, shutdown_timeout=1.0)
    limits = runner.limits
    await runner.setup()
    await admin_runner.setup()
    # several workers (see workers.py) share the ports; the kernel spreads connections over them
    site = web.TCPSite(runner, cfg.host, cfg.port, backlog=2048, reuse_address=True, reuse_port=cfg.workers > 1 or None)
    await site.start()
    admin_site = web.TCPSite(admin_runner, cfg.host, cfg.admin_port, backlog=64, reuse_address=True, reuse_port=cfg.workers > 1 or None)
    await admin_site.start()
    log.info("Listening host=%s port=%d admin_port=%d max_connections=%d header_timeout=%gs body_timeout=%gs keepalive_timeout=%gs",
             cfg.host, cfg.port, admin_site._server.sockets[0].getsockname()[1] if admin_site._server else cfg.admin_port,  # type: ignore[union-attr]
             limits.max_connections, limits.header_timeout_s, limits.body_timeout_s, limits.keepalive_timeout_s)
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
    await admin_runner.cleanup()  # first: its /metrics uses the engine connections the client app's cleanup closes
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
