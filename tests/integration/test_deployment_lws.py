"""A model across nodes (`engine.pipelineParallelSize` > 1) against the embedded control plane: each color of a
Perennial Deployment is a LeaderWorkerSet where the cluster serves that CRD, and the Deployment is blocked with a
clear reason where it does not (nothing created). The test plays the LeaderWorkerSet controller (its status: groups
ready as a whole), the local kube-proxy and the serving pods, as test_deployment_controller.py plays the
controller-manager for apps/v1 Deployments."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import API, wait_for
from perennial.resources import lws
from test_controller_pattern import WRITES, count, quiet
from test_deployment_controller import NS, Serving, serving_cluster, spec
from test_trainingrun_engines import engine_crd, watch_stopped

LWS_CRD = engine_crd("leaderworkerset.x-k8s.io", "v1", "leaderworkersets", "LeaderWorkerSet")
LWS_CRD["spec"]["versions"][0]["subresources"]["scale"] = {
    "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas", "labelSelectorPath": ".status.hpaPodSelector"}
ENGINE = {"type": "VLLM", "tensorParallelSize": 2, "pipelineParallelSize": 2}


def install_lws(w: Serving) -> None:
    w.kube.apply(LWS_CRD)
    wait_for(lambda: w.kube.request("GET", "/apis/leaderworkerset.x-k8s.io/v1"), message="LeaderWorkerSet served")
    w.cluster.restart_operator()  # found at start too (installed while it runs: test_leaderworkerset_installed_and_removed_...)


@pytest.fixture
def serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Serving]:
    """A clean control plane with the operator (its managers captured: their cache), a BaseModel and an Adapter."""
    with serving_cluster(tmp_path, monkeypatch) as w:
        yield w


def get_lws(w: Serving, name: str) -> dict[str, Any] | None:
    return w.kube.get(lws.LWS_API, "LeaderWorkerSet", NS, name)


def groups_ready(w: Serving, name: str, ready: int | None = None) -> None:
    """Play the LeaderWorkerSet controller: every group of `name` (or `ready` of them) has all its pods ready."""
    obj = wait_for(lambda: get_lws(w, name), message=f"LeaderWorkerSet {name}")
    n = obj["spec"].get("replicas", 1)
    up = n if ready is None else ready
    status = {"observedGeneration": obj["metadata"]["generation"], "replicas": n, "updatedReplicas": n, "readyReplicas": up,
              "hpaPodSelector": "leaderworkerset.sigs.k8s.io/name=" + name + ",leaderworkerset.sigs.k8s.io/worker-index=0",
              "conditions": [{"type": "Available", "status": "True" if up == n else "False", "reason": "AllGroupsReady" if up == n else "GroupsProgressing",
                              "message": f"{up}/{n} groups ready", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    w.kube.patch(lws.LWS_API, "LeaderWorkerSet", NS, name, {"status": status}, subresource="status")


def assert_valid_pods(obj: dict[str, Any]) -> None:
    """The pods a LeaderWorkerSet makes are valid Kubernetes (strict): its leader and worker templates as Pods."""
    import kubernetes_validate

    lwt = obj["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        tpl = lwt[role]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"x-{role.lower()}", "namespace": NS, **tpl["metadata"]}, "spec": tpl["spec"]}
        kubernetes_validate.validate(pod, "1.30.0", strict=True)


def test_with_leaderworkerset_each_color_is_a_group_rolled_blue_green_and_pruned_with_its_region(serving: Serving):
    w = serving
    install_lws(w)
    autoscaling = {"enabled": True, "provider": "HPA", "minReplicas": 2, "maxReplicas": 4}
    w.cluster.create("Deployment", "chat", spec(engine=ENGINE, autoscaling=autoscaling))

    # The first color: a LeaderWorkerSet of groups (leader + worker, each with tensorParallelSize GPUs), no apps/v1 one.
    blue = wait_for(lambda: get_lws(w, "chat-blue"), message="LeaderWorkerSet chat-blue")
    assert w.deploy("chat-blue") is None
    lwt = blue["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == 2 and lwt["restartPolicy"] == "RecreateGroupOnPodRestart" and blue["spec"]["replicas"] == 2
    leader = {c["name"]: c for c in lwt["leaderTemplate"]["spec"]["containers"]}
    (worker,) = lwt["workerTemplate"]["spec"]["containers"]
    assert leader["engine"]["resources"]["limits"]["nvidia.com/gpu"] == 2 and worker["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "--ray-head" in leader["engine"]["args"] and "--address=$(LWS_LEADER_ADDRESS):6379" in worker["command"]
    assert [r["uid"] for r in blue["metadata"]["ownerReferences"]] == [w.cluster.get("Deployment", "chat")["metadata"]["uid"]]
    assert_valid_pods(blue)
    pdb = wait_for(lambda: w.kube.get("policy/v1", "PodDisruptionBudget", NS, "chat-blue"), message="blue's PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"][lws.SET_NAME_LABEL] == "chat-blue", "it counts the workers too"

    # Served only when every group is whole: one of two groups ready is no switch.
    w.proxied("chat-preview")
    groups_ready(w, "chat-blue", ready=1)
    time.sleep(1.0)
    assert w.stable_color() is None
    w.cluster.wait_condition("Deployment", "chat", "Ready", "False")
    groups_ready(w, "chat-blue")
    wait_for(lambda: w.stable_color() == "blue", message="the stable Service selects blue's leaders")
    w.proxied("chat")
    w.cluster.wait_condition("Deployment", "chat", "Ready", "True", "Serving")
    w.cluster.wait_condition("Deployment", "chat", "Progressing", "False", "RolloutComplete")
    hpa = w.kube.get("autoscaling/v2", "HorizontalPodAutoscaler", NS, "chat")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": lws.LWS_API, "kind": "LeaderWorkerSet", "name": "chat-blue"}
    st = w.status()
    assert st["activeColor"] == "blue" and st["readySummary"] == "2/2"
    # Stable: the LeaderWorkerSet controller's status writes wake the Deployment and make no write of ours.
    quiet(w.cluster)
    w.cluster.server.reset_request_counts()
    for i in range(3):
        w.kube.patch(lws.LWS_API, "LeaderWorkerSet", NS, "chat-blue", {"status": {"conditions": [
            {"type": "Available", "status": "True", "reason": "AllGroupsReady", "message": f"pass {i}",
             "lastTransitionTime": f"2026-01-01T00:00:0{i}Z"}]}}, subresource="status")
        time.sleep(0.3)
    quiet(w.cluster)
    assert count(w.cluster, WRITES) == 0, w.cluster.server.request_counts()

    # A new revision: green's LeaderWorkerSet as the preview, smoke test, full count, switch, blue scaled to zero.
    w.kube.patch(API, "Deployment", NS, "chat", {"spec": {"engine": {"extraArgs": ["--enforce-eager"]}}})
    green = wait_for(lambda: get_lws(w, "chat-green"), message="preview green")
    assert green["spec"]["replicas"] == 1 and w.stable_color() == "blue"
    groups_ready(w, "chat-green")
    wait_for(lambda: get_lws(w, "chat-green")["spec"]["replicas"] == 2, message="the preview scaled to the full count")
    assert w.stable_color() == "blue"
    groups_ready(w, "chat-green")
    wait_for(lambda: w.stable_color() == "green", message="switched to green")
    wait_for(lambda: w.kube.get("autoscaling/v2", "HorizontalPodAutoscaler", NS, "chat")["spec"]["scaleTargetRef"]["name"] == "chat-green",
             message="the HPA follows the active color's LeaderWorkerSet")
    wait_for(lambda: get_lws(w, "chat-blue")["spec"]["replicas"] == 0, message="old color scaled to zero after the delay")
    w.cluster.wait_condition("Deployment", "chat", "Progressing", "False", "RolloutComplete")

    # Node pools: two regions of this cluster, a LeaderWorkerSet per region and color on its nodes; once both serve,
    # the groups of the region that is no more are pruned (its Services too).
    pools = [{"name": r, "nodeSelector": {"topology.kubernetes.io/region": r}} for r in ("eu", "us")]
    w.kube.patch(API, "Deployment", NS, "chat", {"spec": {"regions": pools}})
    for r in ("eu", "us"):
        obj = wait_for(lambda r=r: get_lws(w, f"chat-{r}-blue"), message=f"region {r}'s LeaderWorkerSet")
        for role in ("leaderTemplate", "workerTemplate"):
            assert obj["spec"]["leaderWorkerTemplate"][role]["spec"]["nodeSelector"] == {"topology.kubernetes.io/region": r}
        w.proxied(f"chat-{r}-preview")
        groups_ready(w, f"chat-{r}-blue")
    assert get_lws(w, "chat-green")["spec"]["replicas"] == 2, "the old region serves until the new ones do"
    wait_for(lambda: w.stable_color("chat-eu") == "blue" and w.stable_color("chat-us") == "blue", message="both regions serve")
    for r in ("eu", "us"):
        w.proxied(f"chat-{r}")
    # one DELETE per child, groups before Services: wait for the last of them
    wait_for(lambda: get_lws(w, "chat-green") is None and get_lws(w, "chat-blue") is None and w.service("chat") is None,
             message="the old region's groups and Service pruned")
    assert w.kube.get("autoscaling/v2", "HorizontalPodAutoscaler", NS, "chat") is None
    w.cluster.wait_condition("Deployment", "chat", "Ready", "True")
    wait_for(lambda: [r["name"] for r in w.status()["regions"]] == ["eu", "us"], message="the status has the two regions")
    wait_for(lambda: "Deleted LeaderWorkerSet chat-green" in " ".join(w.reasons()), message="the Event of the pruned groups")


def test_without_leaderworkerset_a_group_across_nodes_is_blocked_and_nothing_is_created(serving: Serving):
    w = serving
    w.cluster.create("Deployment", "big", spec(engine=ENGINE))
    c = w.cluster.wait_condition("Deployment", "big", "Ready", "False", "LeaderWorkerSetNotInstalled")
    assert "leaderworkersets.leaderworkerset.x-k8s.io" in c["message"] and "pipelineParallelSize" in c["message"]
    wait_for(lambda: [e for e in w.cluster.events("big") if e["type"] == "Warning" and e["reason"] == "LeaderWorkerSetNotInstalled"],
             message="a Warning Event")
    # nothing half-created: no workload of either kind, no Service, no routes, no token
    for api, kind in (("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ConfigMap"), ("policy/v1", "PodDisruptionBudget"), ("v1", "Secret")):
        assert w.kube.list(api, kind, NS, "perennial.ai/deployment=big") == [], kind
    assert w.kube.get("v1", "Secret", NS, "big-feedback-token") is None
    # groups in another cluster are not supported (its CRDs and watches are not known there): refused with that reason
    w.cluster.create("Deployment", "far", spec(engine=ENGINE, regions=[{"name": "ap", "clusterSecretRef": {"name": "ap-cluster"}}]))
    c = w.cluster.wait_condition("Deployment", "far", "Ready", "False", "InvalidSpec")
    assert "region 'ap'" in c["message"] and "not yet in other clusters" in c["message"]
    # LeaderWorkerSet installed (the operator restarted): the same Deployment goes on
    install_lws(w)
    wait_for(lambda: get_lws(w, "big-blue"), message="the LeaderWorkerSet once its CRD is served")
    w.cluster.wait_condition("Deployment", "big", "Ready", "False", "FirstRolloutInProgress")


def test_leaderworkerset_installed_and_removed_while_the_operator_runs_without_a_restart(serving: Serving, caplog: pytest.LogCaptureFixture):
    w = serving
    w.cluster.create("Deployment", "chat", spec(engine=ENGINE))
    w.cluster.wait_condition("Deployment", "chat", "Ready", "False", "LeaderWorkerSetNotInstalled")
    # The platform team installs LeaderWorkerSet; the operator is NOT restarted.
    w.kube.apply(LWS_CRD)
    wait_for(lambda: get_lws(w, "chat-blue"), timeout=30, message="the LeaderWorkerSet once its CRD is served, without a restart")
    w.cluster.wait_condition("Deployment", "chat", "Ready", "False", "FirstRolloutInProgress", timeout=30)
    # The watch of that kind started: the LeaderWorkerSet controller's status reaches the operator's cache and wakes
    # the Deployment (its groups ready as a whole: it serves).
    w.proxied("chat-preview")
    groups_ready(w, "chat-blue")
    cache = w.managers[-1].cache
    wait_for(lambda: ((cache.get(lws.LWS_API, "LeaderWorkerSet", NS, "chat-blue") or {}).get("status") or {}).get("readyReplicas"),
             timeout=30, message="the LeaderWorkerSet's status in the operator's cache (its watch)")
    wait_for(lambda: w.stable_color() == "blue", timeout=30, message="the stable Service selects blue's leaders")
    w.cluster.wait_condition("Deployment", "chat", "Ready", "True", "Serving", timeout=30)
    assert len(w.managers) == 1, "the operator was not restarted"

    # The CRD removed (its LeaderWorkerSets with it): the Deployment says so again, the watch ends quietly.
    caplog.clear()
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="kopf._cogs.clients.watching")
    w.kube.delete("apiextensions.k8s.io/v1", "CustomResourceDefinition", None, LWS_CRD["metadata"]["name"])
    w.cluster.wait_condition("Deployment", "chat", "Degraded", "True", "LeaderWorkerSetNotInstalled", timeout=30)
    wait_for(lambda: cache.get(lws.LWS_API, "LeaderWorkerSet", NS, "chat-blue") is None, message="dropped from the operator's cache")
    # its groups went with the CRD: nothing serves any more, and Ready says so (not the Serving of before)
    ready = w.cluster.wait_condition("Deployment", "chat", "Ready", "False", "LeaderWorkerSetNotInstalled", timeout=30)
    assert "LeaderWorkerSet" in ready["message"]
    wait_for(lambda: watch_stopped(caplog, "leaderworkersets.v1.leaderworkerset.x-k8s.io"), timeout=60, message="kopf stopped its watch")
    loop = w.managers[-1]._loop
    # kopf logs the stop before its watcher task has finished being cancelled (seen "cancelling" under load): it goes
    wait_for(lambda: not [t for t in asyncio.all_tasks(loop) if t.get_name().startswith("watcher for leaderworkersets.")],
             timeout=10, message="kopf's watcher task gone")
    w.cluster.server.reset_request_counts()
    time.sleep(3)
    assert w.cluster.server.count(resource="leaderworkerset.x-k8s.io/leaderworkersets") == 0, w.cluster.server.request_counts()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
