"""A small generic client over the `kubernetes` library's ApiClient.

Controllers hand it manifests (dicts) built by `perennial.resources`; it knows the
REST paths of the kinds Perennial touches, applies idempotently (a 409 on create
is not an error) and never blocks the event loop (calls run in a thread).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from ..api.common import GROUP, VERSION

log = logging.getLogger(__name__)

# (apiVersion, kind) -> plural. Every kind the operator reads or writes.
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Secret"): "secrets",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Namespace"): "namespaces",
    ("v1", "Event"): "events",
    ("apps/v1", "Deployment"): "deployments",
    ("batch/v1", "Job"): "jobs",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobjects",
    # engines of multi-node TrainingRuns, where installed
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): "jobsets",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainjobs",
    # a serving color's workload across nodes, where installed
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkersets",
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): "customresourcedefinitions",
}
for _kind, _plural in (
    ("BaseModel", "basemodels"),
    ("RewardSpec", "rewardspecs"),
    ("TrainingRun", "trainingruns"),
    ("Adapter", "adapters"),
    ("Deployment", "deployments"),
):
    PLURALS[(f"{GROUP}/{VERSION}", _kind)] = _plural

CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition"}


class ApiError(Exception):
    """An API server error with its HTTP status and Status body."""

    def __init__(self, status: int, body: Any, method: str = "", path: str = "", retry_after: float | None = None):
        self.status = status
        #: Seconds the server asked us to wait (`Retry-After` of a 429 or 503), if it said.
        self.retry_after = retry_after
        self.body = body if isinstance(body, dict) else {"message": str(body)}
        self.reason = self.body.get("reason", "")
        super().__init__(f"{method} {path}: {status} {self.body.get('message', '')}".strip())

    @property
    def message(self) -> str:
        return str(self.body.get("message", ""))


def path_for(api_version: str, kind: str, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
    plural = PLURALS.get((api_version, kind))
    if plural is None:
        raise KeyError(f"unknown kind {api_version}/{kind}")
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    if namespace and kind not in CLUSTER_SCOPED:
        base += f"/namespaces/{namespace}"
    path = f"{base}/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def subset(desired: Any, actual: Any) -> bool:
    """True when every field of `desired` is present and equal in `actual`. An empty list is an absent field: a
    real API server stores built-ins as protobuf and returns an empty list as nothing (Go's `omitempty`)."""
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(subset(v, actual.get(k)) for k, v in desired.items())
    if desired == [] and actual is None:
        return True
    if isinstance(desired, list):
        return isinstance(actual, list) and len(desired) == len(actual) and all(subset(d, a) for d, a in zip(desired, actual))
    return desired == actual


def json_equal(a: Any, b: Any) -> bool:
    """`a == b` as JSON values: Python's `==` takes 1, 1.0 and True for one another (three JSON values that a JSON
    Schema `const`, or a field kept as written, tell apart). As fast as `==` when the two differ."""
    return a == b and _same_types(a, b)


def _same_types(a: Any, b: Any) -> bool:
    """Given `a == b`: every value has the same type in both (the keys are then the same: only the types can differ)."""
    if a is b:
        return True
    t = type(a)
    if t is not type(b):
        return False
    if t is dict:
        return all(v is b[k] or _same_types(v, b[k]) for k, v in a.items())
    if t is list:
        return all(x is y or _same_types(x, y) for x, y in zip(a, b))
    return True


def apply_patch(obj: dict[str, Any], current: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch that brings `current` up to the manifest `obj`, or None when it already is.

    Fields the manifest does not set are left alone (a server's defaults are no drift); `status` is
    never written; a Job's pod template is immutable, so only its labels and annotations are patched.
    """
    patch = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "status")}
    if obj["kind"] == "Job":
        patch = {"metadata": {k: v for k, v in patch["metadata"].items() if k in ("labels", "annotations")}}
    return None if subset(patch, current) else patch


class Kube:
    """Synchronous primitives plus `a*` coroutine twins that run them in a thread."""

    def __init__(self, api_client: kubernetes.client.ApiClient):
        self.api = api_client

    # -- raw -----------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None, content_type: str | None = None, raw: bool = False) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        query_params = [(k, v) for k, v in (query or {}).items() if v is not None]
        _method, url, hdrs, _body, _post = self.api.param_serialize(
            method, path, query_params=query_params, header_params=headers, body=None, auth_settings=["BearerToken"]
        )
        try:
            # The REST layer serialises dict bodies for every JSON content type (merge-patch included).
            response = self.api.call_api(method, url, header_params=hdrs, body=body, _request_timeout=30)
            data = response.read()
        except ApiException as exc:
            try:
                parsed = json.loads(exc.body or b"{}")
            except ValueError:
                parsed = {"message": exc.body or exc.reason}
            raise ApiError(exc.status or 0, parsed, method, path) from None
        status = getattr(response, "status", 200)
        if status >= 400:
            try:
                parsed = json.loads(data or b"{}")
            except ValueError:
                parsed = {"message": data.decode(errors="replace")}
            raise ApiError(status, parsed, method, path)
        if raw:
            return data.decode(errors="replace") if isinstance(data, bytes) else data
        return json.loads(data) if data else {}

    # -- typed helpers -------------------------------------------------------
    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path_for(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str | None, label_selector: str | None = None) -> list[dict[str, Any]]:
        result = self.request("GET", path_for(api_version, kind, namespace), query={"labelSelector": label_selector})
        return list(result.get("items") or [])

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return self.request("POST", path_for(obj["apiVersion"], obj["kind"], meta.get("namespace")), body=obj)

    def patch(self, api_version: str, kind: str, namespace: str | None, name: str, patch: dict[str, Any], subresource: str | None = None) -> dict[str, Any]:
        return self.request(
            "PATCH", path_for(api_version, kind, namespace, name, subresource), body=patch, content_type="application/merge-patch+json"
        )

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str, propagation: str = "Background") -> bool:
        try:
            self.request("DELETE", path_for(api_version, kind, namespace, name), body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation})
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise

    def apply(self, obj: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Create `obj`, or bring an existing one up to it. Returns (object, "created"|"updated"|"unchanged").

        Fields the manifest does not set are left alone (merge-patch semantics);
        `status` is never written here.
        """
        meta = obj["metadata"]
        desired = {k: v for k, v in obj.items() if k != "status"}
        try:
            return self.create(desired), "created"
        except ApiError as exc:
            if exc.status != 409:
                raise
        current = self.get(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        if current is None:  # deleted between our create and get: try once more
            return self.create(desired), "created"
        patch = apply_patch(obj, current)
        if patch is None:
            return current, "unchanged"
        updated = self.patch(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"], patch)
        return updated, "updated"

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return self.patch(api_version, kind, namespace, name, {"status": status}, subresource="status")

    def pod_log(self, namespace: str, pod: str, tail_lines: int | None = None, container: str | None = None) -> str:
        return self.request(
            "GET", path_for("v1", "Pod", namespace, pod, "log"), query={"tailLines": tail_lines, "container": container}, raw=True
        )

    # -- async twins ---------------------------------------------------------
    async def aget(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.get, *args, **kwargs)

    async def alist(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.list, *args, **kwargs)

    async def aapply(self, obj: dict[str, Any]) -> tuple[dict[str, Any], str]:
        return await asyncio.to_thread(self.apply, obj)

    async def acreate(self, obj: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self.create, obj)

    async def apatch(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return await asyncio.to_thread(self.patch, *args, **kwargs)

    async def adelete(self, *args: Any, **kwargs: Any) -> bool:
        return await asyncio.to_thread(self.delete, *args, **kwargs)

    async def apatch_status(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return await asyncio.to_thread(self.patch_status, *args, **kwargs)

    async def apod_log(self, *args: Any, **kwargs: Any) -> str:
        return await asyncio.to_thread(self.pod_log, *args, **kwargs)


def local_credentials(configuration: kubernetes.client.Configuration, server: str, token: str | None,
                      ca_file: str | None) -> kubernetes.client.Configuration:
    """Point `configuration` at the embedded control plane: its URL, bearer token and serving certificate
    (verified when given; without one the server is plain HTTP or unverified)."""
    configuration.host = server
    configuration.verify_ssl = bool(ca_file)
    configuration.ssl_ca_cert = ca_file
    if token:
        configuration.api_key = {"authorization": token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
    return configuration


def connect(server: str | None = None, kubeconfig: str | None = None, context: str | None = None,
            token: str | None = None, ca_file: str | None = None) -> Kube:
    """A client for `server` (the embedded control plane: its bearer `token` and certificate `ca_file`), a
    kubeconfig, or the in-cluster config."""
    configuration = kubernetes.client.Configuration()
    if server:
        local_credentials(configuration, server, token, ca_file)
    else:
        try:
            kubernetes.config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
    return Kube(kubernetes.client.ApiClient(configuration))
