"""The operator runtime: kopf with Perennial's settings, login, health and metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import kopf

from .api.common import GROUP
from .config import OperatorConfig
from .controllers import REGISTRY
from .controllers.base import Context
from .kube import connect
from .resources.common import FINALIZER

log = logging.getLogger(__name__)


@kopf.on.startup(registry=REGISTRY)
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.queueing.error_delays = [1, 2, 5, 10, 30, 60]
    settings.execution.max_workers = 8
    settings.networking.request_timeout = 60
    if memo.get("server"):
        # The embedded control plane: quick reconnects, no long waits on shutdown.
        settings.watching.reconnect_backoff = 0.2
        settings.background.instant_exiting_timeout = 0.5


@kopf.on.login(registry=REGISTRY)
def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    if memo.get("server"):
        return kopf.ConnectionInfo(server=memo["server"], insecure=True, default_namespace="default")
    return kopf.login_via_client(memo=memo, **kwargs)


def build_memo(server: str | None, kubeconfig: str | None, config: OperatorConfig | None) -> kopf.Memo:
    memo = kopf.Memo()
    memo["server"] = server
    memo["perennial"] = Context(kube=connect(server=server, kubeconfig=kubeconfig), config=config or OperatorConfig())
    return memo


def run(
    *,
    server: str | None = None,
    kubeconfig: str | None = None,
    namespaces: list[str] | None = None,
    config: OperatorConfig | None = None,
    health_endpoint: str | None = "http://0.0.0.0:8081/healthz",
    metrics_port: int | None = 8080,
    standalone: bool = False,
    peering_name: str = "perennial",
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
) -> None:
    """Run the operator until stopped. Blocks; runs its own event loop."""
    if metrics_port:
        from .metrics import start_server

        try:
            start_server(metrics_port)
        except OSError as exc:
            raise SystemExit(f"perennial: cannot serve metrics on port {metrics_port}: {exc.strerror}; choose another with --metrics-port") from None
    memo = build_memo(server, kubeconfig, config)
    kwargs: dict[str, Any] = {}
    if namespaces:
        kwargs["namespaces"] = namespaces
    else:
        kwargs["clusterwide"] = True
    # kopf waits for a threading.Event stop flag in an executor thread: always release it on the way
    # out (kopf stops on SIGINT/SIGTERM by itself), or the loop's shutdown would hang on that thread.
    stop_flag = stop_flag or threading.Event()
    with asyncio.Runner() as runner:
        try:
            runner.run(
                kopf.operator(
                registry=REGISTRY,
                memo=memo,
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
