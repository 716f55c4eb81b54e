"""Children of a TrainingRun: the resolved run config and the training Job (pure builders).

The run config is the trainer's contract (`perennial_trainer.config.RunConfig`):
the TrainingRun spec plus everything the operator resolved (weights, parent
artifact, RewardSpec, output URI). It holds no secrets (those are mounted by
reference), so it is a ConfigMap.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse


from ..api.exitcodes import PERMANENT_EXIT_CODES
from ..api.rewardspec import RewardSpecSpec
from ..api.trainingrun import TrainingRunSpec
from . import networkpolicy as netpol
from .common import child_name, labels, owned_metadata, to_yaml
from .networkpolicy import EgressSettings
from .podsecurity import SCRATCH, PodSettings, container_security_context, ephemeral_resources, harden_pod, projected_secrets, scratch_env

CONFIG_MOUNT = "/etc/perennial"
CONFIG_FILE = f"{CONFIG_MOUNT}/run.yaml"
PVC_ROOT = "/mnt/pvc"
SECRETS_DIR = "/var/run/secrets/perennial"
CHECKPOINT_DIR = "/var/lib/perennial/checkpoints"
TERMINATION_LOG = "/dev/termination-log"


def config_name(run: str) -> str:
    return child_name(run, "config")


def job_name(run: str) -> str:
    return child_name(run, "train")


def output_uri(spec: TrainingRunSpec, default_prefix: str, namespace: str, run: str) -> str:
    prefix = (spec.output.artifact_uri or default_prefix).rstrip("/")
    return f"{prefix}/{namespace}/{run}"


def is_local_uri(uri: str) -> bool:
    return uri.startswith("/") or urlparse(uri).scheme in ("pvc", "file")


def run_config(
    body: dict[str, Any],
    spec: TrainingRunSpec,
    *,
    base_model_uri: str,
    output: str,
    parent_adapter_uri: str | None,
    reward_spec: RewardSpecSpec | None,
    eval_reward_spec: RewardSpecSpec | None,
    feedback_store_uri: str | None,
) -> dict[str, Any]:
    meta = body["metadata"]
    config: dict[str, Any] = {
        "runName": meta["name"],
        "namespace": meta["namespace"],
        "runUid": meta.get("uid"),
        "spec": spec.to_dict(),
        "baseModelUri": base_model_uri,
        "outputUri": output,
    }
    if parent_adapter_uri:
        config["parentAdapterUri"] = parent_adapter_uri
    if reward_spec is not None:
        config["rewardSpec"] = reward_spec.to_dict()
    if eval_reward_spec is not None:
        config["evalRewardSpec"] = eval_reward_spec.to_dict()
    if feedback_store_uri:
        config["feedbackStoreUri"] = feedback_store_uri
    if not is_local_uri(output):
        # Object-store outputs: the trainer checkpoints into an emptyDir and mirrors each checkpoint to
        # `<output>/checkpoints`, from which a retried pod (restartPolicy Never: a new pod) resumes.
        # Local outputs keep their checkpoints on the volume, next to the artifact.
        config["checkpointDir"] = CHECKPOINT_DIR
    return {k: v for k, v in config.items() if v is not None}


def config_map(body: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    name = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owned_metadata(body, config_name(name), labels("TrainingRun", name, "run-config")),
        "data": {"run.yaml": to_yaml(config)},
    }


def _claims(uris: list[str | None]) -> list[str]:
    out: list[str] = []
    for uri in uris:
        if uri and uri.startswith("pvc://"):
            claim = urlparse(uri).netloc
            if claim and claim not in out:
                out.append(claim)
    return out


def _resources(spec: TrainingRunSpec, pods: PodSettings = PodSettings()) -> dict[str, Any]:
    res = spec.resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if res.gpus:
        requests[res.gpu_resource_name] = limits[res.gpu_resource_name] = res.gpus
    # a run that names no CPU or memory still requests the operator's minimum (never BestEffort: first evicted)
    requests["cpu"] = res.cpu or pods.trainer_cpu_request
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    else:
        requests["memory"] = pods.trainer_memory_request
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def judge_secrets(*specs: RewardSpecSpec | None) -> list[tuple[str, str]]:
    """(secret, key) pairs the graders need (LLM judge API keys)."""
    out: list[tuple[str, str]] = []
    for rs in specs:
        for g in rs.graders if rs else []:
            ref = g.llm_judge.api_key_secret_ref if g.llm_judge else None
            if ref and (ref.name, ref.key) not in out:
                out.append((ref.name, ref.key))
    return out


def pod_failure_policy(container: str = "trainer") -> dict[str, Any]:
    """Permanent trainer failures (`perennial.api.exitcodes`) fail the Job at once; evictions and
    preemptions (`DisruptionTarget`) are not counted against `backoffLimit`; other failures count."""
    return {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In", "values": list(PERMANENT_EXIT_CODES)}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def _output_mount(output: str | None) -> tuple[str, str] | None:
    """(claim, path inside it) of a `pvc://` output."""
    if output and output.startswith("pvc://"):
        parsed = urlparse(output)
        return parsed.netloc, parsed.path.strip("/")
    return None


def job(
    body: dict[str, Any],
    spec: TrainingRunSpec,
    config: dict[str, Any],
    *,
    image: str,
    credential_secrets: list[str],
    judge_keys: list[tuple[str, str]],
    pods: PodSettings = PodSettings(),
) -> dict[str, Any]:
    name = body["metadata"]["name"]
    pod_labels = labels("TrainingRun", name, "trainer")
    shm = spec.resources.shared_memory or pods.shared_memory
    volumes: list[dict[str, Any]] = [
        {"name": "run-config", "configMap": {"name": config_name(name)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
        {"name": "checkpoints", "emptyDir": {"sizeLimit": pods.trainer_checkpoints}},
        {"name": "tmp", "emptyDir": {"sizeLimit": pods.trainer_scratch}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "run-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "checkpoints", "mountPath": CHECKPOINT_DIR},
        {"name": "tmp", "mountPath": SCRATCH},
    ]
    # Inputs (base-model cache, parent adapter, datasets, feedback store) are mounted read-only; the output
    # claim is writable only below the run's own output directory (other runs' adapters on the same claim
    # stay out of reach).
    output = _output_mount(config.get("outputUri"))
    inputs = [config.get("baseModelUri"), config.get("parentAdapterUri"), config.get("feedbackStoreUri")]
    inputs += [d.uri for d in spec.datasets] + [d.feedback.store_uri for d in spec.datasets if d.feedback]
    inputs += [d.feedback.snapshot for d in spec.datasets if d.feedback and d.feedback.snapshot]  # a snapshot given as a URI
    input_claims = _claims(inputs)
    claims = _claims(inputs + [config.get("outputUri")])
    out_claim, out_path = output or ("", "")
    for i, claim in enumerate(claims):
        vol = f"pvc-{i}"
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": claim != out_claim}})
        if claim in input_claims or (claim == out_claim and not out_path):
            mounts.append({"name": vol, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": claim != out_claim or bool(out_path)})
        if claim == out_claim and out_path:
            # nested below the read-only root mount (when the claim holds inputs too): listed after it
            mounts.append({"name": vol, "mountPath": f"{PVC_ROOT}/{claim}/{out_path}", "subPath": out_path})
    if judge_keys:
        volumes.append(projected_secrets(judge_keys))
        mounts.append({"name": "grader-secrets", "mountPath": SECRETS_DIR, "readOnly": True})
    container: dict[str, Any] = {
        "name": "trainer",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["perennial-trainer"],
        "args": ["train", "--config", CONFIG_FILE],
        "env": [
            {"name": "PERENNIAL_PVC_ROOT", "value": PVC_ROOT},
            {"name": "PERENNIAL_SECRETS_DIR", "value": SECRETS_DIR},
            {"name": "PERENNIAL_TERMINATION_LOG", "value": TERMINATION_LOG},
            {"name": "HF_HOME", "value": f"{SCRATCH}/hf"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *scratch_env(),
        ],
        "envFrom": [{"secretRef": {"name": s}} for s in credential_secrets],
        "volumeMounts": mounts,
        "resources": ephemeral_resources(_resources(spec, pods), pods.trainer_scratch, pods.trainer_checkpoints, allowance=pods.log_allowance),
        "securityContext": container_security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if not container["envFrom"]:
        del container["envFrom"]
    if spec.resources.gpus > 1:
        # one trainer process per GPU: the trainer's launcher runs torchrun (DDP, or FSDP2 for big models) in the pod
        container["args"] += ["--nproc-per-node", str(spec.resources.gpus)]
    pod_spec: dict[str, Any] = harden_pod({
        # Never (podFailurePolicy requires it): a retry is a new pod; it resumes from the checkpoints on the
        # output volume, or mirrored to the object store (see run_config).
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": volumes,
    }, pods.image_pull_secrets)
    res = spec.resources
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [t.to_dict() for t in res.tolerations]
    if res.affinity:
        pod_spec["affinity"] = res.affinity
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    if spec.run_policy.service_account_name:
        pod_spec["serviceAccountName"] = spec.run_policy.service_account_name
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.run_policy.backoff_limit,
        "podFailurePolicy": pod_failure_policy(container["name"]),
        "ttlSecondsAfterFinished": spec.run_policy.ttl_seconds_after_finished,
        # every Job has a deadline: the run's own, else the operator's
        "activeDeadlineSeconds": spec.run_policy.active_deadline_seconds or pods.training_deadline_seconds,
        "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": owned_metadata(body, job_name(name), pod_labels),
        "spec": job_spec,
    }


def network_policy(body: dict[str, Any], config: dict[str, Any], settings: EgressSettings) -> dict[str, Any]:
    """The trainer pods' NetworkPolicy: no ingress; egress to DNS and what the run config names."""
    name = body["metadata"]["name"]
    return netpol.network_policy(body, netpol.policy_name(name), labels("TrainingRun", name, "trainer"),
                                 netpol.training_destinations(config, settings), settings, "trainer-network")


def adapter_name(family: str, version: int) -> str:
    return f"{family}-v{version}"


def adapter(
    body: dict[str, Any],
    spec: TrainingRunSpec,
    *,
    version: int,
    artifact_uri: str,
    lineage: dict[str, Any] | None,
) -> dict[str, Any]:
    """The Adapter a successful run produces. No ownerReference: adapters outlive their runs."""
    meta = body["metadata"]
    family = spec.output.adapter_family
    lineage = lineage or {}
    datasets = []
    for d in lineage.get("datasets") or []:
        entry = {"name": str(d.get("name", ""))[:63], "uri": str(d.get("uri", "")), "sha256": str(d.get("sha256", ""))}
        if isinstance(d.get("rows"), int):
            entry["rows"] = d["rows"]
        datasets.append(entry)
    if not datasets:
        datasets = [{"name": d.name, "uri": d.uri or "feedback", "sha256": d.sha256 or ""} for d in spec.datasets]
    adapter_lineage: dict[str, Any] = {
        "trainingRunRef": {"name": meta["name"]},
        "trainingRunUid": meta["uid"],
        "method": spec.method,
        "datasets": datasets[:16],
    }
    # The parent as resolved (from parentAdapterRef, parentTrainingRunRef or parentAdapterFamily) into the status.
    parent = ((body.get("status") or {}).get("parentAdapterRef") or {}).get("name") or (
        spec.parent_adapter_ref.name if spec.parent_adapter_ref else None)
    if parent:
        adapter_lineage["parentAdapterRef"] = {"name": parent}
    if lineage.get("configHash"):
        adapter_lineage["configHash"] = str(lineage["configHash"])[:64]
    return {
        "apiVersion": body["apiVersion"],
        "kind": "Adapter",
        "metadata": {
            "name": adapter_name(family, version),
            "namespace": meta["namespace"],
            "labels": {
                "app.kubernetes.io/name": "perennial",
                "app.kubernetes.io/part-of": "perennial",
                "app.kubernetes.io/managed-by": "perennial-operator",
                "perennial.ai/adapter-family": family,
                "perennial.ai/trainingrun": meta["name"],
                "perennial.ai/basemodel": spec.base_model_ref.name,
            },
        },
        "spec": {
            "baseModelRef": {"name": spec.base_model_ref.name},
            "family": family,
            "version": version,
            "artifactUri": artifact_uri,
            "lora": {"rank": spec.lora.rank, "alpha": spec.lora.alpha, "targetModules": list(spec.lora.target_modules)},
            "lineage": adapter_lineage,
        },
    }
