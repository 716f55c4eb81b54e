"""The local apps/v1 controller-manager against the embedded API server, the test playing the kubelet (pods made
ready by writing their status): ReplicaSets, scaling, rolling and recreate updates, status, garbage collection."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from perennial.kube import connect
from perennial.kube.client import Kube
from perennial.local.apiserver import start_in_thread
from perennial.local.controllers import (
    LocalControllerManager,
    pod_template_hash,
    safe_encode_string,
)
from waiting import wait_for

NS = "default"


class Env:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.max_pods = 0

    def deployment(self, name: str, replicas: int, **spec: Any) -> dict[str, Any]:
        return self.kube.create({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": NS},
                                 "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                                          "template": {"metadata": {"labels": {"app": name}},
                                                       "spec": {"containers": [{"name": "c", "image": "not-mapped:1"}]}}, **spec}})

    def pods(self, app: str) -> list[dict[str, Any]]:
        pods = [p for p in self.kube.list("v1", "Pod", NS, f"app={app}")]
        self.max_pods = max(self.max_pods, len(pods))
        return sorted(pods, key=lambda p: (p["metadata"]["creationTimestamp"], int(p["metadata"]["resourceVersion"])))

    def replicasets(self) -> dict[str, dict[str, Any]]:
        return {r["metadata"]["name"]: r for r in self.kube.request("GET", f"/apis/apps/v1/namespaces/{NS}/replicasets")["items"]}

    def ready(self, pod: dict[str, Any], ready: bool = True) -> None:
        self.kube.patch_status("v1", "Pod", NS, pod["metadata"]["name"], {
            "phase": "Running", "podIP": "127.3.0.1",
            "conditions": [{"type": "Ready", "status": str(ready), "lastTransitionTime": "2026-01-01T00:00:00Z"}]})

    def ready_all(self, app: str) -> None:
        for p in self.pods(app):
            if not any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions") or []):
                self.ready(p)

    def status(self, name: str) -> dict[str, Any]:
        return (self.kube.get("apps/v1", "Deployment", NS, name) or {}).get("status") or {}


@pytest.fixture
def env() -> Iterator[Env]:
    server = start_in_thread()
    kube = connect(server=server.url)
    cm = LocalControllerManager(kube, server).start()
    try:
        yield Env(kube)
    finally:
        cm.stop()
        server.stop()


def test_hash_is_kubernetes_form() -> None:
    # SafeEncodeString maps the decimal digits' bytes ('0' is 48) onto 27 consonants and digits
    assert safe_encode_string("0123456789") == "456789bcdf"
    h = pod_template_hash({"metadata": {"labels": {"app": "x"}}})
    assert len(h) <= 10 and set(h) <= set("456789bcdf")
    assert h != pod_template_hash({"metadata": {"labels": {"app": "y"}}})
    assert h != pod_template_hash({"metadata": {"labels": {"app": "x"}}}, collision_count=1)


def test_replicaset_pods_status_and_scale_down_unready_first(env: Env) -> None:
    env.deployment("web", 3)
    pods = wait_for(lambda: len(p := env.pods("web")) == 3 and p, 20, 0.05, "3 pods")
    (rs,) = env.replicasets().values()
    h = rs["metadata"]["labels"]["pod-template-hash"]
    assert rs["metadata"]["name"] == f"web-{h}" and all(p["metadata"]["labels"]["pod-template-hash"] == h for p in pods)
    assert rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "1"
    unready = pods[0]  # the oldest: still deleted first, being unready
    for p in pods[1:]:
        env.ready(p)
    wait_for(lambda: env.status("web").get("readyReplicas") == 2, 20, 0.05, "2 ready")
    st = env.status("web")
    assert st["replicas"] == 3 and st["updatedReplicas"] == 3 and st["availableReplicas"] == 2 and st["unavailableReplicas"] == 1
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Available"]["status"] == "False"  # maxUnavailable 25% of 3 rounds down to 0: all 3 needed
    env.kube.patch("apps/v1", "Deployment", NS, "web", {"spec": {"replicas": 2}})
    left = wait_for(lambda: len(p := env.pods("web")) == 2 and p, 20, 0.05, "2 pods")
    assert unready["metadata"]["name"] not in {p["metadata"]["name"] for p in left}
    wait_for(lambda: {c["type"]: c for c in env.status("web").get("conditions") or []}["Progressing"]["reason"] == "NewReplicaSetAvailable",
             20, 0.05, "complete")
    assert {c["type"]: c for c in env.status("web")["conditions"]}["Available"]["status"] == "True"


def test_available_condition_false_below_minimum(env: Env) -> None:
    env.deployment("few", 4)
    wait_for(lambda: len(env.pods("few")) == 4, 20, 0.05, "4 pods")
    cond = wait_for(lambda: {c["type"]: c for c in env.status("few").get("conditions") or []}.get("Available"), 20, 0.05, "Available")
    assert cond["status"] == "False" and cond["reason"] == "MinimumReplicasUnavailable"
    for p in env.pods("few")[:3]:  # maxUnavailable 25% of 4 = 1
        env.ready(p)
    wait_for(lambda: {c["type"]: c for c in env.status("few").get("conditions") or []}["Available"]["status"] == "True", 20, 0.05, "available")


def test_rolling_update_keeps_within_surge_and_availability(env: Env) -> None:
    env.deployment("roll", 2, strategy={"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    wait_for(lambda: len(env.pods("roll")) == 2, 20, 0.05, "2 pods")
    env.ready_all("roll")
    wait_for(lambda: env.status("roll").get("availableReplicas") == 2, 20, 0.05, "2 available")
    env.max_pods = 0
    env.kube.patch("apps/v1", "Deployment", NS, "roll", {"spec": {"template": {"metadata": {"annotations": {"v": "2"}}}}})
    def is_ready(p: dict[str, Any]) -> bool:
        return any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions") or [])

    def complete() -> bool:
        pods = env.pods("roll")
        # maxUnavailable 0: never fewer than 2 ready pods; maxSurge 1: never more than 3 pods
        assert sum(1 for p in pods if is_ready(p)) >= 2 and len(pods) <= 3
        env.ready_all("roll")  # the kubelet's part: each new pod becomes ready
        st = env.status("roll")  # one read: the controller may write between two
        return {c["type"]: c for c in st.get("conditions") or []}["Progressing"]["reason"] == "NewReplicaSetAvailable" \
            and st.get("updatedReplicas") == 2 and st.get("observedGeneration") == 2 and len(pods) == 2

    wait_for(complete, 30, 0.05, "rollout complete")
    assert env.max_pods <= 3
    rss = sorted(env.replicasets().values(), key=lambda r: r["metadata"]["annotations"]["deployment.kubernetes.io/revision"])
    assert [r["spec"]["replicas"] for r in rss] == [0, 2]
    assert env.kube.get("apps/v1", "Deployment", NS, "roll")["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"  # type: ignore[index]
    st = env.status("roll")
    assert st["updatedReplicas"] == 2 and st["replicas"] == 2


def test_recreate_scales_old_to_zero_before_the_new(env: Env) -> None:
    env.deployment("rec", 2, strategy={"type": "Recreate"})
    old = wait_for(lambda: len(p := env.pods("rec")) == 2 and p, 20, 0.05, "2 pods")
    env.ready_all("rec")
    env.kube.patch("apps/v1", "Deployment", NS, "rec", {"spec": {"template": {"metadata": {"annotations": {"v": "2"}}}}})
    new = wait_for(lambda: len(p := env.pods("rec")) == 2 and not {x["metadata"]["name"] for x in p} & {x["metadata"]["name"] for x in old} and p,
                   20, 0.05, "new pods")
    assert env.max_pods <= 2
    assert len({p["metadata"]["labels"]["pod-template-hash"] for p in new}) == 1


def test_rollback_to_an_old_template_reuses_its_replicaset_with_the_next_revision(env: Env) -> None:
    env.deployment("back", 1)
    wait_for(lambda: len(env.pods("back")) == 1, 20, 0.05, "pod")
    first = set(env.replicasets())
    env.kube.patch("apps/v1", "Deployment", NS, "back", {"spec": {"template": {"metadata": {"annotations": {"v": "2"}}}}})
    wait_for(lambda: len(env.replicasets()) == 2, 20, 0.05, "second rs")
    env.ready_all("back")
    env.kube.patch("apps/v1", "Deployment", NS, "back", {"spec": {"template": {"metadata": {"annotations": None}}}})
    (name,) = first
    wait_for(lambda: env.replicasets()[name]["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "3", 20, 0.05, "revision 3")
    assert len(env.replicasets()) == 2


def test_deleting_the_deployment_collects_replicasets_and_pods(env: Env) -> None:
    env.deployment("gc", 2)
    wait_for(lambda: len(env.pods("gc")) == 2, 20, 0.05, "2 pods")
    env.kube.delete("apps/v1", "Deployment", NS, "gc")
    wait_for(lambda: not env.pods("gc") and not env.replicasets(), 20, 0.05, "all gone")


def test_progress_deadline(env: Env) -> None:
    env.deployment("slow", 1, progressDeadlineSeconds=1)
    wait_for(lambda: len(env.pods("slow")) == 1, 20, 0.05, "pod")

    def progressing() -> dict[str, Any] | None:
        return {c["type"]: c for c in env.status("slow").get("conditions") or []}.get("Progressing")

    cond = wait_for(lambda: (c := progressing()) and c["status"] == "False" and c, 20, 0.05, "deadline exceeded")
    assert cond["reason"] == "ProgressDeadlineExceeded" and cond["message"].endswith("has timed out progressing.")
    env.ready_all("slow")
    wait_for(lambda: (c := progressing()) and c["status"] == "True" and c["reason"] == "NewReplicaSetAvailable", 20, 0.05, "progress again")
