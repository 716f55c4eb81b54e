"""Typed specs parsed once per object while its `spec` stays the same.

A TrainingRun's spec was parsed by pydantic on every change of the object in the cache (its dependencies), in
observe and in decide: four to six times per object to reach steady state, about 5 % of the operator's CPU per
converged object (benchmarks/operator_scale.py --profile). A `SpecCache` keeps, per object, the last `spec` it
parsed and the result (the model, or the validation error); the next object whose `spec` is the same dict, or an
equal one of the same `metadata.generation`, gets that result back. Equal JSON gives an equal parse, so this is a
cache, not a second source of truth (Python's `==` alone would take `1`, `1.0` and `true` for one another in the
parts kept as written, e.g. a JSON Schema's `const`; the API server bumps the generation on such a change).
Parsed specs are shared: read them, never change them (as the objects of the informer cache).

Bounded (least recently used first out): a parsed TrainingRunSpec holds ~6 KiB, and the parses an object needs
come close together (its events, then its reconcile), so 1,024 entries keep nearly all the hits while a burst of
new objects waits in the queue, and the memory (~7 MiB at most) does not grow with the number of objects.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Generic, TypeVar

import pydantic

M = TypeVar("M", bound=pydantic.BaseModel)


class SpecCache(Generic[M]):
    def __init__(self, model: type[M], maxsize: int = 1024):
        self.model = model
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple[str, str], tuple[Any, M | None, pydantic.ValidationError | None, Any]] = OrderedDict()

    def parse(self, obj: dict[str, Any]) -> tuple[M | None, pydantic.ValidationError | None]:
        """(the spec, None), or (None, why it is invalid); parsed once while the object's `spec` is unchanged."""
        raw = obj.get("spec") or {}
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        gen = meta.get("generation")
        entry = self._entries.get(key)
        if entry is not None and (entry[0] is raw or (entry[3] == gen and entry[0] == raw)):
            if entry[0] is not raw:  # hold the newest dict (the cache's), not an older equal one
                self._entries[key] = (raw, entry[1], entry[2], gen)
            self._entries.move_to_end(key)
            return entry[1], entry[2]
        try:
            spec, error = self.model.model_validate(raw), None
        except pydantic.ValidationError as exc:
            spec, error = None, exc
        if key[1]:
            self._entries[key] = (raw, spec, error, gen)
            self._entries.move_to_end(key)
            if len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return spec, error

    def get(self, obj: dict[str, Any]) -> M | None:
        """The spec, or None when it is invalid."""
        return self.parse(obj)[0]

    def forget(self, namespace: str, name: str) -> None:
        self._entries.pop((namespace, name), None)

    def __len__(self) -> int:
        return len(self._entries)


def _specs() -> tuple[SpecCache[Any], SpecCache[Any]]:
    from ..api.rewardspec import RewardSpecSpec
    from ..api.trainingrun import TrainingRunSpec

    return SpecCache(RewardSpecSpec), SpecCache(TrainingRunSpec)


#: the parsed specs of RewardSpecs (their controller, and the runs that grade with them) and of TrainingRuns
RUBRIC_SPECS, RUN_SPECS = _specs()
