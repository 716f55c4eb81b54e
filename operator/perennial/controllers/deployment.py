"""Deployment controller (the Perennial kind `Deployment`, serving; never an apps/v1 Deployment by that name).

observe (cache: the BaseModel, the Adapters named or tracked, per region the workloads of both colors: apps/v1
Deployments, or LeaderWorkerSets when `engine.pipelineParallelSize` > 1 (groups across nodes, ready as a whole;
blocked with `LeaderWorkerSetNotInstalled` where the cluster does not serve that CRD), the stable and preview
Services, the routes ConfigMap, the token Secret; the ready pods' sidecars over HTTP: which routes revision each
applied) → decide (pure: `rollout.decide_region` for the pods,
`rollout.decide_adapters` for served name -> Adapter, then the children's manifests and the typed status,
`decide_status`) → act (apply the children idempotently; the smoke test through the preview Service when a
decision asks for it, then decide again with its result) → `Outcome`, with `requeue_after` only where time is
the trigger (a delay or deadline, or pods still applying a routes document: sidecars cannot be watched). Steps of a
rollout that follow each other within STATUS_BATCH_SECONDS are written as one status, with one Event (`batched`).

The rollout's state is in the children (annotations, the stable Service's selector), so a restarted operator
resumes where the world stands. Regions in other clusters (`clusterSecretRef`) are not reconciled yet: they are
reported per region (`Pending`, with a message) and the Deployment is `Degraded`.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as _dt
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
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
from ..kube.aio import AsyncKube
from ..kube.cache import Cache
from ..kube.client import path_for
from ..kube.clusters import CHILD_KINDS, ClusterSecretError
from ..resources import conditions as cond
from ..resources import deployment as build
from ..resources import lws
from . import rollout
from .base import (
    API_VERSION,
    Context,
    Controller,
    Dependency,
    Note,
    Outcome,
    condition_notes,
    default_event_type,
    first_error,
    generation,
)
from .cached_specs import SpecCache
from .children import apply_all, is_unserved
from .manager import status_patch

log = logging.getLogger("perennial.controllers")

KIND = "Deployment"
#: Parsed specs of Perennial Deployments, once per object while its `spec` is the same (shared: never changed).
SPECS: SpecCache[DeploymentSpec] = SpecCache(DeploymentSpec)
#: The annotation the local runtime's Service proxy writes on a Service: where it is reachable on this machine.
LOCAL_URL_ANNOTATION = "perennial.ai/local-url"
#: While ready pods have not applied the routes document yet, look again this often (sidecars are not watchable).
ROUTES_POLL_SECONDS = 2.0
#: Limit of one sidecar's `GET /perennial/routes`.
SIDECAR_TIMEOUT_SECONDS = 2.0
#: How long a preview's smoke test waits, at least, for its ready pods to apply the routes document it asks about
#: (a cluster refreshes a ConfigMap volume up to about a minute after the change; the sidecar then reads the file
#: within seconds); the smoke test's own time limit when that is longer.
ROUTES_APPLY_SECONDS = 120.0
KEDA = ("keda.sh/v1alpha1", "ScaledObject")
LWS_NOT_INSTALLED = "LeaderWorkerSetNotInstalled"
LABEL_CONFLICT = "LabelConflict"
#: a Deployment blocked by another one's label value looks again this often (the other may be deleted or renamed)
LABEL_CONFLICT_POLL_SECONDS = 60.0
#: A color's workload across nodes (`engine.pipelineParallelSize` > 1), where LeaderWorkerSet is installed.
LWS = (lws.LWS_API, "LeaderWorkerSet")
#: The sidecar's admin port (`/perennial/routes`, `/metrics`), which no Service exposes (resources.deployment).
ADMIN_PORT_NAME = "admin"
#: Children whose creation is no Event of its own: the rollout decisions' notes say what was done and why.
QUIET_CHILDREN: dict[str | tuple[str, str], str | None] = {
    kind: None for kind in (("apps/v1", "Deployment"), LWS, ("v1", "Service"), ("v1", "ConfigMap"), ("policy/v1", "PodDisruptionBudget"),
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
    """Whether an Adapter passed a Deployment's promotion gate (its held-out evaluation against its baseline) and was
    not rolled back since (the learning loop's `Promoted` False/`RolledBack`: its live approval dropped)."""
    status = adapter.get("status") or {}
    promoted = cond.get(status.get("conditions"), "Promoted") or {}
    if promoted.get("status") == "False" and promoted.get("reason") == "RolledBack":
        return False
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


def _memo(ctx: Context, name: str) -> dict[Any, Any]:
    """A dict of this controller's, kept in `ctx.tasks` under one key (not a key per Deployment there: the smoke
    tests' bookkeeping scans those keys at every pass)."""
    return ctx.tasks.setdefault(("deployment-memo", name), {})


def revision_of(ctx: Context, s: build.Serving) -> str:
    """`build.revision(s)` (the pod template built, every builder's checks run, hashed), remembered per region while
    what the builders read is the same (equal, not rebuilt: a pass of a Deployment whose inputs did not change builds
    no template to hash). Raises the builders' ValueError as `build.revision` does."""
    memo = _memo(ctx, "revision")
    key = (s.namespace, s.name, s.region.name)
    # the generation too: `==` takes 1, 1.0 and true for one another in the parts of a spec kept as written (an
    # affinity), and the API server bumps the generation on such a change
    inputs = (s.body.get("spec"), s.body.get("metadata", {}).get("generation"), s.base_model, s.adapters, s.region, s.image,
              s.settings, s.owned)
    known = memo.get(key)
    if known is not None and known[0] == inputs:
        return known[1]
    revision = build.revision(s)
    memo[key] = (inputs, revision)
    return revision


def color_manifest(s: build.Serving, color: str, target: rollout.ColorTarget, desired_revision: str, *,
                   current: Mapping[str, Any] | None, autoscaled_active: bool) -> dict[str, Any] | None:
    """The manifest applied to one color's workload (an apps/v1 Deployment, or a LeaderWorkerSet across nodes:
    `lws.workload`): the whole object at the desired revision; only replicas and annotations for a color at another
    revision (its pod template belongs to an earlier spec and is never rebuilt from this one).
    Replicas are left out on the autoscaled active color (the autoscaler's)."""
    replicas: int | None = target.replicas
    if autoscaled_active and current is not None and int((current.get("spec") or {}).get("replicas", 1)) == target.replicas:
        replicas = None
    if target.revision == desired_revision:
        m = lws.workload(s, color, desired_revision, replicas)
    elif current is None:
        return None  # a color of another revision that does not exist: nothing to bring back
    else:
        api_version, kind = lws.workload_kind(s)
        m = {"apiVersion": api_version, "kind": kind,
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


#: `Where.call`'s status when the request never reached the pod (the other cluster's API server failed or refused it):
#: no verdict on the pod, ask again later.
INCONCLUSIVE = -1


@dataclass
class Http:
    """The operator's HTTP clients to serving pods and Services, one pair per operator (`http_clients`), closed when
    it stops: reads (`GET /perennial/routes`, which aiohttp retries once when a kept-alive connection turns out
    closed) reuse their connections; posts (a smoke test's chat completions, never retried) reuse the session but
    take a fresh connection each, so a connection a pod closed meanwhile never fails a smoke test."""

    reads: aiohttp.ClientSession
    posts: aiohttp.ClientSession

    def session(self, method: str) -> aiohttp.ClientSession:
        return self.reads if method in ("GET", "HEAD") else self.posts


_HTTP_KEY = ("http-clients",)


def http_clients(ctx: Context) -> Http:
    """The operator's `Http` (made on first use, in its event loop; the manager closes it at shutdown)."""
    clients: Http | None = ctx.tasks.get(_HTTP_KEY)
    if clients is None or clients.reads.closed or clients.posts.closed:
        clients = Http(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30)),
                       aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256, force_close=True)))
        ctx.tasks[_HTTP_KEY] = clients

        async def close(c: Http = clients) -> None:
            await c.reads.close()
            await c.posts.close()
        ctx.closers.append(close)
    return clients


@dataclass
class Where:
    """The cluster a region's children live in: its client and watch-fed cache, and how its Services and pods are
    reached over HTTP — directly in the operator's own cluster (pod IPs, the Services' DNS names or the local
    runtime's URLs), through that cluster's API server proxy (`services/proxy`, `pods/proxy`) in another one, where
    no pod network is shared."""

    kube: AsyncKube
    cache: Cache
    remote: bool = False
    #: the cluster Secret's name (remote regions)
    cluster: str | None = None
    #: the operator's pooled HTTP clients (pods and Services reached directly); None: a session per call
    http: Http | None = None

    async def call(self, method: str, *, service: Mapping[str, Any] | None = None, service_name: str | None = None,
                   pod: Mapping[str, Any] | None = None, port: int | str | None = None, namespace: str, path: str,
                   body: Any = None, headers: Mapping[str, str] | None = None, timeout: float) -> tuple[int, str]:
        """One HTTP request to a Service (by its object or name; port `http`) or a pod (`port`): (status, body text).
        Failures to connect are status 0 with the error as text."""
        headers = dict(headers or {})
        if self.remote:
            target = (f"services/{service_name}:{build.PORT_NAME}" if pod is None else f"pods/{pod['metadata']['name']}:{port}")
            try:
                text = await self.kube.request(method, f"/api/v1/namespaces/{namespace}/{target}/proxy{path}", body, raw=True,
                                               headers=headers, timeout=timeout)
                return 200, text
            except ApiError as exc:
                if exc.status == 0 or (isinstance(exc.body, dict) and exc.body.get("kind") == "Status"):
                    # the API server's own answer (429, 5xx, no endpoints yet), not the pod's: nothing was asked of it
                    return INCONCLUSIVE, f"the API server of cluster {self.cluster} answered {exc.status or 'nothing'}: {exc}"[:300]
                return exc.status, json.dumps(exc.body)[:2048]
        if pod is None:
            url = service_url(service, service_name or "", namespace) + path
        else:
            url = f"http://{(pod.get('status') or {}).get('podIP')}:{port}{path}"
        try:
            if self.http is None:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session, \
                        session.request(method, url, json=body, headers=headers) as resp:
                    return resp.status, await resp.text()
            async with self.http.session(method).request(method, url, json=body, headers=headers,
                                                         timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                return resp.status, await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return 0, f"{url} did not answer: {type(exc).__name__}: {exc}"[:300]


@dataclass
class RegionWorld:
    serving: build.Serving
    colors: dict[str, dict[str, Any] | None]
    stable: dict[str, Any] | None
    preview: dict[str, Any] | None
    routes: dict[str, Any] | None
    pods: list[dict[str, Any]] = field(default_factory=list)
    pod_routes: tuple[rollout.PodRoutes, ...] = ()
    where: Where | None = None

    @property
    def stable_color(self) -> str | None:
        color = ((self.stable or {}).get("spec") or {}).get("selector", {}).get(build.LABEL_COLOR)
        return color if color in build.COLORS else None


def color_selector(colors: Mapping[str, Mapping[str, Any] | None], s: build.Serving, color: str) -> dict[str, str]:
    """The labels that select a color's pods: its apps/v1 Deployment's own (immutable) selector where it exists, else
    the one built from the spec. They differ when the region's name changed (naming the `default` region, a rename):
    its pods keep the old label until that color is rolled, so the Services and the PDB must select them by it."""
    actual = ((((colors.get(color) or {}).get("spec") or {}).get("selector") or {}).get("matchLabels"))
    return dict(actual) if isinstance(actual, dict) and actual else build.selector(s, color)


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
    """The sidecar's port that answers `/perennial/routes`: its admin port (no Service exposes it), else (pods of
    an earlier template) its client port."""
    ports = {p.get("name"): int(p["containerPort"]) for c in (pod.get("spec") or {}).get("containers") or []
             for p in c.get("ports") or [] if p.get("containerPort")}
    return ports.get(ADMIN_PORT_NAME) or ports.get(build.PORT_NAME) or build.SIDECAR_PORT


async def pod_routes(where: Where, pod: Mapping[str, Any]) -> rollout.PodRoutes:
    """What one pod's sidecar applied (`GET /perennial/routes`); not ready (or unreadable): revision None."""
    name = pod["metadata"]["name"]
    ip = (pod.get("status") or {}).get("podIP")
    if not pod_ready(pod) or not ip:
        return rollout.PodRoutes(name, False, None)
    status, text = await where.call("GET", pod=pod, port=sidecar_port(pod), namespace=pod["metadata"]["namespace"],
                                    path="/perennial/routes", timeout=SIDECAR_TIMEOUT_SECONDS)
    try:
        body = json.loads(text) if status == 200 else None
    except ValueError:
        body = None
    if body is None:
        log.debug("Could not read the routes of pod=%s: %s %s", name, status, text[:200])
        return rollout.PodRoutes(name, True, None)
    errors = body.get("errors") if isinstance(body, dict) and isinstance(body.get("errors"), dict) else {}
    revision = body.get("revision") if isinstance(body, dict) else None
    pending = body.get("pending") if isinstance(body, dict) else None
    return rollout.PodRoutes(name, True, revision if isinstance(revision, str) else None, {str(k)[:253]: str(v)[:512] for k, v in list(errors.items())[:64]},
                             pending if isinstance(pending, str) else None)


def observe_region(where: Where, s: build.Serving) -> RegionWorld:
    ns, prefix = s.namespace, s.prefix
    cache = where.cache
    world = RegionWorld(
        where=where,
        serving=s,
        # one kind per Deployment: the API refuses a change of pipelineParallelSize between 1 and more
        colors={c: cache.get(*lws.workload_kind(s), ns, build.deployment_name(prefix, c)) for c in build.COLORS},
        stable=cache.get("v1", "Service", ns, build.stable_service_name(prefix)),
        preview=cache.get("v1", "Service", ns, build.preview_service_name(prefix)),
        routes=cache.get("v1", "ConfigMap", ns, build.routes_config_map_name(prefix)),
    )
    if world.stable_color:
        world.pods = cache.list("v1", "Pod", ns, labels=color_selector(world.colors, s, world.stable_color))
    return world


async def read_pods(worlds: list[RegionWorld]) -> None:
    pods = [(w, p) for w in worlds for p in w.pods]
    if not pods:
        return
    results = await asyncio.gather(*(pod_routes(w.where, p) for w, p in pods))  # type: ignore[arg-type]
    for w in worlds:
        w.pod_routes = tuple(r for (ww, _), r in zip(pods, results) if ww is w)


# ----------------------------------------------------------------------------- smoke test


def service_url(svc: Mapping[str, Any] | None, name: str, namespace: str) -> str:
    """Where a Service answers: the local runtime's URL when it reports one, else its cluster DNS name."""
    local = ((svc or {}).get("metadata") or {}).get("annotations", {}).get(LOCAL_URL_ANNOTATION)
    return local.rstrip("/") if local else f"http://{name}.{namespace}.svc.cluster.local"


#: The header the sidecar also reads the operator's token from: the API server's proxy (other clusters) consumes
#: the Authorization header itself.
TOKEN_HEADER = "X-Perennial-Token"
Post = Callable[[dict[str, Any]], Awaitable[tuple[int, str]]]


async def smoke_test(target: str | Post, names: Iterable[str], *, prompt: str, expect_regex: str | None, max_tokens: int,
                     timeout: float, headers: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """Every model name answers a chat completion (non-empty, matching `expect_regex`) at `target`: a base URL, or a
    function posting one request body to a Service's `/v1/chat/completions` -> (status, text). (passed, why not)."""
    pattern = re.compile(expect_regex) if expect_regex else None

    async def by_url(body: dict[str, Any]) -> tuple[int, str]:
        assert isinstance(target, str)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session, \
                    session.post(f"{target}/v1/chat/completions", json=body, headers=dict(headers or {})) as resp:
                return resp.status, await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return 0, f"{target} did not answer: {type(exc).__name__}: {exc}"[:300]

    post = by_url if isinstance(target, str) else target
    for name in names:
        body = {"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
        status, text = await post(body)
        if status == INCONCLUSIVE:
            raise SmokeInconclusive(text)
        if status == 0:
            return False, text[:300]
        if status != 200:
            return False, f"{name}: HTTP {status}: {text[:200]}"
        try:
            answer = json.loads(text)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            return False, f"{name}: not a chat completion: {text[:200]}"
        if not answer.strip():
            return False, f"{name}: empty answer"
        if pattern is not None and not pattern.search(answer):
            return False, f"{name}: answer {answer[:120]!r} does not match {expect_regex!r}"
    return True, ""


#: How long a reconcile waits for a smoke test before it lets the worker go (the test goes on; its end wakes the
#: Deployment): a fast engine's smoke test is decided in the same pass, a slow one never holds a worker for long.
SMOKE_INLINE_SECONDS = 2.0
#: After a smoke test that could not reach the pods (another cluster's API server failing), wait this long.
SMOKE_RETRY_SECONDS = 5.0


class SmokeInconclusive(Exception):
    """The smoke test could not ask the pods (the other cluster's API server failed): no verdict, it runs again."""


async def smoke_in_background(ctx: Context, key: tuple[Any, ...], owner: tuple[str, str],
                              run: Callable[[], Awaitable[tuple[bool, str]]]) -> tuple[bool, str] | None:
    """The result of the smoke test `key`, started now if it is not running: None while it runs (it goes on after
    this returns, and wakes `owner` when it ends), else (passed, why) — handed out once."""
    task = ctx.tasks.get(key)
    if isinstance(task, float):  # inconclusive a moment ago: not asked again before then
        if time.monotonic() < task:
            return None
        task = None
    if task is None:
        task = ctx.tasks[key] = asyncio.ensure_future(run())
        if ctx.wake is not None:
            wake = ctx.wake
            task.add_done_callback(lambda _t: wake(KIND, {owner}))
    if not task.done():
        await asyncio.wait({task}, timeout=SMOKE_INLINE_SECONDS)
        if not task.done():
            return None
    del ctx.tasks[key]
    if task.cancelled():
        return None
    if isinstance(exc := task.exception(), SmokeInconclusive):
        log.info("The smoke test could not reach the pods; it runs again in %.0f s, key=%s, reason=%s", SMOKE_RETRY_SECONDS, key, exc)
        ctx.tasks[key] = time.monotonic() + SMOKE_RETRY_SECONDS
        return None
    if exc is not None:
        return False, f"the smoke test failed to run: {type(exc).__name__}: {exc}"[:300]
    return task.result()


def forget_smoke_tests(ctx: Context, owner: tuple[str, str], keep: set[tuple[Any, ...]] | None = None,
                       regions: set[str] | None = None) -> None:
    """Cancel the smoke tests of `owner` (of `regions`, else all) no decision asks for any more (`keep`): its spec
    moved on, or it is gone."""
    for key in [k for k in ctx.tasks if isinstance(k, tuple) and k[:2] == ("smoke", owner)
                and k not in (keep or ()) and (regions is None or k[2] in regions)]:
        task = ctx.tasks.pop(key)
        if isinstance(task, asyncio.Future):
            task.cancel()


async def routes_applied(w: RegionWorld, color: str, revision: str, budget: float) -> str | None:
    """Wait until every ready pod of `color` reports the routes document `revision` applied: None once they do (or
    when no pod of it is listed: nothing to wait for), else after `budget` seconds why not. A smoke test asks the
    pods for the names of that document; asked before their sidecars read it, a new name is a 404 that no rollout
    should abort for."""
    assert w.where is not None
    where, s = w.where, w.serving
    deadline = time.monotonic() + budget
    while True:
        pods = [p for p in where.cache.list("v1", "Pod", s.namespace, labels=color_selector(w.colors, s, color)) if pod_ready(p)]
        reports = await asyncio.gather(*(pod_routes(where, p) for p in pods))
        lagging = [r for r in reports if r.revision != revision]
        if not lagging:
            return None
        if time.monotonic() >= deadline:
            r = lagging[0]
            errors = "; ".join(f"{k}: {v}" for k, v in list(r.errors.items())[:3])
            return (f"{len(lagging)} of {len(reports)} ready pods of {color} did not apply routes revision {revision} within "
                    f"{budget:g}s (pod {r.name} reports {r.revision or 'none'}{': ' + errors if errors else ''})")[:300]
        await asyncio.sleep(ROUTES_POLL_SECONDS)


def smoke_target(w: RegionWorld, service: Mapping[str, Any] | None, service_name: str, token: str | None, timeout: float) -> Post:
    """Posting to a region's Service (stable or preview) wherever it is, with the operator's token (preview names
    answer only with it)."""
    assert w.where is not None
    headers = {TOKEN_HEADER: token, "Authorization": f"Bearer {token}"} if token else {}

    async def post(body: dict[str, Any]) -> tuple[int, str]:
        assert w.where is not None
        return await w.where.call("POST", service=service, service_name=service_name, namespace=w.serving.namespace,
                                  path="/v1/chat/completions", body=body, headers=headers, timeout=timeout)
    return post


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
    where: Where | None = None
    serving: build.Serving | None = None

    @property
    def cluster(self) -> str | None:
        return self.where.cluster if self.where is not None else None


@dataclass
class Unavailable:
    """A region nothing can be done in this pass (its cluster unreachable, its Secret missing or unusable)."""

    name: str
    rollout: rollout.RegionRollout
    conditions: list[rollout.ConditionPart]
    cluster: str | None = None


def region_status(r: RegionResult) -> dict[str, Any]:
    """One `RegionStatus` (API field names) of a region's result."""
    st = r.rollout
    region = {
        "name": r.name, "phase": st.phase, "activeColor": st.active_color, "revision": st.revision,
        "previewColor": st.preview_color, "previewRevision": st.preview_revision, "pendingPromotion": st.pending_promotion,
        "routesRevision": r.routes_revision, "readyReplicas": st.ready_replicas, "desiredReplicas": st.desired_replicas,
        "endpoint": r.endpoint, "message": st.message[:1024] or None, "cluster": r.cluster,
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
                           desired: dict[str, Mapping[str, Any]], now: _dt.datetime, *, held_by: str | None = None,
                           token: str | None = None, smoke_keys: set[tuple[Any, ...]] | None = None) -> RegionResult:
    """One region's pass. `held_by`: an earlier region still rolling out (`regionOrder: Sequential`): this one does not
    start its pod rollout until that one is done (a rollout already started here goes on)."""
    s = w.serving
    bg = spec.strategy.blue_green
    ns = s.namespace
    smoke_keys = smoke_keys if smoke_keys is not None else set()
    promote = (obj["metadata"].get("annotations") or {}).get(PROMOTE_ANNOTATION)
    autoscaled = spec.autoscaling.enabled
    region_replicas = s.region.replicas if s.region.replicas is not None else spec.replicas
    desired_replicas = spec.autoscaling.min_replicas if autoscaled else region_replicas
    revision = revision_of(ctx, s)
    hold = held_by is not None and not spec.paused and w.stable_color is not None and not started(w, revision)
    paused = spec.paused or hold

    # Pods: blue-green of the pod revision.
    colors = {c: (rollout.ColorState.from_object(o) if o is not None else None) for c, o in w.colors.items()}
    observed = rollout.RegionObserved(blue=colors["blue"], green=colors["green"], stable_color=w.stable_color,  # type: ignore[arg-type]
                                      desired_revision=revision, desired_replicas=desired_replicas, autoscaled=autoscaled,
                                      stable_annotations=dict(((w.stable or {}).get("metadata") or {}).get("annotations") or {}))
    pods = rollout.decide_region(observed, bg, paused=paused, promote=promote, now=now)
    owner = (ns, s.name)
    if pods.smoke is not None and pods.smoke.color is not None:
        doc = routes_document(w.routes) or {}
        names = [s.served_base_name] + sorted(k for k in doc.get("routes", {}) if not k.endswith(rollout.PREVIEW_SUFFIX))
        post = smoke_target(w, w.preview, build.preview_service_name(s.prefix), token, pods.smoke.timeout_seconds)
        # one test per routes revision too: a document changed meanwhile is asked about anew (the old test is cancelled)
        key = ("smoke", owner, s.region.name, "pods", pods.smoke.color, pods.smoke.revision, doc.get("revision"))
        smoke_keys.add(key)
        color, routes_revision, timeout = pods.smoke.color, doc.get("revision"), pods.smoke.timeout_seconds

        async def run() -> tuple[bool, str]:
            if isinstance(routes_revision, str):
                lag = await routes_applied(w, color, routes_revision, max(float(timeout), ROUTES_APPLY_SECONDS))
                if lag is not None:
                    return False, lag
            return await smoke_test(post, names, prompt=bg.smoke_test.prompt, expect_regex=bg.smoke_test.expect_regex,
                                    max_tokens=bg.smoke_test.max_tokens, timeout=timeout)

        verdict = await smoke_in_background(ctx, key, owner, run)
        if verdict is not None:
            passed, why = verdict
            log.info("Ran the smoke test, deployment=%s, namespace=%s, revision=%s, passed=%s%s", s.name, ns, pods.smoke.revision, passed,
                     "" if passed else f", why={why}")
            observed = rollout.RegionObserved(**{**observed.__dict__, "smoke_result": rollout.SmokeResult(pods.smoke.revision, passed, why)})
            pods = rollout.decide_region(observed, bg, paused=paused, promote=promote, now=now)
    if hold and pods.status.phase == "Paused":
        wait = f"Waiting for region {held_by} to finish its rollout before revision {revision} starts here (regionOrder Sequential)"
        pods.status = replace(pods.status, message=wait)
        pods.conditions = [rollout.ConditionPart(CONDITION_PROGRESSING, "Unknown", "WaitingForRegion", wait) if c.type == CONDITION_PROGRESSING
                           else c for c in pods.conditions]

    if pods.stable_color is not None and pods.stable_color != w.stable_color and w.where is not None:
        # The stable Service selects another color from this pass on (a switch, the first traffic): the pods that
        # serve are that color's, so what they applied is read now (else the status changes one write later).
        w.pods = w.where.cache.list("v1", "Pod", ns, labels=color_selector(w.colors, s, pods.stable_color))
        w.pod_routes = ()
        await read_pods([w])

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
        post = smoke_target(w, w.stable, build.stable_service_name(s.prefix), token, adapters.smoke.timeout_seconds)
        smoke = adapters.smoke
        key = ("smoke", owner, s.region.name, "adapters", smoke.revision, smoke.model_names)
        smoke_keys.add(key)
        verdict = await smoke_in_background(ctx, key, owner, lambda: smoke_test(
            post, smoke.model_names, prompt=bg.smoke_test.prompt, expect_regex=bg.smoke_test.expect_regex,
            max_tokens=bg.smoke_test.max_tokens, timeout=smoke.timeout_seconds))
        if verdict is not None:
            passed, why = verdict
            aobs = rollout.AdaptersObserved(**{**aobs.__dict__, "smoke_result": rollout.SmokeResult(smoke.revision, passed, why)})
            adapters = rollout.decide_adapters(aobs, bg, spec.strategy.adapter_rollout, paused=spec.paused, promote=promote, now=now)

    # Children: routes first (the pods mount them), then the colors, Services, PDBs, the autoscaler.
    manifests: list[dict[str, Any]] = [routes_manifest(s, adapters)]
    notes: list[Note] = []
    for c, target in pods.colors.items():
        m = color_manifest(s, c, target, revision, current=w.colors[c],
                           autoscaled_active=autoscaled and c == pods.stable_color)
        current = w.colors[c]
        if m is not None and current is not None and target.revision == revision and c not in (pods.stable_color, w.stable_color) \
                and color_selector(w.colors, s, c) != build.selector(s, c):
            # a color that serves nothing, to be brought to a revision whose pods' labels its immutable selector
            # cannot select (the region was renamed): created anew (its deletion wakes the next pass)
            assert w.where is not None
            await _delete(w.where.kube, w.where.cache, current)
            notes.append(Note("ColorRecreated", f"Deleted {current['metadata']['name']} to create it anew: its selector "
                                                f"names region {current['spec']['selector']['matchLabels'].get(build.LABEL_REGION)!r}"))
            continue
        if m is not None:
            manifests.append(m)
            pdb = lws.pdb(s, c)
            if lws.group_size(s) == 1:
                pdb["spec"]["selector"]["matchLabels"] = color_selector(w.colors, s, c)
            manifests.append(pdb)
    if pods.preview_color is not None:
        svc = build.preview_service(s, pods.preview_color)
        svc["spec"]["selector"] = color_selector(w.colors, s, pods.preview_color)
        manifests.append(svc)
    if pods.stable_color is not None:
        svc = build.stable_service(s, pods.stable_color)
        svc["spec"]["selector"] = color_selector(w.colors, s, pods.stable_color)
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
        notes=list(pods.notes) + list(adapters.notes) + notes,
        requeue_after=_min(pods.requeue_after, adapters.requeue_after, ROUTES_POLL_SECONDS if waiting_pods else None),
        served=served_now(adapters.served, w.pod_routes, adapters.routes.get("revision"), (obj.get("status") or {}).get("servedAdapters")),
        selector=",".join(f"{k}={v}" for k, v in color_selector(w.colors, s, st.active_color).items()) if st.active_color else None,
        routes_revision=applied, endpoint=endpoint, where=w.where, serving=s,
    )


def served_now(desired: list[rollout.ServedRoute], pods: Iterable[rollout.PodRoutes], revision: str | None,
               reported: Any) -> list[rollout.ServedRoute]:
    """What the status says is served: the routes document's served names once every ready pod that reports applied
    it; before that (a pod still on an earlier document, e.g. loading a new served name's adapter) what was reported
    before, so a client that waits for the status never asks for a name no pod serves yet. With no pod reporting
    (none ready yet, or sidecars that cannot be read) the document's."""
    reporting = [p for p in pods if p.ready and p.revision is not None]
    if not reporting or all(p.revision == revision for p in reporting):
        return desired
    out = []
    for r in reported if isinstance(reported, list) else []:
        if isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("adapter"), str):
            weight = r.get("canaryWeight")
            out.append(rollout.ServedRoute(r["name"], r["adapter"], r.get("canaryAdapter") if isinstance(r.get("canaryAdapter"), str) else None,
                                           weight if isinstance(weight, int) else None))
    return out


UNSUPPORTED_REGION = "regions in other clusters (`clusterSecretRef`) are not reconciled by this operator (it runs without remote-cluster support)"


def unsupported_region(region: Region) -> Unavailable:
    text = f"Region {region.name}: {UNSUPPORTED_REGION}"
    return Unavailable(region.name, rollout.RegionRollout(phase="Pending", active_color=None, revision=None, ready_replicas=0,
                                                          desired_replicas=0, message=text),
                       [rollout.ConditionPart(CONDITION_READY, "False", "RegionUnsupported", text),
                        rollout.ConditionPart(CONDITION_DEGRADED, "True", "RegionUnsupported", text)])


def unreachable(region: str, cluster: str | None, message: str, reason: str = "RegionUnreachable") -> Unavailable:
    """A region whose cluster cannot be worked in now: `RegionUnreachable` (its API server does not answer) or the
    reason its Secret gives no client (`ClusterSecretNotFound`, `ClusterSecretInvalid`, `ClusterAuthUnsupported`)."""
    st, conds = rollout.unreachable_region(region, message)
    if reason != "RegionUnreachable":
        text = f"Region {region}: {message}"[:1024]
        st = replace(st, phase="Degraded", message=text)
        conds = [replace(c, reason=reason, message=text) for c in conds]
    return Unavailable(region, st, conds, cluster)


def decide_status(obj: dict[str, Any], results: list[RegionResult], unavailable: list[Unavailable], problems: list[str],
                  removing: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The typed status of the whole Deployment from its regions' results (pure): the regions' phases and
    conditions combined (`rollout.summarize`: a region that does not serve is named), the first region's active
    color, revision, endpoint and served adapters, every region's own state. `removing`: regions taken out of the
    spec whose children in another cluster are still being deleted (kept in status until they are gone)."""
    gen = generation(obj)
    regions = [(r.name, r.rollout, rollout.combine_conditions([(None, c) for c in r.conditions])) for r in results]
    regions += [(u.name, u.rollout, u.conditions) for u in unavailable]
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
            {k: v for k, v in (("name", u.name), ("phase", u.rollout.phase), ("message", u.rollout.message), ("readyReplicas", 0),
                               ("desiredReplicas", 0), ("cluster", u.cluster)) if v is not None}
            for u in unavailable] + list(removing or []),
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


def _blocked_status(obj: dict[str, Any], reason: str, message: str, *, serving_gone: bool = False) -> dict[str, Any]:
    """Nothing can be rolled out (an invalid spec, a BaseModel missing or not Ready): the children are left as they
    are; what served keeps serving, so a `Ready=True` stays (Degraded says why nothing moves), else Ready is False.
    `serving_gone`: what served is gone with the cause (LeaderWorkerSet's CRD removed took its groups): Ready is
    False, and Degraded True where something had served (an active color)."""
    gen = generation(obj)
    old = (obj.get("status") or {}).get("conditions")
    conds = old
    had = bool((obj.get("status") or {}).get("activeColor"))
    serving = not serving_gone and cond.is_true(old, CONDITION_READY) and had
    degraded = serving or (serving_gone and had)
    if not serving:
        conds = cond.set_condition(conds, CONDITION_READY, False, reason, message, gen)
    else:
        ready = cond.get(old, CONDITION_READY) or {}
        conds = cond.set_condition(conds, CONDITION_READY, True, ready.get("reason") or "Serving", ready.get("message") or "", gen)
    conds = cond.set_condition(conds, CONDITION_PROGRESSING, "Unknown", reason, message, gen)
    conds = cond.set_condition(conds, CONDITION_DEGRADED, True if degraded else "Unknown", reason, message, gen)
    keep = {k: v for k, v in (obj.get("status") or {}).items() if k not in ("conditions", "observedGeneration", "phase")}
    return {**keep, "observedGeneration": gen, "conditions": conds, "phase": "Degraded" if degraded else "Pending"}


AUTOSCALERS = (("autoscaling/v2", "HorizontalPodAutoscaler"), KEDA)
#: The kinds of a region's children that are pruned when no region wants them any more (a region renamed or
#: removed, two node-pool regions become one): never the token Secret (the Deployment's, not a region's).
PRUNED_KINDS = (("apps/v1", "Deployment"), LWS, ("v1", "Service"), ("policy/v1", "PodDisruptionBudget"), ("v1", "ConfigMap"),
                ("networking.k8s.io/v1", "NetworkPolicy")) + AUTOSCALERS
#: Children of regions in other clusters carry no ownerReference (none crosses clusters): this finalizer keeps the
#: Deployment until they are deleted. Distinct from the finalizer earlier operators left (released on sight).
REMOTE_FINALIZER = "perennial.ai/remote-children"
#: While a child's name is taken by someone else's object (not watched: it bears no label of ours), look again this often.
CONFLICT_POLL_SECONDS = 10.0
#: While a cluster's children are being deleted (or it cannot be reached), look again this often.
CLEANUP_POLL_SECONDS = 5.0
UNAVAILABLE_POLL_SECONDS = 30.0
#: While a just connected cluster is being listed (its first success wakes the Deployment; this is a safety net).
CONNECT_POLL_SECONDS = 2.0


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(o.get("uid") == uid for o in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _labelled_for(obj: Mapping[str, Any], name: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels.get(build.LABEL_DEPLOYMENT) == build.label_value(name) and labels.get(build.LABEL_MANAGED_BY) == build.MANAGED_BY


def expected_children(s: build.Serving) -> set[tuple[str, str, str]]:
    """Every child name a region may have, whatever its rollout's state: both colors and their PDBs, both Services,
    the routes, the autoscaler, the NetworkPolicy."""
    p = s.prefix
    names = {(*lws.workload_kind(s), build.deployment_name(p, c)) for c in build.COLORS}
    names |= {("policy/v1", "PodDisruptionBudget", build.pdb_name(p, c)) for c in build.COLORS}
    names |= {("v1", "Service", build.stable_service_name(p)), ("v1", "Service", build.preview_service_name(p)),
              ("v1", "ConfigMap", build.routes_config_map_name(p)), ("networking.k8s.io/v1", "NetworkPolicy", build.network_policy_name(p))}
    return names | {(a, k, build.autoscaler_name(p)) for a, k in AUTOSCALERS}


async def _delete(kube: AsyncKube, cache: Cache, child: Mapping[str, Any]) -> None:
    meta = child["metadata"]
    body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background",
            **({"preconditions": {"uid": meta["uid"]}} if meta.get("uid") else {})}
    try:
        await kube.request("DELETE", path_for(child["apiVersion"], child["kind"], meta.get("namespace"), meta["name"]), body)
    except ApiError as exc:
        if exc.status not in (404, 409):  # gone, or another object of that name now (not this one to delete)
            raise
    cache.remove(dict(child))
    log.info("Deleted %s, name=%s, namespace=%s", child["kind"], meta["name"], meta.get("namespace"))


async def prune(ctx: Context, obj: Mapping[str, Any], results: list[RegionResult], *, none_here: bool = False) -> list[Note]:
    """Delete what no region wants any more, in each cluster worked in. Autoscalers at once (autoscaling turned off,
    the provider changed: one left behind would keep resizing the active color); the other children of a region
    that was renamed or removed (two node-pool regions become one: the names lose their region infix) only once
    every region of that cluster serves again, so traffic that reached them is never cut before its replacement
    is up. In the operator's own cluster children are found by ownerReference, in others by their labels.
    `none_here`: no region is in the operator's own cluster any more (every region is elsewhere and was worked in this
    pass): its children there go too, once every region serves."""
    ns, uid, name = obj["metadata"]["namespace"], obj["metadata"]["uid"], obj["metadata"]["name"]
    notes: list[Note] = []
    by_cluster: dict[str | None, list[RegionResult]] = {}
    for r in results:
        by_cluster.setdefault(r.cluster, []).append(r)
    if none_here and results and None not in by_cluster:
        by_cluster[None] = []  # the Deployment moved out of this cluster: nothing of it is wanted here
    for cluster, rs in by_cluster.items():
        where = rs[0].where if rs else Where(ctx.kube, ctx.cache, http=http_clients(ctx))
        assert where is not None
        wanted = {(m["apiVersion"], m["kind"], m["metadata"]["name"]) for r in rs for m in r.manifests}
        possible = set().union(*(expected_children(r.serving) for r in rs)) if all(r.serving is not None for r in rs) else None
        serving = all(rolled_out(r) for r in (rs or results))
        for api_version, kind in PRUNED_KINDS:
            if is_unserved(api_version, kind, cluster=where.kube.name):
                continue
            # from the cache's owner and label indexes: a scan of every child of the namespace made each reconcile
            # cost more with every other Deployment (quadratic)
            mine = ([c for c in where.cache.owned_by(api_version, kind, uid) if c["metadata"].get("namespace") == ns] if cluster is None
                    else where.cache.list(api_version, kind, ns, labels={build.LABEL_DEPLOYMENT: build.label_value(name)}))
            for child in sorted(mine, key=lambda c: c["metadata"]["name"]):
                key = (api_version, kind, child["metadata"]["name"])
                if key in wanted or not (_owned_by(child, uid) if cluster is None else _labelled_for(child, name)):
                    continue
                if (api_version, kind) in AUTOSCALERS:
                    await _delete(where.kube, where.cache, child)
                    notes.append(Note("AutoscalerRemoved", f"Deleted {kind} {key[2]}: `autoscaling` no longer asks for it"))
                elif possible is not None and key not in possible and serving:
                    await _delete(where.kube, where.cache, child)
                    notes.append(Note("ChildRemoved", f"Deleted {kind} {key[2]}{f' in cluster {cluster}' if cluster else ''}: no region has it any more"))
    return notes


async def ensure_token(ctx: Context, s: build.Serving) -> list[Note]:
    """The generated feedback token: created once (a random `secrets.token_urlsafe`), never rewritten."""
    if s.spec.feedback.token_secret_ref is not None:
        return []
    name = build.token_secret_name(s.name)
    if ctx.cache.get("v1", "Secret", s.namespace, name) is not None:
        return []
    manifest = build.token_secret(replace(s, owned=True), secrets.token_urlsafe(32))
    try:
        created = await ctx.kube.create(manifest)
    except ApiError as exc:
        if exc.status != 409:
            raise
        return []  # it exists (the cache had not seen it yet): never overwritten
    ctx.cache.put(created)
    log.info("Created Secret, name=%s, namespace=%s", name, s.namespace)
    return [Note("TokenCreated", f"Generated the feedback token Secret {name}")]


def feedback_token(ctx: Context, namespace: str, spec: DeploymentSpec, name: str) -> str | None:
    """The feedback token's value (the user's `tokenSecretRef`, else the generated one), from the cache."""
    ref = spec.feedback.token_secret_ref
    secret, key = (ref.name, ref.key) if ref else (build.token_secret_name(name), build.TOKEN_KEY)
    raw = ((ctx.cache.get("v1", "Secret", namespace, secret) or {}).get("data") or {}).get(key)
    if not raw:
        return None
    try:
        return base64.b64decode(raw).decode().strip() or None
    except (ValueError, UnicodeDecodeError):
        return None


def remote_secrets(spec: DeploymentSpec | None, status: Mapping[str, Any] | None) -> set[str]:
    """The cluster Secrets a Deployment's children may live behind: its remote regions' and, from its status, those
    of regions taken out of the spec whose children are still there."""
    names = {r.cluster_secret_ref.name for r in (build.regions(spec) if spec else []) if r.cluster_secret_ref is not None}
    return names | {r["cluster"] for r in (status or {}).get("regions") or [] if isinstance(r, dict) and r.get("cluster")}


async def _ensure_finalizer(ctx: Context, obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    finalizers = list(meta.get("finalizers") or [])
    if REMOTE_FINALIZER in finalizers:
        return obj
    written = await ctx.kube.patch(API_VERSION, KIND, meta["namespace"], meta["name"],
                                   {"metadata": {"finalizers": finalizers + [REMOTE_FINALIZER], "resourceVersion": meta.get("resourceVersion")}})
    ctx.cache.put(written)
    log.info("Added the finalizer, deployment=%s, namespace=%s, finalizer=%s", meta["name"], meta["namespace"], REMOTE_FINALIZER)
    return written


async def _drop_finalizer(ctx: Context, obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    finalizers = list(meta.get("finalizers") or [])
    if REMOTE_FINALIZER not in finalizers:
        return obj
    rest = [f for f in finalizers if f != REMOTE_FINALIZER]
    written = await ctx.kube.patch(API_VERSION, KIND, meta["namespace"], meta["name"],
                                   {"metadata": {"finalizers": rest or None, "resourceVersion": meta.get("resourceVersion")}})
    ctx.cache.put(written)
    return written


async def connect(ctx: Context, obj: Mapping[str, Any], secret_names: set[str]) -> dict[str, Any]:
    """The clusters behind `secret_names` for this Deployment (`Clusters.sync_owner`): Secret name ->
    `RemoteCluster` or the `ClusterSecretError` that keeps it from one."""
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    return await ctx.remote.sync_owner((ns, name), {sec: ctx.cache.get("v1", "Secret", ns, sec) for sec in sorted(secret_names)})


def outage(error: Any) -> str:
    """An error of an unreachable cluster as its status says it: the same text for every request of one outage, so
    that the status is not written again each pass (which watch failed last, or which request of a pass failed, and
    an object's address vary; the cause does not)."""
    text = f"{error.status or ''} {error.message}".strip() if isinstance(error, ApiError) else str(error or "no answer")
    text = re.sub(r"^[A-Z]+ /\S*: ", "", text)  # an ApiError's text: "<METHOD> <path>: <status> <message>"
    text = re.sub(r"^0 ", "", text)  # status 0: no HTTP answer at all
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)[:300] or "no answer"


def cluster_problem(region: str, secret: str, conn: Any) -> Unavailable | None:
    """Why nothing can be done in a region's cluster now, or None when it can be worked in."""
    if isinstance(conn, ClusterSecretError):
        return unreachable(region, secret, conn.message, conn.reason)
    reach = conn.reachability()
    if reach.reachable is False:
        return unreachable(region, secret, f"cluster Secret {secret}, server {conn.server}: {outage(reach.last_error)}")
    if not conn.synced:
        return unreachable(region, secret, f"connecting to cluster Secret {secret}, server {conn.server}")
    return None


def claimed_remote(servings: Iterable[build.Serving]) -> dict[str, set[tuple[str, str, str]]]:
    """Per cluster Secret, the children's names a region of the spec has there: a region renamed in the same cluster
    keeps them (no infix there), and what it serves with must not go with the old name."""
    out: dict[str, set[tuple[str, str, str]]] = {}
    for s in servings:
        if s.region.cluster_secret_ref is not None:
            out.setdefault(s.region.cluster_secret_ref.name, set()).update(
                expected_children(s) | {("v1", "Secret", build.token_secret_name(s.name))})
    return out


async def remove_regions(obj: Mapping[str, Any], conns: Mapping[str, Any], gone: list[dict[str, Any]],
                         claimed: Mapping[str, set[tuple[str, str, str]]] | None = None) -> tuple[list[dict[str, Any]], list[Note]]:
    """Regions taken out of the spec (their status entries, with the cluster): their children there are deleted, but
    those whose names a region of the spec has in that cluster (`claimed`: a rename; that region's rollout brings them
    about). Returns the entries still being removed (children not gone yet, or their cluster not reachable)."""
    name = obj["metadata"]["name"]
    left: list[dict[str, Any]] = []
    notes: list[Note] = []
    for entry in gone:
        conn = conns.get(entry["cluster"])
        if isinstance(conn, ClusterSecretError):
            log.warning("Left the children of a removed region behind: its cluster Secret gives no client, deployment=%s, region=%s, error=%s",
                        name, entry["name"], conn.message)
            notes.append(Note("RegionChildrenLeft", f"Region {entry['name']}: its children in cluster {entry['cluster']} were left "
                                                    f"behind ({conn.message}); delete them there by hand", True))
            continue
        if conn is None or cluster_problem(entry["name"], entry["cluster"], conn) is not None:
            left.append({**entry, "phase": "Pending", "message": f"Region {entry['name']} was removed: its children will be deleted once cluster Secret {entry['cluster']} answers"})
            continue
        kept = (claimed or {}).get(entry["cluster"], set())

        def removable(conn: Any = conn, region: str = entry["name"], kept: set[tuple[str, str, str]] = kept) -> list[dict[str, Any]]:
            return [c for c in conn.children(build.label_value(name), CHILD_KINDS, region=region)
                    if (c["apiVersion"], c["kind"], c["metadata"]["name"]) not in kept]
        for child in removable():
            meta = child["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            try:  # the watch tells when it is gone (then the entry is dropped)
                await conn.kube.request("DELETE", path_for(child["apiVersion"], child["kind"], meta.get("namespace"), meta["name"]),
                                        {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background",
                                         **({"preconditions": {"uid": meta["uid"]}} if meta.get("uid") else {})})
            except ApiError as exc:
                if exc.status not in (404, 409):
                    raise
        if removable():
            left.append({**entry, "phase": "Pending", "message": f"Region {entry['name']} was removed: deleting its children"})
        else:
            notes.append(Note("RegionRemoved", f"Deleted the children of region {entry['name']} in cluster {entry['cluster']}"))
    return left, notes


#: The end of a shortened label value (`build.label_value` of a name over 63 characters).
_SHORTENED = re.compile(r"-[0-9a-f]{6}\Z")


def label_rival(ctx: Context, obj: dict[str, Any]) -> str | None:
    """Another Perennial Deployment of this namespace whose label value is this one's and that came first (created
    earlier; in the same second, the one whose name is too long for a label, then the smaller name): this one must not roll out, or the two would select each other's pods
    (Services, NetworkPolicy peers, removal by label). A long name's label value (56 characters and a hash) is a
    valid name itself, so a user could otherwise take another's labels by naming a Deployment after them."""
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    mine = build.label_value(name)
    if mine == name and not _SHORTENED.search(name):
        # a name that is its own label value is another's only when that one's is shortened to it (56 characters
        # and '-' and 6 hex digits): no need to look at every Deployment of the namespace in each pass
        return None

    def order(o: dict[str, Any]) -> tuple[str, bool, str]:
        n = o["metadata"]["name"]
        return (o["metadata"].get("creationTimestamp") or "", build.label_value(n) == n, n)

    rivals = [o for o in ctx.cache.list(API_VERSION, "Deployment", ns)
              if o["metadata"]["name"] != name and build.label_value(o["metadata"]["name"]) == mine]
    first = min(rivals, key=order, default=None)
    return first["metadata"]["name"] if first is not None and order(first) < order(obj) else None


#: Status changes that are steps of a rollout (`Progressing` True before or after: preview up, the switch that made it
#: serve, and what follows while one is held: an endpoint, a count) are written once no step followed for this long
#: (and at most STATUS_BATCH_MAX_SECONDS after the first), together, with one Event of their notes: steps that
#: happen back to back take one write (the EndpointSlice controller's batch period). What a user must see at once (a
#: warning, Ready leaving True, Degraded turning True) is written at once, with what was held. The status lags a
#: rollout by STATUS_BATCH_MAX_SECONDS at most; it never says Ready before the switch (a held status is the one
#: written before, or none).
STATUS_BATCH_SECONDS = 2.0
STATUS_BATCH_MAX_SECONDS = 4.0
#: What the notes of one Event may take (the manager joins them into one message, cut at 1024 characters).
EVENT_MESSAGE_BUDGET = 960


@dataclass
class _Held:
    """A Deployment's status change not written yet: since when (ctx.clock), and the notes of the passes held."""

    since: float
    notes: list[Note]
    #: when the status held last changed, and to what
    changed: float = 0.0
    status: dict[str, Any] = field(default_factory=dict)


def batched(ctx: Context, obj: dict[str, Any], out: Outcome) -> Outcome:
    """`out` as the manager should write it now, or the status as it stands (nothing written) while the change is
    held: its notes wait with it, and the Deployment is looked at again when the batch ends. Pure but for the held
    change kept in `ctx.tasks` (lost on a restart: the status is decided from the world again, the notes are not)."""
    holds = _memo(ctx, "held")
    key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
    held: _Held | None = holds.get(key)
    current = obj.get("status") or {}
    now = ctx.clock()

    def flush() -> Outcome:
        holds.pop(key, None)
        if held is None:
            return out
        # one Event for the batch, or as many as its notes need (an Event's message ends at 1024 characters)
        chunks: list[list[Note]] = [[]]
        size = 0
        for n in held.notes + list(out.notes):
            if chunks[-1] and size + len(n.reason) + len(n.message) + 4 > EVENT_MESSAGE_BUDGET:
                chunks.append([])
                size = 0
            chunks[-1].append(n)
            size += len(n.reason) + len(n.message) + 4
        return replace(out, notes=chunks[0], events=[(obj, c) for c in chunks[1:]] + list(out.events))

    if status_patch(current, out.status) is None:
        return flush() if held else out  # nothing to write: what was held (if anything) is posted now
    transitions = condition_notes(current.get("conditions"), out.status.get("conditions"), event_for)
    before, after = current.get("conditions"), out.status.get("conditions")
    if (any(n.warning for n in list(out.notes) + transitions)
            or (cond.is_true(before, CONDITION_READY) and not cond.is_true(after, CONDITION_READY))
            or (not cond.is_true(before, CONDITION_DEGRADED) and cond.is_true(after, CONDITION_DEGRADED))):
        return flush()  # bad news is never held: a warning, Ready leaving True (whatever its reason), Degraded turning True
    rolling = cond.is_true(current.get("conditions"), CONDITION_PROGRESSING) or cond.is_true(out.status.get("conditions"), CONDITION_PROGRESSING)
    since = held.since if held else now
    changed = now if held is None or status_patch(held.status, out.status) is not None else held.changed
    end = min(changed + STATUS_BATCH_SECONDS, since + STATUS_BATCH_MAX_SECONDS)
    if (held is None and not rolling) or now >= end or now < since:
        return flush()  # not a step of a rollout (nor what follows one held), or its batch is over
    holds[key] = _Held(since, (held.notes if held else []) + list(out.notes), changed, out.status)
    return Outcome(dict(current), [], _min(out.requeue_after, end - now), events=out.events)


async def reconcile(obj: dict[str, Any], ctx: Context) -> Outcome:
    return batched(ctx, obj, await decide(obj, ctx))


async def decide(obj: dict[str, Any], ctx: Context) -> Outcome:
    """One pass over a Deployment: observe, decide, act; the status and notes of what it found and did."""
    gen = generation(obj)
    spec, invalid = SPECS.parse(obj)
    if spec is None:
        assert invalid is not None
        return Outcome(_blocked_status(obj, "InvalidSpec", first_error(invalid)), [Note("InvalidSpec", first_error(invalid), True)])
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    if (rival := label_rival(ctx, obj)) is not None:
        message = (f"Deployment {rival!r} in this namespace already has the label value {build.label_value(name)!r} (names longer "
                   "than 63 characters are shortened to 56 characters and a hash for labels): two Deployments with one label "
                   "value would select each other's pods; rename this Deployment")
        return Outcome(_blocked_status(obj, LABEL_CONFLICT, message), [Note(LABEL_CONFLICT, message, True)], LABEL_CONFLICT_POLL_SECONDS)
    try:
        base = ctx.cache.get(API_VERSION, "BaseModel", ns, spec.base_model_ref.name)
        if base is None:
            raise Blocked("BaseModelNotFound", f"BaseModel {spec.base_model_ref.name!r} does not exist yet")
        if not _ready(base):
            raise Blocked("BaseModelNotReady", f"BaseModel {spec.base_model_ref.name!r} is not Ready")
    except Blocked as b:
        return Outcome(_blocked_status(obj, b.reason, b.message))
    if all(a.adapter_ref is not None for a in spec.adapters):  # pinned only: by name (an Adapter per run is kept for ever)
        candidates = [a for x in spec.adapters if x.adapter_ref is not None
                      and (a := ctx.cache.get(API_VERSION, "Adapter", ns, x.adapter_ref.name)) is not None]
    else:
        candidates = ctx.cache.list(API_VERSION, "Adapter", ns)
    desired, problems = resolve_adapters(spec, candidates)
    image = spec.engine.image or ctx.config.server_image
    regions = build.regions(spec)
    try:
        used = [r.cluster_secret_ref.name for r in regions if r.cluster_secret_ref is not None]
        if len(used) != len(set(used)):
            raise ValueError("two regions name the same `clusterSecretRef`: a cluster holds one region of a Deployment "
                             "(use `nodeSelector` regions for node pools of one cluster)")
        settings = ctx.config.serving_settings()
        servings = [build.Serving(body=obj, spec=spec, base_model=base, region=r, image=image, adapters=tuple(desired.values()),
                                  settings=settings) for r in regions]
        for s in servings:
            revision_of(ctx, s)  # every builder's validation, before anything is applied
            if lws.group_size(s) > 1 and s.region.cluster_secret_ref is not None:
                raise ValueError(f"region {s.region.name!r}: `engine.pipelineParallelSize` above 1 (LeaderWorkerSet groups) is "
                                 "served in the operator's own cluster only (its regions without `clusterSecretRef`, node pools "
                                 "with `nodeSelector`), not yet in other clusters")
    except ValueError as exc:
        message = str(exc)[:1024]
        return Outcome(_blocked_status(obj, "InvalidSpec", message), [Note("InvalidSpec", message, True)])
    if any(lws.group_size(s) > 1 for s in servings) and lws.LWS_RESOURCE not in ctx.served:
        # nothing is created (not even the token): a group across nodes has no other engine here
        message = (f"`engine.pipelineParallelSize` is {spec.engine.pipeline_parallel_size}: a model across nodes is served by "
                   f"LeaderWorkerSet groups, but the API server does not serve {lws.LWS_RESOURCE} (its CRD is not installed); "
                   "install LeaderWorkerSet (noticed without a restart), or use pipelineParallelSize 1")
        # what served before is still there only as apps/v1 Deployments (a model that fitted one node, before this
        # spec): LeaderWorkerSet groups went with their CRD
        still = any(((d.get("status") or {}).get("readyReplicas") or 0) > 0 for d in ctx.cache.owned_by("apps/v1", "Deployment", obj["metadata"]["uid"]))
        return Outcome(_blocked_status(obj, LWS_NOT_INSTALLED, message, serving_gone=not still), [Note(LWS_NOT_INSTALLED, message, True)])

    now = now_of(ctx)
    notes: list[Note] = []
    if any(s.region.cluster_secret_ref is None for s in servings) or spec.feedback.token_secret_ref is None:
        notes += await ensure_token(ctx, servings[0])
    token = feedback_token(ctx, ns, spec, name)

    # Other clusters: connected through their Secrets; regions taken out of the spec are cleaned up there.
    unavailable: list[Unavailable] = []
    conns: dict[str, Any] = {}
    wanted_remote = {(r.name, r.cluster_secret_ref.name) for r in regions if r.cluster_secret_ref is not None}
    gone = [r for r in (obj.get("status") or {}).get("regions") or []
            if isinstance(r, dict) and r.get("cluster") and (r.get("name"), r["cluster"]) not in wanted_remote]
    if ctx.remote is not None and (wanted_remote or gone):
        obj = await _ensure_finalizer(ctx, obj)
        conns = await connect(ctx, obj, {c for _, c in wanted_remote} | {r["cluster"] for r in gone})
        # A cluster just connected (an operator restart, a rotated Secret) is judged once its watches have listed it:
        # until then the status stays as it is (their first success wakes this Deployment), so a restart writes nothing.
        connecting = [sec for sec, conn in conns.items() if not isinstance(conn, ClusterSecretError)
                      and not conn.synced and conn.reachability().reachable is not False]
        if connecting and (obj.get("status") or {}).get("regions"):
            log.debug("Waiting for remote clusters to be listed, deployment=%s, namespace=%s, clusters=%s", name, ns, connecting)
            return Outcome(dict(obj["status"]), notes, CONNECT_POLL_SECONDS)

    worlds: list[RegionWorld] = []
    here = Where(ctx.kube, ctx.cache, http=http_clients(ctx))
    for s in servings:
        ref = s.region.cluster_secret_ref
        if ref is None:
            worlds.append(observe_region(here, s))
        elif ctx.remote is None:
            unavailable.append(unsupported_region(s.region))
        elif (problem := cluster_problem(s.region.name, ref.name, conns[ref.name])) is not None:
            unavailable.append(problem)
        else:
            conn = conns[ref.name]
            worlds.append(observe_region(Where(conn.kube, conn.cache, remote=True, cluster=ref.name), s))
    await read_pods(worlds)

    results: list[RegionResult] = []
    held_by: str | None = None
    smoke_keys: set[tuple[Any, ...]] = set()
    for w in worlds:
        assert w.where is not None
        try:
            r = await reconcile_region(ctx, obj, spec, w, desired, now, held_by=held_by, token=token, smoke_keys=smoke_keys)
            notes += r.notes
            if w.where.remote and token is not None:
                try:
                    r.manifests.insert(0, build.token_secret(w.serving, token))  # the pods there mount a copy
                except ValueError as exc:  # never the value in the message: the builder's reason only
                    text = f"Region {r.name}: the feedback token is not copied to cluster {w.where.cluster}: {exc}"[:1024]
                    r.conditions.append(rollout.ConditionPart(CONDITION_DEGRADED, "True", "FeedbackTokenInvalid", text))
                    notes.append(Note("FeedbackTokenInvalid", text, True))
            conflicts: list[str] = []
            notes += await apply_all(ctx, r.manifests, reasons=QUIET_CHILDREN, kube=w.where.kube, cache=w.where.cache, conflicts=conflicts)
            if conflicts:
                where = f" in cluster {w.where.cluster}" if w.where.remote else ""
                text = f"Region {r.name}{where}: " + "; ".join(conflicts)
                r.conditions.append(rollout.ConditionPart(CONDITION_DEGRADED, "True", "ChildConflict", text[:1024]))
                notes.append(Note("ChildConflict", text[:1024], True))
                r.requeue_after = _min(r.requeue_after, CONFLICT_POLL_SECONDS)  # the other object is not watched: look again
        except ApiError as exc:
            if not w.where.remote or not (exc.status == 0 or exc.status >= 500 or exc.status == 429):
                raise
            # the region's API server stopped answering mid-pass: the others go on
            unavailable.append(unreachable(w.serving.region.name, w.where.cluster,
                                           f"cluster Secret {w.where.cluster}, server {w.where.kube.host}: {outage(exc)}"))
            continue
        if spec.strategy.region_order == "Sequential" and held_by is None and not rolled_out(r):
            held_by = r.name
        if any(resource_of(m) == KEDA for m in r.manifests) and is_unserved(*KEDA, cluster=w.where.kube.name):
            r.conditions.append(keda_missing())
        results.append(r)
    forget_smoke_tests(ctx, (ns, name), smoke_keys, {r.name for r in results})
    notes += await prune(ctx, obj, results, none_here=not unavailable and all(s.region.cluster_secret_ref is not None for s in servings))
    removing, removed_notes = await remove_regions(obj, conns, gone, claimed_remote(servings))
    notes += removed_notes
    if ctx.remote is not None and not wanted_remote and not removing and REMOTE_FINALIZER in (obj["metadata"].get("finalizers") or []):
        obj = await _drop_finalizer(ctx, obj)
        await ctx.remote.release((ns, name))
    status = decide_status(obj, results, unavailable, problems, removing)
    assert status["observedGeneration"] == gen
    # A cluster coming back wakes its Deployments (`Clusters`); the look every UNAVAILABLE_POLL_SECONDS is a safety net.
    requeue = _min(*(r.requeue_after for r in results), CLEANUP_POLL_SECONDS if removing else None,
                   UNAVAILABLE_POLL_SECONDS if unavailable and wanted_remote else None)
    return Outcome(status, notes, requeue)


async def finalize(obj: dict[str, Any], ctx: Context) -> float | None:
    """Deleting a Deployment with regions in other clusters: its children there are deleted (no ownerReference
    reaches them); the finalizer stays until they are gone, retried while a cluster cannot be reached. A cluster whose
    Secret was deleted or gives no client cannot be cleaned: that is logged and the deletion goes on (a Warning Event
    names what was left behind)."""
    if ctx.remote is None:
        return None
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    try:
        spec: DeploymentSpec | None = DeploymentSpec.model_validate(obj.get("spec") or {})
    except pydantic.ValidationError:
        spec = None
    conns = await connect(ctx, obj, remote_secrets(spec, obj.get("status")))
    waiting = False
    for secret, conn in conns.items():
        if isinstance(conn, ClusterSecretError):
            log.warning("Left the children of a deleted Deployment behind: its cluster Secret gives no client, deployment=%s, namespace=%s, error=%s",
                        name, ns, conn.message)
            continue
        if cluster_problem("", secret, conn) is not None:
            waiting = True
            continue
        try:
            await conn.delete_children(build.label_value(name), CHILD_KINDS)  # by its label (a long name is shortened)
        except ApiError as exc:
            log.info("Could not delete the children in a remote cluster yet, deployment=%s, cluster=%s, error=%s", name, secret, exc)
            waiting = True
            continue
        waiting = waiting or bool(conn.children(build.label_value(name), CHILD_KINDS))
    if waiting:
        return CLEANUP_POLL_SECONDS
    await ctx.remote.release((ns, name))
    return None


def dependencies(obj: dict[str, Any]) -> list[Dependency]:
    """The BaseModel and the Adapters (by name, or their family) a Deployment serves."""
    spec = SPECS.get(obj)
    if spec is None:
        return []
    ns = obj["metadata"]["namespace"]
    deps: list[Dependency] = [(API_VERSION, "BaseModel", ns, spec.base_model_ref.name)]
    # the cluster Secrets of remote regions (a rotated credential) and the token they get a copy of
    deps += [("v1", "Secret", ns, r.cluster_secret_ref.name) for r in build.regions(spec) if r.cluster_secret_ref is not None]
    ref = spec.feedback.token_secret_ref
    deps.append(("v1", "Secret", ns, ref.name if ref else build.token_secret_name(obj["metadata"]["name"])))
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


def gone(ctx: Context, namespace: str, name: str) -> None:
    forget_smoke_tests(ctx, (namespace, name))
    _memo(ctx, "held").pop((namespace, name), None)
    SPECS.forget(namespace, name)
    revisions = _memo(ctx, "revision")
    for key in [k for k in revisions if k[:2] == (namespace, name)]:
        del revisions[key]


CONTROLLER = Controller(KIND, "deployments", DeploymentStatus, reconcile, dependencies, event_for=event_for,
                        finalizer=REMOTE_FINALIZER, finalize=finalize, gone=gone)
