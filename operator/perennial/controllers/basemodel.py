"""BaseModel controller: validate the source, optionally cache the weights, report `Ready`.

observe (cache: credentials Secret, source claim, cache PVC, download Job) →
decide (pure: status + children) → act (apply the children).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import pydantic

from ..api.basemodel import BaseModelSpec, BaseModelStatus
from ..resources import basemodel as build
from ..resources import conditions as cond
from ..resources.networkpolicy import EgressSettings
from ..resources.podsecurity import PodSettings
from .base import API_VERSION, Context, Controller, Dependency, Note, Outcome, first_error, generation
from .children import apply_all

KIND = "BaseModel"


@dataclass
class World:
    """What a BaseModel's reconcile reads, all from the cache."""

    secret: dict[str, Any] | None = None
    source_claim: dict[str, Any] | None = None
    job: dict[str, Any] | None = None
    cache_claim: dict[str, Any] | None = None


@dataclass
class Decision:
    status: dict[str, Any]
    children: list[dict[str, Any]] = field(default_factory=list)


def _spec(obj: dict[str, Any]) -> BaseModelSpec:
    return BaseModelSpec.model_validate(obj.get("spec") or {})


def decide(obj: dict[str, Any], world: World, image: str, pods: PodSettings = PodSettings(), egress: EgressSettings | None = None) -> Decision:
    """The BaseModel's status and children from what was observed (pure)."""
    gen = generation(obj)
    old = (obj.get("status") or {}).get("conditions")
    status: dict[str, Any] = {"observedGeneration": gen}

    def ready(state: str | bool, reason: str, message: str, children: list[dict[str, Any]] | None = None) -> Decision:
        status["conditions"] = cond.set_condition(old, "Ready", state, reason, message, gen)
        return Decision(status, children or [])

    try:
        spec = _spec(obj)
    except pydantic.ValidationError as exc:
        return ready(False, "InvalidSpec", first_error(exc))
    ns = obj["metadata"]["namespace"]
    scheme = urlparse(spec.source.uri).scheme
    ref = spec.source.credentials_secret_ref
    if ref is not None:
        if world.secret is None:
            return ready(False, "SecretNotFound", f"credentials Secret {ref.name!r} does not exist in namespace {ns!r}")
        missing = build.missing_credential_keys(scheme, world.secret)
        if missing:
            return ready(False, "SecretKeyMissing", f"credentials Secret {ref.name!r} must have key(s) {', '.join(missing)} for {scheme}:// sources")
    if scheme == "pvc" and world.source_claim is None:
        return ready(False, "ClaimNotFound", f"PersistentVolumeClaim {urlparse(spec.source.uri).netloc!r} of `spec.source.uri` does not exist")
    if not spec.cache.enabled:
        status["resolvedUri"] = spec.source.uri
        return ready(True, "SourceAvailable", f"weights are read from {spec.source.uri}")

    pvc = build.cache_pvc(obj, spec)
    job = build.download_job(obj, spec, image, pods)
    status["cacheClaimName"] = pvc["metadata"]["name"]
    status["downloadJobName"] = job["metadata"]["name"]
    job_conditions = ((world.job or {}).get("status") or {}).get("conditions") or []
    before = cond.get(old, "Ready") or {}
    cached_before = before.get("reason") == "Cached" and before.get("observedGeneration") == gen
    if world.job is None and cached_before and world.cache_claim is not None:
        # The download finished for this generation and its Job is gone (TTL): the outcome sticks
        # while the cache claim exists; no second download.
        status["resolvedUri"] = f"pvc://{pvc['metadata']['name']}/model"
        return ready(True, "Cached", f"weights cached in PersistentVolumeClaim {pvc['metadata']['name']}", [pvc])
    if cond.is_true(job_conditions, "Complete"):
        status["resolvedUri"] = f"pvc://{pvc['metadata']['name']}/model"
        return ready(True, "Cached", f"weights cached in PersistentVolumeClaim {pvc['metadata']['name']}", [pvc, job])
    if cond.is_true(job_conditions, "Failed"):
        failed = cond.get(job_conditions, "Failed") or {}
        return ready(False, "DownloadFailed", f"download Job {job['metadata']['name']} failed: {failed.get('reason', '')} {failed.get('message', '')}".strip(), [pvc, job])
    children = [pvc, job]
    if egress is not None:
        # the download pod's NetworkPolicy, with its Job and with every pass while it downloads (watched: restored if
        # deleted or edited; no write when it matches)
        children.insert(0, build.download_network_policy(obj, spec, egress))
    return ready(False, "Downloading", f"download Job {job['metadata']['name']} is fetching {spec.source.uri}", children)


def observe(obj: dict[str, Any], ctx: Context) -> World:
    ns = obj["metadata"]["namespace"]
    world = World()
    try:
        spec = _spec(obj)
    except pydantic.ValidationError:
        return world
    if spec.source.credentials_secret_ref is not None:
        world.secret = ctx.cache.get("v1", "Secret", ns, spec.source.credentials_secret_ref.name)
    if urlparse(spec.source.uri).scheme == "pvc":
        world.source_claim = ctx.cache.get("v1", "PersistentVolumeClaim", ns, urlparse(spec.source.uri).netloc)
    if spec.cache.enabled:
        world.job = ctx.cache.get("batch/v1", "Job", ns, build.download_job_name(obj["metadata"]["name"], spec))
        world.cache_claim = ctx.cache.get("v1", "PersistentVolumeClaim", ns, build.cache_claim_name(obj["metadata"]["name"]))
    return world


async def reconcile(obj: dict[str, Any], ctx: Context) -> Outcome:
    decision = decide(obj, observe(obj, ctx), ctx.config.trainer_image, ctx.config.pod_settings(), ctx.config.egress_settings())
    notes: list[Note] = await apply_all(ctx, decision.children)
    return Outcome(decision.status, notes)


def dependencies(obj: dict[str, Any]) -> list[Dependency]:
    ns = obj["metadata"]["namespace"]
    source = (obj.get("spec") or {}).get("source") or {}
    deps: list[Dependency] = []
    if name := (source.get("credentialsSecretRef") or {}).get("name"):
        deps.append(("v1", "Secret", ns, name))
    uri = str(source.get("uri") or "")
    if uri.startswith("pvc://"):
        deps.append(("v1", "PersistentVolumeClaim", ns, urlparse(uri).netloc))
    return deps


CONTROLLER = Controller(KIND, "basemodels", BaseModelStatus, reconcile, dependencies)
__all__ = ["API_VERSION", "CONTROLLER", "decide", "observe"]
