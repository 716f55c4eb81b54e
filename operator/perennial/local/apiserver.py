"""An embedded, in-memory Kubernetes API server for laptops and tests.

Speaks enough of kube-apiserver's HTTP API for kopf 1.45, the ``kubernetes``
Python client and kubectl 1.32 (get/apply/describe/explain/delete/logs/scale/wait):

* discovery (``/api``, ``/apis``, ``/apis/<g>/<v>``, ``/version``; kubectl falls back from
  aggregated discovery), OpenAPI v3 built from the registered schemas (``kubectl explain``,
  server-side field validation), no ``/openapi/v2``;
* CRUD with uid/creationTimestamp/resourceVersion/generation, 409 Conflict/AlreadyExists,
  404 NotFound, generateName, status and scale subresources, no-op writes keep the
  resourceVersion, dry runs;
* patches: merge, JSON (a failed ``test`` is 422), strategic merge (approximate; merge keys
  of the built-in lists), server-side apply (approximate: merge, create if missing);
* finalizers and deletionTimestamp, namespace deletion, ownerReference garbage collection with
  ``propagationPolicy`` Background, Foreground (``foregroundDeletion``, waits for dependents with
  ``blockOwnerDeletion``) and Orphan (batch/v1 Jobs orphan their Pods by default, with kube's warning);
* defaulting of built-in kinds as kube-apiserver does it (``defaults.py``: PodSpec, Deployment, Service
  cluster IPs, Job selector, HPA); ``autoscaling/v1`` and ``v2`` HorizontalPodAutoscalers from one storage;
* fault injection (``FaultConfig``: 500, 429, 409, slow, watch-close, 410 for chosen User-Agents;
  ``start_in_thread(faults=…)``, ``set_faults()``, ``PUT /debug/perennial/faults``) and request
  accounting by client/verb/resource/code (``request_counts()``, ``count()``, ``/debug/perennial/requests``);
* label and field selectors; watches with resume, 410 Expired, timeouts, bookmarks,
  ``sendInitialEvents``;
* CustomResourceDefinitions: registration, structural-schema checks, pruning, defaulting,
  validation with kube-apiserver's messages, CEL rules (``cel-expr-python``), printer columns;
* built-in kinds checked against Kubernetes' OpenAPI schemas when ``kubernetes-validate`` is
  installed; Table output (``kubectl get`` columns); pod logs fed in-process (``-f`` too);
  protobuf bodies of ``kubectl create namespace|configmap|secret|serviceaccount``;
* the ``proxy`` subresources of Services and Pods (``apiproxy.py``):
  ``/api/v1/namespaces/<ns>/services/<name>[:<port>]/proxy/<path>`` to a ready endpoint,
  ``/api/v1/namespaces/<ns>/pods/<name>[:<port>]/proxy/<path>`` to the pod's IP, every method, streamed both ways,
  the caller's ``Authorization`` not forwarded.

Usage::

    server = APIServer()
    await server.start()                 # or: handle = start_in_thread() (sync, own thread)
    write_kubeconfig(path, server.url)    # anonymous: APIServer(token=...) and write_kubeconfig(..., token=...)
    server.apply_crd(crd_dict)           # same as POSTing the CRD; load_crds("crds/") too
    server.set_pod_log("ns", "pod-0", "hello\\n"); server.append_pod_log(...)
    server.create("v1", "pods", body, namespace="ns"); server.patch(...); server.get(...)
    server.set_faults(FaultConfig(rate=0.1, faults=("500", "429"), seed=1)); server.fault_counts()
    server.count(client="perennial-operator", verb="patch"); server.reset_request_counts()
    await server.stop()                  #     handle.stop()

Authentication: ``APIServer(token=..., tls=tls.self_signed())`` (``start_in_thread(token=..., tls=...)``) requires ``Authorization: Bearer
<token>`` on every request except kube-apiserver's public ``/healthz``, ``/livez``, ``/readyz`` and ``/version``,
and answers anything else with kube-apiserver's 401 ``Status`` (the token is compared in constant time).
With ``tls`` it serves HTTPS with that certificate (kubectl sends a kubeconfig's token over TLS only).
``perennial dev`` and ``perennial control-plane`` always set both (``new_token()``, a fresh self-signed
certificate) and write them into their kubeconfig (mode 0600, ``server.write_kubeconfig(path)``); without a
token (in-process tests) requests are anonymous and all allowed.

Not emulated: controllers (Deployments make no Pods, Jobs never finish), exec/port-forward/attach, WebSocket upgrades through proxy,
authorization for the server's own token (it may do everything; service-account tokens from
``issue_service_account_token`` are authorized by RBAC, see ``rbac.py``), managedFields and apply conflicts, CRD version conversion, aggregated discovery.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextvars
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import logging
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from aiohttp.web import AbstractResource, ResourceRoute, UrlMappingMatchInfo
from yarl import URL

from . import protobuf, rbac
from .apiproxy import ProxyForwarder, pod_targets, service_targets, split_scheme_name_port
from .faults import Fault, FaultConfig, FaultInjector, RequestCounter, client_of
from .patches import PatchError, json_patch, merge_patch
from .store import (APIError, ResourceType, Store, Watcher, from_scale, parse_field_selector, parse_label_selector,
                    to_scale)
from .tables import BUILTIN_COLUMNS, human_age
from .tls import ServingCert

__all__ = ["APIServer", "APIError", "FaultConfig", "ServerThread", "new_token", "start_in_thread", "write_kubeconfig"]

log = logging.getLogger(__name__)

KUBE_VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0-perennial", "gitCommit": "perennial",
                "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23",
                "compiler": "gc", "platform": "linux/amd64"}
ENCODED_CACHE = 4096  # stored objects whose JSON is kept (the write's answer, its watch events, LISTs)
BOOKMARK_INTERVAL = 20.0  # seconds of idle before a BOOKMARK (real servers: about a minute)
LOG_POLL_INTERVAL = 0.1  # seconds between checks of a followed pod log
#: Watch events already queued for a watcher go out in one write (one TLS record, one chunk, one send) up to this
#: many bytes: a watcher that fell behind catches up at a fraction of the CPU per event of both ends
#: (benchmarks/operator_scale.py); an idle watcher's event still goes out alone, at once.
WATCH_BATCH_BYTES = 256 * 1024
DEBUG_PREFIX = "/debug/perennial/"
# What kube-apiserver lets anyone read (the system:public-info-viewer ClusterRole): probes and the version.
PUBLIC_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/version"})
UNAUTHORIZED = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "Unauthorized", "reason": "Unauthorized", "code": 401}


#: the service account whose request is being served (None: the server's own token, anonymous, in-process)
_REQUEST_USER: contextvars.ContextVar[rbac.User | None] = contextvars.ContextVar("perennial_request_user", default=None)


def new_token() -> str:
    """A random bearer token for the local control plane (256 bits from the OS's CSPRNG)."""
    return secrets.token_urlsafe(32)
_RequestKey = getattr(web, "RequestKey", None)  # aiohttp >= 3.12; plain strings before
# request keys: (client, verb, resource), counted when the response starts; seconds after which an
# injected fault cuts a watch
ACCOUNT: Any = _RequestKey("perennial.account", tuple) if _RequestKey else "perennial.account"
CLOSE_AFTER: Any = _RequestKey("perennial.close_after", float) if _RequestKey else "perennial.close_after"
_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}
PATCH_TYPES = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    "application/apply-patch+yaml": "apply",
}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _json(obj: Any, status: int = 200, warnings: list[str] | None = None, *, text: str | None = None) -> web.Response:
    """A JSON answer; ``text``: ``obj`` already encoded."""
    resp = web.Response(text=_dumps(obj) if text is None else text, status=status, content_type="application/json")
    for w in warnings or []:
        resp.headers.add("Warning", "299 - " + json.dumps(w))
    return resp


def _error(err: APIError) -> web.Response:
    return _json(err.status(), err.code)


def _printer_cell(obj: dict, column: dict) -> Any:
    value = jsonpath(obj, column.get("jsonPath", ""))
    if column.get("type") == "date":
        return human_age(value) if isinstance(value, str) else value
    if isinstance(value, (dict, list)):
        return _dumps(value)
    return value


class _EveryPath(AbstractResource):
    """One handler for every path and method, as ``/{tail:.*}`` routes it, without matching a pattern and
    building a match dict per request (the handler reads ``request.path`` itself)."""

    def __init__(self, handler: Any) -> None:
        super().__init__()
        self._route = ResourceRoute("*", handler, self)

    @property
    def canonical(self) -> str:
        return "/"

    def url_for(self, **kwargs: str) -> URL:
        return URL.build(path="/")

    async def resolve(self, request: web.Request) -> tuple[UrlMappingMatchInfo, set[str]]:
        return UrlMappingMatchInfo({}, self._route), set()

    def add_prefix(self, prefix: str) -> None:
        raise NotImplementedError("the API server is not mounted under a prefix")

    def get_info(self) -> dict[str, Any]:
        return {"path": "/*"}

    def raw_match(self, path: str) -> bool:
        return True

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Any:
        return iter([self._route])


# --------------------------------------------------------------------------- JSONPath (printer columns)

_TOKEN = re.compile(r"\.([A-Za-z0-9_\-]+)|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_.\-]+)\s*==\s*['\"]([^'\"]*)['\"]\)\]|\['([^']+)'\]")


def jsonpath(obj: Any, path: str) -> Any:
    """Evaluate the simple JSONPaths CRD printer columns use (``.a.b``, ``[0]``, ``[?(@.t=="x")]``)."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    if path.startswith("$"):
        path = path[1:]
    cur: Any = obj
    pos = 0
    while pos < len(path):
        m = _TOKEN.match(path, pos)
        if not m:
            return None
        pos = m.end()
        name, index, fkey, fval, quoted = m.groups()
        if name is not None or quoted is not None:
            key = name if name is not None else quoted
            cur = cur.get(key) if isinstance(cur, dict) else None
        elif index is not None:
            cur = cur[int(index)] if isinstance(cur, list) and int(index) < len(cur) else None
        else:
            if not isinstance(cur, list):
                return None
            cur = next((x for x in cur if isinstance(x, dict) and str(jsonpath(x, "." + fkey)) == fval), None)
        if cur is None:
            return None
    return cur


# --------------------------------------------------------------------------- the server


class APIServer:
    """An in-memory Kubernetes API server on aiohttp."""

    def __init__(self, faults: FaultConfig | None = None, *, count_requests: bool = True,
                 token: str | None = None, tls: ServingCert | None = None) -> None:
        if token is not None and len(token) < 16:
            raise ValueError("the bearer token must have at least 16 characters")
        self.token = token
        self.tls = tls
        self.ca_file: str | None = None  # the serving certificate as a file, for clients that take a path
        self._ca_dir: tempfile.TemporaryDirectory | None = None
        self._expected = f"Bearer {token}".encode() if token is not None else None
        # service-account tokens (issue_service_account_token): their requests are authorized by RBAC (rbac.py)
        self._sa_tokens: dict[bytes, rbac.User] = {}
        self.authorizer = rbac.Authorizer(
            lambda plural, ns: self.store.list(self._rt(rbac.RBAC, "v1", plural), ns)[0])
        #: set to a list to record every RBAC decision: (user, attributes, decision)
        self.authz_log: list[tuple[rbac.User, rbac.Attributes, rbac.Decision]] | None = None
        self.store = Store()
        self.store.admission = self._admit_owner_references
        self.injector = FaultInjector(faults)
        self.requests = RequestCounter()
        self.count_requests = count_requests
        self.url: str = ""
        self.host = "127.0.0.1"
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._watch_tasks: set[asyncio.Task] = set()
        self._openapi_cache: dict[tuple[int, str], tuple[str, str]] = {}
        # (id(stored object), apiVersion) -> (stored object, its JSON, {event type: watch event line})
        self._encoded: collections.OrderedDict[tuple[int, str], tuple[dict, str, dict[str, bytes]]] = \
            collections.OrderedDict()
        self._stopping = False
        # the proxy subresources' client to the pods (apiproxy.py): timeouts are its attributes
        self.proxy = ProxyForwarder()

    # ------------------------------------------------------------------ lifecycle

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.register_resource(_EveryPath(self._dispatch))
        app.on_response_prepare.append(self._account)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> "APIServer":
        self._stopping = False
        self._runner = web.AppRunner(self.make_app(), handle_signals=False, access_log=None,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self.tls.server_context() if self.tls else None)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.host, self.port = host, sock.getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://{host}:{self.port}"
        if self.tls and self._ca_dir is None:
            self._ca_dir = tempfile.TemporaryDirectory(prefix="perennial-ca-")
            self.ca_file = str(Path(self._ca_dir.name) / "ca.crt")
            Path(self.ca_file).write_bytes(self.tls.cert_pem)
        return self

    def write_kubeconfig(self, path: str | Path, **kwargs: Any) -> Path:
        """A kubeconfig for this server: its URL, bearer token and certificate (see :func:`write_kubeconfig`)."""
        return write_kubeconfig(path, self.url, token=self.token,
                                ca_pem=self.tls.cert_pem if self.tls else None, **kwargs)

    async def stop(self) -> None:
        self._stopping = True
        for w in self.store.all_watchers():
            w.push(None)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.proxy.close()
        if self._ca_dir is not None:
            self._ca_dir.cleanup()
            self._ca_dir, self.ca_file = None, None

    # ------------------------------------------------------------------ faults and request accounting

    @property
    def faults(self) -> FaultConfig:
        return self.injector.config

    def set_faults(self, config: FaultConfig | None) -> None:
        """Inject faults from now on (None: none); resets the seeded draws and the injected counts."""
        self.injector.configure(config or FaultConfig())

    def fault_counts(self) -> dict[str, int]:
        """Faults injected since the last :meth:`set_faults`, by kind (``{"500": 3, "slow": 1}``)."""
        return self.injector.counts()

    def request_counts(self) -> dict[str, Any]:
        """Requests served since the last reset (see :meth:`RequestCounter.snapshot`)."""
        return self.requests.snapshot()

    def count(self, client: str | None = None, verb: str | None = None, resource: str | None = None,
              code: int | None = None) -> int:
        """How many requests matched, e.g. ``count(client="kopf", verb="patch", resource="perennial.ai/trainingruns/status")``."""
        return self.requests.count(client, verb, resource, code)

    def reset_request_counts(self) -> None:
        self.requests.reset()

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> "ServerThread":
        """Run this server in a background thread with its own event loop."""
        return ServerThread(self, host, port)

    # ------------------------------------------------------------------ in-process hooks

    def set_pod_log(self, namespace: str, pod: str, text: str) -> None:
        self.store.set_pod_log(namespace, pod, text)

    def append_pod_log(self, namespace: str, pod: str, text: str) -> None:
        self.store.append_pod_log(namespace, pod, text)

    def _rt(self, group: str, version: str, plural: str) -> ResourceType:
        rt = self.store.lookup(group, version, plural)
        if rt is None:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        return rt

    def apply_crd(self, crd: dict) -> dict:
        """Create or replace a CustomResourceDefinition (registers its resource at once)."""
        rt = self._rt("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        name = crd["metadata"]["name"]
        with self.store.lock:
            try:
                old = self.store.get(rt, None, name)
            except APIError:
                return self.store.create(rt, None, crd)
            body = dict(crd)
            body["metadata"] = {**crd["metadata"], "resourceVersion": old["metadata"]["resourceVersion"]}
            return self.store.update(rt, None, name, body)

    def load_crds(self, path: str | Path) -> list[dict]:
        """Apply every CRD in a YAML file or a directory of YAML files."""
        p = Path(path)
        files = sorted(p.glob("*.y*ml")) if p.is_dir() else [p]
        out = []
        for f in files:
            for doc in yaml.safe_load_all(f.read_text()):
                if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                    out.append(self.apply_crd(doc))
        return out

    def create(self, api_version: str, plural: str, body: dict, namespace: str | None = None) -> dict:
        """Create an object in-process (e.g. a runtime marking Pods)."""
        group, _, version = api_version.rpartition("/")
        return self.store.create(self._rt(group, version, plural), namespace, body)

    def get(self, api_version: str, plural: str, name: str, namespace: str | None = None) -> dict:
        group, _, version = api_version.rpartition("/")
        return self.store.get(self._rt(group, version, plural), namespace, name)

    def list(self, api_version: str, plural: str, namespace: str | None = None) -> list[dict]:
        group, _, version = api_version.rpartition("/")
        return self.store.list(self._rt(group, version, plural), namespace)[0]

    def patch(self, api_version: str, plural: str, name: str, patch: dict, namespace: str | None = None,
              subresource: str | None = None) -> dict:
        """Merge-patch an object in-process (``subresource="status"`` for status)."""
        group, _, version = api_version.rpartition("/")
        return self.store.patch(self._rt(group, version, plural), namespace, name, "merge", patch,
                                subresource=subresource)[0]

    def delete(self, api_version: str, plural: str, name: str, namespace: str | None = None) -> dict:
        group, _, version = api_version.rpartition("/")
        return self.store.delete(self._rt(group, version, plural), namespace, name)

    # ------------------------------------------------------------------ dispatch

    def issue_service_account_token(self, namespace: str, name: str) -> str:
        """A bearer token of the ServiceAccount `namespace/name`: its requests are authorized by the RBAC objects
        in the store (Roles, ClusterRoles and their bindings; see rbac.py), not allowed everything as the
        server's own token is. The ServiceAccount object itself need not exist (as with a bound token)."""
        token = new_token()
        self._sa_tokens[f"Bearer {token}".encode()] = rbac.User.service_account(namespace, name)
        return token

    def _identity(self, request: web.Request) -> rbac.User | None:
        """The service account a request's token names, if any."""
        if not self._sa_tokens:
            return None
        given = request.headers.get("Authorization", "").strip().encode()
        for expected, user in self._sa_tokens.items():
            if hmac.compare_digest(given, expected):
                return user
        return None

    def _authenticated(self, request: web.Request, path: str) -> bool:
        if self._expected is None or path in PUBLIC_PATHS:
            return True
        given = request.headers.get("Authorization", "").strip().encode()
        return hmac.compare_digest(given, self._expected)

    def _authorize(self, request: web.Request, path: str, user: rbac.User) -> web.Response | None:
        """None when RBAC allows `user` the request, else kube-apiserver's 403."""
        if path.startswith(DEBUG_PREFIX):
            attrs = rbac.Attributes(verb=request.method.lower(), path=path, resource_request=False)
            decision = rbac.Decision(False)
        else:
            attrs = rbac.attributes(request.method, path, request.query, self._namespaced)
            decision = self.authorizer.decide(user, attrs)
        if self.authz_log is not None:
            self.authz_log.append((user, attrs, decision))
        if decision.allowed:
            return None
        return web.Response(status=403, text=json.dumps(rbac.forbidden(user, attrs)), content_type="application/json")

    def _admit_owner_references(self, rt: ResourceType, new: dict, old: dict | None, subresource: str | None) -> None:
        """OwnerReferencesPermissionEnforcement (rbac.owner_reference_checks) for the service account whose request
        is being served (none: the server's own token and in-process writes are cluster admin)."""
        user = _REQUEST_USER.get()
        if user is None:
            return
        meta = new.get("metadata") or {}
        name = meta.get("name", "")
        attrs = rbac.Attributes(verb="update" if old is not None else "create", path="", resource_request=True,
                                api_group=rt.group, resource=rt.plural, subresource=subresource or "",
                                namespace=meta.get("namespace") or "", name=name)

        def resource_of(api_version: str, kind: str) -> str | None:
            group, _, version = api_version.rpartition("/")
            return next((t.plural for t in list(self.store.types.values())
                         if t.group == group and t.version == version and t.kind == kind), None)

        for check, message in rbac.owner_reference_checks(attrs, new, old, resource_of):
            decision = self.authorizer.decide(user, check) if check is not None else rbac.Decision(False)
            if check is not None and self.authz_log is not None:
                self.authz_log.append((user, check, decision))
            if not decision.allowed:
                raise APIError(403, "Forbidden", f'{rt.resource_name} "{name}" is forbidden: {message}',
                               {"name": name, **({"group": rt.group} if rt.group else {}), "kind": rt.plural})

    def _namespaced(self, group: str, version: str, plural: str) -> bool | None:
        rt = self.store.lookup(group, version, plural)
        return None if rt is None else rt.namespaced

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        debug = path.startswith(DEBUG_PREFIX)
        verb, resource, name = ("", "", None) if debug else self._classify(request, path)
        user_agent = request.headers.get("User-Agent", "")
        if not debug:
            request[ACCOUNT] = (client_of(user_agent, self.requests.clients), verb, resource or path)
        user = self._identity(request)
        _REQUEST_USER.set(user)  # for admission (_admit_owner_references); a connection's requests share a context
        if user is None and not self._authenticated(request, path):  # counted (code 401) like any other answer
            return web.Response(status=401, text=json.dumps(UNAUTHORIZED), content_type="application/json")
        if user is not None and path not in PUBLIC_PATHS:
            denied = self._authorize(request, path, user)
            if denied is not None:  # counted (code 403)
                return denied
        if debug:
            return await self._debug(request, path)
        fault = self.injector.draw(user_agent, verb, "resourceVersion" in request.query) if resource else None
        if fault is not None:
            return await self._inject(request, fault, resource, name)
        return await self._serve(request, path)

    async def _account(self, request: web.Request, response: web.StreamResponse) -> None:
        """Count a request when its response starts (a watch counts when its stream opens)."""
        key = request.get(ACCOUNT)
        if key is not None and self.count_requests:
            self.requests.add(*key, response.status)

    def _classify(self, request: web.Request, path: str) -> tuple[str, str, str | None]:
        """(verb, resource, name) as kube-apiserver's request info names them; resource is "" off the API paths."""
        method = request.method
        parts = path.split("/")[1:]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 4 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return method.lower(), "", None
        if not rest:
            return method.lower(), "", None
        if rest[0] == "namespaces" and len(rest) >= 3:
            candidate = self.store.types.get((group, version, rest[2]))
            if candidate is not None and candidate.namespaced:
                rest = rest[2:]
        resource = f"{group}/{'/'.join(rest[:1] + rest[2:3])}" if group else "/".join(rest[:1] + rest[2:3])
        name = rest[1] if len(rest) > 1 else None
        if method in ("GET", "HEAD"):
            verb = "get" if name else ("watch" if request.query.get("watch") in ("true", "1", "True") else "list")
        elif method == "DELETE":
            verb = "delete" if name else "deletecollection"
        else:
            verb = _VERBS.get(method, method.lower())
        return verb, resource, name

    async def _inject(self, request: web.Request, fault: Fault, resource: str, name: str | None) -> web.StreamResponse:
        config = self.injector.config
        if fault.kind == "slow":
            await asyncio.sleep(config.slow_ms / 1000)
            return await self._serve(request, request.path.rstrip("/") or "/")
        if fault.kind == "watch-close":
            request[CLOSE_AFTER] = fault.close_after
            return await self._serve(request, request.path.rstrip("/") or "/")
        group, _, plural = resource.rpartition("/") if "/" in resource else ("", "", resource)
        if fault.kind == "410":
            since = request.query.get("resourceVersion", "")
            return await self._expired_watch(request, since, self.store.last_rv)
        if fault.kind == "429":
            seconds = config.retry_after_seconds
            resp = _error(APIError(429, "TooManyRequests", "Too many requests, please try again later.",
                                   {"causes": [{"message": "injected by perennial fault injection"}],
                                    "retryAfterSeconds": seconds}))
            resp.headers["Retry-After"] = str(seconds)
            return resp
        if fault.kind == "409":
            what = f"{plural.split('/')[0]}.{group}" if group else plural.split("/")[0]
            return _error(APIError(409, "Conflict",
                                   f'Operation cannot be fulfilled on {what} "{name}": the object has been modified; '
                                   "please apply your changes to the latest version and try again",
                                   {"name": name, "group": group, "kind": plural.split("/")[0]}))
        return _error(APIError(500, "InternalError", "Internal error occurred: injected fault",
                               {"causes": [{"message": "injected by perennial fault injection"}]}))

    async def _debug(self, request: web.Request, path: str) -> web.Response:
        """``/debug/perennial/faults`` (GET, PUT a FaultConfig as JSON) and ``/debug/perennial/requests`` (GET, DELETE)."""
        what = path[len(DEBUG_PREFIX):]
        if what == "faults" and request.method in ("GET", "PUT"):
            if request.method == "PUT":
                try:
                    self.set_faults(FaultConfig.from_dict(json.loads(await request.read() or b"{}")))
                except (ValueError, TypeError) as exc:
                    return _error(APIError(400, "BadRequest", f"invalid fault configuration: {exc}"))
            return _json({"config": self.faults.to_dict(), "injected": self.fault_counts()})
        if what == "requests" and request.method in ("GET", "DELETE"):
            snapshot = self.request_counts()
            if request.method == "DELETE":
                self.reset_request_counts()
            return _json(snapshot)
        return _error(APIError(404, "NotFound", "the server could not find the requested resource"))

    async def _serve(self, request: web.Request, path: str) -> web.StreamResponse:
        try:
            ctype = request.headers.get("Content-Type", "")
            if "cbor" in ctype:
                raise APIError(415, "UnsupportedMediaType",
                               'the body of the request was in an unknown format - accepted media types include: '
                               'application/json, application/yaml')
            parts = [p for p in path.split("/") if p]
            if path in ("/healthz", "/readyz", "/livez"):
                return web.Response(text="ok")
            if path == "/version":
                return _json(KUBE_VERSION)
            if path == "/api":
                return _json({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}]})
            if path == "/apis":
                return _json(self._group_list())
            if parts and parts[0] == "openapi":
                return self._openapi(parts, request)
            if parts[:2] == ["api", "v1"]:
                group, version, rest = "", "v1", parts[2:]
            elif parts and parts[0] == "apis" and len(parts) >= 3:
                group, version, rest = parts[1], parts[2], parts[3:]
            elif parts and parts[0] == "apis" and len(parts) == 2:
                for g in self._group_list()["groups"]:
                    if g["name"] == parts[1]:
                        return _json({"kind": "APIGroup", "apiVersion": "v1", **g})
                raise APIError(404, "NotFound", "the server could not find the requested resource")
            else:
                raise APIError(404, "NotFound", "the server could not find the requested resource")
            if not rest:
                return _json(self._resource_list(group, version))
            return await self._resource(request, group, version, rest)
        except APIError as err:
            return _error(err)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug here must not kill the connection silently
            log.exception("Internal error serving %s %s", request.method, request.path)
            return _error(APIError(500, "InternalError", f"Internal error occurred: {exc!r}"))

    # ------------------------------------------------------------------ discovery

    def _group_list(self) -> dict:
        groups: dict[str, dict[str, ResourceType]] = {}
        with self.store.lock:
            for rt in self.store.types.values():
                if rt.group:
                    groups.setdefault(rt.group, {})[rt.version] = rt
        out = []
        for name in sorted(groups):
            versions = sorted(groups[name], key=_version_priority)
            preferred = next((v for v in versions if groups[name][v].storage), versions[0])
            out.append({
                "name": name,
                "versions": [{"groupVersion": f"{name}/{v}", "version": v} for v in versions],
                "preferredVersion": {"groupVersion": f"{name}/{preferred}", "version": preferred},
            })
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": out}

    def _resource_list(self, group: str, version: str) -> dict:
        with self.store.lock:
            rts = [rt for (g, v, _), rt in self.store.types.items() if g == group and v == version]
        if not rts:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        resources = []
        for rt in sorted(rts, key=lambda r: r.plural):
            entry: dict[str, Any] = {
                "name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced,
                "kind": rt.kind, "verbs": list(rt.verbs),
                "storageVersionHash": hashlib.sha256(f"{rt.group}/{rt.plural}".encode()).hexdigest()[:12],
            }
            if rt.short_names:
                entry["shortNames"] = list(rt.short_names)
            if rt.categories:
                entry["categories"] = list(rt.categories)
            resources.append(entry)
            for sub in rt.subresources:
                verbs = ["get"] if sub == "log" else ["get", "patch", "update"]
                kind = "Scale" if sub == "scale" else rt.kind
                sub_entry = {"name": f"{rt.plural}/{sub}", "singularName": "", "namespaced": rt.namespaced,
                             "kind": kind, "verbs": verbs}
                if sub == "scale":
                    sub_entry["group"], sub_entry["version"] = "autoscaling", "v1"
                resources.append(sub_entry)
            if rt.key in (("", "pods"), ("", "services")) and version == "v1":
                resources.append({"name": f"{rt.plural}/proxy", "singularName": "", "namespaced": True,
                                  "kind": f"{rt.kind}ProxyOptions", "verbs": ["create", "delete", "get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": resources}

    # ------------------------------------------------------------------ OpenAPI v3

    def _openapi(self, parts: list[str], request: web.Request) -> web.Response:
        if parts == ["openapi", "v3"]:
            paths = {}
            gvs = sorted({(rt.group, rt.version) for rt in list(self.store.types.values())})
            for g, v in gvs:
                key = f"apis/{g}/{v}" if g else f"api/{v}"
                paths[key] = {"serverRelativeURL": f"/openapi/v3/{key}?hash={self._openapi_doc(g, v)[1]}"}
            return _json({"paths": paths})
        if parts[:2] == ["openapi", "v3"]:
            rest = parts[2:]
            if rest[:2] == ["api", "v1"] and len(rest) == 2:
                g, v = "", "v1"
            elif rest[:1] == ["apis"] and len(rest) == 3:
                g, v = rest[1], rest[2]
            else:
                raise APIError(404, "NotFound", "the server could not find the requested resource")
            text, _ = self._openapi_doc(g, v)
            return web.Response(text=text, content_type="application/json")
        # /openapi/v2 is protobuf-first in kubectl; absent here (kubectl uses v3).
        raise APIError(404, "NotFound", "the server could not find the requested resource")

    def _openapi_doc(self, group: str, version: str) -> tuple[str, str]:
        with self.store.lock:
            epoch = self.store.epoch
            cached = self._openapi_cache.get((epoch, f"{group}/{version}"))
            if cached:
                return cached
            rts = [rt for (g, v, _), rt in self.store.types.items() if g == group and v == version]
        if not rts:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
        rev_group = ".".join(reversed(group.split("."))) if group else "io.k8s.api.core"
        paths: dict[str, Any] = {}
        schemas: dict[str, Any] = {
            "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta": {
                "type": "object",
                "description": "ObjectMeta is metadata that all persisted resources must have, which includes "
                               "all objects users must create.",
                "x-kubernetes-preserve-unknown-fields": True,
            },
        }
        for rt in rts:
            gvk = {"group": rt.group, "version": rt.version, "kind": rt.kind}
            schema_name = f"{rev_group}.{version}.{rt.kind}"
            schema = dict(rt.schema) if rt.schema else {
                "type": "object", "description": f"{rt.kind} is a built-in Kubernetes resource.",
                "x-kubernetes-preserve-unknown-fields": True}
            props = dict(schema.get("properties") or {})
            props.setdefault("apiVersion", {"type": "string", "description": "APIVersion defines the versioned "
                                            "schema of this representation of an object."})
            props.setdefault("kind", {"type": "string", "description": "Kind is a string value representing the "
                                      "REST resource this object represents."})
            props["metadata"] = {"allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1."
                                                    "ObjectMeta"}],
                                 "description": "Standard object's metadata. More info: https://git.k8s.io/"
                                                "community/contributors/devel/sig-architecture/api-conventions.md"
                                                "#metadata", "default": {}}
            schema["properties"] = props
            schema["x-kubernetes-group-version-kind"] = [gvk]
            schemas[schema_name] = schema
            ref = {"$ref": f"#/components/schemas/{schema_name}"}
            body = {"content": {"application/json": {"schema": ref}}}
            common = [{"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
                      {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
                      {"name": "fieldValidation", "in": "query",
                       "schema": {"type": "string", "uniqueItems": True}}]

            def op(action: str, op_id: str, with_body: bool = False) -> dict:
                o: dict[str, Any] = {
                    "operationId": op_id, "parameters": list(common) if with_body else [],
                    "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": ref}}}},
                    "x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk,
                }
                if with_body:
                    o["requestBody"] = body
                return o

            base = f"{prefix}/namespaces/{{namespace}}/{rt.plural}" if rt.namespaced else f"{prefix}/{rt.plural}"
            kind = rt.kind
            paths[base] = {"get": op("list", f"list{kind}"), "post": op("post", f"create{kind}", True)}
            item = {"get": op("get", f"read{kind}"), "put": op("put", f"replace{kind}", True),
                    "patch": op("patch", f"patch{kind}", True), "delete": op("delete", f"delete{kind}")}
            item["patch"]["requestBody"] = {"content": {
                "application/json-patch+json": {"schema": {"type": "object"}},
                "application/merge-patch+json": {"schema": {"type": "object"}},
                "application/apply-patch+yaml": {"schema": {"type": "object"}},
                # no strategic-merge entry: kubectl then builds strategic patches from its compiled-in types
            }}
            paths[base + "/{name}"] = item
            if "status" in rt.subresources:
                paths[base + "/{name}/status"] = {"get": op("get", f"read{kind}Status"),
                                                  "put": op("put", f"replace{kind}Status", True),
                                                  "patch": op("patch", f"patch{kind}Status", True)}
        doc = {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": KUBE_VERSION["gitVersion"]},
               "paths": paths, "components": {"schemas": schemas}}
        text = _dumps(doc)
        digest = hashlib.sha512(text.encode()).hexdigest()[:128].upper()
        with self.store.lock:
            self._openapi_cache[(epoch, f"{group}/{version}")] = (text, digest)
        return text, digest

    # ------------------------------------------------------------------ resources

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            return {}
        ctype = request.headers.get("Content-Type", "")
        if "protobuf" in ctype:
            try:
                return protobuf.decode(raw)
            except protobuf.ProtobufError as exc:
                raise APIError(415, "UnsupportedMediaType",
                               f"the body of the request was in an unknown format - accepted media types include: "
                               f"application/json, application/yaml ({exc})") from None
        try:
            if "yaml" in ctype:
                return yaml.safe_load(raw)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as exc:
            raise APIError(400, "BadRequest", f"the body of the request was in an unknown format: {exc}") from None

    async def _resource(self, request: web.Request, group: str, version: str, rest: list[str]) -> web.StreamResponse:
        store = self.store
        ns: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            candidate = store.lookup(group, version, rest[2])
            if candidate is not None and candidate.namespaced:
                ns, rest = rest[1], rest[2:]
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub == "proxy" and ns is not None and (group, version, plural) in (("", "v1", "pods"), ("", "v1", "services")):
            assert name is not None
            return await self._proxy(request, plural, ns, name)
        if len(rest) > 3:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        rt = self._rt(group, version, plural)
        if sub is not None and sub not in rt.subresources:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        if rt.namespaced and name is not None and ns is None:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        q = request.query
        method = request.method
        dry_run = bool(q.getall("dryRun", []))
        strict = q.get("fieldValidation", "") == "Strict"
        warnings: list[str] | None = [] if q.get("fieldValidation", "Warn") in ("Warn", "Strict") else None
        table = "as=Table" in request.headers.get("Accept", "")

        if name is None:
            if method == "GET":
                if q.get("watch") in ("true", "1", "True"):
                    return await self._watch(request, rt, ns, table)
                items, rv = store.list(rt, ns, q.get("labelSelector"), q.get("fieldSelector"))
                if table:
                    return _json(self._table(rt, items, rv, q.get("includeObject", "Metadata")))
                return _json(None, text=self._list_text(rt, items, rv))
            if method == "POST":
                if rt.namespaced and ns is None:
                    raise APIError(405, "MethodNotAllowed", "the server does not allow this method on the "
                                                            "requested resource")
                body = await self._body(request)
                obj = store.create(rt, ns, body, dry_run=dry_run, strict=strict, warnings=warnings)
                return _json(None, 201, warnings, text=self._encode(rt, obj))
            if method == "DELETE":
                warnings = []
                options = await self._body(request)
                options = dict(options) if isinstance(options, dict) else {}
                if "propagationPolicy" in q:
                    options["propagationPolicy"] = q["propagationPolicy"]
                items, rv = store.list(rt, ns, q.get("labelSelector"), q.get("fieldSelector"))
                deleted = []
                for o in items:
                    try:
                        deleted.append(store.delete(rt, o["metadata"].get("namespace"), o["metadata"]["name"],
                                                    options, dry_run=dry_run, warnings=warnings))
                    except APIError:
                        pass
                return _json({"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                              "metadata": {"resourceVersion": str(store.last_rv)},
                              "items": [self._out(rt, o) for o in deleted]}, 200, list(dict.fromkeys(warnings or [])))
            raise APIError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

        if sub == "log":
            if method != "GET":
                raise APIError(405, "MethodNotAllowed", "the server does not allow this method")
            store.get(rt, ns, name)
            text = store.pod_logs.get((ns or "", name), "")
            tail = q.get("tailLines")
            if tail is not None:
                try:
                    n = int(tail)
                except ValueError:
                    n = -1
                if n >= 0:
                    lines = text.splitlines(keepends=True)
                    text = "".join(lines[-n:]) if n else ""
            if q.get("follow") in ("true", "1", "True"):
                return await self._follow_log(request, rt, ns or "", name, text)
            return web.Response(text=text, content_type="text/plain")

        if sub == "scale":
            return await self._scale(request, rt, ns, name, dry_run)
        if method == "GET":
            obj = store.get(rt, ns, name)
            if table:
                return _json(self._table(rt, [obj], store.last_rv, q.get("includeObject", "Metadata")))
            return _json(None, text=self._encode(rt, obj))
        if method == "PUT":
            body = await self._body(request)
            obj = store.update(rt, ns, name, body, subresource=sub, dry_run=dry_run, strict=strict,
                               warnings=warnings)
            return _json(None, 200, warnings, text=self._encode(rt, obj))
        if method == "PATCH":
            ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
            patch_type = PATCH_TYPES.get(ctype)
            if patch_type is None:
                raise APIError(415, "UnsupportedMediaType", f"the server does not support patch type {ctype!r}")
            if patch_type == "strategic" and rt.crd is not None:
                raise APIError(415, "UnsupportedMediaType",
                               "the body of the request was in an unknown format - accepted media types include: "
                               "application/json-patch+json, application/merge-patch+json, "
                               "application/apply-patch+yaml")
            if patch_type == "apply" and not q.get("fieldManager"):
                raise APIError(400, "BadRequest", "PATCH requests with apply patch type require fieldManager")
            body = await self._body(request)
            obj, created = store.patch(rt, ns, name, patch_type, body, subresource=sub, dry_run=dry_run,
                                       strict=strict, warnings=warnings)
            return _json(None, 201 if created else 200, warnings, text=self._encode(rt, obj))
        if method == "DELETE":
            warnings = []  # the Job's orphaning default warns whatever the field validation
            options = await self._body(request)
            for key in ("propagationPolicy",):
                if key in q:
                    options[key] = q[key]
            with store.lock:
                obj = store.delete(rt, ns, name, options if isinstance(options, dict) else {}, dry_run=dry_run,
                                   warnings=warnings)
                still = store.objects[rt.key].get((ns or "", name)) is not None
            if still or rt.crd is not None or rt.key == ("", "pods"):
                return _json(self._out(rt, obj), 200, warnings)
            return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                          "details": {"name": name, "group": rt.group, "kind": rt.plural,
                                      "uid": obj["metadata"].get("uid")}}, 200, warnings)
        raise APIError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    async def _proxy(self, request: web.Request, plural: str, ns: str, ident: str) -> web.StreamResponse:
        """The ``proxy`` subresource of a Service or a Pod (see ``apiproxy.py``)."""
        what = plural[:-1]
        parsed = split_scheme_name_port(ident)
        if parsed is None:
            raise APIError(400, "BadRequest", f'invalid {what} request "{ident}"')
        scheme, name, port = parsed
        m = re.match(r"^/api/v1/namespaces/[^/]+/[^/]+/[^/]+/proxy(/.*)?$", request.path)
        suffix = (m.group(1) if m else None) or "/"
        store = self.store
        with store.lock:
            if plural == "pods":
                ip, number = pod_targets(store.get(self._rt("", "v1", "pods"), ns, name), port)
                targets = [(ip, number)]
            else:
                svc = store.get(self._rt("", "v1", "services"), ns, name)
                selector = (svc.get("spec") or {}).get("selector")
                pods = store.list(self._rt("", "v1", "pods"), ns)[0] if selector else []
                endpoints = None if selector else store.objects[("", "endpoints")].get((ns, name))
                _, targets = service_targets(svc, pods, endpoints, port)
                random.shuffle(targets)  # kube-apiserver picks one at random
        return await self.proxy.forward(request, [(scheme, ip, p) for ip, p in targets], suffix, what)

    async def _follow_log(self, request: web.Request, rt: ResourceType, ns: str, name: str,
                          first: str) -> web.StreamResponse:
        """Stream a pod's log as it grows, until the pod ends (Succeeded/Failed), goes away, or the client leaves."""
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        store = self.store
        sent = len(store.pod_logs.get((ns, name), ""))
        try:
            if first:
                await resp.write(first.encode())
            while not self._stopping:
                text = store.pod_logs.get((ns, name), "")
                if len(text) > sent:
                    await resp.write(text[sent:].encode())
                    sent = len(text)
                elif len(text) < sent:  # the log was replaced
                    sent = 0
                    continue
                pod = store.objects[rt.key].get((ns, name))
                if pod is None or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    break
                if request.transport is None or request.transport.is_closing():
                    break
                await asyncio.sleep(LOG_POLL_INTERVAL)
        except (ConnectionResetError, asyncio.CancelledError, RuntimeError):
            pass
        try:
            await resp.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass
        return resp

    async def _scale(self, request: web.Request, rt: ResourceType, ns: str | None, name: str,
                     dry_run: bool) -> web.Response:
        store = self.store
        if request.method == "GET":
            return _json(to_scale(rt, store.get(rt, ns, name)))
        if request.method not in ("PUT", "PATCH"):
            raise APIError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        body = await self._body(request)
        with store.lock:
            obj = store.get(rt, ns, name)
            current = to_scale(rt, obj)
            if request.method == "PUT":
                scale = body
            else:
                ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
                kind = PATCH_TYPES.get(ctype)
                try:
                    if kind == "json":
                        scale = json_patch(current, body)
                    elif kind in ("merge", "strategic", "apply"):
                        scale = merge_patch(current, body)
                    else:
                        raise APIError(415, "UnsupportedMediaType", f"the server does not support patch type {ctype!r}")
                except PatchError as exc:
                    raise APIError(exc.code, "Invalid" if exc.code == 422 else "BadRequest", str(exc)) from None
            new = from_scale(rt, obj, scale if isinstance(scale, dict) else {})
            updated = store.update(rt, ns, name, new, dry_run=dry_run)
            return _json(to_scale(rt, updated))

    @staticmethod
    def _out(rt: ResourceType, obj: dict) -> dict:
        return Store.view(rt, obj)

    def _encoded_entry(self, rt: ResourceType, obj: dict) -> tuple[dict, str, dict[str, bytes]]:
        key = (id(obj), rt.api_version)
        entry = self._encoded.get(key)
        if entry is not None and entry[0] is obj:
            self._encoded.move_to_end(key)
            return entry
        entry = (obj, _dumps(self._out(rt, obj)), {})
        self._encoded[key] = entry  # holds obj: its id is not reused while the entry lives
        if len(self._encoded) > ENCODED_CACHE:
            self._encoded.popitem(last=False)
        return entry

    def _encode(self, rt: ResourceType, obj: dict) -> str:
        """The JSON of a stored object as version ``rt`` shows it, encoded once for the write's answer, every
        watcher's event and LISTs (stored objects are never changed in place: a write stores a new dict)."""
        return self._encoded_entry(rt, obj)[1]

    def _event_line(self, rt: ResourceType, etype: str, obj: dict) -> bytes:
        """A watch event line, built once per event for all watchers (the bytes ``_dumps`` would give)."""
        _, text, lines = self._encoded_entry(rt, obj)
        line = lines.get(etype)
        if line is None:
            line = lines[etype] = ('{"type":%s,"object":%s}\n' % (_dumps(etype), text)).encode()
        return line

    def _list_text(self, rt: ResourceType, items: list[dict], rv: Any) -> str:
        head = _dumps({"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": {"resourceVersion": str(rv)}})
        return head[:-1] + ',"items":[' + ",".join(self._encode(rt, o) for o in items) + "]}"

    # ------------------------------------------------------------------ tables

    def _table(self, rt: ResourceType, items: list[dict], rv: int, include: str) -> dict:
        builtin = BUILTIN_COLUMNS.get(rt.key) if rt.crd is None else None
        if builtin is None:
            printer = list(rt.printer_columns) or [
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
            columns: list[tuple[str, str, int, Any]] = [("Name", "string", 0, lambda o: o["metadata"]["name"])]
            for c in printer:
                columns.append((c["name"], c.get("type", "string"), c.get("priority", 0),
                                lambda o, c=c: _printer_cell(o, c)))
            descriptions = {c["name"]: c.get("description", "") for c in printer}
            formats = {c["name"]: c.get("format", "") for c in printer}
        else:
            columns, descriptions, formats = builtin, {}, {}
        cols = [{"name": name, "type": "string" if typ == "date" and builtin is not None else typ,
                 "format": "name" if name == "Name" else formats.get(name, ""),
                 "description": "Name must be unique within a namespace." if name == "Name"
                 else descriptions.get(name, ""), "priority": prio}
                for name, typ, prio, _ in columns]
        rows = []
        for obj in items:
            cells = [fn(obj) for _, _, _, fn in columns]
            if include == "None":
                embedded: Any = None
            elif include == "Object":
                embedded = self._out(rt, obj)
            else:
                embedded = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                            "metadata": obj["metadata"]}
            row: dict[str, Any] = {"cells": cells}
            if embedded is not None:
                row["object"] = embedded
            rows.append(row)
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": str(rv)},
                "columnDefinitions": cols, "rows": rows}

    # ------------------------------------------------------------------ watch

    @staticmethod
    async def _write_expired(resp: web.StreamResponse, since: str, compacted: int) -> None:
        await resp.write((_dumps({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": f"too old resource version: {since} ({compacted})",
            "reason": "Expired", "code": 410}}) + "\n").encode())

    async def _expired_watch(self, request: web.Request, since: str, compacted: int) -> web.StreamResponse:
        """A watch answered as kube-apiserver answers one from a compacted version: 200, one ERROR 410 event."""
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                       "Cache-Control": "no-cache, private"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await self._write_expired(resp, since, compacted)
        await resp.write_eof()
        return resp

    async def _watch(self, request: web.Request, rt: ResourceType, ns: str | None, table: bool) -> web.StreamResponse:
        q = request.query
        loop = asyncio.get_running_loop()
        w = Watcher(loop=loop, queue=asyncio.Queue(), namespace=ns,
                    labels=parse_label_selector(q.get("labelSelector")),
                    fields=parse_field_selector(q.get("fieldSelector")))
        since = q.get("resourceVersion")
        send_initial = q.get("sendInitialEvents") in ("true", "1", "True")
        timeout = q.get("timeoutSeconds")
        try:
            deadline = time.monotonic() + int(timeout) if timeout else None  # an int64 in kube-apiserver's ListOptions
        except ValueError:
            raise APIError(400, "BadRequest", f'invalid timeoutSeconds "{timeout[:50]}": an integer number of seconds') from None
        initial = self.store.watch(rt, w, None if send_initial else since)
        cut_at = time.monotonic() + request[CLOSE_AFTER] if CLOSE_AFTER in request else None
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1", "True")
        include = q.get("includeObject", "Metadata")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                       "Cache-Control": "no-cache, private"})
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
        except ConnectionResetError:  # the client, or this server stopping, closed the connection first
            self.store.unwatch(rt, w)  # registered above: never left behind
            return resp  # aiohttp's own prepare of it meets the closed connection too and drops it quietly
        except BaseException:
            self.store.unwatch(rt, w)
            raise

        def render(etype: str, obj: dict) -> bytes:
            if table and etype in ("ADDED", "MODIFIED", "DELETED"):
                out = self._table(rt, [obj], int(obj["metadata"]["resourceVersion"]), include)
                return (_dumps({"type": etype, "object": out}) + "\n").encode()
            return self._event_line(rt, etype, obj)

        try:
            if initial is None:
                await self._write_expired(resp, since or "", self.store.compacted.get(rt.key, 0))
                return resp
            for etype, obj in initial:
                await resp.write(render(etype, obj))
            last_rv = self.store.last_rv
            if send_initial:
                await resp.write((_dumps({"type": "BOOKMARK", "object": {
                    "kind": rt.kind, "apiVersion": rt.api_version,
                    "metadata": {"resourceVersion": str(last_rv),
                                 "annotations": {"k8s.io/initial-events-end": "true"}}}}) + "\n").encode())
            idle = 0.0
            while not self._stopping:
                wait = min(BOOKMARK_INTERVAL - idle, 5.0)
                if cut_at is not None:
                    if cut_at - time.monotonic() <= 0:
                        # an injected fault: the connection drops mid-stream, no end of the chunked body
                        if request.transport is not None:
                            request.transport.close()
                        return resp
                    wait = min(wait, cut_at - time.monotonic())
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    wait = min(wait, left)
                try:
                    # queued already: no wait (wait_for makes a task per call)
                    item = w.queue.get_nowait() if not w.queue.empty() else await asyncio.wait_for(w.queue.get(), timeout=max(wait, 0.0))
                except asyncio.TimeoutError:
                    if request.transport is None or request.transport.is_closing():
                        break  # the client went away
                    idle += wait
                    if idle < BOOKMARK_INTERVAL - 1e-6:
                        continue
                    idle = 0.0
                    if bookmarks and (deadline is None or deadline - time.monotonic() > 0):
                        await resp.write((_dumps({"type": "BOOKMARK", "object": {
                            "kind": rt.kind, "apiVersion": rt.api_version,
                            "metadata": {"resourceVersion": str(max(last_rv, self.store.last_rv))}}}) + "\n").encode())
                    continue
                if item is None:
                    break
                idle = 0.0
                batch, size, stop = [], 0, False
                while True:  # this event and those queued behind it, in order, in one write
                    etype, obj = item
                    last_rv = int(obj["metadata"]["resourceVersion"])
                    line = render(etype, obj)
                    batch.append(line)
                    size += len(line)
                    if size >= WATCH_BATCH_BYTES or w.queue.empty():
                        break
                    item = w.queue.get_nowait()
                    if item is None:
                        stop = True
                        break
                await resp.write(batch[0] if len(batch) == 1 else b"".join(batch))
                if stop:
                    break
        except (ConnectionResetError, asyncio.CancelledError, RuntimeError):
            pass
        finally:
            self.store.unwatch(rt, w)
        try:
            await resp.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass
        return resp


def _version_priority(v: str) -> tuple:
    """Kubernetes version ordering: GA > beta > alpha, higher numbers first."""
    m = re.match(r"^v(\d+)(?:(alpha|beta)(\d+))?$", v)
    if not m:
        return (3, v)
    major, stage, minor = int(m[1]), m[2], int(m[3] or 0)
    rank = {None: 0, "beta": 1, "alpha": 2}[stage]
    return (rank, -major, -minor)


# --------------------------------------------------------------------------- background thread


def _new_loop() -> asyncio.AbstractEventLoop:
    """The server thread's event loop: uvloop when installed (its TLS and transports in C: ~15% less CPU per
    request than asyncio's), as the feedback sidecar does; plain asyncio otherwise, or with
    ``PERENNIAL_CONTROL_PLANE_LOOP=asyncio``."""
    if os.environ.get("PERENNIAL_CONTROL_PLANE_LOOP", "") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class ServerThread:
    """An :class:`APIServer` running in its own thread and event loop (for sync tests)."""

    def __init__(self, server: APIServer | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = server or APIServer()
        self._loop = _new_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(host, port), name="perennial-apiserver",
                                        daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

    def _run(self, host: str, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.start(host, port))
        except BaseException as exc:  # report to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def store(self) -> Store:
        return self.server.store

    @property
    def token(self) -> str | None:
        return self.server.token

    @property
    def ca_file(self) -> str | None:
        return self.server.ca_file

    def stop(self) -> None:
        if not self._loop.is_running():
            return
        fut = asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop)
        try:
            fut.result(15)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(15)

    def __getattr__(self, item: str) -> Any:  # set_pod_log, apply_crd, create, get, ...
        return getattr(self.server, item)

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_in_thread(host: str = "127.0.0.1", port: int = 0, *, faults: FaultConfig | None = None,
                    token: str | None = None, tls: ServingCert | None = None) -> ServerThread:
    """Start a fresh :class:`APIServer` in a background thread; ``.url``, ``.token``, ``.stop()``.

    ``faults`` turns on fault injection from the first request (``.set_faults()`` changes it later);
    ``token``: the bearer token every request must carry (None: anonymous requests allowed); ``tls``: serve
    HTTPS with this certificate.
    """
    return ServerThread(APIServer(faults, token=token, tls=tls), host, port)


def write_kubeconfig(path: str | Path, url: str, *, namespace: str = "default",
                     context: str = "perennial-local", token: str | None = None, ca_pem: bytes | None = None) -> Path:
    """Write a kubeconfig pointing at ``url`` with the bearer ``token`` and the server's certificate ``ca_pem``
    (if any), readable by its owner only."""
    cluster: dict[str, Any] = {"server": url}
    if ca_pem:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    cfg = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": context, "cluster": cluster}],
        "users": [{"name": context, "user": {"token": token} if token else {}}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": context, "namespace": namespace}}],
        "current-context": context,
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 (never world-readable, not even for a moment); an existing file is emptied, made 0600, then
    # written.
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(yaml.safe_dump(cfg, sort_keys=False))
    return p
