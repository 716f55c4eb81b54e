"""Acting on children: bring each desired manifest about, comparing with the cached object (no read)."""

from __future__ import annotations

import logging
from typing import Any

from ..kube import ApiError
from .base import Context, Note

log = logging.getLogger("perennial.controllers")

#: Kinds a child may be of that an API server may not serve; a 404 on creating one is warned about once
#: and the child skipped (NetworkPolicy: the embedded control plane of `perennial dev` has none, and there
#: pods are local processes that no network plugin would police anyway).
OPTIONAL_KINDS = {("networking.k8s.io/v1", "NetworkPolicy")}
_unserved: set[tuple[str, str]] = set()


async def apply_all(ctx: Context, manifests: list[dict[str, Any]], reasons: dict[str, str | None] | None = None) -> list[Note]:
    """Create what is missing, patch what drifted, leave the rest alone; a note per created child
    (reason "Created", or `reasons[kind]`; None: not worth an Event)."""
    notes = []
    for manifest in manifests:
        meta = manifest["metadata"]
        kind = (manifest["apiVersion"], manifest["kind"])
        if kind in _unserved:
            continue
        current = ctx.cache.get(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
        try:
            obj, action = await ctx.kube.apply(manifest, current)
        except ApiError as exc:
            if exc.status != 404 or kind not in OPTIONAL_KINDS:
                raise
            _unserved.add(kind)
            log.warning("Skipped %s: the API server does not serve %s; pods of this operator run without one, name=%s, namespace=%s",
                        manifest["kind"], manifest["apiVersion"], meta["name"], meta.get("namespace"))
            continue
        if action == "unchanged":
            continue
        ctx.cache.put(obj)  # write-through, so the next reconcile does not create it again
        log.info("%s %s, name=%s, namespace=%s", action.capitalize(), manifest["kind"], meta["name"], meta.get("namespace"))
        reason = (reasons or {}).get(manifest["kind"], "Created")
        if action == "created" and reason:
            notes.append(Note(reason, f"Created {manifest['kind']} {meta['name']}"))
    return notes
