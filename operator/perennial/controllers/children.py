"""Acting on children: bring each desired manifest about, comparing with the cached object (no read)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from ..kube import ApiError
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


def is_unserved(api_version: str, kind: str) -> bool:
    """Whether the API server was found not to serve this optional kind (recently)."""
    at = _unserved.get((api_version, kind))
    if at is None:
        return False
    if time.monotonic() - at >= UNSERVED_RECHECK_SECONDS:
        del _unserved[(api_version, kind)]
        return False
    return True


def without_nulls(value: Any) -> Any:
    """A manifest without the null fields (those a merge patch would remove), at any depth."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


async def apply_all(ctx: Context, manifests: list[dict[str, Any]],
                    reasons: Mapping[str | tuple[str, str], str | None] | None = None) -> list[Note]:
    """Create what is missing, patch what drifted, leave the rest alone; a note per created child
    (reason "Created", or `reasons[(apiVersion, kind)]`, else `reasons[kind]`; None: not worth an Event)."""
    notes = []
    for manifest in manifests:
        meta = manifest["metadata"]
        kind = (manifest["apiVersion"], manifest["kind"])
        if is_unserved(*kind):
            continue
        current = ctx.cache.get(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
        if current is None:
            manifest = without_nulls(manifest)  # null removes a field in a merge patch; a new object just lacks it
        try:
            obj, action = await ctx.kube.apply(manifest, current)
        except ApiError as exc:
            if exc.status != 404 or kind not in OPTIONAL_KINDS:
                raise
            _unserved[kind] = time.monotonic()
            log.warning("Skipped %s: the API server does not serve %s, name=%s, namespace=%s",
                        manifest["kind"], manifest["apiVersion"], meta["name"], meta.get("namespace"))
            continue
        if action == "unchanged":
            continue
        ctx.cache.put(obj)  # write-through, so the next reconcile does not create it again
        log.info("%s %s, name=%s, namespace=%s", action.capitalize(), manifest["kind"], meta["name"], meta.get("namespace"))
        reasons = reasons or {}
        reason = reasons.get(kind, reasons.get(manifest["kind"], "Created"))
        if action == "created" and reason:
            notes.append(Note(reason, f"Created {manifest['kind']} {meta['name']}"))
    return notes
