"""Sidecar configuration: CLI flags, each with a PERENNIAL_* environment default.

Maps onto the Deployment CRD: `spec.feedback` (FeedbackCapture: storeUri,
samplePercent, tokenSecretRef -> token file, redaction, maxBodyBytes,
rateLimitPerSecond) plus the pod's identity (deployment, namespace, revision,
region, pod name from the downward API).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import SplitResult, urlsplit


_WORKER_DIR = re.compile(r"w([1-9]\d*)")


@dataclass
class SidecarConfig:
    upstream: str = "http://127.0.0.1:8000"
    host: str = "0.0.0.0"
    port: int = 8080
    admin_port: int = 9090
    deployment: str = "default"
    namespace: str = ""
    revision: str = ""
    region: str = ""
    pod: str = field(default_factory=socket.gethostname)
    base_model_name: str = ""
    spool_dir: str = "/var/spool/perennial"
    store_uri: str = ""
    token_file: str = ""
    sample_percent: float = 100.0
    redaction_enabled: bool = True
    redaction_extra_patterns: str = "[]"
    max_body_bytes: int = 1048576
    rate_limit_per_second: float = 50.0
    segment_max_bytes: int = 16 * 1024 * 1024
    segment_max_age_s: float = 60.0
    ship_interval_s: float = 2.0
    upstream_connect_timeout_s: float = 5.0
    upstream_timeout_s: float = 600.0
    engine_health_path: str = "/health"
    engine_metrics_path: str = "/metrics"
    engine_metrics_timeout_s: float = 2.0
    engine_metrics_max_bytes: int = 4 * 1024 * 1024
    drain_timeout_s: float = 30.0
    capture_queue_max: int = 10000
    feedback_batch_max: int = 1000
    client_header_timeout_s: float = 10.0
    client_body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 0
    feedback_dedupe_max_ids: int = 200000
    workers: int = 1
    worker_index: int = -1
    routes_file: str = ""
    adapters_dir: str = "/var/lib/perennial/adapters"
    pvc_root: str = "/mnt/pvc"
    adapter_roots: str = ""
    adapter_max_bytes: int = 8 * 1024 * 1024 * 1024
    adapter_fetch_timeout_s: float = 600.0

    def upstream_url(self) -> SplitResult:
        """The engine's base URL: plain HTTP (it sits in the same pod), host and port, optional path prefix."""
        u = urlsplit(self.upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"`upstream` must be an http://host:port URL of the engine in this pod, not {self.upstream!r}")
        try:
            u.port
        except ValueError:
            raise ValueError(f"`upstream` has an invalid port: {self.upstream!r}") from None
        if u.query or u.fragment:
            raise ValueError(f"`upstream` must not have a query or fragment: {self.upstream!r}")
        return u

    def validate(self) -> None:
        self.upstream_url()
        for name in ("port", "admin_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"`{name}` must be within 0..65535 (0: any free port)")
        if self.admin_port and self.admin_port == self.port:
            raise ValueError("`admin_port` must differ from `port` (the admin port is never behind a Service)")
        if self.engine_metrics_path and not self.engine_metrics_path.startswith("/"):
            raise ValueError("`engine_metrics_path` must start with '/' (or be empty: no engine metrics)")
        if not self.engine_metrics_timeout_s > 0:
            raise ValueError("`engine_metrics_timeout_s` must be positive")
        if self.engine_metrics_max_bytes < 1024:
            raise ValueError("`engine_metrics_max_bytes` must be at least 1024")
        if not 0 <= self.sample_percent <= 100:
            raise ValueError("`sample_percent` must be within 0..100")
        if self.max_body_bytes < 1024:
            raise ValueError("`max_body_bytes` must be at least 1024")
        if not 1 <= self.feedback_batch_max <= 100000:
            raise ValueError("`feedback_batch_max` must be within 1..100000")
        if self.rate_limit_per_second <= 0:
            raise ValueError("`rate_limit_per_second` must be positive")
        if not 1 <= self.workers <= 64:
            raise ValueError("`workers` must be within 1..64")
        if not -1 <= self.worker_index < self.workers:
            raise ValueError("`worker_index` must be within 0..workers-1 (or -1: not a worker)")
        for name in ("client_header_timeout_s", "client_body_timeout_s", "keepalive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be positive")
        if self.max_connections < 0:
            raise ValueError("`max_connections` must not be negative (0: derived from RLIMIT_NOFILE)")
        if self.feedback_dedupe_max_ids < 0:
            raise ValueError("`feedback_dedupe_max_ids` must not be negative")
        json.loads(self.redaction_extra_patterns or "[]")
        if self.routes_file and not os.path.isabs(self.adapters_dir):
            raise ValueError("`adapters_dir` must be an absolute path")
        if self.routes_file:
            for root in self.local_adapter_roots():
                if not os.path.isabs(root):
                    raise ValueError(f"`adapter_roots` must be absolute paths, not {root!r}")
        if self.adapter_max_bytes < 1:
            raise ValueError("`adapter_max_bytes` must be positive")
        if not self.adapter_fetch_timeout_s > 0:
            raise ValueError("`adapter_fetch_timeout_s` must be positive")

    def local_adapter_roots(self) -> list[str]:
        """Folders a local adapter path of the routes document may lie under: the adapters dir, the pod's claims,
        and `adapter_roots` (comma-separated)."""
        extra = [r.strip() for r in self.adapter_roots.split(",") if r.strip()]
        return [r for r in (self.adapters_dir, self.pvc_root, *extra) if r]

    def sidecar_folders(self) -> list[str]:
        """The sidecar's own files: its token and its spool, never (in) an adapter, whatever the roots (the token's
        Secret folder is under /var/run in the pod, a system folder)."""
        return [d for d in (self.token_file, self.spool_dir) if d]

    def worker_spool(self, index: int) -> tuple[str, str]:
        """(spool dir, pod name) of worker `index`: worker 0 (or a single process) the spool dir and
        pod name as given, worker i the subdir `w<i>` and `<pod>-w<i>` (segment object names stay unique)."""
        if index <= 0:
            return self.spool_dir, self.pod
        return os.path.join(self.spool_dir, f"w{index}"), f"{self.pod}-w{index}"

    def worker_spools(self) -> list[tuple[int, str, str]]:
        """(index, spool dir, pod name) of every worker spool present under the spool dir, worker 0 first."""
        found = sorted(int(m.group(1)) for d in Path(self.spool_dir).glob("w*") if d.is_dir() and (m := _WORKER_DIR.fullmatch(d.name)))
        return [(i, *self.worker_spool(i)) for i in [0, *found]]

    def for_worker(self) -> "SidecarConfig":
        """The configuration worker `worker_index` runs with (its own spool dir and pod name)."""
        if self.worker_index <= 0:
            return self
        spool_dir, pod = self.worker_spool(self.worker_index)
        return replace(self, spool_dir=spool_dir, pod=pod)


_HELP = {
    "upstream": "engine base URL (localhost only)",
    "host": "listen address",
    "port": "listen port (the Service port)",
    "admin_port": "admin listen port: /metrics (the sidecar's and the engine's) and /perennial/routes; never behind a Service (0: any free port)",
    "deployment": "Perennial Deployment name (records, object names)",
    "namespace": "namespace of the Deployment",
    "revision": "served revision / color",
    "region": "region name",
    "pod": "pod name (downward API); part of segment object names",
    "base_model_name": "served name of the base model (requests for other names are adapters)",
    "spool_dir": "local spool dir for segments (a volume)",
    "store_uri": "feedback store fsspec URI: path, file://, s3://; empty = keep segments in the spool",
    "token_file": "file holding the bearer token for POST /v1/feedback (a mounted Secret key); re-read on change",
    "sample_percent": "percent of interactions captured (0..100)",
    "redaction_enabled": "redact PII before anything touches disk",
    "redaction_extra_patterns": 'JSON list of {"name": ..., "regex": ...}',
    "max_body_bytes": "largest request body accepted (413 above)",
    "rate_limit_per_second": "feedback requests per second per client and worker process (429 above)",
    "segment_max_bytes": "roll segments at this size",
    "segment_max_age_s": "roll segments at this age",
    "ship_interval_s": "shipper poll interval",
    "upstream_connect_timeout_s": "engine connect timeout (502 on failure)",
    "upstream_timeout_s": "engine read timeout: no byte for this long is a 504 (mid-stream: the stream is cut)",
    "engine_health_path": "engine path probed by /readyz",
    "engine_metrics_path": "engine path whose Prometheus text the admin /metrics relays (empty: none)",
    "engine_metrics_timeout_s": "the engine's metrics must arrive within this many seconds, else the admin /metrics has the sidecar's only",
    "engine_metrics_max_bytes": "largest engine metrics answer relayed (above it: the sidecar's only)",
    "drain_timeout_s": "on SIGTERM, wait this long for in-flight requests",
    "capture_queue_max": "captured interactions waiting for the writer before new ones are dropped",
    "feedback_batch_max": "most feedback objects in one POST /v1/feedback array (stored all or none)",
    "client_header_timeout_s": "a client must send a complete request head within this many seconds of connecting or of its first byte (408, then closed)",
    "client_body_timeout_s": "a client must send the whole request body within this many seconds of its head (408, then closed)",
    "keepalive_timeout_s": "an idle keep-alive client connection is closed after this many seconds",
    "max_connections": "client connections per worker; above it the longest-idle connection is closed (0: derived from RLIMIT_NOFILE)",
    "feedback_dedupe_max_ids": "feedback ids remembered per worker for idempotency (the most recent ones; kept on disk across restarts)",
    "workers": "worker processes sharing the port (SO_REUSEPORT), one per CPU given to the sidecar; each has its own spool subdir",
    "worker_index": "set by the supervisor on each worker process (-1: a single process)",
    "routes_file": "routes document (served name -> adapters, a mounted ConfigMap) the sidecar watches and loads into the engine; empty = the engine's own model names (see routes.py)",
    "adapters_dir": "where adapters with a remote `uri` in the routes document are fetched to (a volume the engine reads too)",
    "adapter_max_bytes": "largest adapter fetched from a remote `uri`",
    "adapter_fetch_timeout_s": "an adapter fetch from a remote `uri` (listing and copying) must end within this many seconds, else that routes document fails (reported at /perennial/routes, retried)",
    "pvc_root": "where the pod's PersistentVolumeClaims are mounted (<pvc-root>/<claim>): local adapter paths may lie there",
    "adapter_roots": "comma-separated absolute folders local adapter paths of the routes document may lie under, besides --adapters-dir and --pvc-root (e.g. a file:// artifact store on this machine)",
}


def _bool(s: str | bool) -> bool:
    if isinstance(s, bool):
        return s
    return str(s).strip().lower() in ("1", "true", "yes", "on")


def add_sidecar_args(p: argparse.ArgumentParser) -> None:
    defaults = SidecarConfig()
    for f in fields(SidecarConfig):
        flag = "--" + f.name.replace("_", "-")
        env = "PERENNIAL_" + f.name.upper()
        default = getattr(defaults, f.name)
        conv = {int: int, float: float, bool: _bool}.get(type(default), str)
        if env in os.environ:
            default = conv(os.environ[env])
        p.add_argument(flag, dest=f.name, type=conv, default=default, help=f"{_HELP.get(f.name, '')} (env {env}; default %(default)s)")


def sidecar_config_from_args(ns: argparse.Namespace) -> SidecarConfig:
    cfg = SidecarConfig(**{f.name: getattr(ns, f.name) for f in fields(SidecarConfig)})
    cfg.validate()
    return cfg
