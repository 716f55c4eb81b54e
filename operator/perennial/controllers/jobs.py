"""Reading a finished Job's result from its pod.

Pods and Jobs come from separate watches, so a Job can be seen finished before its pod's final
state (the container's termination message, where Perennial's Jobs put their result) arrives.
Deciding then would record a wrong outcome; instead the controller waits for the pod's event,
and gives up waiting on a pod that never comes (deleted, never started) after a grace period.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from perennial.resources import conditions as cond

#: How long a finished Job's outcome waits for its pod's final state to be seen.
POD_RESULT_GRACE_SECONDS = 30.0

#: The longest single wait before looking again (the pod's own event usually comes first).
_RECHECK_SECONDS = 5.0


def _parse(ts: Any) -> _dt.datetime | None:
    try:
        return _dt.datetime.fromisoformat(str(ts).replace("Z", "+00:00"))
    except ValueError:
        return None


def finished_at(job: dict[str, Any] | None) -> str | None:
    """When the Job finished (completionTime, else its Complete/Failed condition's transition); None if unknown or running."""
    status = (job or {}).get("status") or {}
    conds = status.get("conditions") or []
    if not (cond.is_true(conds, "Complete") or cond.is_true(conds, "Failed")):
        return None
    stamps = [c.get("lastTransitionTime") for c in conds if c.get("type") in ("Complete", "Failed") and c.get("status") == "True"]
    return status.get("completionTime") or max((s for s in stamps if s), default=None)


def pod_is_final(pod: dict[str, Any] | None) -> bool:
    status = (pod or {}).get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return True
    return any(((cs.get("state") or {}).get("terminated")) for cs in status.get("containerStatuses") or [])


def result_pending(job: dict[str, Any] | None, pods: list[dict[str, Any]], now: str) -> float | None:
    """Seconds to wait before deciding a finished Job's outcome without its pod's final state; None: decide now.

    Decide now when the Job is not finished, when a pod was seen finished, or when the Job finished
    more than POD_RESULT_GRACE_SECONDS ago (or when is unknown).
    """
    if any(pod_is_final(p) for p in pods):
        return None
    done, at = _parse(finished_at(job) or ""), _parse(now)
    if done is None or at is None:
        return None
    age = (at - done).total_seconds()
    if age >= POD_RESULT_GRACE_SECONDS:
        return None
    return max(0.5, min(_RECHECK_SECONDS, POD_RESULT_GRACE_SECONDS - age))
