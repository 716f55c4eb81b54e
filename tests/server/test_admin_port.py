"""The sidecar's admin port (`--admin-port`, issue 12): `/metrics` and `/perennial/routes` are served there only
(no Service exposes it: Prometheus and the operator reach the pod's port named `admin`); the client port answers
404 for them and never proxies them to the engine. The admin `/metrics` carries the engine's own metrics too
(vLLM's `vllm:*`, which KEDA/HPA scale on), relayed from the engine's localhost `/metrics` within a deadline and a
size limit; an engine that is slow, dead, oversized or garbled leaves the sidecar's own metrics served."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from srvutil import AppThread, free_port

ENGINE_METRICS = """# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny-base"} 7.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-base"} 2.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny-base"} 12.0
# HELP perennial_sidecar_requests_total An engine posing as the sidecar.
# TYPE perennial_sidecar_requests_total counter
perennial_sidecar_requests_total{code="200",route="/v1/feedback"} 1e9
"""


class MetricsEngine:
    """An engine whose `/metrics` answers as `mode` says; counts the requests it got per path."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.hits: dict[str, int] = {}
        self.t = AppThread(self.make).start()
        self.url = self.t.url

    def make(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.any)
        return app

    async def any(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        if request.path == "/health":
            return web.json_response({})
        if not request.path.startswith("/metrics"):
            return web.json_response({"error": {"message": "no"}}, status=404)
        if self.mode == "slow":
            await asyncio.sleep(30)
        if self.mode == "huge":  # streamed, no length: the limit is counted while reading
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await resp.prepare(request)
            for _ in range(64):
                await resp.write(b"# " + b"x" * 65534 + b"\n")
            return resp
        if self.mode == "garbled":
            return web.Response(text="vllm:num_requests_waiting{engine=\"0\" 7.0 {{{\n")
        if self.mode == "error":
            return web.Response(status=500, text="boom")
        return web.Response(text=ENGINE_METRICS, content_type="text/plain")

    def stop(self) -> None:
        self.t.stop()


@pytest.fixture
def metrics_engine() -> Any:
    e = MetricsEngine()
    yield e
    e.stop()


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], name: str, sample: str | None = None) -> float:
    return sum(s.value for s in fams[name].samples if sample is None or s.name == sample)


def test_metrics_and_routes_are_served_on_the_admin_port_only(metrics_engine: MetricsEngine, routed_admin) -> None:
    t = routed_admin(metrics_engine.url)
    for path in ("/metrics", "/metrics/", "/perennial/routes", "/perennial/anything"):
        r = requests.get(t.url + path, timeout=30)
        assert r.status_code == 404, (path, r.status_code, r.text)
        assert r.json()["error"]["code"] == "admin_port_only" and "admin port" in r.json()["error"]["message"]
    assert not any(p.startswith(("/metrics", "/perennial")) for p in metrics_engine.hits), metrics_engine.hits  # never proxied
    assert requests.get(t.url + "/healthz", timeout=30).status_code == 200  # the probes stay on the client port
    r = requests.get(t.admin_url + "/perennial/routes", timeout=30)
    assert r.status_code == 200 and set(r.json()) >= {"revision", "loaded", "errors"}
    r = requests.get(t.admin_url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    fams = families(r.text)
    assert value(fams, "perennial_sidecar_engine_metrics_up") == 1
    # the engine's own metrics, as it wrote them
    assert value(fams, "vllm:num_requests_waiting") == 7 and value(fams, "vllm:num_requests_running") == 2
    assert value(fams, "vllm:request_success", "vllm:request_success_total") == 12
    # the sidecar's own, not the engine's impersonation of them
    assert value(fams, "perennial_sidecar_requests", "perennial_sidecar_requests_total") < 1e9
    assert value(fams, "perennial_sidecar_requests", "perennial_sidecar_requests_total") >= 4  # the four 404s above
    # nothing else on the admin port
    r = requests.post(t.admin_url + "/v1/chat/completions", json={"model": "tiny-base", "messages": []}, timeout=30)
    assert r.status_code in (404, 405) and r.json()["error"]
    assert "/v1/chat/completions" not in metrics_engine.hits


@pytest.mark.parametrize("mode", ["slow", "huge", "garbled", "error", "dead"])
def test_the_sidecar_metrics_are_served_whatever_the_engine_does(metrics_engine: MetricsEngine, routed_admin, mode: str) -> None:
    if mode == "dead":
        metrics_engine.stop()
    metrics_engine.mode = mode
    t = routed_admin(metrics_engine.url, engine_metrics_timeout_s=0.5, engine_metrics_max_bytes=1 << 20)
    for _ in range(2):  # twice: a connection the relay gave up on is not reused for the next scrape
        r = requests.get(t.admin_url + "/metrics", timeout=25)  # generous: the relay gives up after 0.5 s
        assert r.status_code == 200, r.text
        fams = families(r.text)
        assert value(fams, "perennial_sidecar_engine_metrics_up") == 0
        assert "perennial_sidecar_requests" in fams and not any(n.startswith("vllm:") for n in fams)
    if mode != "dead":
        metrics_engine.mode = "ok"  # the engine recovers: its metrics come back
        fams = families(requests.get(t.admin_url + "/metrics", timeout=25).text)
        assert value(fams, "perennial_sidecar_engine_metrics_up") == 1 and value(fams, "vllm:num_requests_waiting") == 7


def test_admin_port_flag(tmp_path: Path) -> None:
    from perennial_server.cli import build_parser
    from perennial_server.config import sidecar_config_from_args

    def cfg(*argv: str) -> Any:
        return sidecar_config_from_args(build_parser().parse_args(["sidecar", *argv]))

    assert cfg().admin_port == 9090 and cfg().port == 8080
    assert cfg("--admin-port", "9191").admin_port == 9191
    with pytest.raises(ValueError, match="admin_port"):
        cfg("--port", "9000", "--admin-port", "9000")
    with pytest.raises(ValueError, match="admin_port"):
        cfg("--admin-port", "70000")
    with pytest.raises(ValueError, match="engine_metrics_path"):
        cfg("--engine-metrics-path", "metrics")


def test_the_cli_sidecar_listens_on_both_ports(metrics_engine: MetricsEngine, tmp_path: Path) -> None:
    """`perennial-server sidecar --port P --admin-port A` (api_server.serve): both listeners, one process."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from srvutil import TOKEN

    (tmp_path / "token").write_text(TOKEN)
    port, admin = free_port(), free_port()
    args = [sys.executable, "-m", "perennial_server.cli", "sidecar", "--upstream", metrics_engine.url, "--host", "127.0.0.1",
            "--port", str(port), "--admin-port", str(admin), "--spool-dir", str(tmp_path / "spool"), "--token-file", str(tmp_path / "token")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERENNIAL_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.1)
        assert value(families(requests.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text), "vllm:num_requests_waiting") == 7
        assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 404
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
