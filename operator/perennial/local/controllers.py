"""The local runtime's controller-manager for apps/v1: Deployment -> ReplicaSet -> Pods, as kube-controller-manager does.

Event-driven from the embedded store's watch (`informers.StoreReader`), one worker thread, writes through the API.

Deployment controller:
- the ReplicaSet of the current template is `<deployment>-<pod-template-hash>`; its selector, labels and pod
  template carry `pod-template-hash`. The hash is Kubernetes' own recipe (FNV-1a 32 of the template, plus the
  `collisionCount` when set, written as a decimal string through `rand.SafeEncodeString`) with one difference:
  Kubernetes hashes go-spew's dump of the Go struct, here it is the canonical JSON of the defaulted template
  (sorted keys). So the names have the same form and change exactly when the template changes, but are not
  byte-for-byte the ones a real cluster would pick. A name taken by a ReplicaSet of another template bumps
  `status.collisionCount`, as in Kubernetes.
- `RollingUpdate` (maxSurge/maxUnavailable, ints or percentages; surge rounds up, unavailable down, both 0 means
  1 unavailable) scales the new ReplicaSet up within `replicas + maxSurge` and the old ones down keeping
  `replicas - maxUnavailable` available (unhealthy old replicas go first), as `rolloutRolling` does; `Recreate`
  scales the old ReplicaSets to 0, waits until their pods are gone, then scales the new one up. Without a
  template change the same code only scales. `paused` stops rollouts. Old ReplicaSets beyond
  `revisionHistoryLimit` (at 0 replicas) are deleted. Annotations `deployment.kubernetes.io/revision`,
  `desired-replicas`, `max-replicas` as Kubernetes writes them.
- status: `observedGeneration`, `replicas`, `updatedReplicas`, `readyReplicas`, `availableReplicas`,
  `unavailableReplicas`, `collisionCount`, conditions `Available` (MinimumReplicasAvailable /
  MinimumReplicasUnavailable) and `Progressing` (NewReplicaSetCreated, FoundNewReplicaSet, ReplicaSetUpdated,
  NewReplicaSetAvailable, and `False`/ProgressDeadlineExceeded once nothing progressed for
  `progressDeadlineSeconds`), with Kubernetes' messages.
Not done: adopting orphaned ReplicaSets/Pods by selector (only owned ones are counted), proportional scaling of
several old ReplicaSets mid-rollout (the rolling algorithm converges instead), rollback (`rollbackTo`).

ReplicaSet controller: creates `<rs>-<5 chars>` pods (template labels/annotations, controller ownerReference)
or deletes the surplus ranked as `ActivePods` ranks them (unscheduled, pending, not ready, ready for less time,
more restarts, newer first); status `replicas`, `fullyLabeledReplicas`, `readyReplicas`, `availableReplicas`
(ready for `minReadySeconds`), `observedGeneration`, a `ReplicaFailure` condition when a pod can't be created.
Deleting a Deployment or ReplicaSet removes its children through the API server's ownerReference garbage
collection (`store.py`), as in a cluster.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import math
import threading
from typing import Any

from ..kube.client import ApiError, Kube
from .informers import Api, LoopThread, StoreReader, WorkQueue, controller_of

__all__ = ["LocalControllerManager", "pod_template_hash", "safe_encode_string"]

log = logging.getLogger(__name__)

HASH_LABEL = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"
DESIRED = "deployment.kubernetes.io/desired-replicas"
MAX_REPLICAS = "deployment.kubernetes.io/max-replicas"
_ALPHANUMS = "bcdfghjklmnpqrstvwxz2456789"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ts(value: Any) -> float | None:
    try:
        return _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _time() -> float:
    return _dt.datetime.now(_dt.timezone.utc).timestamp()


def safe_encode_string(s: str) -> str:
    """k8s.io/apimachinery/pkg/util/rand.SafeEncodeString: each byte -> one of 27 consonants/digits."""
    return "".join(_ALPHANUMS[b % len(_ALPHANUMS)] for b in s.encode())


def pod_template_hash(template: dict, collision_count: int | None = None) -> str:
    """`controller.ComputeHash`: FNV-1a 32 over the template (canonical JSON here, go-spew there) and the
    collision count, written in decimal through SafeEncodeString."""
    h = 0x811C9DC5
    data = json.dumps(template or {}, sort_keys=True, separators=(",", ":")).encode()
    if collision_count is not None:
        data += int(collision_count).to_bytes(4, "little")  # Go writes the uint32 little-endian
    for b in data:
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return safe_encode_string(str(h))


def _int_or_percent(value: Any, total: int, round_up: bool) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    text = str(value)
    if text.endswith("%"):
        frac = float(text[:-1]) * total / 100.0
        return int(math.ceil(frac) if round_up else math.floor(frac))
    return int(text)


def _surge_unavailable(d: dict) -> tuple[int, int]:
    spec = d.get("spec") or {}
    replicas = int(spec.get("replicas", 1))
    strategy = spec.get("strategy") or {}
    if strategy.get("type") == "Recreate":
        return 0, 0
    ru = strategy.get("rollingUpdate") or {}
    surge = _int_or_percent(ru.get("maxSurge", "25%"), replicas, True)
    unavailable = _int_or_percent(ru.get("maxUnavailable", "25%"), replicas, False)
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, min(unavailable, replicas)


def _without_hash(template: dict) -> dict:
    t = copy.deepcopy(template or {})
    labels = (t.get("metadata") or {}).get("labels")
    if labels is not None:
        labels.pop(HASH_LABEL, None)
        if not labels:
            t["metadata"].pop("labels")
    if t.get("metadata") == {}:
        t.pop("metadata")
    return t


def _pod_ready(pod: dict) -> tuple[bool, float | None]:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True", _ts(c.get("lastTransitionTime"))
    return False, None


def _active(pod: dict) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def _revision(rs: dict) -> int:
    try:
        return int(((rs["metadata"].get("annotations") or {}).get(REVISION)) or 0)
    except ValueError:
        return 0


def _condition(conditions: list[dict], type_: str) -> dict | None:
    for c in conditions:
        if c.get("type") == type_:
            return c
    return None


class LocalControllerManager:
    """The apps/v1 Deployment and ReplicaSet controllers of the local runtime (see the module docstring)."""

    def __init__(self, kube: Kube, server_handle: Any, *, loop: LoopThread | None = None) -> None:
        self.kube = Api(kube)
        self._own_loop = loop is None
        self.loop = loop or LoopThread("perennial-controller-manager")
        self.reader = StoreReader(server_handle, self.loop)
        self.queue = WorkQueue()
        self._thread: threading.Thread | None = None
        self._failures: dict[Any, int] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "LocalControllerManager":
        self.loop.start()
        self._thread = threading.Thread(target=self._work, name="perennial-controller-manager", daemon=True)
        self._thread.start()
        self.reader.watch("apps", "v1", "deployments", self._on_deployment)
        self.reader.watch("apps", "v1", "replicasets", self._on_replicaset)
        self.reader.watch("", "v1", "pods", self._on_pod)
        log.info("Started the local controller-manager (apps/v1 Deployments, ReplicaSets)")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.queue.shutdown()
        self.reader.close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._own_loop:
            self.loop.stop()

    # ------------------------------------------------------------------ events -> keys

    def _on_deployment(self, etype: str, d: dict) -> None:
        self.queue.add(("Deployment", d["metadata"]["namespace"], d["metadata"]["name"]))

    def _on_replicaset(self, etype: str, rs: dict) -> None:
        meta = rs["metadata"]
        self.queue.add(("ReplicaSet", meta["namespace"], meta["name"]))
        ref = controller_of(rs)
        if ref and ref.get("kind") == "Deployment" and str(ref.get("apiVersion", "")).startswith("apps/"):
            self.queue.add(("Deployment", meta["namespace"], ref["name"]))

    def _on_pod(self, etype: str, pod: dict) -> None:
        ref = controller_of(pod)
        if ref and ref.get("kind") == "ReplicaSet" and str(ref.get("apiVersion", "")).startswith("apps/"):
            self.queue.add(("ReplicaSet", pod["metadata"]["namespace"], ref["name"]))

    def _work(self) -> None:
        while True:
            key = self.queue.get()
            if key is None:
                return
            try:
                kind, ns, name = key  # type: ignore[misc]
                if kind == "Deployment":
                    self.sync_deployment(ns, name)
                else:
                    self.sync_replicaset(ns, name)
                self._failures.pop(key, None)
            except Exception as exc:  # a conflict, the server going away: try again with backoff
                n = self._failures[key] = self._failures.get(key, 0) + 1
                level = logging.DEBUG if isinstance(exc, ApiError) and exc.status == 409 else logging.WARNING
                log.log(level, "Local controller sync failed key=%s attempt=%d: %s", key, n, exc, exc_info=level == logging.WARNING)
                self.queue.add_after(key, min(0.05 * 2 ** n, 10.0))
            finally:
                self.queue.done(key)

    # ------------------------------------------------------------------ ReplicaSet

    def _owned_pods(self, ns: str, uid: str) -> list[dict]:
        return [p for p in self.reader.list("", "v1", "pods", ns) if (controller_of(p) or {}).get("uid") == uid]

    def sync_replicaset(self, ns: str, name: str) -> None:
        rs = self.reader.get("apps", "v1", "replicasets", ns, name)
        if rs is None:
            return
        meta, spec = rs["metadata"], rs.get("spec") or {}
        pods = self._owned_pods(ns, meta["uid"])
        active = [p for p in pods if _active(p)]
        want = int(spec.get("replicas", 1)) if not meta.get("deletionTimestamp") else len(active)
        failure: str | None = None
        if len(active) < want:
            for _ in range(want - len(active)):
                try:
                    self.kube.create(self._pod_for(rs))
                except ApiError as exc:
                    failure = exc.message
                    log.warning("Could not create a pod replicaset=%s namespace=%s: %s", name, ns, failure)
                    break
        elif len(active) > want:
            for pod in self._rank_for_deletion(active)[: len(active) - want]:
                self.kube.delete("v1", "Pod", ns, pod["metadata"]["name"])
        # status from what the pods say now (the new ones count from the next event on, as in Kubernetes)
        pods = self._owned_pods(ns, meta["uid"])
        active = [p for p in pods if _active(p)]
        min_ready = int(spec.get("minReadySeconds") or 0)
        now = _time()
        ready = available = 0
        recheck: float | None = None
        template_labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        labeled = sum(1 for p in active if all((p["metadata"].get("labels") or {}).get(k) == v for k, v in template_labels.items()))
        for p in active:
            is_ready, since = _pod_ready(p)
            if not is_ready:
                continue
            ready += 1
            age = now - since if since is not None else min_ready
            if age >= min_ready:
                available += 1
            else:
                recheck = min(recheck or 1e9, min_ready - age)
        old_status = rs.get("status") or {}
        conditions = [c for c in old_status.get("conditions") or [] if c.get("type") != "ReplicaFailure"]
        if failure:
            prev = _condition(old_status.get("conditions") or [], "ReplicaFailure")
            conditions.append({"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": failure,
                               "lastTransitionTime": (prev or {}).get("lastTransitionTime") or _now()})
        status: dict[str, Any] = {"replicas": len(active), "fullyLabeledReplicas": labeled, "readyReplicas": ready,
                                  "availableReplicas": available, "observedGeneration": meta.get("generation", 1)}
        if conditions:
            status["conditions"] = conditions
        if any(old_status.get(k) != v for k, v in status.items()) or (not conditions and old_status.get("conditions")):
            if not conditions and old_status.get("conditions"):
                status["conditions"] = None
            self.kube.patch_status("apps/v1", "ReplicaSet", ns, name, status)
        if recheck is not None:
            self.queue.add_after(("ReplicaSet", ns, name), recheck + 0.05)
        if failure:
            self.queue.add_after(("ReplicaSet", ns, name), 2.0)

    @staticmethod
    def _pod_for(rs: dict) -> dict:
        template = copy.deepcopy((rs.get("spec") or {}).get("template") or {})
        tmeta = template.get("metadata") or {}
        meta: dict[str, Any] = {
            "generateName": rs["metadata"]["name"] + "-",
            "namespace": rs["metadata"]["namespace"],
            "labels": tmeta.get("labels") or {},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs["metadata"]["name"],
                                 "uid": rs["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}],
        }
        if tmeta.get("annotations"):
            meta["annotations"] = tmeta["annotations"]
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template.get("spec") or {}}

    @staticmethod
    def _rank_for_deletion(pods: list[dict]) -> list[dict]:
        """`controller.ActivePods` order: the pods to delete first come first."""
        phase_rank = {"Pending": 0, "Unknown": 1, "Running": 2}

        def key(p: dict) -> tuple:
            status = p.get("status") or {}
            ready, since = _pod_ready(p)
            restarts = sum(int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or [])
            created = _ts(p["metadata"].get("creationTimestamp")) or 0.0
            return (bool((p.get("spec") or {}).get("nodeName")), phase_rank.get(status.get("phase", "Pending"), 0),
                    ready, -(since or 0.0) if ready else 0.0, -restarts, -created, p["metadata"]["name"])

        return sorted(pods, key=key)

    # ------------------------------------------------------------------ Deployment

    def sync_deployment(self, ns: str, name: str) -> None:
        d = self.reader.get("apps", "v1", "deployments", ns, name)
        if d is None or d["metadata"].get("deletionTimestamp"):
            return
        meta, spec = d["metadata"], d.get("spec") or {}
        status = d.get("status") or {}
        replicas = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        rss = [rs for rs in self.reader.list("apps", "v1", "replicasets", ns) if (controller_of(rs) or {}).get("uid") == meta["uid"]]
        wanted = _without_hash(template)
        new_rs = next((rs for rs in rss if _without_hash((rs.get("spec") or {}).get("template") or {}) == wanted), None)
        old = sorted((rs for rs in rss if rs is not new_rs), key=lambda rs: (_revision(rs), rs["metadata"].get("creationTimestamp", "")))
        surge, unavailable = _surge_unavailable(d)
        desired: dict[str, int] = {rs["metadata"]["name"]: int((rs.get("spec") or {}).get("replicas", 0)) for rs in rss}
        created_name: str | None = None
        collision = status.get("collisionCount")
        strategy = (spec.get("strategy") or {}).get("type", "RollingUpdate")

        if not spec.get("paused"):
            old_pods_left = strategy == "Recreate" and any(
                _active(p) or p["metadata"].get("deletionTimestamp") for rs in old for p in self._owned_pods(ns, rs["metadata"]["uid"]))
            if strategy == "Recreate":
                for rs in old:
                    desired[rs["metadata"]["name"]] = 0
                new_replicas = replicas if not old_pods_left else (desired.get(new_rs["metadata"]["name"], 0) if new_rs else 0)
            else:
                current = sum(desired.values())
                have = desired.get(new_rs["metadata"]["name"], 0) if new_rs else 0
                if have >= replicas:
                    new_replicas = replicas
                else:
                    room = max(0, replicas + surge - current)
                    new_replicas = have + min(room, replicas - have)
            if new_rs is None:
                new_rs, collision = self._create_rs(d, template, new_replicas, old, collision, surge)
                if new_rs is None:
                    return  # a name collision: collisionCount was bumped; the next event retries
                created_name = new_rs["metadata"]["name"]
                rss.append(new_rs)
            desired[new_rs["metadata"]["name"]] = new_replicas
            if strategy != "Recreate":
                self._scale_down_old(desired, new_rs, old, replicas, unavailable)
            max_old = max([_revision(rs) for rs in old] + [0])
            # a template that comes back (its old ReplicaSet is the new one again) gets the next revision
            revision = str(max_old + 1) if created_name is None and _revision(new_rs) <= max_old else None
            for rs in rss:
                rs_name = rs["metadata"]["name"]
                annotations = rs["metadata"].get("annotations") or {}
                patch: dict[str, Any] = {}
                want_ann = {DESIRED: str(replicas), MAX_REPLICAS: str(replicas + surge)} if rs is new_rs or desired[rs_name] else {}
                if rs is new_rs and revision is not None:
                    want_ann[REVISION] = revision
                ann_patch = {k: v for k, v in want_ann.items() if annotations.get(k) != v}
                if ann_patch:
                    patch["metadata"] = {"annotations": ann_patch}
                if int((rs.get("spec") or {}).get("replicas", 0)) != desired[rs_name]:
                    patch["spec"] = {"replicas": desired[rs_name]}
                if patch and rs_name != created_name:
                    self.kube.patch("apps/v1", "ReplicaSet", ns, rs_name, patch)
            self._cleanup_history(d, old, desired)
            rev = str(_revision(new_rs) or revision or "")
            if rev and (meta.get("annotations") or {}).get(REVISION) != rev:
                self.kube.patch("apps/v1", "Deployment", ns, name, {"metadata": {"annotations": {REVISION: rev}}})
        self._write_status(d, new_rs, rss, replicas, unavailable, created_name, collision)

    def _create_rs(self, d: dict, template: dict, replicas: int, old: list[dict], collision: int | None,
                   surge: int) -> tuple[dict | None, int | None]:
        meta, spec = d["metadata"], d.get("spec") or {}
        h = pod_template_hash(template, collision)
        tpl = copy.deepcopy(template)
        tpl.setdefault("metadata", {}).setdefault("labels", {})[HASH_LABEL] = h
        selector = copy.deepcopy(spec.get("selector") or {})
        selector.setdefault("matchLabels", {})[HASH_LABEL] = h
        revision = max([_revision(rs) for rs in old] + [0]) + 1
        body = {
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": f"{meta['name']}-{h}", "namespace": meta["namespace"],
                         "labels": dict(tpl["metadata"]["labels"]),
                         "annotations": {REVISION: str(revision), DESIRED: str(spec.get("replicas", 1)),
                                         MAX_REPLICAS: str(int(spec.get("replicas", 1)) + surge)},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"],
                                              "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]},
            "spec": {"replicas": replicas, "minReadySeconds": int(spec.get("minReadySeconds") or 0),
                     "selector": selector, "template": tpl},
        }
        try:
            return self.kube.create(body), collision
        except ApiError as exc:
            if exc.status != 409:
                raise
        existing = self.reader.get("apps", "v1", "replicasets", meta["namespace"], body["metadata"]["name"])
        if existing is not None and (controller_of(existing) or {}).get("uid") == meta["uid"] and \
                _without_hash((existing.get("spec") or {}).get("template") or {}) == _without_hash(template):
            return existing, collision
        collision = (collision or 0) + 1
        log.info("ReplicaSet name collision deployment=%s namespace=%s collisionCount=%d", meta["name"], meta["namespace"], collision)
        self.kube.patch_status("apps/v1", "Deployment", meta["namespace"], meta["name"], {"collisionCount": collision})
        return None, collision

    @staticmethod
    def _scale_down_old(desired: dict[str, int], new_rs: dict, old: list[dict], replicas: int, unavailable: int) -> None:
        """`reconcileOldReplicaSets`: unhealthy old replicas first, then as many as availability allows."""
        new_name = new_rs["metadata"]["name"]
        all_pods = sum(desired.values())
        min_available = replicas - unavailable
        new_unavailable = desired[new_name] - int((new_rs.get("status") or {}).get("availableReplicas") or 0)
        max_down = all_pods - min_available - max(0, new_unavailable)
        if max_down <= 0:
            return
        for rs in old:
            n = rs["metadata"]["name"]
            unhealthy = desired[n] - int((rs.get("status") or {}).get("availableReplicas") or 0)
            if unhealthy <= 0 or max_down <= 0:
                continue
            down = min(unhealthy, max_down, desired[n])
            desired[n] -= down
            max_down -= down
        available = int((new_rs.get("status") or {}).get("availableReplicas") or 0) + sum(
            min(desired[rs["metadata"]["name"]], int((rs.get("status") or {}).get("availableReplicas") or 0)) for rs in old)
        total_down = min(available - min_available, max_down)
        for rs in old:
            if total_down <= 0:
                break
            n = rs["metadata"]["name"]
            down = min(desired[n], total_down)
            desired[n] -= down
            total_down -= down

    def _cleanup_history(self, d: dict, old: list[dict], desired: dict[str, int]) -> None:
        limit = (d.get("spec") or {}).get("revisionHistoryLimit", 10)
        idle = [rs for rs in old if desired[rs["metadata"]["name"]] == 0 and not int((rs.get("status") or {}).get("replicas") or 0)]
        for rs in idle[: max(0, len(idle) - int(limit))]:
            self.kube.delete("apps/v1", "ReplicaSet", rs["metadata"]["namespace"], rs["metadata"]["name"])

    def _write_status(self, d: dict, new_rs: dict | None, rss: list[dict], replicas: int, unavailable: int,
                      created_name: str | None, collision: int | None) -> None:
        meta, spec = d["metadata"], d.get("spec") or {}
        old_status = d.get("status") or {}
        ns, name = meta["namespace"], meta["name"]
        fresh = [self.reader.get("apps", "v1", "replicasets", ns, rs["metadata"]["name"]) or rs for rs in rss]
        new_fresh = next((rs for rs in fresh if new_rs is not None and rs["metadata"]["name"] == new_rs["metadata"]["name"]), None)

        def total(field: str) -> int:
            return sum(int((rs.get("status") or {}).get(field) or 0) for rs in fresh)

        status: dict[str, Any] = {
            "observedGeneration": meta.get("generation", 1),
            "replicas": total("replicas"),
            "updatedReplicas": int(((new_fresh or {}).get("status") or {}).get("replicas") or 0),
            "readyReplicas": total("readyReplicas"),
            "availableReplicas": total("availableReplicas"),
        }
        unavailable_now = max(0, replicas - status["availableReplicas"])
        status["unavailableReplicas"] = unavailable_now
        if collision is not None:
            status["collisionCount"] = collision
        now = _now()
        conditions = [dict(c) for c in old_status.get("conditions") or []]

        def set_condition(type_: str, cstatus: str, reason: str, message: str, progress: bool = False) -> None:
            prev = _condition(conditions, type_)
            if prev is not None and prev.get("status") == cstatus and prev.get("reason") == reason and not progress:
                if prev.get("message") != message:
                    prev["message"] = message
                return
            cond = {"type": type_, "status": cstatus, "lastUpdateTime": now, "reason": reason, "message": message,
                    "lastTransitionTime": prev["lastTransitionTime"] if prev is not None and prev.get("status") == cstatus else now}
            if prev is not None:
                conditions[conditions.index(prev)] = cond
            else:
                conditions.append(cond)

        if status["availableReplicas"] >= replicas - unavailable:
            set_condition("Available", "True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
        else:
            set_condition("Available", "False", "MinimumReplicasUnavailable", "Deployment does not have minimum availability.")
        rs_name = (new_rs or {}).get("metadata", {}).get("name", "")
        deadline = spec.get("progressDeadlineSeconds")
        complete = (new_rs is not None and status["updatedReplicas"] == replicas and status["replicas"] == replicas
                    and status["availableReplicas"] == replicas)
        progressed = any(status.get(k) != old_status.get(k) for k in ("updatedReplicas", "readyReplicas", "availableReplicas", "replicas")) \
            or old_status.get("observedGeneration") != status["observedGeneration"]
        prev = _condition(conditions, "Progressing")
        if spec.get("paused"):
            set_condition("Progressing", "Unknown", "DeploymentPaused", "Deployment is paused")
        elif created_name:
            set_condition("Progressing", "True", "NewReplicaSetCreated", f'Created new replica set "{created_name}"', progress=True)
        elif complete:
            set_condition("Progressing", "True", "NewReplicaSetAvailable", f'ReplicaSet "{rs_name}" has successfully progressed.')
        elif prev is None:
            set_condition("Progressing", "True", "FoundNewReplicaSet", f'Found new replica set "{rs_name}"', progress=True)
        elif progressed or prev.get("reason") == "NewReplicaSetAvailable" or prev.get("reason") == "DeploymentPaused":
            set_condition("Progressing", "True", "ReplicaSetUpdated", f'ReplicaSet "{rs_name}" is progressing.', progress=True)
        elif deadline is not None and prev.get("status") == "True":
            since = _ts(prev.get("lastUpdateTime")) or _time()
            left = since + int(deadline) - _time()
            if left <= 0:
                set_condition("Progressing", "False", "ProgressDeadlineExceeded", f'ReplicaSet "{rs_name}" has timed out progressing.')
            else:
                self.queue.add_after(("Deployment", ns, name), left + 0.1)
        prev = _condition(conditions, "Progressing")
        if deadline is not None and not complete and not spec.get("paused") and prev is not None and prev.get("status") == "True":
            since = _ts(prev.get("lastUpdateTime")) or _time()
            self.queue.add_after(("Deployment", ns, name), max(0.0, since + int(deadline) - _time()) + 0.1)
        status["conditions"] = conditions
        if any(old_status.get(k) != v for k, v in status.items()):
            self.kube.patch_status("apps/v1", "Deployment", ns, name, status)
