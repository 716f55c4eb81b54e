"""Adapter controller: an Adapter is a record; `Ready` says whether its artifact and lineage hold together.

Adapters carry no ownerReference to the TrainingRun that made them: they outlive it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pydantic

from .. import storage
from ..api.adapter import AdapterSpec
from ..resources import conditions as cond
from .base import (
    API_VERSION,
    RESYNC_SECONDS,
    Context,
    first_error,
    generation,
    register,
    write_status,
)

KIND = "Adapter"
PLURAL = "adapters"
ARTIFACT_MARKER = "adapter_config.json"


async def lineage_problems(spec: AdapterSpec, namespace: str, ctx: Context) -> list[str]:
    problems = []
    parent_ref = spec.lineage.parent_adapter_ref
    if parent_ref is not None:
        parent = await ctx.kube.aget(API_VERSION, "Adapter", namespace, parent_ref.name)
        if parent is None:
            problems.append(f"parent Adapter {parent_ref.name!r} does not exist")
        elif (parent.get("spec") or {}).get("baseModelRef", {}).get("name") != spec.base_model_ref.name:
            problems.append(f"parent Adapter {parent_ref.name!r} is of another base model")
    run_ref = spec.lineage.training_run_ref
    if run_ref is not None and spec.lineage.training_run_uid:
        run = await ctx.kube.aget(API_VERSION, "TrainingRun", namespace, run_ref.name)
        # A deleted run is fine (adapters outlive runs); a different run of the same name is not.
        if run is not None and run["metadata"].get("uid") != spec.lineage.training_run_uid:
            problems.append(f"TrainingRun {run_ref.name!r} was recreated: its uid is not the one in `lineage.trainingRunUid`")
    return problems


async def reconcile(body: Any, ctx: Context, logger: logging.Logger) -> None:
    meta = body["metadata"]
    ns = meta["namespace"]
    status = dict(body.get("status") or {})
    gen = generation(body)
    status["observedGeneration"] = gen
    conds = status.get("conditions")
    try:
        spec = AdapterSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError as exc:
        status["conditions"] = cond.set_condition(conds, "Ready", False, "InvalidSpec", first_error(exc), gen)
        await write_status(ctx, body, status, logger)
        return

    exists = await asyncio.to_thread(storage.exists, f"{spec.artifact_uri.rstrip('/')}/{ARTIFACT_MARKER}", ctx.config.pvc_root)
    if exists is None:
        conds = cond.set_condition(conds, "ArtifactAvailable", "Unknown", "NotVerifiable", f"the operator cannot read {spec.artifact_uri}; serving pods will", gen)
    elif exists:
        conds = cond.set_condition(conds, "ArtifactAvailable", True, "Found", f"{ARTIFACT_MARKER} found at {spec.artifact_uri}", gen)
    else:
        conds = cond.set_condition(conds, "ArtifactAvailable", False, "NotFound", f"no {ARTIFACT_MARKER} at {spec.artifact_uri}", gen)

    problems = []
    base = await ctx.kube.aget(API_VERSION, "BaseModel", ns, spec.base_model_ref.name)
    if base is None:
        problems.append(f"BaseModel {spec.base_model_ref.name!r} does not exist")
    problems += await lineage_problems(spec, ns, ctx)
    if problems:
        conds = cond.set_condition(conds, "LineageConsistent", False, "LineageBroken", "; ".join(problems), gen)
    else:
        conds = cond.set_condition(conds, "LineageConsistent", True, "Consistent", "base model and lineage references hold", gen)

    artifact = cond.get(conds, "ArtifactAvailable") or {}
    if problems:
        conds = cond.set_condition(conds, "Ready", False, "LineageBroken", "; ".join(problems), gen)
    elif artifact.get("status") == "False":
        conds = cond.set_condition(conds, "Ready", False, "ArtifactNotFound", artifact["message"], gen)
    else:
        conds = cond.set_condition(conds, "Ready", True, "Available", f"{spec.family} v{spec.version} of {spec.base_model_ref.name}", gen)
    status["conditions"] = conds
    await write_status(ctx, body, status, logger)


register(KIND, PLURAL, reconcile, interval=RESYNC_SECONDS)
