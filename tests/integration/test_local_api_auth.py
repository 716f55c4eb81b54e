"""The local control plane (`perennial dev`, `perennial control-plane`) is reachable on loopback only and
refuses anyone without the bearer token written into its kubeconfig (issue 11, item 5).

Before: the API server accepted anonymous requests (any local user could read Secrets), the kubeconfig
had no credentials, and `perennial dev` served metrics on 0.0.0.0 whatever `--host` said.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from harness import running_cluster, wait_for
from devproc import free_port, listening, stop_dev

from perennial.cli import _start_control_plane
from perennial.kube import connect

ROOT = Path(__file__).resolve().parents[2]
API = "perennial.ai/v1alpha1"
SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "judge-key", "namespace": "default"},
          "stringData": {"key": "sk-very-secret"}}



def _non_loopback_address() -> str:
    """An address of this machine that is not loopback (the test needs one: it says so instead of skipping)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.123", 9))  # no packet is sent: this only picks the outgoing interface
        addr = s.getsockname()[0]
    assert not addr.startswith("127."), f"this machine has no non-loopback IPv4 address (got {addr}): cannot test the binding"
    return addr


_CONTEXTS: dict[str, ssl.SSLContext] = {}


def _trust(url: str, ca_pem: bytes) -> None:
    """Requests to `url`'s server verify its certificate against `ca_pem` (the kubeconfig's)."""
    _CONTEXTS[url.split("/")[2]] = ssl.create_default_context(cadata=ca_pem.decode())


def _get(url: str, token: str | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
    hdrs = {"Authorization": f"Bearer {token}"} if token is not None else {}
    req = urllib.request.Request(url, headers={**hdrs, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10, context=_CONTEXTS.get(url.split("/")[2])) as resp:
            code, body, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        code, body, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
    return code, (json.loads(body) if "json" in ctype else body.decode())



def _token(kubeconfig: Path) -> str:
    cfg = yaml.safe_load(kubeconfig.read_text())
    return cfg["users"][0]["user"]["token"]


def _ca(kubeconfig: Path) -> bytes:
    cfg = yaml.safe_load(kubeconfig.read_text())
    return base64.b64decode(cfg["clusters"][0]["cluster"]["certificate-authority-data"])


def _assert_unauthorized(code: int, body: dict | str) -> None:
    assert code == 401, (code, body)
    assert isinstance(body, dict), body
    assert body == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "Unauthorized", "reason": "Unauthorized", "code": 401}


@pytest.fixture
def control_plane(tmp_path):
    server, kubeconfig, kube = _start_control_plane("127.0.0.1", 0, tmp_path, crds=False)
    assert server.url.startswith("https://")
    _trust(server.url, _ca(kubeconfig))
    try:
        yield server, kubeconfig, kube
    finally:
        server.stop()


def test_anonymous_and_wrong_token_requests_get_401_status_json(control_plane):
    server, kubeconfig, kube = control_plane
    kube.apply(SECRET)
    token = _token(kubeconfig)
    assert len(token) >= 32
    for path in ("/api/v1/namespaces/default/secrets/judge-key", "/api/v1/secrets", "/api", "/apis",
                 "/openapi/v3", "/api/v1/namespaces/default/secrets?watch=true", "/debug/perennial/requests"):
        _assert_unauthorized(*_get(server.url + path))
        _assert_unauthorized(*_get(server.url + path, "wrong-" + token))
        _assert_unauthorized(*_get(server.url + path, token[:-1]))
        _assert_unauthorized(*_get(server.url + path, ""))
    # Basic auth, a lower-case scheme with the token, or the token in the query are not credentials either.
    _assert_unauthorized(*_get(server.url + "/api/v1/secrets", headers={"Authorization": "Basic YWRtaW46YWRtaW4="}))
    _assert_unauthorized(*_get(server.url + "/api/v1/secrets", headers={"Authorization": "bearer"}))
    _assert_unauthorized(*_get(server.url + f"/api/v1/secrets?access_token={token}"))
    # Refusals are counted like any other answer (so "no 401 for the operator" below can fail).
    assert server.count(code=401) >= 4 * 6
    # With the token: the Secret is there.
    code, body = _get(server.url + "/api/v1/namespaces/default/secrets/judge-key", token)
    assert code == 200 and body["metadata"]["name"] == "judge-key"


def test_a_secret_cannot_be_read_without_the_token(control_plane):
    server, kubeconfig, kube = control_plane
    kube.apply(SECRET)
    code, body = _get(server.url + "/api/v1/namespaces/default/secrets/judge-key")
    assert code == 401 and "sk-very-secret" not in json.dumps(body)
    assert "c2stdmVyeS1zZWNyZXQ=" not in json.dumps(body)  # base64 of the value
    # A client without credentials (the kubernetes client on the bare URL) is refused too.
    anonymous = connect(server=server.url, ca_file=server.ca_file)
    with pytest.raises(Exception) as err:
        anonymous.get("v1", "Secret", "default", "judge-key")
    assert "401" in str(err.value) or "Unauthorized" in str(err.value)


def test_health_and_version_stay_public(control_plane):
    server, _, _ = control_plane
    for path in ("/healthz", "/livez", "/readyz"):
        assert _get(server.url + path) == (200, "ok")
    code, body = _get(server.url + "/version")
    assert code == 200 and body["gitVersion"].startswith("v1.")


def test_kubeconfig_is_private_and_carries_the_token(control_plane, tmp_path):
    server, kubeconfig, _ = control_plane
    mode = stat.S_IMODE(os.stat(kubeconfig).st_mode)
    assert mode == 0o600, oct(mode)
    kube = connect(kubeconfig=str(kubeconfig))
    kube.apply(SECRET)
    assert kube.get("v1", "Secret", "default", "judge-key")["data"]["key"]
    # A second control plane gets another token: tokens are random, not derived.
    other_state = tmp_path / "other"
    other, other_cfg, _ = _start_control_plane("127.0.0.1", 0, other_state, crds=False)
    _trust(other.url, _ca(other_cfg))
    try:
        assert _token(other_cfg) != _token(kubeconfig) and _ca(other_cfg) != _ca(kubeconfig)
        _assert_unauthorized(*_get(other.url + "/api/v1/secrets", _token(kubeconfig)))
    finally:
        other.stop()
    # An existing world-readable kubeconfig is made private when rewritten.
    kubeconfig.chmod(0o644)
    third, cfg3, _ = _start_control_plane("127.0.0.1", 0, kubeconfig.parent, crds=False)
    try:
        assert stat.S_IMODE(os.stat(cfg3).st_mode) == 0o600
    finally:
        third.stop()


def test_kubectl_uses_the_kubeconfig_token(control_plane):
    server, kubeconfig, kube = control_plane
    assert shutil.which("kubectl"), "kubectl is needed for this test (it is installed on the dev machines)"
    kube.apply(SECRET)
    out = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", "get", "secret", "judge-key", "-o", "name"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "secret/judge-key", out.stderr
    out = subprocess.run(["kubectl", f"--server={server.url}", "--kubeconfig=/dev/null", "--insecure-skip-tls-verify",
                          "--token=not-the-token-of-this-server", "get", "secrets"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Unauthorized" in out.stderr, (out.stdout, out.stderr)


def test_control_plane_is_not_reachable_on_a_non_loopback_address(control_plane):
    server, _, _ = control_plane
    addr = _non_loopback_address()
    with pytest.raises(OSError):
        socket.create_connection((addr, server.port), timeout=5).close()
    socket.create_connection(("127.0.0.1", server.port), timeout=5).close()


def test_the_operator_of_the_harness_authenticates(tmp_path):
    with running_cluster(tmp_path) as cluster:
        assert cluster.server.token, "the harness runs the control plane with a token"
        _trust(cluster.server.url, cluster.server.tls.cert_pem)
        _assert_unauthorized(*_get(cluster.server.url + "/apis/perennial.ai/v1alpha1/rewardspecs"))
        cluster.kube.apply({"apiVersion": "perennial.ai/v1alpha1", "kind": "RewardSpec",
                            "metadata": {"name": "fmt", "namespace": "default"},
                            "spec": {"graders": [{"name": "f", "type": "Regex", "regex": {"pattern": "x"}}]}})
        # The operator (kopf's watches, its own client's status write) works with the token over TLS.
        wait_for(lambda: (cluster.kube.get(API, "RewardSpec", "default", "fmt").get("status") or {}).get("observedGeneration") == 1,
                 timeout=30, message="the operator's status of the RewardSpec")
        assert cluster.server.count(client="kopf", code=401) == 0
        assert cluster.server.count(client="perennial-operator", code=401) == 0
        assert cluster.server.count(client="kopf") > 0 and cluster.server.count(client="perennial-operator") > 0


def test_perennial_dev_binds_api_and_metrics_to_host_and_requires_the_token(tmp_path):
    port, metrics, health = free_port(), free_port(), free_port()
    log = open(tmp_path / "dev.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "perennial.cli", "dev", "--host", "127.0.0.1", "--state-dir", str(tmp_path / "state"),
         "--port", str(port), "--metrics-port", str(metrics), "--health-port", str(health)],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_for(lambda: "Perennial dev is running" in (tmp_path / "dev.log").read_text() or proc.poll() is not None,
                 timeout=120, interval=0.5)
        assert proc.poll() is None, (tmp_path / "dev.log").read_text()
        kubeconfig = tmp_path / "state" / "kubeconfig"
        assert stat.S_IMODE(os.stat(kubeconfig).st_mode) == 0o600
        _trust(f"https://127.0.0.1:{port}", _ca(kubeconfig))
        _assert_unauthorized(*_get(f"https://127.0.0.1:{port}/api/v1/secrets"))
        assert _get(f"https://127.0.0.1:{port}/api/v1/secrets", _token(kubeconfig))[0] == 200
        # the banner comes once the control plane serves; the operator (and its metrics endpoint) starts after it
        wait_for(lambda: listening(metrics), timeout=60, interval=0.2, message="the operator's metrics endpoint")
        assert _get(f"http://127.0.0.1:{metrics}/metrics")[0] == 200
        addr = _non_loopback_address()
        for p in (port, metrics, health):
            with pytest.raises(OSError):
                socket.create_connection((addr, p), timeout=5).close()
    finally:
        stop_dev(proc, log)
    assert proc.returncode == 0, (tmp_path / "dev.log").read_text()[-2000:]


async def test_the_operator_authenticates_from_the_kubeconfig(control_plane):
    """`perennial run --kubeconfig .perennial/kubeconfig` (README): kopf's login and the operator's own client take
    the kubeconfig's token (the kubernetes client keeps it under `BearerToken`, as for in-cluster config)."""
    from perennial.kube.aio import AsyncKube, configuration
    from perennial.runtime import connection_info

    server, kubeconfig, kube = control_plane
    kube.apply(SECRET)
    cfg = configuration(kubeconfig=str(kubeconfig))
    info = connection_info(cfg)
    assert (info.scheme, info.token) == ("Bearer", _token(kubeconfig))
    assert info.ca_path and not info.insecure
    client = AsyncKube(cfg)
    try:
        secret = await client.request("GET", "/api/v1/namespaces/default/secrets/judge-key")
        assert secret["metadata"]["name"] == "judge-key"
    finally:
        await client.close()
