"""BaseModel controller: validate the source, optionally cache the weights, report `Ready`."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlparse

import kopf
import pydantic

from ..api.basemodel import BaseModelSpec
from ..resources import basemodel as build
from ..resources import conditions as cond
from .base import (
    RESYNC_SECONDS,
    Context,
    first_error,
    generation,
    register,
    write_status,
)

KIND = "BaseModel"
PLURAL = "basemodels"


async def reconcile(body: Any, ctx: Context, logger: logging.Logger) -> None:
    meta = body["metadata"]
    status = dict(body.get("status") or {})
    gen = generation(body)
    conditions = status.get("conditions")

    def ready(state: str | bool, reason: str, message: str) -> None:
        status["conditions"] = cond.set_condition(conditions, "Ready", state, reason, message, gen)

    status["observedGeneration"] = gen
    try:
        spec = BaseModelSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError as exc:
        ready(False, "InvalidSpec", first_error(exc))
        await write_status(ctx, body, status, logger)
        return

    ns = meta["namespace"]
    scheme = urlparse(spec.source.uri).scheme
    ref = spec.source.credentials_secret_ref
    if ref is not None:
        secret = await ctx.kube.aget("v1", "Secret", ns, ref.name)
        if secret is None:
            ready(False, "SecretNotFound", f"credentials Secret {ref.name!r} does not exist in namespace {ns!r}")
            await write_status(ctx, body, status, logger)
            return
        missing = build.missing_credential_keys(scheme, secret)
        if missing:
            ready(False, "SecretKeyMissing", f"credentials Secret {ref.name!r} must have key(s) {', '.join(missing)} for {scheme}:// sources")
            await write_status(ctx, body, status, logger)
            return
    if scheme == "pvc":
        claim = urlparse(spec.source.uri).netloc
        if await ctx.kube.aget("v1", "PersistentVolumeClaim", ns, claim) is None:
            ready(False, "ClaimNotFound", f"PersistentVolumeClaim {claim!r} of `spec.source.uri` does not exist")
            await write_status(ctx, body, status, logger)
            return

    if not spec.cache.enabled:
        status["resolvedUri"] = spec.source.uri
        status.pop("cacheClaimName", None)
        status.pop("downloadJobName", None)
        ready(True, "SourceAvailable", f"weights are read from {spec.source.uri}")
        await write_status(ctx, body, status, logger)
        return

    pvc = build.cache_pvc(body, spec)
    _, pvc_action = await ctx.kube.aapply(pvc)
    job = build.download_job(body, spec, ctx.config.trainer_image)
    job_obj, job_action = await ctx.kube.aapply(job)
    for action, obj in ((pvc_action, pvc), (job_action, job)):
        if action == "created":
            logger.info("Created %s, name=%s, namespace=%s", obj["kind"], obj["metadata"]["name"], ns)
            kopf.event(body, type="Normal", reason="Created", message=f"Created {obj['kind']} {obj['metadata']['name']}")
    status["cacheClaimName"] = pvc["metadata"]["name"]
    status["downloadJobName"] = job["metadata"]["name"]
    job_conditions = (job_obj.get("status") or {}).get("conditions") or []
    if cond.is_true(job_conditions, "Complete"):
        status["resolvedUri"] = f"pvc://{pvc['metadata']['name']}/model"
        ready(True, "Cached", f"weights cached in PersistentVolumeClaim {pvc['metadata']['name']}")
    elif cond.is_true(job_conditions, "Failed"):
        failed = cond.get(job_conditions, "Failed") or {}
        ready(False, "DownloadFailed", f"download Job {job['metadata']['name']} failed: {failed.get('reason', '')} {failed.get('message', '')}".strip())
    else:
        status.pop("resolvedUri", None)
        ready(False, "Downloading", f"download Job {job['metadata']['name']} is fetching {spec.source.uri}")
    await write_status(ctx, body, status, logger)


register(KIND, PLURAL, reconcile, interval=RESYNC_SECONDS)
