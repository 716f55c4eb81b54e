"""The controller manager: kopf's watch streams feed the cache, changes map to keys, workers reconcile.

kopf does what it is good at — listing and watching every resource with
reconnects, backoff, login, peering and health — and the cache is fed from its
streams as they arrive (`listings`: every event, and the end of each listing,
where objects that vanished while no watch streamed are dropped). Nothing is
written to the objects (no finalizer, no annotations). Every change of the cache
maps to the keys of the objects it concerns (the object itself, its owner, the
objects that depend on it), held until every watched resource has been listed
once, so the first reconcile already sees the whole world. Keys go to a
`WorkQueue`; workers run the kind's `reconcile`, write the status only when it
changed and post one Event summarising the reconcile, after the write. Time
wakes an object only when its `Outcome` asks (`requeue_after`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import kopf

from ..kube.cache import Cache, resource_key
from ..kube.client import ApiError
from ..metrics import API_ERRORS, CONDITIONS, QUEUE_DEPTH, RECONCILE_SECONDS, RECONCILES, STATUS_WRITES
from ..resources import conditions as cond
from ..resources.common import FINALIZER, MANAGED_BY
from ..resources.deployment import label_value
from . import listings
from .base import API_VERSION, Context, Controller, Dependency, Note, condition_notes, generation
from .children import forget_unserved
from .queue import WorkQueue

log = logging.getLogger("perennial.controllers")


@dataclass(frozen=True)
class Key:
    """One object of a Perennial kind (never a built-in one of the same name)."""

    kind: str
    namespace: str
    name: str


@dataclass(frozen=True)
class Watched:
    group: str
    version: str
    plural: str
    kind: str
    labels: dict[str, str] | None = None
    #: Served only where an add-on is installed (KEDA's CRD): when the API server does not serve it, it counts as
    #: listed (empty) at once instead of holding every reconcile back until READY_TIMEOUT_SECONDS. Its CRD installed
    #: or removed while the operator runs is followed (kopf's watch of CRDs starts or stops the watch; `Manager.crd`).
    optional: bool = False
    #: The kinds of ours whose objects look again when this optional resource becomes served (a Deployment waiting
    #: for LeaderWorkerSet or KEDA); the others pick it up at their next reconcile.
    wakes: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.plural}.{self.group or 'core'}"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
#: Built-in resources whose changes wake Perennial objects: their children and their references.
BUILTIN_WATCHES = (
    Watched("batch", "v1", "jobs", "Job", MANAGED),
    Watched("", "v1", "pods", "Pod", MANAGED),
    Watched("", "v1", "configmaps", "ConfigMap", MANAGED),
    Watched("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim"),
    Watched("", "v1", "secrets", "Secret"),
    # Serving children of Perennial Deployments (and their pods, above, through the deployment label).
    Watched("apps", "v1", "deployments", "Deployment", MANAGED),
    Watched("", "v1", "services", "Service", MANAGED),
    Watched("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", MANAGED),
    Watched("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", MANAGED),
    # The NetworkPolicies of serving pods and of pods that run untrusted code (training, validation, download): every
    # real API server serves them; watched, a restart or a resync compares with the cache (no create, 409 and read).
    # Optional: an API server without them (rare) still runs the operator (children.OPTIONAL_KINDS skips them).
    Watched("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", MANAGED, optional=True),
    Watched("keda.sh", "v1alpha1", "scaledobjects", "ScaledObject", MANAGED, optional=True, wakes=("Deployment",)),
    # A color's workload across nodes (engine.pipelineParallelSize > 1), where LeaderWorkerSet is installed: its
    # status (groups ready as a whole) wakes the Deployment; its leader pods carry the Deployment's labels (above).
    Watched("leaderworkerset.x-k8s.io", "v1", "leaderworkersets", "LeaderWorkerSet", MANAGED, optional=True, wakes=("Deployment",)),
    # Engines of multi-node TrainingRuns, where installed: JobSet, Kubeflow Trainer's TrainJob (their Jobs and pods
    # carry the run's labels and are watched above).
    Watched("jobset.x-k8s.io", "v1alpha2", "jobsets", "JobSet", MANAGED, optional=True, wakes=("TrainingRun",)),
    Watched("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", MANAGED, optional=True, wakes=("TrainingRun",)),
)
#: The label naming the TrainingRun of a trainer pod or Job: maps the pods of a group (owned by Jobs that a JobSet
#: or a TrainJob owns, not the run) to their run.
TRAININGRUN_LABEL = "perennial.ai/trainingrun"
#: The label naming the Perennial Deployment of a serving child: maps what no ownerReference ties to it
#: (its pods, owned by ReplicaSets) to its parent.
DEPLOYMENT_LABEL = "perennial.ai/deployment"
#: Reconciles start when every watched resource was listed once, or after this long whatever is missing.
READY_TIMEOUT_SECONDS = 30.0
#: Discovery of an optional resource at start: asked this many times (5xx, 429, dropped connections) before it is
#: left unknown, then asked again every DISCOVERY_RETRY_SECONDS until it answers (what depends on it waits).
DISCOVERY_ATTEMPTS = 8
DISCOVERY_RETRY_SECONDS = 30.0
#: kopf's own watch of CustomResourceDefinitions (observation.resource_observer): seen here as any other stream.
CRDS = ("apiextensions.k8s.io", "customresourcedefinitions")
OUR_KINDS = (("basemodels", "BaseModel"), ("rewardspecs", "RewardSpec"), ("trainingruns", "TrainingRun"), ("adapters", "Adapter"), ("deployments", "Deployment"))


class _OptionalUnresolved(logging.Filter):
    """kopf warns of every resource it cannot serve at each CRD event in the cluster (any CRD created, changed or
    removed); for the optional ones (an add-on not installed, which is normal) that is said once at start
    (`Manager._skip_unserved`): kopf's line is dropped when it names only those, kept when it names any other."""

    PREFIX = "Unresolved resources cannot be served"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.PREFIX):
            return True
        named = re.findall(r"group='([^']*)', version='([^']*)', any_name='([^']*)'", message)
        optional = {(w.group, w.version, w.plural) for w in BUILTIN_WATCHES if w.optional}
        return not named or not set(named) <= optional


_QUIET_OPTIONAL = _OptionalUnresolved()


def _self_changed(old: dict[str, Any] | None, new: dict[str, Any] | None) -> bool:
    """Whether an object's own reconcile must run: it is new or gone, or something but its status moved."""
    if old is None or new is None:
        return True
    om, nm = old.get("metadata") or {}, new.get("metadata") or {}
    if om.get("generation") != nm.get("generation") or om.get("uid") != nm.get("uid"):
        return True
    for k in ("labels", "annotations", "deletionTimestamp", "ownerReferences"):
        if om.get(k) != nm.get(k):
            return True
    # Kinds without a generation (none of ours): any spec change.
    return old.get("spec") != new.get("spec")


_SAME = object()


def _merge_diff(have: Any, want: Any) -> Any:
    """The JSON merge patch from `have` to `want`, or _SAME; keys `want` lacks become null, at any depth."""
    if isinstance(have, dict) and isinstance(want, dict):
        out = {}
        for k, v in want.items():
            d = _merge_diff(have[k], v) if k in have else v
            if d is not _SAME:
                out[k] = d
        out.update({k: None for k in have if k not in want})
        return out or _SAME
    return _SAME if have == want else want


def status_patch(current: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch that turns `current` into `desired` (None when equal): removed fields become null,
    nested ones too; conditions compare without the times of unchanged ones."""
    patch = _merge_diff({k: v for k, v in current.items() if k != "conditions"}, {k: v for k, v in desired.items() if k != "conditions"})
    patch = {} if patch is _SAME else patch
    if cond.conditions_differ(current.get("conditions"), desired.get("conditions")):
        patch["conditions"] = desired.get("conditions")
    return patch or None


def _never(**_: Any) -> bool:
    return False


async def _nothing(**_: Any) -> None:
    return None


#: What operators before the controller pattern left on objects: kopf's finalizer, its last-handled
#: configuration and its per-handler progress annotations.
LEGACY_FINALIZER = FINALIZER
_LEGACY_ANNOTATION = re.compile(r"^perennial\.ai/(last-handled-configuration|[a-z]+_(changed|resync|deleted))$")


def legacy_metadata_patch(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The metadata merge patch that removes what an earlier operator left, or None."""
    patch: dict[str, Any] = {}
    finalizers = meta.get("finalizers") or []
    if LEGACY_FINALIZER in finalizers:
        patch["finalizers"] = [f for f in finalizers if f != LEGACY_FINALIZER]
    stale = {k: None for k in (meta.get("annotations") or {}) if _LEGACY_ANNOTATION.match(k)}
    if stale:
        patch["annotations"] = stale
    return patch or None


class Manager:
    """Wires controllers to kopf: cache, mapping, queue, workers, status writes, Events."""

    def __init__(self, controllers: Iterable[Controller], ctx: Context, *, workers: int = 16):
        self.controllers = {c.kind: c for c in controllers}
        #: resource kind -> the controllers reconciling its objects (the serving and the learning one of Deployments)
        self.by_resource: dict[str, list[Controller]] = {}
        for c in self.controllers.values():
            self.by_resource.setdefault(c.resource_kind, []).append(c)
        self.ctx = ctx
        self.cache: Cache = ctx.cache
        self.cache.on_change = self._on_change
        self.workers = workers
        self.queue: WorkQueue[Key] = WorkQueue()
        #: dependency -> keys of the objects that depend on it
        self.dependents: dict[Dependency, set[Key]] = {}
        self._deps_of: dict[Key, set[Dependency]] = {}
        self._pending: set[Key] = set()
        self._ready = False
        self._task: asyncio.Task[None] | None = None
        self._event_tasks: set[asyncio.Task[None]] = set()
        self._by_plural: dict[tuple[str, str], Watched] = {}
        self._listed_once: set[tuple[str, str]] = set()
        self._ready_timer: asyncio.TimerHandle | None = None
        self._discovery: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.instance = os.environ.get("POD_NAME") or socket.gethostname()

    # -- registration ----------------------------------------------------------
    def watched(self) -> list[Watched]:
        group, version = API_VERSION.split("/")
        ours = [Watched(group, version, plural, kind) for plural, kind in OUR_KINDS]
        return ours + list(BUILTIN_WATCHES)

    def register(self, registry: kopf.OperatorRegistry) -> None:
        for w in self.watched():
            self._by_plural[(w.group, w.plural)] = w
            # kopf watches what has a handler; the cache is fed from its streams (`listings`), so this
            # handler never runs: no per-object work of kopf's beyond its own bookkeeping.
            kopf.on.event(w.group, w.version, w.plural, registry=registry, id=f"watch-{w.id}", when=_never)(_nothing)
        listings.subscribe(self, consumes=set(self._by_plural))
        logging.getLogger("kopf._core.reactor.observation").addFilter(_QUIET_OPTIONAL)  # once per process (same filter)
        kopf.on.startup(registry=registry, id="manager-start")(self._startup)
        kopf.on.cleanup(registry=registry, id="manager-stop")(self._cleanup)

    # -- the informer: kopf's streams, as they arrive (on the loop, in kopf's watcher tasks) ----------
    def _mine(self) -> bool:
        """Streams of this operator's own loop (another operator in the same process has its own)."""
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def observed(self, resource: Any, namespace: str | None, raw: dict[str, Any]) -> None:
        w = self._by_plural.get((resource.group, resource.plural))
        if w is None and (resource.group, resource.plural) == CRDS and self._mine():
            self.crd(raw)
        if w is None or not self._mine():
            return
        obj = {**raw["object"], "apiVersion": w.api_version, "kind": w.kind}  # list items may lack them
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if raw["type"] == "DELETED" or (w.labels and any(labels.get(k) != v for k, v in w.labels.items())):
            self.cache.remove(obj)  # gone, or no longer ours (relabelled)
        else:
            self.cache.put(obj)

    def listed(self, resource: Any, namespace: str | None, present: dict[tuple[str, str], str]) -> None:
        """A listing ended: drop what it no longer has (deleted while no watch streamed); once every
        watched resource was listed, the cache holds the world and reconciles may start."""
        w = self._by_plural.get((resource.group, resource.plural))
        if w is None or not self._mine():
            return
        gone = self.cache.replace(w.api_version, w.kind, namespace, present)
        if gone:
            log.info("Dropped objects deleted while the watch was down, kind=%s, count=%d", w.kind, gone)
        self._listed_once.add((w.group, w.plural))
        if w.optional and w.id not in self.ctx.served:
            self.ctx.served.add(w.id)  # listed: served (whether discovery has answered yet or not)
            self.ctx.unknown.discard(w.id)
            if self._ready:  # its CRD was installed while the operator runs
                log.info("Started using an optional resource (its CRD was installed), resource=%s", w.id)
                forget_unserved(w.api_version, w.kind)
                self._wake_for(w)
        if not self._ready and self._listed_once >= set(self._by_plural):
            self._start_reconciling()
            log.info("Listed the world, objects=%d", len(self.queue))

    def crd(self, raw: dict[str, Any]) -> None:
        """An event of kopf's watch of CustomResourceDefinitions (it starts and stops its watches by them): one of an
        optional resource removed (or being removed, or no longer serving our version) is no longer served at
        once; its objects leave the cache (their deletions may never stream: the watch stops), which wakes their
        owners. Installed, it counts as served once kopf's new watch listed it (`listed`): the cache is whole."""
        obj = raw.get("object") or {}
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        group, plural = spec.get("group"), (spec.get("names") or {}).get("plural")
        w = self._by_plural.get((group, plural)) if isinstance(group, str) and isinstance(plural, str) else None
        if w is None or not w.optional or w.id not in self.ctx.served:
            return
        serving = any(v.get("name") == w.version and v.get("served", True) for v in spec.get("versions") or [] if isinstance(v, dict))
        if raw.get("type") != "DELETED" and serving and not meta.get("deletionTimestamp"):
            return
        self.ctx.served.discard(w.id)
        gone = self.cache.replace(w.api_version, w.kind, None, {})
        log.warning("Stopped using an optional resource (its CRD was removed, or no longer serves %s), resource=%s, dropped=%d",
                    w.version, w.id, gone)

    def _on_change(self, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        """Every change of the cache — watch events and our own writes alike — wakes whom it concerns."""
        self._route(self.keys_for(old, new))

    def wake(self, kind: str, names: set[tuple[str, str]]) -> None:
        """Reconcile these (namespace, name) objects of `kind`: a change seen outside the cache (another cluster)."""
        if kind in self.controllers:
            self._route({k for ns, name in names for k in (self._labelled(ns, name) if kind == "Deployment" else {Key(kind, ns, name)})})

    def _labelled(self, ns: str, value: str) -> set[Key]:
        """The Perennial Deployments a `perennial.ai/deployment` label value names: a name over 63 characters is
        shortened there (`label_value`), so the object is found by its label value when none bears it as its name."""
        if len(value) < 63 or self.cache.get(API_VERSION, "Deployment", ns, value) is not None:
            return {Key("Deployment", ns, value)}
        found = {Key("Deployment", ns, o["metadata"]["name"]) for o in self.cache.list(API_VERSION, "Deployment", ns)
                 if label_value(o["metadata"]["name"]) == value}
        return found or {Key("Deployment", ns, value)}

    def _wake_for(self, w: Watched) -> None:
        """The objects whose decisions depend on optional resource `w` look again (it is served now, or it became
        known whether it is): every one of its `wakes` kinds (a Deployment may use it), TrainingRuns only while
        they wait (one finished or running never changes engine)."""
        for kind in w.wakes:
            if (c := self.controllers.get(kind)) is not None:
                objs = self.cache.list(API_VERSION, c.resource_kind)
                if kind == "TrainingRun":
                    objs = [o for o in objs if cond.is_true((o.get("status") or {}).get("conditions"), "Waiting")]
                self._route({Key(kind, o["metadata"].get("namespace") or "", o["metadata"]["name"]) for o in objs})

    def _route(self, keys: set[Key]) -> None:
        if self._ready:
            for key in keys:
                self.queue.add(key)
        else:
            self._pending |= keys

    async def _startup(self, settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False  # Events are ours: one per reconcile, after the status write
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self.queue.run_workers(self.workers, self.process), name="perennial-workers")
        self._ready_timer = asyncio.get_running_loop().call_later(READY_TIMEOUT_SECONDS, self._ready_anyway)
        optional = [w for w in self._by_plural.values() if w.optional]
        # not known yet whether served: what depends on one waits (a run's engine) until discovery or a listing says
        self.ctx.unknown.update(w.id for w in optional if w.id not in self.ctx.served)
        if optional:
            self._discovery = asyncio.create_task(self._discover(optional), name="perennial-discovery")

    async def _discover(self, optional: list[Watched]) -> None:
        await self._skip_unserved(optional)
        # what discovery could not tell at start is asked again until it answers
        while unknown := [w for w in optional if w.id in self.ctx.unknown]:
            await asyncio.sleep(DISCOVERY_RETRY_SECONDS)
            for w in unknown:
                if w.id in self.ctx.unknown:  # (listed meanwhile: known)
                    self._learned(w, await self._served(w))

    async def _served(self, w: Watched) -> bool | None:
        """Whether the API server serves `w` (its group version's discovery); None when it cannot tell."""
        for attempt in range(DISCOVERY_ATTEMPTS):  # an error but 'not served' or 'forbidden' is asked again (5xx, 429, a dropped connection)
            try:
                found = await self.ctx.kube.request("GET", f"/apis/{w.group}/{w.version}")
                resources = (found.get("resources") or []) if isinstance(found, dict) else None  # none listed: []
                if not isinstance(resources, list) or not all(isinstance(r, dict) for r in resources):
                    log.warning("The discovery answer for %s is not an APIResourceList: %.200r", w.id, found)
                    return None  # cannot tell (asked again later), never a crash of the discovery task
                return any(r.get("name") == w.plural for r in resources)
            except ApiError as exc:
                if exc.status == 404:
                    return False
                if exc.status in (401, 403):
                    return None
                await asyncio.sleep(max(exc.retry_after or 0, 0.2 * 2 ** attempt))
        return None

    def _learned(self, w: Watched, served: bool | None) -> None:
        if served is None:
            log.warning("Could not tell whether the API server serves %s; asking again in %.0f s", w.id, DISCOVERY_RETRY_SECONDS)
            return  # unknown: READY_TIMEOUT_SECONDS still bounds the wait of reconciles; what depends on it waits
        known = w.id in self.ctx.unknown
        self.ctx.unknown.discard(w.id)
        if served:
            self.ctx.served.add(w.id)
        if not served and (w.group, w.plural) not in self._listed_once:
            log.warning("Not watching %s: the API server does not serve it (its CRD is not installed)", w.id)
            self._listed_once.add((w.group, w.plural))
        if known and self._ready:
            self._wake_for(w)

    async def _skip_unserved(self, optional: list[Watched]) -> None:
        """Optional resources the API server does not serve (KEDA not installed, which is normal) count as listed:
        kopf never lists them, and nothing may wait for them."""
        for w in optional:
            self._learned(w, await self._served(w))
        if not self._ready and self._listed_once >= set(self._by_plural):
            self._start_reconciling()
            log.info("Listed the world, objects=%d", len(self.queue))

    def _ready_anyway(self) -> None:
        """A resource kopf never lists (its CRD is not installed) must not hold every reconcile back forever."""
        if not self._ready:
            missing = sorted(f"{p}.{g or 'core'}" for g, p in set(self._by_plural) - self._listed_once)
            log.warning("Reconciling before every resource was listed, never_listed=%s", ",".join(missing))
            self._start_reconciling()

    def _start_reconciling(self) -> None:
        self._ready = True
        pending, self._pending = self._pending, set()
        for key in pending:
            self.queue.add(key)

    async def _cleanup(self, **_: Any) -> None:
        listings.unsubscribe(self)
        if self._ready_timer is not None:
            self._ready_timer.cancel()
        if self._discovery is not None and not self._discovery.done():
            self._discovery.cancel()
        await self.queue.shutdown()
        if self._event_tasks:
            await asyncio.wait(self._event_tasks, timeout=2)
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        if self.ctx.remote is not None:
            await self.ctx.remote.close()
        for client in self.ctx.clusters.values():
            await client.close()
        for close in self.ctx.closers:
            await close()

    # -- mapping ---------------------------------------------------------------
    def keys_for(self, old: dict[str, Any] | None, new: dict[str, Any] | None) -> set[Key]:
        """The objects a change of one object concerns (controller-runtime's `For`, `Owns` and `Watches`)."""
        obj = new if new is not None else old
        assert obj is not None
        api_version, kind = resource_key(obj)
        meta = obj["metadata"]
        ns, name = meta.get("namespace") or "", meta["name"]
        keys: set[Key] = set()
        ours = api_version == API_VERSION
        for controller in self.by_resource.get(kind, []) if ours else []:
            key = Key(controller.kind, ns, name)
            self._track_dependencies(key, None if new is None else controller.dependencies(new))
            if _self_changed(old, new):
                keys.add(key)
        for ref in (meta.get("ownerReferences") or []) + ((old or {}).get("metadata", {}).get("ownerReferences") or []):
            keys |= self._owner_keys(ns, ref, child=kind if ours else None)
        for dep in self._dependencies_of(obj):
            keys |= self.dependents.get(dep, set())
        if not ours and "Deployment" in self.controllers:
            for labels in ((new or {}).get("metadata", {}).get("labels") or {}, (old or {}).get("metadata", {}).get("labels") or {}):
                if labels.get(DEPLOYMENT_LABEL) and labels.get("app.kubernetes.io/managed-by") == MANAGED_BY:
                    keys |= self._labelled(ns, labels[DEPLOYMENT_LABEL])
        if not ours and kind in ("Pod", "Job") and "TrainingRun" in self.controllers:
            for labels in ((new or {}).get("metadata", {}).get("labels") or {}, (old or {}).get("metadata", {}).get("labels") or {}):
                if labels.get(TRAININGRUN_LABEL) and labels.get("app.kubernetes.io/managed-by") == MANAGED_BY:
                    keys.add(Key("TrainingRun", ns, labels[TRAININGRUN_LABEL]))
        return keys

    def _owner_keys(self, ns: str, ref: dict[str, Any], depth: int = 0, child: str | None = None) -> set[Key]:
        if ref.get("apiVersion") == API_VERSION and (owners := self.by_resource.get(ref.get("kind") or "")):
            # a child kind one controller owns (the learning loop's TrainingRuns) wakes only that one
            claimed = [c for c in owners if child is not None and child in c.owns]
            return {Key(c.kind, ns, ref["name"]) for c in claimed or [c for c in owners if not c.owns or c.kind == c.resource_kind]}
        if depth == 0 and ref.get("apiVersion") == "batch/v1" and ref.get("kind") == "Job":
            job = self.cache.get("batch/v1", "Job", ns, ref["name"])
            return {k for r in ((job or {}).get("metadata") or {}).get("ownerReferences") or [] for k in self._owner_keys(ns, r, 1)}
        return set()

    @staticmethod
    def _dependencies_of(obj: dict[str, Any]) -> list[Dependency]:
        """The dependency tokens an object stands for: itself, and for Adapters their family."""
        api_version, kind = resource_key(obj)
        meta = obj["metadata"]
        ns = meta.get("namespace") or ""
        deps: list[Dependency] = [(api_version, kind, ns, meta["name"])]
        if api_version == API_VERSION and kind == "Adapter":
            spec = obj.get("spec") or {}
            if spec.get("family"):
                deps.append((API_VERSION, "AdapterFamily", ns, spec["family"]))
            if run := ((spec.get("lineage") or {}).get("trainingRunRef") or {}).get("name"):
                deps.append((API_VERSION, "AdapterOfRun", ns, run))
        return deps

    def _track_dependencies(self, key: Key, deps: Iterable[Dependency] | None) -> None:
        new = set(deps or ())
        old = self._deps_of.get(key, set())
        if new == old:
            return
        for dep in old - new:
            holders = self.dependents.get(dep)
            if holders is not None:
                holders.discard(key)
                if not holders:
                    del self.dependents[dep]
        for dep in new - old:
            self.dependents.setdefault(dep, set()).add(key)
        if new:
            self._deps_of[key] = new
        else:
            self._deps_of.pop(key, None)

    # -- processing ------------------------------------------------------------
    async def process(self, key: Key) -> None:
        controller = self.controllers[key.kind]
        obj = self.cache.get(API_VERSION, controller.resource_kind, key.namespace, key.name)
        QUEUE_DEPTH.set(len(self.queue))
        if obj is not None and (legacy := legacy_metadata_patch(obj["metadata"])) is not None:
            # Left by an operator before this one (kopf's finalizer and annotations): released once, even
            # while the object is being deleted (nothing else would ever remove that finalizer).
            try:
                released = await self.ctx.kube.patch(API_VERSION, controller.resource_kind, key.namespace, key.name,
                                                     {"metadata": {**legacy, "resourceVersion": obj["metadata"].get("resourceVersion")}})
            except ApiError as exc:
                if exc.status != 404:
                    self.queue.add_rate_limited(key, exc.retry_after)
                return
            log.info("Released what an earlier operator left, kind=%s, name=%s, namespace=%s", key.kind, key.name, key.namespace)
            self.cache.put(released)
            obj = released
        if obj is not None and (obj.get("metadata") or {}).get("deletionTimestamp") and controller.finalizer \
                and controller.finalize is not None and controller.finalizer in (obj["metadata"].get("finalizers") or []):
            await self.finalize(controller, key, obj)
            return
        if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp"):
            # Gone, or going (foreground deletion): its children go with it; nothing to do.
            CONDITIONS.forget(key.kind, key.namespace, key.name)
            controller.gone(self.ctx, key.namespace, key.name)
            self.queue.forget(key)
            return
        started = time.perf_counter()
        result = "success"
        try:
            outcome = await controller.reconcile(obj, self.ctx)
            # A reconcile that wrote the object's metadata itself (a finalizer) wrote it through to the cache: the
            # status is written against that version, unless the spec or the status moved meanwhile (then the 409
            # retries): a status another controller wrote (the learning loop's fields) is never reverted from our copy.
            latest = self.cache.get(API_VERSION, controller.resource_kind, key.namespace, key.name)
            if latest is not None and latest is not obj and generation(latest) == generation(obj) and not _self_changed(obj, latest) \
                    and latest.get("status") == obj.get("status"):
                obj = latest
            try:
                written = await self.write_status(controller, obj, outcome.status, outcome.notes)
            except ApiError:
                # what was done stays done: say so now, all of it (the retry decides from the world again, and has
                # nothing left to say about it; a Deployment's held notes were taken out of their hold for this write)
                await self.post_event(obj, outcome.notes)
                for other, other_notes in outcome.events:
                    await self.post_event(other, other_notes)
                raise
            if written:
                for record in outcome.after_write:
                    record()
            for other, other_notes in outcome.events:
                await self.post_event(other, other_notes)
            self.queue.forget(key)
            if outcome.requeue_after is not None:
                self.queue.add_after(key, outcome.requeue_after)
        except ApiError as exc:
            result = "requeue" if exc.status in (0, 409, 429) or exc.status >= 500 else "error"
            API_ERRORS.labels(str(exc.status)).inc()
            wait = self.queue.add_rate_limited(key, exc.retry_after)
            level = logging.DEBUG if result == "requeue" and self.queue.failures(key) < 5 else logging.WARNING
            log.log(level, "Requeued after an API error, kind=%s, name=%s, namespace=%s, delay=%.2fs, error=%s", key.kind, key.name, key.namespace, wait, exc)
        except Exception:
            result = "error"
            wait = self.queue.add_rate_limited(key)
            log.exception("Reconcile failed, kind=%s, name=%s, namespace=%s, retry_in=%.2fs", key.kind, key.name, key.namespace, wait)
        finally:
            RECONCILES.labels(key.kind, result).inc()
            RECONCILE_SECONDS.labels(key.kind).observe(time.perf_counter() - started)

    async def finalize(self, controller: Controller, key: Key, obj: dict[str, Any]) -> None:
        """An object being deleted that holds the controller's finalizer: its cleanup, then the finalizer removed
        (only ours: a list patch with the resourceVersion, so another's finalizer added meanwhile is never lost)."""
        assert controller.finalize is not None and controller.finalizer is not None
        try:
            again = await controller.finalize(obj, self.ctx)
            if again is not None:
                self.queue.add_after(key, again)
                return
            meta = obj["metadata"]
            rest = [f for f in meta.get("finalizers") or [] if f != controller.finalizer]
            released = await self.ctx.kube.patch(API_VERSION, key.kind, key.namespace, key.name,
                                                 {"metadata": {"finalizers": rest or None, "resourceVersion": meta.get("resourceVersion")}})
            self.cache.put(released)
            log.info("Removed the finalizer, kind=%s, name=%s, namespace=%s, finalizer=%s", key.kind, key.name, key.namespace, controller.finalizer)
            self.queue.forget(key)
        except ApiError as exc:
            if exc.status == 404:
                return
            wait = self.queue.add_rate_limited(key, exc.retry_after)
            log.log(logging.DEBUG if exc.status in (0, 409) else logging.WARNING,
                    "Finalizing requeued after an API error, kind=%s, name=%s, namespace=%s, delay=%.2fs, error=%s", key.kind, key.name, key.namespace, wait, exc)
        except Exception:
            wait = self.queue.add_rate_limited(key)
            log.exception("Finalizing failed, kind=%s, name=%s, namespace=%s, retry_in=%.2fs", key.kind, key.name, key.namespace, wait)

    async def write_status(self, controller: Controller, obj: dict[str, Any], desired: dict[str, Any], notes: list[Note]) -> bool:
        """The one status writer: typed, from the cached object, only what changed, then one Event."""
        meta = obj["metadata"]
        kind, ns, name = controller.resource_kind, meta["namespace"], meta["name"]
        desired = controller.status_model.model_validate(desired).model_dump(by_alias=True, exclude_none=True, mode="json")
        current = obj.get("status") or {}
        if controller.status_fields is not None:
            # a status shared with another controller: only this one's fields are compared and patched
            current = {k: v for k, v in current.items() if k in controller.status_fields}
        CONDITIONS.observe(kind, ns, name, desired.get("conditions") or [])
        patch = status_patch(current, desired)
        if patch is None:
            if notes:
                await self.post_event(obj, notes)
            return False
        body = {"metadata": {"resourceVersion": meta.get("resourceVersion")}, "status": patch}
        try:
            written = await self.ctx.kube.patch(API_VERSION, kind, ns, name, body, subresource="status")
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        STATUS_WRITES.labels(kind).inc()
        self.cache.put(written)  # write-through: the watch event of our own write then changes nothing
        log.info("Updated status, kind=%s, name=%s, namespace=%s", kind, name, ns)
        await self.post_event(written, notes + condition_notes(current.get("conditions"), desired.get("conditions"), controller.event_for))
        return True

    async def post_event(self, obj: dict[str, Any], notes: list[Note]) -> None:
        """One Event for what a reconcile did: named by its first warning, else its first note; the others join its message."""
        by_reason: dict[str, list[Note]] = {}
        for n in notes:
            same = by_reason.setdefault(n.reason, [])
            if all(n.message != m.message for m in same):
                same.append(n)
        if not by_reason:
            return
        groups = sorted(by_reason.items(), key=lambda item: not any(n.warning for n in item[1]))  # stable: order kept
        texts = [(reason, "; ".join(n.message for n in group)) for reason, group in groups]
        head_reason, message = texts[0]
        if len(texts) > 1:
            message += " (also: " + "; ".join(f"{r}: {m}" for r, m in texts[1:]) + ")"
        warning = any(n.warning for n in notes)
        meta = obj["metadata"]
        now = self.ctx.now()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj["apiVersion"],
                "kind": obj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": head_reason[:128],
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": MANAGED_BY},
            "reportingComponent": f"perennial.ai/{MANAGED_BY}",
            "reportingInstance": self.instance[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        # In the background, retried like client-go's recorder does: a reconcile never waits for its Event.
        task = asyncio.create_task(self._send_event(event))
        self._event_tasks.add(task)
        task.add_done_callback(self._event_tasks.discard)

    async def _send_event(self, event: dict[str, Any], attempts: int = 8) -> None:
        delay = 0.2
        for attempt in range(attempts):
            try:
                await self.ctx.kube.create(event)
                return
            except ApiError as exc:
                retriable = exc.status in (0, 429) or exc.status >= 500
                if not retriable or attempt == attempts - 1:
                    log.warning("Could not post Event, reason=%s, name=%s, error=%s", event["reason"], event["involvedObject"]["name"], exc)
                    return
                await asyncio.sleep(max(delay, exc.retry_after or 0))
                delay = min(delay * 2, 10)
