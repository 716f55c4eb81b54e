"""Other clusters: credentials from a Secret, one client and one set of watches per cluster.

A region of a Perennial Deployment with `clusterSecretRef` names a Secret in the Deployment's namespace. Two
formats are accepted, so one Secret can serve Argo CD and Perennial alike:

* a kubeconfig under the key `kubeconfig` (its current context, or its only one);
* Argo CD's cluster Secret (label `argocd.argoproj.io/secret-type: cluster`; keys `name`, `server` and
  `config`, a JSON document with `bearerToken` or `username`/`password`, and `tlsClientConfig`
  {`caData`, `certData`, `keyData` (base64 PEM), `insecure`, `serverName`}).

What cannot work inside the operator's pod is refused with a reason and a message instead of failing later:
exec plugins, auth providers, Argo CD's `execProviderConfig` and `awsAuthConfig` (the operator's image carries
no cloud CLIs), and files named by path (`certificate-authority`, `client-certificate`, `tokenFile`: they exist
on the machine that wrote the kubeconfig, not in the pod). Credentials go over HTTPS only. Secret values never
appear in a message or a log line; the PEM data the TLS layer needs as files is written to a private (0700)
directory per cluster and removed when its client closes.

`Clusters` is the registry the Deployment controller uses: `await clusters.sync_owner(owner, secrets)` per
reconcile (owner = (namespace, Deployment name); secrets = Secret name -> its body from the cache, or None when
it does not exist) returns a `RemoteCluster` (client `kube`, watch-fed `cache`, `reachability()`) or a
`ClusterSecretError` per Secret. A cluster is rebuilt when its Secret's values change (a new resourceVersion with
the same values keeps it) and closed when no owner uses it any more.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes
import yaml

from ..resources.common import MANAGED_BY
from .aio import AsyncKube
from .cache import Cache
from .client import ApiError, path_for
from .informer import DEPLOYMENT_LABEL, Backoff, Informer, Reachability, parent_of

log = logging.getLogger(__name__)

KUBECONFIG_KEY = "kubeconfig"
ARGOCD_SECRET_TYPE_LABEL = "argocd.argoproj.io/secret-type"
#: Argo CD's name for the cluster it runs in: the operator's own cluster is a region without `clusterSecretRef`.
IN_CLUSTER_SERVER = "https://kubernetes.default.svc"

ClusterKey = tuple[str, str]  # (namespace, Secret name)
Owner = tuple[str, str]  # (namespace, Perennial Deployment name)


class ClusterSecretError(Exception):
    """A cluster Secret that cannot give a client. `reason` (CamelCase, for a condition) and `message` (for people;
    never a secret value)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def _invalid(secret: str, message: str) -> ClusterSecretError:
    return ClusterSecretError("ClusterSecretInvalid", f"Secret {secret}: {message}")


def _unsupported(secret: str, message: str) -> ClusterSecretError:
    return ClusterSecretError("ClusterAuthUnsupported", f"Secret {secret}: {message}")


@dataclass(frozen=True)
class ClusterCredentials:
    """What a client needs to reach one cluster. Secret fields are left out of `repr`."""

    server: str
    source: str  # "kubeconfig" or "argocd"
    display_name: str = ""
    token: str | None = field(default=None, repr=False)
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    ca_pem: bytes | None = field(default=None, repr=False)
    cert_pem: bytes | None = field(default=None, repr=False)
    key_pem: bytes | None = field(default=None, repr=False)
    insecure: bool = False
    server_name: str | None = None


# --------------------------------------------------------------------------- parsing


def secret_data(secret: Mapping[str, Any]) -> dict[str, str]:
    """A Secret's values as text: `data` (base64, as the API serves it) with `stringData` over it."""
    name = _name(secret)
    out: dict[str, str] = {}
    for key, value in (secret.get("data") or {}).items():
        try:
            out[key] = base64.b64decode(str(value), validate=True).decode()
        except (binascii.Error, ValueError):
            raise _invalid(name, f"key `{key}` is not valid base64-encoded UTF-8") from None
    for key, value in (secret.get("stringData") or {}).items():
        out[key] = str(value)
    return out


def _name(secret: Mapping[str, Any]) -> str:
    meta = secret.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or '?'}".lstrip("/")


def secret_digest(secret: Mapping[str, Any]) -> str:
    """What a client is built from (values and the Argo CD label), hashed: a Secret whose metadata alone changed
    (an annotation, a new resourceVersion for the same values) keeps its client and its watches."""
    labels = (secret.get("metadata") or {}).get("labels") or {}
    doc = {"data": secret.get("data") or {}, "stringData": secret.get("stringData") or {},
           "argocd": labels.get(ARGOCD_SECRET_TYPE_LABEL)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def parse_cluster_secret(secret: Mapping[str, Any]) -> ClusterCredentials:
    """The credentials in a cluster Secret (kubeconfig or Argo CD format), or a `ClusterSecretError`."""
    name = _name(secret)
    data = secret_data(secret)
    labels = (secret.get("metadata") or {}).get("labels") or {}
    if KUBECONFIG_KEY in data:
        return _from_kubeconfig(name, data[KUBECONFIG_KEY])
    if labels.get(ARGOCD_SECRET_TYPE_LABEL) == "cluster" or ("server" in data and "config" in data):
        return _from_argocd(name, data)
    raise _invalid(name, f"has no key `{KUBECONFIG_KEY}` and is not an Argo CD cluster Secret (label "
                         f"`{ARGOCD_SECRET_TYPE_LABEL}: cluster` with keys `server` and `config`)")


def _check_server(name: str, server: Any, where: str) -> str:
    if not isinstance(server, str) or not server.strip():
        raise _invalid(name, f"{where} must name the API server's URL")
    server = server.strip().rstrip("/")
    try:
        parts = urlsplit(server)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise _invalid(name, f"{where} is not a valid URL") from None
    if parts.username is not None or parts.password is not None:
        raise _invalid(name, f"{where} must not carry credentials in the URL")
    if parts.scheme != "https" or not parts.hostname:
        shown = f"{parts.scheme}://{parts.netloc}" if parts.scheme else "a URL without a scheme"
        raise _invalid(name, f"{where} must be an https:// URL (credentials are never sent in clear), not {shown}")
    return server


def _pem(name: str, value: Any, what: str) -> bytes | None:
    """base64 PEM data as kubeconfig's `*-data` and Argo CD's `caData`/`certData`/`keyData` hold it."""
    if value in (None, ""):
        return None
    try:
        pem = base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(name, f"`{what}` must be base64-encoded PEM") from None
    if b"-----BEGIN" not in pem:
        raise _invalid(name, f"`{what}` must be base64-encoded PEM")
    return pem


def _from_kubeconfig(name: str, text: str) -> ClusterCredentials:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)  # never the YAML's text: it holds credentials
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise _invalid(name, f"key `{KUBECONFIG_KEY}` is not valid YAML{where}") from None
    if not isinstance(doc, dict):
        raise _invalid(name, f"key `{KUBECONFIG_KEY}` must hold a kubeconfig (a YAML mapping)")

    def named(section: str) -> dict[str, dict[str, Any]]:
        items = doc.get(section) or []
        if not isinstance(items, list):
            raise _invalid(name, f"kubeconfig `{section}` must be a list")
        out = {}
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                out[item["name"]] = item
        return out

    contexts = named("contexts")
    current = doc.get("current-context")
    if current:
        if current not in contexts:
            raise _invalid(name, f"kubeconfig's current-context {current!r} is not among its contexts")
    elif len(contexts) == 1:
        current = next(iter(contexts))
    else:
        raise _invalid(name, "kubeconfig must set `current-context` (or hold exactly one context)")
    context = contexts[current].get("context") or {}
    clusters, users = named("clusters"), named("users")
    if context.get("cluster") not in clusters:
        raise _invalid(name, f"kubeconfig context {current!r} names no cluster of the kubeconfig")
    cluster = clusters[context["cluster"]].get("cluster") or {}
    user_name = context.get("user")
    if user_name and user_name not in users:
        raise _invalid(name, f"kubeconfig context {current!r} names a user the kubeconfig does not define")
    user = (users[user_name].get("user") or {}) if user_name else {}
    if not isinstance(cluster, dict) or not isinstance(user, dict):
        raise _invalid(name, "kubeconfig clusters and users must be mappings")

    server = _check_server(name, cluster.get("server"), "kubeconfig's cluster `server`")
    if user.get("exec"):
        raise _unsupported(name, "kubeconfig user uses an exec plugin, which cannot run in the operator's pod; "
                                 "use a service account token (`token`) or a client certificate (`client-certificate-data`)")
    if user.get("auth-provider"):
        raise _unsupported(name, "kubeconfig user uses an auth provider, which the operator does not support; "
                                 "use a service account token (`token`) or a client certificate (`client-certificate-data`)")
    for key, instead in (("tokenFile", "token"), ("client-certificate", "client-certificate-data"),
                         ("client-key", "client-key-data")):
        if user.get(key):
            raise _unsupported(name, f"kubeconfig user names a file (`{key}`) that does not exist in the operator's "
                                     f"pod; embed it as `{instead}`")
    if cluster.get("certificate-authority"):
        raise _unsupported(name, "kubeconfig cluster names a file (`certificate-authority`) that does not exist in "
                                 "the operator's pod; embed it as `certificate-authority-data`")
    for key in ("as", "as-groups", "as-uid", "as-user-extra"):
        if user.get(key):
            raise _unsupported(name, f"kubeconfig user impersonation (`{key}`) is not supported")
    if cluster.get("proxy-url"):
        raise _unsupported(name, "kubeconfig cluster `proxy-url` is not supported")
    creds = ClusterCredentials(
        server=server, source="kubeconfig", display_name=str(context.get("cluster")),
        token=str(user["token"]) if user.get("token") else None,
        username=str(user["username"]) if user.get("username") else None,
        password=str(user["password"]) if user.get("password") is not None else None,
        ca_pem=_pem(name, cluster.get("certificate-authority-data"), "certificate-authority-data"),
        cert_pem=_pem(name, user.get("client-certificate-data"), "client-certificate-data"),
        key_pem=_pem(name, user.get("client-key-data"), "client-key-data"),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        server_name=str(cluster["tls-server-name"]) if cluster.get("tls-server-name") else None,
    )
    return _checked(name, creds)


def _from_argocd(name: str, data: dict[str, str]) -> ClusterCredentials:
    for key in ("server", "config"):
        if not data.get(key):
            raise _invalid(name, f"Argo CD cluster Secret has no key `{key}`")
    if data["server"].strip().rstrip("/") == IN_CLUSTER_SERVER:
        raise _invalid(name, f"names the operator's own cluster ({IN_CLUSTER_SERVER}); a region in this cluster "
                             "has no `clusterSecretRef`")
    server = _check_server(name, data["server"], "Argo CD cluster Secret key `server`")
    try:
        config = json.loads(data["config"])
    except json.JSONDecodeError as exc:  # its message names a position, never the text
        raise _invalid(name, f"key `config` is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(config, dict):
        raise _invalid(name, "key `config` must be a JSON object")
    if config.get("execProviderConfig"):
        raise _unsupported(name, "Argo CD `execProviderConfig` runs a command, which cannot run in the operator's "
                                 "pod; use `bearerToken` or a client certificate (`tlsClientConfig.certData`/`keyData`)")
    if config.get("awsAuthConfig"):
        raise _unsupported(name, "Argo CD `awsAuthConfig` (EKS IAM) is not supported; use `bearerToken` or a client "
                                 "certificate (`tlsClientConfig.certData`/`keyData`)")
    if config.get("proxyUrl"):
        raise _unsupported(name, "Argo CD `proxyUrl` is not supported")
    tls = config.get("tlsClientConfig") or {}
    if not isinstance(tls, dict):
        raise _invalid(name, "`tlsClientConfig` must be a JSON object")
    creds = ClusterCredentials(
        server=server, source="argocd", display_name=data.get("name") or server,
        token=str(config["bearerToken"]) if config.get("bearerToken") else None,
        username=str(config["username"]) if config.get("username") else None,
        password=str(config["password"]) if config.get("password") is not None else None,
        ca_pem=_pem(name, tls.get("caData"), "tlsClientConfig.caData"),
        cert_pem=_pem(name, tls.get("certData"), "tlsClientConfig.certData"),
        key_pem=_pem(name, tls.get("keyData"), "tlsClientConfig.keyData"),
        insecure=bool(tls.get("insecure")),
        server_name=str(tls["serverName"]) if tls.get("serverName") else None,
    )
    return _checked(name, creds)


def _checked(name: str, creds: ClusterCredentials) -> ClusterCredentials:
    if bool(creds.cert_pem) != bool(creds.key_pem):
        raise _invalid(name, "a client certificate needs both its certificate and its key")
    if bool(creds.username) != (creds.password is not None):
        raise _invalid(name, "basic authentication needs both `username` and `password`")
    if not (creds.token or creds.username or creds.cert_pem):
        raise _invalid(name, "holds no credentials (a bearer token, a client certificate, or username and password)")
    if creds.token and any(c in creds.token for c in "\r\n"):
        raise _invalid(name, "the bearer token must be one line")
    return creds


# --------------------------------------------------------------------------- client configuration


def _write_private(directory: Path, filename: str, content: bytes) -> str:
    path = directory / filename
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    return str(path)


def configuration(creds: ClusterCredentials, directory: str | os.PathLike[str]) -> kubernetes.client.Configuration:
    """A `kubernetes.client.Configuration` for `creds`; PEM data the TLS layer reads from files goes into
    `directory` (which must be private to the process; the caller removes it)."""
    cfg = kubernetes.client.Configuration()
    cfg.host = creds.server
    d = Path(directory)
    if creds.insecure:
        cfg.verify_ssl = False
        log.warning("Not verifying the TLS certificate of a remote cluster (its Secret says insecure), server=%s", creds.server)
    else:
        cfg.verify_ssl = True
        if creds.ca_pem:
            cfg.ssl_ca_cert = _write_private(d, "ca.crt", creds.ca_pem)
    if creds.cert_pem and creds.key_pem:
        cfg.cert_file = _write_private(d, "client.crt", creds.cert_pem)
        cfg.key_file = _write_private(d, "client.key", creds.key_pem)
    if creds.server_name:
        cfg.tls_server_name = creds.server_name
    if creds.token:
        cfg.api_key = {"authorization": creds.token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
    elif creds.username:
        cfg.username, cfg.password = creds.username, creds.password or ""
    return cfg


# --------------------------------------------------------------------------- the registry

#: What the Deployment controller watches in a remote cluster (its children there).
DEFAULT_RESOURCES: tuple[tuple[str, str], ...] = (
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("v1", "Pod"),
    ("policy/v1", "PodDisruptionBudget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("keda.sh/v1alpha1", "ScaledObject"),  # where KEDA is installed (an unserved kind counts as listed, empty)
    ("v1", "Secret"),  # the feedback token's copy (only Secrets labelled for a Deployment are listed)
    ("networking.k8s.io/v1", "NetworkPolicy"),
)
#: The kinds a region's children are of: what a cleanup deletes (Pods go with their apps/v1 Deployments).
CHILD_KINDS: tuple[tuple[str, str], ...] = tuple(k for k in DEFAULT_RESOURCES if k != ("v1", "Pod"))
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
REGION_LABEL = "perennial.ai/region"


class RemoteCluster:
    """One cluster reached through one Secret: its client, its watch-fed cache (the Secret's namespace only, objects
    labelled `perennial.ai/deployment`), and whether it answers."""

    def __init__(self, key: ClusterKey, resource_version: str | None, digest: str, creds: ClusterCredentials,
                 resources: Iterable[tuple[str, str]], *, on_change: Callable[[RemoteCluster, dict | None, dict | None], None],
                 on_reachability: Callable[[RemoteCluster], None], timeout: float, watch_timeout_seconds: int,
                 backoff: Backoff, clock: Callable[[], float]) -> None:
        self.key = key
        self.namespace = key[0]
        self.resource_version = resource_version
        self.digest = digest
        self.server = creds.server
        self.source = creds.source
        self.owners: set[Owner] = set()
        self._dir = tempfile.mkdtemp(prefix="perennial-cluster-")  # 0700
        try:
            cfg = configuration(creds, self._dir)
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self.kube = AsyncKube(cfg, name=f"{key[0]}/{key[1]}", timeout=timeout)
        self.cache = Cache(on_change=lambda old, new: on_change(self, old, new))
        self._on_reachability = on_reachability
        self._reachable: bool | None = None
        self.informers = {
            rk: Informer(self.kube, rk[0], rk[1], self.cache, namespace=self.namespace,
                         timeout_seconds=watch_timeout_seconds, backoff=backoff, clock=clock,
                         on_health=self._health_changed)
            for rk in resources
        }

    def start(self) -> None:
        for informer in self.informers.values():
            informer.start()

    async def close(self) -> None:
        await asyncio.gather(*(i.stop() for i in self.informers.values()), return_exceptions=True)
        await self.kube.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def synced(self) -> bool:
        """Every watched kind was listed at least once: the cache holds the cluster's world (stale while unreachable)."""
        return all(i.synced for i in self.informers.values())

    def reachability(self) -> Reachability:
        """Reachable when every informer's latest attempt succeeded; unknown (None) before any finished."""
        states = [i.reachability() for i in self.informers.values()]
        errors = [s for s in states if s.reachable is False]
        known = [s for s in states if s.reachable is not None]
        successes = [s.last_success for s in states if s.last_success is not None]
        last_error = max(errors, key=lambda s: s.last_error_at or 0.0) if errors else None
        return Reachability(
            reachable=False if errors else (True if known and len(known) == len(states) else None),
            last_success=min(successes) if successes and len(successes) == len(states) else None,
            last_error=last_error.last_error if last_error else None,
            last_error_at=last_error.last_error_at if last_error else None,
        )

    def _health_changed(self, _informer: Informer) -> None:
        now = self.reachability().reachable
        if now != self._reachable:
            was, self._reachable = self._reachable, now
            if now is False:
                log.warning("Lost a remote cluster, cluster=%s/%s, server=%s, error=%s", *self.key, self.server,
                            self.reachability().last_error)
            elif now and was is False:
                log.info("Reached a remote cluster again, cluster=%s/%s, server=%s", *self.key, self.server)
            self._on_reachability(self)

    async def apply(self, obj: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """`AsyncKube.apply` in this cluster against the cached object, the result written through to the cache (the
        watch event of our own write then changes nothing). Returns (object, "created" | "updated" | "unchanged")."""
        meta = obj["metadata"]
        current = self.cache.get(obj["apiVersion"], obj["kind"], meta.get("namespace") or self.namespace, meta["name"])
        written, action = await self.kube.apply(obj, current)
        if action != "unchanged":
            self.cache.put({**written, "apiVersion": obj["apiVersion"], "kind": obj["kind"]})
        return written, action

    def children(self, deployment: str, kinds: Iterable[tuple[str, str]] | None = None, *, region: str | None = None) -> list[dict[str, Any]]:
        """The cached objects (of `kinds`, else every watched kind) labelled for the Perennial Deployment `deployment`
        of this cluster's namespace and managed by Perennial (of `region` only, if given)."""
        labels = {DEPLOYMENT_LABEL: deployment, MANAGED_BY_LABEL: MANAGED_BY, **({REGION_LABEL: region} if region else {})}
        return [o for api_version, kind in (kinds or self.informers) if (api_version, kind) in self.informers
                for o in self.cache.list(api_version, kind, self.namespace, labels=labels)]

    async def delete_children(self, deployment: str, kinds: Iterable[tuple[str, str]] | None = None, *, region: str | None = None) -> int:
        """Delete what `children` lists (a finalizer's cleanup: no ownerReference crosses clusters; Pods go with their
        apps/v1 Deployments through the remote cluster's own garbage collector, so pass the kinds you created). A 404
        is success. Returns how many were asked to go; the caller waits until `children` is empty (the watch tells)
        before it removes its finalizer. An unreachable cluster raises `ApiError(0)`: retry later."""
        asked = 0
        for obj in self.children(deployment, kinds, region=region):
            meta = obj["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            try:
                await self.kube.request("DELETE", path_for(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]),
                                        {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background",
                                         **({"preconditions": {"uid": meta["uid"]}} if meta.get("uid") else {})})
            except ApiError as exc:
                if exc.status not in (404, 409):  # gone already, or a newer object of that name (not ours to delete)
                    raise
            asked += 1
        if asked:
            log.info("Deleted the children of a Deployment in a remote cluster, cluster=%s/%s, deployment=%s, count=%d",
                     *self.key, deployment, asked)
        return asked

    def watch_count(self) -> int:
        """Watches open right now (at most one per watched kind)."""
        return sum(i.open_watches for i in self.informers.values())


class Clusters:
    """Remote clusters by (namespace, Secret name), shared by the Deployments that use them.

    `wake` is called with the (namespace, Deployment name) keys a change concerns: a child's change in a remote
    cluster (by its `perennial.ai/deployment` label, in the cluster's namespace) and a cluster becoming
    (un)reachable (every owner of it). Use it from the operator's event loop only."""

    def __init__(self, *, wake: Callable[[set[Owner]], None] | None = None,
                 resources: Iterable[tuple[str, str]] = DEFAULT_RESOURCES, timeout: float = 30.0,
                 watch_timeout_seconds: int = 300, backoff: Backoff | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.wake = wake
        self.resources = tuple(resources)
        self.timeout = timeout
        self.watch_timeout_seconds = watch_timeout_seconds
        self.backoff = backoff or Backoff()
        self.clock = clock
        self._clusters: dict[ClusterKey, RemoteCluster] = {}
        self._uses: dict[Owner, set[ClusterKey]] = {}
        self._lock = asyncio.Lock()

    def get(self, namespace: str, secret_name: str) -> RemoteCluster | None:
        return self._clusters.get((namespace, secret_name))

    def __iter__(self):
        return iter(list(self._clusters.values()))

    async def sync_owner(self, owner: Owner, secrets: Mapping[str, Mapping[str, Any] | None]) -> dict[str, RemoteCluster | ClusterSecretError]:
        """`owner` (namespace, Deployment name) uses exactly the clusters of `secrets` (Secret name -> its body as
        the cache holds it, or None when it does not exist) from now on: each is connected (or rebuilt when the
        Secret's values changed); clusters no owner uses any more are closed. Returns, per Secret name,
        its `RemoteCluster` or the `ClusterSecretError` that keeps it from one."""
        namespace = owner[0]
        results: dict[str, RemoteCluster | ClusterSecretError] = {}
        async with self._lock:
            used: set[ClusterKey] = set()
            for name, secret in secrets.items():
                key = (namespace, name)
                try:
                    results[name] = await self._connect(key, secret)
                    used.add(key)
                except ClusterSecretError as exc:
                    results[name] = exc
                    await self._drop(key)  # a Secret that went bad (or away) no longer gives a client
            if used:
                self._uses[owner] = used
            else:
                self._uses.pop(owner, None)
            for key, cluster in self._clusters.items():
                cluster.owners = {o for o, keys in self._uses.items() if key in keys}
            for key in [k for k, c in self._clusters.items() if not c.owners]:
                await self._drop(key)
        return results

    async def release(self, owner: Owner) -> None:
        """`owner` uses no cluster any more (it was deleted)."""
        await self.sync_owner(owner, {})

    async def _connect(self, key: ClusterKey, secret: Mapping[str, Any] | None) -> RemoteCluster:
        if secret is None:
            raise ClusterSecretError("ClusterSecretNotFound", f"Secret {key[0]}/{key[1]} does not exist")
        rv = (secret.get("metadata") or {}).get("resourceVersion")
        digest = secret_digest(secret)
        current = self._clusters.get(key)
        if current is not None and current.digest == digest:
            current.resource_version = rv
            return current
        creds = parse_cluster_secret(secret)
        if current is not None:
            log.info("Rebuilding the client of a remote cluster (its Secret changed), cluster=%s/%s", *key)
            await self._drop(key)
        cluster = RemoteCluster(key, rv, digest, creds, self.resources, on_change=self._changed,
                                on_reachability=self._reachability_changed, timeout=self.timeout,
                                watch_timeout_seconds=self.watch_timeout_seconds, backoff=self.backoff,
                                clock=self.clock)
        self._clusters[key] = cluster
        cluster.start()
        log.info("Connected a remote cluster, cluster=%s/%s, server=%s, format=%s", *key, creds.server, creds.source)
        return cluster

    async def _drop(self, key: ClusterKey) -> None:
        cluster = self._clusters.pop(key, None)
        if cluster is not None:
            await cluster.close()
            log.info("Closed the client of a remote cluster, cluster=%s/%s", *key)

    def _changed(self, cluster: RemoteCluster, old: dict | None, new: dict | None) -> None:
        keys = {k for obj in (old, new) if obj is not None and (k := parent_of(obj)) is not None}
        if keys and self.wake is not None:
            self.wake(keys)

    def _reachability_changed(self, cluster: RemoteCluster) -> None:
        if cluster.owners and self.wake is not None:
            self.wake(set(cluster.owners))

    async def close(self) -> None:
        async with self._lock:
            for key in list(self._clusters):
                await self._drop(key)
            self._uses.clear()
