"""Acting on children: bring each desired manifest about, comparing with the cached object (no read)."""

from __future__ import annotations

import logging
from typing import Any

from .base import Context, Note

log = logging.getLogger("perennial.controllers")


async def apply_all(ctx: Context, manifests: list[dict[str, Any]], reasons: dict[str, str | None] | None = None) -> list[Note]:
    """Create what is missing, patch what drifted, leave the rest alone; a note per created child
    (reason "Created", or `reasons[kind]`; None: not worth an Event)."""
    notes = []
    for manifest in manifests:
        meta = manifest["metadata"]
        current = ctx.cache.get(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
        obj, action = await ctx.kube.apply(manifest, current)
        if action == "unchanged":
            continue
        ctx.cache.put(obj)  # write-through, so the next reconcile does not create it again
        log.info("%s %s, name=%s, namespace=%s", action.capitalize(), manifest["kind"], meta["name"], meta.get("namespace"))
        reason = (reasons or {}).get(manifest["kind"], "Created")
        if action == "created" and reason:
            notes.append(Note(reason, f"Created {manifest['kind']} {meta['name']}"))
    return notes
