"""The operator runtime: builds the kopf registry explicitly (config, clock, one client per cluster) and runs it."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import kopf
import kubernetes

from .config import OperatorConfig
from .controllers import all_controllers
from .controllers.base import Context
from .controllers.manager import Manager
from .kube.aio import AsyncKube, configuration
from .kube.client import ApiError
from .kube.cache import Cache
from .kube.clusters import Clusters
from .resources.common import FINALIZER

log = logging.getLogger(__name__)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The operator's event loop: uvloop when installed (TLS, transports and the selector in C: the API client's
    requests and watch streams cost less CPU than on asyncio's pure-Python SSL protocol,
    benchmarks/operator_scale.py), as the control plane and the feedback sidecar do; asyncio's otherwise, or with
    ``PERENNIAL_OPERATOR_LOOP=asyncio``."""
    if os.environ.get("PERENNIAL_OPERATOR_LOOP", "") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def connection_info(cfg: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the same configuration our own client uses (kubeconfig, in-cluster or a URL)."""
    # The kubernetes client keeps a kubeconfig's or the service account's token under `BearerToken`.
    token = cfg.get_api_key_with_prefix("BearerToken", alias="authorization") or None
    scheme = None
    if token and " " in token:
        scheme, token = token.split(" ", 1)
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert or None,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme,
        token=token,
        certificate_path=cfg.cert_file or None,
        private_key_path=cfg.key_file or None,
        default_namespace="default",
    )


def build_registry(
    config: OperatorConfig,
    *,
    server: str | None = None,
    kubeconfig: str | None = None,
    token: str | None = None,
    ca_file: str | None = None,
    clock: Callable[[], float] = time.time,
) -> tuple[kopf.OperatorRegistry, Manager]:
    """Everything the operator registers, wired explicitly: settings, login, health, and the controllers."""
    registry = kopf.OperatorRegistry()
    clusters = {"local": AsyncKube(configuration(server, kubeconfig, token=token, ca_file=ca_file), name="local")}
    ctx = Context(clusters=clusters, cache=Cache(), config=config, clock=clock)
    manager = Manager(all_controllers(), ctx, workers=config.workers)
    # Regions in other clusters: a change there (or the cluster lost or back) wakes its Deployments.
    ctx.remote = Clusters(wake=lambda owners: manager.wake("Deployment", owners))
    ctx.wake = manager.wake

    @kopf.on.startup(registry=registry, id="settings")
    def settings_(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER  # kopf adds it only for handlers that need one: ours do not
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.queueing.error_delays = [1, 2, 5, 10, 30, 60]
        settings.networking.request_timeout = 60
        settings.networking.error_backoffs = [0.5, 1, 2, 5, 10]
        if server:
            # The embedded control plane: quick reconnects, no long waits on shutdown.
            settings.watching.reconnect_backoff = 0.2
            settings.background.instant_exiting_timeout = 0.5

    @kopf.on.login(registry=registry, id="login")
    def login(**_: Any) -> kopf.ConnectionInfo:
        # Read afresh at every (re-)login: rotated service-account tokens and exec-plugin tokens.
        return connection_info(configuration(server, kubeconfig, token=token, ca_file=ca_file))

    @kopf.on.probe(registry=registry, id="api")
    async def api_reachable(**_: Any) -> str:
        """`/healthz` fails (500, at once, not after kopf's retries) while the API server cannot be reached
        with the operator's credentials."""
        try:
            version = await asyncio.wait_for(clusters["local"].request("GET", "/version"), timeout=5)
        except (ApiError, asyncio.TimeoutError) as exc:
            raise kopf.PermanentError(f"the API server is not reachable: {exc or 'no answer in 5 s'}") from None
        return str(version.get("gitVersion") or "reachable")

    manager.register(registry)
    return registry, manager


def run(
    *,
    server: str | None = None,
    kubeconfig: str | None = None,
    token: str | None = None,
    ca_file: str | None = None,
    namespaces: list[str] | None = None,
    config: OperatorConfig | None = None,
    health_endpoint: str | None = "http://0.0.0.0:8081/healthz",
    metrics_port: int | None = 8080,
    metrics_host: str = "0.0.0.0",
    standalone: bool = False,
    peering_name: str = "perennial",
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
) -> None:
    """Run the operator until stopped. Blocks; runs its own event loop."""
    if metrics_port:
        from .metrics import start_server

        try:
            start_server(metrics_port, addr=metrics_host)
        except OSError as exc:
            raise SystemExit(f"perennial: cannot serve metrics on port {metrics_port}: {exc.strerror}; choose another with --metrics-port") from None
    registry, _ = build_registry(config or OperatorConfig(), server=server, kubeconfig=kubeconfig, token=token,
                                 ca_file=ca_file)
    kwargs: dict[str, Any] = {}
    if namespaces:
        kwargs["namespaces"] = namespaces
    else:
        kwargs["clusterwide"] = True
    # kopf waits for a threading.Event stop flag in an executor thread: always release it on the way
    # out (kopf stops on SIGINT/SIGTERM by itself), or the loop's shutdown would hang on that thread.
    stop_flag = stop_flag or threading.Event()
    # kopf's "stop-flag waiter" task waits for the flag in an executor thread; when a signal stops the operator
    # instead, that task outlives the root tasks and kopf waits 5 s for it before cancelling it: release it as
    # soon as the operator cleans up.
    kopf.on.cleanup(registry=registry, id="stop-flag")(lambda **_: stop_flag.set())
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        try:
            runner.run(
                kopf.operator(
                    registry=registry,
                    standalone=standalone,
                    peering_name=None if standalone else peering_name,
                    liveness_endpoint=health_endpoint,
                    stop_flag=stop_flag,
                    ready_flag=ready_flag,
                    **kwargs,
                )
            )
        finally:
            stop_flag.set()
