"""What Kubernetes enforces for the pods that run untrusted code (pure helpers of the Job builders).

Training and validation pods run code the operator does not trust (Python graders, code written by the
model being trained), and the download Job talks to the internet. Each pod gets:

* the `restricted` Pod Security Standard (non-root uid 1000, no capabilities, no privilege escalation,
  RuntimeDefault seccomp) and a read-only root filesystem; what must be writable is an emptyDir:
  `/tmp` (scratch, HOME, caches: `HOME`, `XDG_CACHE_HOME`, `HF_HOME`, `MPLCONFIGDIR`, Triton's and
  Inductor's caches all point below it) and, for the trainer, its checkpoint directory;
* every emptyDir bounded by a `sizeLimit` (the kubelet evicts a pod that writes more), and the
  container's `ephemeral-storage` requested and limited to the sum of its disk-backed emptyDirs plus an
  allowance for its logs, so the scheduler places it where the space is;
* inputs (base-model cache, datasets, parent adapter, feedback store) mounted read-only; the output
  claim writable only below the run's own output directory (a `subPath` mount);
* Secret files mounted `0440` (owner and the pod's fsGroup), no service-account token, no service links
  in the environment;
* a deadline on every Job (`activeDeadlineSeconds`).

Images are used exactly as configured: `repo:tag` or `repo@sha256:<digest>` (pin by digest in
production: the operator's `PERENNIAL_TRAINER_IMAGE` and a run's `runPolicy.image` accept both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

#: uid/gid of the images' `perennial` user (trainer_image/Dockerfile, server_image/Dockerfile).
POD_UID = 1000
#: Secret files: readable by their owner and the pod's fsGroup, by no one else.
SECRET_MODE = 0o440
#: Where the writable scratch emptyDir is mounted; HOME and every cache live below it.
SCRATCH = "/tmp"

_DIGEST = re.compile(r"^[^\s@]+@sha256:[0-9a-f]{64}$")


def image_is_pinned(image: str) -> bool:
    """True for `repo@sha256:<64 hex>` (what a production install should configure)."""
    return bool(_DIGEST.match(image))


@dataclass(frozen=True)
class PodSettings:
    """Operator-wide bounds of the pods it builds (from `OperatorConfig.pod_settings()`)."""

    #: the trainer's `/tmp` emptyDir: HF cache of remote inputs, the staged artifact, grader scratch
    trainer_scratch: str = "20Gi"
    #: the trainer's checkpoint emptyDir (object-store outputs; local outputs checkpoint on their volume)
    trainer_checkpoints: str = "50Gi"
    #: `/dev/shm` (memory-backed) when the run names no `resources.sharedMemory`
    shared_memory: str = "1Gi"
    #: what a trainer requests when its run names no `resources.cpu` / `resources.memory`
    trainer_cpu_request: str = "1"
    trainer_memory_request: str = "2Gi"
    #: `activeDeadlineSeconds` of a training Job whose run sets none
    training_deadline_seconds: int = 7 * 24 * 3600
    validation_scratch: str = "1Gi"
    validation_deadline_seconds: int = 600
    download_scratch: str = "1Gi"
    download_deadline_seconds: int = 6 * 3600
    #: ephemeral storage allowed besides the emptyDirs (container logs; the root filesystem is read-only)
    log_allowance: str = "1Gi"
    #: Secrets the pods pull their images with (names; PERENNIAL_IMAGE_PULL_SECRETS)
    image_pull_secrets: tuple[str, ...] = ()


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")


def quantity_bytes(q: str) -> int:
    """Bytes of a Kubernetes storage quantity (`"20Gi"`, `"500M"`, `"1073741824"`)."""
    m = _QUANTITY.match(str(q).strip())
    if not m:
        raise ValueError(f"{q!r} is not a storage quantity (e.g. '20Gi')")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""] + 0.999)


def add_quantities(*qs: str) -> str:
    """The sum of storage quantities, in Mi (rounded up)."""
    total = sum(quantity_bytes(q) for q in qs)
    return f"{-(-total // 2**20)}Mi"


def scratch_env(root: str = SCRATCH) -> list[dict[str, str]]:
    """HOME and every cache the images' programs write, below the writable scratch directory."""
    return [
        {"name": "HOME", "value": f"{root}/home"},
        {"name": "XDG_CACHE_HOME", "value": f"{root}/cache"},
        {"name": "MPLCONFIGDIR", "value": f"{root}/matplotlib"},
        {"name": "TRITON_CACHE_DIR", "value": f"{root}/cache/triton"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{root}/cache/inductor"},
        {"name": "TMPDIR", "value": root},
    ]


def container_security_context() -> dict[str, Any]:
    """`restricted` Pod Security Standard plus a read-only root filesystem."""
    return {
        "runAsNonRoot": True,
        "runAsUser": POD_UID,
        "runAsGroup": POD_UID,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": POD_UID,
        "runAsGroup": POD_UID,
        "fsGroup": POD_UID,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def harden_pod(pod_spec: dict[str, Any], image_pull_secrets: tuple[str, ...] = ()) -> dict[str, Any]:
    """Pod-level settings every pod of the operator gets (in place; returns it); `image_pull_secrets` by name."""
    if image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in image_pull_secrets]
    pod_spec["automountServiceAccountToken"] = False
    pod_spec["enableServiceLinks"] = False  # no `<SVC>_SERVICE_HOST` variables: the environment is the trainer's own
    pod_spec["securityContext"] = pod_security_context()
    return pod_spec


def ephemeral_resources(resources: dict[str, Any], *disk_empty_dirs: str, allowance: str) -> dict[str, Any]:
    """`resources` with `ephemeral-storage` requested and limited to the emptyDirs plus the allowance."""
    total = add_quantities(*disk_empty_dirs, allowance)
    out = {k: dict(v) for k, v in resources.items()}
    out.setdefault("requests", {})["ephemeral-storage"] = total
    out.setdefault("limits", {})["ephemeral-storage"] = total
    return out


def projected_secrets(keys: list[tuple[str, str]]) -> dict[str, Any]:
    """One projected volume holding `<secret>/<key>` for each (secret, key), mode 0440."""
    return {
        "name": "grader-secrets",
        "projected": {
            "defaultMode": SECRET_MODE,
            "sources": [{"secret": {"name": s, "items": [{"key": k, "path": f"{s}/{k}"}]}} for s, k in keys],
        },
    }


# ----------------------------------------------------------------------------- what comes back from pods

REDACTED = "[REDACTED]"


def secret_values(secret: dict[str, Any] | None, keys: list[str] | None = None) -> list[str]:
    """The values of a Secret's keys (all keys when `keys` is None), as text."""
    import base64

    if not secret:
        return []
    out: list[str] = []
    data = secret.get("data") or {}
    string_data = secret.get("stringData") or {}
    for k in keys if keys is not None else list(data) + list(string_data):
        if k in string_data:
            out.append(str(string_data[k]))
        elif k in data:
            try:
                out.append(base64.b64decode(data[k] or "").decode("utf-8", errors="replace"))
            except ValueError:
                continue
    return [v.strip() for v in out if len(v.strip()) >= 6]


def scrub(text: str, secrets: list[str]) -> str:
    """`text` (from a pod: a termination message, a log line) with every secret value the operator knows for
    it replaced: the operator never copies a referenced Secret into status or Events, whatever the pod wrote.
    The trainer redacts too (`perennial_trainer.redact`); this is the check that does not trust the pod."""
    import base64
    import json

    if not text or not secrets:
        return text
    spellings = set()
    for v in secrets:
        spellings |= {v, json.dumps(v)[1:-1], base64.b64encode(v.encode()).decode().rstrip("=")}
    for s in sorted((s for s in spellings if len(s) >= 6), key=len, reverse=True):
        text = text.replace(s, REDACTED)
    return text
