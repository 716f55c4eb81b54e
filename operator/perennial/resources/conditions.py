"""Conditions per the Kubernetes API conventions (pure functions)."""

from __future__ import annotations

from typing import Any

from ..api.common import now_rfc3339


def get(conditions: list[dict[str, Any]] | None, ctype: str) -> dict[str, Any] | None:
    for c in conditions or []:
        if c.get("type") == ctype:
            return c
    return None


def is_true(conditions: list[dict[str, Any]] | None, ctype: str) -> bool:
    c = get(conditions, ctype)
    return bool(c and c.get("status") == "True")


def set_condition(
    conditions: list[dict[str, Any]] | None,
    ctype: str,
    status: str | bool,
    reason: str,
    message: str = "",
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """A new list with `ctype` set; `lastTransitionTime` moves only when `status` flips."""
    if isinstance(status, bool):
        status = "True" if status else "False"
    previous = get(conditions, ctype)
    new = {"type": ctype, "status": status, "reason": reason, "message": message[:32768]}
    if generation is not None:
        new["observedGeneration"] = generation
    if previous and previous.get("status") == status and previous.get("lastTransitionTime"):
        new["lastTransitionTime"] = previous["lastTransitionTime"]
    else:
        new["lastTransitionTime"] = now_rfc3339()
    out = [c for c in conditions or [] if c.get("type") != ctype]
    out.append(new)
    return sorted(out, key=lambda c: c["type"])


def _essence(c: dict[str, Any]) -> tuple:
    return (c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration"))


def transitions(old: list[dict[str, Any]] | None, new: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Conditions of `new` whose status or reason differ from `old` (what deserves an Event)."""
    out = []
    for c in new or []:
        before = get(old, c["type"])
        if before is None or (before.get("status"), before.get("reason")) != (c.get("status"), c.get("reason")):
            out.append(c)
    return out


def conditions_differ(old: list[dict[str, Any]] | None, new: list[dict[str, Any]] | None) -> bool:
    """Whether two condition lists differ in anything but the times of unchanged conditions."""
    return sorted(map(_essence, old or [])) != sorted(map(_essence, new or []))
