"""Deployment controller (the Perennial kind `Deployment`, serving; never an apps/v1 Deployment by that name).

observe (cache: the BaseModel, the Adapters named or tracked, per region the apps/v1 Deployments of both
colors, the stable and preview Services, the routes ConfigMap, the token Secret; the ready pods' sidecars
over HTTP: which routes revision each applied) → decide (pure: `rollout.decide_region` for the pods,
`rollout.decide_adapters` for served name -> Adapter, then the children's manifests and the typed status,
`decide_status`) → act (apply the children idempotently; the smoke test through the preview Service when a
decision asks for it, then decide again with its result) → `Outcome`, with `requeue_after` only where time is
the trigger (a delay or deadline, or pods still applying a routes document: sidecars cannot be watched).

The rollout's state is in the children (annotations, the stable Service's selector), so a restarted operator
resumes where the world stands. Regions in other clusters (`clusterSecretRef`) are not reconciled yet: they are
reported per region (`Pending`, with a message) and the Deployment is `Degraded`.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import logging
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any

import aiohttp
import pydantic

from ..api.deployment import (
    ADAPTER_ROLLOUTS_ANNOTATION,
    CONDITION_DEGRADED,
    CONDITION_PROGRESSING,
    CONDITION_READY,
    PROMOTE_ANNOTATION,
    DeploymentSpec,
    DeploymentStatus,
    PromotionGate,
    Region,
)
from ..kube import ApiError
from ..kube.client import path_for
from ..resources import conditions as cond
from ..resources import deployment as build
from . import rollout
from .base import (
    API_VERSION,
    Context,
    Controller,
    Dependency,
    Note,
    Outcome,
    default_event_type,
    first_error,
    generation,
)
from .children import apply_all, is_unserved

log = logging.getLogger("perennial.controllers")

KIND = "Deployment"
#: The annotation the local runtime's Service proxy writes on a Service: where it is reachable on this machine.
LOCAL_URL_ANNOTATION = "perennial.ai/local-url"
#: While ready pods have not applied the routes document yet, look again this often (sidecars are not watchable).
ROUTES_POLL_SECONDS = 2.0
#: Limit of one sidecar's `GET /perennial/routes`.
SIDECAR_TIMEOUT_SECONDS = 2.0
KEDA = ("keda.sh/v1alpha1", "ScaledObject")
#: Children whose creation is no Event of its own: the rollout decisions' notes say what was done and why.
QUIET_CHILDREN: dict[str | tuple[str, str], str | None] = {
    kind: None for kind in (("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ConfigMap"), ("policy/v1", "PodDisruptionBudget"),
                            ("autoscaling/v2", "HorizontalPodAutoscaler"), KEDA, ("networking.k8s.io/v1", "NetworkPolicy"))}
_REGION_CONDITIONS = (CONDITION_READY, CONDITION_PROGRESSING, CONDITION_DEGRADED)


class Blocked(Exception):
    """A reference is missing or not ready: nothing is rolled out; the Deployment waits for it."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


# ----------------------------------------------------------------------------- pure helpers


def now_of(ctx: Context) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(ctx.clock(), _dt.UTC).replace(microsecond=0)


def _ready(obj: Mapping[str, Any] | None) -> bool:
    return bool(obj) and cond.is_true(((obj or {}).get("status") or {}).get("conditions"), "Ready")


def _decimal(value: Any) -> Decimal | None:
    try:
        d = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return d if d.is_finite() else None


def passes_gate(adapter: Mapping[str, Any], gate: PromotionGate) -> bool:
    """Whether an Adapter passed a Deployment's promotion gate (its held-out evaluation against its baseline)."""
    status = adapter.get("status") or {}
    improvement, mean = _decimal(status.get("improvement")), _decimal(status.get("meanReward"))
    if improvement is None:
        return not gate.require_evaluation
    if improvement < (_decimal(gate.min_improvement) or Decimal(0)):
        return False
    floor = _decimal(gate.min_mean_reward) if gate.min_mean_reward is not None else None
    return floor is None or (mean is not None and mean >= floor)


def _version(a: Mapping[str, Any]) -> int:
    v = (a.get("spec") or {}).get("version")
    return v if isinstance(v, int) else 0


def resolve_adapters(spec: DeploymentSpec, adapters: Iterable[Mapping[str, Any]]) -> tuple[dict[str, Mapping[str, Any]], list[str]]:
    """Served name -> the Ready Adapter object it should point to (pinned, or the newest of a tracked family
    that passed the promotion gate), and why the names left out have none yet."""
    by_name = {a["metadata"]["name"]: a for a in adapters}
    gate = spec.continuous_learning.promotion if spec.continuous_learning else PromotionGate()
    out: dict[str, Mapping[str, Any]] = {}
    problems: list[str] = []
    for served in spec.adapters:
        if served.adapter_ref is not None:
            a = by_name.get(served.adapter_ref.name)
            if a is None:
                problems.append(f"{served.name}: Adapter {served.adapter_ref.name!r} does not exist")
            elif not _ready(a):
                problems.append(f"{served.name}: Adapter {served.adapter_ref.name!r} is not Ready")
            else:
                out[served.name] = a
            continue
        track = served.track
        assert track is not None
        family = [a for a in by_name.values() if (a.get("spec") or {}).get("family") == track.family and _ready(a)]
        if track.require_promotion:
            family = [a for a in family if passes_gate(a, gate)]
        if not family:
            problems.append(f"{served.name}: no Ready Adapter of family {track.family!r}"
                            f"{' passed the promotion gate' if track.require_promotion else ''} yet")
            continue
        out[served.name] = max(family, key=lambda a: (_version(a), a["metadata"]["name"]))
    return out, problems


def adapter_info(a: Mapping[str, Any]) -> rollout.AdapterInfo:
    uri = a["spec"]["artifactUri"]
    return rollout.AdapterInfo(name=a["metadata"]["name"], uri=build.local_path(uri) or uri, rank=int(a["spec"]["lora"]["rank"]),
                               base_model=a["spec"]["baseModelRef"]["name"])


def desired_routes(spec: DeploymentSpec, resolved: Mapping[str, Mapping[str, Any]], current: Mapping[str, Any] | None) -> dict[str, rollout.AdapterInfo]:
    """Served name -> the Adapter it should point to: the resolved one; for a name of the spec whose Adapter cannot
    be resolved now (deleted, or not Ready for a while), the one it serves now, so clients keep their model name."""
    out = {n: adapter_info(a) for n, a in resolved.items()}
    routes, loaded = (current or {}).get("routes") or {}, (current or {}).get("adapters") or {}
    for served in spec.adapters:
        entries = routes.get(served.name)
        if served.name in out or not entries:
            continue
        primary = max(entries, key=lambda e: (int(e.get("weight", 0)), str(e.get("adapter"))))["adapter"]
        info = loaded.get(primary) or {}
        if info.get("uri"):
            out[served.name] = rollout.AdapterInfo(name=primary, uri=str(info["uri"]), rank=int(info.get("rank") or 0),
                                                   base_model=spec.base_model_ref.name)
    return out


def color_manifest(s: build.Serving, color: str, target: rollout.ColorTarget, desired_revision: str, *,
                   current: Mapping[str, Any] | None, autoscaled_active: bool) -> dict[str, Any] | None:
    """The manifest applied to one color's apps/v1 Deployment: the whole object at the desired revision; only
    replicas and annotations for a color at another revision (its pod template belongs to an earlier spec and is
    never rebuilt from this one). Replicas are left out on the autoscaled active color (the autoscaler's)."""
    replicas: int | None = target.replicas
    if autoscaled_active and current is not None and int((current.get("spec") or {}).get("replicas", 1)) == target.replicas:
        replicas = None
    if target.revision == desired_revision:
        m = build.deployment(s, color, desired_revision, replicas)
    elif current is None:
        return None  # a color of another revision that does not exist: nothing to bring back
    else:
        m = {"apiVersion": "apps/v1", "kind": "Deployment",
             "metadata": {"name": current["metadata"]["name"], "namespace": current["metadata"]["namespace"]}, "spec": {}}
        if replicas is not None:
            m["spec"]["replicas"] = replicas
    if target.annotations:
        m["metadata"]["annotations"] = dict(target.annotations)
    return m


def routes_manifest(s: build.Serving, decision: rollout.AdapterDecision) -> dict[str, Any]:
    doc = decision.routes
    meta = build.routes_config_map(s, {})["metadata"]  # name, labels, ownership of the contract
    meta["annotations"] = {build.ROUTES_REVISION_ANNOTATION: doc["revision"],
                           ADAPTER_ROLLOUTS_ANNOTATION: rollout.dump_progress(decision.progress) if decision.progress else None}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {build.ROUTES_KEY: json.dumps(doc, indent=1, sort_keys=False)}}


def resource_of(manifest: Mapping[str, Any]) -> tuple[str, str]:
    return manifest["apiVersion"], manifest["kind"]


def keda_missing() -> rollout.ConditionPart:
    return rollout.ConditionPart(CONDITION_DEGRADED, "True", "KEDANotInstalled",
                                 "`autoscaling.provider` is 'KEDA' but the API server does not serve keda.sh/v1alpha1 ScaledObjects: "
                                 "install KEDA, or use provider 'HPA'; the active color keeps its replicas")


# ----------------------------------------------------------------------------- observe


@dataclass
class RegionWorld:
    serving: build.Serving
    colors: dict[str, dict[str, Any] | None]
    stable: dict[str, Any] | None
    preview: dict[str, Any] | None
    routes: dict[str, Any] | None
    pods: list[dict[str, Any]] = field(default_factory=list)
    pod_routes: tuple[rollout.PodRoutes, ...] = ()

    @property
    def stable_color(self) -> str | None:
        color = ((self.stable or {}).get("spec") or {}).get("selector", {}).get(build.LABEL_COLOR)
        return color if color in build.COLORS else None


def routes_document(cm: Mapping[str, Any] | None) -> dict[str, Any] | None:
    raw = ((cm or {}).get("data") or {}).get(build.ROUTES_KEY)
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def pod_ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and cond.is_true(status.get("conditions"), "Ready") and not (pod.get("metadata") or {}).get("deletionTimestamp")


def sidecar_port(pod: Mapping[str, Any]) -> int:
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == build.PORT_NAME and p.get("containerPort"):
                return int(p["containerPort"])
    return build.SIDECAR_PORT


async def pod_routes(session: aiohttp.ClientSession, pod: Mapping[str, Any]) -> rollout.PodRoutes:
    """What one pod's sidecar applied (`GET /perennial/routes`); not ready (or unreadable): revision None."""
    name = pod["metadata"]["name"]
    ip = (pod.get("status") or {}).get("podIP")
    if not pod_ready(pod) or not ip:
        return rollout.PodRoutes(name, False, None)
    try:
        async with session.get(f"http://{ip}:{sidecar_port(pod)}/perennial/routes") as resp:
            if resp.status != 200:
                return rollout.PodRoutes(name, True, None)
            body = await resp.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, ValueError, OSError) as exc:
        log.debug("Could not read the routes of pod=%s: %s", name, exc)
        return rollout.PodRoutes(name, True, None)
    errors = body.get("errors") if isinstance(body, dict) and isinstance(body.get("errors"), dict) else {}
    revision = body.get("revision") if isinstance(body, dict) else None
    return rollout.PodRoutes(name, True, revision if isinstance(revision, str) else None, {str(k): str(v)[:512] for k, v in errors.items()})


def observe_region(ctx: Context, s: build.Serving) -> RegionWorld:
    ns, prefix = s.namespace, s.prefix
    cache = ctx.cache
    world = RegionWorld(
        serving=s,
        colors={c: cache.get("apps/v1", "Deployment", ns, build.deployment_name(prefix, c)) for c in build.COLORS},
        stable=cache.get("v1", "Service", ns, build.stable_service_name(prefix)),
        preview=cache.get("v1", "Service", ns, build.preview_service_name(prefix)),
        routes=cache.get("v1", "ConfigMap", ns, build.routes_config_map_name(prefix)),
    )
    if world.stable_color:
        world.pods = cache.list("v1", "Pod", ns, labels=build.selector(s, world.stable_color))
    return world


async def read_pods(worlds: list[RegionWorld]) -> None:
    pods = [(w, p) for w in worlds for p in w.pods]
    if not pods:
        return
    timeout = aiohttp.ClientTimeout(total=SIDECAR_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(*(pod_routes(session, p) for _, p in pods))
    for w in worlds:
        w.pod_routes = tuple(r for (ww, _), r in zip(pods, results) if ww is w)


# ----------------------------------------------------------------------------- smoke test


def service_url(svc: Mapping[str, Any] | None, name: str, namespace: str) -> str:
    """Where a Service answers: the local runtime's URL when it reports one, else its cluster DNS name."""
    local = ((svc or {}).get("metadata") or {}).get("annotations", {}).get(LOCAL_URL_ANNOTATION)
    return local.rstrip("/") if local else f"http://{name}.{namespace}.svc.cluster.local"


async def smoke_test(url: str, names: Iterable[str], *, prompt: str, expect_regex: str | None, max_tokens: int,
                     timeout: float) -> tuple[bool, str]:
    """Every model name answers a chat completion at `url` (non-empty, matching `expect_regex`): (passed, why not)."""
    pattern = re.compile(expect_regex) if expect_regex else None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            for name in names:
                body = {"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
                async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                    text = await resp.text()
                    if resp.status != 200:
                        return False, f"{name}: HTTP {resp.status}: {text[:200]}"
                try:
                    answer = json.loads(text)["choices"][0]["message"]["content"] or ""
                except (ValueError, KeyError, IndexError, TypeError):
                    return False, f"{name}: not a chat completion: {text[:200]}"
                if not answer.strip():
                    return False, f"{name}: empty answer"
                if pattern is not None and not pattern.search(answer):
                    return False, f"{name}: answer {answer[:120]!r} does not match {expect_regex!r}"
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return False, f"{url} did not answer: {type(exc).__name__}: {exc}"[:300]
    return True, ""


# ----------------------------------------------------------------------------- reconcile


@dataclass
class RegionResult:
    name: str
    desired_revision: str
    manifests: list[dict[str, Any]]
    rollout: rollout.RegionRollout
    #: both rollout paths' parts, combined (`rollout.combine_conditions`) when the status is decided
    conditions: list[rollout.ConditionPart]
    notes: list[Note]
    requeue_after: float | None
    served: list[rollout.ServedRoute] = field(default_factory=list)
    selector: str | None = None
    routes_revision: str | None = None
    endpoint: str | None = None


def region_status(r: RegionResult) -> dict[str, Any]:
    """One `RegionStatus` (API field names) of a region's result."""
    st = r.rollout
    region = {
        "name": r.name, "phase": st.phase, "activeColor": st.active_color, "revision": st.revision,
        "previewColor": st.preview_color, "previewRevision": st.preview_revision, "pendingPromotion": st.pending_promotion,
        "routesRevision": r.routes_revision, "readyReplicas": st.ready_replicas, "desiredReplicas": st.desired_replicas,
        "endpoint": r.endpoint, "message": st.message[:1024] or None,
    }
    return {k: v for k, v in region.items() if v is not None}


def _min(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def started(w: RegionWorld, revision: str) -> bool:
    """Whether a region already runs pods of `revision` (its rollout began: it is never held back then)."""
    return any(o is not None and (o["metadata"].get("labels") or {}).get(build.LABEL_REVISION) == revision
               and int((o.get("spec") or {}).get("replicas", 1)) > 0 for o in w.colors.values())


def rolled_out(r: RegionResult) -> bool:
    """A region is done with its pod rollout: its active color runs the desired revision, switched and ready."""
    st = r.rollout
    return st.revision == r.desired_revision and st.phase in ("Stable", "ScalingDown") and st.ready_replicas >= st.desired_replicas


async def reconcile_region(ctx: Context, obj: dict[str, Any], spec: DeploymentSpec, w: RegionWorld,
                           desired: dict[str, Mapping[str, Any]], now: _dt.datetime, *, held_by: str | None = None) -> RegionResult:
    """One region's pass. `held_by`: an earlier region still rolling out (`regionOrder: Sequential`): this one does not
    start its pod rollout until that one is done (a rollout already started here goes on)."""
    s = w.serving
    bg = spec.strategy.blue_green
    ns = s.namespace
    promote = (obj["metadata"].get("annotations") or {}).get(PROMOTE_ANNOTATION)
    autoscaled = spec.autoscaling.enabled
    region_replicas = s.region.replicas if s.region.replicas is not None else spec.replicas
    desired_replicas = spec.autoscaling.min_replicas if autoscaled else region_replicas
    revision = build.revision(s)
    hold = held_by is not None and not spec.paused and w.stable_color is not None and not started(w, revision)
    paused = spec.paused or hold

    # Pods: blue-green of the pod revision.
    colors = {c: (rollout.ColorState.from_object(o) if o is not None else None) for c, o in w.colors.items()}
    observed = rollout.RegionObserved(blue=colors["blue"], green=colors["green"], stable_color=w.stable_color,  # type: ignore[arg-type]
                                      desired_revision=revision, desired_replicas=desired_replicas, autoscaled=autoscaled,
                                      stable_annotations=dict(((w.stable or {}).get("metadata") or {}).get("annotations") or {}))
    pods = rollout.decide_region(observed, bg, paused=paused, promote=promote, now=now)
    if pods.smoke is not None and pods.smoke.color is not None:
        names = [s.served_base_name] + sorted(k for k in (routes_document(w.routes) or {}).get("routes", {}) if not k.endswith(rollout.PREVIEW_SUFFIX))
        url = service_url(w.preview, build.preview_service_name(s.prefix), ns)
        passed, why = await smoke_test(url, names, prompt=bg.smoke_test.prompt, expect_regex=bg.smoke_test.expect_regex,
                                       max_tokens=bg.smoke_test.max_tokens, timeout=pods.smoke.timeout_seconds)
        log.info("Ran the smoke test, deployment=%s, namespace=%s, revision=%s, passed=%s", s.name, ns, pods.smoke.revision, passed)
        observed = rollout.RegionObserved(**{**observed.__dict__, "smoke_result": rollout.SmokeResult(pods.smoke.revision, passed, why)})
        pods = rollout.decide_region(observed, bg, paused=paused, promote=promote, now=now)
    if hold and pods.status.phase == "Paused":
        wait = f"Waiting for region {held_by} to finish its rollout before revision {revision} starts here (regionOrder Sequential)"
        pods.status = replace(pods.status, message=wait)
        pods.conditions = [rollout.ConditionPart(CONDITION_PROGRESSING, "Unknown", "WaitingForRegion", wait) if c.type == CONDITION_PROGRESSING
                           else c for c in pods.conditions]

    # Adapters: served name -> Adapter in the running pods of the active color.
    engine = spec.engine
    current_routes = routes_document(w.routes)
    progress = rollout.parse_progress(((w.routes or {}).get("metadata") or {}).get("annotations", {}).get(ADAPTER_ROLLOUTS_ANNOTATION))
    aobs = rollout.AdaptersObserved(routes=current_routes, progress=progress, pods=w.pod_routes,
                                    desired=desired_routes(spec, desired, current_routes), base_name=s.served_base_name,
                                    base_model=spec.base_model_ref.name, max_loras=max(engine.max_loras, engine.max_cpu_loras or 0),
                                    max_lora_rank=engine.max_lora_rank)
    adapters = rollout.decide_adapters(aobs, bg, spec.strategy.adapter_rollout, paused=spec.paused, promote=promote, now=now)
    if adapters.smoke is not None:
        url = service_url(w.stable, build.stable_service_name(s.prefix), ns)
        passed, why = await smoke_test(url, adapters.smoke.model_names, prompt=bg.smoke_test.prompt, expect_regex=bg.smoke_test.expect_regex,
                                       max_tokens=bg.smoke_test.max_tokens, timeout=adapters.smoke.timeout_seconds)
        aobs = rollout.AdaptersObserved(**{**aobs.__dict__, "smoke_result": rollout.SmokeResult(adapters.smoke.revision, passed, why)})
        adapters = rollout.decide_adapters(aobs, bg, spec.strategy.adapter_rollout, paused=spec.paused, promote=promote, now=now)

    # Children: routes first (the pods mount them), then the colors, Services, PDBs, the autoscaler.
    manifests: list[dict[str, Any]] = [routes_manifest(s, adapters)]
    for c, target in pods.colors.items():
        m = color_manifest(s, c, target, revision, current=w.colors[c],
                           autoscaled_active=autoscaled and c == pods.stable_color)
        if m is not None:
            manifests.append(m)
            manifests.append(build.pdb(s, c))
    if pods.preview_color is not None:
        manifests.append(build.preview_service(s, pods.preview_color))
    if pods.stable_color is not None:
        svc = build.stable_service(s, pods.stable_color)
        if pods.stable_annotations:
            svc["metadata"]["annotations"] = dict(pods.stable_annotations)
        manifests.append(svc)
    parts = list(pods.conditions)
    if pods.stable_color is not None and (scaler := build.autoscaler(s, pods.stable_color)) is not None:
        manifests.append(scaler)  # skipped by apply_all where KEDA is not installed (see `keda_missing`)
    if (egress := ctx.config.egress_settings()) is not None:
        manifests.append(build.network_policy(s, egress))

    # While an adapter moves, pods that have not applied the routes yet are polled (sidecars cannot be watched).
    moving = any(pr.get("adapter") and not pr.get("switchedAt") and not pr.get("aborted") for pr in adapters.progress.values())
    # Also until every ready pod that answers applied a new document (the status shows the revision they all serve).
    waiting_pods = any(p.ready and p.revision != adapters.routes.get("revision") and (moving or p.revision is not None) for p in w.pod_routes)
    ready_pods = [p for p in w.pod_routes if p.ready]
    applied = adapters.routes.get("revision") if ready_pods and all(p.revision == adapters.routes.get("revision") for p in ready_pods) else None

    # Status of the region: the pods' decision, the adapters' folded in (`rollout.region_status`).
    st = pods.status
    endpoint = service_url(w.stable, build.stable_service_name(s.prefix), ns) if w.stable is not None else None
    if pods.stable_color is not None and w.stable is None:
        endpoint = build.endpoint(s)
    merged, _ = rollout.region_status(s.region.name, pods, adapters, endpoint=endpoint, routes_revision=applied)
    status = replace(st, phase=merged.phase or st.phase, message=merged.message or "", pending_promotion=merged.pending_promotion)
    return RegionResult(
        name=s.region.name, desired_revision=revision, manifests=manifests, rollout=status, conditions=parts + list(adapters.conditions),
        notes=list(pods.notes) + list(adapters.notes),
        requeue_after=_min(pods.requeue_after, adapters.requeue_after, ROUTES_POLL_SECONDS if waiting_pods else None),
        served=adapters.served, selector=build.selector_string(s, st.active_color) if st.active_color else None,
        routes_revision=applied, endpoint=endpoint,
    )


UNSUPPORTED_REGION = "regions in other clusters (`clusterSecretRef`) are not reconciled by this operator yet"


def decide_status(obj: dict[str, Any], results: list[RegionResult], remote: list[Region], problems: list[str]) -> dict[str, Any]:
    """The typed status of the whole Deployment from its regions' results (pure): the regions' phases and
    conditions combined (`rollout.summarize`: a region that does not serve is named), the first region's active
    color, revision, endpoint and served adapters, every region's own state."""
    gen = generation(obj)
    regions = [(r.name, r.rollout, rollout.combine_conditions([(None, c) for c in r.conditions])) for r in results]
    for region in remote:
        text = f"Region {region.name}: {UNSUPPORTED_REGION}"
        regions.append((region.name, rollout.RegionRollout(phase="Pending", active_color=None, revision=None, ready_replicas=0,
                                                           desired_replicas=0, message=text),
                        [rollout.ConditionPart(CONDITION_READY, "False", "RegionUnsupported", text),
                         rollout.ConditionPart(CONDITION_DEGRADED, "True", "RegionUnsupported", text)]))
    first = results[0] if results else None
    served = first.served if first else []
    summary = rollout.summarize(regions, served)
    parts: list[tuple[str | None, rollout.ConditionPart]] = [(None, c) for c in summary.conditions]
    if problems:
        parts.append((None, rollout.ConditionPart(CONDITION_DEGRADED, "True", "AdapterNotReady", "; ".join(problems)[:1024])))
    combined = {c.type: c for c in rollout.combine_conditions(parts)}
    conds = (obj.get("status") or {}).get("conditions")
    for ctype in _REGION_CONDITIONS:
        p = combined.get(ctype) or rollout.ConditionPart(ctype, "False", "AsExpected", "")
        conds = cond.set_condition(conds, ctype, p.status, p.reason, p.message, gen)
    status: dict[str, Any] = {
        "observedGeneration": gen,
        "conditions": conds,
        "phase": summary.phase,
        "regions": [region_status(r) for r in results] + [
            {"name": name, "phase": st.phase, "message": st.message, "readyReplicas": 0, "desiredReplicas": 0}
            for name, st, _ in regions[len(results):]],
        "readyReplicas": summary.ready_replicas,
        "desiredReplicas": summary.desired_replicas,
        "readySummary": summary.ready_summary,
    }
    if first is not None:
        for key, value in (("activeColor", first.rollout.active_color), ("revision", first.rollout.revision),
                           ("endpoint", first.endpoint), ("selector", first.selector)):
            if value is not None:
                status[key] = value
    if served:
        status["servedAdapters"] = [{k: v for k, v in (("name", r.name), ("adapter", r.adapter), ("canaryAdapter", r.canary_adapter),
                                                        ("canaryWeight", r.canary_weight)) if v is not None} for r in served]
        status["servedSummary"] = summary.served_summary
    for key in ("newFeedbackRecords", "lastTrainingRun", "lastTrainingTime"):  # the learning loop's, kept as they are
        if key in (obj.get("status") or {}):
            status[key] = obj["status"][key]
    return status


def _blocked_status(obj: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    """Nothing can be rolled out (an invalid spec, a BaseModel missing or not Ready): the children are left as they
    are; what served keeps serving, so a `Ready=True` stays (Degraded says why nothing moves), else Ready is False."""
    gen = generation(obj)
    old = (obj.get("status") or {}).get("conditions")
    conds = old
    serving = cond.is_true(old, CONDITION_READY) and bool((obj.get("status") or {}).get("activeColor"))
    if not serving:
        conds = cond.set_condition(conds, CONDITION_READY, False, reason, message, gen)
    else:
        ready = cond.get(old, CONDITION_READY) or {}
        conds = cond.set_condition(conds, CONDITION_READY, True, ready.get("reason") or "Serving", ready.get("message") or "", gen)
    conds = cond.set_condition(conds, CONDITION_PROGRESSING, "Unknown", reason, message, gen)
    conds = cond.set_condition(conds, CONDITION_DEGRADED, True if serving else "Unknown", reason, message, gen)
    keep = {k: v for k, v in (obj.get("status") or {}).items() if k not in ("conditions", "observedGeneration", "phase")}
    return {**keep, "observedGeneration": gen, "conditions": conds, "phase": "Degraded" if serving else "Pending"}


AUTOSCALERS = (("autoscaling/v2", "HorizontalPodAutoscaler"), KEDA)


async def prune_autoscalers(ctx: Context, obj: Mapping[str, Any], results: list[RegionResult]) -> list[Note]:
    """Delete this Deployment's HPAs/ScaledObjects that no region wants any more (autoscaling turned off, the provider
    changed): an autoscaler left behind would keep resizing the active color."""
    ns, uid = obj["metadata"]["namespace"], obj["metadata"]["uid"]
    wanted = {(m["apiVersion"], m["kind"], m["metadata"]["name"]) for r in results for m in r.manifests}
    notes: list[Note] = []
    for api_version, kind in AUTOSCALERS:
        for child in ctx.cache.list(api_version, kind, ns):
            meta = child["metadata"]
            if (api_version, kind, meta["name"]) in wanted or not any(o.get("uid") == uid for o in meta.get("ownerReferences") or []):
                continue
            try:
                await ctx.kube.request("DELETE", path_for(api_version, kind, ns, meta["name"]))
            except ApiError as exc:
                if exc.status != 404:
                    raise
            ctx.cache.remove(child)
            log.info("Deleted %s, name=%s, namespace=%s", kind, meta["name"], ns)
            notes.append(Note("AutoscalerRemoved", f"Deleted {kind} {meta['name']}: `autoscaling` no longer asks for it"))
    return notes


async def ensure_token(ctx: Context, s: build.Serving) -> list[Note]:
    """The generated feedback token: created once (a random `secrets.token_urlsafe`), never rewritten."""
    if s.spec.feedback.token_secret_ref is not None:
        return []
    name = build.token_secret_name(s.name)
    if ctx.cache.get("v1", "Secret", s.namespace, name) is not None:
        return []
    manifest = build.token_secret(s, secrets.token_urlsafe(32))
    try:
        created = await ctx.kube.create(manifest)
    except ApiError as exc:
        if exc.status != 409:
            raise
        return []  # it exists (the cache had not seen it yet): never overwritten
    ctx.cache.put(created)
    log.info("Created Secret, name=%s, namespace=%s", name, s.namespace)
    return [Note("TokenCreated", f"Generated the feedback token Secret {name}")]


async def reconcile(obj: dict[str, Any], ctx: Context) -> Outcome:
    gen = generation(obj)
    try:
        spec = DeploymentSpec.model_validate(obj.get("spec") or {})
    except pydantic.ValidationError as exc:
        return Outcome(_blocked_status(obj, "InvalidSpec", first_error(exc)), [Note("InvalidSpec", first_error(exc), True)])
    ns = obj["metadata"]["namespace"]
    try:
        base = ctx.cache.get(API_VERSION, "BaseModel", ns, spec.base_model_ref.name)
        if base is None:
            raise Blocked("BaseModelNotFound", f"BaseModel {spec.base_model_ref.name!r} does not exist yet")
        if not _ready(base):
            raise Blocked("BaseModelNotReady", f"BaseModel {spec.base_model_ref.name!r} is not Ready")
    except Blocked as b:
        return Outcome(_blocked_status(obj, b.reason, b.message))
    desired, problems = resolve_adapters(spec, ctx.cache.list(API_VERSION, "Adapter", ns))
    image = spec.engine.image or ctx.config.server_image
    local = [r for r in build.regions(spec) if r.cluster_secret_ref is None]
    remote = [r for r in build.regions(spec) if r.cluster_secret_ref is not None]
    try:
        servings = [build.Serving(body=obj, spec=spec, base_model=base, region=r, image=image, adapters=tuple(desired.values())) for r in local]
        for s in servings:
            build.revision(s)  # every builder's validation, before anything is applied
    except ValueError as exc:
        message = str(exc)[:1024]
        return Outcome(_blocked_status(obj, "InvalidSpec", message), [Note("InvalidSpec", message, True)])

    now = now_of(ctx)
    notes: list[Note] = []
    if servings:
        notes += await ensure_token(ctx, servings[0])
    worlds = [observe_region(ctx, s) for s in servings]
    await read_pods(worlds)
    results: list[RegionResult] = []
    held_by: str | None = None
    for w in worlds:
        r = await reconcile_region(ctx, obj, spec, w, desired, now, held_by=held_by)
        if spec.strategy.region_order == "Sequential" and held_by is None and not rolled_out(r):
            held_by = r.name
        results.append(r)
    for r in results:
        notes += r.notes
        notes += await apply_all(ctx, r.manifests, reasons=QUIET_CHILDREN)
        if any(resource_of(m) == KEDA for m in r.manifests) and is_unserved(*KEDA):
            r.conditions.append(keda_missing())
    notes += await prune_autoscalers(ctx, obj, results)
    status = decide_status(obj, results, remote, problems)
    assert status["observedGeneration"] == gen
    return Outcome(status, notes, _min(*(r.requeue_after for r in results)))


def dependencies(obj: dict[str, Any]) -> list[Dependency]:
    """The BaseModel and the Adapters (by name, or their family) a Deployment serves."""
    try:
        spec = DeploymentSpec.model_validate(obj.get("spec") or {})
    except pydantic.ValidationError:
        return []
    ns = obj["metadata"]["namespace"]
    deps: list[Dependency] = [(API_VERSION, "BaseModel", ns, spec.base_model_ref.name)]
    for a in spec.adapters:
        if a.adapter_ref is not None:
            deps.append((API_VERSION, "Adapter", ns, a.adapter_ref.name))
        elif a.track is not None:
            deps.append((API_VERSION, "AdapterFamily", ns, a.track.family))
    return deps


def event_for(c: dict[str, Any]) -> str | None:
    """Events of a Deployment: every step of a rollout (the notes) and the conditions' transitions, except a
    Degraded that clears (the step that cleared it says so) and a first rollout on its way (not a problem)."""
    if c["type"] == CONDITION_DEGRADED:
        return "Warning" if c["status"] == "True" else None
    if c["type"] == CONDITION_READY and c["status"] == "False" and c.get("reason") == "FirstRolloutInProgress":
        return "Normal"
    return default_event_type(c)


CONTROLLER = Controller(KIND, "deployments", DeploymentStatus, reconcile, dependencies, event_for=event_for)
