"""Serving a model across nodes: the LeaderWorkerSet of one color (pure builder) and its readiness as a group.

The pod templates inside are validated against Kubernetes' own schemas (kubernetes-validate --strict), the
LeaderWorkerSet's own fields against the v1 API of LeaderWorkerSet v0.10.0 (no package on PyPI ships its models:
the fields and enums below are that release's `leaderworkerset.x-k8s.io/v1` types); vLLM's command line for the
group is the launcher's (pipeline stages over Ray)."""

from __future__ import annotations

import copy
import json

import pytest

from perennial.api.deployment import DeploymentSpec
from perennial.resources import deployment as d
from perennial.resources import lws

from test_deployment_resources import KEDA, SPEC, _promql_pod_regex, serving

PP_SPEC = {**SPEC, "engine": {**SPEC["engine"], "pipelineParallelSize": 2}}
REV = "0123456789"

#: LeaderWorkerSet v0.10.0, leaderworkerset.x-k8s.io/v1: the fields of the objects the builder writes
LWS_SPEC_FIELDS = {"leaderWorkerTemplate", "networkConfig", "replicas", "rolloutStrategy", "startupPolicy"}
LWS_TEMPLATE_FIELDS = {"leaderTemplate", "persistentVolumeClaimRetentionPolicy", "restartPolicy", "size", "subGroupPolicy",
                       "volumeClaimTemplates", "workerTemplate"}
LWS_RESTART_POLICIES = {"Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"}
LWS_STARTUP_POLICIES = {"LeaderCreated", "LeaderReady"}
LWS_ROLLOUT_FIELDS = {"type", "rollingUpdateConfiguration"}
LWS_ROLLING_FIELDS = {"maxSurge", "maxUnavailable", "partition"}


def lws_problems(obj: dict) -> list[str]:
    out = []
    spec = obj["spec"]
    out += [f"spec.{k}" for k in set(spec) - LWS_SPEC_FIELDS]
    lwt = spec["leaderWorkerTemplate"]
    out += [f"spec.leaderWorkerTemplate.{k}" for k in set(lwt) - LWS_TEMPLATE_FIELDS]
    if lwt.get("restartPolicy") not in LWS_RESTART_POLICIES:
        out.append("restartPolicy")
    if spec.get("startupPolicy") not in LWS_STARTUP_POLICIES:
        out.append("startupPolicy")
    if not isinstance(lwt.get("size"), int) or lwt["size"] < 1:
        out.append("size")
    rs = spec.get("rolloutStrategy") or {}
    out += [f"rolloutStrategy.{k}" for k in set(rs) - LWS_ROLLOUT_FIELDS]
    out += [f"rollingUpdateConfiguration.{k}" for k in set(rs.get("rollingUpdateConfiguration") or {}) - LWS_ROLLING_FIELDS]
    if (obj["apiVersion"], obj["kind"]) != ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"):
        out.append("kind")
    return out


def build(spec=PP_SPEC, replicas=3):
    s = serving(spec)
    return s, lws.leader_worker_set(s, "blue", REV, replicas)


def test_leader_worker_set_is_valid_and_groups_pipeline_stages():
    import kubernetes_validate

    s, obj = build()
    assert not lws_problems(obj)
    lwt = obj["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == 2 and obj["spec"]["replicas"] == 3
    assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"  # one pod failing recreates its whole group
    for name, tpl in (("leader", lwt["leaderTemplate"]), ("worker", lwt["workerTemplate"])):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "team", **tpl["metadata"]}, "spec": tpl["spec"]}
        for version in ("1.30.0", "1.37.0"):
            kubernetes_validate.validate(pod, version, strict=True)
    leader = {c["name"]: c for c in lwt["leaderTemplate"]["spec"]["containers"]}
    assert set(leader) == {"engine", "sidecar"} and leader["engine"]["args"][-1] == "--ray-head"
    (worker,) = lwt["workerTemplate"]["spec"]["containers"]
    assert worker["command"][:3] == ["ray", "start", "--block"] and "--address=$(LWS_LEADER_ADDRESS):6379" in worker["command"]
    # every pod of the group: tensorParallelSize GPUs, shared memory, the model's volume, hardened as the leader
    for c in (leader["engine"], worker):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert {v["name"] for v in lwt["workerTemplate"]["spec"]["volumes"]} == {m["name"] for m in worker["volumeMounts"]}
    assert lwt["workerTemplate"]["spec"]["automountServiceAccountToken"] is False
    # the Services select the leaders only (the sidecar is the only port)
    sel = d.selector(s, "blue")
    matches = lambda labels: all(labels.get(k) == v for k, v in sel.items())  # noqa: E731
    assert matches(lwt["leaderTemplate"]["metadata"]["labels"]) and not matches(lwt["workerTemplate"]["metadata"]["labels"])
    assert obj["metadata"]["name"] == d.deployment_name(s.prefix, "blue") and obj["metadata"]["ownerReferences"]
    # the checker is not a rubber stamp
    bad = copy.deepcopy(obj)
    bad["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "RecreateGroup"
    bad["spec"]["leaderWorkerTemplate"]["groupSize"] = 2
    assert lws_problems(bad) == ["spec.leaderWorkerTemplate.groupSize", "restartPolicy"]


def test_autoscaled_replicas_are_left_to_the_autoscaler():
    _, obj = build(replicas=None)
    assert "replicas" not in obj["spec"]


def test_vllm_gets_the_pipeline_over_ray():
    from perennial_server.vllm import RAY_PORT, build_vllm_command

    assert RAY_PORT == lws.RAY_PORT
    s, obj = build()
    engine = obj["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    spec = json.loads(engine["args"][engine["args"].index("--engine-spec") + 1])
    cmd = build_vllm_command(DeploymentSpec.model_validate(PP_SPEC).engine.model_validate(spec), "/m")
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "4" and cmd[cmd.index("--pipeline-parallel-size") + 1] == "2"
    assert cmd[cmd.index("--distributed-executor-backend") + 1] == "ray"
    one = build_vllm_command(DeploymentSpec.model_validate(SPEC).engine, "/m")
    assert "--pipeline-parallel-size" not in one and "--distributed-executor-backend" not in one
    with pytest.raises(ValueError, match="--pipeline-parallel-size"):
        build_vllm_command(DeploymentSpec.model_validate({**SPEC, "engine": {"extraArgs": ["--pipeline-parallel-size", "3"]}}).engine, "/m")


def test_the_leader_waits_for_its_workers_to_join_ray():
    from perennial_server.vllm import start_ray_head

    ran, counts, now = [], iter([1, 1, 2]), [0.0]
    start_ray_head(6379, 2, run=lambda cmd, check: ran.append(cmd), count=lambda: next(counts),
                   sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    assert ran == [["ray", "start", "--head", "--port=6379", "--disable-usage-stats"]] and now[0] == 4.0
    with pytest.raises(RuntimeError, match="only 1 of 3 Ray nodes"):
        start_ray_head(6379, 3, run=lambda cmd, check: None, count=lambda: 1, timeout_s=10,
                       sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])


@pytest.mark.parametrize("status,meta,want", [
    ({"readyReplicas": 3, "updatedReplicas": 3, "observedGeneration": 2}, {"generation": 2}, (3, 3)),
    ({"readyReplicas": 2, "updatedReplicas": 3, "observedGeneration": 2}, {"generation": 2}, (2, 3)),  # a group not whole
    ({"readyReplicas": 3, "updatedReplicas": 1, "observedGeneration": 2}, {"generation": 2}, (1, 3)),  # old groups ready only
    ({"readyReplicas": 3, "updatedReplicas": 3, "observedGeneration": 1}, {"generation": 2}, (0, 3)),  # not seen the new spec
    ({}, {}, (0, 3)),
])
def test_a_group_is_ready_as_a_whole(status, meta, want):
    assert lws.group_ready({"metadata": meta, "spec": {"replicas": 3}, "status": status}) == want
    assert lws.group_ready(None) == (0, 0)


def test_pipeline_parallel_needs_vllm():
    from perennial.api.deployment import EngineSpec

    schema = EngineSpec.model_json_schema(by_alias=True)
    rules = [r["rule"] for r in schema.get("x-kubernetes-validations", [])]
    assert any("pipelineParallelSize" in r for r in rules)
    s = serving({**PP_SPEC, "engine": {"type": "Transformers", "pipelineParallelSize": 2}})
    with pytest.raises(ValueError, match="needs `engine.type` 'VLLM'"):
        lws.leader_worker_set(s, "blue", REV, 1)


def test_the_workload_of_a_color_follows_the_group_size():
    one = serving(SPEC)
    assert lws.workload_kind(one) == ("apps/v1", "Deployment")
    assert lws.workload(one, "blue", d.revision(one), 2) == d.deployment(one, "blue", d.revision(one), 2)
    s, obj = build()
    assert lws.workload_kind(s) == ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
    assert lws.workload(s, "blue", REV, 3) == obj
    assert lws.scale_target(s, "green") == {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
                                            "name": d.deployment_name(s.prefix, "green")}
    assert lws.scale_target(one, "green")["kind"] == "Deployment"


def test_a_pipeline_parallel_spec_has_a_revision_of_its_own():
    """The Deployment controller rolls a pipelineParallelSize > 1 spec out as LeaderWorkerSets: `revision()` (every
    builder's validation, run before anything is applied) accepts it, and the group size is part of the revision
    (a color's workload kind follows it: one revision, one kind)."""
    one, two = serving(SPEC), serving(PP_SPEC)
    three = serving({**SPEC, "engine": {**SPEC["engine"], "pipelineParallelSize": 3}})
    assert len({d.revision(one), d.revision(two), d.revision(three)}) == 3


def test_the_autoscalers_scale_the_groups_of_the_active_color():
    """HPA and KEDA scale a LeaderWorkerSet through its /scale subresource (replicas are groups); KEDA's query sums
    the vLLM metric of the leaders (`<lws>-<group>`: the engine's API server), never of the workers (`<lws>-<group>-<n>`)."""
    hpa = d.autoscaler(serving({**PP_SPEC, "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4}}), "green")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": lws.LWS_API, "kind": "LeaderWorkerSet", "name": "chat-green"}
    so = d.autoscaler(serving({**PP_SPEC, "autoscaling": KEDA}), "green")
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": lws.LWS_API, "kind": "LeaderWorkerSet", "name": "chat-green"}
    leaders = _promql_pod_regex(so["spec"]["triggers"][0]["metadata"]["query"])
    assert leaders.fullmatch("chat-green-0") and leaders.fullmatch("chat-green-12")
    for other in ("chat-green-0-1", "chat-blue-0", "chat-green-7d9f8c6b5-x2k9q", "chatty-green-0"):
        assert not leaders.fullmatch(other), other
    # one pod per replica: the apps/v1 Deployment, as before
    assert d.autoscaler(serving({**SPEC, "autoscaling": KEDA}), "green")["spec"]["scaleTargetRef"]["kind"] == "Deployment"


def test_the_pods_of_a_group_reach_each_other_and_nothing_else_opens():
    """Ray (its GCS on the leader, workers' own ports) and NCCL between the pods of a group use many ports: the
    serving NetworkPolicy lets the region's pods of this Deployment reach each other on any port, both ways; clients
    still reach the sidecar's port only. One pod per replica keeps the policy as it was."""
    import kubernetes_validate

    s = serving(PP_SPEC)
    pol = d.network_policy(s)
    own = {"podSelector": {"matchLabels": pol["spec"]["podSelector"]["matchLabels"]}}
    obj = lws.leader_worker_set(s, "blue", REV, 1)
    for role in ("leaderTemplate", "workerTemplate"):  # the policy's pods are the group's pods, leader and workers
        labels = obj["spec"]["leaderWorkerTemplate"][role]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in own["podSelector"]["matchLabels"].items()), role
    assert {"from": [own]} in pol["spec"]["ingress"] and {"to": [own]} in pol["spec"]["egress"]
    kubernetes_validate.validate(pol, "1.30.0", strict=True)
    assert all(r.get("ports") for r in pol["spec"]["ingress"] if r != {"from": [own]}), "other ingress stays port-limited"
    one = d.network_policy(serving(SPEC))
    assert {"from": [own]} not in one["spec"]["ingress"] and {"to": [own]} not in one["spec"]["egress"]
    assert one["spec"]["ingress"] == [r for r in pol["spec"]["ingress"] if r != {"from": [own]}]


def test_the_disruption_budget_covers_every_pod_of_a_color_s_groups():
    """A worker evicted takes its whole group down (RecreateGroupOnPodRestart): the PodDisruptionBudget of a color
    counts leaders and workers (LeaderWorkerSet's own `leaderworkerset.sigs.k8s.io/name` label on each of its pods),
    so a drain takes one pod, one group, at a time; the other color's pods are not counted."""
    import kubernetes_validate

    s = serving(PP_SPEC)
    pdb = lws.pdb(s, "blue")
    kubernetes_validate.validate(pdb, "1.30.0", strict=True)
    assert pdb["metadata"]["name"] == d.pdb_name(s.prefix, "blue") and pdb["spec"]["maxUnavailable"] == 1
    sel = pdb["spec"]["selector"]["matchLabels"]
    matches = lambda labels: all(labels.get(k) == v for k, v in sel.items())  # noqa: E731
    for color, want in (("blue", True), ("green", False)):
        lwt = lws.leader_worker_set(s, color, REV, 1)["spec"]["leaderWorkerTemplate"]
        for role in ("leaderTemplate", "workerTemplate"):  # the pods as LeaderWorkerSet labels them
            labels = {**lwt[role]["metadata"]["labels"], lws.SET_NAME_LABEL: d.deployment_name(s.prefix, color)}
            assert matches(labels) is want, (color, role)
    assert lws.pdb(serving(SPEC), "blue") == d.pdb(serving(SPEC), "blue")
