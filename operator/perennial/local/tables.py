"""Server-side Table columns of built-in kinds (what ``kubectl get`` prints), close to kube-apiserver's."""

from __future__ import annotations

import datetime as _dt
from typing import Any, Callable

Column = tuple[str, str, int, Callable[[dict], Any]]  # name, type, priority, cell


def human_age(ts: str | None) -> str | None:
    """``kubectl``-style short durations: 45s, 3m20s, 25m, 5h, 3d."""
    if not ts:
        return None
    try:
        then = _dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        return ts
    secs = max(int((_dt.datetime.now(_dt.timezone.utc) - then).total_seconds()), 0)
    if secs < 120:
        return f"{secs}s"
    mins = secs // 60
    if mins < 10:
        return f"{mins}m{secs % 60}s" if secs % 60 else f"{mins}m"
    if mins < 180:
        return f"{mins}m"
    hours = mins // 60
    if hours < 48:
        return f"{hours}h"
    return f"{hours // 24}d"


def _g(obj: Any, *path: str, default: Any = None) -> Any:
    for p in path:
        if not isinstance(obj, dict):
            return default
        obj = obj.get(p)
    return default if obj is None else obj


def _name(o: dict) -> str:
    return o["metadata"]["name"]


def _age(o: dict) -> str | None:
    return human_age(_g(o, "metadata", "creationTimestamp"))


NAME: Column = ("Name", "string", 0, _name)
AGE: Column = ("Age", "string", 0, _age)


def _pod_ready(o: dict) -> str:
    statuses = _g(o, "status", "containerStatuses", default=[])
    total = len(_g(o, "spec", "containers", default=[]))
    return f"{sum(1 for s in statuses if s.get('ready'))}/{total}"


def _pod_status(o: dict) -> str:
    if _g(o, "metadata", "deletionTimestamp"):
        return "Terminating"
    for s in _g(o, "status", "containerStatuses", default=[]):
        waiting = _g(s, "state", "waiting", "reason")
        if waiting:
            return waiting
        terminated = _g(s, "state", "terminated", "reason")
        if terminated and _g(o, "status", "phase") not in ("Succeeded", "Failed"):
            return terminated
    return _g(o, "status", "reason") or _g(o, "status", "phase", default="Pending")


def _pod_restarts(o: dict) -> int:
    return sum(int(s.get("restartCount", 0)) for s in _g(o, "status", "containerStatuses", default=[]))


def _ports(o: dict) -> str:
    ports = _g(o, "spec", "ports", default=[])
    return ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in ports) or "<none>"


def _job_status(o: dict) -> str:
    for c in _g(o, "status", "conditions", default=[]):
        if c.get("status") == "True" and c.get("type") in ("Complete", "Failed", "Suspended"):
            return c["type"]
    return "Running"


def _job_duration(o: dict) -> str | None:
    start = _g(o, "status", "startTime")
    if not start:
        return None
    end = _g(o, "status", "completionTime")
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    try:
        t0 = _dt.datetime.strptime(start, fmt)
        t1 = _dt.datetime.strptime(end, fmt) if end else _dt.datetime.utcnow()
    except ValueError:
        return None
    secs = max(int((t1 - t0).total_seconds()), 0)
    return f"{secs}s" if secs < 120 else f"{secs // 60}m"


def _event_object(o: dict) -> str:
    ref = o.get("involvedObject") or o.get("regarding") or {}
    return f"{str(ref.get('kind', '')).lower()}/{ref.get('name', '')}"


def _event_last_seen(o: dict) -> str | None:
    ts = o.get("lastTimestamp") or o.get("eventTime") or _g(o, "series", "lastObservedTime") \
        or _g(o, "metadata", "creationTimestamp")
    if isinstance(ts, str) and "." in ts:
        ts = ts.split(".")[0] + "Z"
    return human_age(ts)


def _hpa_targets(o: dict) -> str:
    """kubectl's TARGETS column: ``cpu: 40%/80%`` (current/target; ``<unknown>`` before the first status)."""
    current = _g(o, "status", "currentMetrics", default=[]) or []
    out = []
    metrics = _g(o, "spec", "metrics", default=[]) or []
    for i, m in enumerate(metrics[:4]):
        kind = (m.get("type") or "").lower()
        source, now = m.get(kind) or {}, ((current[i] if i < len(current) else {}) or {}).get(kind) or {}
        target, value = source.get("target") or {}, now.get("current") or {}
        if kind == "resource" or kind == "containerresource":
            if "averageValue" in target:
                out.append(f"{source.get('name')}: {value.get('averageValue', '<unknown>')}/{target['averageValue']}")
            else:
                cur = f"{value['averageUtilization']}%" if "averageUtilization" in value else "<unknown>"
                goal = f"{target['averageUtilization']}%" if "averageUtilization" in target else "<auto>"
                out.append(f"{source.get('name')}: {cur}/{goal}")
        elif "averageValue" in target:
            suffix = " (avg)" if kind in ("object", "external") else ""
            out.append(f"{value.get('averageValue', '<unknown>')}/{target['averageValue']}{suffix}")
        else:
            out.append(f"{value.get('value', '<unknown>')}/{target.get('value', '<unknown>')}")
    if len(metrics) > 4:
        out[-1] += f" + {len(metrics) - 4} more..."
    return ", ".join(out) or "<none>"


BUILTIN_COLUMNS: dict[tuple[str, str], list[Column]] = {
    ("", "pods"): [NAME, ("Ready", "string", 0, _pod_ready), ("Status", "string", 0, _pod_status),
                   ("Restarts", "integer", 0, _pod_restarts), AGE,
                   ("IP", "string", 1, lambda o: _g(o, "status", "podIP", default="<none>")),
                   ("Node", "string", 1, lambda o: _g(o, "spec", "nodeName", default="<none>"))],
    ("", "namespaces"): [NAME, ("Status", "string", 0, lambda o: _g(o, "status", "phase", default="Active")), AGE],
    ("", "configmaps"): [NAME, ("Data", "integer", 0, lambda o: len(o.get("data") or {}) +
                                len(o.get("binaryData") or {})), AGE],
    ("", "secrets"): [NAME, ("Type", "string", 0, lambda o: o.get("type", "Opaque")),
                      ("Data", "integer", 0, lambda o: len(o.get("data") or {})), AGE],
    ("", "services"): [NAME, ("Type", "string", 0, lambda o: _g(o, "spec", "type", default="ClusterIP")),
                       ("Cluster-IP", "string", 0, lambda o: _g(o, "spec", "clusterIP", default="<none>")),
                       ("External-IP", "string", 0, lambda o: ",".join(_g(o, "spec", "externalIPs", default=[]))
                        or "<none>"),
                       ("Port(s)", "string", 0, _ports), AGE,
                       ("Selector", "string", 1, lambda o: ",".join(
                           f"{k}={v}" for k, v in _g(o, "spec", "selector", default={}).items()) or "<none>")],
    ("", "persistentvolumeclaims"): [
        NAME, ("Status", "string", 0, lambda o: _g(o, "status", "phase", default="Pending")),
        ("Volume", "string", 0, lambda o: _g(o, "spec", "volumeName", default="")),
        ("Capacity", "string", 0, lambda o: _g(o, "status", "capacity", "storage", default="")),
        ("Access Modes", "string", 0, lambda o: ",".join(_g(o, "spec", "accessModes", default=[]))),
        ("StorageClass", "string", 0, lambda o: _g(o, "spec", "storageClassName", default="<unset>")), AGE],
    ("", "serviceaccounts"): [NAME, ("Secrets", "integer", 0, lambda o: len(o.get("secrets") or [])), AGE],
    ("", "events"): [("Last Seen", "string", 0, _event_last_seen), ("Type", "string", 0, lambda o: o.get("type")),
                     ("Reason", "string", 0, lambda o: o.get("reason")), ("Object", "string", 0, _event_object),
                     ("Message", "string", 0, lambda o: o.get("message") or o.get("note")),
                     ("Name", "string", 1, _name)],
    ("events.k8s.io", "events"): [("Last Seen", "string", 0, _event_last_seen),
                                  ("Type", "string", 0, lambda o: o.get("type")),
                                  ("Reason", "string", 0, lambda o: o.get("reason")),
                                  ("Object", "string", 0, _event_object),
                                  ("Message", "string", 0, lambda o: o.get("note")), ("Name", "string", 1, _name)],
    ("apps", "deployments"): [
        NAME, ("Ready", "string", 0, lambda o: f"{_g(o, 'status', 'readyReplicas', default=0)}/"
                                               f"{_g(o, 'spec', 'replicas', default=1)}"),
        ("Up-to-date", "integer", 0, lambda o: _g(o, "status", "updatedReplicas", default=0)),
        ("Available", "integer", 0, lambda o: _g(o, "status", "availableReplicas", default=0)), AGE],
    ("apps", "replicasets"): [
        NAME, ("Desired", "integer", 0, lambda o: _g(o, "spec", "replicas", default=1)),
        ("Current", "integer", 0, lambda o: _g(o, "status", "replicas", default=0)),
        ("Ready", "integer", 0, lambda o: _g(o, "status", "readyReplicas", default=0)), AGE],
    ("batch", "jobs"): [
        NAME, ("Status", "string", 0, _job_status),
        ("Completions", "string", 0, lambda o: f"{_g(o, 'status', 'succeeded', default=0)}/"
                                               f"{_g(o, 'spec', 'completions', default=1)}"),
        ("Duration", "string", 0, _job_duration), AGE],
    ("autoscaling", "horizontalpodautoscalers"): [
        NAME, ("Reference", "string", 0, lambda o: f"{_g(o, 'spec', 'scaleTargetRef', 'kind', default='')}/"
                                                   f"{_g(o, 'spec', 'scaleTargetRef', 'name', default='')}"),
        ("Targets", "string", 0, _hpa_targets),
        ("MinPods", "integer", 0, lambda o: _g(o, "spec", "minReplicas", default=1)),
        ("MaxPods", "integer", 0, lambda o: _g(o, "spec", "maxReplicas")),
        ("Replicas", "integer", 0, lambda o: _g(o, "status", "currentReplicas", default=0)), AGE],
    ("policy", "poddisruptionbudgets"): [
        NAME, ("Min Available", "string", 0, lambda o: str(_g(o, "spec", "minAvailable", default="N/A"))),
        ("Max Unavailable", "string", 0, lambda o: str(_g(o, "spec", "maxUnavailable", default="N/A"))),
        ("Allowed Disruptions", "integer", 0, lambda o: _g(o, "status", "disruptionsAllowed", default=0)), AGE],
    ("networking.k8s.io", "networkpolicies"): [
        NAME, ("Pod-Selector", "string", 0, lambda o: ",".join(
            f"{k}={v}" for k, v in sorted((_g(o, "spec", "podSelector", "matchLabels", default={}) or {}).items())) or "<none>"), AGE],
    ("apiextensions.k8s.io", "customresourcedefinitions"): [
        NAME, ("Created At", "date", 0, lambda o: _g(o, "metadata", "creationTimestamp"))],
}
