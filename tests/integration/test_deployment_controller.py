"""The Perennial `Deployment` controller against the embedded control plane (real kopf, real HTTP).

The test plays the parts a cluster would: the apps/v1 controller-manager (it patches the status of the
colors' apps/v1 Deployments: ready replicas, a progress deadline), the kube-proxy of the local runtime (it
annotates Services with `perennial.ai/local-url`, as `perennial.local.proxy` does) and the serving pods (a
small HTTP server answering chat completions, the smoke test's target). Writes are counted at the server.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import fault_config, proxy_service, record_managers
from harness import API, Cluster, running_cluster, wait_for
from perennial.api.deployment import (
    ABORTED_REVISION_ANNOTATION,
    SCALE_DOWN_AT_ANNOTATION,
    SWITCHED_AT_ANNOTATION,
)
from test_controller_pattern import WRITES, count, quiet

NS = "default"


# ----------------------------------------------------------------------------- the parts a cluster plays


class JSONServer:
    """A tiny HTTP server on 127.0.0.1: every request is answered by `answer(method, body)` -> (status, JSON)."""

    def __init__(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def reply(self) -> None:
                status, obj = outer.answer(self.command, self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = reply

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, method: str, body: bytes) -> tuple[int, Any]:
        raise NotImplementedError

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Engines(JSONServer):
    """The serving pods behind a Service, as the smoke test sees them: chat completions, or failures."""

    def __init__(self) -> None:
        self.answer_text = "Hello there."
        self.status = 200
        self.models: list[str] = []
        #: the model names the pods serve (None: any), as a sidecar answers for a name its routes do not have yet
        self.known: set[str] | None = None
        super().__init__()

    def answer(self, method: str, body: bytes) -> tuple[int, Any]:
        model = json.loads(body or b"{}").get("model")
        self.models.append(model)
        if self.known is not None and model not in self.known:
            return 404, {"error": {"message": f"The model `{model}` does not exist.", "type": "NotFoundError", "code": "model_not_found"}}
        return self.status, {"object": "chat.completion", "model": model,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": self.answer_text}}]}


class Serving:
    """Handles to the world of one test: the cluster, the operator's cache, the fake engines."""

    def __init__(self, cluster: Cluster, managers: list[Any], engines: Engines):
        self.cluster = cluster
        self.kube = cluster.kube
        self.managers = managers
        self.engines = engines

    def deploy(self, name: str) -> dict[str, Any] | None:
        return self.kube.get("apps/v1", "Deployment", NS, name)

    def service(self, name: str) -> dict[str, Any] | None:
        return self.kube.get("v1", "Service", NS, name)

    def proxied(self, name: str) -> None:
        """Play the local kube-proxy: the Service answers at the engines' URL; wait until the operator saw it."""
        proxy_service(self.kube, self.managers, NS, name, self.engines.url)

    def ready(self, name: str, ready: int | None = None) -> dict[str, Any]:
        """Play the controller-manager: every replica of `name` (or `ready` of them) is up and ready."""
        d = wait_for(lambda: self.deploy(name), message=f"apps/v1 Deployment {name}")
        n = d["spec"].get("replicas", 1)
        up = n if ready is None else ready
        status = {"observedGeneration": d["metadata"]["generation"], "replicas": n, "updatedReplicas": n, "readyReplicas": up, "availableReplicas": up}
        return self.kube.patch("apps/v1", "Deployment", NS, name, {"status": status}, subresource="status")

    def deadline_exceeded(self, name: str) -> None:
        d = self.deploy(name)
        status = {"observedGeneration": d["metadata"]["generation"], "replicas": d["spec"]["replicas"], "updatedReplicas": 0, "readyReplicas": 0,
                  "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                  "message": f"ReplicaSet of {name} has timed out progressing."}]}
        self.kube.patch("apps/v1", "Deployment", NS, name, {"status": status}, subresource="status")

    def status(self, name: str = "chat") -> dict[str, Any]:
        return (self.cluster.get("Deployment", name) or {}).get("status") or {}

    def stable_color(self, name: str = "chat") -> str | None:
        return ((self.service(name) or {}).get("spec") or {}).get("selector", {}).get("perennial.ai/color")

    def reasons(self, name: str = "chat") -> list[str]:
        """`<reason>: <message>` of its Events (one per reconcile: the other steps of that reconcile in the message)."""
        events = sorted(self.cluster.events(name), key=lambda e: e["metadata"].get("creationTimestamp") or "")
        return [f"{e['reason']}: {e['message']}" for e in events]


class Sidecars(JSONServer):
    """The serving pods' sidecars as the controller reads them (`GET /perennial/routes`): each applies the routes
    ConfigMap's current document at once (or, `frozen`, keeps the revision it had)."""

    def __init__(self, kube: Any, config_map: str) -> None:
        self.frozen: str | None = None
        self.reads = 0
        self.kube, self.config_map = kube, config_map
        super().__init__()

    def answer(self, method: str, body: bytes) -> tuple[int, Any]:
        self.reads += 1
        doc = json.loads(self.kube.get("v1", "ConfigMap", NS, self.config_map)["data"]["routes.json"])
        return 200, {"revision": self.frozen or doc["revision"], "loaded": sorted(doc["adapters"]), "errors": {}}


def run_pods(w: Serving, deployment: str, n: int, sidecars: Sidecars) -> list[str]:
    """Play the ReplicaSet controller and the kubelet: `n` ready pods of an apps/v1 Deployment, their sidecar's port
    the fake sidecars' (pod IP 127.0.0.1)."""
    d = w.deploy(deployment)
    template = d["spec"]["template"]
    pod_spec = json.loads(json.dumps(template["spec"]))
    for c in pod_spec["containers"]:
        for p in c.get("ports") or []:
            p["containerPort"] = sidecars.port
    names = []
    for i in range(n):
        name = f"{deployment}-5d8f7-{i}"
        w.kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": template["metadata"]["labels"]},
                       "spec": pod_spec})
        w.kube.patch("v1", "Pod", NS, name, {"status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}, subresource="status")
        names.append(name)
    return names


@pytest.fixture
def serving(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Serving]:
    """A clean control plane (writes are counted) with the operator, its managers captured (to see its cache);
    parametrized indirectly with "faults", one that fights back (conftest.fault_config), ending with no duplicates."""
    faults = fault_config(seed=len(request.node.nodeid)) if getattr(request, "param", "clean") == "faults" else None
    with serving_cluster(tmp_path, monkeypatch, faults) as w:
        yield w


@contextlib.contextmanager
def serving_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, faults: Any = None) -> Iterator[Serving]:
    """The operator on a control plane (with `faults` if given), a Ready BaseModel `base` and Adapter `support-v1`;
    on exit, every serving child exists once (assert_one_child_each)."""
    managers = record_managers(monkeypatch)
    engines = Engines()
    try:
        with running_cluster(tmp_path, faults=faults) as cluster:
            artifact = tmp_path / "artifacts" / "support-v1"
            artifact.mkdir(parents=True)
            (artifact / "adapter_config.json").write_text("{}")
            cluster.create("BaseModel", "base", {"source": {"uri": "hf://org/model"}})
            cluster.create("Adapter", "support-v1", {"baseModelRef": {"name": "base"}, "family": "support", "version": 1,
                                                     "artifactUri": f"file://{artifact}", "lora": {"rank": 8}})
            cluster.wait_condition("BaseModel", "base", "Ready", "True")
            cluster.wait_condition("Adapter", "support-v1", "Ready", "True")
            yield Serving(cluster, managers, engines)
            assert_one_child_each(cluster)
    finally:
        engines.close()


def assert_one_child_each(cluster: Cluster) -> None:
    """Every serving child exists once per name and kind, owned by exactly one Perennial Deployment."""
    for api, kind in (("apps/v1", "Deployment"), ("v1", "Service"), ("policy/v1", "PodDisruptionBudget"), ("v1", "ConfigMap"),
                      ("autoscaling/v2", "HorizontalPodAutoscaler"), ("v1", "Secret"), ("networking.k8s.io/v1", "NetworkPolicy")):
        for obj in cluster.kube.list(api, kind, NS, "app.kubernetes.io/managed-by=perennial-operator"):
            owners = obj["metadata"].get("ownerReferences") or []
            assert len(owners) <= 1, obj["metadata"]
        names = collections.Counter(o["metadata"]["name"] for o in cluster.kube.list(api, kind, NS))
        assert all(n == 1 for n in names.values()), (kind, names)


def spec(**overrides: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "baseModelRef": {"name": "base"},
        "adapters": [{"name": "support", "adapterRef": {"name": "support-v1"}}],
        "replicas": 2,
        "strategy": {"blueGreen": {"scaleDownDelaySeconds": 1, "abortScaleDownDelaySeconds": 1, "progressDeadlineSeconds": 600,
                                   "previewReplicas": 1, "smokeTest": {"expectRegex": "(?i)hello", "timeoutSeconds": 10}}},
    }
    s.update(overrides)
    return s


def first_rollout(w: Serving, name: str = "chat", **overrides: Any) -> None:
    """Create the Deployment and walk its first rollout to a serving blue."""
    w.cluster.create("Deployment", name, spec(**overrides))
    w.proxied(f"{name}-preview")
    w.ready(f"{name}-blue")
    wait_for(lambda: w.stable_color(name) == "blue", message="the stable Service selects blue")
    w.proxied(name)
    w.cluster.wait_condition("Deployment", name, "Ready", "True", "Serving")
    w.cluster.wait_condition("Deployment", name, "Progressing", "False", "RolloutComplete")


def change_pods(w: Serving, name: str = "chat") -> str:
    """A change that needs new pods (engine args): returns the revision before it."""
    before = w.status(name)["revision"]
    w.kube.patch(API, "Deployment", NS, name, {"spec": {"engine": {"extraArgs": ["--enforce-eager"]}}})
    return before


def validate_strict(obj: dict[str, Any]) -> None:
    import kubernetes_validate

    meta = {k: v for k, v in obj["metadata"].items() if k in ("name", "namespace", "labels", "annotations", "ownerReferences")}
    kubernetes_validate.validate({**{k: v for k, v in obj.items() if k != "status"}, "metadata": meta}, "1.30.0", strict=True)


# ----------------------------------------------------------------------------- tests


def test_first_rollout_children_status_events_and_no_writes_once_stable(serving: Serving):
    w = serving
    first_rollout(w)
    owner = w.cluster.get("Deployment", "chat")["metadata"]["uid"]

    # The children, with the shape of the contract, valid Kubernetes (strict), owned by the Perennial Deployment.
    blue = w.deploy("chat-blue")
    assert blue["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "perennial-operator"
    pod = blue["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert pod["automountServiceAccountToken"] is False
    assert containers["engine"]["resources"]["limits"]["nvidia.com/gpu"] == 1  # vLLM: tensorParallelSize GPUs
    assert containers["engine"]["startupProbe"] and containers["sidecar"]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {p["name"]: p["containerPort"] for p in containers["sidecar"].get("ports", [])} == {"http": 8080, "admin": 9090}
    assert "ports" not in containers["engine"]
    args = containers["sidecar"]["args"]
    assert args[args.index("--store-uri") + 1] == str(w.cluster.config.feedback_store_uri).removeprefix("file://"), \
        "no `feedback.storeUri`: the operator's feedback store (ratings never stay in the pod's spool only)"
    assert [p["targetPort"] for p in w.service("chat")["spec"]["ports"]] == ["http"], "no Service exposes the admin port"
    token = {v["name"]: v for v in pod["volumes"]}["feedback-token"]["secret"]
    assert token["secretName"] == "chat-feedback-token"
    children = [blue, w.service("chat"), w.service("chat-preview"), w.kube.get("v1", "ConfigMap", NS, "chat-routes"),
                w.kube.get("policy/v1", "PodDisruptionBudget", NS, "chat-blue"), w.kube.get("v1", "Secret", NS, "chat-feedback-token")]
    for child in children:
        assert child is not None
        assert [r["uid"] for r in child["metadata"]["ownerReferences"]] == [owner], child["metadata"]
        validate_strict(child)
    assert w.deploy("chat-green") is None, "the first rollout brings up one color"
    routes = json.loads(w.kube.get("v1", "ConfigMap", NS, "chat-routes")["data"]["routes.json"])
    assert routes["routes"] == {"support": [{"adapter": "support-v1", "weight": 100}]} and routes["base"] == {"name": "base"}
    secret = base64.b64decode(w.kube.get("v1", "Secret", NS, "chat-feedback-token")["data"]["token"])
    assert len(secret) >= 32

    # The smoke test asked every served name through the preview Service before the first traffic.
    assert {"base", "support"} <= set(w.engines.models)
    # the local endpoint comes with the pass after the test's proxy annotated the stable Service (maybe a later write)
    wait_for(lambda: (w.status().get("regions") or [{}])[0].get("endpoint") == w.engines.url, message="the local endpoint in status")
    st = w.status()
    assert st["activeColor"] == "blue" and st["phase"] == "Stable" and st["readySummary"] == "2/2"
    assert st["servedAdapters"] == [{"name": "support", "adapter": "support-v1"}] and st["servedSummary"] == "support=support-v1"
    assert st["regions"][0]["name"] == "default" and st["regions"][0]["endpoint"] == w.engines.url
    assert st["observedGeneration"] == w.cluster.get("Deployment", "chat")["metadata"]["generation"]
    assert st["selector"] == "app.kubernetes.io/name=perennial-server,perennial.ai/deployment=chat,perennial.ai/region=default,perennial.ai/color=blue"
    reasons = wait_for(lambda: (r := w.reasons()) and "Switched" in " ".join(r) and r, message="Events")
    assert any("SmokeTestPassed" in r or "Switched" in r for r in reasons), reasons

    # Stable: children's changes (the controller-manager's, the proxy's) and a restart make no write.
    quiet(w.cluster)
    w.cluster.server.reset_request_counts()
    for i in range(3):
        w.kube.patch("apps/v1", "Deployment", NS, "chat-blue", {"status": {"conditions": [
            {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable", "lastUpdateTime": f"2026-01-01T00:00:0{i}Z"}]}},
            subresource="status")
        time.sleep(0.3)
    quiet(w.cluster)
    assert count(w.cluster, WRITES) == 0, w.cluster.server.request_counts()
    w.cluster.restart_operator()
    wait_for(lambda: count(w.cluster, ("list",)) >= 10, message="every watched resource listed again")
    quiet(w.cluster)
    assert count(w.cluster, WRITES) == 0, w.cluster.server.request_counts()
    assert base64.b64decode(w.kube.get("v1", "Secret", NS, "chat-feedback-token")["data"]["token"]) == secret, "the token is never rewritten"


NETPOLS = "networking.k8s.io/networkpolicies"


def netpol_requests(cluster: Any) -> dict[str, int]:
    """The operator's requests to NetworkPolicies by verb, its listing and watching apart."""
    from test_controller_pattern import OPERATOR

    out: dict[str, int] = collections.Counter()
    for r in cluster.server.request_counts()["requests"]:
        if r["client"] in OPERATOR and r["resource"] == NETPOLS and r["verb"] not in ("list", "watch"):
            out[r["verb"]] += r["count"]
    return dict(out)


def test_the_serving_network_policy_is_watched_and_never_written_or_read_again_once_converged(serving: Serving):
    """Every real API server serves NetworkPolicies (so does the embedded one, defaulting them as kube-apiserver
    does). The serving pods' policy is made once; then several resyncs and an operator restart send no create (a
    409), no GET after it, no patch: the operator knows it from its watch, like every other child."""
    w = serving
    first_rollout(w)
    policy = wait_for(lambda: w.kube.get("networking.k8s.io/v1", "NetworkPolicy", NS, "chat-serving"), message="NetworkPolicy")
    assert policy["metadata"]["ownerReferences"][0]["uid"] == w.cluster.get("Deployment", "chat")["metadata"]["uid"]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert all(p.get("protocol") for rule in policy["spec"]["ingress"] for p in rule.get("ports") or [])
    validate_strict(policy)
    cache = w.managers[-1].cache
    wait_for(lambda: cache.get("networking.k8s.io/v1", "NetworkPolicy", NS, "chat-serving"), message="the operator's watch has it")

    quiet(w.cluster)
    w.cluster.server.reset_request_counts()
    for i in range(3):  # resyncs: the Deployment reconciles again at each change of its children
        w.kube.patch("apps/v1", "Deployment", NS, "chat-blue", {"status": {"conditions": [
            {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable", "lastUpdateTime": f"2026-01-01T00:01:0{i}Z"}]}},
            subresource="status")
        time.sleep(0.3)
    quiet(w.cluster)
    assert netpol_requests(w.cluster) == {}, w.cluster.server.request_counts()
    assert count(w.cluster, WRITES) == 0, w.cluster.server.request_counts()
    for _ in range(2):
        w.cluster.restart_operator()
        wait_for(lambda: count(w.cluster, ("list",), NETPOLS) >= 1, message="NetworkPolicies listed again")
        wait_for(lambda: count(w.cluster, ("list",)) >= 10, message="every watched resource listed again")
        quiet(w.cluster)
        assert netpol_requests(w.cluster) == {}, w.cluster.server.request_counts()
        assert count(w.cluster, WRITES) == 0, w.cluster.server.request_counts()
        w.cluster.server.reset_request_counts()

    # Drift is still brought back (from the watch: the cached policy differs), with one patch and no read.
    w.kube.patch("networking.k8s.io/v1", "NetworkPolicy", NS, "chat-serving", {"spec": {"ingress": [{}]}})
    wait_for(lambda: len(w.kube.get("networking.k8s.io/v1", "NetworkPolicy", NS, "chat-serving")["spec"]["ingress"]) >= 2,
             message="the policy's ingress brought back")
    quiet(w.cluster)
    assert netpol_requests(w.cluster) == {"patch": 1}, w.cluster.server.request_counts()


@contextlib.contextmanager
def counted_first_rollout(w: Serving) -> Iterator[Sidecars]:
    """A first rollout of `chat` with the control plane's request counts reset just before it (the preview Service
    proxied); yields the sidecars that answer for its pods."""
    sidecars = Sidecars(w.kube, "chat-routes")
    try:
        quiet(w.cluster)
        w.cluster.server.reset_request_counts()
        w.cluster.create("Deployment", "chat", spec())
        w.proxied("chat-preview")
        yield sidecars
    finally:
        sidecars.close()


def test_first_rollout_write_budget_status_twice_at_most_and_nothing_after_the_switch(serving: Serving):
    """The writes to the Perennial Deployment itself (its status, its Events; children apart) of a first rollout: the
    status while the pods come up (a state a user must see: Progressing, FirstRollout), then serving -- what the
    serving pods applied (routes revision, served adapters) known in the pass that switched, not one write later."""
    w = serving
    with counted_first_rollout(w) as sidecars:
        run_pods(w, "chat-blue", w.deploy("chat-blue")["spec"]["replicas"], sidecars)
        w.ready("chat-blue")
        w.cluster.wait_condition("Deployment", "chat", "Progressing", "False", "RolloutComplete")
        quiet(w.cluster)
        st = w.status()
        assert st["regions"][0].get("routesRevision"), st
        assert st["servedAdapters"] == [{"name": "support", "adapter": "support-v1"}]
        status_writes = count(w.cluster, ("patch", "update"), "perennial.ai/deployments/status")
        events = count(w.cluster, ("create",), "events")
        assert status_writes <= 2, w.cluster.server.request_counts()
        assert status_writes + events <= 4, w.cluster.server.request_counts()


def test_a_first_rollout_whose_pods_take_long_shows_progressing_then_serving_never_ready_before_the_switch(serving: Serving):
    """Pods that take longer than a status batch: the Progressing state is written (a user must see it), Ready stays
    False until the switch; then one write of the serving status. Two status writes, an Event with each."""
    w = serving
    with counted_first_rollout(w) as sidecars:
        w.cluster.wait_condition("Deployment", "chat", "Progressing", "True", "FirstRollout")
        assert w.cluster.condition("Deployment", "chat", "Ready")["status"] == "False" and w.stable_color() is None
        run_pods(w, "chat-blue", w.deploy("chat-blue")["spec"]["replicas"], sidecars)
        w.ready("chat-blue")
        w.cluster.wait_condition("Deployment", "chat", "Progressing", "False", "RolloutComplete")
        assert w.stable_color() == "blue"
        quiet(w.cluster)
        assert count(w.cluster, ("patch", "update"), "perennial.ai/deployments/status") == 2, w.cluster.server.request_counts()
        assert count(w.cluster, ("create",), "events") == 2, w.cluster.server.request_counts()


@pytest.mark.parametrize("serving", ["clean", "faults"], indirect=True)
def test_pod_change_walks_preview_smoke_switch_delay_scale_down_and_hpa_follows(serving: Serving):
    w = serving
    first_rollout(w, autoscaling={"enabled": True, "provider": "HPA", "minReplicas": 2, "maxReplicas": 4})
    hpa = w.kube.get("autoscaling/v2", "HorizontalPodAutoscaler", NS, "chat")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "chat-blue"
    validate_strict(hpa)
    old = change_pods(w)

    # Preview: green at previewReplicas with the new revision; blue keeps the traffic.
    green = wait_for(lambda: (d := w.deploy("chat-green")) and d, message="preview green")
    new = green["metadata"]["labels"]["perennial.ai/revision"]
    assert new != old and green["spec"]["replicas"] == 1
    w.cluster.wait_condition("Deployment", "chat", "Progressing", "True", "PreviewProgressing")
    st = w.status()
    assert st["regions"][0]["previewColor"] == "green" and st["regions"][0]["previewRevision"] == new
    assert w.stable_color() == "blue" and w.deploy("chat-blue")["metadata"]["labels"]["perennial.ai/revision"] == old

    # Every preview pod ready -> smoke -> scaled to the full count before the switch.
    w.proxied("chat-preview")
    w.engines.models.clear()
    w.ready("chat-green")
    wait_for(lambda: w.deploy("chat-green")["spec"]["replicas"] == 2, message="the preview scaled to the full count")
    assert w.stable_color() == "blue", "never a switch before the preview has its full count ready"
    assert {"base", "support"} <= set(w.engines.models)
    w.ready("chat-green", ready=1)  # one of two ready: still no switch
    time.sleep(0.5)
    assert w.stable_color() == "blue"
    w.ready("chat-green")

    # Switch; the old color kept for the delay, then scaled to zero; the HPA follows the active color.
    wait_for(lambda: w.stable_color() == "green", message="switched to green")
    assert w.deploy("chat-green")["status"]["readyReplicas"] == 2
    assert SWITCHED_AT_ANNOTATION in w.service("chat")["metadata"]["annotations"]
    wait_for(lambda: w.kube.get("autoscaling/v2", "HorizontalPodAutoscaler", NS, "chat")["spec"]["scaleTargetRef"]["name"] == "chat-green",
             message="the HPA follows the active color")
    wait_for(lambda: w.deploy("chat-blue")["spec"]["replicas"] == 0, message="old color scaled to zero after the delay")
    assert SCALE_DOWN_AT_ANNOTATION not in (w.deploy("chat-blue")["metadata"].get("annotations") or {})
    w.cluster.wait_condition("Deployment", "chat", "Progressing", "False", "RolloutComplete")
    st = w.status()
    assert st["activeColor"] == "green" and st["revision"] == new and st["phase"] == "Stable"
    reasons = wait_for(lambda: (r := w.reasons()) and "ScaledDown" in " ".join(r) and r, message="Events of every step")
    text = " ".join(reasons)
    for step in ("PreviewCreated", "PreviewScalingUp", "Switched", "ScaledDown"):
        assert step in text, reasons
    assert len(w.kube.list("apps/v1", "Deployment", NS, "perennial.ai/deployment=chat")) == 2
    # Autoscaling turned off: the HPA goes (it would keep resizing the active color), the spec's count applies.
    w.kube.patch(API, "Deployment", NS, "chat", {"spec": {"autoscaling": {"enabled": False}, "replicas": 3}})
    wait_for(lambda: w.kube.get("autoscaling/v2", "HorizontalPodAutoscaler", NS, "chat") is None, message="the HPA deleted")
    wait_for(lambda: w.deploy("chat-green")["spec"]["replicas"] == 3, message="the active color at the spec's count")
    w.ready("chat-green")
    wait_for(lambda: w.status().get("readySummary") == "3/3", message="the status of the new count (written within its batch)")
    w.cluster.wait_condition("Deployment", "chat", "Progressing", "False", "RolloutComplete")
    # Stable again: a restart writes nothing (the HPA, the colors and Services as the control plane defaulted them).
    quiet(w.cluster)
    w.cluster.server.reset_request_counts()
    w.cluster.restart_operator()
    wait_for(lambda: count(w.cluster, ("list",)) >= 10, message="every watched resource listed again")
    quiet(w.cluster)
    assert count(w.cluster, WRITES) == 0, w.cluster.server.request_counts()


def test_the_smoke_test_asks_the_preview_pods_only_once_they_applied_the_routes_it_asks_about(serving: Serving):
    # The routes ConfigMap names an adapter the preview's pods have not applied yet (a ConfigMap volume is
    # refreshed up to a minute later in a cluster; the sidecar reads it every few seconds): the smoke test waits
    # for them instead of failing the rollout on the sidecar's 404 for that name (it did: the revision aborted for good).
    w = serving
    w.cluster.create("Deployment", "chat", spec())
    w.proxied("chat-preview")
    sidecars = Sidecars(w.kube, "chat-routes")
    try:
        sidecars.frozen = "the-routes-the-pods-started-with"
        w.engines.known = {"base"}
        wait_for(lambda: w.deploy("chat-blue"), message="the first color")
        run_pods(w, "chat-blue", 1, sidecars)
        w.ready("chat-blue")
        wait_for(lambda: sidecars.reads >= 2, timeout=30, message="the controller asked the preview pods what they applied")
        assert "support" not in w.engines.models, w.engines.models
        assert w.status().get("phase") != "Aborted" and not [r for r in w.reasons() if "SmokeTestFailed" in r], w.reasons()
        sidecars.frozen, w.engines.known = None, None  # the pods applied the routes
        wait_for(lambda: w.stable_color() == "blue", timeout=30, message="smoke-tested, then switched")
        assert "support" in w.engines.models
        w.proxied("chat")
        w.cluster.wait_condition("Deployment", "chat", "Ready", "True", "Serving")
    finally:
        sidecars.close()


@pytest.mark.parametrize("cause", ["smoke", "deadline"])
def test_failed_smoke_or_exceeded_deadline_aborts_with_the_active_color_untouched(serving: Serving, cause: str):
    w = serving
    first_rollout(w)
    change_pods(w)
    green = wait_for(lambda: w.deploy("chat-green"), message="preview green")
    new = green["metadata"]["labels"]["perennial.ai/revision"]
    blue_before = w.deploy("chat-blue")
    if cause == "smoke":
        w.engines.status = 500
        w.ready("chat-green")
    else:
        w.deadline_exceeded("chat-green")
    c = w.cluster.wait_condition("Deployment", "chat", "Degraded", "True", "RolloutAborted")
    assert new in c["message"] and ("SmokeTestFailed" if cause == "smoke" else "ProgressDeadlineExceeded") in c["message"]
    assert w.cluster.condition("Deployment", "chat", "Ready")["status"] == "True"
    assert w.stable_color() == "blue"
    blue = w.deploy("chat-blue")
    assert blue["spec"] == blue_before["spec"] and blue["metadata"]["labels"] == blue_before["metadata"]["labels"]
    wait_for(lambda: w.deploy("chat-green")["spec"]["replicas"] == 0, message="the aborted preview scaled to zero after its delay")
    assert w.deploy("chat-green")["metadata"]["annotations"][ABORTED_REVISION_ANNOTATION] == new
    assert w.status()["phase"] == "Aborted"
    wait_for(lambda: [e for e in w.cluster.events("chat") if e["type"] == "Warning" and "Aborted" in e["reason"] + e["message"]], message="a Warning Event")
    # Not retried while the spec asks for that revision, also after a restart.
    quiet(w.cluster)
    w.cluster.restart_operator()
    quiet(w.cluster)
    assert w.deploy("chat-green")["spec"]["replicas"] == 0 and w.stable_color() == "blue"


@pytest.mark.parametrize("serving", ["clean", "faults"], indirect=True)
def test_operator_restarted_mid_rollout_converges_without_duplicates(serving: Serving):
    """The operator stops at two points of a rollout (after starting the preview; after scaling it up) while the
    world moves on; each time the restarted one resumes from the children, never duplicating one."""
    w = serving
    first_rollout(w)
    change_pods(w)
    wait_for(lambda: w.deploy("chat-green"), message="preview green")
    w.cluster.stop_operator()
    w.ready("chat-green")  # the preview came up while no operator ran (the preview Service is still proxied)
    w.cluster.start_operator()
    wait_for(lambda: w.deploy("chat-green")["spec"]["replicas"] == 2, message="the preview scaled to the full count")
    assert w.stable_color() == "blue"
    w.cluster.stop_operator()
    w.ready("chat-green")
    w.cluster.start_operator()
    wait_for(lambda: w.stable_color() == "green", message="switched to green")
    wait_for(lambda: w.deploy("chat-blue")["spec"]["replicas"] == 0, message="old color scaled to zero")
    w.cluster.wait_condition("Deployment", "chat", "Progressing", "False", "RolloutComplete")
    assert w.cluster.condition("Deployment", "chat", "Ready")["status"] == "True"
    found = {kind: len(w.kube.list(api, kind, NS, "perennial.ai/deployment=chat"))
             for api, kind in (("apps/v1", "Deployment"), ("v1", "Service"), ("policy/v1", "PodDisruptionBudget"), ("v1", "ConfigMap"))}
    assert found == {"Deployment": 2, "Service": 2, "PodDisruptionBudget": 2, "ConfigMap": 1}, found
    assert len([e for e in w.cluster.events("chat") if e["reason"] == "Switched" or e["message"].startswith("The stable Service now selects green")]) <= 2


def test_keda_without_its_crd_is_reported_and_delays_nothing(serving: Serving, monkeypatch: pytest.MonkeyPatch):
    """KEDA is not installed on the embedded control plane: its ScaledObjects are not served. The manager does not
    wait for a listing that never comes (the timeout is raised here so that waiting would fail the test)."""
    from perennial.controllers import manager

    monkeypatch.setattr(manager, "READY_TIMEOUT_SECONDS", 3600.0)
    w = serving
    w.cluster.restart_operator()
    w.cluster.create("Deployment", "scaled", spec(autoscaling={"enabled": True, "provider": "KEDA", "minReplicas": 1, "maxReplicas": 3,
                                                               "metric": "QueueLength", "prometheusAddress": "http://prometheus:9090"}))
    w.proxied("scaled-preview")
    w.ready("scaled-blue")
    c = w.cluster.wait_condition("Deployment", "scaled", "Degraded", "True", "KEDANotInstalled")
    assert "install KEDA" in c["message"]
    assert w.cluster.condition("Deployment", "scaled", "Ready")["status"] == "True"


def test_adapter_change_in_place_loads_next_to_the_old_then_moves_the_name(serving: Serving, tmp_path: Path):
    """A served name moves to another Adapter without new pods: loaded next to the old one under `support-preview`,
    smoke-tested once every ready pod applied it, moved, the old one unloaded after the delay."""
    w = serving
    s = spec()
    s["strategy"]["adapterRollout"] = {"unloadDelaySeconds": 5}
    first_rollout(w, strategy=s["strategy"])
    sidecars = Sidecars(w.kube, "chat-routes")
    try:
        run_pods(w, "chat-blue", 2, sidecars)
        blue_before = w.deploy("chat-blue")
        artifact = tmp_path / "artifacts" / "support-v2"
        artifact.mkdir(parents=True)
        (artifact / "adapter_config.json").write_text("{}")
        w.cluster.create("Adapter", "support-v2", {"baseModelRef": {"name": "base"}, "family": "support", "version": 2,
                                                   "artifactUri": f"file://{artifact}", "lora": {"rank": 8}})
        w.cluster.wait_condition("Adapter", "support-v2", "Ready", "True")
        sidecars.frozen = json.loads(w.kube.get("v1", "ConfigMap", NS, "chat-routes")["data"]["routes.json"])["revision"]
        w.engines.models.clear()
        w.kube.patch(API, "Deployment", NS, "chat", {"spec": {"adapters": [{"name": "support", "adapterRef": {"name": "support-v2"}}]}})

        def routes() -> dict[str, Any]:
            return json.loads(w.kube.get("v1", "ConfigMap", NS, "chat-routes")["data"]["routes.json"])

        # Loaded next to the old one under the preview name; the served name keeps the old adapter.
        doc = wait_for(lambda: (r := routes()) and "support-preview" in r["routes"] and r, message="the preview route")
        assert doc["routes"]["support"] == [{"adapter": "support-v1", "weight": 100}]
        assert doc["routes"]["support-preview"] == [{"adapter": "support-v2", "weight": 100}]
        assert set(doc["adapters"]) == {"support-v1", "support-v2"}
        # No smoke test and no move while the pods have not applied it (they are polled, time is the trigger).
        wait_for(lambda: sidecars.reads >= 4, message="the sidecars polled")
        assert "support-preview" not in w.engines.models and routes()["routes"]["support"][0]["adapter"] == "support-v1"
        sidecars.frozen = None
        wait_for(lambda: routes()["routes"].get("support") == [{"adapter": "support-v2", "weight": 100}], message="the name moved")
        assert "support-preview" in w.engines.models, "smoke-tested under the preview name through the stable Service"
        assert set(routes()["adapters"]) == {"support-v1", "support-v2"}, "the old adapter stays loaded for the delay (rollback)"
        wait_for(lambda: w.status().get("phase") == "ScalingDown", message="the unload delay shown as ScalingDown")
        wait_for(lambda: set(routes()["adapters"]) == {"support-v2"}, message="the old adapter unloaded after the delay")
        assert "support-preview" not in routes()["routes"]
        w.cluster.wait_condition("Deployment", "chat", "Progressing", "False", "RolloutComplete")
        st = w.status()
        assert st["servedAdapters"] == [{"name": "support", "adapter": "support-v2"}]
        # the revision every ready pod serves (read from the sidecars, polled until they applied the last change)
        wait_for(lambda: w.status()["regions"][0].get("routesRevision") == routes()["revision"], message="routesRevision")
        # No new pods: the colors are as they were.
        blue = w.deploy("chat-blue")
        assert blue["spec"] == blue_before["spec"] and w.deploy("chat-green") is None
        # Events are posted after the status writes that note them
        wait_for(lambda: all(step in " ".join(w.reasons()) for step in ("PreviewCreated", "SmokeTestPassed", "Switched", "AdapterUnloaded")),
                 message="the rollout's Events")
    finally:
        sidecars.close()


def test_manual_promotion_then_automatic_rollback_within_the_window(serving: Serving):
    """`autoPromote: false` waits for `perennial.ai/promote: <revision>`; after the switch, the new color losing its
    ready replicas within the post-promotion window switches traffic back to the old color."""
    w = serving
    s = spec()
    s["strategy"]["blueGreen"].update({"autoPromote": False, "scaleDownDelaySeconds": 600, "previewReplicas": 2})
    first_rollout(w, strategy=s["strategy"])
    change_pods(w)
    green = wait_for(lambda: w.deploy("chat-green"), message="preview green")
    new = green["metadata"]["labels"]["perennial.ai/revision"]
    w.ready("chat-green")
    wait_for(lambda: w.status()["regions"][0].get("pendingPromotion") == new, message="waiting for a promotion")
    assert w.status()["phase"] == "Paused" and w.cluster.condition("Deployment", "chat", "Progressing")["reason"] == "WaitingForPromotion"
    quiet(w.cluster)
    assert w.stable_color() == "blue"
    w.kube.patch(API, "Deployment", NS, "chat", {"metadata": {"annotations": {"perennial.ai/promote": new}}})
    wait_for(lambda: w.stable_color() == "green", message="promoted")
    assert w.deploy("chat-blue")["spec"]["replicas"] == 2, "the old color is kept for rollback"

    w.ready("chat-green", ready=0)  # the new color loses its pods within the window
    wait_for(lambda: w.stable_color() == "blue", message="rolled back to blue")
    # RolledBack, then (the next pass) reported as the aborted rollout it is, the cause kept
    c = wait_for(lambda: (x := w.cluster.condition("Deployment", "chat", "Degraded")) and x["status"] == "True" and "RolledBack" in x["reason"] + x["message"] and x,
                 message="Degraded naming the rollback")
    assert "green" in c["message"]
    assert wait_for(lambda: any(r.startswith("RolledBack") and "Switched back to blue" in r for r in w.reasons()), message="RolledBack Event")
    assert w.cluster.condition("Deployment", "chat", "Ready")["status"] == "True"
    assert w.status()["activeColor"] == "blue"
    wait_for(lambda: w.deploy("chat-green")["metadata"]["annotations"].get(ABORTED_REVISION_ANNOTATION) == new, message="not retried")


def test_node_pool_regions_roll_out_one_after_the_other(serving: Serving):
    """Two regions in this cluster (node pools): children per region (`<name>-<region>-<color>`), a status per region;
    with `regionOrder: Sequential` the second region's pod rollout starts once the first one switched."""
    w = serving
    regions = [{"name": "eu", "nodeSelector": {"topology.kubernetes.io/region": "eu"}},
               {"name": "us", "nodeSelector": {"topology.kubernetes.io/region": "us"}, "replicas": 1}]
    w.cluster.create("Deployment", "chat", spec(regions=regions))
    for r in ("eu", "us"):  # first rollouts: nothing serves yet, no region waits
        w.proxied(f"chat-{r}-preview")
        w.ready(f"chat-{r}-blue")
    wait_for(lambda: w.stable_color("chat-eu") == "blue" and w.stable_color("chat-us") == "blue", message="both regions serve")
    w.cluster.wait_condition("Deployment", "chat", "Ready", "True")
    us = w.deploy("chat-us-blue")
    assert us["spec"]["replicas"] == 1 and us["spec"]["template"]["spec"]["nodeSelector"] == {"topology.kubernetes.io/region": "us"}
    st = w.status()
    assert [r["name"] for r in st["regions"]] == ["eu", "us"] and st["readySummary"] == "3/3"

    change_pods(w)
    wait_for(lambda: w.deploy("chat-eu-green"), message="eu's preview")
    c = w.cluster.wait_condition("Deployment", "chat", "Progressing", "True")
    wait_for(lambda: (r := w.status()["regions"][1]) and r["phase"] == "Paused" and "eu" in r.get("message", ""), message="us waits for eu")
    assert w.deploy("chat-us-green") is None, c
    w.ready("chat-eu-green")
    wait_for(lambda: w.deploy("chat-eu-green")["spec"]["replicas"] == 2, message="eu's preview at the full count")
    assert w.deploy("chat-us-green") is None, "us starts only once eu switched"
    w.ready("chat-eu-green")
    wait_for(lambda: w.stable_color("chat-eu") == "green", message="eu switched")
    wait_for(lambda: w.deploy("chat-us-green"), message="us's preview starts after eu switched")
    w.ready("chat-us-green")
    wait_for(lambda: w.stable_color("chat-us") == "green", message="us switched")
    w.cluster.wait_condition("Deployment", "chat", "Progressing", "False", "RolloutComplete")


def test_local_runtime_serves_and_switches_colors_with_no_failed_request(tmp_path: Path):
    """End to end on one machine: the operator's children run in the local runtime (apps/v1 controller-manager, pods
    as processes with the real sidecar in front of a stand-in engine, Services on local ports); a client loop through
    the stable Service's local URL runs across a blue-green switch and counts errors: none."""
    import sys
    import urllib.request

    from perennial.local.cluster import LocalCluster
    from perennial.local.kubelet import DEFAULT_COMMANDS

    image = "perennial-server:e2e"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    entry = str(Path(__file__).with_name("serving_entry.py"))
    with running_cluster(tmp_path, server_image=image) as cluster:
        runtime = LocalCluster(cluster.kube, cluster.server, workdir=tmp_path / "pods", pvc_root=tmp_path / "pvc",
                               images={image: [sys.executable, entry]}, commands={**DEFAULT_COMMANDS, "perennial-server": [sys.executable, entry]},
                               pod_options={"restart_backoff_seconds": 0.5, "max_grace_seconds": 10}).start()
        try:
            cluster.create("BaseModel", "base", {"source": {"uri": f"file://{model}"}})
            cluster.wait_condition("BaseModel", "base", "Ready", "True")
            cluster.create("Deployment", "chat", {
                "baseModelRef": {"name": "base"}, "engine": {"type": "Transformers"}, "replicas": 1,
                "strategy": {"blueGreen": {"scaleDownDelaySeconds": 2, "smokeTest": {"expectRegex": "hello from chat-", "timeoutSeconds": 20}}}})
            cluster.wait_condition("Deployment", "chat", "Ready", "True", timeout=120)
            # the endpoint: where the local runtime proxies the stable Service (once its proxy annotated it)
            url = wait_for(lambda: (e := cluster.get("Deployment", "chat")["status"].get("endpoint", "")).startswith("http://127.0.0.1:") and e,
                           message="the local endpoint in status")

            def ask() -> str:
                req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps({"model": "base", "messages": [
                    {"role": "user", "content": "hi"}]}).encode(), headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=20) as resp:
                    return json.loads(resp.read())["choices"][0]["message"]["content"]

            first = ask()
            assert first.startswith("hello from chat-blue-"), first
            answers: list[str] = []
            errors: list[str] = []
            stop = threading.Event()

            def loop() -> None:
                while not stop.is_set():
                    try:
                        answers.append(ask())
                    except Exception as exc:  # noqa: BLE001 - every failure counts
                        errors.append(repr(exc))
                    time.sleep(0.05)

            client = threading.Thread(target=loop, daemon=True)
            client.start()
            cluster.kube.patch(API, "Deployment", NS, "chat", {"spec": {"engine": {"extraArgs": ["--dtype", "float32"]}}})
            wait_for(lambda: (cluster.get("Deployment", "chat")["status"].get("activeColor") == "green"), timeout=120, message="switched to green")
            wait_for(lambda: any(a.startswith("hello from chat-green-") for a in answers), timeout=30, message="answers from green")
            wait_for(lambda: (cluster.kube.get("apps/v1", "Deployment", NS, "chat-blue")["status"].get("replicas") or 0) == 0, timeout=60,
                     message="blue scaled to zero")
            time.sleep(0.5)
            stop.set()
            client.join(30)
            assert not errors, errors[:5]
            assert answers[-1].startswith("hello from chat-green-")
        finally:
            runtime.stop()


def test_paused_holds_a_rollout_and_deletion_takes_the_children(serving: Serving):
    w = serving
    first_rollout(w)
    w.kube.patch(API, "Deployment", NS, "chat", {"spec": {"paused": True, "engine": {"extraArgs": ["--enforce-eager"]}}})
    c = w.cluster.wait_condition("Deployment", "chat", "Progressing", "Unknown", "RolloutPaused")
    assert "paused" in c["message"] and w.status()["phase"] == "Paused"
    quiet(w.cluster)
    assert w.deploy("chat-green") is None and w.stable_color() == "blue"
    w.kube.patch(API, "Deployment", NS, "chat", {"spec": {"paused": False}})
    wait_for(lambda: w.deploy("chat-green"), message="the rollout goes on once unpaused")
    w.kube.delete(API, "Deployment", NS, "chat")
    for api, kind in (("apps/v1", "Deployment"), ("v1", "Service"), ("policy/v1", "PodDisruptionBudget"), ("v1", "ConfigMap"), ("v1", "Secret")):
        wait_for(lambda api=api, kind=kind: not w.kube.list(api, kind, NS, "perennial.ai/deployment=chat"), message=f"{kind}s collected")


def test_an_adapter_that_does_not_fit_the_engine_is_refused_with_a_condition(serving: Serving, tmp_path: Path):
    w = serving
    artifact = tmp_path / "artifacts" / "wide"
    artifact.mkdir(parents=True)
    (artifact / "adapter_config.json").write_text("{}")
    w.cluster.create("Adapter", "wide-v1", {"baseModelRef": {"name": "base"}, "family": "wide", "version": 1,
                                             "artifactUri": f"file://{artifact}", "lora": {"rank": 128}})
    w.cluster.wait_condition("Adapter", "wide-v1", "Ready", "True")
    first_rollout(w, adapters=[{"name": "support", "adapterRef": {"name": "support-v1"}}, {"name": "wide", "adapterRef": {"name": "wide-v1"}}],
                  engine={"maxLoraRank": 64})
    c = w.cluster.wait_condition("Deployment", "chat", "Degraded", "True", "AdapterRankTooHigh")
    assert "wide-v1" in c["message"] and "128" in c["message"]
    routes = json.loads(w.kube.get("v1", "ConfigMap", NS, "chat-routes")["data"]["routes.json"])
    assert set(routes["routes"]) == {"support"} and "wide-v1" not in routes["adapters"], "never loaded"
    assert w.cluster.condition("Deployment", "chat", "Ready")["status"] == "True"


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("serving", ["clean", "faults"], indirect=True)
def test_operator_killed_at_random_points_of_a_rollout_converges_and_always_serves(serving: Serving, seed: int):
    """The operator is stopped and started at random points while the test plays the controller-manager (each color's
    status follows its spec after a while): the rollout converges, no child is duplicated, and at every look the
    stable Service selects a color with ready replicas."""
    import random

    w = serving
    rng = random.Random(seed)
    first_rollout(w)
    change_pods(w)

    def sync(color: str) -> None:
        d = w.deploy(f"chat-{color}")
        if d is None:
            return
        st = d.get("status") or {}
        n = d["spec"].get("replicas", 1)
        if st.get("observedGeneration") != d["metadata"]["generation"] or st.get("readyReplicas") != n or st.get("replicas") != n:
            w.ready(f"chat-{color}")

    def serving_now() -> None:
        color = w.stable_color()
        d = w.deploy(f"chat-{color}")
        assert d["spec"]["replicas"] > 0 and (d.get("status") or {}).get("readyReplicas", 0) > 0, (color, d["spec"], d.get("status"))

    restarts = 0
    deadline = time.monotonic() + 90
    while True:
        assert time.monotonic() < deadline, w.status()
        serving_now()
        if restarts == 0 or (rng.random() < 0.35 and restarts < 4):
            w.cluster.stop_operator()
            restarts += 1
            if rng.random() < 0.5:
                sync(rng.choice(["blue", "green"]))  # the world moves while no operator runs
            w.cluster.start_operator()
        time.sleep(rng.uniform(0.05, 0.6))
        for color in ("blue", "green"):
            if rng.random() < 0.5:
                sync(color)
        st = w.status()
        conds = {c["type"]: c for c in st.get("conditions") or []}
        blue = w.deploy("chat-blue")
        if (st.get("activeColor") == "green" and conds.get("Progressing", {}).get("reason") == "RolloutComplete"
                and blue["spec"]["replicas"] == 0 and w.stable_color() == "green"):
            break
    serving_now()
    found = {kind: len(w.kube.list(api, kind, NS, "perennial.ai/deployment=chat"))
             for api, kind in (("apps/v1", "Deployment"), ("v1", "Service"), ("policy/v1", "PodDisruptionBudget"), ("v1", "ConfigMap"))}
    assert found == {"Deployment": 2, "Service": 2, "PodDisruptionBudget": 2, "ConfigMap": 1}, found


def test_a_child_name_taken_by_a_users_object_is_a_condition_and_the_rest_still_applies(serving: Serving):
    """A user's ConfigMap that bears the routes ConfigMap's name is never taken over: the Deployment says so
    (`Degraded`/`ChildConflict` naming it, a Warning Event) and its other children are still created."""
    w = serving
    w.kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "chat-routes", "namespace": NS}, "data": {"mine": "yes"}})
    w.cluster.create("Deployment", "chat", spec())
    c = w.cluster.wait_condition("Deployment", "chat", "Degraded", "True", "ChildConflict")
    assert "chat-routes" in c["message"] and "not Perennial's" in c["message"]
    wait_for(lambda: w.deploy("chat-blue"), message="the other children are applied")
    assert w.kube.get("v1", "ConfigMap", NS, "chat-routes")["data"] == {"mine": "yes"}, "the user's object is left as it is"
    wait_for(lambda: any(r.startswith("ChildConflict") for r in w.reasons()), message="a Warning Event names the conflict")
    w.kube.delete("v1", "ConfigMap", NS, "chat-routes")
    w.cluster.wait_condition("Deployment", "chat", "Degraded", "False", timeout=60)
    routes = w.kube.get("v1", "ConfigMap", NS, "chat-routes")
    assert routes["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "perennial-operator" and "routes.json" in routes["data"]


def test_two_node_pool_regions_become_one_and_the_old_childrens_names_go_once_the_new_serve(serving: Serving):
    """Two regions in this cluster become one: the children's names lose their region infix, so the one region's
    children are new (`chat-*`); the old ones (`chat-eu-*`, `chat-us-*`) keep serving until the new ones do, then go."""
    w = serving
    regions = [{"name": "eu"}, {"name": "us"}]
    w.cluster.create("Deployment", "chat", spec(regions=regions))
    for r in ("eu", "us"):
        w.proxied(f"chat-{r}-preview")
        w.ready(f"chat-{r}-blue")
    w.cluster.wait_condition("Deployment", "chat", "Ready", "True")
    old = {(k, o["metadata"]["name"]) for a, k in (("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ConfigMap"), ("policy/v1", "PodDisruptionBudget"))
           for o in w.kube.list(a, k, NS, "perennial.ai/deployment=chat")}
    assert ("Deployment", "chat-us-blue") in old and ("Service", "chat-eu") in old

    w.kube.patch(API, "Deployment", NS, "chat", {"spec": {"regions": [{"name": "eu"}]}})
    w.proxied("chat-preview")
    assert w.deploy("chat-eu-blue") is not None and w.stable_color("chat-eu") == "blue", "the old region serves until the new one does"
    w.ready("chat-blue")
    wait_for(lambda: w.stable_color("chat") == "blue", message="the one region serves under its new names")
    for kind, name in sorted(old):
        api = {"Deployment": "apps/v1", "Service": "v1", "ConfigMap": "v1", "PodDisruptionBudget": "policy/v1"}[kind]
        wait_for(lambda api=api, kind=kind, name=name: w.kube.get(api, kind, NS, name) is None, message=f"{kind} {name} pruned")
    assert w.kube.get("v1", "Secret", NS, "chat-feedback-token") is not None, "the token is the Deployment's, not a region's"
    wait_for(lambda: [r["name"] for r in w.status()["regions"]] == ["eu"], message="the status has the one region")


def test_naming_the_region_keeps_traffic_on_the_serving_pods_and_later_rollouts_go_through(serving: Serving):
    """A Deployment without `regions` serves as region `default`; naming its region (e.g. to add one in another
    cluster) changes its pods' region label, so a new revision rolls out blue-green. Meanwhile the stable Service must
    keep selecting the pods that serve (a selector built for the new label selects none: an outage until the switch),
    and the color left at the old label (whose apps/v1 selector is immutable) must not block the next rollout."""
    w = serving
    first_rollout(w)

    def selects(service: str, deployment: str) -> bool:
        selector = (w.service(service) or {}).get("spec", {}).get("selector") or {}
        labels = w.deploy(deployment)["spec"]["template"]["metadata"]["labels"]
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    w.kube.patch(API, "Deployment", NS, "chat", {"spec": {"regions": [{"name": "home"}]}})
    generation = w.cluster.get("Deployment", "chat")["metadata"]["generation"]
    wait_for(lambda: w.status().get("observedGeneration") == generation, message="the change is observed")
    wait_for(lambda: w.deploy("chat-green"), message="the new revision's color")
    assert w.stable_color() == "blue" and selects("chat", "chat-blue"), (w.service("chat")["spec"], "the serving pods lost their traffic")

    def switched(color: str) -> bool:
        w.ready(f"chat-{color}")  # every replica asked for (the preview scales up before the switch) is ready
        return w.stable_color() == color

    wait_for(lambda: switched("green"), timeout=60, interval=0.5, message="switched to the new revision")
    assert selects("chat", "chat-green")
    wait_for(lambda: w.deploy("chat-blue")["spec"]["replicas"] == 0, message="the old color scaled down")

    before = change_pods(w)

    def next_revision(d: dict[str, Any] | None) -> bool:
        return bool(d) and d["metadata"]["labels"].get("perennial.ai/revision") not in (None, before) and d["spec"].get("replicas", 0) > 0

    wait_for(lambda: next_revision(w.deploy("chat-blue")), timeout=60, message="the old color brought to the next revision")
    wait_for(lambda: switched("blue"), timeout=60, interval=0.5, message="the next rollout switched")
    assert selects("chat", "chat-blue") and w.deploy("chat-blue")["spec"]["selector"]["matchLabels"]["perennial.ai/region"] == "home"
    w.cluster.wait_condition("Deployment", "chat", "Ready", "True", "Serving")


def test_a_deployment_named_as_another_ones_label_value_is_refused_and_takes_nothing(serving: Serving):
    """Attack (review of the LeaderWorkerSet wiring): label values are at most 63 characters, so a longer Deployment
    name is shortened to 56 characters and a hash — itself a valid name. A second Deployment named exactly that
    would carry the first one's `perennial.ai/deployment` label: its pods (with an image of its own) would be
    selected by the first one's Services, be peers in its NetworkPolicy (all ports between a group's pods) and
    go with its children's removal by label. Before: it rolled out. Now the later one is refused (LabelConflict,
    a Warning Event), creates nothing, and the first one keeps serving."""
    from perennial.resources import deployment as build

    w = serving
    victim = "chat-" + "a" * 64
    w.cluster.create("Deployment", victim, spec())

    def owned_by(name: str) -> list[dict[str, Any]]:
        return [o for api, kind in (("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ConfigMap"), ("policy/v1", "PodDisruptionBudget"))
                for o in w.kube.list(api, kind, NS) if any(r.get("name") == name for r in o["metadata"].get("ownerReferences") or [])]

    wait_for(lambda: owned_by(victim), message="the first Deployment's children")
    attacker = build.label_value(victim)
    assert attacker != victim and len(attacker) <= 63
    w.cluster.create("Deployment", attacker, spec())
    w.cluster.wait_condition("Deployment", attacker, "Ready", "False", "LabelConflict")
    cond = next(c for c in w.cluster.get("Deployment", attacker)["status"]["conditions"] if c["type"] == "Ready")
    assert victim in cond["message"], cond
    wait_for(lambda: [e for e in w.kube.list("v1", "Event", NS) if e["involvedObject"]["name"] == attacker and e["reason"] == "LabelConflict"],
             message="the LabelConflict Event (posted after the status)")
    assert owned_by(attacker) == [], [o["metadata"]["name"] for o in owned_by(attacker)]
    first = w.cluster.wait_condition("Deployment", victim, "Ready", "False")  # its first rollout's status (its pods never come up here)
    assert first["reason"] != "LabelConflict", first
