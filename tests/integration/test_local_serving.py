"""The local runtime serves: apps/v1 Deployments become ReplicaSets and Pods whose containers run as processes
(the real `perennial-server sidecar` in front of a stand-in engine), with probes, pod IPs, mounted ConfigMaps and
Secrets, and Services proxied on local ports — against the real embedded control plane."""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from perennial.kube import connect
from perennial.kube.client import Kube
from perennial.local.apiserver import start_in_thread
from perennial.local.cluster import LocalCluster
from perennial.local.controllers import pod_template_hash
from perennial.local.kubelet import DEFAULT_COMMANDS
from perennial.local.proxy import LOCAL_URL
from waiting import wait_for

NS = "default"
IMAGE = "perennial-server:test"
ENGINE = str(Path(__file__).with_name("serving_fake_engine.py"))
WAIT = 45.0


class Env:
    def __init__(self, server: Any, kube: Kube, cluster: LocalCluster, tmp: Path) -> None:
        self.server, self.kube, self.cluster, self.tmp = server, kube, cluster, tmp

    # -- objects
    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.kube.request("GET", path)
        except Exception as exc:  # 404
            if getattr(exc, "status", None) == 404:
                return None
            raise

    def deployment(self, name: str, replicas: int = 2, color: str = "blue", *, liveness: bool = False,
                   routes: str | None = None) -> dict[str, Any]:
        labels = {"app": name, "color": color}
        engine: dict[str, Any] = {
            "name": "engine", "image": IMAGE,
            "command": ["fake-engine", "--host", "127.0.0.1", "--port", "8000", "--watch", "/etc/perennial/routes/routes.json"],
            "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
            "volumeMounts": [{"name": "routes", "mountPath": "/etc/perennial/routes", "readOnly": True}],
        }
        if liveness:  # through the sidecar (the pod IP's :8080) to the engine: a sick engine fails it
            engine["startupProbe"] = {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 1, "failureThreshold": 60, "timeoutSeconds": 2}
            engine["livenessProbe"] = {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 1, "failureThreshold": 2, "timeoutSeconds": 2}
        sidecar = {
            "name": "sidecar", "image": IMAGE,
            "command": ["perennial-server", "sidecar"],
            "args": ["--port", "8080", "--upstream", "http://127.0.0.1:8000", "--spool-dir", "/var/spool/perennial",
                     "--token-file", "/etc/perennial/feedback/token", "--deployment", name, "--pod", "$(POD_NAME)"],
            "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1, "failureThreshold": 1},
            "startupProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1, "failureThreshold": 60, "timeoutSeconds": 3},
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 2, "failureThreshold": 5, "timeoutSeconds": 3},
            "volumeMounts": [{"name": "spool", "mountPath": "/var/spool/perennial"},
                             {"name": "token", "mountPath": "/etc/perennial/feedback", "readOnly": True},
                             {"name": "routes", "mountPath": "/etc/perennial/routes", "readOnly": True}],
        }
        self.kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-routes", "namespace": NS},
                         "data": {"routes.json": routes or json.dumps({"revision": "r1"})}})
        self.kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-token", "namespace": NS},
                         "stringData": {"token": "s3cr3t"}})
        return self.kube.create({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {
                         "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 10,
                         "containers": [engine, sidecar],
                         "volumes": [{"name": "spool", "emptyDir": {}},
                                     {"name": "token", "secret": {"secretName": f"{name}-token"}},
                                     {"name": "routes", "configMap": {"name": f"{name}-routes"}}]}}},
        })

    def service(self, name: str, selector: dict[str, str]) -> str:
        self.kube.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
                          "spec": {"selector": selector, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
        return wait_for(lambda: ((self.kube.get("v1", "Service", NS, name) or {})["metadata"].get("annotations") or {}).get(LOCAL_URL),
                        WAIT, 0.1, f"service {name} proxied")

    def pods(self, app: str) -> list[dict[str, Any]]:
        return [p for p in self.kube.list("v1", "Pod", NS, f"app={app}")]

    def ready_pods(self, app: str) -> list[dict[str, Any]]:
        return [p for p in self.pods(app) if any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions") or [])]

    def deploy_status(self, name: str) -> dict[str, Any]:
        return (self.kube.get("apps/v1", "Deployment", NS, name) or {}).get("status") or {}

    def pids(self, pod: dict[str, Any]) -> dict[str, int]:
        return {c["name"]: int(c["containerID"].split("://")[1]) for c in pod.get("status", {}).get("containerStatuses") or [] if c.get("containerID")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _chat(url: str) -> str:
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(
        {"model": "base", "messages": [{"role": "user", "content": "hi"}]}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    server = start_in_thread()
    kube = connect(server=server.url)
    commands = {**DEFAULT_COMMANDS, "fake-engine": [sys.executable, ENGINE]}
    cluster = LocalCluster(kube, server, workdir=tmp_path / "pods", pvc_root=tmp_path / "pvc",
                           images={IMAGE: [sys.executable, "-m", "perennial_server.cli"]}, commands=commands,
                           pod_options={"restart_backoff_seconds": 0.5, "max_grace_seconds": 10}).start()
    e = Env(server, kube, cluster, tmp_path)
    try:
        yield e
    finally:
        pids = [pid for p in kube.list("v1", "Pod", NS) for pid in e.pids(p).values()]
        cluster.stop()
        server.stop()
        assert not [p for p in pids if _alive(p)], "pod processes outlived the local runtime"


def test_deployment_becomes_ready_pods_behind_a_service_and_scales_to_zero(env: Env) -> None:
    env.deployment("web", replicas=2)
    ready = wait_for(lambda: len(env.ready_pods("web")) == 2 and env.ready_pods("web"), WAIT, 0.2, "2 ready pods")
    # ReplicaSet named with the pod-template-hash, pods owned by it
    rs_list = env.kube.request("GET", f"/apis/apps/v1/namespaces/{NS}/replicasets")["items"]
    assert len(rs_list) == 1
    rs = rs_list[0]
    h = rs["metadata"]["labels"]["pod-template-hash"]
    assert rs["metadata"]["name"] == f"web-{h}" and rs["spec"]["selector"]["matchLabels"]["pod-template-hash"] == h
    d = env.kube.get("apps/v1", "Deployment", NS, "web")
    assert d is not None and h == pod_template_hash(d["spec"]["template"])
    for p in ready:
        assert p["metadata"]["ownerReferences"][0]["uid"] == rs["metadata"]["uid"]
        assert p["metadata"]["name"].startswith(f"web-{h}-")
    # two pods, two pod IPs, both listening on :8080
    ips = {p["status"]["podIP"] for p in ready}
    assert {p["spec"].get("nodeName") for p in ready} == {"perennial-local"}
    assert len(ips) == 2 and all(ip.startswith("127.") and ip != "127.0.0.1" for ip in ips)
    for p in ready:
        statuses = {c["name"]: c for c in p["status"]["containerStatuses"]}
        assert statuses["sidecar"]["ready"] and statuses["sidecar"]["started"] and "running" in statuses["sidecar"]["state"]
        assert p["status"]["phase"] == "Running"
        assert _get(f"http://{p['status']['podIP']}:8080/healthz")[0] == 200
        # the engine listens on the pod's own loopback only: not on the pod IP
        with pytest.raises(OSError):
            socket.create_connection((p["status"]["podIP"], 8000), timeout=2).close()
    status = wait_for(lambda: (s := env.deploy_status("web")).get("availableReplicas") == 2 and s, WAIT, 0.2, "deployment available")
    assert status["readyReplicas"] == 2 and status["updatedReplicas"] == 2 and status["replicas"] == 2
    assert status["observedGeneration"] == d["metadata"]["generation"]
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Available"]["status"] == "True"
    wait_for(lambda: {c["type"]: c for c in env.deploy_status("web")["conditions"]}["Progressing"]["reason"] == "NewReplicaSetAvailable",
             WAIT, 0.2, "rollout complete")

    url = env.service("web", {"app": "web"})
    svc = env.kube.get("v1", "Service", NS, "web")
    assert svc is not None and svc["spec"]["clusterIP"].startswith("10.")
    ep = wait_for(lambda: (e := env.get(f"/api/v1/namespaces/{NS}/endpoints/web")) and len((e.get("subsets") or [{}])[0].get("addresses") or []) == 2 and e,
                  WAIT, 0.1, "endpoints")
    assert {a["ip"] for a in ep["subsets"][0]["addresses"]} == ips and ep["subsets"][0]["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    answered = {_chat(url) for _ in range(6)}
    assert answered == {f"hello from {p['metadata']['name']}" for p in ready}, "round robin over both pods"

    pids = [pid for p in ready for pid in env.pids(p).values()]
    assert len(pids) == 4 and all(_alive(pid) for pid in pids)
    env.kube.patch("apps/v1", "Deployment", NS, "web", {"spec": {"replicas": 0}})
    wait_for(lambda: not env.pods("web"), WAIT, 0.2, "pods removed")
    wait_for(lambda: not any(_alive(pid) for pid in pids), WAIT, 0.2, "processes gone")
    wait_for(lambda: (s := env.deploy_status("web")).get("replicas") == 0 and s.get("availableReplicas") == 0, WAIT, 0.2, "status at 0")
    wait_for(lambda: not (env.get(f"/api/v1/namespaces/{NS}/endpoints/web") or {}).get("subsets"), WAIT, 0.1, "no endpoints")
    # no endpoint: the connection is closed at once
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        _chat(url)


def test_selector_switch_moves_new_connections(env: Env) -> None:
    env.deployment("blue", replicas=1, color="blue")
    env.deployment("green", replicas=1, color="green")
    wait_for(lambda: len(env.ready_pods("blue")) == 1 and len(env.ready_pods("green")) == 1, WAIT, 0.2, "both colors ready")
    blue, green = env.ready_pods("blue")[0]["metadata"]["name"], env.ready_pods("green")[0]["metadata"]["name"]
    url = env.service("stable", {"color": "blue"})
    assert _chat(url) == f"hello from {blue}"
    port = int(url.rsplit(":", 1)[1])
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    kept.request("GET", "/whoami")
    assert json.loads(kept.getresponse().read())["pod"] == blue
    # new connections go to green at once; the open keep-alive connection stays on blue (conntrack)
    env.kube.patch("v1", "Service", NS, "stable", {"spec": {"selector": {"color": "green"}}})
    assert {_chat(url) for _ in range(3)} == {f"hello from {green}"}
    kept.request("GET", "/whoami")
    assert json.loads(kept.getresponse().read())["pod"] == blue
    kept.close()
    # the local port lives as long as the Service
    assert env.kube.get("v1", "Service", NS, "stable")["metadata"]["annotations"][LOCAL_URL] == url  # type: ignore[index]
    env.kube.delete("v1", "Service", NS, "stable")

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_for(refused, WAIT, 0.1, "port closed with the Service")


def test_liveness_failure_restarts_the_container(env: Env) -> None:
    env.deployment("live", replicas=1, liveness=True)
    pod = wait_for(lambda: (r := env.ready_pods("live")) and r[0], WAIT, 0.2, "ready pod")
    before = env.pids(pod)
    ip = pod["status"]["podIP"]
    url = env.service("live", {"app": "live"})
    # make the engine sick (reached through the Service and the sidecar)
    req = urllib.request.Request(url + "/sick", data=b"", method="POST")
    urllib.request.urlopen(req, timeout=10).read()

    def restarted() -> dict[str, Any] | None:
        p = env.kube.get("v1", "Pod", NS, pod["metadata"]["name"])
        statuses = {c["name"]: c for c in (p or {}).get("status", {}).get("containerStatuses") or []}
        e = statuses.get("engine") or {}
        return p if e.get("restartCount", 0) >= 1 and e.get("ready") and statuses["sidecar"]["ready"] else None

    p = wait_for(restarted, WAIT, 0.2, "engine restarted and ready again")
    statuses = {c["name"]: c for c in p["status"]["containerStatuses"]}
    assert statuses["engine"]["lastState"]["terminated"]["message"] == "Liveness probe failed"
    assert statuses["sidecar"]["restartCount"] == 0
    after = env.pids(p)
    assert after["engine"] != before["engine"] and not _alive(before["engine"])
    assert after["sidecar"] == before["sidecar"]
    assert p["status"]["podIP"] == ip
    assert _get(url + "/health")[0] == 200


def test_configmap_update_reaches_the_mounted_file_atomically(env: Env) -> None:
    env.deployment("cfg", replicas=1, routes=json.dumps({"revision": "r1"}))
    pod = wait_for(lambda: (r := env.ready_pods("cfg")) and r[0], WAIT, 0.2, "ready pod")
    url = env.service("cfg", {"app": "cfg"})
    assert json.loads(_get(url + "/file")[1]) == {"revision": "r1"}
    vol = env.tmp / "pods" / NS / pod["metadata"]["name"] / "volumes" / "routes"
    assert (vol / "routes.json").is_symlink() and os.readlink(vol / "routes.json") == "..data/routes.json"
    first = os.readlink(vol / "..data")
    env.kube.patch("v1", "ConfigMap", NS, "cfg-routes", {"data": {"routes.json": json.dumps({"revision": "r2"})}})
    wait_for(lambda: json.loads(_get(url + "/file")[1]) == {"revision": "r2"}, WAIT, 0.2, "new content in the container")
    second = os.readlink(vol / "..data")
    assert second != first and not (vol / first).exists(), "..data swapped to a new directory, the old one removed"
    # the Secret is a file too
    assert (env.tmp / "pods" / NS / pod["metadata"]["name"] / "volumes" / "token" / "token").read_text() == "s3cr3t"


def test_pod_deletion_kills_its_processes_and_the_replicaset_replaces_it(env: Env) -> None:
    env.deployment("gone", replicas=1)
    pod = wait_for(lambda: (r := env.ready_pods("gone")) and r[0], WAIT, 0.2, "ready pod")
    pids = env.pids(pod)
    assert set(pids) == {"engine", "sidecar"} and all(_alive(p) for p in pids.values())
    env.kube.delete("v1", "Pod", NS, pod["metadata"]["name"])
    wait_for(lambda: not any(_alive(p) for p in pids.values()), WAIT, 0.2, "processes gone")
    new = wait_for(lambda: (r := env.ready_pods("gone")) and r[0], WAIT, 0.2, "replacement ready")
    assert new["metadata"]["name"] != pod["metadata"]["name"]


def test_template_change_rolls_out_a_new_replicaset(env: Env) -> None:
    env.deployment("roll", replicas=1)
    old = wait_for(lambda: (r := env.ready_pods("roll")) and r[0], WAIT, 0.2, "ready pod")
    env.kube.patch("apps/v1", "Deployment", NS, "roll", {"spec": {"template": {"metadata": {"annotations": {"v": "2"}}}}})

    def rolled() -> list[dict[str, Any]] | None:
        pods = env.pods("roll")
        if len(pods) == 1 and pods[0]["metadata"]["name"] != old["metadata"]["name"] and env.ready_pods("roll"):
            return pods
        return None

    wait_for(rolled, WAIT, 0.2, "new pod ready, old one gone")
    rs = {r["metadata"]["name"]: r for r in env.kube.request("GET", f"/apis/apps/v1/namespaces/{NS}/replicasets")["items"]}
    assert len(rs) == 2
    by_rev = sorted(rs.values(), key=lambda r: int(r["metadata"]["annotations"]["deployment.kubernetes.io/revision"]))
    assert by_rev[0]["spec"]["replicas"] == 0 and by_rev[1]["spec"]["replicas"] == 1
    d = env.kube.get("apps/v1", "Deployment", NS, "roll")
    assert d is not None and d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    old_pids = list(env.pids(old).values())
    wait_for(lambda: not any(_alive(pid) for pid in old_pids), WAIT, 0.2, "old processes gone")


def test_progress_deadline_exceeded_when_pods_never_become_ready(env: Env) -> None:
    env.kube.create({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "stuck", "namespace": NS},
        "spec": {"replicas": 1, "progressDeadlineSeconds": 2, "selector": {"matchLabels": {"app": "stuck"}},
                 "template": {"metadata": {"labels": {"app": "stuck"}}, "spec": {"containers": [{
                     "name": "c", "image": IMAGE, "command": ["python", "-c", "import time; time.sleep(600)"],
                     "readinessProbe": {"httpGet": {"path": "/", "port": 9}, "periodSeconds": 1}}]}}}})

    def exceeded() -> bool:
        conds = {c["type"]: c for c in env.deploy_status("stuck").get("conditions") or []}
        p = conds.get("Progressing") or {}
        return p.get("status") == "False" and p.get("reason") == "ProgressDeadlineExceeded"

    wait_for(exceeded, WAIT, 0.2, "ProgressDeadlineExceeded")
    conds = {c["type"]: c for c in env.deploy_status("stuck")["conditions"]}
    assert conds["Available"]["status"] == "False"
    pod = env.pods("stuck")[0]
    assert pod["status"]["phase"] == "Running" and not pod["status"]["containerStatuses"][0]["ready"]


def _bare_pod(env: Env, name: str, script: str, **spec: Any) -> dict[str, Any]:
    return env.kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
                            "spec": {"containers": [{"name": "main", "image": IMAGE, "command": ["python", "-c", script]}], **spec}})


def _main_status(env: Env, name: str) -> dict[str, Any]:
    p = env.kube.get("v1", "Pod", NS, name) or {}
    return ((p.get("status") or {}).get("containerStatuses") or [{}])[0]


def test_a_process_ignoring_sigterm_is_killed_after_the_grace_period(env: Env) -> None:
    _bare_pod(env, "stubborn", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(600)",
              terminationGracePeriodSeconds=2)
    st = wait_for(lambda: (s := _main_status(env, "stubborn")).get("ready") and s, WAIT, 0.1, "running")
    pid = int(st["containerID"].split("://")[1])
    wait_for(lambda: "up" in env.kube.pod_log(NS, "stubborn"), WAIT, 0.1, "log line")  # SIG_IGN is in place
    env.kube.delete("v1", "Pod", NS, "stubborn")
    time.sleep(1.0)
    assert _alive(pid), "SIGTERM ignored: still alive within the grace period"
    wait_for(lambda: not _alive(pid), WAIT, 0.1, "SIGKILL after the grace period")


def test_a_crashing_container_restarts_with_backoff(env: Env) -> None:
    _bare_pod(env, "crashy", "import sys; sys.exit(3)")

    def crashed_twice() -> dict[str, Any] | None:
        s = _main_status(env, "crashy")
        return s if s.get("restartCount", 0) >= 2 else None

    st = wait_for(crashed_twice, WAIT, 0.1, "two restarts")
    assert st["lastState"]["terminated"]["exitCode"] == 3 and st["lastState"]["terminated"]["reason"] == "Error"
    assert not st["ready"]
    pod = env.kube.get("v1", "Pod", NS, "crashy")
    assert pod is not None and pod["status"]["phase"] == "Running"
    wait_for(lambda: (_main_status(env, "crashy").get("state") or {}).get("waiting", {}).get("reason") == "CrashLoopBackOff",
             WAIT, 0.05, "CrashLoopBackOff between restarts")


def test_restart_policy_never_ends_the_pod(env: Env) -> None:
    _bare_pod(env, "once", "print('done')", restartPolicy="Never")
    wait_for(lambda: ((env.kube.get("v1", "Pod", NS, "once") or {}).get("status") or {}).get("phase") == "Succeeded", WAIT, 0.1, "Succeeded")
    st = _main_status(env, "once")
    assert st["state"]["terminated"]["exitCode"] == 0 and st["restartCount"] == 0


def test_pods_of_unmapped_images_stay_pending(env: Env) -> None:
    env.kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "elsewhere", "namespace": NS},
                     "spec": {"containers": [{"name": "main", "image": "nginx:1"}]}})
    _bare_pod(env, "marker", "import time; time.sleep(600)")
    wait_for(lambda: _main_status(env, "marker").get("ready"), WAIT, 0.1, "a mapped pod runs meanwhile")
    pod = env.kube.get("v1", "Pod", NS, "elsewhere")
    assert pod is not None and pod["status"]["phase"] == "Pending" and not pod["status"].get("podIP")


def test_the_perennial_serving_pod_from_the_builders_serves_the_tiny_model(env: Env) -> None:
    """The apps/v1 Deployment, routes ConfigMap, token Secret and stable Service exactly as
    perennial.resources.deployment builds them (CPU engine `perennial-server engine` with the tiny model on a
    PVC, the sidecar with its routes file, token file, exec and httpGet probes) run in the local runtime."""
    from perennial.api.deployment import DeploymentSpec
    from perennial.resources import deployment as d
    from tinymodel import build_tiny_model

    build_tiny_model(env.tmp / "pvc" / "weights" / "model")
    spec = DeploymentSpec.model_validate({"baseModelRef": {"name": "tiny"}, "engine": {"type": "Transformers"}})
    base = {"metadata": {"name": "tiny", "namespace": NS},
            "spec": {"source": {"uri": "pvc://weights/model"}, "resources": {"cpu": "1", "memory": "2Gi"}},
            "status": {"resolvedUri": "pvc://weights/model"}}
    body = {"apiVersion": "perennial.ai/v1alpha1", "kind": "Deployment", "metadata": {"name": "chat", "namespace": NS, "uid": "uid-chat"}}
    s = d.Serving(body=body, spec=spec, base_model=base, region=d.regions(spec)[0], image=IMAGE, owned=False)
    env.kube.create(d.token_secret(s, "s3cr3t-feedback-token-0042"))
    env.kube.create(d.routes_config_map(s, {}))
    deployment = d.deployment(s, "blue", d.revision(s), 1)
    for c in deployment["spec"]["template"]["spec"]["containers"]:  # the only change: probe periods of 1 s, for the test's time
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in c:
                c[probe]["periodSeconds"] = 1
                c[probe]["failureThreshold"] = max(c[probe].get("failureThreshold", 3), 120 if probe == "startupProbe" else 3)
    env.kube.create(deployment)
    env.kube.create(d.stable_service(s, "blue"))
    url = wait_for(lambda: ((env.kube.get("v1", "Service", NS, d.stable_service_name(s.prefix)) or {})["metadata"].get("annotations") or {}).get(LOCAL_URL),
                   WAIT, 0.2, "service proxied")
    name = d.deployment_name(s.prefix, "blue")
    wait_for(lambda: env.deploy_status(name).get("availableReplicas") == 1, 120, 0.5, "the serving pod ready (engine loaded, routes applied)")
    status, models = _get(url + "/v1/models")
    assert status == 200 and "tiny" in {m["id"] for m in json.loads(models)["data"]}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(
        {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        answer = json.loads(resp.read())
    assert answer["choices"][0]["message"]["role"] == "assistant"


def test_a_prestop_hook_runs_before_sigterm(env: Env) -> None:
    # the hook leaves a file in the container's working directory; the process reports, on SIGTERM, whether it is there
    script = ("import os, signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *a: (print('SIGTERM after preStop:', os.path.exists('prestop-ran'), flush=True), sys.exit(0)))\n"
              "print('up', flush=True)\ntime.sleep(600)")
    env.kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hooked", "namespace": NS},
                     "spec": {"terminationGracePeriodSeconds": 10, "containers": [{
                         "name": "main", "image": IMAGE, "command": ["python", "-c", script],
                         "lifecycle": {"preStop": {"exec": {"command": ["python", "-c", "open('prestop-ran', 'w').close()"]}}}}]}})
    wait_for(lambda: "up" in env.kube.pod_log(NS, "hooked"), WAIT, 0.1, "running")
    pid = int(_main_status(env, "hooked")["containerID"].split("://")[1])
    env.kube.delete("v1", "Pod", NS, "hooked")
    wait_for(lambda: not _alive(pid), WAIT, 0.1, "stopped")
    assert "SIGTERM after preStop: True" in (env.tmp / "pods" / NS / "hooked" / "main.log").read_text()


def test_init_containers_run_first_and_share_emptydirs(env: Env) -> None:
    env.kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "inits", "namespace": NS},
                     "spec": {"restartPolicy": "Never", "volumes": [{"name": "work", "emptyDir": {}}],
                              "initContainers": [{"name": "prep", "image": IMAGE, "command": ["python", "-c", "open('/work/x', 'w').write('prepared')"],
                                                  "volumeMounts": [{"name": "work", "mountPath": "/work"}]}],
                              "containers": [{"name": "main", "image": IMAGE, "command": ["python", "-c", "print(open('/work/x').read())"],
                                              "volumeMounts": [{"name": "work", "mountPath": "/work"}]}]}})
    wait_for(lambda: ((env.kube.get("v1", "Pod", NS, "inits") or {}).get("status") or {}).get("phase") == "Succeeded", WAIT, 0.1, "Succeeded")
    pod = env.kube.get("v1", "Pod", NS, "inits")
    assert pod is not None and pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert "prepared" in env.kube.pod_log(NS, "inits")
    env.kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "badinit", "namespace": NS},
                     "spec": {"restartPolicy": "Never",
                              "initContainers": [{"name": "prep", "image": IMAGE, "command": ["python", "-c", "raise SystemExit(2)"]}],
                              "containers": [{"name": "main", "image": IMAGE, "command": ["python", "-c", "print('must not run')"]}]}})
    wait_for(lambda: ((env.kube.get("v1", "Pod", NS, "badinit") or {}).get("status") or {}).get("phase") == "Failed", WAIT, 0.1, "Failed")
    assert "must not run" not in env.kube.pod_log(NS, "badinit")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie nobody reaps (PID 1 of a container may not) is gone too


def test_pod_processes_do_not_outlive_a_killed_runtime(tmp_path: Path) -> None:
    """`perennial dev` killed (SIGKILL, OOM, a crash) runs no stop(): its pods' processes, each in a session of its
    own, kept serving, holding their ports and memory, with nobody left to stop them. A pod process (the podnet
    shim loads in each) now stops itself once its parent is gone."""
    import subprocess

    from perennial.local.serving import PODNET_DIR

    pidfile = tmp_path / "child.pid"
    parent_code = (
        "import os, subprocess, sys, time\n"
        f"env = dict(os.environ, PYTHONPATH={PODNET_DIR!r}, PERENNIAL_LOCAL_POD_IP='127.77.0.2', PERENNIAL_LOCAL_POD_LOOPBACK='127.77.0.3')\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(1)'], env=env, start_new_session=True,\n"
        "                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        f"open({str(pidfile)!r} + '.tmp', 'w').write(str(p.pid)); os.rename({str(pidfile)!r} + '.tmp', {str(pidfile)!r})\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        wait_for(pidfile.exists, WAIT, message="the pod process started")
        child = int(pidfile.read_text())
        time.sleep(1.5)
        assert _alive(child)  # alive while its runtime is
        parent.kill()
        parent.wait()
        wait_for(lambda: not _alive(child), WAIT, message="the orphaned pod process exited")
    finally:
        parent.kill()
        if pidfile.exists() and _alive(pid := int(pidfile.read_text())):
            os.kill(pid, 9)


def test_a_service_relay_lets_go_of_connections_the_pod_closed(env: Env) -> None:
    """A client that reads its answer but never closes its socket: the pod closed its side (`Connection: close`), yet
    the relay kept waiting on the client's side for ever, holding the client's and the pod's sockets (two fds of the
    `perennial dev` process per connection, without bound). After the pod's FIN, the client side gets a grace period."""
    env.deployment("fin", replicas=1)
    wait_for(lambda: len(env.ready_pods("fin")) == 1, WAIT, 0.2, "pod ready")
    url = env.service("fin", {"app": "fin"})
    port = int(url.rsplit(":", 1)[1])
    proxy = env.cluster.proxy
    proxy.fin_timeout_s = 1.0
    held = []
    try:
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port), timeout=20)
            s.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):  # until the pod's FIN, passed on by the relay
                data += chunk
            assert b" 200 " in data.split(b"\r\n", 1)[0] + b" "
            held.append(s)  # read, never closed
        wait_for(lambda: not proxy._conns, WAIT, 0.1, "relay connections released")
    finally:
        for s in held:
            s.close()


def test_the_api_servers_proxy_subresources_reach_the_serving_pods(env: Env) -> None:
    """What a hub operator does with a region's kubeconfig: talk to a Service's pods through the region's API server
    (`services/<name>:<port>/proxy/...`, `pods/<name>:<port>/proxy/...`), the pods being the local runtime's processes
    at their 127.x pod IPs."""
    env.deployment("apx", replicas=2)
    wait_for(lambda: len(env.ready_pods("apx")) == 2, WAIT, 0.2, "pods ready")
    env.service("apx", {"app": "apx"})
    base = f"{env.server.url}/api/v1/namespaces/{NS}"
    assert _chat(f"{base}/services/apx:http/proxy").startswith("hello from apx-")
    seen = set()
    for pod in env.ready_pods("apx"):
        status, body = _get(f"{base}/pods/{pod['metadata']['name']}:http/proxy/whoami")
        assert status == 200, body
        seen.add(json.loads(body)["pod"])
    assert seen == {p["metadata"]["name"] for p in env.ready_pods("apx")}


def test_a_local_runtime_stopped_before_or_while_it_starts_stops_at_once(tmp_path: Path) -> None:
    """`perennial dev` stopped while starting stops whatever of the runtime started: a runtime never started left a
    coroutine for a loop that never ran (RuntimeWarning "never awaited") and waited 10 s for its answer."""
    import gc
    import warnings

    server = start_in_thread()
    try:
        kube = connect(server=server.url)
        for started in ((), ("loop",), ("loop", "jobs", "controllers")):
            cluster = LocalCluster(kube, server, workdir=tmp_path / "pods", pvc_root=tmp_path / "pvc", images={})
            for part in started:
                getattr(cluster, part).start()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                box: list[BaseException] = []
                t = threading.Thread(target=_call, args=(cluster.stop, box), daemon=True)
                t.start()
                t.join(5)  # a bound against the 10 s wait it did, not a performance figure
                assert not t.is_alive(), f"stop() with {started or 'nothing'} started still waits"
                assert not box, box
                gc.collect()
            assert not [w for w in caught if "never awaited" in str(w.message)], [str(w.message) for w in caught]
    finally:
        server.stop()


def _call(fn: Any, box: list[BaseException]) -> None:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 -- reported by the test
        box.append(e)
