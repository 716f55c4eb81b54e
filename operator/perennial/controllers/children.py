"""Acting on children: bring each desired manifest about, comparing with the cached object (no read)."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Mapping
from typing import Any

from ..kube import ApiError
from ..kube.aio import AsyncKube
from ..kube.cache import Cache
from .base import Context, Note

log = logging.getLogger("perennial.controllers")

#: Kinds a child may be of that an API server may not serve; a 404 on creating one is warned about once
#: and the child skipped (NetworkPolicy: every real API server and the embedded control plane serve it; one
#: without networking.k8s.io, rare, still runs the operator).
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


#: Per client: optional kind -> its discovery answer (served?), asked once for every reconcile that needs it at once
#: (an operator's start reconciles hundreds: each sent a create that 404'd before the first 404 was known).
_asked: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], asyncio.Future[bool | None]]] = weakref.WeakKeyDictionary()


async def _discover(kube: AsyncKube, api_version: str, kind: str) -> bool | None:
    """Whether the API server serves `kind` (its group version's discovery document); None: it could not say."""
    try:
        doc = await kube.request("GET", f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}")
    except ApiError as exc:
        return False if exc.status == 404 else None
    return any(r.get("kind") == kind and "/" not in str(r.get("name")) for r in (doc or {}).get("resources") or [])


async def served(kube: AsyncKube, api_version: str, kind: str) -> bool:
    """Whether to create children of an optional kind: not when it was found unserved recently (`is_unserved`), else
    as discovery says (one request per client and kind, whoever asks meanwhile waits for it; served is remembered,
    unserved for UNSERVED_RECHECK_SECONDS; an error is no answer: the create decides, as before)."""
    if is_unserved(api_version, kind, cluster=kube.name):
        return False
    by_kind = _asked.setdefault(kube, {})
    future = by_kind.get((api_version, kind))
    if future is None:
        future = by_kind[(api_version, kind)] = asyncio.ensure_future(_discover(kube, api_version, kind))
    answer = await asyncio.shield(future)
    if answer is not True:
        by_kind.pop((api_version, kind), None)  # asked again after the recheck (or at once: no answer)
    if answer is False and (key := _unserved_key(api_version, kind, kube.name)) not in _unserved:
        _unserved[key] = time.monotonic()
        log.warning("Not creating %s children: the API server does not serve %s", kind, api_version)
    return answer is not False


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
        if current is None and kind in OPTIONAL_KINDS and not await served(kube, *kind):
            continue
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
            _asked.get(kube, {}).pop(kind, None)
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
