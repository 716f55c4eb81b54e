"""The operator's view of the cluster: objects kept current by watches (an informer cache).

Controllers read here instead of calling the API server: a reconcile of an
object whose world did not change costs no request. kopf's watches feed it
(see `controllers.manager`); it holds the latest body of every watched object,
indexed by namespace, by owner uid and by label (a label-selected list reads only
the objects that carry the rarest selected label, as client-go's indexers do, so a
reconcile that lists its pods does not cost more with every other pod). Secrets are kept whole, as client-go's
informers keep them: a controller scrubs their values out of whatever a pod writes
back (termination messages, logs) before it reaches status or an Event, so it must
know them. They never leave the process: nothing logs or serves cache contents.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

ResourceKey = tuple[str, str]  # (apiVersion, kind)


def resource_key(obj: dict[str, Any]) -> ResourceKey:
    return obj.get("apiVersion", ""), obj.get("kind", "")


def _stripped(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    if "managedFields" in meta:
        obj = dict(obj)
        obj["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
    return obj


def _rv(obj: dict[str, Any] | None) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("resourceVersion")


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _older(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """`new` is an earlier version of the same object than `old` (resourceVersions as integers, as etcd's are)."""
    if (new.get("metadata") or {}).get("uid") != (old.get("metadata") or {}).get("uid"):
        return False
    a, b = _int(_rv(new)), _int(_rv(old))
    return a is not None and b is not None and a < b


def _owner_uids(obj: dict[str, Any]) -> list[str]:
    return [r["uid"] for r in (obj.get("metadata") or {}).get("ownerReferences") or [] if r.get("uid")]


def _label_pairs(obj: dict[str, Any]) -> list[tuple[str, str]]:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return list(labels.items()) if isinstance(labels, dict) else []


class Cache:
    """Objects by (apiVersion, kind) → namespace → name, plus owner-uid and label indexes. Thread-safe, never blocks long."""

    def __init__(self, on_change: Callable[[dict[str, Any] | None, dict[str, Any] | None], None] | None = None) -> None:
        #: Called with (old, new) after every change (new None: removed); a put of the same
        #: resourceVersion (a relist, the watch event of our own write) is no change.
        self.on_change = on_change
        self._lock = threading.Lock()
        self._objects: dict[ResourceKey, dict[str, dict[str, dict[str, Any]]]] = {}
        self._owned: dict[ResourceKey, dict[str, set[tuple[str, str]]]] = {}
        #: (label key, value) -> the (namespace, name)s of the objects of a kind that carry it (a dict: insertion order)
        self._labelled: dict[ResourceKey, dict[tuple[str, str], dict[tuple[str, str], None]]] = {}

    def _unlabel(self, rk: ResourceKey, obj: dict[str, Any], ref: tuple[str, str]) -> None:
        index = self._labelled.get(rk, {})
        for pair in _label_pairs(obj):
            refs = index.get(pair)
            if refs is not None:
                refs.pop(ref, None)
                if not refs:
                    del index[pair]

    def put(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Store the latest body of `obj`; returns the one it replaces."""
        obj = _stripped(obj)
        rk = resource_key(obj)
        meta = obj["metadata"]
        ns, name = meta.get("namespace") or "", meta["name"]
        with self._lock:
            by_ns = self._objects.setdefault(rk, {}).setdefault(ns, {})
            old = by_ns.get(name)
            if old is not None and _older(obj, old):
                return old  # a listing taken before our own write landed: the cache never goes back
            by_ns[name] = obj
            owned = self._owned.setdefault(rk, {})
            if old is not None:
                for uid in _owner_uids(old):
                    owned.get(uid, set()).discard((ns, name))
            for uid in _owner_uids(obj):
                owned.setdefault(uid, set()).add((ns, name))
            pairs = _label_pairs(obj)
            if old is None or _label_pairs(old) != pairs:
                if old is not None:
                    self._unlabel(rk, old, (ns, name))
                index = self._labelled.setdefault(rk, {})
                for pair in pairs:
                    index.setdefault(pair, {})[(ns, name)] = None
        if self.on_change is not None and (old is None or _rv(old) != _rv(obj)):
            self.on_change(old, obj)
        return old

    def remove(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        rk = resource_key(obj)
        meta = obj["metadata"]
        ns, name = meta.get("namespace") or "", meta["name"]
        with self._lock:
            old = self._objects.get(rk, {}).get(ns, {}).pop(name, None)
            if old is not None:
                owned = self._owned.get(rk, {})
                for uid in _owner_uids(old):
                    refs = owned.get(uid)
                    if refs is not None:
                        refs.discard((ns, name))
                        if not refs:
                            del owned[uid]
                self._unlabel(rk, old, (ns, name))
        if old is not None and self.on_change is not None:
            self.on_change(old, None)
        return old

    def replace(self, api_version: str, kind: str, namespace: str | None, present: dict[tuple[str, str], str]) -> int:
        """A fresh listing of a kind (in `namespace`, or everywhere) holds exactly `present` ((ns, name) →
        resourceVersion): drop what it no longer has (client-go's Replace). An object the cache got after
        the listing was taken (a newer resourceVersion than any listed, e.g. our own write) is kept."""
        newest = max((_int(v) for v in present.values()), default=None)
        gone = []
        for obj in self.list(api_version, kind, namespace):
            meta = obj["metadata"]
            if ((meta.get("namespace") or ""), meta["name"]) in present:
                continue
            version = _int(meta.get("resourceVersion"))
            if newest is not None and version is not None and version > newest:
                continue
            gone.append(obj)
        for obj in gone:
            self.remove(obj)
        return len(gone)

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self._objects.get((api_version, kind), {}).get(namespace or "", {}).get(name)

    def list(self, api_version: str, kind: str, namespace: str | None = None, labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """The objects of a kind (in `namespace`, or everywhere) that carry every label of `labels` (equality)."""
        rk = (api_version, kind)
        with self._lock:
            by_ns = self._objects.get(rk, {})
            if labels:
                index = self._labelled.get(rk, {})
                candidates = min((index.get(pair, {}) for pair in labels.items()), key=len)
                found = [o for ns, name in list(candidates) if (namespace is None or ns == namespace)
                         and (o := by_ns.get(ns, {}).get(name)) is not None]
                return [o for o in found if all(((o["metadata"].get("labels") or {}).get(k)) == v for k, v in labels.items())]
            spaces: Iterable[dict[str, dict[str, Any]]] = [by_ns.get(namespace, {})] if namespace is not None else list(by_ns.values())
            return [o for space in spaces for o in list(space.values())]

    def owned_by(self, api_version: str, kind: str, owner_uid: str) -> list[dict[str, Any]]:
        """Objects of a kind with an ownerReference to `owner_uid`."""
        with self._lock:
            refs = list(self._owned.get((api_version, kind), {}).get(owner_uid, ()))
            by_ns = self._objects.get((api_version, kind), {})
            return [o for ns, name in refs if (o := by_ns.get(ns, {}).get(name)) is not None]
