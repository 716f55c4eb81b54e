"""Acting on children: bring each desired manifest about, comparing with the cached object (no read)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from ..kube import ApiError
from ..kube.aio import AsyncKube
from ..kube.cache import Cache
from .base import Context, Note

log = logging.getLogger("perennial.controllers")

#: Kinds a child may be of that an API server may not serve; a 404 on creating one is warned about once
#: and the child skipped (NetworkPolicy: the embedded control plane of `perennial dev` has none, and there
#: pods are local processes that no network plugin would police anyway).
#: KEDA's ScaledObject: its CRD is installed with KEDA only (a `provider: KEDA` Deployment reports it missing).
OPTIONAL_KINDS = {("networking.k8s.io/v1", "NetworkPolicy"), ("keda.sh/v1alpha1", "ScaledObject")}
#: Kinds found unserved -> when (monotonic); tried again after UNSERVED_RECHECK_SECONDS (a CRD installed later).
_unserved: dict[tuple[str, str], float] = {}
UNSERVED_RECHECK_SECONDS = 300.0


def _unserved_key(api_version: str, kind: str, cluster: str) -> tuple[str, ...]:
    return (api_version, kind) if cluster == "local" else (cluster, api_version, kind)


def is_unserved(api_version: str, kind: str, cluster: str = "local") -> bool:
    """Whether the API server (of `cluster`: the client's name) was found not to serve this optional kind (recently)."""
    key = _unserved_key(api_version, kind, cluster)
    at = _unserved.get(key)
    if at is None:
        return False
    if time.monotonic() - at >= UNSERVED_RECHECK_SECONDS:
        del _unserved[key]
        return False
    return True


def forget_unserved(api_version: str, kind: str, cluster: str = "local") -> None:
    """The kind is served now (its CRD was installed): its children are created again at once."""
    _unserved.pop(_unserved_key(api_version, kind, cluster), None)


def without_nulls(value: Any) -> Any:
    """A manifest without the null fields (those a merge patch would remove), at any depth."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


async def apply_all(ctx: Context, manifests: list[dict[str, Any]],
                    reasons: Mapping[str | tuple[str, str], str | None] | None = None, *,
                    kube: AsyncKube | None = None, cache: Cache | None = None,
                    conflicts: list[str] | None = None) -> list[Note]:
    """Create what is missing, patch what drifted, leave the rest alone; a note per created child
    (reason "Created", or `reasons[(apiVersion, kind)]`, else `reasons[kind]`; None: not worth an Event).
    `kube`/`cache`: another cluster's client and cache (default: the operator's own). `conflicts`: where given, a
    child whose name is taken by an object that is not Perennial's (`AsyncKube.apply` never takes one over) is
    skipped and its message appended there, so the other children are still applied; else that error is raised."""
    kube = kube or ctx.kube
    cache = cache if cache is not None else ctx.cache
    notes = []
    for manifest in manifests:
        meta = manifest["metadata"]
        kind = (manifest["apiVersion"], manifest["kind"])
        if is_unserved(*kind, cluster=kube.name):
            continue
        current = cache.get(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
        if current is None:
            manifest = without_nulls(manifest)  # null removes a field in a merge patch; a new object just lacks it
        try:
            obj, action = await kube.apply(manifest, current)
        except ApiError as exc:
            if conflicts is not None and exc.status == 409 and (exc.body or {}).get("reason") == "AlreadyExists":
                conflicts.append(str((exc.body or {}).get("message") or exc)[:300])
                log.warning("Not applied: the name is taken, kind=%s, name=%s, namespace=%s", manifest["kind"], meta["name"], meta.get("namespace"))
                continue
            if exc.status != 404 or kind not in OPTIONAL_KINDS:
                raise
            _unserved[_unserved_key(*kind, kube.name)] = time.monotonic()
            log.warning("Skipped %s: the API server does not serve %s, name=%s, namespace=%s",
                        manifest["kind"], manifest["apiVersion"], meta["name"], meta.get("namespace"))
            continue
        if action == "unchanged":
            continue
        cache.put(obj)  # write-through, so the next reconcile does not create it again
        log.info("%s %s, name=%s, namespace=%s", action.capitalize(), manifest["kind"], meta["name"], meta.get("namespace"))
        reasons = reasons or {}
        reason = reasons.get(kind, reasons.get(manifest["kind"], "Created"))
        if action == "created" and reason:
            notes.append(Note(reason, f"Created {manifest['kind']} {meta['name']}"))
    return notes
