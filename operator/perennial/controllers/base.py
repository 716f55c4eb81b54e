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
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import pydantic

from ..api.common import GROUP, VERSION
from ..config import OperatorConfig
from ..kube.aio import AsyncKube
from ..kube.cache import Cache

API_VERSION = f"{GROUP}/{VERSION}"

#: What an object depends on: ("apiVersion", "kind", namespace, name), or a named group of
#: objects such as (API_VERSION, "AdapterFamily", namespace, family).
Dependency = tuple[str, str, str, str]


@dataclass
class Context:
    """What a reconcile needs besides the object: clients per cluster, the cache, settings, a clock."""

    clusters: dict[str, AsyncKube]
    cache: Cache
    config: OperatorConfig
    clock: Callable[[], float]

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


@dataclass(frozen=True)
class Controller:
    kind: str
    plural: str
    status_model: type[pydantic.BaseModel]
    reconcile: Callable[[dict[str, Any], Context], Awaitable[Outcome]]
    #: The objects a change of which must wake this one (beyond its own children, found by ownerReferences).
    dependencies: Callable[[dict[str, Any]], Iterable[Dependency]] = lambda obj: ()


def generation(body: Any) -> int | None:
    return (body.get("metadata") or {}).get("generation")


def first_error(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"`spec.{loc}`: {err['msg']}")
    return "; ".join(parts)


def condition_notes(old: list[dict[str, Any]] | None, new: list[dict[str, Any]] | None) -> list[Note]:
    """One note per condition whose status or reason moved (the transitions a status write records)."""
    from ..resources import conditions as cond

    notes = []
    for c in cond.transitions(old, new):
        unhealthy = c["status"] == "False" and c["type"] in HEALTH_CONDITIONS
        notes.append(Note(c.get("reason") or c["type"], c.get("message") or f"{c['type']} is {c['status']}", unhealthy))
    return notes


#: Condition types whose False means something is wrong (a Warning Event), per kind convention.
HEALTH_CONDITIONS = frozenset({"Ready", "Succeeded", "Validated", "ArtifactAvailable", "LineageConsistent", "LearningSignal"})

EventType = Literal["Normal", "Warning"]
