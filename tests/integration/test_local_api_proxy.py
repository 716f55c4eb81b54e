"""The embedded API server's proxy subresources, as kube-apiserver serves them:
`/api/v1/namespaces/{ns}/services/{name}[:{port}]/proxy/{path}` and `/api/v1/namespaces/{ns}/pods/{name}[:{port}]/proxy/{path}`.

A hub operator reaches a region's pods through the region's API server only (its kubeconfig is all it has), so these
are the paths it talks to a region's Services through. Each test runs against the real HTTP API of the embedded
server (with a bearer token) and a small aiohttp "pod" listening on a loopback address, registered as a Pod with
that podIP.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web

from perennial.local.apiserver import new_token, start_in_thread
from perennial.local.tls import self_signed

NS = "default"
WAIT = 60.0


class PodServer:
    """An aiohttp app on 127.0.0.1:<port> in a thread of its own: what a pod serves."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.sse_released_by_client: bool | None = None
        self._loop = asyncio.new_event_loop()
        self._release: asyncio.Event | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        assert started.wait(30)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/sse", self.sse)
        app.router.add_route("POST", "/release", self.release)
        app.router.add_route("POST", "/upload", self.upload)
        app.router.add_route("GET", "/status/{code}", self.status)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._release = asyncio.Event()
        started.set()
        self._loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        entry = {"method": request.method, "path": request.path, "query": dict(request.query),
                 "raw_query": request.rel_url.raw_query_string,
                 "headers": {k.lower(): v for k, v in request.headers.items()}, "body": body.decode(errors="replace")}
        self.seen.append(entry)
        return web.json_response(entry, headers={"X-Pod": "yes", "Connection": "X-Pod-Hop", "X-Pod-Hop": "1"})

    async def upload(self, request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        self.seen.append({"method": "POST", "path": "/upload"})
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    async def status(self, request: web.Request) -> web.Response:
        self.seen.append({"method": "GET", "path": request.path})
        return web.json_response({"error": "teapot"}, status=int(request.match_info["code"]), headers={"X-Why": "asked"})

    async def sse(self, request: web.Request) -> web.StreamResponse:
        """Sends one event, then holds the rest until the client says it got it (or 30 s pass: a proxy that
        buffers the stream never lets the client see the first event before the end)."""
        assert self._release is not None
        self.seen.append({"method": request.method, "path": "/sse"})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(b'data: {"n": 1}\n\n')
        try:
            await asyncio.wait_for(self._release.wait(), 30)
            self.sse_released_by_client = True
        except asyncio.TimeoutError:
            self.sse_released_by_client = False
        await resp.write(b'data: {"n": 2}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def release(self, request: web.Request) -> web.Response:
        assert self._release is not None
        self._release.set()
        return web.json_response({"released": True})


class Env:
    def __init__(self, server: Any, token: str, pod: PodServer) -> None:
        self.server, self.token, self.pod = server, token, pod
        # HTTPS with the server's own certificate, as `perennial dev` serves (per request: a session's `verify`
        # loses to $REQUESTS_CA_BUNDLE)
        self.http = requests.Session()
        self.http.request = functools.partial(self.http.request, verify=server.ca_file)  # type: ignore[method-assign]

    def url(self, path: str) -> str:
        return self.server.url + path

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **extra}

    def make_pod(self, name: str, labels: dict[str, str], *, ip: str | None = "127.0.0.1", phase: str = "Running",
                 ready: bool = True, ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if ports is None:
            ports = [{"name": "http", "containerPort": self.pod.port}]
        self.server.create("v1", "pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"containers": [{"name": "main", "image": "pod:test", "ports": ports}]}}, namespace=NS)
        status: dict[str, Any] = {"phase": phase, "conditions": [{"type": "Ready", "status": str(ready)}]}
        if ip:
            status["podIP"], status["podIPs"] = ip, [{"ip": ip}]
        return self.server.patch("v1", "pods", name, {"status": status}, namespace=NS, subresource="status")

    def set_ready(self, name: str, ready: bool) -> None:
        self.server.patch("v1", "pods", name, {"status": {"conditions": [{"type": "Ready", "status": str(ready)}]}},
                          namespace=NS, subresource="status")

    def make_service(self, name: str, selector: dict[str, str] | None, ports: list[dict[str, Any]]) -> dict[str, Any]:
        spec: dict[str, Any] = {"ports": ports}
        if selector is not None:
            spec["selector"] = selector
        return self.server.create("v1", "services", {"apiVersion": "v1", "kind": "Service",
                                                      "metadata": {"name": name, "namespace": NS}, "spec": spec},
                                  namespace=NS)


@pytest.fixture
def env() -> Iterator[Env]:
    token = new_token()
    server = start_in_thread(token=token, tls=self_signed())
    pod = PodServer()
    try:
        e = Env(server, token, pod)
        yield e
        e.http.close()
    finally:
        server.stop()
        pod.stop()


def _web(env: Env) -> None:
    env.make_pod("web-0", {"app": "web"})
    env.make_service("web", {"app": "web"}, [{"name": "http", "port": 80, "targetPort": "http"}])


def _status(resp: requests.Response) -> dict[str, Any]:
    assert resp.headers.get("Content-Type", "").startswith("application/json"), resp.text
    body = resp.json()
    assert body["kind"] == "Status" and body["status"] == "Failure" and body["code"] == resp.status_code, body
    return body


# --------------------------------------------------------------------------- JSON through services and pods


def test_a_request_reaches_the_pod_through_the_service_proxy_with_method_query_body_and_headers(env: Env) -> None:
    _web(env)
    resp = env.http.post(env.url(f"/api/v1/namespaces/{NS}/services/web:http/proxy/echo/a/b?x=1&y=%20z&y=2"),
                         data=b'{"model": "base"}', timeout=30,
                         headers=env.headers(**{"Content-Type": "application/json", "X-Custom": "kept",
                                                "Connection": "keep-alive, X-Hop", "X-Hop": "dropped",
                                                "Impersonate-User": "admin", "X-Remote-User": "admin"}))
    assert resp.status_code == 200, resp.text
    seen = resp.json()
    assert seen["method"] == "POST" and seen["path"] == "/echo/a/b"
    assert seen["raw_query"] == "x=1&y=%20z&y=2" and seen["body"] == '{"model": "base"}'
    hdrs = seen["headers"]
    assert hdrs["x-custom"] == "kept" and hdrs["content-type"] == "application/json"
    # the caller's credentials for the API server never reach the pod (kube-apiserver drops them once authenticated)
    assert "authorization" not in hdrs and env.token not in json.dumps(hdrs)
    assert "impersonate-user" not in hdrs and "x-remote-user" not in hdrs  # the API server's, never a pod's
    assert "x-hop" not in hdrs, "a header named in Connection is hop-by-hop"
    # the pod's answer comes back, its own hop-by-hop headers dropped
    assert resp.headers["X-Pod"] == "yes" and "X-Pod-Hop" not in resp.headers
    # counted as kube-apiserver's authorizer names it: create on services/proxy
    assert env.server.count(verb="create", resource="services/proxy", code=200) == 1


@pytest.mark.parametrize("path", [
    "services/web/proxy/echo/x",            # the Service's only port
    "services/web:80/proxy/echo/x",         # the port's number
    "services/http:web:http/proxy/echo/x",  # scheme:name:port
    "services/web%3Ahttp/proxy/echo%2Fx",   # as the kubernetes client encodes name and path
    "pods/web-0/proxy/echo/x",              # the pod's first container port
    "pods/web-0:http/proxy/echo/x",         # a container port's name
])
def test_the_port_forms_of_kubernetes_all_reach_the_pod(env: Env, path: str) -> None:
    _web(env)
    env.make_pod("web-1", {"app": "other"}, ports=[{"containerPort": env.pod.port}])
    resp = env.http.get(env.url(f"/api/v1/namespaces/{NS}/{path}"), headers=env.headers(), timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["path"] == "/echo/x" and resp.json()["method"] == "GET"


def test_a_pod_proxied_by_port_number(env: Env) -> None:
    env.make_pod("bare", {"app": "bare"}, ports=[])
    resp = env.http.get(env.url(f"/api/v1/namespaces/{NS}/pods/bare:{env.pod.port}/proxy/"), headers=env.headers(),
                        timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["path"] == "/"
    assert env.server.count(verb="get", resource="pods/proxy", code=200) == 1


def test_the_pods_answer_status_and_headers_pass_through(env: Env) -> None:
    _web(env)
    resp = env.http.get(env.url(f"/api/v1/namespaces/{NS}/services/web/proxy/status/418"), headers=env.headers(),
                        timeout=30)
    assert resp.status_code == 418 and resp.json() == {"error": "teapot"} and resp.headers["X-Why"] == "asked"


def test_a_large_request_body_is_streamed_to_the_pod(env: Env) -> None:
    _web(env)
    body = os.urandom(3 * 1024 * 1024)

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked upload
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    for data in (body, chunks()):
        resp = env.http.post(env.url(f"/api/v1/namespaces/{NS}/services/web/proxy/upload"), data=data,
                             headers=env.headers(), timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_a_compressed_request_body_reaches_the_pod_decoded_and_a_head_request_is_a_get(env: Env) -> None:
    _web(env)
    url = env.url(f"/api/v1/namespaces/{NS}/services/web/proxy/echo")
    resp = env.http.post(url, data=gzip.compress(b"hello " * 1000), timeout=30,
                         headers=env.headers(**{"Content-Encoding": "gzip"}))
    assert resp.status_code == 200, resp.text
    assert resp.json()["body"] == "hello " * 1000 and "content-encoding" not in resp.json()["headers"]
    assert env.http.head(url, headers=env.headers(), timeout=30).status_code == 200
    assert env.pod.seen[-1]["method"] == "HEAD"
    assert env.server.count(verb="get", resource="services/proxy") == 1


def test_kubectl_get_raw_reaches_the_pod(env: Env, tmp_path: Path) -> None:
    _web(env)
    kubeconfig = env.server.write_kubeconfig(tmp_path / "kubeconfig")
    out = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "get", "--raw",
                          f"/api/v1/namespaces/{NS}/services/web:http/proxy/echo/kubectl?a=b"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["path"] == "/echo/kubectl" and seen["query"] == {"a": "b"} and "authorization" not in seen["headers"]


def test_discovery_lists_the_proxy_subresources(env: Env) -> None:
    resources = env.http.get(env.url("/api/v1"), headers=env.headers(), timeout=30).json()["resources"]
    by_name = {r["name"]: r for r in resources}
    for name in ("services/proxy", "pods/proxy"):
        assert set(by_name[name]["verbs"]) == {"create", "delete", "get", "patch", "update"}, by_name.get(name)


# --------------------------------------------------------------------------- streaming


def test_server_sent_events_arrive_as_the_pod_sends_them(env: Env) -> None:
    """The pod sends one event and holds the rest until the client says it has it: a proxy that buffered the
    answer (or read it whole before answering) would hold the first event back until the pod's 30 s fallback."""
    _web(env)
    host, port = env.server.url.split("//")[1].split(":")
    conn = http.client.HTTPSConnection(host, int(port), timeout=WAIT,
                                       context=ssl.create_default_context(cafile=env.server.ca_file))
    conn.request("POST", f"/api/v1/namespaces/{NS}/services/web:http/proxy/sse",
                 body=json.dumps({"stream": True}), headers=env.headers(**{"Content-Type": "application/json"}))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    assert resp.readline() == b'data: {"n": 1}\n'
    released = env.http.post(env.url(f"/api/v1/namespaces/{NS}/services/web/proxy/release"), headers=env.headers(),
                             timeout=30)
    assert released.status_code == 200, released.text
    rest = resp.read()
    conn.close()
    assert rest == b'\ndata: {"n": 2}\n\ndata: [DONE]\n\n'
    assert env.pod.sse_released_by_client is True, "the first event reached the client only after the stream ended"


# --------------------------------------------------------------------------- endpoints


def test_no_ready_endpoint_is_a_503_status_and_a_ready_one_is_used_at_once(env: Env) -> None:
    env.make_pod("web-0", {"app": "web"}, ready=False)
    env.make_pod("web-x", {"app": "else"})  # ready, but not selected
    env.make_service("web", {"app": "web"}, [{"name": "http", "port": 80, "targetPort": "http"}])
    url = env.url(f"/api/v1/namespaces/{NS}/services/web/proxy/echo")
    resp = env.http.get(url, headers=env.headers(), timeout=30)
    assert resp.status_code == 503
    body = _status(resp)
    assert body["reason"] == "ServiceUnavailable" and body["message"] == 'no endpoints available for service "web"'
    assert env.pod.seen == []
    env.set_ready("web-0", True)
    assert env.http.get(url, headers=env.headers(), timeout=30).status_code == 200
    env.server.delete("v1", "pods", "web-0", namespace=NS)
    assert env.http.get(url, headers=env.headers(), timeout=30).status_code == 503


def test_publish_not_ready_addresses_routes_to_unready_pods(env: Env) -> None:
    env.make_pod("web-0", {"app": "web"}, ready=False)
    env.make_service("web", {"app": "web"}, [{"name": "http", "port": 80, "targetPort": "http"}])
    env.server.patch("v1", "services", "web", {"spec": {"publishNotReadyAddresses": True}}, namespace=NS)
    assert env.http.get(env.url(f"/api/v1/namespaces/{NS}/services/web/proxy/echo"), headers=env.headers(),
                        timeout=30).status_code == 200


def test_a_service_without_selector_uses_its_endpoints_object(env: Env) -> None:
    env.make_service("ext", None, [{"name": "web", "port": 80}])
    url = env.url(f"/api/v1/namespaces/{NS}/services/ext:web/proxy/echo")
    assert env.http.get(url, headers=env.headers(), timeout=30).status_code == 503
    env.server.create("v1", "endpoints", {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "ext", "namespace": NS},
                                          "subsets": [{"addresses": [{"ip": "127.0.0.1"}],
                                                       "ports": [{"name": "web", "port": env.pod.port}]}]}, namespace=NS)
    resp = env.http.get(url, headers=env.headers(), timeout=30)
    assert resp.status_code == 200 and resp.json()["path"] == "/echo"


def test_unknown_services_pods_and_ports(env: Env) -> None:
    _web(env)
    base = f"/api/v1/namespaces/{NS}"
    cases = {
        f"{base}/services/nope/proxy/": (404, "NotFound", 'services "nope" not found'),
        f"{base}/pods/nope/proxy/": (404, "NotFound", 'pods "nope" not found'),
        f"{base}/services/web:grpc/proxy/": (503, "ServiceUnavailable", 'no service port "grpc" found for service "web"'),
        f"{base}/services/ftp:web:http/proxy/": (400, "BadRequest", None),
        f"{base}/pods/web-0:nope/proxy/": (503, "ServiceUnavailable", None),
    }
    for path, (code, reason, message) in cases.items():
        resp = env.http.get(env.url(path), headers=env.headers(), timeout=30)
        assert resp.status_code == code, (path, resp.text)
        body = _status(resp)
        assert body["reason"] == reason, (path, body)
        if message:
            assert body["message"] == message, (path, body)
    assert env.pod.seen == []


def test_a_pod_that_is_not_running_is_a_503(env: Env) -> None:
    env.make_pod("pending", {"app": "p"}, ip=None, phase="Pending", ready=False)
    resp = env.http.get(env.url(f"/api/v1/namespaces/{NS}/pods/pending/proxy/echo"), headers=env.headers(), timeout=30)
    assert resp.status_code == 503 and _status(resp)["reason"] == "ServiceUnavailable"


def test_a_pod_that_refuses_the_connection_is_a_503(env: Env) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env.make_pod("dead", {"app": "dead"}, ports=[{"containerPort": closed}])
    resp = env.http.get(env.url(f"/api/v1/namespaces/{NS}/pods/dead/proxy/echo"), headers=env.headers(), timeout=30)
    assert resp.status_code == 503
    assert _status(resp)["message"].startswith("error trying to reach pod")


def test_link_local_addresses_are_never_proxied(env: Env) -> None:
    """A pod's status is writable by any client: a podIP of the cloud metadata service must not turn the API server
    into a way to reach it (kube-apiserver refuses link-local and loopback; loopback is where local pods live)."""
    env.make_pod("meta", {"app": "meta"}, ip="169.254.169.254", ports=[{"containerPort": 80}])
    resp = env.http.get(env.url(f"/api/v1/namespaces/{NS}/pods/meta/proxy/latest/meta-data/"), headers=env.headers(),
                        timeout=30)
    assert resp.status_code in (400, 403, 503) and "address not allowed" in _status(resp)["message"]


# --------------------------------------------------------------------------- authentication


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token-of-enough-length", "Basic Zm9vOmJhcg=="])
def test_a_caller_without_the_token_is_refused_before_reaching_the_pod(env: Env, auth: str | None) -> None:
    _web(env)
    headers = {"Authorization": auth} if auth else {}
    for method in ("GET", "POST"):
        resp = env.http.request(method, env.url(f"/api/v1/namespaces/{NS}/services/web/proxy/echo"), headers=headers,
                                data=b"x" if method == "POST" else None, timeout=30)
        assert resp.status_code == 401 and _status(resp)["reason"] == "Unauthorized"
    assert env.pod.seen == []


def test_a_service_accounts_rbac_decides_get_and_create_on_services_proxy(env: Env) -> None:
    """kube-apiserver authorizes a proxied GET as `get` and a POST as `create` on `services/proxy`: a service account
    allowed only `get` reads through the proxy, its POST is a 403 that never reaches the pod, and its token is not
    forwarded either."""
    _web(env)
    env.server.create("rbac.authorization.k8s.io/v1", "roles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "proxy-reader", "namespace": NS},
        "rules": [{"apiGroups": [""], "resources": ["services/proxy"], "verbs": ["get"]}]}, namespace=NS)
    env.server.create("rbac.authorization.k8s.io/v1", "rolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "prober", "namespace": NS},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "proxy-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "prober", "namespace": NS}]}, namespace=NS)
    token = env.server.issue_service_account_token(NS, "prober")
    url = env.url(f"/api/v1/namespaces/{NS}/services/web:http/proxy/echo")
    got = env.http.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert got.status_code == 200, got.text
    assert "authorization" not in got.json()["headers"] and token not in json.dumps(got.json())
    posted = env.http.post(url, data=b"{}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert posted.status_code == 403 and _status(posted)["reason"] == "Forbidden"
    assert [s["method"] for s in env.pod.seen] == ["GET"]
    other = env.http.get(env.url(f"/api/v1/namespaces/{NS}/pods/web-0/proxy/echo"),
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert other.status_code == 403  # pods/proxy is another resource
