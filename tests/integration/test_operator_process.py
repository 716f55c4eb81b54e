"""`perennial run` as a process, as a cluster runs it: --kubeconfig logs in (whatever $KUBECONFIG says), and
/healthz says whether the API server is reachable with those credentials."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from harness import API, wait_for

from perennial.cli import install_crds
from perennial.kube import connect
from perennial.local.apiserver import start_in_thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kubeconfig(path: Path, url: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": url}}],
        "users": [{"name": "u", "user": {"token": "operator-token"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    return path


def health(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None  # not listening yet


def operator(config: Path, port: int, tmp_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, KUBECONFIG=str(tmp_path / "not-this-one"))
    return subprocess.Popen(
        [sys.executable, "-m", "perennial.cli", "run", "--kubeconfig", str(config), "--standalone",
         "--health-port", str(port), "--metrics-port", "0", "--log-format", "plain"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "operator.log", "wb"),
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_kubeconfig_login_and_health_follows_the_api(tmp_path):
    server = start_in_thread()
    kube = connect(server=server.url)
    install_crds(kube)
    port = free_port()
    proc = operator(kubeconfig(tmp_path / "kubeconfig", server.url), port, tmp_path)
    try:
        kube.create({"apiVersion": API, "kind": "BaseModel", "metadata": {"name": "m", "namespace": "default"}, "spec": {"source": {"uri": "hf://org/m"}}})
        wait_for(lambda: any(c["status"] == "True" for c in (kube.get(API, "BaseModel", "default", "m").get("status") or {}).get("conditions") or []),
                 timeout=60, message="the operator logged in with --kubeconfig and reconciled")
        assert server.count(client="perennial-operator") > 0 and server.count(client="kopf") > 0
        wait_for(lambda: health(port) == 200, timeout=30, message="/healthz 200")
        server.stop()
        # kopf re-runs probes at most every 10 s
        wait_for(lambda: health(port) not in (None, 200), timeout=40, message="/healthz failing once the API is gone")
    finally:
        stop(proc)
        server.stop()


def test_health_fails_when_the_api_was_never_reachable(tmp_path):
    port = free_port()
    proc = operator(kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{free_port()}"), port, tmp_path)
    try:
        status = wait_for(lambda: health(port), timeout=60, message="/healthz answering")
        assert status != 200, (tmp_path / "operator.log").read_text()[-2000:]
    finally:
        stop(proc)
