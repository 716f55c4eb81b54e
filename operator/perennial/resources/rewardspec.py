"""Children of a RewardSpec: the validation Job that runs its `tests` (pure builders)."""

from __future__ import annotations

from typing import Any


from ..api.rewardspec import RewardSpecSpec
from .common import child_name, labels, owned_metadata, restricted_security_context, short_hash, to_yaml
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


def validation_job(body: dict[str, Any], spec: RewardSpecSpec, image: str) -> dict[str, Any]:
    name = body["metadata"]["name"]
    cm_name, job_name = validation_names(name, spec)
    pod_labels = labels("RewardSpec", name, "validation", {"perennial.ai/spec-hash": spec_hash(spec)})
    volumes: list[dict[str, Any]] = [{"name": "spec", "configMap": {"name": cm_name}}, {"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "spec", "mountPath": MOUNT, "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"}]
    keys = judge_secrets(spec)
    if keys:
        volumes.append({"name": "grader-secrets", "projected": {"sources": [{"secret": {"name": s, "items": [{"key": k, "path": f"{s}/{k}"}]}} for s, k in keys]}})
        mounts.append({"name": "grader-secrets", "mountPath": SECRETS_DIR, "readOnly": True})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": owned_metadata(body, job_name, pod_labels),
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": 600,
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [
                        {
                            "name": "validate",
                            "image": image,
                            "command": ["perennial-trainer"],
                            "args": ["grade", "--reward-spec", f"{MOUNT}/rewardspec.yaml", "--tests"],
                            "env": [
                                {"name": "PERENNIAL_TERMINATION_LOG", "value": TERMINATION_LOG},
                                {"name": "PERENNIAL_SECRETS_DIR", "value": SECRETS_DIR},
                            ],
                            "volumeMounts": mounts,
                            # User code runs here (Python graders, code execution): small, hard limits.
                            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
                            "securityContext": restricted_security_context(),
                            "terminationMessagePath": TERMINATION_LOG,
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }
