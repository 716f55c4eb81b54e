"""Fault injection and request accounting of the embedded API server.

``FaultConfig`` says how often (``rate``, per request) and which faults hit the requests of
which clients (``user_agents``: User-Agent prefixes). ``FaultInjector`` draws them from one
seeded ``random.Random``, so a sequential client sees the same faults on every run, and
counts what it injected. Faults never happen unless configured (the default rate is 0).

``RequestCounter`` counts every request by client, verb, resource and response code, as the
numbers a benchmark or a write-budget test asks for ("how many PATCHes did the operator send").
"""

from __future__ import annotations

import collections
import random
import threading
from dataclasses import asdict, dataclass, field, fields
from typing import Any

ALL_FAULTS = ("500", "429", "409", "slow", "watch-close", "410")
DEFAULT_TARGETS = ("kopf", "perennial-operator")


@dataclass(frozen=True)
class FaultConfig:
    """What to inject; ``FaultConfig()`` injects nothing.

    rate: probability per targeted request (0..1) that one fault applicable to it is injected.
    faults: the kinds to choose from (``ALL_FAULTS``): ``500`` InternalError; ``429`` TooManyRequests
        with ``Retry-After: retry_after_seconds``; ``409`` Conflict (updates and patches only);
        ``slow`` the response delayed by ``slow_ms``; ``watch-close`` a watch stream ended after
        a random ``watch_close_after`` seconds (min, max); ``410`` a watch from a
        ``resourceVersion`` answered with one ERROR event carrying 410 Expired.
    seed: seeds the draws (None: random).
    user_agents: User-Agent prefixes of the clients faults hit (kopf, the operator's own client).
    """

    rate: float = 0.0
    faults: tuple[str, ...] = ALL_FAULTS
    seed: int | None = None
    user_agents: tuple[str, ...] = DEFAULT_TARGETS
    retry_after_seconds: int = 1
    slow_ms: int = 200
    watch_close_after: tuple[float, float] = (0.05, 1.0)

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.rate) <= 1.0:
            raise ValueError(f"rate must be between 0 and 1, not {self.rate!r}")
        object.__setattr__(self, "faults", tuple(self.faults))
        object.__setattr__(self, "user_agents", tuple(self.user_agents))
        object.__setattr__(self, "watch_close_after", tuple(float(x) for x in self.watch_close_after))
        unknown = [f for f in self.faults if f not in ALL_FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; known: {', '.join(ALL_FAULTS)}")
        lo, hi = self.watch_close_after
        if not 0 <= lo <= hi:
            raise ValueError("watch_close_after must be (min, max) seconds with 0 <= min <= max")
        if self.retry_after_seconds < 0 or self.slow_ms < 0:
            raise ValueError("retry_after_seconds and slow_ms must not be negative")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["faults"], out["user_agents"] = list(self.faults), list(self.user_agents)
        out["watch_close_after"] = list(self.watch_close_after)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "FaultConfig":
        """From JSON (the debug endpoint); unknown keys are an error, absent ones take their defaults."""
        if not isinstance(data, dict):
            raise ValueError("a fault configuration must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fields {unknown}; known: {', '.join(sorted(known))}")
        return cls(**data)


@dataclass
class Fault:
    """One fault drawn for one request."""

    kind: str
    close_after: float = 0.0  # watch-close: seconds


class FaultInjector:
    """Draws faults per request under a :class:`FaultConfig`; thread-safe; counts by kind."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        self._lock = threading.Lock()
        self.configure(config or FaultConfig())

    def configure(self, config: FaultConfig) -> None:
        with self._lock:
            self.config = config
            self._rng = random.Random(config.seed)
            self.injected: collections.Counter[str] = collections.Counter()

    def draw(self, user_agent: str, verb: str, watch_from_version: bool) -> Fault | None:
        """The fault for a request of ``verb`` (kube-apiserver's verbs), or None."""
        config = self.config
        if config.rate <= 0.0 or not user_agent.startswith(config.user_agents):
            return None
        applicable = [f for f in config.faults
                      if (f != "409" or verb in ("update", "patch"))
                      and (f != "watch-close" or verb == "watch")
                      and (f != "410" or (verb == "watch" and watch_from_version))]
        with self._lock:
            if not applicable or self._rng.random() >= config.rate:
                return None
            kind = self._rng.choice(applicable)
            lo, hi = config.watch_close_after
            fault = Fault(kind, self._rng.uniform(lo, hi) if kind == "watch-close" else 0.0)
            self.injected[kind] += 1
        return fault

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.injected)


# --------------------------------------------------------------------------- request accounting


def client_of(user_agent: str, known: tuple[str, ...]) -> str:
    """The first of ``known`` the User-Agent starts with (``kopf/1.45.0`` → ``kopf``), else ``other``."""
    for prefix in known:
        if user_agent.startswith(prefix):
            return prefix
    return "other"


@dataclass
class RequestCounter:
    """Counts of requests by (client, verb, resource, code); ``resource`` is ``group/plural[/subresource]``
    (``pods`` for the core group). Increments happen on the server's event loop thread; snapshots copy."""

    clients: tuple[str, ...] = ("kopf", "perennial-operator", "kubectl", "OpenAPI-Generator")
    counts: collections.Counter = field(default_factory=collections.Counter)

    def add(self, client: str, verb: str, resource: str, code: int) -> None:
        self.counts[(client, verb, resource, code)] += 1

    def snapshot(self) -> dict[str, Any]:
        """``{"total": n, "requests": [{"client", "verb", "resource", "code", "count"}, ...]}`` (sorted)."""
        items = sorted(dict(self.counts).items())
        return {"total": sum(n for _, n in items),
                "requests": [{"client": c, "verb": v, "resource": r, "code": code, "count": n}
                             for (c, v, r, code), n in items]}

    def count(self, client: str | None = None, verb: str | None = None, resource: str | None = None,
              code: int | None = None) -> int:
        """The number of requests matching every given criterion."""
        return sum(n for (c, v, r, k), n in list(self.counts.items())
                   if (client is None or c == client) and (verb is None or v == verb)
                   and (resource is None or r == resource) and (code is None or k == code))

    def reset(self) -> None:
        self.counts = collections.Counter()
