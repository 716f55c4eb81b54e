"""In-memory object store of the embedded API server: resource types, objects, watch history.

All state lives behind one ``threading.RLock``; stored objects are never mutated in
place (every write stores a fresh dict), so readers may serialise them outside the lock.
Watchers are asyncio queues fed through their loop's ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import itertools
import json
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from . import builtin_schema, defaults, validation
from ..kube.client import json_equal
from .patches import PatchError, json_copy, json_patch, merge_patch, strategic_merge_patch

ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
HISTORY = 2000  # watch events kept per resource type


_now_cache: tuple[int, str] = (-1, "")


def now_iso() -> str:
    """The current UTC time to the second, as Kubernetes writes timestamps (formatted once a second)."""
    global _now_cache
    second = int(time.time())
    cached = _now_cache
    if cached[0] != second:
        cached = _now_cache = (second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second)))
    return cached[1]


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered as a ``Status`` body."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


# --------------------------------------------------------------------------- resource types


@dataclass
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    singular: str = ""
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    verbs: list[str] = field(default_factory=lambda: list(ALL_VERBS))
    subresources: tuple[str, ...] = ()
    has_generation: bool = False
    schema: dict | None = None  # openAPIV3Schema (custom resources)
    printer_columns: list[dict] = field(default_factory=list)
    crd: str | None = None  # name of the defining CRD
    scale: dict | None = None  # specReplicasPath / statusReplicasPath / labelSelectorPath
    storage: bool = True
    # Version conversion of a built-in kind served in several versions (None: the stored form as is)
    to_storage: Callable[[dict], dict] | None = None
    from_storage: Callable[[dict], dict] | None = None

    def __post_init__(self) -> None:
        if not self.singular:
            self.singular = self.kind.lower()

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def api_version(self) -> str:
        return self.group_version

    @property
    def resource_name(self) -> str:
        """``configmaps`` or ``trainingruns.perennial.ai`` as used in error messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def kind_name(self) -> str:
        """``ConfigMap`` or ``TrainingRun.perennial.ai`` as used in Invalid messages."""
        return f"{self.kind}.{self.group}" if self.group else self.kind


def _rt(group: str, version: str, plural: str, kind: str, **kw: Any) -> ResourceType:
    return ResourceType(group=group, version=version, plural=plural, kind=kind, **kw)


_CRD_KEY = ("apiextensions.k8s.io", "customresourcedefinitions")
FOREGROUND = "foregroundDeletion"
ORPHAN = "orphan"
PROPAGATION_POLICIES = ("Foreground", "Background", "Orphan")
_CRD_GVR = ("apiextensions.k8s.io", "v1", "customresourcedefinitions")
CRD_CLEANUP = "customresourcecleanup.apiextensions.k8s.io"
_BUILTIN_SCALE = {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                  "labelSelectorPath": ".spec.selector"}


def builtin_types() -> list[ResourceType]:
    no_dc = [v for v in ALL_VERBS if v != "deletecollection"]
    return [
        _rt("", "v1", "namespaces", "Namespace", namespaced=False, short_names=["ns"], verbs=no_dc,
            subresources=("status",)),
        _rt("", "v1", "configmaps", "ConfigMap", short_names=["cm"]),
        _rt("", "v1", "secrets", "Secret"),
        _rt("", "v1", "services", "Service", short_names=["svc"], categories=["all"], subresources=("status",),
            verbs=no_dc),
        _rt("", "v1", "pods", "Pod", short_names=["po"], categories=["all"], subresources=("status", "log")),
        _rt("", "v1", "events", "Event", short_names=["ev"]),
        _rt("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", short_names=["pvc"],
            subresources=("status",)),
        _rt("", "v1", "serviceaccounts", "ServiceAccount", short_names=["sa"]),
        _rt("", "v1", "endpoints", "Endpoints", short_names=["ep"]),
        _rt("events.k8s.io", "v1", "events", "Event", short_names=["ev"]),
        _rt("apps", "v1", "deployments", "Deployment", short_names=["deploy"], categories=["all"],
            subresources=("status", "scale"), has_generation=True, scale=_BUILTIN_SCALE),
        _rt("apps", "v1", "replicasets", "ReplicaSet", short_names=["rs"], categories=["all"],
            subresources=("status", "scale"), has_generation=True, scale=_BUILTIN_SCALE),
        _rt("batch", "v1", "jobs", "Job", categories=["all"], subresources=("status",), has_generation=True),
        _rt("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", short_names=["hpa"],
            categories=["all"], subresources=("status",)),
        _rt("autoscaling", "v1", "horizontalpodautoscalers", "HorizontalPodAutoscaler", short_names=["hpa"],
            categories=["all"], subresources=("status",), storage=False,
            to_storage=hpa_v1_to_v2, from_storage=hpa_v2_to_v1),
        _rt("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", short_names=["pdb"],
            subresources=("status",), has_generation=True),
        _rt("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", short_names=["netpol"], has_generation=True),
        _rt("coordination.k8s.io", "v1", "leases", "Lease"),
        _rt("rbac.authorization.k8s.io", "v1", "roles", "Role"),
        _rt("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
        _rt("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
        _rt("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", namespaced=False),
        _rt("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
            namespaced=False, short_names=["crd", "crds"], categories=["api-extensions"],
            subresources=("status",), has_generation=True),
    ]


# --------------------------------------------------------------------------- selectors

_REQ = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_./-]+)\s*"
    r"(?:(?P<op>==|!=|=|\s+in\s+|\s+notin\s+)\s*(?P<val>\([^)]*\)|[A-Za-z0-9_.-]*))?\s*$"
)


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def parse_label_selector(text: str | None) -> Callable[[dict], bool]:
    """Parse ``a=b,c!=d,e in (f,g),!h,i`` into a predicate over a labels dict."""
    if not text:
        return lambda labels: True
    checks: list[Callable[[dict], bool]] = []
    for part in _split_selector(text):
        m = _REQ.match(part)
        if not m:
            raise APIError(400, "BadRequest", f"unable to parse requirement: {part!r}")
        key, op, val, neg = m["key"], (m["op"] or "").strip(), m["val"], m["neg"]
        if neg:
            checks.append(lambda l, k=key: k not in l)
        elif not op:
            checks.append(lambda l, k=key: k in l)
        elif op in ("=", "=="):
            checks.append(lambda l, k=key, v=val: l.get(k) == v)
        elif op == "!=":
            checks.append(lambda l, k=key, v=val: l.get(k) != v)
        else:
            values = {v.strip() for v in (val or "").strip("()").split(",") if v.strip()}
            if op == "in":
                checks.append(lambda l, k=key, vs=values: l.get(k) in vs)
            else:
                checks.append(lambda l, k=key, vs=values: l.get(k) not in vs)
    return lambda labels: all(c(labels) for c in checks)


def _dotted(obj: dict, path: str) -> Any:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def parse_field_selector(text: str | None) -> Callable[[dict], bool]:
    """``metadata.name=x,metadata.namespace!=y`` (any dotted field, compared as strings)."""
    if not text:
        return lambda obj: True
    checks = []
    for part in _split_selector(text):
        m = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|!=|=)\s*(.*?)\s*$", part)
        if not m:
            raise APIError(400, "BadRequest", f"invalid selector: '{text}'; can't understand '{part}'")
        path, op, val = m.groups()

        def check(obj: dict, p: str = path, o: str = op, v: str = val) -> bool:
            actual = _dotted(obj, p)
            actual_s = "" if actual is None else (str(actual).lower() if isinstance(actual, bool) else str(actual))
            return (actual_s == v) if o in ("=", "==") else (actual_s != v)

        checks.append(check)
    return lambda obj: all(c(obj) for c in checks)


# --------------------------------------------------------------------------- watchers


@dataclass(eq=False)
class Watcher:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    namespace: str | None
    labels: Callable[[dict], bool]
    fields: Callable[[dict], bool]

    def matches(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self.labels(meta.get("labels") or {}) and self.fields(obj)

    #: events pushed from another thread than the loop's, not yet in `queue` (in order)
    backlog: collections.deque = field(default_factory=collections.deque)

    def push(self, item: Any) -> None:
        """Queue an event (pushes are ordered: they happen under the store's lock). On the loop's own thread, with
        nothing from another thread still on its way, straight into the queue: no wake-up of the loop (a syscall)
        and no callback per event and watcher; else through the loop, after what is on its way."""
        try:
            if not self.backlog and _running_loop() is self.loop:
                self.queue.put_nowait(item)
                return
            self.backlog.append(item)
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # loop closed
            pass

    def _drain(self) -> None:
        while self.backlog:
            self.queue.put_nowait(self.backlog.popleft())


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_GEN_CHARS = "bcdfghjklmnpqrstvwxz2456789"


def _strip_volatile(obj: dict) -> dict:
    out = dict(obj)
    meta = dict(out.get("metadata") or {})
    meta.pop("resourceVersion", None)
    meta.pop("managedFields", None)
    out["metadata"] = meta
    return out


def _check_type_meta(rt: ResourceType, obj: dict) -> None:
    """A body whose apiVersion/kind name another type is refused, as the decoder does."""
    kind, api_version = obj.get("kind"), obj.get("apiVersion")
    if kind and kind != rt.kind:
        raise APIError(400, "BadRequest", f'the kind in the data ("{kind}") does not match the expected kind '
                                          f'("{rt.kind}") of {rt.resource_name}')
    if api_version and api_version != rt.api_version:
        raise APIError(400, "BadRequest", f"the API version in the data ({api_version}) does not match the expected "
                                          f"API version ({rt.api_version})")


def _without(obj: dict, keys: Iterable[str]) -> dict:
    return {k: v for k, v in obj.items() if k not in keys}


# --------------------------------------------------------------------------- the store


class Store:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._rv = itertools.count(1)
        self.last_rv = 0
        self.types: dict[tuple[str, str, str], ResourceType] = {}  # (group, version, plural)
        self.objects: dict[tuple[str, str], dict[tuple[str, str], dict]] = {}
        self.history: dict[tuple[str, str], collections.deque] = {}
        self.compacted: dict[tuple[str, str], int] = {}
        self.watchers: dict[tuple[str, str], set[Watcher]] = {}
        self.uids: dict[str, tuple[tuple[str, str], str, str]] = {}
        self.dependents: dict[str, set[tuple[tuple[str, str], str, str]]] = {}
        self.pod_logs: dict[tuple[str, str], str] = {}
        # custom objects as stored by admission, with the schema that admitted them: (type, ns, name) ->
        # (object, schema); a /status write to such an object need not prune and default its spec again
        self._admitted: dict[tuple[tuple[str, str], str, str], tuple[dict, dict]] = {}
        self._ips = itertools.count(10)
        self._ips_used: set[str] = set()
        self._node_ports = itertools.count()
        self.epoch = 0  # bumped whenever the set of types changes (discovery/openapi caches)
        # validating admission of the request being served, after defaulting and validation: (type, new object, old
        # object or None on create, subresource) -> None, or raises APIError (the API server's RBAC admission)
        self.admission: Callable[[ResourceType, dict, dict | None, str | None], None] | None = None
        for rt in builtin_types():
            self.register(rt)
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.create(self.lookup("", "v1", "namespaces"), None, {"metadata": {"name": ns}})

    # ------------------------------------------------------------------ types

    def register(self, rt: ResourceType) -> None:
        with self.lock:
            self.types[(rt.group, rt.version, rt.plural)] = rt
            self.objects.setdefault(rt.key, {})
            self.history.setdefault(rt.key, collections.deque(maxlen=HISTORY))
            self.compacted.setdefault(rt.key, 0)
            self.watchers.setdefault(rt.key, set())
            self.epoch += 1

    def unregister(self, group: str, plural: str) -> None:
        with self.lock:
            for key in [k for k in self.types if k[0] == group and k[2] == plural]:
                del self.types[key]
            self.epoch += 1

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self.types.get((group, version, plural))

    def types_of(self, group: str, plural: str) -> list[ResourceType]:
        return [rt for (g, _, p), rt in self.types.items() if g == group and p == plural]

    def storage_type(self, key: tuple[str, str]) -> ResourceType | None:
        candidates = self.types_of(*key)
        for rt in candidates:
            if rt.storage:
                return rt
        return candidates[0] if candidates else None

    def _to_storage(self, rt: ResourceType, obj: dict, strict: bool = False,
                    warnings: list[str] | None = None) -> tuple[ResourceType, dict]:
        """A body of a converted version (autoscaling/v1) in its storage version, and that version's type."""
        if rt.to_storage is None:
            return rt, obj
        found = builtin_schema.check(obj)  # unknown fields of the version the client wrote
        if found is not None and found.unknown:
            if strict:
                raise APIError(400, "BadRequest", f'{rt.kind} in version "{rt.version}" cannot be handled as a '
                                                  f"{rt.kind}: strict decoding error: "
                               + ", ".join(f'unknown field "{u}"' for u in found.unknown))
            builtin_schema.drop(obj, found.unknown)
            if warnings is not None:
                warnings.extend(f'unknown field "{u}"' for u in found.unknown)
        storage = self.storage_type(rt.key)
        assert storage is not None and storage.to_storage is None
        return storage, rt.to_storage(obj)

    @staticmethod
    def view(rt: ResourceType, obj: dict) -> dict:
        """A stored object as version ``rt`` shows it."""
        if obj.get("apiVersion") == rt.api_version:
            return obj
        if rt.from_storage is not None:
            return rt.from_storage(obj)
        return {**obj, "apiVersion": rt.api_version}

    def next_rv(self) -> int:
        self.last_rv = next(self._rv)
        return self.last_rv

    # ------------------------------------------------------------------ events

    def _emit(self, rt_key: tuple[str, str], etype: str, obj: dict, old: dict | None = None) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        hist = self.history[rt_key]
        if len(hist) == hist.maxlen:
            self.compacted[rt_key] = hist[0][0]
        hist.append((rv, etype, obj, old))
        for w in list(self.watchers.get(rt_key, ())):
            event = self._route(w, etype, obj, old)
            if event is not None:
                w.push(event)

    @staticmethod
    def _route(w: Watcher, etype: str, obj: dict, old: dict | None) -> tuple[str, dict] | None:
        """The event a filtered watcher sees: objects entering/leaving its selection are ADDED/DELETED."""
        now = w.matches(obj)
        if etype == "MODIFIED" and old is not None:
            before = w.matches(old)
            if now and not before:
                return ("ADDED", obj)
            if before and not now:
                return ("DELETED", obj)
        return (etype, obj) if now else None

    def watch(self, rt: ResourceType, w: Watcher, since: str | None) -> list[tuple[str, dict]] | None:
        """Register a watcher; return the initial events, or None when ``since`` is too old."""
        with self.lock:
            initial: list[tuple[str, dict]] = []
            if since in (None, "", "0"):
                for obj in self.objects[rt.key].values():
                    if w.matches(obj):
                        initial.append(("ADDED", obj))
            else:
                try:
                    rv = int(since)
                except ValueError:
                    raise APIError(400, "BadRequest", f'invalid resource version: "{since}"') from None
                if rv < self.compacted[rt.key]:
                    return None
                for erv, etype, obj, old in self.history[rt.key]:
                    if erv > rv:
                        event = self._route(w, etype, obj, old)
                        if event is not None:
                            initial.append(event)
            self.watchers[rt.key].add(w)
            return initial

    def unwatch(self, rt: ResourceType, w: Watcher) -> None:
        with self.lock:
            self.watchers.get(rt.key, set()).discard(w)

    def all_watchers(self) -> list[Watcher]:
        with self.lock:
            return [w for ws in self.watchers.values() for w in ws]

    # ------------------------------------------------------------------ reads

    def get(self, rt: ResourceType, ns: str | None, name: str) -> dict:
        obj = self.objects[rt.key].get((ns or "", name))
        if obj is None:
            raise self.not_found(rt, name)
        return obj

    @staticmethod
    def not_found(rt: ResourceType, name: str) -> APIError:
        return APIError(404, "NotFound", f'{rt.resource_name} "{name}" not found',
                        {"name": name, "group": rt.group, "kind": rt.plural} if rt.group else
                        {"name": name, "kind": rt.plural})

    def list(self, rt: ResourceType, ns: str | None, labels: str | None = None,
             fields: str | None = None) -> tuple[list[dict], int]:
        lsel, fsel = parse_label_selector(labels), parse_field_selector(fields)
        with self.lock:
            items = []
            for (ons, _), obj in self.objects[rt.key].items():
                if ns is not None and ons != ns:
                    continue
                meta = obj["metadata"]
                if lsel(meta.get("labels") or {}) and fsel(obj):
                    items.append(obj)
            return sorted(items, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"])), self.last_rv

    # ------------------------------------------------------------------ writes

    def _check_namespace(self, rt: ResourceType, ns: str | None, name: str = "") -> None:
        if not rt.namespaced:
            return
        nsobj = self.objects[("", "namespaces")].get(("", ns or ""))
        if nsobj is None:
            raise APIError(404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"})
        if nsobj["metadata"].get("deletionTimestamp"):
            raise APIError(403, "Forbidden",
                           f'{rt.resource_name} "{name}" is forbidden: unable to create new content in namespace {ns} '
                           "because it is being terminated",
                           {"kind": rt.plural, "group": rt.group,
                            "causes": [{"reason": "NamespaceTerminating",
                                        "message": f"namespace {ns} is being terminated",
                                        "field": "metadata.namespace"}]})

    def _invalid(self, rt: ResourceType, name: str, errors: list[validation.FieldError]) -> APIError:
        return APIError(422, "Invalid", validation.invalid_message(rt.kind_name, name, errors),
                        {"name": name, "group": rt.group, "kind": rt.kind,
                         "causes": [e.as_cause() for e in errors]})

    def _admit_custom(self, rt: ResourceType, obj: dict, old: dict | None, strict: bool,
                      warnings: list[str] | None, settled: Iterable[str] = ()) -> dict:
        """Prune, default and validate a custom object against its schema (``settled``: see ``validation.admit``)."""
        if rt.schema is None:
            return obj
        obj, unknown, errors = validation.admit(rt.schema, obj, validation._MISSING if old is None else old,
                                                settled=settled, owned=True)  # create/update's own copy
        if unknown and strict:
            raise APIError(400, "BadRequest", validation.strict_decoding_message(rt.kind, rt.version, unknown))
        if unknown and warnings is not None:
            warnings.extend(f'unknown field "{u}"' for u in unknown)
        name = obj["metadata"].get("name", "")
        if errors:
            raise self._invalid(rt, name, errors)
        return obj

    def _admit_builtin(self, rt: ResourceType, obj: dict, old: dict | None, strict: bool = False,
                       warnings: list[str] | None = None) -> dict:
        name = obj["metadata"].get("name", "")
        if rt.key != ("apiextensions.k8s.io", "customresourcedefinitions"):
            found = builtin_schema.check(obj)
            if found is not None:
                if found.unknown and strict:
                    raise APIError(400, "BadRequest",
                                   f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                                   "strict decoding error: " + ", ".join(f'unknown field "{u}"' for u in found.unknown))
                if found.type_errors:
                    raise APIError(400, "BadRequest",
                                   f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                                   + found.type_errors[0])
                if found.invalid:
                    raise self._invalid(rt, name, found.invalid)
                if found.unknown:
                    builtin_schema.drop(obj, found.unknown)
                    if warnings is not None:
                        warnings.extend(f'unknown field "{u}"' for u in found.unknown)
        defaults.apply(rt.group, rt.plural, obj, old, allocate_ip=self._allocate_ip,
                       allocate_node_port=self._allocate_node_port)
        errors = validation.validate_builtin(rt.group, rt.plural, obj, old)
        if errors:
            raise self._invalid(rt, name, errors)
        if rt.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self._validate_crd(rt, obj)
        if rt.key == ("", "namespaces"):
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj.setdefault("status", {}).setdefault("phase", "Active")
            labels = obj["metadata"].setdefault("labels", {})
            labels["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
        if rt.key == ("", "secrets"):
            if not obj.get("type"):
                obj["type"] = "Opaque"
            string_data = obj.pop("stringData", None) or {}
            if string_data:
                data = obj.setdefault("data", {})
                for k, v in string_data.items():
                    data[k] = base64.b64encode(str(v).encode()).decode()
        if rt.key == ("", "pods") and old is None:
            obj.setdefault("status", {}).setdefault("phase", "Pending")
            obj.setdefault("spec", {})
        return obj

    def _allocate_ip(self) -> str:
        """The next free cluster IP of the fake service range 10.96.0.0/12 (10.96.0.1 is the API server's)."""
        while True:
            n = next(self._ips)
            ip = f"10.{96 + (n >> 16) % 16}.{(n >> 8) % 256}.{n % 256}"
            if n % 256 not in (0, 255) and ip not in self._ips_used:
                self._ips_used.add(ip)
                return ip

    def _allocate_node_port(self) -> int:
        return 30000 + next(self._node_ports) % 2768

    def _validate_crd(self, rt: ResourceType, crd: dict) -> None:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        errors: list[validation.FieldError] = []
        name = crd["metadata"].get("name", "")
        for req in ("group", "scope", "names", "versions"):
            if not spec.get(req):
                errors.append(validation.FieldError("FieldValueRequired", f"spec.{req}", "Required value"))
        if names and not names.get("plural"):
            errors.append(validation.FieldError("FieldValueRequired", "spec.names.plural", "Required value"))
        if names and not names.get("kind"):
            errors.append(validation.FieldError("FieldValueRequired", "spec.names.kind", "Required value"))
        if spec.get("group") and names.get("plural") and name != f"{names['plural']}.{spec['group']}":
            errors.append(validation.FieldError(
                "FieldValueInvalid", "metadata.name",
                f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group'))
        versions = spec.get("versions") or []
        if versions and sum(1 for v in versions if v.get("storage")) != 1:
            errors.append(validation.FieldError("FieldValueInvalid", "spec.versions",
                                                'Invalid value: []apiextensions.CustomResourceDefinitionVersion{...}: '
                                                "must have exactly one version marked as storage version"))
        for i, v in enumerate(versions):
            schema = (v.get("schema") or {}).get("openAPIV3Schema")
            if not schema:
                errors.append(validation.FieldError("FieldValueRequired", f"spec.versions[{i}].schema.openAPIV3Schema",
                                                    "Required value: schemas are required"))
            if schema:
                errors += validation.structural_errors(schema, f"spec.versions[{i}].schema.openAPIV3Schema")
                errors += validation.default_errors(schema, f"spec.versions[{i}].schema.openAPIV3Schema")
                for e in validation.check_cel_rules(schema):
                    e.field = e.field.replace("spec.validation", f"spec.versions[{i}].schema", 1)
                    errors.append(e)
        if errors:
            raise self._invalid(rt, name, errors)

    def create(self, rt: ResourceType, ns: str | None, body: dict, *, dry_run: bool = False,
               strict: bool = False, warnings: list[str] | None = None) -> dict:
        with self.lock:
            obj = json_copy(body)
            if not isinstance(obj, dict):
                raise APIError(400, "BadRequest", "the body of the request was in an unknown format")
            meta = obj.setdefault("metadata", {})
            if not isinstance(meta, dict):
                raise APIError(400, "BadRequest", "metadata must be an object")
            _check_type_meta(rt, obj)
            obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
            rt, obj = self._to_storage(rt, obj, strict, warnings)
            meta = obj["metadata"]
            if rt.namespaced:
                if meta.get("namespace") and ns and meta["namespace"] != ns:
                    raise APIError(400, "BadRequest",
                                   "the namespace of the provided object does not match the namespace sent on "
                                   "the request")
                ns = ns or meta.get("namespace") or "default"
                meta["namespace"] = ns
            else:
                meta.pop("namespace", None)
                ns = None
            if not meta.get("name"):
                if meta.get("generateName"):
                    for _ in range(100):
                        cand = meta["generateName"] + "".join(random.choice(_GEN_CHARS) for _ in range(5))
                        if (ns or "", cand) not in self.objects[rt.key]:
                            break
                    meta["name"] = cand
                else:
                    raise self._invalid(rt, "", [validation.FieldError(
                        "FieldValueRequired", "metadata.name", "Required value: name or generateName is required")])
            name = meta["name"]
            if rt.key == ("", "namespaces") and isinstance(name, str) and (len(name) > 63 or "." in name):
                raise self._invalid(rt, name, [validation.FieldError(
                    "FieldValueInvalid", "metadata.name",
                    f"Invalid value: {validation.go_repr(name)}: a lowercase RFC 1123 label must consist of lower "
                    "case alphanumeric characters or '-', and must start and end with an alphanumeric character "
                    "(e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")])
            if not isinstance(name, str) or len(name) > 253 or not _NAME_RE.match(name):
                raise self._invalid(rt, str(name), [validation.FieldError(
                    "FieldValueInvalid", "metadata.name",
                    f"Invalid value: {validation.go_repr(name)}: a lowercase RFC 1123 subdomain must consist of "
                    "lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric "
                    "character (e.g. 'example.com', regex used for validation is "
                    r"'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")])
            self._check_namespace(rt, ns, name)
            if rt.crd is not None and self.crd_terminating(rt):
                raise APIError(405, "MethodNotAllowed",
                               "create not allowed while custom resource definition is terminating")
            if (ns or "", name) in self.objects[rt.key]:
                raise APIError(409, "AlreadyExists", f'{rt.resource_name} "{name}" already exists',
                               {"name": name, "group": rt.group, "kind": rt.plural} if rt.group else
                               {"name": name, "kind": rt.plural})
            for k in ("resourceVersion", "uid", "creationTimestamp", "deletionTimestamp",
                      "deletionGracePeriodSeconds", "generation", "selfLink"):
                meta.pop(k, None)
            if "status" in rt.subresources and rt.crd is not None:
                obj.pop("status", None)
            meta_errors = validation.validate_metadata(obj)
            if meta_errors:
                raise self._invalid(rt, name, meta_errors)
            meta["uid"] = str(uuid.uuid4())  # before admission, as the Job strategy's generated selector needs it
            if rt.crd is not None:
                obj = self._admit_custom(rt, obj, None, strict, warnings)
            else:
                obj = self._admit_builtin(rt, obj, None, strict, warnings)
            if self.admission is not None:
                self.admission(rt, obj, None, None)
            meta = obj["metadata"]
            meta["creationTimestamp"] = now_iso()
            if rt.has_generation or rt.crd is not None:
                meta["generation"] = 1
            if dry_run:
                meta["resourceVersion"] = str(self.last_rv)
                return obj
            meta["resourceVersion"] = str(self.next_rv())
            self._store(rt, obj, None)
            if rt.crd is not None and rt.schema is not None:
                self._admitted[(rt.key, ns or "", name)] = (obj, rt.schema)
            self._emit(rt.key, "ADDED", obj)
            if rt.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
                obj = self._crd_registered(obj)
            return obj

    def _store(self, rt: ResourceType, obj: dict, old: dict | None) -> None:
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        self.objects[rt.key][key] = obj
        uid = meta["uid"]
        self.uids[uid] = (rt.key, key[0], key[1])
        old_refs = {r.get("uid") for r in ((old or {}).get("metadata", {}).get("ownerReferences") or [])}
        new_refs = {r.get("uid") for r in (meta.get("ownerReferences") or [])}
        for ref in old_refs - new_refs:
            self.dependents.get(ref, set()).discard((rt.key, key[0], key[1]))
        for ref in new_refs - old_refs:
            if ref:
                self.dependents.setdefault(ref, set()).add((rt.key, key[0], key[1]))

    def update(self, rt: ResourceType, ns: str | None, name: str, body: dict, *, subresource: str | None = None,
               dry_run: bool = False, strict: bool = False, warnings: list[str] | None = None,
               check_rv: bool = True) -> dict:
        with self.lock:
            if not isinstance(body, dict):
                raise APIError(400, "BadRequest", "the body of the request was in an unknown format")
            old = self.get(rt, ns, name)
            if subresource == "status" and rt.to_storage is None:
                # a status write keeps only the body's status (and reads its metadata): the rest is not copied
                new = {k: (json_copy(v) if k in ("metadata", "status") else v) for k, v in body.items()}
            else:
                new = json_copy(body)
            meta = new.setdefault("metadata", {})
            if meta.get("name") and meta["name"] != name:
                raise APIError(400, "BadRequest",
                               "the name of the object (%s) does not match the name on the URL (%s)"
                               % (meta["name"], name))
            if subresource is None:
                _check_type_meta(rt, new)
            new["apiVersion"], new["kind"] = rt.api_version, rt.kind
            rt, new = self._to_storage(rt, new, strict, warnings)
            meta = new["metadata"]
            body_rv = meta.get("resourceVersion")
            if check_rv and body_rv and str(body_rv) != old["metadata"]["resourceVersion"]:
                raise APIError(409, "Conflict",
                               f'Operation cannot be fulfilled on {rt.resource_name} "{name}": the object has been '
                               "modified; please apply your changes to the latest version and try again",
                               {"name": name, "group": rt.group, "kind": rt.plural} if rt.group else
                               {"name": name, "kind": rt.plural})
            if subresource == "status":
                merged = json_copy(old)
                if "status" in new:
                    merged["status"] = new["status"]
                else:
                    merged.pop("status", None)
                new = merged
            else:
                if "status" in rt.subresources:
                    if "status" in old:
                        new["status"] = json_copy(old["status"])
                    else:
                        new.pop("status", None)
                meta = new["metadata"]
                for k in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
                          "generation", "namespace", "name"):
                    if k in old["metadata"]:
                        meta[k] = old["metadata"][k]
                    else:
                        meta.pop(k, None)
            new["apiVersion"], new["kind"] = rt.api_version, rt.kind
            # finalizers may not be added to an object being deleted
            if old["metadata"].get("deletionTimestamp"):
                added = [f for f in new["metadata"].get("finalizers") or []
                         if f not in (old["metadata"].get("finalizers") or [])]
                if added:
                    raise self._invalid(rt, name, [validation.FieldError(
                        "FieldValueForbidden", "metadata.finalizers",
                        "Forbidden: no new finalizers can be added if the object is being deleted, found new "
                        "finalizers []string{%s}" % ", ".join(f'"{f}"' for f in added))])
            meta_errors = validation.validate_metadata(new)
            if meta_errors:
                raise self._invalid(rt, name, meta_errors)
            admitted_key = (rt.key, old["metadata"].get("namespace", ""), old["metadata"]["name"])
            if rt.crd is not None:
                settled: list[str] = []
                if subresource == "status":
                    # the rest of the object is the stored one: if this schema admitted it, it is settled
                    entry = self._admitted.get(admitted_key)
                    if entry is not None and entry[0] is old and entry[1] is rt.schema:
                        settled = [k for k in new if k not in ("apiVersion", "kind", "metadata", "status")]
                new = self._admit_custom(rt, new, old, strict, warnings, settled)
            else:
                new = self._admit_builtin(rt, new, old, strict, warnings)
            if self.admission is not None:
                self.admission(rt, new, old, subresource)
            # generation: bumped on changes outside metadata (and status, when it is a subresource)
            if "generation" in old["metadata"]:
                skip = {"metadata", "status"} if "status" in rt.subresources else {"metadata"}
                if not json_equal(_without(new, skip), _without(old, skip)):  # 1 -> true is a change
                    new["metadata"]["generation"] = old["metadata"]["generation"] + 1
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            if json_equal(_strip_volatile(new), _strip_volatile(old)):
                return old  # a no-op write changes nothing, not even the resourceVersion
            if dry_run:
                return new
            new["metadata"]["resourceVersion"] = str(self.next_rv())
            if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
                self._store(rt, new, old)
                self._remove(rt, new)
                return new
            self._store(rt, new, old)
            if rt.crd is not None and rt.schema is not None:
                self._admitted[admitted_key] = (new, rt.schema)
            self._emit(rt.key, "MODIFIED", new, old)
            if rt.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
                new = self._crd_registered(new)
            for ref in old["metadata"].get("ownerReferences") or []:  # a blocking reference may have gone
                self._maybe_finish_foreground(ref.get("uid", ""))
            return new

    def patch(self, rt: ResourceType, ns: str | None, name: str, patch_type: str, patch: Any, *,
              subresource: str | None = None, dry_run: bool = False, strict: bool = False,
              warnings: list[str] | None = None) -> tuple[dict, bool]:
        """Apply a patch; returns (object, created) — created only for server-side apply."""
        with self.lock:
            try:
                current = self.get(rt, ns, name)
            except APIError:
                if patch_type == "apply" and subresource is None:
                    body = json_copy(patch) if isinstance(patch, dict) else {}
                    body.setdefault("metadata", {})["name"] = name
                    return self.create(rt, ns, body, dry_run=dry_run, strict=strict, warnings=warnings), True
                raise
            current = self.view(rt, current)  # patches apply to this version's view
            try:
                if patch_type == "json":
                    new = json_patch(current, patch)
                elif patch_type == "merge":
                    new = merge_patch(current, patch)
                elif patch_type in ("strategic", "apply"):
                    if not isinstance(patch, dict):
                        raise PatchError("patch must be an object", 400)
                    new = strategic_merge_patch(current, patch)
                else:
                    raise APIError(415, "UnsupportedMediaType", f"the server does not support patch type {patch_type}")
            except PatchError as exc:
                reason = "Invalid" if exc.code == 422 else "BadRequest"
                raise APIError(exc.code, reason, str(exc)) from None
            if not isinstance(new, dict):
                raise APIError(422, "Invalid", "the patched object is not an object")
            check = patch_type != "apply" or bool(((patch or {}).get("metadata") or {}).get("resourceVersion"))
            return self.update(rt, ns, name, new, subresource=subresource, dry_run=dry_run, strict=strict,
                               warnings=warnings, check_rv=check), False

    def delete(self, rt: ResourceType, ns: str | None, name: str, options: dict | None = None, *,
               dry_run: bool = False, warnings: list[str] | None = None) -> dict:
        """Delete with the garbage collector's propagation policies (Background, Foreground, Orphan)."""
        options = options or {}
        with self.lock:
            obj = self.get(rt, ns, name)
            pre = options.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != obj["metadata"]["uid"]:
                raise APIError(409, "Conflict",
                               f'Operation cannot be fulfilled on {rt.resource_name} "{name}": Precondition failed: '
                               f"UID in precondition: {pre['uid']}, UID in object meta: {obj['metadata']['uid']}")
            if pre.get("resourceVersion") and pre["resourceVersion"] != obj["metadata"]["resourceVersion"]:
                raise APIError(409, "Conflict",
                               f'Operation cannot be fulfilled on {rt.resource_name} "{name}": Precondition failed: '
                               f"ResourceVersion in precondition: {pre['resourceVersion']}, ResourceVersion in "
                               f"object meta: {obj['metadata']['resourceVersion']}")
            policy = self._propagation_policy(rt, obj, options, warnings)
            if dry_run:
                return obj
            if rt.key == ("", "namespaces"):
                return self._delete_namespace(rt, obj)
            if rt.key == _CRD_KEY:
                return self._delete_crd(rt, obj)
            if policy == "Orphan":
                self._orphan_dependents(obj["metadata"]["uid"])
            finalizers = list(obj["metadata"].get("finalizers") or [])
            if policy == "Foreground" and FOREGROUND not in finalizers:
                finalizers.append(FOREGROUND)
            if finalizers:
                if obj["metadata"].get("deletionTimestamp") and finalizers == obj["metadata"].get("finalizers"):
                    return obj
                new = json_copy(obj)
                new["metadata"].setdefault("deletionTimestamp", now_iso())
                new["metadata"].setdefault("deletionGracePeriodSeconds", 0)
                new["metadata"]["finalizers"] = finalizers
                if "generation" in new["metadata"] and not obj["metadata"].get("deletionTimestamp"):
                    new["metadata"]["generation"] += 1
                new["metadata"]["resourceVersion"] = str(self.next_rv())
                self._store(rt, new, obj)
                self._emit(rt.key, "MODIFIED", new, obj)
                if policy == "Foreground":
                    self._delete_dependents_foreground(new)
                    return self.objects[rt.key].get((ns or "", name), new)
                return new
            return self._remove(rt, obj)

    @staticmethod
    def _propagation_policy(rt: ResourceType, obj: dict, options: dict, warnings: list[str] | None) -> str:
        """The policy a DELETE asks for, else the one the object's finalizers or kind imply."""
        policy = options.get("propagationPolicy")
        if policy is not None:
            if options.get("orphanDependents") is not None:
                raise APIError(422, "Invalid", 'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: '
                                               "Invalid value: \"%s\": orphanDependents and deletionPropagation "
                                               "cannot be both set" % policy)
            if policy not in PROPAGATION_POLICIES:
                raise APIError(422, "Invalid", 'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: '
                                               f'Unsupported value: "{policy}": supported values: "Foreground", '
                                               '"Background", "Orphan", "nil"')
            return policy
        if options.get("orphanDependents") is not None:
            return "Orphan" if options["orphanDependents"] else "Background"
        finalizers = obj["metadata"].get("finalizers") or []
        if ORPHAN in finalizers:
            return "Orphan"
        if FOREGROUND in finalizers:
            return "Foreground"
        if rt.key == ("batch", "jobs"):  # batch/v1 keeps a Job's Pods unless told otherwise
            if warnings is not None:
                warnings.append("child pods are preserved by default when jobs are deleted; set "
                                "propagationPolicy=Background to remove them or set propagationPolicy=Orphan to "
                                "suppress this warning")
            return "Orphan"
        return "Background"

    def _dependents_of(self, uid: str) -> list[tuple[ResourceType, dict]]:
        out = []
        for dep_key, dns, dname in sorted(self.dependents.get(uid, set())):
            dep = self.objects.get(dep_key, {}).get((dns, dname))
            drt = self.storage_type(dep_key)
            if dep is not None and drt is not None:
                out.append((drt, dep))
        return out

    def _rewrite(self, rt: ResourceType, obj: dict, new: dict) -> dict:
        """Store a changed object as the garbage collector's own update does."""
        new["metadata"]["resourceVersion"] = str(self.next_rv())
        self._store(rt, new, obj)
        self._emit(rt.key, "MODIFIED", new, obj)
        return new

    def _orphan_dependents(self, uid: str) -> None:
        """Orphan: remove the ownerReferences to ``uid`` from its dependents."""
        for drt, dep in self._dependents_of(uid):
            new = json_copy(dep)
            refs = [r for r in new["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
            if refs:
                new["metadata"]["ownerReferences"] = refs
            else:
                new["metadata"].pop("ownerReferences", None)
            self._rewrite(drt, dep, new)

    def _delete_dependents_foreground(self, owner: dict) -> None:
        """Foreground: delete the dependents (foreground again when they own others), then maybe the owner."""
        uid = owner["metadata"]["uid"]
        for drt, dep in self._dependents_of(uid):
            dmeta = dep["metadata"]
            if dmeta.get("deletionTimestamp"):
                continue
            others = [r for r in dmeta.get("ownerReferences") or [] if r.get("uid") != uid and self._solid(r)]
            if others:  # kept alive by another owner: only the reference to this one goes
                new = json_copy(dep)
                new["metadata"]["ownerReferences"] = [r for r in dmeta["ownerReferences"] if r.get("uid") != uid]
                self._rewrite(drt, dep, new)
                continue
            policy = "Foreground" if self.dependents.get(dmeta["uid"]) else None
            self.delete(drt, dmeta.get("namespace") or None, dmeta["name"],
                        {"propagationPolicy": policy} if policy else {"propagationPolicy": "Background"})
        self._maybe_finish_foreground(uid)

    def _solid(self, ref: dict) -> bool:
        """An owner that exists and is not itself waiting for its dependents to go."""
        where = self.uids.get(ref.get("uid", ""))
        if where is None:
            return False
        owner = self.objects.get(where[0], {}).get((where[1], where[2]))
        return owner is not None and FOREGROUND not in (owner["metadata"].get("finalizers") or [])

    def _maybe_finish_foreground(self, uid: str) -> None:
        """Drop an owner's ``foregroundDeletion`` finalizer once no dependent blocks it (then it goes)."""
        where = self.uids.get(uid)
        if where is None:
            return
        owner = self.objects.get(where[0], {}).get((where[1], where[2]))
        if owner is None or FOREGROUND not in (owner["metadata"].get("finalizers") or []):
            return
        for _, dep in self._dependents_of(uid):
            if any(r.get("uid") == uid and r.get("blockOwnerDeletion") for r in
                   dep["metadata"].get("ownerReferences") or []):
                return
        ort = self.storage_type(where[0])
        assert ort is not None
        new = json_copy(owner)
        new["metadata"]["finalizers"] = [f for f in owner["metadata"]["finalizers"] if f != FOREGROUND]
        if not new["metadata"]["finalizers"]:
            del new["metadata"]["finalizers"]
            new["metadata"]["resourceVersion"] = str(self.next_rv())
            self._store(ort, new, owner)
            self._remove(ort, new)
        else:
            self._rewrite(ort, owner, new)

    def _remove(self, rt: ResourceType, obj: dict) -> dict:
        """Drop an object now, emit DELETED, then collect garbage."""
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        if self.objects[rt.key].get(key) is None:
            return obj
        del self.objects[rt.key][key]
        self._admitted.pop((rt.key, key[0], key[1]), None)
        gone = json_copy(obj)
        gone["metadata"]["resourceVersion"] = str(self.next_rv())
        self.uids.pop(meta["uid"], None)
        for ref in meta.get("ownerReferences") or []:
            self.dependents.get(ref.get("uid"), set()).discard((rt.key, key[0], key[1]))
        self._emit(rt.key, "DELETED", gone)
        if rt.key == ("", "pods"):
            self.pod_logs.pop(key, None)
        if rt.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self._crd_removed(obj)
        deps = self.dependents.pop(meta["uid"], set())
        for dep_key, dns, dname in sorted(deps):
            dep = self.objects.get(dep_key, {}).get((dns, dname))
            if dep is None:
                continue
            if any(r.get("uid") in self.uids for r in dep["metadata"].get("ownerReferences") or []):
                continue  # another owner is still alive
            drt = self.storage_type(dep_key)
            if drt is not None:
                self.delete(drt, dns or None, dname, {"propagationPolicy": "Background"})
        for ref in meta.get("ownerReferences") or []:
            self._maybe_finish_foreground(ref.get("uid", ""))
        if rt.namespaced and key[0]:
            self._maybe_finish_namespace(key[0])
        if rt.crd is not None:
            self._maybe_finish_crd(rt.key)
        return gone

    def _delete_namespace(self, rt: ResourceType, ns_obj: dict) -> dict:
        name = ns_obj["metadata"]["name"]
        new = ns_obj
        if not ns_obj["metadata"].get("deletionTimestamp"):
            new = json_copy(ns_obj)
            new["metadata"]["deletionTimestamp"] = now_iso()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new.setdefault("status", {})["phase"] = "Terminating"
            new["metadata"]["resourceVersion"] = str(self.next_rv())
            self._store(rt, new, ns_obj)
            self._emit(rt.key, "MODIFIED", new, ns_obj)
        for rkey, objs in list(self.objects.items()):
            srt = self.storage_type(rkey)
            if srt is None or not srt.namespaced:
                continue
            for (ons, oname) in [k for k in objs if k[0] == name]:
                if (ons, oname) in objs:
                    self.delete(srt, ons, oname)
        self._maybe_finish_namespace(name)
        return new

    def _maybe_finish_namespace(self, ns: str) -> None:
        nsrt = self.lookup("", "v1", "namespaces")
        ns_obj = self.objects[("", "namespaces")].get(("", ns))
        if nsrt is None or ns_obj is None or not ns_obj["metadata"].get("deletionTimestamp"):
            return
        for rkey, objs in self.objects.items():
            srt = self.storage_type(rkey)
            if srt is not None and srt.namespaced and any(k[0] == ns for k in objs):
                return
        if not ns_obj["metadata"].get("finalizers"):
            self._remove(nsrt, ns_obj)

    # ------------------------------------------------------------------ CRDs

    def _delete_crd(self, rt: ResourceType, crd: dict) -> dict:
        """Like kube-apiserver: delete every custom object first (their finalizers honoured), then the CRD."""
        key = (crd["spec"]["group"], crd["spec"]["names"]["plural"])
        if not self.objects.get(key):
            return self._remove(rt, crd)
        new = crd
        if not crd["metadata"].get("deletionTimestamp"):
            new = json_copy(crd)
            new["metadata"]["deletionTimestamp"] = now_iso()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new["metadata"]["finalizers"] = list(new["metadata"].get("finalizers") or []) + [CRD_CLEANUP]
            status = new.setdefault("status", {})
            status["conditions"] = [c for c in status.get("conditions") or [] if c.get("type") != "Terminating"] + [
                {"type": "Terminating", "status": "True", "reason": "InstanceDeletionInProgress",
                 "message": "CustomResource deletion is in progress", "lastTransitionTime": now_iso()}]
            new["metadata"]["resourceVersion"] = str(self.next_rv())
            self._store(rt, new, crd)
            self._emit(rt.key, "MODIFIED", new, crd)
        crt = self.storage_type(key)
        if crt is not None:
            for (ons, oname) in list(self.objects.get(key, {})):
                if (ons, oname) in self.objects.get(key, {}):
                    self.delete(crt, ons or None, oname)
        self._maybe_finish_crd(key)
        return self.objects[rt.key].get(("", crd["metadata"]["name"]), new)

    def _maybe_finish_crd(self, key: tuple[str, str]) -> None:
        crdrt = self.lookup(*_CRD_GVR)
        crd = self.objects[_CRD_KEY].get(("", f"{key[1]}.{key[0]}"))
        if crdrt is None or crd is None or not crd["metadata"].get("deletionTimestamp") or self.objects.get(key):
            return
        self._remove(crdrt, crd)

    def crd_terminating(self, rt: ResourceType) -> bool:
        crd = self.objects[_CRD_KEY].get(("", rt.crd or ""))
        return bool(crd and crd["metadata"].get("deletionTimestamp"))

    def _crd_registered(self, crd: dict) -> dict:
        """Register (or re-register) the resource a CRD defines and mark it Established."""
        spec = crd["spec"]
        names = spec["names"]
        group = spec["group"]
        plural = names["plural"]
        for key in [k for k in self.types if k[0] == group and k[2] == plural]:
            del self.types[key]
        for v in spec.get("versions") or []:
            if not v.get("served", True):
                continue
            subs = tuple(k for k in (v.get("subresources") or {}) if k in ("status", "scale"))
            self.register(ResourceType(
                group=group, version=v["name"], plural=plural, kind=names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                singular=names.get("singular") or names["kind"].lower(),
                short_names=list(names.get("shortNames") or []),
                categories=list(names.get("categories") or []),
                subresources=subs, has_generation=True,
                schema=(v.get("schema") or {}).get("openAPIV3Schema"),
                printer_columns=list(v.get("additionalPrinterColumns") or []),
                crd=crd["metadata"]["name"], storage=bool(v.get("storage")),
                scale=(v.get("subresources") or {}).get("scale"),
            ))
        crdrt = self.lookup("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        assert crdrt is not None
        ts = now_iso()
        status = {
            "acceptedNames": {k: v for k, v in names.items()},
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                 "message": "no conflicts found", "lastTransitionTime": ts},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "message": "the initial names have been accepted", "lastTransitionTime": ts},
            ],
            "storedVersions": [v["name"] for v in spec.get("versions") or [] if v.get("storage")],
        }
        old_status = crd.get("status") or {}
        if {k: v for k, v in old_status.items() if k != "conditions"} == {
                k: v for k, v in status.items() if k != "conditions"} and old_status.get("conditions"):
            return crd
        new = json_copy(crd)
        new["status"] = status
        new["metadata"]["resourceVersion"] = str(self.next_rv())
        self._store(crdrt, new, crd)
        self._emit(crdrt.key, "MODIFIED", new, crd)
        return new

    def _crd_removed(self, crd: dict) -> None:
        group = crd["spec"]["group"]
        plural = crd["spec"]["names"]["plural"]
        key = (group, plural)
        rt = self.storage_type(key)
        if rt is not None:
            for obj in list(self.objects.get(key, {}).values()):
                self._remove(rt, obj)
        self.unregister(group, plural)
        self.objects.pop(key, None)
        self.history.pop(key, None)
        self.compacted.pop(key, None)
        for w in self.watchers.pop(key, set()):
            w.push(None)

    # ------------------------------------------------------------------ pod logs

    def set_pod_log(self, namespace: str, pod: str, text: str) -> None:
        with self.lock:
            self.pod_logs[(namespace, pod)] = text

    def append_pod_log(self, namespace: str, pod: str, text: str) -> None:
        with self.lock:
            self.pod_logs[(namespace, pod)] = self.pod_logs.get((namespace, pod), "") + text


# --------------------------------------------------------------------------- scale subresource


def _path_get(obj: Any, path: str) -> Any:
    cur = obj
    for part in path.strip(".").split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _path_set(obj: dict, path: str, value: Any) -> dict:
    out = json_copy(obj)
    cur = out
    parts = path.strip(".").split(".")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
    return out


def _selector_string(sel: Any) -> str:
    if isinstance(sel, str):
        return sel
    if not isinstance(sel, dict):
        return ""
    parts = [f"{k}={v}" for k, v in (sel.get("matchLabels") or {}).items()]
    for expr in sel.get("matchExpressions") or []:
        op, key, values = expr.get("operator"), expr.get("key"), expr.get("values") or []
        if op == "In":
            parts.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            parts.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            parts.append(key)
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
    return ",".join(parts)


def to_scale(rt: ResourceType, obj: dict) -> dict:
    """The ``autoscaling/v1`` Scale view of an object with a scale subresource."""
    paths = rt.scale or {}
    meta = obj["metadata"]
    scale: dict[str, Any] = {
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                     if k in meta},
        "spec": {"replicas": _path_get(obj, paths.get("specReplicasPath", ".spec.replicas")) or 0},
        "status": {"replicas": _path_get(obj, paths.get("statusReplicasPath", ".status.replicas")) or 0},
    }
    if paths.get("labelSelectorPath"):
        selector = _selector_string(_path_get(obj, paths["labelSelectorPath"]))
        if selector:
            scale["status"]["selector"] = selector
    return scale


def from_scale(rt: ResourceType, obj: dict, scale: dict) -> dict:
    """Write a Scale's ``spec.replicas`` back into the object."""
    replicas = (scale.get("spec") or {}).get("replicas")
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise APIError(422, "Invalid", f'Scale.autoscaling "{obj["metadata"]["name"]}" is invalid: spec.replicas: '
                                       f"Invalid value: {validation.go_repr(replicas)}: must be greater than or equal "
                                       "to 0")
    new = _path_set(obj, (rt.scale or {}).get("specReplicasPath", ".spec.replicas"), replicas)
    new["apiVersion"] = rt.api_version
    rv = (scale.get("metadata") or {}).get("resourceVersion")
    if rv:
        new["metadata"]["resourceVersion"] = rv
    return new


# --------------------------------------------------------------------------- autoscaling/v1 <-> v2

HPA_METRICS_ANNOTATION = "autoscaling.alpha.kubernetes.io/metrics"
HPA_BEHAVIOR_ANNOTATION = "autoscaling.alpha.kubernetes.io/behavior"
HPA_CONDITIONS_ANNOTATION = "autoscaling.alpha.kubernetes.io/conditions"
HPA_CURRENT_METRICS_ANNOTATION = "autoscaling.alpha.kubernetes.io/current-metrics"
_HPA_ANNOTATIONS = (HPA_METRICS_ANNOTATION, HPA_BEHAVIOR_ANNOTATION, HPA_CONDITIONS_ANNOTATION,
                    HPA_CURRENT_METRICS_ANNOTATION)


def _cpu_metric(field_name: str, value: Any) -> dict:
    quantity = {"type": "Utilization", "averageUtilization": value} if field_name == "target" else {
        "averageUtilization": value}
    return {"type": "Resource", "resource": {"name": "cpu", field_name: quantity}}


def _cpu_index(metrics: list, field_name: str) -> int | None:
    """Index of the CPU utilization metric (a v1 ``…CPUUtilizationPercentage``) in v2 metrics."""
    for i, m in enumerate(metrics):
        res = m.get("resource") if isinstance(m, dict) else None
        quantity = res.get(field_name) if isinstance(res, dict) else None
        if (isinstance(quantity, dict) and m.get("type") == "Resource" and res.get("name") == "cpu"
                and "averageUtilization" in quantity
                and (field_name == "current" or quantity.get("type") == "Utilization")):
            return i
    return None


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _metrics_to_v1(metrics: list, field_name: str, annotations: dict, key: str) -> int | None:
    """The CPU percentage v1 shows; the whole list goes to an annotation unless that percentage says it all."""
    i = _cpu_index(metrics, field_name)
    value = metrics[i]["resource"][field_name]["averageUtilization"] if i is not None else None
    if metrics and metrics != [_cpu_metric(field_name, value)]:
        annotations[key] = _dump(metrics)
    return value


def _metrics_from_v1(annotations: dict, key: str, field_name: str, value: Any) -> list:
    metrics = _annotation(annotations, key)
    metrics = [m for m in metrics if isinstance(m, dict)] if isinstance(metrics, list) else []
    i = _cpu_index(metrics, field_name)
    if value is None:
        return metrics if i is None else metrics[:i] + metrics[i + 1:]
    if i is None:
        return [_cpu_metric(field_name, value)] + metrics
    metrics[i] = json_copy(metrics[i])
    metrics[i]["resource"][field_name]["averageUtilization"] = value
    return metrics


def _annotation(annotations: dict, key: str) -> Any:
    text = annotations.pop(key, None)
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        raise APIError(422, "Invalid", f"metadata.annotations[{key}]: Invalid value: must be JSON") from None


def hpa_v2_to_v1(obj: dict) -> dict:
    """An ``autoscaling/v2`` HorizontalPodAutoscaler as ``autoscaling/v1`` shows it.

    The CPU utilization target becomes ``targetCPUUtilizationPercentage`` (the current one
    ``currentCPUUtilizationPercentage``); what v1 cannot express (other metrics, behavior,
    conditions) travels in the ``autoscaling.alpha.kubernetes.io/*`` annotations, as
    kube-apiserver does (here as v2 JSON), so a v1 round trip loses nothing.
    """
    out = {k: v for k, v in obj.items() if k not in ("spec", "status")}
    out["apiVersion"] = "autoscaling/v1"
    meta = out["metadata"] = dict(obj.get("metadata") or {})
    annotations = dict(meta.get("annotations") or {})
    if "spec" in obj:
        spec = obj.get("spec") or {}
        v1spec = {k: spec[k] for k in ("scaleTargetRef", "minReplicas", "maxReplicas") if k in spec}
        cpu = _metrics_to_v1(spec.get("metrics") or [], "target", annotations, HPA_METRICS_ANNOTATION)
        if cpu is not None:
            v1spec["targetCPUUtilizationPercentage"] = cpu
        if spec.get("behavior") is not None:
            annotations[HPA_BEHAVIOR_ANNOTATION] = _dump(spec["behavior"])
        out["spec"] = v1spec
    if "status" in obj:
        status = obj.get("status") or {}
        v1status = {k: status[k] for k in ("observedGeneration", "lastScaleTime", "currentReplicas",
                                          "desiredReplicas") if k in status}
        cpu = _metrics_to_v1(status.get("currentMetrics") or [], "current", annotations,
                             HPA_CURRENT_METRICS_ANNOTATION)
        if cpu is not None:
            v1status["currentCPUUtilizationPercentage"] = cpu
        if status.get("conditions"):
            annotations[HPA_CONDITIONS_ANNOTATION] = _dump(status["conditions"])
        out["status"] = v1status
    if annotations:
        meta["annotations"] = annotations
    return out


def hpa_v1_to_v2(obj: dict) -> dict:
    """An ``autoscaling/v1`` HorizontalPodAutoscaler in its stored ``autoscaling/v2`` form (see :func:`hpa_v2_to_v1`)."""
    out = {k: v for k, v in obj.items() if k not in ("spec", "status")}
    out["apiVersion"] = "autoscaling/v2"
    meta = out["metadata"] = dict(obj["metadata"]) if isinstance(obj.get("metadata"), dict) else {}
    annotations = dict(meta.get("annotations") or {}) if isinstance(meta.get("annotations"), dict) else {}
    behavior = _annotation(annotations, HPA_BEHAVIOR_ANNOTATION)
    if isinstance(obj.get("spec"), dict):
        spec = obj["spec"]
        v2spec = {k: spec[k] for k in ("scaleTargetRef", "minReplicas", "maxReplicas") if k in spec}
        metrics = _metrics_from_v1(annotations, HPA_METRICS_ANNOTATION, "target",
                                   spec.get("targetCPUUtilizationPercentage"))
        if metrics:
            v2spec["metrics"] = metrics
        if behavior is not None:
            v2spec["behavior"] = behavior
        out["spec"] = v2spec
    conditions = _annotation(annotations, HPA_CONDITIONS_ANNOTATION)
    current = _metrics_from_v1(annotations, HPA_CURRENT_METRICS_ANNOTATION, "current",
                               (obj.get("status") or {}).get("currentCPUUtilizationPercentage")
                               if isinstance(obj.get("status"), dict) else None)
    if isinstance(obj.get("status"), dict):
        status = obj["status"]
        v2status = {k: status[k] for k in ("observedGeneration", "lastScaleTime", "currentReplicas",
                                          "desiredReplicas") if k in status}
        if current:
            v2status["currentMetrics"] = current
        if conditions:
            v2status["conditions"] = conditions
        out["status"] = v2status
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    return out
