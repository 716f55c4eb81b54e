"""A Perennial `Deployment` with a region in another cluster: two embedded control planes as hub and region.

The hub runs the operator (real kopf) and holds the region's kubeconfig Secret; the region is a second API server.
The test plays what each cluster's nodes would do: the apps/v1 controller-manager (ready replicas), the kubelet
(pods with a pod IP, Running and Ready) and the serving pods themselves (one small HTTP server answering chat
completions and `/perennial/routes`). The operator reaches the region's Services and pods only through the region
API server's proxy (`services/proxy`, `pods/proxy`), as it must across clusters.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import fault_config, proxy_service, record_managers
from harness import API, Cluster, running_cluster, wait_for
from perennial.kube import Kube, connect
from perennial.local.apiserver import ServerThread, new_token, start_in_thread
from perennial.local.tls import self_signed

NS = "default"
MANAGED = "app.kubernetes.io/managed-by=perennial-operator"


class Pods:
    """The serving pods of one cluster, as HTTP sees them: chat completions (every name, or failures) and what their
    sidecars applied (`GET /perennial/routes`: the routes ConfigMap's current document, read from `kube`)."""

    def __init__(self, kube: Kube, config_map: str) -> None:
        self.kube, self.config_map = kube, config_map
        self.answer_text = "Hello there."
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def reply(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append((self.command, self.path, dict(self.headers)))
                status, obj = outer.answer(self.command, self.path, body)
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
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        if path.startswith("/perennial/routes"):
            doc = json.loads(self.kube.get("v1", "ConfigMap", NS, self.config_map)["data"]["routes.json"])
            return 200, {"revision": doc["revision"], "loaded": sorted(doc["adapters"]), "errors": {}}
        model = json.loads(body or b"{}").get("model")
        return 200, {"object": "chat.completion", "model": model,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": self.answer_text}}]}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_pods(kube: Kube, deployment: str, pods: Pods, n: int = 1) -> None:
    """Play the ReplicaSet controller, the kubelet and the controller-manager: `n` ready pods of an apps/v1
    Deployment at pod IP 127.0.0.1 whose every container port is the fake pods' port, and its status ready."""
    d = wait_for(lambda: kube.get("apps/v1", "Deployment", NS, deployment), message=f"apps/v1 Deployment {deployment}")
    template = d["spec"]["template"]
    spec = json.loads(json.dumps(template["spec"]))
    for c in spec["containers"]:
        for p in c.get("ports") or []:
            p["containerPort"] = pods.port
    for i in range(n):
        name = f"{deployment}-7c9d4-{i}"
        if kube.get("v1", "Pod", NS, name) is None:
            kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": template["metadata"]["labels"]},
                         "spec": spec})
        kube.patch("v1", "Pod", NS, name, {"status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}, subresource="status")
    replicas = d["spec"].get("replicas", 1)
    status = {"observedGeneration": d["metadata"]["generation"], "replicas": replicas, "updatedReplicas": replicas,
              "readyReplicas": replicas, "availableReplicas": replicas}
    kube.patch("apps/v1", "Deployment", NS, deployment, {"status": status}, subresource="status")


class World:
    def __init__(self, hub: Cluster, region: ServerThread, region_kube: Kube, home: Pods, east: Pods, managers: list[Any]) -> None:
        self.hub, self.region, self.region_kube, self.home, self.east = hub, region, region_kube, home, east
        self.managers = managers  # the operator's (record_managers): their watch-fed cache

    def status(self) -> dict[str, Any]:
        return (self.hub.get("Deployment", "chat") or {}).get("status") or {}

    def region_status(self, name: str) -> dict[str, Any]:
        return next((r for r in self.status().get("regions") or [] if r["name"] == name), {})

    def condition(self, ctype: str) -> dict[str, Any]:
        return next((c for c in self.status().get("conditions") or [] if c["type"] == ctype), {})


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(params=["clean", "faults"])
def world(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """Hub and region; with "faults", both API servers fight back at the operator's requests (500s, 429s, 409s,
    slow answers, cut watches, 410s), and the region ends with no duplicate child."""
    faults = fault_config(seed=len(request.node.nodeid)) if request.param == "faults" else None
    managers = record_managers(monkeypatch)
    region = start_in_thread(token=new_token(), tls=self_signed())
    pods: list[Pods] = []
    worlds: list[World] = []
    try:
        region_kube = connect(server=region.url, token=region.token, ca_file=region.ca_file)
        if region_kube.get("v1", "Namespace", None, NS) is None:
            region_kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        region.set_faults(faults)  # the operator's requests only (by User-Agent); the test's own are never hit
        with running_cluster(tmp_path, faults=faults) as hub:
            kubeconfig = region.write_kubeconfig(tmp_path / "east.kubeconfig", namespace=NS).read_text()
            hub.kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "east-cluster", "namespace": NS},
                             "type": "Opaque", "data": {"kubeconfig": b64(kubeconfig)}})
            artifact = tmp_path / "artifacts" / "support-v1"
            artifact.mkdir(parents=True)
            (artifact / "adapter_config.json").write_text("{}")
            hub.create("BaseModel", "base", {"source": {"uri": "hf://org/model"}})
            hub.create("Adapter", "support-v1", {"baseModelRef": {"name": "base"}, "family": "support", "version": 1,
                                                 "artifactUri": "s3://models/support-v1", "lora": {"rank": 8}})
            hub.wait_condition("BaseModel", "base", "Ready", "True")
            pods = [Pods(hub.kube, "chat-routes"), Pods(region_kube, "chat-routes")]
            worlds.append(World(hub, region, region_kube, *pods, managers))
            yield worlds[0]
    finally:
        for p in pods:
            p.close()
        (worlds[0].region if worlds else region).stop()


SPEC: dict[str, Any] = {
    "baseModelRef": {"name": "base"},
    "replicas": 1,
    "regions": [{"name": "home"}, {"name": "east", "clusterSecretRef": {"name": "east-cluster"}}],
    "strategy": {"blueGreen": {"scaleDownDelaySeconds": 1, "abortScaleDownDelaySeconds": 1, "previewReplicas": 1,
                               "smokeTest": {"expectRegex": "(?i)hello", "timeoutSeconds": 10}}},
}


def serve_home(w: World) -> None:
    """The hub's own region (its only local one: its children's names have no region infix): the local runtime's
    Service URLs and its pods (the operator reaches them directly)."""
    kube = w.hub.kube

    def proxied(svc: str) -> None:
        proxy_service(kube, w.managers, NS, svc, f"http://127.0.0.1:{w.home.port}")

    proxied("chat-preview")
    run_pods(kube, "chat-blue", w.home)
    proxied("chat")


def test_children_land_in_the_region_a_lost_region_degrades_only_itself_and_converges_when_back(world: World):
    w = world
    w.hub.create("Deployment", "chat", SPEC)
    serve_home(w)
    run_pods(w.region_kube, "chat-blue", w.east)
    w.hub.wait_condition("Deployment", "chat", "Ready", "True", "Serving", timeout=60)

    # Children in the region: no ownerReference crosses clusters; labels say whose they are; the token is copied.
    kinds = (("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ConfigMap"), ("policy/v1", "PodDisruptionBudget"), ("v1", "Secret"))
    there = {(k, o["metadata"]["name"]) for a, k in kinds for o in w.region_kube.list(a, k, NS, MANAGED)}
    assert {("Deployment", "chat-blue"), ("Service", "chat"), ("Service", "chat-preview"), ("ConfigMap", "chat-routes"),
            ("PodDisruptionBudget", "chat-blue"), ("Secret", "chat-feedback-token")} <= there, there
    for a, k in kinds:
        for o in w.region_kube.list(a, k, NS, MANAGED):
            assert not o["metadata"].get("ownerReferences"), o["metadata"]
            assert o["metadata"]["labels"]["perennial.ai/deployment"] == "chat" and o["metadata"]["labels"]["perennial.ai/region"] == "east"
    hub_token = w.hub.kube.get("v1", "Secret", NS, "chat-feedback-token")["data"]["token"]
    assert w.region_kube.get("v1", "Secret", NS, "chat-feedback-token")["data"]["token"] == hub_token
    assert {o["metadata"]["labels"]["perennial.ai/region"] for o in w.hub.kube.list("apps/v1", "Deployment", NS, MANAGED)} == {"home"}
    east = w.region_status("east")
    assert (east["phase"], east["activeColor"], east["cluster"], east["readyReplicas"]) == ("Stable", "blue", "east-cluster", 1), east
    assert w.region_status("home")["activeColor"] == "blue"
    assert API in w.hub.get("Deployment", "chat")["apiVersion"]
    assert "perennial.ai/remote-children" in w.hub.get("Deployment", "chat")["metadata"]["finalizers"]
    # The smoke test reached the region's preview Service through the region's API server, with the operator's token.
    smoke = [h for m, p, h in w.east.requests if m == "POST" and p.endswith("/v1/chat/completions")]
    assert smoke and all(h.get("X-Perennial-Token") for h in smoke), smoke

    # The region's API server stops: that region (and the Deployment) is degraded, naming it; home keeps serving.
    w.region.stop()
    wait_for(lambda: w.region_status("east").get("phase") == "Unreachable", timeout=60, message="east reported unreachable")
    ready, degraded = w.condition("Ready"), w.condition("Degraded")
    assert (ready["status"], ready["reason"]) == ("False", "RegionUnreachable") and "east" in ready["message"]
    assert degraded["status"] == "True" and "east" in degraded["message"] and "home" not in ready["message"]
    home = w.region_status("home")
    assert (home["phase"], home["activeColor"], home["readyReplicas"]) == ("Stable", "blue", 1), home
    assert w.hub.kube.get("v1", "Service", NS, "chat")["spec"]["selector"]["perennial.ai/color"] == "blue"

    # A change of the pods meanwhile rolls out at home; east converges to it once back.
    w.hub.kube.patch(API, "Deployment", NS, "chat", {"spec": {"engine": {"extraArgs": ["--enforce-eager"]}}})
    run_pods(w.hub.kube, "chat-green", w.home)
    wait_for(lambda: w.region_status("home").get("activeColor") == "green", timeout=60, message="home switched to green")
    w.region = ServerThread(w.region.server, "127.0.0.1", w.region.server.port)  # the same store, certificate and port
    w.region_kube = w.east.kube = connect(server=w.region.url, token=w.region.token, ca_file=w.region.ca_file)
    run_pods(w.region_kube, "chat-green", w.east)
    wait_for(lambda: w.region_status("east").get("activeColor") == "green", timeout=90, message="east converged to green")
    w.hub.wait_condition("Deployment", "chat", "Ready", "True", "Serving", timeout=60)
    green = w.region_kube.get("apps/v1", "Deployment", NS, "chat-green")
    assert green["metadata"]["labels"]["perennial.ai/revision"] == w.region_status("east")["revision"]
    assert "--enforce-eager" in json.dumps(green["spec"]["template"]["spec"]["containers"]), "east runs the spec changed while it was away"

    # Deleted: its children in the region are deleted too, then the finalizer lets it go.
    w.hub.kube.delete(API, "Deployment", NS, "chat")
    wait_for(lambda: w.hub.get("Deployment", "chat") is None, timeout=60, message="the Deployment is gone")
    left = [(k, o["metadata"]["name"]) for a, k in kinds for o in w.region_kube.list(a, k, NS, MANAGED)]
    assert not left, left


def test_a_missing_cluster_secret_names_the_region_and_the_reason(world: World):
    w = world
    spec = {**SPEC, "regions": [{"name": "home"}, {"name": "east", "clusterSecretRef": {"name": "nope"}}]}
    w.hub.create("Deployment", "chat", spec)
    serve_home(w)
    wait_for(lambda: w.region_status("east").get("cluster") == "nope", timeout=60, message="east reported")
    east = w.region_status("east")
    assert east["phase"] == "Degraded" and "nope" in east["message"], east
    wait_for(lambda: w.condition("Ready").get("reason") == "ClusterSecretNotFound", timeout=30, message="Ready names the reason")
    assert w.region_status("home")["activeColor"] == "blue"
    # Deleting it is not held up by a cluster that never was.
    w.hub.kube.delete(API, "Deployment", NS, "chat")
    wait_for(lambda: w.hub.get("Deployment", "chat") is None, timeout=60, message="the Deployment is gone")


def test_a_deployment_moved_out_of_the_operators_cluster_leaves_no_serving_children_there(world: World):
    """Its only local region taken out of the spec (it now serves from the other cluster only): the local children
    (pods holding GPUs, Services, PDBs, routes) go once every region left serves, as a renamed local region's do."""
    w = world
    w.hub.create("Deployment", "chat", SPEC)
    serve_home(w)
    run_pods(w.region_kube, "chat-blue", w.east)
    w.hub.wait_condition("Deployment", "chat", "Ready", "True", "Serving", timeout=60)
    assert w.hub.kube.list("apps/v1", "Deployment", NS, MANAGED)

    w.hub.kube.patch(API, "Deployment", NS, "chat", {"spec": {"regions": [SPEC["regions"][1]]}})
    wait_for(lambda: [r["name"] for r in w.status().get("regions") or []] == ["east"], timeout=60, message="only east is reported")
    kinds = (("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ConfigMap"), ("policy/v1", "PodDisruptionBudget"))
    wait_for(lambda: not [o for a, k in kinds for o in w.hub.kube.list(a, k, NS, MANAGED)], timeout=60,
             message="the local children are pruned")
    assert w.region_status("east")["activeColor"] == "blue" and w.region_kube.get("apps/v1", "Deployment", NS, "chat-blue")
    w.hub.wait_condition("Deployment", "chat", "Ready", "True", "Serving", timeout=30)


def test_two_deployments_sharing_a_token_secret_neither_fight_over_nor_delete_each_others_copy_in_a_region(world: World):
    """Two Deployments of a namespace name one `feedback.tokenSecretRef` and serve in one other cluster: each one's
    copy of the token there is its own (no relabelling back and forth, a write storm), and deleting one leaves the
    other's pods their token."""
    import time

    w = world
    w.hub.kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "shared-token", "namespace": NS},
                       "type": "Opaque", "data": {"token": b64("a-shared-feedback-token-0123456789")}})
    spec = {**SPEC, "regions": [SPEC["regions"][1]], "feedback": {"tokenSecretRef": {"name": "shared-token", "key": "token"}}}
    other = Pods(w.region_kube, "chat2-routes")
    try:
        w.hub.create("Deployment", "chat", spec)
        w.hub.create("Deployment", "chat2", spec)
        run_pods(w.region_kube, "chat-blue", w.east)
        run_pods(w.region_kube, "chat2-blue", other)
        for name in ("chat", "chat2"):
            w.hub.wait_condition("Deployment", name, "Ready", "True", "Serving", timeout=60)

        def token_secrets() -> dict[str, tuple[str, str]]:
            return {o["metadata"]["name"]: (o["metadata"]["labels"]["perennial.ai/deployment"], o["metadata"]["resourceVersion"])
                    for o in w.region_kube.list("v1", "Secret", NS, MANAGED)}

        def mounted(deployment: str) -> str:
            d = w.region_kube.get("apps/v1", "Deployment", NS, f"{deployment}-blue")
            return next(v["secret"]["secretName"] for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "feedback-token")

        def both() -> dict[str, tuple[str, str]] | None:
            found = token_secrets()
            return found if len(found) == 2 else None

        before = wait_for(both, timeout=30, message="each Deployment's copy of the token")
        time.sleep(3)  # nothing changes in a region that serves: the copies stay as written
        after = wait_for(both, timeout=30, message="each Deployment's copy of the token")
        assert after == before, f"the token copies are rewritten while nothing changes: {before} -> {after}"
        assert before[mounted("chat")][0] == "chat" and before[mounted("chat2")][0] == "chat2", before

        w.hub.kube.delete(API, "Deployment", NS, "chat")
        wait_for(lambda: w.hub.get("Deployment", "chat") is None, timeout=60, message="chat is gone")
        secret = w.region_kube.get("v1", "Secret", NS, mounted("chat2"))
        assert secret is not None and base64.b64decode(secret["data"]["token"]).decode() == "a-shared-feedback-token-0123456789"
    finally:
        other.close()


def test_a_region_renamed_in_the_same_cluster_keeps_serving_there_until_its_new_revision_does(world: World):
    """`east` renamed `east2` (same cluster Secret): its children keep their names there, so the old region's removal
    must not delete what the renamed region still serves with (its active color): the rename rolls out blue-green."""
    w = world
    w.hub.create("Deployment", "chat", SPEC)
    serve_home(w)
    run_pods(w.region_kube, "chat-blue", w.east)
    w.hub.wait_condition("Deployment", "chat", "Ready", "True", "Serving", timeout=60)

    serving_blue = w.region_kube.get("apps/v1", "Deployment", NS, "chat-blue")["metadata"]["uid"]
    renamed = [SPEC["regions"][0], {"name": "east2", "clusterSecretRef": {"name": "east-cluster"}}]
    w.hub.kube.patch(API, "Deployment", NS, "chat", {"spec": {"regions": renamed}})
    generation = w.hub.get("Deployment", "chat")["metadata"]["generation"]
    wait_for(lambda: w.status().get("observedGeneration") == generation and w.region_status("east2"), timeout=60, message="the rename is observed")
    wait_for(lambda: w.region_kube.get("apps/v1", "Deployment", NS, "chat-green"), timeout=60, message="east2 starts its rollout")
    blue = w.region_kube.get("apps/v1", "Deployment", NS, "chat-blue")
    assert blue is not None and blue["metadata"]["uid"] == serving_blue and not blue["metadata"].get("deletionTimestamp"), \
        "the serving color of the renamed region was deleted"
    assert blue["spec"]["replicas"] > 0 and w.region_status("east2")["activeColor"] == "blue"
    selector = w.region_kube.get("v1", "Service", NS, "chat")["spec"]["selector"]
    assert all(blue["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items()), selector

    def switched() -> bool:
        run_pods(w.region_kube, "chat-green", w.east)
        return w.region_status("east2").get("activeColor") == "green"

    wait_for(switched, timeout=90, interval=0.5, message="east2 serves its new revision")
    wait_for(lambda: [r["name"] for r in w.status().get("regions") or []] == ["home", "east2"], timeout=60,
             message="the old name is no longer reported")
    w.hub.wait_condition("Deployment", "chat", "Ready", "True", "Serving", timeout=60)


def test_a_users_token_that_cannot_be_copied_to_a_region_is_a_condition_and_the_rest_goes_on(world: World):
    """A `tokenSecretRef` whose value the operator refuses to copy to another cluster (shorter than 16 characters):
    the region and the Deployment say so (Degraded, FeedbackTokenInvalid, naming the region), the Secret's value
    never appears, and the status of every region is still written (the pass is not aborted)."""
    w = world
    w.hub.kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "short-token", "namespace": NS},
                       "type": "Opaque", "data": {"token": b64("tiny-s3cret")}})
    w.hub.create("Deployment", "chat", {**SPEC, "feedback": {"tokenSecretRef": {"name": "short-token", "key": "token"}}})
    degraded = w.hub.wait_condition("Deployment", "chat", "Degraded", "True", "FeedbackTokenInvalid", timeout=60)
    assert "east" in degraded["message"] and "tiny-s3cret" not in json.dumps(w.status())
    assert {r["name"] for r in w.status()["regions"]} == {"home", "east"}
    assert w.region_kube.get("v1", "Secret", NS, "chat-feedback-token") is None


@pytest.mark.parametrize("world", ["clean"], indirect=True)  # under injected faults a region may really be lost a moment
def test_a_restart_of_the_operator_writes_nothing_to_a_deployment_with_a_region_elsewhere(world: World):
    """After a restart the other cluster's watches must list again before its region is judged: a region reported
    unreachable meanwhile ('connecting') would be two status writes (and a Warning Event) on every restart."""
    import time

    w = world
    w.hub.create("Deployment", "chat", SPEC)
    serve_home(w)
    run_pods(w.region_kube, "chat-blue", w.east)
    w.hub.wait_condition("Deployment", "chat", "Ready", "True", "Serving", timeout=60)

    def version() -> str:
        return w.hub.get("Deployment", "chat")["metadata"]["resourceVersion"]

    before = version()
    for _ in range(100):  # settled: no write for 3 s in a row
        time.sleep(3)
        if version() == before:
            break
        before = version()
    warnings = len([e for e in w.hub.events("chat") if e.get("type") == "Warning"])
    w.region.server.reset_request_counts()
    w.hub.restart_operator()
    wait_for(lambda: w.region.server.count(verb="watch") >= 7, timeout=60, message="the region's kinds listed and watched again")
    time.sleep(3)
    assert version() == before, (w.status().get("regions"), w.condition("Ready"))
    assert len([e for e in w.hub.events("chat") if e.get("type") == "Warning"]) == warnings


def test_a_deployment_with_a_long_name_deletes_its_children_in_the_region(world: World):
    """A name over 63 characters is shortened in the `perennial.ai/deployment` label (with a hash): the children in
    the other cluster must still be found by it when the Deployment is deleted (else they are left running there)."""
    w = world
    name = "chat-" + "x" * 70
    w.hub.create("Deployment", name, {**SPEC, "regions": [SPEC["regions"][1]]})
    kinds = (("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ConfigMap"), ("v1", "Secret"))

    def there() -> list[tuple[str, str]]:
        return [(k, o["metadata"]["name"]) for a, k in kinds for o in w.region_kube.list(a, k, NS, MANAGED)]

    wait_for(lambda: len(there()) >= 4, timeout=60, message="children in the region")
    w.hub.kube.delete(API, "Deployment", NS, name)
    wait_for(lambda: w.hub.get("Deployment", name) is None, timeout=60, message="the Deployment is gone")
    wait_for(lambda: not there(), timeout=30, message="its children in the region are deleted")
