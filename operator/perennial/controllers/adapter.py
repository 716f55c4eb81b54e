"""Adapter controller: an Adapter is a record; `Ready` says whether its artifact and lineage hold together.

Adapters carry no ownerReference to the TrainingRun that made them: they outlive it.
observe (cache: base model, parent adapter, training run; storage: the artifact) →
decide (pure) → no children. An artifact is immutable: once found for a
generation it is not looked up again; a missing one is looked for again after
`resyncSeconds` (storage cannot be watched, so time is the trigger there).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import pydantic

from .. import storage
from ..api.adapter import AdapterSpec, AdapterStatus
from ..resources import conditions as cond
from . import verdicts
from .base import API_VERSION, Context, Controller, Dependency, Outcome, first_error, generation

KIND = "Adapter"
ARTIFACT_MARKER = "adapter_config.json"


@dataclass
class World:
    artifact: bool | None  # None: the operator cannot read that storage
    base: dict[str, Any] | None
    parent: dict[str, Any] | None
    run: dict[str, Any] | None


def lineage_problems(spec: AdapterSpec, world: World) -> list[str]:
    problems = []
    if world.base is None:
        problems.append(f"BaseModel {spec.base_model_ref.name!r} does not exist")
    parent_ref = spec.lineage.parent_adapter_ref
    if parent_ref is not None:
        if world.parent is None:
            problems.append(f"parent Adapter {parent_ref.name!r} does not exist")
        elif (world.parent.get("spec") or {}).get("baseModelRef", {}).get("name") != spec.base_model_ref.name:
            problems.append(f"parent Adapter {parent_ref.name!r} is of another base model")
    run_ref = spec.lineage.training_run_ref
    # A deleted run is fine (adapters outlive runs); a different run of the same name is not.
    if run_ref is not None and spec.lineage.training_run_uid and world.run is not None and world.run["metadata"].get("uid") != spec.lineage.training_run_uid:
        problems.append(f"TrainingRun {run_ref.name!r} was recreated: its uid is not the one in `lineage.trainingRunUid`")
    return problems


def evaluation(obj: dict[str, Any], run: dict[str, Any] | None) -> dict[str, Any]:
    """Metrics, mean reward and improvement: from the TrainingRun that made the adapter while it exists
    (its uid matching the lineage), else as recorded before (adapters outlive their runs)."""
    old = obj.get("status") or {}
    uid = ((obj.get("spec") or {}).get("lineage") or {}).get("trainingRunUid")
    metrics = ((run or {}).get("status") or {}).get("metrics") if run is not None and uid and run["metadata"].get("uid") == uid else None
    if not metrics:
        return {k: old[k] for k in ("metrics", "meanReward", "improvement") if k in old}
    out: dict[str, Any] = {"metrics": metrics}
    by_name = {m.get("name"): m.get("value") for m in metrics}
    if by_name.get("eval/mean_reward") is not None:
        out["meanReward"] = by_name["eval/mean_reward"]
    if by_name.get("eval/improvement") is not None:
        out["improvement"] = by_name["eval/improvement"]
    return out


def decide(obj: dict[str, Any], world: World) -> dict[str, Any]:
    """The Adapter's status (pure)."""
    gen = generation(obj)
    old = obj.get("status") or {}
    status: dict[str, Any] = evaluation(obj, world.run)
    status["observedGeneration"] = gen
    conds = old.get("conditions")
    try:
        spec = AdapterSpec.model_validate(obj.get("spec") or {})
    except pydantic.ValidationError as exc:
        status["conditions"] = cond.set_condition(conds, "Ready", False, "InvalidSpec", first_error(exc), gen)
        return status
    if world.artifact is None:
        conds = cond.set_condition(conds, "ArtifactAvailable", "Unknown", "NotVerifiable", f"the operator cannot read {spec.artifact_uri}; serving pods will", gen)
    elif world.artifact:
        conds = cond.set_condition(conds, "ArtifactAvailable", True, "Found", f"{ARTIFACT_MARKER} found at {spec.artifact_uri}", gen)
    else:
        conds = cond.set_condition(conds, "ArtifactAvailable", False, "NotFound", f"no {ARTIFACT_MARKER} at {spec.artifact_uri}", gen)
    problems = lineage_problems(spec, world)
    if problems:
        conds = cond.set_condition(conds, "LineageConsistent", False, "LineageBroken", "; ".join(problems), gen)
        conds = cond.set_condition(conds, "Ready", False, "LineageBroken", "; ".join(problems), gen)
    else:
        conds = cond.set_condition(conds, "LineageConsistent", True, "Consistent", "base model and lineage references hold", gen)
        artifact = cond.get(conds, "ArtifactAvailable") or {}
        if artifact.get("status") == "False":
            conds = cond.set_condition(conds, "Ready", False, "ArtifactNotFound", artifact["message"], gen)
        else:
            conds = cond.set_condition(conds, "Ready", True, "Available", f"{spec.family} v{spec.version} of {spec.base_model_ref.name}", gen)
    conds = verdicts.improved(status.get("metrics"), conds, gen, has_parent=spec.lineage.parent_adapter_ref is not None)
    if said := verdicts.from_metrics(status.get("metrics")):
        conds = cond.set_condition(conds, "LearningSignal", False, said[0], said[1], gen)
    status["conditions"] = conds
    if warnings := verdicts.warnings_text(conds):
        status["warnings"] = warnings
    return status


def artifact_exists(uri: str, pvc_root: str) -> bool | None:
    """`storage.exists`; a local file (`file://`, `pvc://`, a path) by one stat, without fsspec's Python around it
    (its LocalFileSystem answers the same: a file or directory, links followed, any error False)."""
    path = storage.local_path(uri, pvc_root)
    if path is not None:
        return os.path.exists(path)
    return storage.exists(uri, pvc_root)


async def observe(obj: dict[str, Any], ctx: Context) -> World:
    ns = obj["metadata"]["namespace"]
    spec = obj.get("spec") or {}
    lineage = spec.get("lineage") or {}
    found = cond.get((obj.get("status") or {}).get("conditions"), "ArtifactAvailable") or {}
    if found.get("status") == "True" and found.get("observedGeneration") == generation(obj):
        artifact: bool | None = True  # immutable once found: no storage round trip per reconcile
    elif spec.get("artifactUri"):
        artifact = await asyncio.to_thread(artifact_exists, f"{str(spec['artifactUri']).rstrip('/')}/{ARTIFACT_MARKER}", ctx.config.pvc_root)
    else:
        artifact = False
    return World(
        artifact=artifact,
        base=ctx.cache.get(API_VERSION, "BaseModel", ns, (spec.get("baseModelRef") or {}).get("name", "")),
        parent=ctx.cache.get(API_VERSION, "Adapter", ns, n) if (n := (lineage.get("parentAdapterRef") or {}).get("name")) else None,
        run=ctx.cache.get(API_VERSION, "TrainingRun", ns, n) if (n := (lineage.get("trainingRunRef") or {}).get("name")) else None,
    )


async def reconcile(obj: dict[str, Any], ctx: Context) -> Outcome:
    world = await observe(obj, ctx)
    status = decide(obj, world)
    missing = world.artifact is False
    return Outcome(status, requeue_after=ctx.config.resync_seconds if missing else None)


def dependencies(obj: dict[str, Any]) -> list[Dependency]:
    ns = obj["metadata"]["namespace"]
    spec = obj.get("spec") or {}
    lineage = spec.get("lineage") or {}
    deps: list[Dependency] = []
    if name := (spec.get("baseModelRef") or {}).get("name"):
        deps.append((API_VERSION, "BaseModel", ns, name))
    if name := (lineage.get("parentAdapterRef") or {}).get("name"):
        deps.append((API_VERSION, "Adapter", ns, name))
    if name := (lineage.get("trainingRunRef") or {}).get("name"):
        deps.append((API_VERSION, "TrainingRun", ns, name))
    return deps


CONTROLLER = Controller(KIND, "adapters", AdapterStatus, reconcile, dependencies, event_for=verdicts.event_for)
