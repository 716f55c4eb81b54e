"""What every controller shares: the context a reconcile gets, what it returns, and small helpers.

A controller is one `Controller` value (kind, typed status model, the keys of
the objects it depends on, and `reconcile`). `reconcile` observes (from the
cache), decides (a pure function, table-tested), acts (through the async
client) and returns an `Outcome`: the whole desired status, the notes worth an
Event, and when time itself should wake it again. The manager writes the
status (only when it changed) and the Events, after the write.
"""

from __future__ import annotations

import datetime as _dt
import random
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pydantic

from ..api.common import GROUP, VERSION
from ..config import OperatorConfig
from ..kube.aio import AsyncKube
from ..kube.cache import Cache

API_VERSION = f"{GROUP}/{VERSION}"

#: What an object depends on: ("apiVersion", "kind", namespace, name), or a named group of
#: objects such as (API_VERSION, "AdapterFamily", namespace, family).
Dependency = tuple[str, str, str, str]


class Ticker:
    """Time-triggered reads, spread and capped: each key at most every `min_interval` seconds, and no two
    reads of all keys together closer than 1/`rate` seconds (10,000 running trainers do not make 2,000 log
    reads a second). Every turn is a reserved slot: a key new to the ticker (a new trainer, or every running
    one after an operator restart) gets its first turn at a random point of one interval and no sooner than
    the next free slot, so neither a restart nor a burst of new runs reads anything at once."""

    def __init__(self, min_interval: float, rate: float, clock: Callable[[], float], rng: Callable[[], float] = random.random):
        self.min_interval = min_interval
        self.rate = max(rate, 1e-6)
        self._clock = clock
        self._rng = rng
        self._due: dict[Hashable, float] = {}
        self._last_slot = float("-inf")

    def interval(self) -> float:
        """Seconds between two reads of one key when every key is due (the keys share the rate)."""
        return max(self.min_interval, len(self._due) / self.rate)

    def _reserve(self, earliest: float) -> float:
        slot = max(earliest, self._last_slot + 1 / self.rate)
        self._last_slot = max(self._last_slot, slot)
        return slot

    def poll(self, key: Hashable) -> tuple[bool, float]:
        """(read now?, seconds until this key's next turn)."""
        now = self._clock()
        due = self._due.get(key)
        if due is None:
            due = self._due[key] = self._reserve(now + self._rng() * self.interval())
            return False, max(0.0, due - now)
        if now + 0.01 >= due:
            self._due[key] = self._reserve(now + self.min_interval)
            return True, self._due[key] - now
        return False, due - now

    def forget(self, key: Hashable) -> None:
        self._due.pop(key, None)

    def __len__(self) -> int:
        return len(self._due)


@dataclass
class Context:
    """What a reconcile needs besides the object: clients per cluster, the cache, settings, a clock."""

    clusters: dict[str, AsyncKube]
    cache: Cache
    config: OperatorConfig
    clock: Callable[[], float]
    #: Other clusters, reached through Secrets (`perennial.kube.clusters.Clusters`): the regions of Deployments
    #: with `clusterSecretRef`. None: this operator reconciles its own cluster only.
    remote: Any = None
    #: Wake objects: `wake(kind, {(namespace, name), ...})` (the manager's), for work that finishes outside a reconcile.
    wake: Callable[[str, set[tuple[str, str]]], None] | None = None
    #: Work a reconcile started that outlives it (a smoke test taking longer than a reconcile may wait), by key.
    tasks: dict[Hashable, Any] = field(default_factory=dict)
    #: Optional resources (`<plural>.<group>`: JobSet, TrainJob, ...) the API server serves now (the manager's
    #: discovery at start, then kopf's watch of CRDs: installed or removed while running); what a multi-node
    #: TrainingRun starts on follows it.
    served: set[str] = field(default_factory=set)
    #: Optional resources whether served or not is not known yet (discovery has not answered, kopf has not listed
    #: them): what depends on one waits instead of deciding for good.
    unknown: set[str] = field(default_factory=set)
    #: Closed by the manager when the operator stops (what controllers opened for the operator's lifetime: the
    #: Deployment controller's pooled HTTP session to sidecars and Services).
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    #: when running trainers' progress (their pod logs) is read
    progress: Ticker = field(init=False)

    def __post_init__(self) -> None:
        self.progress = Ticker(self.config.progress_seconds, self.config.progress_reads_per_second, time.monotonic)

    @property
    def kube(self) -> AsyncKube:
        """The client of the cluster the operator runs in."""
        return self.clusters["local"]

    def now(self) -> str:
        return _dt.datetime.fromtimestamp(self.clock(), _dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Note:
    """Something that happened in a reconcile and deserves an Event."""

    reason: str
    message: str
    warning: bool = False


@dataclass
class Outcome:
    status: dict[str, Any]
    notes: list[Note] = field(default_factory=list)
    #: Reconcile again after this many seconds (time is the trigger), even if nothing changes.
    requeue_after: float | None = None
    #: Run once the status is written (metrics of transitions: counted once, not per attempt).
    after_write: list[Callable[[], None]] = field(default_factory=list)
    #: Events about other objects (e.g. an Adapter the reconcile marked), posted after the status write.
    events: list[tuple[dict[str, Any], list[Note]]] = field(default_factory=list)


@dataclass(frozen=True)
class Controller:
    kind: str
    plural: str
    status_model: type[pydantic.BaseModel]
    reconcile: Callable[[dict[str, Any], Context], Awaitable[Outcome]]
    #: The objects a change of which must wake this one (beyond its own children, found by ownerReferences).
    dependencies: Callable[[dict[str, Any]], Iterable[Dependency]] = lambda obj: ()
    #: Called with (namespace, name) when an object is gone: let go of what is kept for it.
    gone: Callable[[Context, str, str], None] = lambda ctx, namespace, name: None
    #: Which condition transitions deserve an Event: "Normal", "Warning" or None (none: the status says
    #: it, and an Event would be a write that tells nothing new, e.g. a trainer pod starting).
    event_for: Callable[[dict[str, Any]], str | None] = lambda c: default_event_type(c)
    #: The kind of the objects it reconciles when it is not `kind` (a second controller of one kind, e.g. the learning
    #: loop of Deployments next to their serving controller): its keys are its own, the objects and status the resource's.
    resource: str | None = None
    #: The status fields it owns when it shares the object's status with another controller: only these are compared
    #: and written (a merge patch of them), the others are left to their owner.
    status_fields: frozenset[str] | None = None
    #: Kinds of owned children whose changes wake this controller only (not the resource's other controllers).
    owns: frozenset[str] = frozenset()

    #: A finalizer of the kind's own (never kopf's legacy one), set by its reconcile where it needs one (children
    #: no ownerReference can reach: in other clusters); while the object is being deleted `finalize(obj, ctx)` runs
    #: until it returns None (done: the manager removes the finalizer), else the seconds after which to try again.
    finalizer: str | None = None
    finalize: Callable[[dict[str, Any], Context], Awaitable[float | None]] | None = None

    @property
    def resource_kind(self) -> str:
        return self.resource or self.kind


def generation(body: Any) -> int | None:
    return (body.get("metadata") or {}).get("generation")


def first_error(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"`spec.{loc}`: {err['msg']}")
    return "; ".join(parts)


def default_event_type(c: dict[str, Any]) -> str:
    """A transition's Event: a Warning when a health condition turns False, else Normal."""
    return "Warning" if c["status"] == "False" and c["type"] in HEALTH_CONDITIONS else "Normal"


def condition_notes(old: list[dict[str, Any]] | None, new: list[dict[str, Any]] | None,
                    event_for: Callable[[dict[str, Any]], str | None] = default_event_type) -> list[Note]:
    """One note per condition whose status or reason moved (the transitions a status write records),
    as the kind's `event_for` judges them (None: no note)."""
    from ..resources import conditions as cond

    notes = []
    for c in cond.transitions(old, new):
        if (kind := event_for(c)) is None:
            continue
        notes.append(Note(c.get("reason") or c["type"], c.get("message") or f"{c['type']} is {c['status']}", kind == "Warning"))
    return notes


#: Condition types whose False means something is wrong (a Warning Event), per kind convention.
HEALTH_CONDITIONS = frozenset({"Ready", "Succeeded", "Validated", "ArtifactAvailable", "LineageConsistent", "LearningSignal", "Improved"})
