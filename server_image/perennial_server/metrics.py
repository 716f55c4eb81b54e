"""The sidecar's Prometheus metrics (one registry per process; multiprocess mode with workers)."""

from __future__ import annotations

from typing import Any

from prometheus_client import (  # noqa: F401
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

KNOWN_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/feedback", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/healthz", "/readyz", "/metrics", "/health")


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
        self._fb_children: dict[str, Any] = {}
        self.captured_interaction = self.captured.labels("interaction")
        self.captured_feedback = self.captured.labels("feedback")

    def feedback_of(self, type_: str) -> Any:
        """feedback{type}'s child, cached (five types)."""
        child = self._fb_children.get(type_)
        if child is None:
            child = self._fb_children[type_] = self.feedback.labels(type_)
        return child

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

