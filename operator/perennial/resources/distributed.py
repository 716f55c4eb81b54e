"""Multi-node training (`resources.nodes` > 1): one group of trainer pods on an existing engine (pure builders).

The engines, in the order `Auto` prefers them when the cluster serves them:

- `TrainJob` (Kubeflow Trainer v2, `trainer.kubeflow.org/v1alpha1`): the run's ClusterTrainingRuntime (torch)
  makes the JobSet, injects torchrun's `PET_*` variables (nodes, processes per node, node rank, master
  address) and owns the failure policy; our pod settings (volumes, mounts, security contexts, scheduling)
  go in as a runtime patch.
- `JobSet` (`jobset.x-k8s.io/v1alpha2`): one replicated indexed Job of `nodes` pods with DNS hostnames; a
  failed pod fails its Job (backoffLimit 0) and the JobSet restarts every Job of the group, up to
  `runPolicy.backoffLimit` times; a permanent trainer error (its exit codes) fails the JobSet at once.
- `IndexedJob` (built in, always there): an indexed `batch/v1` Job of `nodes` pods and a headless Service
  giving each pod a DNS name (what Kubeflow's PyTorchJob did). torchrun's c10d rendezvous, hosted on pod 0,
  joins them. A failed worker fails its pod, the other pods' workers fail on their next collective, the Job
  replaces the pods and the group meets again in a new rendezvous round (resuming from the last checkpoint),
  up to `runPolicy.backoffLimit` restarts of the group; a permanent trainer error fails the Job at once; a
  failed Job ends every pod: never a half-group.

Every pod runs the trainer's own launcher (`perennial-trainer train --nnodes ...`, torchrun inside), as a
one-node run with several GPUs does.
Each builder takes the single-pod Job `trainingrun.job()` builds (volumes, mounts, security, resources) and
turns it into the group, so one pod of a group is configured exactly like the pod of a one-node run.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Mapping
from typing import Any

from ..api.trainingrun import TrainingRunSpec
from . import conditions as cond
from .common import labels, owned_metadata
from .trainingrun import CONFIG_FILE, job_name

JOB = "Job"
INDEXED_JOB = "IndexedJob"
JOBSET = "JobSet"
TRAINJOB = "TrainJob"

JOBSET_API = "jobset.x-k8s.io/v1alpha2"
TRAINJOB_API = "trainer.kubeflow.org/v1alpha1"
#: discovery ids (`<plural>.<group>`) of the optional engines' resources
JOBSET_RESOURCE = "jobsets.jobset.x-k8s.io"
TRAINJOB_RESOURCE = "trainjobs.trainer.kubeflow.org"
#: the replicated Job of a JobSet, and the container name Kubeflow's torch runtimes give the trainer
REPLICATED_JOB = "node"
TRAINJOB_CONTAINER = "node"
#: who owns our runtime patch of a TrainJob
PATCH_MANAGER = "perennial.ai/operator"
#: the label the Job controller puts on each pod of an indexed Job
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

#: (engine, apiVersion, kind) of the object each engine's group is
GROUP_KINDS = ((INDEXED_JOB, "batch/v1", "Job"), (JOBSET, JOBSET_API, "JobSet"), (TRAINJOB, TRAINJOB_API, "TrainJob"))
_SERVES = {TRAINJOB: TRAINJOB_RESOURCE, JOBSET: JOBSET_RESOURCE}
#: the resources an engine choice may depend on
OPTIONAL_ENGINE_RESOURCES = frozenset(_SERVES.values())


class EngineNotInstalled(ValueError):
    """The run names an engine whose CRD the cluster does not serve."""


class EngineUnknown(ValueError):
    """Whether the cluster serves what the choice depends on is not known yet (discovery has not answered)."""


def _known(resource: str, unknown: Collection[str]) -> None:
    if resource in unknown:
        raise EngineUnknown(f"whether the cluster serves {resource} is not known yet (the API server's discovery has not "
                            f"answered for it); the run starts once it has")


def choose_engine(spec: TrainingRunSpec, served: Collection[str], started: str | None = None,
                  unknown: Collection[str] = ()) -> str:
    """What runs the trainer: `Job` for one node; for more, the engine named, or under `Auto` the first of
    TrainJob, JobSet the cluster serves (`served`: discovery ids, as of now: CRDs installed or removed while the
    operator runs count), else `IndexedJob`. `started`: the engine the run's group was made on (its status), kept
    whatever the cluster serves now: a run never changes engine (a removed one fails it). `unknown`: resources
    whether served or not is not known yet: a choice that depends on one raises EngineUnknown (the run waits;
    failing it, or starting it on another engine, would be for good)."""
    if started in (JOB, INDEXED_JOB, JOBSET, TRAINJOB):
        if started in _SERVES and _SERVES[started] not in served:
            _known(_SERVES[started], unknown)
            raise EngineNotInstalled(
                f"the run started on {started}, but the cluster no longer serves {_SERVES[started]} (its CRD was removed, and its "
                f"{started}s with it); a run never changes engine: create the run again to train on what is installed now")
        return started
    res = spec.resources
    if res.nodes <= 1:
        return JOB
    wanted = res.distributed.engine
    if wanted == "Auto":
        for engine in (TRAINJOB, JOBSET):
            if _SERVES[engine] in served:
                return engine
            _known(_SERVES[engine], unknown)
        return INDEXED_JOB
    if wanted in _SERVES and _SERVES[wanted] not in served:
        _known(_SERVES[wanted], unknown)
        raise EngineNotInstalled(
            f"`resources.distributed.engine` is '{wanted}' but the cluster does not serve {_SERVES[wanted]} (its CRD is not "
            f"installed); install it, or use 'Auto' or 'IndexedJob'")
    return wanted


def procs_per_node(spec: TrainingRunSpec) -> int:
    """Trainer processes per pod: one per GPU, one on CPU."""
    return max(1, spec.resources.gpus)


def service_name(run: str) -> str:
    """The headless Service of an IndexedJob group: named as its Job (pods are `<job>-<index>.<service>`)."""
    return job_name(run)


def rendezvous_endpoint(engine: str, run: str, namespace: str, port: int) -> str:
    """Pod 0's stable DNS name and the c10d port (IndexedJob, JobSet)."""
    name = job_name(run)
    if engine == INDEXED_JOB:
        host = f"{name}-0.{service_name(run)}"
    elif engine == JOBSET:
        host = f"{name}-{REPLICATED_JOB}-0-0.{name}"
    else:
        raise ValueError(f"no rendezvous endpoint of our own on {engine}")
    return f"{host}.{namespace}.svc:{port}"


#: What a TrainJob's torch runtime tells each pod: pod 0's address and port (the rendezvous host).
TRAINJOB_ENDPOINT = "$(PET_MASTER_ADDR):$(PET_MASTER_PORT)"


def launcher_command(spec: TrainingRunSpec, endpoint: str, run_id: str) -> list[str]:
    """The trainer's own launcher in each pod (`perennial-trainer train ... --nnodes`): torchrun with the c10d
    rendezvous on `endpoint`, one process per GPU, this pod's node rank from `$JOB_COMPLETION_INDEX`. Through the
    launcher (not a bare torchrun) a worker's exit code is the pod's, so a permanent trainer error still fails the
    group at once (the podFailurePolicy), and the workers' output passes the trainer's log redaction."""
    return ["perennial-trainer", "train", "--config", CONFIG_FILE, "--nproc-per-node", str(procs_per_node(spec)),
            "--nnodes", str(spec.resources.nodes), "--rdzv-endpoint", endpoint, "--rdzv-id", run_id]


def _env(spec: TrainingRunSpec) -> list[dict[str, str]]:
    out = [{"name": "PERENNIAL_NODES", "value": str(spec.resources.nodes)}]
    return out + [{"name": e.name, "value": e.value} for e in spec.resources.distributed.env]


def _group_pod(job: dict[str, Any], spec: TrainingRunSpec, command: list[str] | None) -> dict[str, Any]:
    """The single-pod Job's pod template, as one pod of the group (a copy)."""
    tpl = copy.deepcopy(job["spec"]["template"])
    container = tpl["spec"]["containers"][0]
    if command is not None:
        container["command"] = command[:1]
        container["args"] = command[1:]
        container["ports"] = [{"name": "rendezvous", "containerPort": spec.resources.distributed.rendezvous_port, "protocol": "TCP"}]
    container["env"] = [*container.get("env", []), *_env(spec)]
    return tpl


def indexed_job(body: dict[str, Any], spec: TrainingRunSpec, job: dict[str, Any]) -> dict[str, Any]:
    """`nodes` pods of one indexed Job, each reachable as `<job>-<index>.<service>`, joined by torchrun's c10d."""
    meta = body["metadata"]
    port = spec.resources.distributed.rendezvous_port
    endpoint = rendezvous_endpoint(INDEXED_JOB, meta["name"], meta["namespace"], port)
    out = copy.deepcopy(job)
    tpl = _group_pod(job, spec, launcher_command(spec, endpoint, meta.get("uid") or meta["name"]))
    tpl["spec"]["subdomain"] = service_name(meta["name"])
    nodes = spec.resources.nodes
    # The group's failures together (not per index). One failed worker takes its pod down; the pods it was
    # training with fail on their next collective and go too (each launcher allows no restart of its own), so
    # one restart of the group costs up to `nodes` pod failures: backoffLimit counts group restarts that way.
    # Past it the Job fails and ends every pod; a permanent trainer error fails it at once (podFailurePolicy).
    out["spec"].update({"completionMode": "Indexed", "completions": nodes, "parallelism": nodes, "template": tpl,
                        "backoffLimit": spec.run_policy.backoff_limit * nodes})
    return out


def headless_service(body: dict[str, Any], spec: TrainingRunSpec) -> dict[str, Any]:
    """DNS names for the pods of an IndexedJob group, published before they are ready (the rendezvous needs them)."""
    name = body["metadata"]["name"]
    port = spec.resources.distributed.rendezvous_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owned_metadata(body, service_name(name), labels("TrainingRun", name, "trainer-group")),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"perennial.ai/trainingrun": name[:63], "app.kubernetes.io/component": "trainer"},
            "ports": [{"name": "rendezvous", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def jobset(body: dict[str, Any], spec: TrainingRunSpec, job: dict[str, Any]) -> dict[str, Any]:
    """One replicated indexed Job of `nodes` pods; a failed pod fails its Job and the JobSet restarts the group."""
    meta = body["metadata"]
    port = spec.resources.distributed.rendezvous_port
    endpoint = rendezvous_endpoint(JOBSET, meta["name"], meta["namespace"], port)
    # no pod retries on its own: JobSet recreates every Job of the group (a clean new rendezvous)
    tpl = _group_pod(job, spec, launcher_command(spec, endpoint, meta.get("uid") or meta["name"]))
    nodes = spec.resources.nodes
    inner = job["spec"]
    job_spec = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,
        "podFailurePolicy": copy.deepcopy(inner["podFailurePolicy"]),
        "activeDeadlineSeconds": inner["activeDeadlineSeconds"],
        "template": tpl,
    }
    pod_labels = job["metadata"]["labels"]
    return {
        "apiVersion": JOBSET_API,
        "kind": "JobSet",
        "metadata": copy.deepcopy(job["metadata"]),
        "spec": {
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1, "template": {"metadata": {"labels": dict(pod_labels)}, "spec": job_spec}}],
            "successPolicy": {"operator": "All"},
            "failurePolicy": {
                "maxRestarts": spec.run_policy.backoff_limit,
                # the podFailurePolicy's FailJob (permanent trainer errors) fails the Job with reason PodFailurePolicy
                "rules": [{"name": "PermanentTrainerError", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}],
            },
            "ttlSecondsAfterFinished": inner["ttlSecondsAfterFinished"],
        },
    }


_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


def secret_env(env_from: list[dict[str, Any]], secret_keys: Mapping[str, Collection[str]]) -> list[dict[str, Any]]:
    """`envFrom` Secrets as one `env` entry per key (a TrainJob's trainer takes `env` only): the keys that are
    valid variable names, as envFrom would take them. A Secret whose keys are unknown is an error."""
    out: list[dict[str, Any]] = []
    for src in env_from:
        name = (src.get("secretRef") or {}).get("name")
        if not name:
            raise ValueError(f"a TrainJob's trainer cannot take envFrom {src}")
        if name not in secret_keys:
            raise ValueError(f"Secret {name!r} is not readable: its keys become the TrainJob trainer's variables")
        out += [{"name": k, "valueFrom": {"secretKeyRef": {"name": name, "key": k}}} for k in sorted(secret_keys[name]) if _ENV_NAME.match(k)]
    return out


def train_job(body: dict[str, Any], spec: TrainingRunSpec, job: dict[str, Any], secret_keys: Mapping[str, Collection[str]] | None = None) -> dict[str, Any]:
    """A Kubeflow TrainJob on the run's ClusterTrainingRuntime; its torch plugin sets torchrun's `PET_*` variables.
    `secret_keys`: the keys of the credential Secrets the pod takes whole (`envFrom`), by Secret name."""
    tpl = _group_pod(job, spec, None)
    pod = tpl["spec"]
    container = pod["containers"][0]
    container["env"] = secret_env(container.pop("envFrom", []), secret_keys or {}) + container["env"]
    pod_labels = job["metadata"]["labels"]
    patch_pod: dict[str, Any] = {
        "volumes": pod["volumes"],
        "containers": [{"name": TRAINJOB_CONTAINER, "volumeMounts": container["volumeMounts"], "securityContext": container["securityContext"]}],
        "securityContext": pod["securityContext"],
    }
    for key in ("nodeSelector", "tolerations", "affinity", "serviceAccountName", "imagePullSecrets"):
        if key in pod:
            patch_pod[key] = pod[key]
    launcher = launcher_command(spec, TRAINJOB_ENDPOINT, (body["metadata"].get("uid") or body["metadata"]["name"]))
    trainer: dict[str, Any] = {
        "image": container["image"],
        "command": launcher[:1],
        "args": launcher[1:],
        "env": container["env"],
        "numNodes": spec.resources.nodes,
        "numProcPerNode": procs_per_node(spec),
        "resourcesPerNode": container["resources"],
    }
    return {
        "apiVersion": TRAINJOB_API,
        "kind": "TrainJob",
        "metadata": copy.deepcopy(job["metadata"]),
        "spec": {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": spec.resources.distributed.training_runtime},
            "trainer": trainer,
            "activeDeadlineSeconds": job["spec"]["activeDeadlineSeconds"],
            "runtimePatches": [{
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {
                    "metadata": {"labels": dict(pod_labels)},
                    "spec": {"replicatedJobs": [{
                        "name": REPLICATED_JOB,
                        "template": {
                            "metadata": {"labels": dict(pod_labels)},
                            "spec": {"template": {"metadata": {"labels": dict(pod_labels)}, "spec": patch_pod}},
                        },
                    }]},
                }},
            }],
        },
    }


def peer_network_policy(body: dict[str, Any]) -> dict[str, Any]:
    """The group's pods may reach each other (rendezvous, NCCL/Gloo on any port); added to the trainer's
    deny-by-default policy (NetworkPolicies add up), nothing else is opened."""
    name = body["metadata"]["name"]
    peers = {"podSelector": {"matchLabels": {"perennial.ai/trainingrun": name[:63], "app.kubernetes.io/component": "trainer"}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": owned_metadata(body, f"{job_name(name)}-peers"[:63], labels("TrainingRun", name, "trainer-network")),
        "spec": {
            "podSelector": copy.deepcopy(peers["podSelector"]),
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [peers]}],
            "egress": [{"to": [copy.deepcopy(peers)]}],
        },
    }


def group(body: dict[str, Any], spec: TrainingRunSpec, job: dict[str, Any], engine: str, *, network_policies: bool,
          secret_keys: Mapping[str, Collection[str]] | None = None) -> list[dict[str, Any]]:
    """The children that run the trainer on `engine` (in creation order), in place of the single-pod `job`."""
    if engine == JOB:
        return [job]
    peers = [peer_network_policy(body)] if network_policies else []
    if engine == INDEXED_JOB:
        return [*peers, headless_service(body, spec), indexed_job(body, spec, job)]
    if engine == JOBSET:
        return [*peers, jobset(body, spec, job)]
    if engine == TRAINJOB:
        return [*peers, train_job(body, spec, job, secret_keys)]
    raise ValueError(f"unknown engine {engine!r}")


# ----------------------------------------------------------------------------- observing a group


def engine_of(obj: dict[str, Any] | None) -> str | None:
    """Which engine an observed group object is."""
    if obj is None:
        return None
    kind = obj.get("kind")
    if kind == "Job":
        return INDEXED_JOB if (obj.get("spec") or {}).get("completionMode") == "Indexed" and ((obj.get("spec") or {}).get("completions") or 1) > 1 else JOB
    return {"JobSet": JOBSET, "TrainJob": TRAINJOB}.get(kind or "")


def job_like_status(obj: dict[str, Any]) -> dict[str, Any]:
    """A group's status as a `batch/v1` Job's (conditions `Complete` / `Failed` with the engine's reason and
    message, `failed` = restarts of the group, `startTime`/`completionTime`), so one decision reads them all."""
    status = obj.get("status") or {}
    kind = obj.get("kind")
    if kind == "Job":
        return status
    conds = status.get("conditions") or []
    done_type = "Completed" if kind == "JobSet" else "Complete"
    out: dict[str, Any] = {}
    complete = cond.get(conds, done_type)
    failed = cond.get(conds, "Failed")
    if complete and complete.get("status") == "True":
        out["conditions"] = [{**complete, "type": "Complete"}]
        out["completionTime"] = complete.get("lastTransitionTime")
    elif failed and failed.get("status") == "True":
        out["conditions"] = [dict(failed)]
    if kind == "JobSet":
        out["failed"] = int(status.get("restarts") or 0)
    else:
        restarts = [int(j.get("failed") or 0) for j in status.get("jobsStatus") or []]
        out["failed"] = sum(restarts)
    return out


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs a group object's pods are made from (what Secrets they are given), as far as it says."""
    spec = obj.get("spec") or {}
    if obj.get("kind") == "Job":
        return [((spec.get("template") or {}).get("spec")) or {}]
    if obj.get("kind") == "JobSet":
        return [((((rj.get("template") or {}).get("spec") or {}).get("template") or {}).get("spec")) or {} for rj in spec.get("replicatedJobs") or []]
    if obj.get("kind") == "TrainJob":
        trainer = spec.get("trainer") or {}
        pods = [{"containers": [{"env": trainer.get("env") or []}]}]
        for patch in spec.get("runtimePatches") or []:
            rjs = ((((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}).get("replicatedJobs")) or []
            pods += [((((rj.get("template") or {}).get("spec") or {}).get("template") or {}).get("spec")) or {} for rj in rjs]
        return pods
    return []


def _index(pod: dict[str, Any]) -> int:
    meta = pod.get("metadata") or {}
    raw = (meta.get("labels") or {}).get(COMPLETION_INDEX) or (meta.get("annotations") or {}).get(COMPLETION_INDEX)
    try:
        return int(raw)
    except (TypeError, ValueError):
        return 0


def _message(pod: dict[str, Any]) -> str:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
        if term.get("message"):
            return str(term["message"])
    return ""


def representative_pod(pods: list[dict[str, Any]], outcome: str | None = None) -> dict[str, Any] | None:
    """The pod whose state and log stand for the group. `outcome` is the group's (`Complete`, `Failed`, None).

    Failed: a failed pod, the one that left the trainer's own word (its termination message) first: its error
    is the group's. Complete: the pod holding the trainer's result (global rank 0 writes it), else pod 0.
    Running: the newest pod 0 not failed. c10d ranks nodes by their sorted host names, and `<job>-0` sorts
    before every other index, so pod 0 hosts rank 0, whose log has the progress lines.
    """
    if not pods:
        return None

    def newest(ps: list[dict[str, Any]]) -> dict[str, Any]:
        return max(ps, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))

    def phase(p: dict[str, Any]) -> str | None:
        return (p.get("status") or {}).get("phase")

    if outcome == "Failed":
        failed = [p for p in pods if phase(p) == "Failed"]
        if failed:
            return newest([p for p in failed if _message(p)] or failed)
    if outcome == "Complete":
        done = [p for p in pods if phase(p) == "Succeeded"]
        with_result = [p for p in done if '"status"' in _message(p)]
        if with_result or done:
            return newest(with_result or [p for p in done if _index(p) == 0] or done)
    first = [p for p in pods if _index(p) == 0]
    alive = [p for p in first if phase(p) != "Failed"]
    return newest(alive or first or pods)
