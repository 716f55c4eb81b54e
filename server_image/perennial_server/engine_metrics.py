"""The engine's own Prometheus metrics, relayed on the sidecar's admin port (`GET /metrics`).

The engine listens on localhost only, so Prometheus (and through it an HPA's custom-metrics adapter or KEDA)
reads vLLM's `vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` from the
sidecar. Each scrape asks the engine's `/metrics` (text format) with a short deadline and reads at most
`max_bytes`; the text is parsed (prometheus_client's parser) and written out again, so that only well-formed
families reach the answer and none can pose as the sidecar's own (`own_prefix`). A slow, dead, oversized or
garbled engine answer leaves the sidecar's metrics served as always, with `perennial_sidecar_engine_metrics_up 0`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from .upstream import UpstreamPool

log = logging.getLogger("perennial_server.engine_metrics")

UP = "perennial_sidecar_engine_metrics_up"


class _Families:
    """A collector yielding fixed families (what one scrape of the engine gave)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class EngineMetricsError(Exception):
    pass


def parse(text: str, own_prefix: str) -> list[Metric]:
    """The families of an exposition (text format); those named like the sidecar's own are left out.
    ValueError (or the parser's own errors) when the text is not an exposition."""
    out = []
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith(own_prefix):
            continue
        out.append(fam)
    return out


def render(families: list[Metric], up: bool) -> bytes:
    gauge = GaugeMetricFamily(UP, "1 when the engine's own metrics follow (its /metrics answered in time, within the size limit, well-formed).",
                              value=1.0 if up else 0.0)
    r = CollectorRegistry(auto_describe=False)
    r.register(_Families([gauge, *families]))  # type: ignore[arg-type]
    return generate_latest(r)


class EngineMetrics:
    """Scrapes the engine's `path` through the sidecar's engine connections (upstream.UpstreamPool)."""

    def __init__(self, path: str, *, timeout_s: float, max_bytes: int, own_prefix: str) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.own_prefix = own_prefix
        self.last_error: str | None = None

    async def _fetch(self, pool: UpstreamPool, prefix: str) -> bytes:
        from .upstream import UpstreamError

        try:
            async with asyncio.timeout(self.timeout_s):
                r = await pool.request("GET", prefix + self.path, [("Accept", "text/plain;version=0.0.4")])
                try:
                    if r.status != 200:
                        raise EngineMetricsError(f"the engine answered {r.status}")
                    if (r.content_length or 0) > self.max_bytes:
                        raise EngineMetricsError(f"the engine's metrics exceed {self.max_bytes} bytes")
                    parts, size = [], 0
                    async for chunk in r.iter_chunks():
                        size += len(chunk)
                        if size > self.max_bytes:
                            raise EngineMetricsError(f"the engine's metrics exceed {self.max_bytes} bytes")
                        parts.append(chunk)
                    return b"".join(parts)
                finally:
                    r.release()  # an unread rest closes the connection
        except TimeoutError:
            raise EngineMetricsError(f"the engine's metrics took longer than {self.timeout_s:g}s") from None
        except (UpstreamError, OSError) as e:
            raise EngineMetricsError(f"the engine is unavailable: {e}") from None

    async def scrape(self, pool: UpstreamPool | None, prefix: str = "") -> bytes:
        """The engine's families and the `up` gauge, as exposition text ready to follow the sidecar's own."""
        if not self.path or pool is None:
            return render([], False)
        try:
            raw = await self._fetch(pool, prefix)
            families = await asyncio.to_thread(self._parse, raw)  # a large exposition: off the event loop
        except EngineMetricsError as e:
            if str(e) != self.last_error:
                log.warning("Could not relay the engine's metrics error=%s", e)
            self.last_error = str(e)
            return render([], False)
        self.last_error = None
        return render(families, True)

    def _parse(self, raw: bytes) -> list[Metric]:
        try:
            return parse(raw.decode("utf-8"), self.own_prefix)
        except Exception as e:  # noqa: BLE001 - the parser raises ValueError, IndexError, TypeError ... on garbage
            raise EngineMetricsError(f"the engine's metrics are not in the Prometheus text format: {type(e).__name__}: {str(e)[:200]}") from None
