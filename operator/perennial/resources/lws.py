"""Serving a model across nodes (`engine.pipelineParallelSize` > 1) with LeaderWorkerSet (pure builders).

One replica is a group of `pipelineParallelSize` pods, each with `tensorParallelSize` GPUs: the leader is the
ordinary serving pod (vLLM and the feedback sidecar; `perennial-server vllm --ray-head` starts the Ray head
and waits for the workers before vLLM starts with `--pipeline-parallel-size`), the workers join its Ray
cluster (`ray start --block --address=$(LWS_LEADER_ADDRESS):6379`, the variable LeaderWorkerSet sets) and
hold their GPUs. `restartPolicy: RecreateGroupOnPodRestart`: any pod of a group failing recreates the whole
group, and LeaderWorkerSet counts a replica ready only when every pod of its group is (`readyReplicas`), which
is what `group_ready()` reads: the group is ready as a whole or not at all.

Workers carry the Deployment's labels but not its color, so the Services (which select a color) reach the leaders
only: the sidecar is the only port, as in a one-node replica. A color's PodDisruptionBudget counts leaders and
workers (`pdb`).
"""

from __future__ import annotations

import copy
from typing import Any

from . import deployment as d

LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_RESOURCE = "leaderworkersets.leaderworkerset.x-k8s.io"
#: the Ray head's port on the leader (perennial_server.vllm.RAY_PORT)
RAY_PORT = 6379
ROLE_LABEL = "perennial.ai/role"
#: The label LeaderWorkerSet puts on every pod of a set, leader and workers (`leaderworkerset.sigs.k8s.io/name`).
SET_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"


def group_size(s: d.Serving) -> int:
    return s.spec.engine.pipeline_parallel_size


def leader_template(s: d.Serving, color: str, revision: str) -> dict[str, Any]:
    """The serving pod, its engine starting the Ray head of the group first."""
    tpl = d.pod_template(s, color, revision)
    tpl["metadata"]["labels"][ROLE_LABEL] = "leader"
    engine = next(c for c in tpl["spec"]["containers"] if c["name"] == "engine")
    if engine["command"] != ["perennial-server"] or engine["args"][:1] != ["vllm"]:
        raise ValueError("`pipelineParallelSize` above 1 needs `engine.type` 'VLLM'")
    engine["args"] = [*engine["args"], "--ray-head"]
    engine.setdefault("ports", []).append({"name": "ray", "containerPort": RAY_PORT, "protocol": "TCP"})
    return tpl


def worker_template(s: d.Serving, leader: dict[str, Any]) -> dict[str, Any]:
    """A worker: the engine's image, GPUs, model volumes and scheduling, running a Ray node of the leader's cluster."""
    spec = copy.deepcopy(leader["spec"])
    engine = next(c for c in spec["containers"] if c["name"] == "engine")
    worker = {k: v for k, v in engine.items() if k not in ("args", "command", "ports", "startupProbe", "readinessProbe", "livenessProbe", "lifecycle")}
    worker["command"] = ["ray", "start", "--block", f"--address=$(LWS_LEADER_ADDRESS):{RAY_PORT}", "--disable-usage-stats"]
    spec["containers"] = [worker]
    used = {m["name"] for m in worker.get("volumeMounts") or []}
    spec["volumes"] = [v for v in spec.get("volumes") or [] if v["name"] in used]
    labels = {k: v for k, v in leader["metadata"]["labels"].items() if k != d.LABEL_COLOR}
    labels[ROLE_LABEL] = "worker"
    return {"metadata": {"labels": labels}, "spec": spec}


def leader_worker_set(s: d.Serving, color: str, revision: str, replicas: int | None) -> dict[str, Any]:
    """The LeaderWorkerSet of one color: `replicas` groups (None: the autoscaler's, through its /scale)."""
    dep = d.deployment(s, color, revision, replicas)
    leader = leader_template(s, color, revision)
    spec: dict[str, Any] = {
        "leaderWorkerTemplate": {
            "size": group_size(s),
            "restartPolicy": "RecreateGroupOnPodRestart",
            "leaderTemplate": leader,
            "workerTemplate": worker_template(s, leader),
        },
        # workers start with the leader; the leader's engine waits for them (its startup probe covers it)
        "startupPolicy": "LeaderCreated",
        "rolloutStrategy": {"type": "RollingUpdate", "rollingUpdateConfiguration": {"maxSurge": 1, "maxUnavailable": 0}},
    }
    if replicas is not None:
        spec["replicas"] = replicas
    return {"apiVersion": LWS_API, "kind": "LeaderWorkerSet", "metadata": dep["metadata"], "spec": spec}


def group_ready(lws: dict[str, Any] | None) -> tuple[int, int]:
    """(groups ready, groups wanted) of a LeaderWorkerSet: a group counts only when all its pods are ready, and
    only once the controller has seen the current spec (an older generation's count says nothing of this one)."""
    if lws is None:
        return 0, 0
    spec, status, meta = lws.get("spec") or {}, lws.get("status") or {}, lws.get("metadata") or {}
    wanted = int(spec.get("replicas", 1))
    if int(status.get("observedGeneration") or 0) < int(meta.get("generation") or 1):
        return 0, wanted
    return min(int(status.get("readyReplicas") or 0), int(status.get("updatedReplicas") or 0)), wanted


# ----------------------------------------------------------------------------- what the Deployment controller plugs in


def workload_kind(s: d.Serving) -> tuple[str, str]:
    """(apiVersion, kind) of a color's workload: a LeaderWorkerSet across nodes, else an apps/v1 Deployment."""
    return (LWS_API, "LeaderWorkerSet") if group_size(s) > 1 else ("apps/v1", "Deployment")


def workload(s: d.Serving, color: str, revision: str, replicas: int | None) -> dict[str, Any]:
    """A color's workload, named as the apps/v1 Deployment of a one-pod-per-replica spec would be."""
    return leader_worker_set(s, color, revision, replicas) if group_size(s) > 1 else d.deployment(s, color, revision, replicas)


def pdb(s: d.Serving, color: str) -> dict[str, Any]:
    """A color's PodDisruptionBudget. Across nodes it counts every pod of the color's groups (by LeaderWorkerSet's
    own label; workers carry no color), so a drain evicts one pod, hence one group, at a time."""
    out = d.pdb(s, color)
    if group_size(s) > 1:
        sel = {k: v for k, v in d.selector(s, color).items() if k != d.LABEL_COLOR}
        out["spec"]["selector"]["matchLabels"] = {**sel, SET_NAME_LABEL: d.deployment_name(s.prefix, color)}
    return out


def scale_target(s: d.Serving, color: str) -> dict[str, Any]:
    """What an autoscaler scales (LeaderWorkerSet has a /scale subresource: replicas are groups)."""
    api_version, kind = workload_kind(s)
    return {"apiVersion": api_version, "kind": kind, "name": d.deployment_name(s.prefix, color)}
