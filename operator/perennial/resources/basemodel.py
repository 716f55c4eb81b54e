"""Children of a BaseModel: the weight cache PVC and its download Job (pure builders)."""

from __future__ import annotations

from typing import Any

from ..api.basemodel import BaseModelSpec
from . import networkpolicy as netpol
from .common import child_name, labels, owned_metadata, short_hash
from .networkpolicy import EgressSettings
from .podsecurity import SCRATCH, PodSettings, container_security_context, ephemeral_resources, harden_pod, scratch_env

CACHE_MOUNT = "/cache"


def cache_claim_name(name: str) -> str:
    return child_name(name, "weights")


def download_job_name(name: str, spec: BaseModelSpec) -> str:
    # The source is part of the name: a changed source downloads again under a new Job.
    return child_name(name, f"download-{short_hash([spec.source.uri, spec.source.revision])}")


def cache_pvc(body: dict[str, Any], spec: BaseModelSpec) -> dict[str, Any]:
    name = body["metadata"]["name"]
    pvc_spec: dict[str, Any] = {
        "accessModes": [spec.cache.access_mode],
        "resources": {"requests": {"storage": spec.cache.size}},
    }
    if spec.cache.storage_class_name:
        pvc_spec["storageClassName"] = spec.cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": owned_metadata(body, cache_claim_name(name), labels("BaseModel", name, "weight-cache")),
        "spec": pvc_spec,
    }


def download_job(body: dict[str, Any], spec: BaseModelSpec, image: str, pods: PodSettings = PodSettings()) -> dict[str, Any]:
    name = body["metadata"]["name"]
    args = ["--source", spec.source.uri, "--dest", f"{CACHE_MOUNT}/model"]
    if spec.source.revision:
        args += ["--revision", spec.source.revision]
    container: dict[str, Any] = {
        "name": "download",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "perennial_trainer.download"],
        "args": args,
        "env": [
            {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/.hf"},
            # The trainer image is offline by default (HF_HUB_OFFLINE=1: training never reaches the Hub); this
            # Job's whole purpose is to download, so it is the one place that turns it off.
            {"name": "HF_HUB_OFFLINE", "value": "0"},
            *scratch_env(),
        ],
        "volumeMounts": [{"name": "cache", "mountPath": CACHE_MOUNT}, {"name": "tmp", "mountPath": SCRATCH}],
        "resources": ephemeral_resources({"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
                                         pods.download_scratch, allowance=pods.log_allowance),
        "securityContext": container_security_context(),
    }
    if spec.source.credentials_secret_ref:
        container["envFrom"] = [{"secretRef": {"name": spec.source.credentials_secret_ref.name}}]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": owned_metadata(body, download_job_name(name, spec), labels("BaseModel", name, "weight-download")),
        "spec": {
            "backoffLimit": 4,
            "activeDeadlineSeconds": pods.download_deadline_seconds,
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {"labels": labels("BaseModel", name, "weight-download")},
                "spec": harden_pod({
                    "restartPolicy": "OnFailure",
                    "containers": [container],
                    "volumes": [
                        {"name": "cache", "persistentVolumeClaim": {"claimName": cache_claim_name(name)}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": pods.download_scratch}},
                    ],
                }, pods.image_pull_secrets),
            },
        },
    }


def download_network_policy(body: dict[str, Any], spec: BaseModelSpec, settings: EgressSettings) -> dict[str, Any]:
    """The download pods' NetworkPolicy: no ingress; egress to DNS and the weights' source."""
    name = body["metadata"]["name"]
    dests = netpol.Destinations()
    dests.add(spec.source.uri, settings)
    return netpol.network_policy(body, netpol.policy_name(name, "download-egress"), labels("BaseModel", name, "weight-download"),
                                 dests.items, settings, "weight-download-network")


# Keys a credentials Secret must hold, per source scheme (any one of the alternatives).
CREDENTIAL_KEYS: dict[str, list[list[str]]] = {
    "hf": [["HF_TOKEN"], ["HUGGING_FACE_HUB_TOKEN"]],
    "s3": [["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]],
    "gs": [["GOOGLE_APPLICATION_CREDENTIALS_JSON"]],
}


def missing_credential_keys(scheme: str, secret: dict[str, Any]) -> list[str]:
    """Keys missing from `secret` for `scheme` ([] when one alternative is complete)."""
    alternatives = CREDENTIAL_KEYS.get(scheme)
    if not alternatives:
        return []
    present = set((secret.get("data") or {}).keys()) | set((secret.get("stringData") or {}).keys())
    best: list[str] | None = None
    for keys in alternatives:
        missing = [k for k in keys if k not in present]
        if not missing:
            return []
        if best is None or len(missing) < len(best):
            best = missing
    return best or []
