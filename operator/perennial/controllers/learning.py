"""Continuous learning: a Deployment's new feedback becomes TrainingRuns; their Adapters are gated and rolled back.

A controller of its own, keyed by Deployment (`LEARNING`, reconciling Perennial Deployments next to the serving
controller, never inside its reconcile): a Deployment with `continuousLearning.enabled` is looked at every
`learningSeconds` (time is the trigger: the store cannot be watched), when its TrainingRuns change (they are owned
by it) and when an Adapter of its family changes. A Deployment without it costs nothing (no timer, no read).

observe (the feedback store through a `FeedbackSource`: new rated records since the last snapshot, the oldest one's
time, the last snapshot, live approval per adapter; the cache: the Deployment's TrainingRuns, the Adapters they
made, what the Deployment serves) → decide (pure, table-tested: `decide_learning`, `gate`, `worse`) → act (write
the snapshot, create the TrainingRun, mark Adapters `Promoted`) → the learning fields of the Deployment's status
(`newFeedbackRecords`, `lastTrainingRun`, `lastTrainingTime`, the `Learning` condition), written by the manager's
status writer restricted to those fields, so it never fights the serving controller over the rest.

Promotion and rollback. An Adapter made by one of this Deployment's runs gets the condition `Promoted` once it is
Ready: True (`GatePassed`) or False (`BelowMinImprovement`, `BelowMinMeanReward`, `NoEvaluation`) with the held-out
numbers against its baseline (its parent: the adapter served when its run was made) and the gate's thresholds, and an
Event on the Adapter and on the Deployment. A promoted adapter is compared, on live thumbs, with the adapter a
`track` would fall back to (`fallback_of`): the thumbs of the ratings in the last `APPROVAL_SNAPSHOTS` snapshots,
joined by response id to the interaction (and so the adapter) they rate. "Worse" with little data (`worse`) needs at least
`ROLLBACK_MIN_SAMPLES` thumbs on each side, a drop of at least `ROLLBACK_MIN_DROP` and a one-sided Fisher exact test
below `ROLLBACK_ALPHA` (strict, as it is repeated); then `Promoted` turns False (`RolledBack`, for good) and a `track`
falls back to the newest adapter that is still promoted.

Exactly once. A snapshot has a sequence number `N`; the TrainingRun trained on it is named from (Deployment, N).
The snapshot is the commit point (the next one starts where it ended: no record is in two). A snapshot without its
run (the operator stopped in between) gets its run on the next pass before any new snapshot is written; a run
created before a stop and not recorded is found in the cache (listed before any reconcile) or, if the cache has not
seen it yet, by the 409 its creation gets, and adopted.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

import pydantic
from cronsim import CronSim, CronSimError

from ..api.common import Condition, Model
from ..api.deployment import ContinuousLearning, DeploymentSpec, PromotionGate
from ..kube import ApiError
from ..metrics import FEEDBACK_FULL_RESCANS, FEEDBACK_LATE_SEGMENTS, FEEDBACK_NEW_RECORDS, LEARNING_RUNS, PROMOTIONS
from ..resources import conditions as cond
from ..resources.common import MANAGED_BY, child_name, owner_reference
from .base import API_VERSION, Context, Controller, Dependency, Note, Outcome, generation

log = logging.getLogger("perennial.controllers")

KIND = "DeploymentLearning"
RESOURCE = "Deployment"
#: Label of every TrainingRun (and Adapter lookup) made for a Deployment.
DEPLOYMENT_LABEL = "perennial.ai/deployment"
#: Label of a learning TrainingRun: the snapshot sequence number it trains on.
SNAPSHOT_SEQ_LABEL = "perennial.ai/feedback-snapshot"
#: Annotation of a learning TrainingRun: the snapshot document it trains on, and why it was created.
SNAPSHOT_URI_ANNOTATION = "perennial.ai/feedback-snapshot-uri"
TRIGGER_ANNOTATION = "perennial.ai/learning-trigger"
#: The Deployment's condition of the loop, and the Adapter's of the gate.
CONDITION_LEARNING = "Learning"
CONDITION_PROMOTED = "Promoted"
#: Status fields this controller owns on the Deployment (the serving controller keeps them as they are).
STATUS_FIELDS = frozenset({"newFeedbackRecords", "lastTrainingRun", "lastTrainingTime", "conditions"})
FEEDBACK_DATASET = "feedback"
#: cron(5)'s macros, which `cronsim` leaves to the caller.
CRON_MACROS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *"}

# ----------------------------------------------------------------------------- observed


@dataclass(frozen=True)
class Snapshot:
    """A dataset snapshot in the feedback store (immutable once written)."""

    seq: int
    #: the snapshot document (segments, their sha256, the time window), relative to the store or a full URI
    uri: str = ""
    #: the segment objects it holds, relative to the store URI
    segments: tuple[str, ...] = ()
    #: rated records in it
    records: int = 0


@dataclass(frozen=True)
class Approval:
    """Thumbs given to the responses of one adapter (a window the store chooses, e.g. since it was first served)."""

    up: int
    total: int

    @property
    def rate(self) -> float:
        return self.up / self.total if self.total else 0.0


@dataclass(frozen=True)
class FeedbackView:
    """What one read of the store says about one Deployment."""

    #: rated records in no snapshot yet
    new_records: int = 0
    #: when the oldest of them was made
    oldest_new: _dt.datetime | None = None
    #: the newest snapshot, if any
    last_snapshot: Snapshot | None = None
    #: live approval per adapter name (for the automatic rollback); empty when the store does not report it
    approval: Mapping[str, Approval] = field(default_factory=dict)
    #: records skipped (corrupt or torn segments), and why
    skipped: int = 0
    skipped_reason: str = ""


class StoreError(Exception):
    """The store cannot be read or written (unreachable, permission, corrupt index)."""


class FeedbackSource(Protocol):
    """The feedback store as the loop needs it (sync: called in a thread)."""

    def read(self, store_uri: str, namespace: str, deployment: str) -> FeedbackView: ...

    def write_snapshot(self, store_uri: str, namespace: str, deployment: str, seq: int) -> Snapshot | None:
        """Write snapshot `seq` of every rated record after snapshot `seq - 1` (idempotent: an existing `seq` is
        returned as it is); None when nothing is pending."""
        ...

    def get_snapshot(self, store_uri: str, namespace: str, deployment: str, seq: int) -> Snapshot | None: ...


#: The window of live approval: the ratings of the last this many snapshots.
APPROVAL_SNAPSHOTS = 4
#: The name live approval of the base model (no adapter) is counted under.
BASE_MODEL = ""


def tally(doc: Any, read: Any) -> dict[str, Approval]:
    """Thumbs per adapter of the thumbs ratings a snapshot trains on (`segments`), each joined by response id to the
    interaction it rates (in `segments` or `joinSegments`), whose `adapter` made the response. Ratings of responses
    not found are not counted."""
    from ..api.records import FeedbackRecord, InteractionRecord, parse_record

    made_by: dict[str, str] = {}
    thumbs: list[tuple[str, bool]] = []
    trained = {(p.name, p.offset) for p in doc.segments}
    for part in list(doc.segments) + list(doc.join_segments):
        mine = (part.name, part.offset) in trained
        for line in read(part).split(b"\n"):
            if not line.strip():
                continue
            try:
                r = parse_record(line)
            except ValueError:
                continue  # counted as skipped by the store's index already
            if isinstance(r, InteractionRecord):
                made_by[r.id] = r.adapter or BASE_MODEL
            elif mine and isinstance(r, FeedbackRecord) and r.type == "thumbs":
                thumbs.append((r.response_id, r.thumbs == "up"))
    out: dict[str, list[int]] = {}
    for rid, up in thumbs:
        if (adapter := made_by.get(rid)) is not None:
            t = out.setdefault(adapter, [0, 0])
            t[0] += int(up)
            t[1] += 1
    return {k: Approval(up, n) for k, (up, n) in out.items()}


class StoreSource:
    """`FeedbackSource` over `perennial.feedback.store` (one `FeedbackStore` per store URI in the process: its
    in-memory index keeps a tick incremental). The store lays a Deployment's feedback out by its name
    (`<store>/<deployment>/...`): two namespaces' Deployments of one name must not share a store URI."""

    def __init__(self, pvc_root: str | None = None, *, approval_snapshots: int = APPROVAL_SNAPSHOTS,
                 late_arrival_seconds: float | None = None, full_rescan_seconds: float | None = None) -> None:
        self.pvc_root = pvc_root
        #: the store's listing settings (None: its defaults)
        self.store_options = {k: v for k, v in (("late_arrival_seconds", late_arrival_seconds),
                                                ("full_rescan_seconds", full_rescan_seconds)) if v is not None}
        self.approval_snapshots = approval_snapshots
        #: (store URI, deployment, snapshot sequence) -> thumbs per adapter of the ratings it holds (immutable: read once)
        self._tallies: dict[tuple[str, str, int], dict[str, Approval]] = {}

    def _store(self, uri: str) -> Any:
        from ..feedback.store import shared_store

        return shared_store(uri, pvc_root=self.pvc_root, **self.store_options)

    def read(self, store_uri: str, namespace: str, deployment: str) -> FeedbackView:
        store = self._store(store_uri)
        res = store.scan(deployment)
        if res.full_listing:
            FEEDBACK_FULL_RESCANS.inc()
        if res.late_segments:
            FEEDBACK_LATE_SEGMENTS.inc(res.late_segments)
        last = None
        if res.cursor.after:
            last = Snapshot(res.cursor.sequence - 1, store.snapshot_path(deployment, res.cursor.after))
        skipped = sum(res.skipped.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(res.skipped.items()))
        where = f" in {res.damaged_segments} segment(s), e.g. {', '.join(res.damaged_examples[:3])}" if res.damaged_examples else ""
        approval = self.approval(store, store_uri, deployment, last.seq) if last is not None else {}
        return FeedbackView(new_records=res.pending.ratings, oldest_new=res.pending.oldest_rating, last_snapshot=last,
                            skipped=skipped, skipped_reason=f"{reasons}{where}" if skipped else "", approval=approval)

    def approval(self, store: Any, store_uri: str, deployment: str, last: int) -> dict[str, Approval]:
        """Live approval per adapter over the last `approval_snapshots` snapshots (the window). A snapshot's tally is
        read once per process (its trained parts and join parts, each verified against its sha256), so a tick costs
        nothing new unless a snapshot was written; a restart reads at most the window."""
        out: dict[str, list[int]] = {}
        window = range(max(1, last - self.approval_snapshots + 1), last + 1)
        for key in [k for k in self._tallies if k[:2] == (store_uri, deployment) and k[2] not in window]:
            del self._tallies[key]
        for seq in window:
            key = (store_uri, deployment, seq)
            if key not in self._tallies:
                doc = store.get_snapshot(deployment, seq)
                self._tallies[key] = tally(doc, store._read_range) if doc is not None else {}
            for adapter, a in self._tallies[key].items():
                t = out.setdefault(adapter, [0, 0])
                t[0] += a.up
                t[1] += a.total
        return {k: Approval(up, total) for k, (up, total) in out.items()}

    def _snapshot(self, store: Any, deployment: str, doc: Any) -> Snapshot:
        return Snapshot(doc.sequence, store.snapshot_path(deployment, doc.name), (), doc.counts.ratings)

    def write_snapshot(self, store_uri: str, namespace: str, deployment: str, seq: int) -> Snapshot | None:
        store = self._store(store_uri)
        doc = store.take_snapshot(deployment, sequence=seq)
        return None if doc is None else self._snapshot(store, deployment, doc)

    def get_snapshot(self, store_uri: str, namespace: str, deployment: str, seq: int) -> Snapshot | None:
        store = self._store(store_uri)
        doc = store.get_snapshot(deployment, seq)
        return None if doc is None else self._snapshot(store, deployment, doc)


@dataclass(frozen=True)
class RunInfo:
    """A TrainingRun made for the Deployment."""

    name: str
    seq: int | None
    created: _dt.datetime | None
    finished: bool


@dataclass
class Observed:
    name: str
    namespace: str
    generation: int | None
    spec: ContinuousLearning | None
    created: _dt.datetime
    now: _dt.datetime
    conditions: list[dict[str, Any]] | None
    feedback: FeedbackView | None = None
    #: why the store could not be read (then `feedback` is None)
    store_error: str | None = None
    runs: list[RunInfo] = field(default_factory=list)
    #: `status.lastTrainingRun` / `lastTrainingTime` as written before (runs may be deleted since)
    recorded_run: str | None = None
    recorded_time: _dt.datetime | None = None


# ----------------------------------------------------------------------------- decide (pure)


@dataclass
class Decision:
    #: write this snapshot (its sequence number) first
    snapshot: int | None = None
    #: then create the TrainingRun of this snapshot (the one just written, or one whose run is missing)
    create_run: int | None = None
    #: why the run is made: MinNewRecords, MaxAge, Schedule, or Resumed (a snapshot without its run)
    trigger: str | None = None
    status: dict[str, Any] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)
    requeue_after: float | None = None


def run_name(deployment: str, seq: int) -> str:
    """The TrainingRun of snapshot `seq` (deterministic: a second creation is a 409, never a duplicate)."""
    return child_name(deployment, f"learn-{seq}")


def parse_time(value: Any) -> _dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        t = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def rfc3339(t: _dt.datetime) -> str:
    return t.astimezone(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def next_cron(schedule: str, after: _dt.datetime) -> _dt.datetime:
    """The first time after `after` that `schedule` (5 fields, or a cron(5) macro; UTC) names; ValueError if invalid."""
    expr = CRON_MACROS.get(schedule.strip(), schedule)
    try:
        return next(CronSim(expr, after.astimezone(_dt.timezone.utc)))
    except (CronSimError, StopIteration) as exc:
        raise ValueError(f"`continuousLearning.schedule` {schedule!r} is not a valid cron expression: {exc}") from None


def _seconds(a: _dt.datetime, b: _dt.datetime) -> float:
    return (b - a).total_seconds()


def decide_learning(o: Observed, *, tick_seconds: float) -> Decision:
    """Whether to snapshot and train now, and the learning fields of the status (pure)."""
    d = Decision()
    spec = o.spec
    latest = max(o.runs, key=lambda r: (r.seq or 0, r.created or o.created), default=None)
    last_time = max([r.created for r in o.runs if r.created] + ([o.recorded_time] if o.recorded_time else []), default=None)
    if latest is not None:
        d.status["lastTrainingRun"] = latest.name
        if latest.created:
            d.status["lastTrainingTime"] = rfc3339(latest.created)
    elif o.recorded_run:
        d.status["lastTrainingRun"] = o.recorded_run
        if o.recorded_time:
            d.status["lastTrainingTime"] = rfc3339(o.recorded_time)
    conds = o.conditions

    def done(status: str, reason: str, message: str) -> Decision:
        d.status["conditions"] = cond.set_condition(conds, CONDITION_LEARNING, status, reason, message, o.generation)
        return d

    if spec is None or not spec.enabled:
        # Off: nothing is read, nothing is timed; the condition goes (it would describe a loop that is not there).
        d.status["conditions"] = [c for c in conds or [] if c.get("type") != CONDITION_LEARNING]
        return d
    d.requeue_after = tick_seconds
    if o.feedback is None:
        return done("False", "StoreUnreachable", f"the feedback store cannot be read: {o.store_error or 'unknown error'}; "
                    "serving is not affected, the loop resumes when it can be read")
    fb = o.feedback
    d.status["newFeedbackRecords"] = max(0, fb.new_records)
    skipped = f"; {fb.skipped} record(s) skipped: {fb.skipped_reason or 'unreadable'}" if fb.skipped else ""
    in_flight = sum(1 for r in o.runs if not r.finished)
    seqs = {r.seq for r in o.runs if r.seq is not None}
    recorded_seq = _seq_of(o.recorded_run, o.name)
    last = fb.last_snapshot
    if last is not None and last.seq not in seqs and (recorded_seq is None or recorded_seq < last.seq):
        # A snapshot without its run: the operator stopped between the two. Its run comes first, whatever the policy
        # says now (the policy fired when the snapshot was written; its records are in no other snapshot).
        d.create_run, d.trigger = last.seq, "Resumed"
        return done("True", "TrainingRunCreated", f"creating TrainingRun {run_name(o.name, last.seq)} for snapshot {last.seq}{skipped}")

    fired: list[str] = []
    waits: list[float] = []
    n = fb.new_records
    if n >= spec.min_new_records:
        fired.append("MinNewRecords")
    if spec.max_age_seconds is not None and n > 0 and fb.oldest_new is not None:
        age = _seconds(fb.oldest_new, o.now)
        if age >= spec.max_age_seconds:
            fired.append("MaxAge")
        else:
            waits.append(spec.max_age_seconds - age)
    if spec.schedule:
        try:
            due = next_cron(spec.schedule, last_time or o.created)
        except ValueError as exc:
            return done("False", "InvalidSchedule", str(exc))
        if due <= o.now:
            if n > 0:
                fired.append("Schedule")
        else:
            waits.append(_seconds(o.now, due))
    pending = f"{n} new rated record(s) (training at {spec.min_new_records})"
    if not fired:
        d.requeue_after = min([tick_seconds] + [max(1.0, w) for w in waits])
        return done("True", "Collecting", pending + skipped)
    if in_flight >= spec.max_concurrent_runs:
        return done("True", "WaitingForRun", f"{pending}: {in_flight} run(s) in flight (maxConcurrentRuns {spec.max_concurrent_runs}){skipped}")
    if last_time is not None and (left := spec.min_interval_seconds - _seconds(last_time, o.now)) > 0:
        d.requeue_after = min(tick_seconds, max(1.0, left))
        return done("True", "MinIntervalNotElapsed", f"{pending}: the last run was created {int(_seconds(last_time, o.now))} s ago "
                    f"(minIntervalSeconds {spec.min_interval_seconds}){skipped}")
    seq = (last.seq if last is not None else 0) + 1  # the store's next: snapshots are numbered without gaps
    d.snapshot = d.create_run = seq
    d.trigger = fired[0]
    return done("True", "TrainingRunCreated", f"{pending}, trigger {fired[0]}: creating TrainingRun {run_name(o.name, seq)} "
                f"for snapshot {seq}{skipped}")


def _seq_of(run: str | None, deployment: str) -> int | None:
    if not run:
        return None
    m = re.search(r"-learn-(\d+)$", run)
    return int(m.group(1)) if m and run == run_name(deployment, int(m.group(1))) else None


# ----------------------------------------------------------------------------- the TrainingRun (pure)


def served_parent(family: str, served: Iterable[Mapping[str, Any]], adapters: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The Adapter of `family` the Deployment serves now (from `status.servedAdapters`), if any."""
    for entry in served:
        name = entry.get("adapter")
        a = adapters.get(name) if name else None
        if a is not None and (a.get("spec") or {}).get("family") == family:
            return str(name)
    return None


def training_run(deployment: Mapping[str, Any], spec: DeploymentSpec, snapshot: Snapshot, *, parent: str | None,
                 store_uri: str | None, trigger: str) -> dict[str, Any]:
    """The TrainingRun of one snapshot, from the Deployment's template (pure)."""
    cl = spec.continuous_learning
    assert cl is not None
    t = cl.template
    meta = deployment["metadata"]
    name = run_name(meta["name"], snapshot.seq)
    feedback: dict[str, Any] = {"deploymentRef": {"name": meta["name"]}}
    if snapshot.uri:
        feedback["snapshot"] = snapshot.uri  # exactly its verified segment ranges (and its join segments)
    else:
        feedback["segments"] = list(snapshot.segments)
    if store_uri:
        feedback["storeUri"] = store_uri
    body: dict[str, Any] = {
        "method": t.method,
        "baseModelRef": {"name": spec.base_model_ref.name},
        "datasets": [{"name": FEEDBACK_DATASET, "feedback": feedback, "split": "Train"}] + [d.to_dict() for d in t.eval_datasets],
        "hyperparameters": t.hyperparameters.to_dict(),
        "lora": t.lora.to_dict(),
        "resources": t.resources.to_dict(),
        # held out from the same feedback (`heldOutPercent`), evaluated against the parent: the served adapter
        "evaluation": t.evaluation.to_dict(),
        "output": {"adapterFamily": cl.adapter_family},
        "runPolicy": t.run_policy.to_dict(),
    }
    if t.reward_spec_ref is not None:
        body["rewardSpecRef"] = t.reward_spec_ref.to_dict()
    if t.continue_from_served and parent:
        body["parentAdapterRef"] = {"name": parent}
    annotations = {TRIGGER_ANNOTATION: trigger}
    if snapshot.uri:
        annotations[SNAPSHOT_URI_ANNOTATION] = snapshot.uri
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainingRun",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": {
                "app.kubernetes.io/name": "perennial",
                "app.kubernetes.io/part-of": "perennial",
                "app.kubernetes.io/managed-by": MANAGED_BY,
                "app.kubernetes.io/component": "learning",
                DEPLOYMENT_LABEL: meta["name"][:63],
                SNAPSHOT_SEQ_LABEL: str(snapshot.seq),
            },
            "annotations": annotations,
            # not the controller: a TrainingRun's own children (its Job) are its; GC removes it with the Deployment
            "ownerReferences": [{**owner_reference(dict(deployment), controller=False), "apiVersion": API_VERSION, "kind": "Deployment"}],
        },
        "spec": body,
    }


# ----------------------------------------------------------------------------- the promotion gate (pure)


@dataclass(frozen=True)
class GateResult:
    promoted: bool
    reason: str
    message: str


def _dec(value: Any) -> Decimal | None:
    try:
        d = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return d if d.is_finite() else None


def _metric(status: Mapping[str, Any], name: str) -> Decimal | None:
    for m in status.get("metrics") or []:
        if m.get("name") == name:
            return _dec(m.get("value"))
    return None


def gate(adapter: Mapping[str, Any], g: PromotionGate, *, served: str | None) -> GateResult:
    """Whether a new Adapter may replace the served one: its held-out mean reward against its baseline's on the same
    examples (the parent it continued, i.e. the adapter served when its run was made; the base model for a first
    adapter), `minImprovement`, `minMeanReward`, `requireEvaluation`. Pure; the numbers go into the message."""
    status = adapter.get("status") or {}
    mean, improvement = _dec(status.get("meanReward")), _dec(status.get("improvement"))
    baseline = _metric(status, "eval/baseline_mean_reward")
    if baseline is None and mean is not None and improvement is not None:
        baseline = mean - improvement
    samples = _metric(status, "eval/samples")
    parent = (((adapter.get("spec") or {}).get("lineage") or {}).get("parentAdapterRef") or {}).get("name")
    against = f"parent {parent}" if parent else "the base model"
    if served and parent and parent != served:
        against += f" (the Deployment now serves {served})"
    min_imp = _dec(g.min_improvement) or Decimal(0)
    floor = _dec(g.min_mean_reward) if g.min_mean_reward is not None else None
    if mean is None or improvement is None:
        if g.require_evaluation:
            return GateResult(False, "NoEvaluation", "the adapter has no held-out evaluation (meanReward, improvement) and "
                              "`promotion.requireEvaluation` is true")
        return GateResult(True, "PromotedWithoutEvaluation", "no held-out evaluation; `promotion.requireEvaluation` is false")
    n = f" on {int(samples)} held-out examples" if samples is not None else ""
    numbers = (f"held-out mean reward {_fmt(mean)} vs {_fmt(baseline)} of {against}{n}: improvement {_fmt(improvement)} "
               f"(minImprovement {_fmt(min_imp)}{', minMeanReward ' + _fmt(floor) if floor is not None else ''})")
    if improvement < min_imp:
        return GateResult(False, "BelowMinImprovement", numbers)
    if floor is not None and mean < floor:
        return GateResult(False, "BelowMinMeanReward", numbers)
    return GateResult(True, "GatePassed", numbers)


def _fmt(v: Decimal | None) -> str:
    return "n/a" if v is None else f"{float(v):.4g}"


# ----------------------------------------------------------------------------- automatic rollback (pure)

#: Thumbs on each side before live feedback can call an adapter worse.
ROLLBACK_MIN_SAMPLES = 30
#: One-sided significance of "the new adapter's approval is lower" (strict: the test is repeated at every tick).
ROLLBACK_ALPHA = 0.01
#: And the drop must be at least this large (absolute), so a big sample does not roll back for a trivial difference.
ROLLBACK_MIN_DROP = 0.05


def fisher_less(new_up: int, new_n: int, old_up: int, old_n: int) -> float:
    """One-sided Fisher exact test: P(new adapter's thumbs-up count <= `new_up`) if both adapters had the same
    approval — the hypergeometric tail, exact for any sample size (unlike a normal approximation). Summed from the
    observed count outwards in log space, stopping where terms no longer change the sum (O(samples) at worst)."""
    ups, total = new_up + old_up, new_n + old_n
    lo, hi = max(0, new_n - (total - ups)), min(new_n, ups)
    if not lo <= new_up <= hi:
        return 1.0 if new_up > hi else 0.0

    def pmf(k: int) -> float:
        lc = lambda n, r: math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)  # noqa: E731
        return math.exp(lc(ups, k) + lc(total - ups, new_n - k) - lc(total, new_n))

    def tail(start: int, stop: int, step: int) -> float:
        """Sum of pmf(k) for k from `start` to `stop` (inclusive) by `step`, each term from the one before."""
        term = pmf(start)
        acc, k = term, start
        while k != stop and term > acc * 1e-17:
            if step < 0:  # pmf(k-1) from pmf(k)
                term *= k * (total - ups - new_n + k) / ((ups - k + 1) * (new_n - k + 1))
            else:  # pmf(k+1) from pmf(k)
                term *= (ups - k) * (new_n - k) / ((k + 1) * (total - ups - new_n + k + 1))
            k += step
            acc += term
        return acc

    mode = (new_n + 1) * (ups + 1) // (total + 2)
    if new_up <= mode:
        return min(1.0, tail(new_up, lo, -1))
    return max(0.0, 1.0 - (tail(new_up + 1, hi, 1) if new_up < hi else 0.0))


@dataclass(frozen=True)
class Verdict:
    worse: bool
    reason: str
    message: str
    p_value: float | None = None


def worse(new: Approval, old: Approval, *, min_samples: int = ROLLBACK_MIN_SAMPLES, alpha: float = ROLLBACK_ALPHA,
          min_drop: float = ROLLBACK_MIN_DROP) -> Verdict:
    """Whether live feedback says the new adapter is worse than the one it replaced. With little data, "worse" needs
    all three: at least `min_samples` thumbs on each side, an approval drop of at least `min_drop`, and a one-sided
    Fisher exact test rejecting "not worse" at `alpha` (exact for small samples). Anything less is "not yet"."""
    numbers = (f"approval {new.up}/{new.total} ({new.rate:.0%}) vs {old.up}/{old.total} ({old.rate:.0%}) of the adapter it replaced")
    if new.total < min_samples or old.total < min_samples:
        return Verdict(False, "TooFewSamples", f"{numbers}: fewer than {min_samples} thumbs on a side")
    drop = old.rate - new.rate
    p = fisher_less(new.up, new.total, old.up, old.total)
    numbers += f", drop {drop:+.3f}, one-sided Fisher p={p:.3g}"
    if drop < min_drop:
        return Verdict(False, "NotWorse", f"{numbers} (a drop of at least {min_drop} is needed)", p)
    if p >= alpha:
        return Verdict(False, "NotSignificant", f"{numbers} (alpha {alpha})", p)
    return Verdict(True, "LiveApprovalDropped", f"{numbers} < alpha {alpha}", p)


# ----------------------------------------------------------------------------- the Adapters of the loop (pure)


@dataclass(frozen=True)
class AdapterAction:
    """A `Promoted` condition to write on an Adapter, and what to say about it."""

    adapter: Mapping[str, Any]
    conditions: list[dict[str, Any]]
    note: Note


def _version(a: Mapping[str, Any]) -> int:
    v = (a.get("spec") or {}).get("version")
    return v if isinstance(v, int) else 0


def fallback_of(a: Mapping[str, Any], family: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """What a `track` of the family serves when `a` is not promoted: the newest Ready adapter of a lower version whose
    `Promoted` is not False (promoted, or not made by the loop)."""
    older = [b for b in family if _version(b) < _version(a) and cond.is_true((b.get("status") or {}).get("conditions"), "Ready")
             and (cond.get((b.get("status") or {}).get("conditions"), CONDITION_PROMOTED) or {}).get("status") != "False"]
    return max(older, key=_version, default=None)


def decide_adapters(deployment: str, g: PromotionGate, mine: Iterable[Mapping[str, Any]], family: Iterable[Mapping[str, Any]],
                    approval: Mapping[str, Approval]) -> list[AdapterAction]:
    """The `Promoted` condition of each Ready Adapter made by this Deployment's learning runs (`mine`; pure): the gate's
    verdict (again when the gate changes), or `RolledBack` for a promoted one whose live approval is worse than that of
    the adapter a `track` would fall back to (`fallback_of`: both measured over the same window of snapshots, e.g.
    while both served during a canary, or each while it served). A rollback sticks: nothing promotes it again."""
    family = list(family)
    out: list[AdapterAction] = []
    for a in mine:
        status = a.get("status") or {}
        conds = status.get("conditions")
        gen = generation(a)
        if not cond.is_true(conds, "Ready"):
            continue
        current = cond.get(conds, CONDITION_PROMOTED) or {}
        if current.get("status") == "False" and current.get("reason") == "RolledBack":
            continue
        name = a["metadata"]["name"]
        result = gate(a, g, served=None)
        if result.reason == "NoEvaluation" and not status.get("metrics") and ((a.get("spec") or {}).get("lineage") or {}).get("trainingRunRef"):
            # Ready before its run's results were copied onto it (the run's status is written after the Adapter is
            # made): no verdict yet, rather than a "not promoted" Warning that the next look contradicts
            continue
        status_, reason, message = ("True" if result.promoted else "False"), result.reason, f"for Deployment {deployment}: {result.message}"
        note = Note("AdapterPromoted" if result.promoted else "AdapterNotPromoted", f"Adapter {name} {'passed' if result.promoted else 'failed'} "
                    f"the promotion gate ({reason}) {message}", warning=not result.promoted)
        before = fallback_of(a, family)
        previous = before["metadata"]["name"] if before is not None else None
        if result.promoted and previous and name in approval and previous in approval:
            v = worse(approval[name], approval[previous])
            if v.worse:
                status_, reason, message = "False", "RolledBack", (f"for Deployment {deployment}: live feedback is worse than {previous}'s: "
                                                                   f"{v.message}; serving falls back to {previous}")
                note = Note("AdapterRolledBack", f"Adapter {name} rolled back: {message}", warning=True)
        if (current.get("status"), current.get("reason"), current.get("message"), current.get("observedGeneration")) == (status_, reason, message, gen):
            continue
        out.append(AdapterAction(a, cond.set_condition(conds, CONDITION_PROMOTED, status_, reason, message, gen), note))
    return out


# ----------------------------------------------------------------------------- observe / act


class LearningStatus(Model):
    """The Deployment status fields the loop owns (the serving controller keeps them as they are)."""

    conditions: list[Condition] | None = None
    new_feedback_records: int | None = None
    last_training_run: str | None = None
    last_training_time: str | None = None


def _terminal(run: Mapping[str, Any]) -> bool:
    return (cond.get((run.get("status") or {}).get("conditions"), "Succeeded") or {}).get("status") in ("True", "False")


def runs_of(ctx: Context, obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The TrainingRuns the loop made for this Deployment (owned by it, labelled for it)."""
    meta = obj["metadata"]
    return [r for r in ctx.cache.owned_by(API_VERSION, "TrainingRun", meta["uid"])
            if ((r.get("metadata") or {}).get("labels") or {}).get(DEPLOYMENT_LABEL) == meta["name"][:63]]


def run_info(run: Mapping[str, Any]) -> RunInfo:
    meta = run["metadata"]
    raw = (meta.get("labels") or {}).get(SNAPSHOT_SEQ_LABEL, "")
    return RunInfo(meta["name"], int(raw) if raw.isdigit() else None, parse_time(meta.get("creationTimestamp")), _terminal(run))


def adapters_of(ctx: Context, obj: Mapping[str, Any], family: str) -> list[dict[str, Any]]:
    """Adapters of the family made by this Deployment's learning runs (named from it; the run may be deleted since)."""
    name = obj["metadata"]["name"]
    out = []
    for a in ctx.cache.list(API_VERSION, "Adapter", obj["metadata"]["namespace"]):
        spec = a.get("spec") or {}
        run = ((spec.get("lineage") or {}).get("trainingRunRef") or {}).get("name")
        if spec.get("family") == family and _seq_of(run, name) is not None:
            out.append(a)
    return out


def store_uri_of(spec: DeploymentSpec, ctx: Context) -> str:
    return spec.feedback.store_uri or ctx.config.feedback_store_uri


def make_controller(source: FeedbackSource | None, *, tick_seconds: float | None = None) -> Controller:
    """The learning controller, reading the store through `source` (None: the store module's)."""

    def get_source(ctx: Context) -> FeedbackSource:
        nonlocal source
        if source is None:
            source = StoreSource(ctx.config.pvc_root, late_arrival_seconds=ctx.config.feedback_late_arrival_seconds,
                                 full_rescan_seconds=ctx.config.feedback_full_rescan_seconds)
        return source

    #: (namespace, name) -> (store URI, monotonic time, view) of the last read: a wake-up between two ticks (a run's
    #: progress, an Adapter of the family) decides on it instead of listing the store again
    views: dict[tuple[str, str], tuple[str, float, FeedbackView]] = {}
    #: (namespace, name) -> skipped records already told in a Warning Event (seeded from the condition after a restart)
    told_skipped: dict[tuple[str, str], int] = {}

    async def reconcile(obj: dict[str, Any], ctx: Context) -> Outcome:
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        tick = tick_seconds if tick_seconds is not None else ctx.config.learning_seconds
        status = obj.get("status") or {}
        try:
            spec: DeploymentSpec | None = DeploymentSpec.model_validate(obj.get("spec") or {})
        except pydantic.ValidationError:
            spec = None  # the serving controller says why; nothing to learn from an invalid spec
        cl = spec.continuous_learning if spec is not None else None
        now = _dt.datetime.fromtimestamp(ctx.clock(), _dt.timezone.utc)
        runs = runs_of(ctx, obj)
        o = Observed(name=name, namespace=ns, generation=generation(obj), spec=cl, now=now,
                     created=parse_time(meta.get("creationTimestamp")) or now, conditions=status.get("conditions"),
                     runs=[run_info(r) for r in runs], recorded_run=status.get("lastTrainingRun"),
                     recorded_time=parse_time(status.get("lastTrainingTime")))
        enabled = spec is not None and cl is not None and cl.enabled
        if enabled:
            assert spec is not None
            uri, now_m = store_uri_of(spec, ctx), time.monotonic()
            cached = views.get((ns, name))
            if cached is not None and cached[0] == uri and now_m - cached[1] < 0.9 * tick:
                o.feedback = cached[2]
            else:
                try:
                    o.feedback = await asyncio.to_thread(get_source(ctx).read, uri, ns, name)
                    views[(ns, name)] = (uri, now_m, o.feedback)
                except Exception as exc:  # noqa: BLE001 - any failure of the store is a condition, never a crash loop
                    views.pop((ns, name), None)
                    o.store_error = f"{type(exc).__name__}: {exc}"[:512]
        else:
            views.pop((ns, name), None)
        d = decide_learning(o, tick_seconds=tick)
        notes = list(d.notes)
        if o.feedback is not None:
            told = told_skipped.get((ns, name))
            if told is None:  # what the condition said before (this process's first look): told already
                told = skipped_in(cond.get(o.conditions, CONDITION_LEARNING))
            if o.feedback.skipped > told:
                assert spec is not None
                notes.append(Note("FeedbackRecordsSkipped", f"{o.feedback.skipped} record(s) in the feedback store "
                                  f"{store_uri_of(spec, ctx)} cannot be used and are skipped (not counted, not trained on): "
                                  f"{o.feedback.skipped_reason or 'unreadable'}", warning=True))
            told_skipped[(ns, name)] = o.feedback.skipped
        events: list[tuple[dict[str, Any], list[Note]]] = []
        if enabled and d.create_run is not None:
            assert spec is not None and cl is not None and o.feedback is not None
            views.pop((ns, name), None)  # the store changes now: the next pass reads it
            try:
                created = await create_run(ctx, obj, spec, o.feedback, d, get_source(ctx), runs)
            except ApiError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store refused the snapshot: a condition, retried at the next tick
                created = None
                message = f"snapshot {d.create_run} or its TrainingRun could not be made: {type(exc).__name__}: {exc}"[:1024]
                log.warning("Learning step failed, deployment=%s, namespace=%s, error=%s", name, ns, message)
                d.status["conditions"] = cond.set_condition(d.status.get("conditions"), CONDITION_LEARNING, False, "SnapshotFailed",
                                                            message, o.generation)
            if created is not None:
                run, made = created
                d.status["lastTrainingRun"] = run["metadata"]["name"]
                if (t := run["metadata"].get("creationTimestamp")):
                    d.status["lastTrainingTime"] = t
                if made:
                    LEARNING_RUNS.labels(d.trigger or "").inc()
                    notes.append(Note("TrainingRunCreated", f"Created TrainingRun {run['metadata']['name']} from feedback snapshot "
                                      f"{d.create_run} (trigger {d.trigger})"))
        if enabled:
            assert cl is not None
            approval = o.feedback.approval if o.feedback is not None else {}
            family = [a for a in ctx.cache.list(API_VERSION, "Adapter", ns) if (a.get("spec") or {}).get("family") == cl.adapter_family]
            for act in decide_adapters(name, cl.promotion, adapters_of(ctx, obj, cl.adapter_family), family, approval):
                written = await write_adapter_conditions(ctx, act)
                if written is not None:
                    PROMOTIONS.labels((cond.get(act.conditions, CONDITION_PROMOTED) or {}).get("reason", "")).inc()
                    notes.append(act.note)
                    events.append((written, [act.note]))
        if "newFeedbackRecords" in d.status:
            FEEDBACK_NEW_RECORDS.labels(ns, name).set(d.status["newFeedbackRecords"])
        else:
            forget_gauge(ns, name)
        return Outcome(d.status, notes, d.requeue_after, events=events)

    def dependencies(obj: dict[str, Any]) -> list[Dependency]:
        """Adapters of the learned family (a new one is gated when it becomes Ready); the runs are owned (ownerReferences)."""
        cl = ((obj.get("spec") or {}).get("continuousLearning") or {})
        if not cl.get("enabled") or not cl.get("adapterFamily"):
            return []
        return [(API_VERSION, "AdapterFamily", obj["metadata"]["namespace"], str(cl["adapterFamily"]))]

    def gone(ctx: Context, namespace: str, name: str) -> None:
        forget_gauge(namespace, name)
        views.pop((namespace, name), None)
        told_skipped.pop((namespace, name), None)

    return Controller(KIND, "deployments", LearningStatus, reconcile, dependencies, gone, event_for=event_for,
                      resource=RESOURCE, status_fields=STATUS_FIELDS, owns=frozenset({"TrainingRun"}))


_SKIPPED = re.compile(r"; (\d+) record\(s\) skipped")


def skipped_in(condition: Mapping[str, Any] | None) -> int:
    """The skipped records a `Learning` condition's message reports (0 when none)."""
    m = _SKIPPED.search((condition or {}).get("message") or "")
    return int(m.group(1)) if m else 0


def forget_gauge(namespace: str, name: str) -> None:
    try:
        FEEDBACK_NEW_RECORDS.remove(namespace, name)
    except KeyError:
        pass


def event_for(c: dict[str, Any]) -> str | None:
    """Only the Learning condition is this controller's: a Warning when it turns False (store unreachable, invalid
    schedule); the created runs are notes of their own; collecting and waiting are status only."""
    if c["type"] != CONDITION_LEARNING:
        return None
    return "Warning" if c["status"] == "False" else None


async def create_run(ctx: Context, obj: dict[str, Any], spec: DeploymentSpec, fb: FeedbackView, d: Decision,
                     source: FeedbackSource, runs: list[dict[str, Any]]) -> tuple[dict[str, Any], bool] | None:
    """Write the snapshot (when the decision asks for a new one), then create its TrainingRun; a run that exists
    already (created before a restart) is adopted. Returns (the run, whether this call created it)."""
    cl = spec.continuous_learning
    assert cl is not None and d.create_run is not None
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    store = store_uri_of(spec, ctx)
    if d.snapshot is not None:
        snapshot = await asyncio.to_thread(source.write_snapshot, store, ns, name, d.snapshot)
        if snapshot is None:
            return None  # nothing pending after all (the count was of records a snapshot took meanwhile)
        log.info("Wrote feedback snapshot, deployment=%s, namespace=%s, seq=%d, records=%d", name, ns, snapshot.seq, snapshot.records)
        d.status["newFeedbackRecords"] = max(0, fb.new_records - snapshot.records)
    else:
        snapshot = await asyncio.to_thread(source.get_snapshot, store, ns, name, d.create_run)
        if snapshot is None:
            raise StoreError(f"snapshot {d.create_run} of {name} is listed but cannot be read")
    adapters = {a["metadata"]["name"]: a for a in ctx.cache.list(API_VERSION, "Adapter", ns)}
    parent = served_parent(cl.adapter_family, (obj.get("status") or {}).get("servedAdapters") or [], adapters)
    manifest = training_run(obj, spec, snapshot, parent=parent, store_uri=spec.feedback.store_uri, trigger=d.trigger or "")
    try:
        created = await ctx.kube.create(manifest)
    except ApiError as exc:
        if exc.status != 409:
            raise
        existing = await ctx.kube.get(API_VERSION, "TrainingRun", ns, manifest["metadata"]["name"])
        labels = ((existing or {}).get("metadata") or {}).get("labels") or {}
        if existing is None or labels.get(DEPLOYMENT_LABEL) != name[:63] or labels.get(SNAPSHOT_SEQ_LABEL) != str(snapshot.seq):
            raise  # someone else's object of that name: requeued, and said so in the log
        ctx.cache.put(existing)
        log.info("Adopted TrainingRun, name=%s, namespace=%s", manifest["metadata"]["name"], ns)
        return existing, False
    ctx.cache.put(created)
    log.info("Created TrainingRun, name=%s, namespace=%s, snapshot=%d", manifest["metadata"]["name"], ns, snapshot.seq)
    return created, True


async def write_adapter_conditions(ctx: Context, act: AdapterAction) -> dict[str, Any] | None:
    """The Adapter's conditions with `Promoted` set, from the cached copy (a 409 requeues the Deployment's pass)."""
    meta = act.adapter["metadata"]
    try:
        written = await ctx.kube.patch(API_VERSION, "Adapter", meta["namespace"], meta["name"],
                                       {"metadata": {"resourceVersion": meta.get("resourceVersion")}, "status": {"conditions": act.conditions}},
                                       subresource="status")
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise
    ctx.cache.put(written)
    log.info("Updated Adapter promotion, name=%s, namespace=%s, promoted=%s", meta["name"], meta["namespace"],
             (cond.get(act.conditions, CONDITION_PROMOTED) or {}).get("status"))
    return written


