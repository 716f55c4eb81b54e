"""Children of a Perennial `Deployment` (serving): pure builders, spec in, manifest dicts out.

Per region and color an `apps/v1` Deployment whose pods run the engine (vLLM through `perennial-server
vllm`, or the CPU engine `perennial-server engine` for `engine.type: Transformers`) on localhost and the
feedback sidecar's ports as the pod's only ports (clients; admin: metrics and routes, behind no Service); per region a stable and a preview Service, a PDB per color, an
HPA or a KEDA ScaledObject on the active color, the routes ConfigMap the sidecar watches (served name ->
adapter), the generated feedback-token Secret and the pods' NetworkPolicy. Names, labels and annotations
are the shared contract of the Deployment controller (see the constants below); nothing here does I/O,
reads a clock or makes up a random value (the token is the caller's).

In the operator's own cluster children carry an ownerReference to the Perennial Deployment; in another
region's cluster they cannot (ownerReferences never cross clusters): labels only, and the controller's
finalizer cleans them up (`Serving.owned`).

`revision(s)` is the pod-level hash: the pod template itself (color and revision left out), so everything
that needs new pods (base model, engine spec, image, resources, engine args, the region's node selector,
sidecar settings, the claims adapters live on) changes it, and adapters, replicas and autoscaling do not.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlparse

from .. import storage
from ..api.basemodel import BaseModelSpec
from ..api.common import ComputeResources
from ..api.deployment import DeploymentSpec, Region
from . import networkpolicy as netpol
from .common import MANAGED_BY as _COMMON_MANAGED_BY
from .common import owner_reference, short_hash
from .networkpolicy import EgressSettings
from .podsecurity import (
    SCRATCH,
    SECRET_MODE,
    add_quantities,
    container_security_context,
    ephemeral_resources,
    harden_pod,
    pod_security_context,
    scratch_env,
)

# ----------------------------------------------------------------------------- contract: names and labels

COLORS = ("blue", "green")
#: the region of a Deployment whose `spec.regions` is empty (the operator's own cluster)
DEFAULT_REGION = "default"

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_DEPLOYMENT = "perennial.ai/deployment"
LABEL_REGION = "perennial.ai/region"
LABEL_COLOR = "perennial.ai/color"
LABEL_REVISION = "perennial.ai/revision"
#: the same value as every other child of the operator (the manager watches built-ins by it)
MANAGED_BY = _COMMON_MANAGED_BY
APP_NAME = "perennial-server"

# The annotations the controller writes on these children (rollout state lives in the world) are defined
# with the API: perennial.api.deployment.SWITCHED_AT_ANNOTATION, SCALE_DOWN_AT_ANNOTATION, ...
#: on the routes ConfigMap: the revision of the routes document it holds
ROUTES_REVISION_ANNOTATION = "perennial.ai/routes-revision"

ENGINE_PORT = 8000
SIDECAR_PORT = 8080
SERVICE_PORT = 80
PORT_NAME = "http"
#: the sidecar's admin port (`--admin-port`): /metrics (its own and the engine's vllm:*) and /perennial/routes (what
#: the controller reads per pod). No Service names it; the NetworkPolicy admits pods of the cluster only.
ADMIN_PORT_NAME = "admin"
ADMIN_PORT = 9090

ROUTES_DIR = "/etc/perennial/routes"
ROUTES_KEY = "routes.json"
ROUTES_FILE = f"{ROUTES_DIR}/{ROUTES_KEY}"
TOKEN_DIR = "/var/run/secrets/perennial/feedback"
TOKEN_KEY = "token"
TOKEN_FILE = f"{TOKEN_DIR}/{TOKEN_KEY}"
ADAPTERS_DIR = "/var/lib/perennial/adapters"
SPOOL_DIR = "/var/spool/perennial"
PVC_ROOT = "/mnt/pvc"
MODEL_DOWNLOAD_DIR = "/var/lib/perennial/hf"

#: uid/gid of the server image's `perennial` user (server_image/Dockerfile)
SERVER_UID = 10001

#: the vLLM metric each `autoscaling.metric` scales on (KEDA queries these; vLLM's own names)
VLLM_METRICS = {
    "RequestsInFlight": "vllm:num_requests_running",
    "QueueLength": "vllm:num_requests_waiting",
    "GPUCacheUsage": "vllm:kv_cache_usage_perc",
}
#: flags of the engines the launcher owns; `engine.extraArgs` must not set them
RESERVED_ENGINE_FLAGS = ("--host", "--port", "--model", "--served-model-name", "--lora-modules", "--engine-spec", "--runtime-lora")

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def label_value(value: str) -> str:
    """`value` as a label value (<= 63 characters; longer ones shortened deterministically with a hash)."""
    if len(value) <= 63:
        return value
    return f"{value[:56].rstrip('-.')}-{short_hash(value, 6)}"


def _fit(name: str, limit: int = 63) -> str:
    if len(name) <= limit:
        return name
    digest = short_hash(name, 6)
    return f"{name[: limit - 7].rstrip('-.')}-{digest}"


def regions(spec: DeploymentSpec) -> list[Region]:
    """The regions of a spec: its `regions`, or the operator's own cluster as region `default`."""
    return list(spec.regions) or [Region(name=DEFAULT_REGION)]


def region_prefix(name: str, spec: DeploymentSpec, region: Region) -> str:
    """`<name>[-<region>]`: the region infix only where several regions share the operator's cluster."""
    local = [r for r in regions(spec) if r.cluster_secret_ref is None]
    if region.cluster_secret_ref is None and len(local) > 1:
        return f"{name}-{region.name}"
    return name


def _service_name(name: str) -> str:
    """A Service name: an RFC 1035 label (starts with a letter, <= 63)."""
    name = _fit(name)
    if not _DNS_LABEL.match(name):
        raise ValueError(f"Service name {name!r} must be an RFC 1035 label (start with a letter): rename the Deployment")
    return name


def deployment_name(prefix: str, color: str) -> str:
    _check_color(color)
    return _fit(f"{prefix}-{color}")


def stable_service_name(prefix: str) -> str:
    return _service_name(prefix)


def preview_service_name(prefix: str) -> str:
    return _service_name(_fit_suffix(prefix, "preview"))


def pdb_name(prefix: str, color: str) -> str:
    return deployment_name(prefix, color)


def autoscaler_name(prefix: str) -> str:
    return _fit(prefix)


def routes_config_map_name(prefix: str) -> str:
    return _fit_suffix(prefix, "routes")


def token_secret_name(name: str) -> str:
    """The generated feedback-token Secret (`<name>-feedback-token`, key `token`)."""
    return _fit_suffix(name, "feedback-token", 253)


def network_policy_name(prefix: str) -> str:
    return _fit_suffix(prefix, "serving")


def _fit_suffix(prefix: str, suffix: str, limit: int = 63) -> str:
    name = f"{prefix}-{suffix}"
    if len(name) <= limit:
        return name
    digest = short_hash(name, 6)
    return f"{prefix[: limit - len(suffix) - 8].rstrip('-.')}-{digest}-{suffix}"


def _check_color(color: str) -> None:
    if color not in COLORS:
        raise ValueError(f"color must be one of {COLORS}, not {color!r}")


def other_color(color: str) -> str:
    _check_color(color)
    return COLORS[1 - COLORS.index(color)]


# ----------------------------------------------------------------------------- settings and inputs


@dataclass(frozen=True)
class ServingSettings:
    """Operator-wide bounds and defaults of serving pods."""

    #: how long a model may take to load before the engine counts as dead (startupProbe budget)
    vllm_startup_seconds: int = 1800  # a 70B model loads for minutes; pulling and compiling too
    cpu_startup_seconds: int = 600
    #: the engine's and the sidecar's `/tmp` (HOME, torch/triton/vLLM caches)
    engine_scratch: str = "10Gi"
    sidecar_scratch: str = "1Gi"
    #: adapters fetched by the sidecar for the engine (an emptyDir both mount)
    adapters_size: str = "20Gi"
    #: `/dev/shm` when the resources name no `sharedMemory`
    shared_memory: str = "1Gi"
    #: what an engine requests when its resources name no cpu / memory
    engine_cpu_request: str = "1"
    engine_memory_request: str = "2Gi"
    #: the sidecar's memory per worker process (request and limit)
    sidecar_memory_per_worker: str = "512Mi"
    #: ephemeral storage besides the emptyDirs (container logs; root filesystems are read-only)
    log_allowance: str = "1Gi"
    #: the sidecar drains in-flight requests this long on SIGTERM (its `--drain-timeout-s`)
    drain_seconds: int = 30
    #: before the sidecar stops listening: time for the endpoints to drop the pod
    endpoint_grace_seconds: int = 5
    #: HPA Pods-metric names as the cluster's custom-metrics adapter exposes vLLM's metrics
    hpa_metrics: tuple[tuple[str, str], ...] = tuple(VLLM_METRICS.items())
    #: KEDA: Prometheus when the spec names none
    prometheus_address: str | None = None
    keda_polling_seconds: int = 30
    #: slow-by-default scaling for GPU pods (a new replica loads for minutes)
    scale_up_stabilization_seconds: int = 120
    scale_up_pods_per_period: int = 2
    scale_up_percent_per_period: int = 50
    scale_up_period_seconds: int = 300
    scale_down_stabilization_seconds: int = 900
    scale_down_pods_per_period: int = 1
    scale_down_period_seconds: int = 600
    #: the feedback store when a Deployment names none (the operator's)
    feedback_store_uri: str | None = None
    #: absolute folders (besides the adapters emptyDir and the claims under PVC_ROOT) whose adapter paths the sidecar
    #: may load: a file:// artifact store on the machine of `perennial dev`; empty in a cluster (`--adapter-roots`)
    adapter_roots: tuple[str, ...] = ()
    #: NetworkPolicy peers the sidecar's admin port admits (e.g. Prometheus' namespace and the API servers' CIDR,
    #: through which the operator reads other regions' pods); empty: any source, like the client port
    admin_ingress_from: tuple[Mapping[str, Any], ...] = ()
    #: Secrets the serving pods pull their images with (names; PERENNIAL_IMAGE_PULL_SECRETS)
    image_pull_secrets: tuple[str, ...] = ()

    def startup_seconds(self, engine_type: str) -> int:
        return self.vllm_startup_seconds if engine_type == "VLLM" else self.cpu_startup_seconds


@dataclass(frozen=True)
class Serving:
    """Everything the builders of one region need, resolved by the controller.

    `body`: the Perennial Deployment object (metadata: name, namespace, uid); `spec`: its typed spec;
    `base_model`: the BaseModel object (its `status.resolvedUri` names where to read the weights);
    `adapters`: the resolved Adapter objects the region may load (their artifact claims are mounted);
    `owned`: ownerReferences on the children (default: only in the operator's own cluster).
    """

    body: Mapping[str, Any]
    spec: DeploymentSpec
    base_model: Mapping[str, Any]
    region: Region
    image: str
    adapters: tuple[Mapping[str, Any], ...] = ()
    settings: ServingSettings = field(default_factory=ServingSettings)
    owned: bool | None = None

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]

    @property
    def namespace(self) -> str:
        return self.body["metadata"]["namespace"]

    @property
    def prefix(self) -> str:
        return region_prefix(self.name, self.spec, self.region)

    @property
    def is_owned(self) -> bool:
        return self.region.cluster_secret_ref is None if self.owned is None else self.owned

    @property
    def base_spec(self) -> BaseModelSpec:
        return BaseModelSpec.model_validate(self.base_model["spec"])

    @property
    def served_base_name(self) -> str:
        return self.spec.engine.served_model_name or self.base_model["metadata"]["name"]

    def adapter(self, name: str) -> Mapping[str, Any]:
        for a in self.adapters:
            if a["metadata"]["name"] == name:
                return a
        raise ValueError(f"adapter {name!r} is not among the resolved adapters")


# ----------------------------------------------------------------------------- labels and metadata


def common_labels(s: Serving) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_NAME: APP_NAME,
        LABEL_DEPLOYMENT: label_value(s.name),
        LABEL_REGION: s.region.name,
    }


def selector(s: Serving, color: str) -> dict[str, str]:
    """The pods of one color in one region (immutable selector of its apps/v1 Deployment)."""
    _check_color(color)
    return {LABEL_NAME: APP_NAME, LABEL_DEPLOYMENT: label_value(s.name), LABEL_REGION: s.region.name, LABEL_COLOR: color}


def selector_string(s: Serving, color: str) -> str:
    """`selector(s, color)` as a label-selector string (e.g. the `/scale` subresource's `status.selector`)."""
    return ",".join(f"{k}={v}" for k, v in selector(s, color).items())


def _metadata(s: Serving, name: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": s.namespace, "labels": {**common_labels(s), **(labels or {})}}
    if s.is_owned:
        meta["ownerReferences"] = [owner_reference(dict(s.body))]
    return meta


# ----------------------------------------------------------------------------- where things are read from


@dataclass(frozen=True)
class ModelLocation:
    """Where the engine reads the weights: `path` (its `--model`), a claim to mount, or the Hub."""

    path: str
    claim: str | None = None
    hub: bool = False
    hub_revision: str | None = None
    credentials_secret: str | None = None


def _pvc(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise ValueError(f"{uri!r} must be pvc://<claim>/<path>")
    return parsed.netloc, parsed.path.strip("/")


def local_path(uri: str) -> str | None:
    """The path inside the pod of a `pvc://`, `file://` or absolute URI (None for remote URIs)."""
    if urlparse(uri).scheme == "pvc":
        _pvc(uri)  # a claim is required
        return storage.local_path(uri, PVC_ROOT).rstrip("/")  # type: ignore[union-attr]
    return storage.local_path(uri, PVC_ROOT)


def model_location(s: Serving) -> ModelLocation:
    """The engine's view of the BaseModel: its cache (resolvedUri) or its source, by reference."""
    spec = s.base_spec
    uri = (s.base_model.get("status") or {}).get("resolvedUri") or spec.source.uri
    creds = spec.source.credentials_secret_ref.name if spec.source.credentials_secret_ref else None
    scheme = urlparse(uri).scheme
    if scheme == "pvc":
        claim, _ = _pvc(uri)
        return ModelLocation(path=local_path(uri) or "", claim=claim)
    if scheme == "file":
        return ModelLocation(path=urlparse(uri).path)
    if scheme == "hf":
        repo = uri[len("hf://"):].strip("/")
        revision = spec.source.revision if uri == spec.source.uri else None
        if revision and s.spec.engine.type != "VLLM":
            raise ValueError("the CPU engine cannot serve a pinned `hf://` revision: enable the BaseModel's `cache`")
        return ModelLocation(path=repo, hub=True, hub_revision=revision, credentials_secret=creds)
    raise ValueError(f"serving weights from {scheme}:// needs the BaseModel's `cache.enabled` (the engine reads a local copy)")


def _adapter_uri(adapter: Mapping[str, Any]) -> str:
    return adapter["spec"]["artifactUri"]


def adapter_claims(s: Serving) -> list[str]:
    """Claims holding the adapters' artifacts (mounted read-only into the engine and the sidecar)."""
    out: list[str] = []
    for a in s.adapters:
        uri = _adapter_uri(a)
        if uri.startswith("pvc://"):
            claim, _ = _pvc(uri)
            if claim not in out:
                out.append(claim)
    return out


def feedback_store_uri(s: Serving) -> str | None:
    if not s.spec.feedback.enabled:
        return None
    return s.spec.feedback.store_uri or s.settings.feedback_store_uri


def effective_resources(s: Serving) -> ComputeResources:
    """What one replica needs: the engine's resources, else the BaseModel's; vLLM gets >= tensorParallelSize GPUs,
    the CPU engine (which never uses a GPU) none of the BaseModel's."""
    res = s.spec.engine.resources or s.base_spec.resources
    if s.spec.engine.type != "VLLM" and s.spec.engine.resources is None and res.gpus:
        res = res.model_copy(update={"gpus": 0})
    if s.spec.engine.type == "VLLM":
        tp = s.spec.engine.tensor_parallel_size
        if res.gpus == 0:
            res = res.model_copy(update={"gpus": tp})
        elif res.gpus < tp:
            raise ValueError(f"`tensorParallelSize` {tp} needs at least {tp} GPUs per replica, the resources give {res.gpus}")
    return res


# ----------------------------------------------------------------------------- containers


def _probe_exec(path: str) -> list[str]:
    """An exec probe of the engine, which listens on 127.0.0.1 only (kubelet's httpGet would dial the pod IP)."""
    code = (f"import sys,urllib.request\n"
            f"try:\n sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:{ENGINE_PORT}{path}', timeout=4).status == 200 else 1)\n"
            f"except Exception:\n sys.exit(1)")
    return ["python3", "-c", code]


def _check_extra_args(args: Sequence[str]) -> None:
    for a in args:
        flag = a.split("=", 1)[0]
        if flag in RESERVED_ENGINE_FLAGS:
            raise ValueError(f"`engine.extraArgs` must not set `{flag}`: the operator owns it")


def engine_args(s: Serving, model: ModelLocation) -> list[str]:
    """The engine container's command line (`perennial-server engine|vllm ...`)."""
    engine = s.spec.engine
    _check_extra_args(engine.extra_args)
    max_len = engine.max_model_len or s.base_spec.max_model_len
    if engine.type == "VLLM":
        spec = engine.model_dump(by_alias=True, exclude_none=True, mode="json", exclude={"resources", "image"})
        if model.hub_revision and "--revision" not in [a.split("=", 1)[0] for a in engine.extra_args]:
            spec["extraArgs"] = [*spec.get("extraArgs", []), "--revision", model.hub_revision]
        # runtime LoRA updating: the sidecar loads and unloads adapters (`/v1/load_lora_adapter`)
        return ["perennial-server", "vllm", "--model", model.path, "--served-model-name", s.served_base_name,
                "--port", str(ENGINE_PORT), "--max-model-len", str(max_len), "--runtime-lora",
                "--engine-spec", json.dumps(spec, sort_keys=True, separators=(",", ":"))]
    args = ["perennial-server", "engine", "--model", model.path, "--served-model-name", s.served_base_name,
            "--host", "127.0.0.1", "--port", str(ENGINE_PORT), "--max-model-len", str(max_len)]
    cpu = effective_resources(s).cpu
    if cpu and re.fullmatch(r"[1-9][0-9]*", cpu) and "--threads" not in engine.extra_args:
        # torch would start a thread per core of the node, not of the request
        args += ["--threads", cpu]
    return args + list(engine.extra_args)


def sidecar_args(s: Serving, revision: str) -> list[str]:
    """The sidecar container's command line (flags of `perennial_server.config.add_sidecar_args`)."""
    fb = s.spec.feedback
    args = ["perennial-server", "sidecar",
            "--upstream", f"http://127.0.0.1:{ENGINE_PORT}", "--host", "0.0.0.0", "--port", str(SIDECAR_PORT),
            "--admin-port", str(ADMIN_PORT),
            "--deployment", s.name, "--namespace", s.namespace, "--revision", revision, "--region", s.region.name,
            "--base-model-name", s.served_base_name, "--spool-dir", SPOOL_DIR, "--token-file", TOKEN_FILE,
            "--sample-percent", str(fb.sample_percent if fb.enabled else 0),
            "--redaction-enabled", "true" if fb.redaction.enabled else "false",
            "--redaction-extra-patterns", json.dumps([p.to_dict() for p in fb.redaction.extra_patterns], separators=(",", ":")),
            "--max-body-bytes", str(fb.max_body_bytes), "--rate-limit-per-second", str(fb.rate_limit_per_second),
            "--workers", str(fb.workers), "--drain-timeout-s", str(s.settings.drain_seconds),
            "--engine-health-path", "/health",
            # the sidecar owns served name -> adapter (routes.py): it watches the mounted document and fetches
            # remote adapters into the emptyDir the engine reads them from
            "--routes-file", ROUTES_FILE, "--adapters-dir", ADAPTERS_DIR]
    store = feedback_store_uri(s)
    if store:
        args += ["--store-uri", local_path(store) or store]
    roots = s.settings.adapter_roots
    if roots:
        if not all(r.startswith("/") and "," not in r for r in roots):
            raise ValueError(f"adapter roots must be absolute paths without ',': {roots!r}")
        args += ["--adapter-roots", ",".join(roots)]
    return args


def _engine_resources(s: Serving, disk: Sequence[str]) -> dict[str, Any]:
    res = effective_resources(s)
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if res.gpus:
        requests[res.gpu_resource_name] = limits[res.gpu_resource_name] = res.gpus
    requests["cpu"] = res.cpu or s.settings.engine_cpu_request
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    else:
        requests["memory"] = s.settings.engine_memory_request
    return ephemeral_resources({"requests": requests, "limits": limits}, *disk, allowance=s.settings.log_allowance)


def _security_context() -> dict[str, Any]:
    return {**container_security_context(), "runAsUser": SERVER_UID, "runAsGroup": SERVER_UID}


@dataclass
class _Volumes:
    volumes: list[dict[str, Any]] = field(default_factory=list)
    claims: dict[str, str] = field(default_factory=dict)  # claim -> volume name

    def claim(self, claim: str, writable: bool = False) -> str:
        vol = self.claims.get(claim)
        if vol is None:
            vol = self.claims[claim] = f"pvc-{len(self.claims)}"
            self.volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}})
        elif writable:
            next(v for v in self.volumes if v["name"] == vol)["persistentVolumeClaim"]["readOnly"] = False
        return vol


def _check_store_apart(s: Serving, model: ModelLocation, claim: str, path: str) -> None:
    """ValueError when the feedback store (written by the sidecar, the pod's internet-facing container) is at, above or
    below what the engine loads from the same claim: the weights and adapters must stay read-only to the sidecar."""
    reads: list[tuple[str, str]] = []
    if model.claim:
        reads.append((model.claim, model.path[len(f"{PVC_ROOT}/{model.claim}"):].strip("/")))
    reads += [_pvc(u) for u in map(_adapter_uri, s.adapters) if u.startswith("pvc://")]
    for c, loaded in reads:
        if c == claim and (not path or not loaded or path == loaded or loaded.startswith(path + "/") or path.startswith(loaded + "/")):
            raise ValueError(f"`feedback.storeUri` pvc://{claim}/{path} overlaps pvc://{c}/{loaded}, which the engine loads: "
                             "give the feedback store a directory of its own (the sidecar writes there)")


def pod_template(s: Serving, color: str, revision: str) -> dict[str, Any]:
    """The serving pod: `engine` (localhost only) and `sidecar` (the only port)."""
    settings = s.settings
    spec = s.spec
    fb = spec.feedback
    res = effective_resources(s)
    model = model_location(s)
    vols = _Volumes()
    shm = res.shared_memory or settings.shared_memory
    token_secret, token_key = feedback_token_ref(s)
    vols.volumes += [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
        {"name": "engine-tmp", "emptyDir": {"sizeLimit": settings.engine_scratch}},
        {"name": "sidecar-tmp", "emptyDir": {"sizeLimit": settings.sidecar_scratch}},
        {"name": "adapters", "emptyDir": {"sizeLimit": settings.adapters_size}},
        {"name": "spool", "emptyDir": {"sizeLimit": fb.spool_size}},
        {"name": "routes", "configMap": {"name": routes_config_map_name(s.prefix), "defaultMode": 0o444}},
        {"name": "feedback-token", "secret": {"secretName": token_secret, "defaultMode": SECRET_MODE,
                                               "items": [{"key": token_key, "path": TOKEN_KEY}]}},
    ]
    engine_disk = [settings.engine_scratch]
    engine_mounts: list[dict[str, Any]] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "engine-tmp", "mountPath": SCRATCH},
        {"name": "adapters", "mountPath": ADAPTERS_DIR, "readOnly": True},
    ]
    sidecar_mounts: list[dict[str, Any]] = [
        {"name": "sidecar-tmp", "mountPath": SCRATCH},
        {"name": "adapters", "mountPath": ADAPTERS_DIR},
        {"name": "spool", "mountPath": SPOOL_DIR},
        {"name": "routes", "mountPath": ROUTES_DIR, "readOnly": True},
        {"name": "feedback-token", "mountPath": TOKEN_DIR, "readOnly": True},
    ]
    engine_env: list[dict[str, Any]] = [*scratch_env(), {"name": "VLLM_CACHE_ROOT", "value": f"{SCRATCH}/cache/vllm"},
                                        {"name": "PERENNIAL_PVC_ROOT", "value": PVC_ROOT}]
    engine_env_from: list[dict[str, Any]] = []
    if model.claim:
        vol = vols.claim(model.claim)
        engine_mounts.append({"name": vol, "mountPath": f"{PVC_ROOT}/{model.claim}", "readOnly": True})
    if model.hub:
        # The image is offline by default (HF_HUB_OFFLINE=1); an uncached hf:// source is downloaded at start
        # into a bounded emptyDir the size of the BaseModel's cache; the token by reference (envFrom).
        size = s.base_spec.cache.size
        vols.volumes.append({"name": "model-download", "emptyDir": {"sizeLimit": size}})
        engine_mounts.append({"name": "model-download", "mountPath": MODEL_DOWNLOAD_DIR})
        engine_disk.append(size)
        engine_env += [{"name": "HF_HOME", "value": MODEL_DOWNLOAD_DIR}, {"name": "HF_HUB_OFFLINE", "value": "0"}]
        if model.credentials_secret:
            engine_env_from.append({"secretRef": {"name": model.credentials_secret}})
    else:
        engine_env.append({"name": "HF_HOME", "value": f"{SCRATCH}/hf"})
    sidecar_env: list[dict[str, Any]] = [
        *scratch_env(),
        {"name": "PERENNIAL_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "PERENNIAL_PVC_ROOT", "value": PVC_ROOT},
    ]
    sidecar_env_from: list[dict[str, Any]] = []
    # adapters on claims: read-only, at the same path in both containers (the engine loads them from there)
    for claim in adapter_claims(s):
        vol = vols.claim(claim)
        for mounts in (engine_mounts, sidecar_mounts):
            if not any(m["mountPath"] == f"{PVC_ROOT}/{claim}" for m in mounts):
                mounts.append({"name": vol, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True})
    store = feedback_store_uri(s)
    if store and store.startswith("pvc://"):
        claim, path = _pvc(store)
        _check_store_apart(s, model, claim, path)
        vol = vols.claim(claim, writable=True)
        # writable only below the store's own directory (subPath), like a trainer's output
        sidecar_mounts.append({"name": vol, "mountPath": f"{PVC_ROOT}/{claim}/{path}".rstrip("/"), **({"subPath": path} if path else {})})
    if fb.enabled and fb.store_credentials_secret_ref:
        sidecar_env_from.append({"secretRef": {"name": fb.store_credentials_secret_ref.name}})
    startup = settings.startup_seconds(spec.engine.type)
    engine_argv = engine_args(s, model)
    engine: dict[str, Any] = {
        "name": "engine",
        "image": s.image,
        "imagePullPolicy": "IfNotPresent",
        "command": engine_argv[:1],
        "args": engine_argv[1:],
        "env": engine_env,
        "volumeMounts": engine_mounts,
        "resources": _engine_resources(s, engine_disk),
        "securityContext": _security_context(),
        # a model loading for minutes is not dead: liveness starts only once the startup probe passed
        "startupProbe": {"exec": {"command": _probe_exec("/health")}, "periodSeconds": 10, "timeoutSeconds": 5,
                         "failureThreshold": max(1, math.ceil(startup / 10))},
        "livenessProbe": {"exec": {"command": _probe_exec("/health")}, "periodSeconds": 15, "timeoutSeconds": 5,
                          "failureThreshold": 4},
        # keep the engine up while the sidecar drains the requests in flight (both get SIGTERM after their preStop)
        "lifecycle": {"preStop": {"sleep": {"seconds": settings.endpoint_grace_seconds + settings.drain_seconds}}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if engine_env_from:
        engine["envFrom"] = engine_env_from
    workers = fb.workers
    sidecar_mem = add_quantities(*[settings.sidecar_memory_per_worker] * workers)
    sidecar_argv = sidecar_args(s, revision)
    sidecar: dict[str, Any] = {
        "name": "sidecar",
        "image": s.image,
        "imagePullPolicy": "IfNotPresent",
        "command": sidecar_argv[:1],
        "args": sidecar_argv[1:],
        "ports": [{"name": PORT_NAME, "containerPort": SIDECAR_PORT, "protocol": "TCP"},
                  {"name": ADMIN_PORT_NAME, "containerPort": ADMIN_PORT, "protocol": "TCP"}],
        "env": sidecar_env,
        "volumeMounts": sidecar_mounts,
        "resources": ephemeral_resources({"requests": {"cpu": str(workers), "memory": sidecar_mem}, "limits": {"memory": sidecar_mem}},
                                         settings.sidecar_scratch, settings.adapters_size, fb.spool_size, allowance=settings.log_allowance),
        "securityContext": _security_context(),
        "startupProbe": {"httpGet": {"path": "/healthz", "port": PORT_NAME}, "periodSeconds": 2, "timeoutSeconds": 2, "failureThreshold": 60},
        # ready = the engine answers its health check and the routes are applied (the sidecar's /readyz)
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": PORT_NAME}, "periodSeconds": 5, "timeoutSeconds": 3,
                           "failureThreshold": 2, "successThreshold": 1},
        # alive = the sidecar's own loop and spool writer; a loading engine never restarts it
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": PORT_NAME}, "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3},
        "lifecycle": {"preStop": {"sleep": {"seconds": settings.endpoint_grace_seconds}}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if sidecar_env_from:
        sidecar["envFrom"] = sidecar_env_from
    pod_labels = {**common_labels(s), LABEL_COLOR: color, LABEL_REVISION: revision}
    spread_selector = {"matchLabels": selector(s, color)} if color else {"matchLabels": {}}
    pod_spec: dict[str, Any] = harden_pod({
        "containers": [engine, sidecar],
        "volumes": vols.volumes,
        "terminationGracePeriodSeconds": settings.endpoint_grace_seconds + settings.drain_seconds + 30,
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": spread_selector}
            for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")
        ],
    }, settings.image_pull_secrets)
    pod_spec["securityContext"] = {**pod_security_context(), "runAsUser": SERVER_UID, "runAsGroup": SERVER_UID, "fsGroup": SERVER_UID}
    node_selector = {**(res.node_selector or {}), **(s.region.node_selector or {})}
    if node_selector:
        pod_spec["nodeSelector"] = dict(sorted(node_selector.items()))
    if res.tolerations:
        pod_spec["tolerations"] = [t.to_dict() for t in res.tolerations]
    if res.affinity:
        pod_spec["affinity"] = res.affinity
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    return {
        "metadata": {
            "labels": pod_labels,
            "annotations": {
                "kubectl.kubernetes.io/default-container": "engine",
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(ADMIN_PORT),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": pod_spec,
    }


def revision(s: Serving) -> str:
    """The pod-level revision: 10 hex chars of sha256 over the pod template (color and revision left out)."""
    template = pod_template(s, "", "")
    if s.spec.engine.pipeline_parallel_size > 1:  # a LeaderWorkerSet per color (`resources.lws`): its builder's checks too
        from . import lws

        lws.leader_worker_set(s, "blue", "", 1)
    return short_hash(template, 10)


def deployment(s: Serving, color: str, revision: str, replicas: int | None) -> dict[str, Any]:
    """The apps/v1 Deployment of one color. `replicas` None leaves the count to the autoscaler (active color)."""
    _check_color(color)
    template = pod_template(s, color, revision)
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector(s, color)},
        "template": template,
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "progressDeadlineSeconds": max(s.spec.strategy.blue_green.progress_deadline_seconds, s.settings.startup_seconds(s.spec.engine.type) + 60),
        "revisionHistoryLimit": 2,
    }
    if replicas is not None:
        if replicas < 0:
            raise ValueError("replicas must not be negative")
        spec["replicas"] = replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(s, deployment_name(s.prefix, color), {LABEL_COLOR: color, LABEL_REVISION: revision}),
        "spec": spec,
    }


# ----------------------------------------------------------------------------- Services and PDB


def _service(s: Serving, name: str, color: str, role: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(s, name, {"perennial.ai/service": role}),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(s, color),
            "ports": [{"name": PORT_NAME, "port": SERVICE_PORT, "targetPort": PORT_NAME, "protocol": "TCP", "appProtocol": "http"}],
        },
    }


def stable_service(s: Serving, active_color: str) -> dict[str, Any]:
    """Clients' Service: selects the active color (which color is active is this selector)."""
    return _service(s, stable_service_name(s.prefix), active_color, "stable")


def preview_service(s: Serving, preview_color: str) -> dict[str, Any]:
    return _service(s, preview_service_name(s.prefix), preview_color, "preview")


def pdb(s: Serving, color: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(s, pdb_name(s.prefix, color), {LABEL_COLOR: color}),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector(s, color)},
            # a pod that never got ready (still loading, crashing) may be evicted: a drain is never blocked by it
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def endpoint(s: Serving, cluster_domain: str = "cluster.local") -> str:
    """In-cluster URL of the stable Service (its OpenAI-compatible API is below `/v1`)."""
    return f"http://{stable_service_name(s.prefix)}.{s.namespace}.svc.{cluster_domain}"


# ----------------------------------------------------------------------------- autoscaling


def _quantity(value: str, what: str) -> str:
    """A positive decimal string as a Kubernetes quantity (`"8"`, `"0.8"` -> `"800m"`)."""
    try:
        d = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{what} {value!r} must be a decimal number") from None
    if not d.is_finite() or d <= 0:
        raise ValueError(f"{what} must be positive, not {value!r}")
    if d == d.to_integral_value():
        return str(int(d))
    milli = d * 1000
    if milli != milli.to_integral_value():
        raise ValueError(f"{what} {value!r} must have at most 3 decimals")
    return f"{int(milli)}m"


def behavior(s: Serving) -> dict[str, Any]:
    """Slow-by-default HPA behavior for GPU pods: scale up after a sustained rise, by a few pods per period;
    scale down one pod at a time after a long quiet window (a replica takes minutes to come back)."""
    st = s.settings
    return {
        "scaleUp": {
            "stabilizationWindowSeconds": st.scale_up_stabilization_seconds,
            "selectPolicy": "Max",
            "policies": [
                {"type": "Pods", "value": st.scale_up_pods_per_period, "periodSeconds": st.scale_up_period_seconds},
                {"type": "Percent", "value": st.scale_up_percent_per_period, "periodSeconds": st.scale_up_period_seconds},
            ],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": st.scale_down_stabilization_seconds,
            "selectPolicy": "Min",
            "policies": [{"type": "Pods", "value": st.scale_down_pods_per_period, "periodSeconds": st.scale_down_period_seconds}],
        },
    }


def _scale_target(s: Serving, active_color: str) -> dict[str, Any]:
    """The active color's workload (a LeaderWorkerSet across nodes: its /scale counts groups)."""
    from . import lws

    return lws.scale_target(s, active_color)


def hpa(s: Serving, active_color: str) -> dict[str, Any]:
    """`autoscaling/v2` HPA on the active color's apps/v1 Deployment."""
    a = s.spec.autoscaling
    if a.min_replicas < 1:
        raise ValueError("an HPA needs `minReplicas` >= 1 (scale to zero needs `provider` 'KEDA')")
    if a.metric == "CPU":
        pct = Decimal(a.target)
        if pct != pct.to_integral_value() or not 1 <= pct <= 1000:
            raise ValueError(f"`target` of metric 'CPU' is a utilization percent (1..1000), not {a.target!r}")
        metric: dict[str, Any] = {"type": "ContainerResource", "containerResource": {
            "name": "cpu", "container": "engine", "target": {"type": "Utilization", "averageUtilization": int(pct)}}}
    else:
        names = dict(s.settings.hpa_metrics)
        metric = {"type": "Pods", "pods": {"metric": {"name": names[a.metric]},
                                           "target": {"type": "AverageValue", "averageValue": _quantity(a.target, "`target`")}}}
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(s, autoscaler_name(s.prefix), {LABEL_COLOR: active_color}),
        "spec": {
            "scaleTargetRef": _scale_target(s, active_color),
            "minReplicas": a.min_replicas,
            "maxReplicas": a.max_replicas,
            "metrics": [metric],
            "behavior": behavior(s),
        },
    }


def _promql_regex(name: str) -> str:
    """An object name (DNS characters) as a RE2 literal inside a PromQL string (a dot is `\\\\.`)."""
    return name.replace(".", "\\\\.")


def keda_query(s: Serving, active_color: str) -> str:
    """PromQL summing the vLLM metric over the active color's pods (`namespace`/`pod` scrape labels)."""
    a = s.spec.autoscaling
    if a.metric == "CPU":
        raise ValueError("KEDA scales on a vLLM metric: `metric` must be one of " + ", ".join(f"'{m}'" for m in VLLM_METRICS))
    deploy = deployment_name(s.prefix, active_color)
    if s.spec.engine.pipeline_parallel_size > 1:
        # a LeaderWorkerSet's leaders (vLLM's API server and metrics): <lws>-<group index>; workers add -<index>
        pods = f"{_promql_regex(deploy)}-[0-9]{{1,9}}"
    else:
        # pod names of an apps/v1 Deployment: <deployment>-<pod-template-hash>-<5 chars>
        pods = f"{_promql_regex(deploy)}-[a-z0-9]{{1,10}}-[a-z0-9]{{5}}"
    return f'sum({VLLM_METRICS[a.metric]}{{namespace="{s.namespace}",pod=~"{pods}"}}) or vector(0)'


#: The wake trigger's threshold: no demand divides into more than one replica by it (it only activates from zero).
WAKE_THRESHOLD = "1000000000"


def scaled_object(s: Serving, active_color: str) -> dict[str, Any]:
    """KEDA ScaledObject on the active color: a Prometheus trigger on the vLLM metric named by `metric`."""
    a = s.spec.autoscaling
    address = a.prometheus_address or s.settings.prometheus_address
    if not address:
        raise ValueError("`autoscaling.prometheusAddress` is required with `provider` 'KEDA' (the operator configures no default)")
    load = s.settings.startup_seconds(s.spec.engine.type)
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(s, autoscaler_name(s.prefix), {LABEL_COLOR: active_color}),
        "spec": {
            "scaleTargetRef": _scale_target(s, active_color),
            "minReplicaCount": a.min_replicas,
            "maxReplicaCount": a.max_replicas,
            "pollingInterval": s.settings.keda_polling_seconds,
            # to zero only after a quiet period longer than a model load; never right after creation
            "cooldownPeriod": load + 300,
            "initialCooldownPeriod": load,
            "triggers": [{
                "type": "prometheus",
                "name": "vllm",
                "metricType": "AverageValue",
                "metadata": {
                    "serverAddress": address,
                    "query": keda_query(s, active_color),
                    "threshold": a.target,
                    "activationThreshold": "0",
                },
            }] + ([{
                # from zero: the engine's metrics exist only while a pod runs, so demand measured before the pods
                # (the user's query) wakes the color; its threshold is out of reach, so it never scales beyond one
                "type": "prometheus",
                "name": "wake",
                "metricType": "AverageValue",
                "metadata": {"serverAddress": address, "query": a.wake_query, "threshold": WAKE_THRESHOLD, "activationThreshold": "0"},
            }] if a.wake_query else []),
            "advanced": {"restoreToOriginalReplicaCount": False, "horizontalPodAutoscalerConfig": {"behavior": behavior(s)}},
        },
    }


def autoscaler(s: Serving, active_color: str) -> dict[str, Any] | None:
    """The HPA or ScaledObject of the spec (None when autoscaling is off)."""
    if not s.spec.autoscaling.enabled:
        return None
    return scaled_object(s, active_color) if s.spec.autoscaling.provider == "KEDA" else hpa(s, active_color)


# ----------------------------------------------------------------------------- routes, token, network policy


@dataclass(frozen=True)
class RouteTarget:
    adapter: str
    weight: int = 100


def adapter_problems(s: Serving, names: Sequence[str]) -> list[str]:
    """Why the adapters `names` (to be loaded together) do not fit this engine; [] when they do."""
    engine = s.spec.engine
    out: list[str] = []
    base = s.spec.base_model_ref.name
    for n in names:
        a = s.adapter(n)
        if a["spec"]["baseModelRef"]["name"] != base:
            out.append(f"Adapter {n!r} is for BaseModel {a['spec']['baseModelRef']['name']!r}, not {base!r}")
        rank = int(a["spec"]["lora"]["rank"])
        if rank > engine.max_lora_rank:
            out.append(f"Adapter {n!r} has LoRA rank {rank} above `engine.maxLoraRank` {engine.max_lora_rank}")
    limit = max(engine.max_loras, engine.max_cpu_loras or 0)
    if len(set(names)) > limit:
        out.append(f"{len(set(names))} adapters loaded at once exceed `engine.maxLoras`/`maxCpuLoras` ({limit})")
    return out


def routes_document(s: Serving, routes: Mapping[str, Sequence[RouteTarget]], loaded: Sequence[str] | None = None) -> dict[str, Any]:
    """routes.json: the adapters to load (`loaded`; default: those routed) and served name -> weighted adapters."""
    routed = [t.adapter for targets in routes.values() for t in targets]
    names = list(dict.fromkeys([*(loaded if loaded is not None else []), *routed]))
    base = s.served_base_name
    for served, targets in routes.items():
        if served == base:
            raise ValueError(f"served name {served!r} must differ from the base model's served name")
        if not targets:
            raise ValueError(f"route {served!r} must name at least one adapter")
        if any(t.weight < 0 for t in targets) or sum(t.weight for t in targets) <= 0:
            raise ValueError(f"route {served!r} must have non-negative weights with a positive sum")
    adapters: dict[str, Any] = {}
    for n in names:
        a = s.adapter(n)
        uri = _adapter_uri(a)
        adapters[n] = {"uri": local_path(uri) or uri, "rank": int(a["spec"]["lora"]["rank"])}
    doc_routes = {served: [{"adapter": t.adapter, "weight": t.weight} for t in targets] for served, targets in sorted(routes.items())}
    body = {"base": {"name": base}, "adapters": adapters, "routes": doc_routes}
    return {"revision": short_hash(body, 10), **body}


def routes_config_map(s: Serving, routes: Mapping[str, Sequence[RouteTarget]], loaded: Sequence[str] | None = None) -> dict[str, Any]:
    doc = routes_document(s, routes, loaded)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**_metadata(s, routes_config_map_name(s.prefix)), "annotations": {ROUTES_REVISION_ANNOTATION: doc["revision"]}},
        "data": {ROUTES_KEY: json.dumps(doc, indent=1, sort_keys=False)},
    }


def feedback_token_ref(s: Serving) -> tuple[str, str]:
    """(Secret, key) the pods mount the feedback token from: `feedback.tokenSecretRef`, else the generated one. In
    another cluster always the Deployment's own copy `<name>-feedback-token` (key `token`): Deployments sharing one
    `tokenSecretRef` would else write (and on deletion delete) one and the same Secret there."""
    ref = s.spec.feedback.token_secret_ref
    return (ref.name, ref.key) if ref and s.region.cluster_secret_ref is None else (token_secret_name(s.name), TOKEN_KEY)


def token_secret(s: Serving, token: str) -> dict[str, Any]:
    """The Secret the pods mount the feedback token from, holding `token` (the caller's value: the generated
    `<name>-feedback-token`, also the name of the copy of a user's `tokenSecretRef` in a remote region).
    The user's own Secret in the operator's cluster is never the operator's to write."""
    import base64

    if len(token) < 16:
        raise ValueError("the feedback token must be at least 16 characters")
    name, key = feedback_token_ref(s)
    if s.spec.feedback.token_secret_ref and s.is_owned:
        raise ValueError(f"Secret {name!r} is the user's (`feedback.tokenSecretRef`): the operator only copies it to other clusters")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _metadata(s, name),
        "data": {key: base64.b64encode(token.encode()).decode()},
    }


def network_policy(s: Serving, settings: EgressSettings | None = None) -> dict[str, Any]:
    """The serving pods' NetworkPolicy: ingress to the sidecar's client port from anywhere and to its admin port from
    `ServingSettings.admin_ingress_from` (default anywhere too: the operator reaches other regions' pods through their
    API server's proxy, which is no pod; no Service names the admin port); egress to DNS, the feedback store, the
    adapters' artifact stores and an uncached model source."""
    settings_admin_from = s.settings.admin_ingress_from
    settings = settings or EgressSettings()
    dests = netpol.Destinations()
    dests.add(feedback_store_uri(s), settings)
    for a in s.adapters:
        dests.add(_adapter_uri(a), settings)
    model = model_location(s)
    if model.hub:
        dests.add(f"hf://{model.path}", settings)
    pods = {"matchLabels": {LABEL_NAME: APP_NAME, LABEL_DEPLOYMENT: label_value(s.name), LABEL_REGION: s.region.name}}
    ingress: list[dict[str, Any]] = [{"ports": [{"protocol": "TCP", "port": SIDECAR_PORT}]},
                                     {**({"from": [dict(p) for p in settings_admin_from]} if settings_admin_from else {}),
                                      "ports": [{"protocol": "TCP", "port": ADMIN_PORT}]}]
    egress = netpol.egress_rules(dests.items, settings)
    if s.spec.engine.pipeline_parallel_size > 1:
        # LeaderWorkerSet groups: Ray (the leader's GCS, the workers' own ports) and NCCL between a group's pods use
        # many ports; these pods (leaders and workers of this Deployment's region) reach each other on any of them
        ingress.append({"from": [{"podSelector": copy.deepcopy(pods)}]})
        egress = [*egress, {"to": [{"podSelector": copy.deepcopy(pods)}]}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(s, network_policy_name(s.prefix)),
        "spec": {
            "podSelector": pods,
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,
        },
    }

