"""Children of a RewardSpec: the validation Job that runs its `tests` (pure builders)."""

from __future__ import annotations

from typing import Any


from ..api.rewardspec import RewardSpecSpec
from . import networkpolicy as netpol
from .common import child_name, labels, owned_metadata, short_hash, to_yaml
from .networkpolicy import EgressSettings
from .podsecurity import SCRATCH, PodSettings, container_security_context, ephemeral_resources, harden_pod, projected_secrets, scratch_env
from .trainingrun import SECRETS_DIR, TERMINATION_LOG, judge_secrets

MOUNT = "/etc/perennial"


def spec_hash(spec: RewardSpecSpec) -> str:
    return short_hash(spec.to_dict())


def validation_names(name: str, spec: RewardSpecSpec) -> tuple[str, str]:
    """(ConfigMap, Job) names; a changed spec gets new ones, so it is validated again."""
    h = spec_hash(spec)
    return child_name(name, f"tests-{h}"), child_name(name, f"validate-{h}")


def validation_config(body: dict[str, Any], spec: RewardSpecSpec) -> dict[str, Any]:
    name = body["metadata"]["name"]
    cm_name, _ = validation_names(name, spec)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owned_metadata(body, cm_name, labels("RewardSpec", name, "validation")),
        "data": {"rewardspec.yaml": to_yaml(spec.to_dict())},
    }


def validation_job(body: dict[str, Any], spec: RewardSpecSpec, image: str, pods: PodSettings = PodSettings()) -> dict[str, Any]:
    name = body["metadata"]["name"]
    cm_name, job_name = validation_names(name, spec)
    pod_labels = validation_labels(name, spec)
    volumes: list[dict[str, Any]] = [{"name": "spec", "configMap": {"name": cm_name}}, {"name": "tmp", "emptyDir": {"sizeLimit": pods.validation_scratch}}]
    mounts: list[dict[str, Any]] = [{"name": "spec", "mountPath": MOUNT, "readOnly": True}, {"name": "tmp", "mountPath": SCRATCH}]
    keys = judge_secrets(spec)
    if keys:
        volumes.append(projected_secrets(keys))
        mounts.append({"name": "grader-secrets", "mountPath": SECRETS_DIR, "readOnly": True})
    resources = {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": owned_metadata(body, job_name, pod_labels),
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": pods.validation_deadline_seconds,
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": harden_pod({
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "validate",
                            "image": image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["perennial-trainer"],
                            "args": ["grade", "--reward-spec", f"{MOUNT}/rewardspec.yaml", "--tests"],
                            "env": [
                                {"name": "PERENNIAL_TERMINATION_LOG", "value": TERMINATION_LOG},
                                {"name": "PERENNIAL_SECRETS_DIR", "value": SECRETS_DIR},
                                *scratch_env(),
                            ],
                            "volumeMounts": mounts,
                            # User code runs here (Python graders, code execution): small, hard limits.
                            "resources": ephemeral_resources(resources, pods.validation_scratch, allowance=pods.log_allowance),
                            "securityContext": container_security_context(),
                            "terminationMessagePath": TERMINATION_LOG,
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                        }
                    ],
                    "volumes": volumes,
                }, pods.image_pull_secrets),
            },
        },
    }


def validation_labels(name: str, spec: RewardSpecSpec) -> dict[str, str]:
    return labels("RewardSpec", name, "validation", {"perennial.ai/spec-hash": spec_hash(spec)})


def validation_network_policy(body: dict[str, Any], spec: RewardSpecSpec, settings: EgressSettings) -> dict[str, Any]:
    """The validation pods' NetworkPolicy (all validations of this RewardSpec): no ingress; egress to DNS and
    the spec's LLM-judge endpoints."""
    name = body["metadata"]["name"]
    pod_labels = labels("RewardSpec", name, "validation")
    return netpol.network_policy(body, netpol.policy_name(name, "validate-egress"), pod_labels,
                                 netpol.validation_destinations(spec.to_dict(), settings), settings, "validation-network")
