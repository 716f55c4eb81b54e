"""The rollout decision of ONE region of a Perennial Deployment: pure, table-tested, no server, no I/O.

Two paths (issue 12):

* `decide_region` — a change of the serving pods (a new pod revision) is a blue-green between the apps/v1
  Deployments `<name>[-<region>]-blue|green`: bring up the other color at `previewReplicas`, wait until EVERY
  preview pod is ready (observedGeneration current, no old pods left), smoke-test it through the preview
  Service, wait for a promotion when `autoPromote` is false, scale it to the full count (at least the active
  color's ready count when autoscaled), switch the stable Service, keep the old color `scaleDownDelaySeconds`
  (switching back is the instant rollback; it happens by itself when the new color loses ready replicas within
  the post-promotion window), then scale it to zero. A smoke failure or an exceeded deadline aborts: the stable
  Service never leaves the active color, the preview is scaled to zero after `abortScaleDownDelaySeconds`, and
  the aborted revision is not retried while the spec asks for it.
* `decide_adapters` — a change of which Adapter a served name points to needs no new pods: the new adapter is
  loaded next to the old one under `<served>-preview` in the routes document the sidecars watch, smoke-tested
  there once every ready pod applied it, the served name moves (optionally through weighted canary steps), and
  the old adapter is unloaded after the delay.

The rollout's state lives in the world, not in a phase machine: which color is active is the stable Service's
selector; times and verdicts are annotations on the children (`perennial.ai/switched-at`, `scale-down-at`,
`preview-started-at`, `smoke`, `aborted-revision`, `abort-reason`; the adapter rollouts' progress is one JSON
annotation on the routes ConfigMap). So a restarted operator resumes where the world stands, and a lost status
does not restart an aborted rollout.

How the controller uses it, per region and pass: observe (`ColorState.from_object` for each color's apps/v1
Deployment, the stable Service's `perennial.ai/color` selector and annotations, the routes ConfigMap with
`parse_progress` of its annotation, each active pod's `GET /perennial/routes`), call `decide_region` and
`decide_adapters`; when one returns a `smoke` request, run it (with a timeout) and call it again with
`smoke_result` in the same pass, posting the notes of both calls. Then act: apply each `ColorTarget` (the
revision label on the Deployment and its pod template, replicas unless autoscaled, the annotation merge
patch), the stable/preview Services' selectors and the stable Service's annotation patch, the routes
document (`AdapterDecision.routes`, byte for byte: its `revision` is `routes_revision`) and
`dump_progress(AdapterDecision.progress)` as the ConfigMap's `perennial.ai/adapter-rollouts` annotation.
Post the notes as Events after the status write; `summarize` the regions into the status; requeue after the
smallest `requeue_after`.

Decisions made here (documented for users in the API field descriptions):

* The first rollout of a region (no stable Service yet) creates one color at the full count, smoke-tests it
  through the preview Service and only then points the stable Service at it: no client ever reaches a model
  that fails the smoke test. It needs no manual promotion (as Argo Rollouts' initial deployment).
* A replica change alone scales the active color in place; when autoscaled, the active color's replica count is
  the autoscaler's and is never written here; the preview's count is never the autoscaler's.
* `paused` stops starting, advancing and promoting rollouts (a region's first rollout still happens: nothing
  serves there to protect). Safety still acts (automatic rollback, switching away from a color without ready
  replicas) and old colors are still scaled down when their delay is over. The progress deadline does not run
  while paused: a paused preview's step (and its smoke test) restarts on resume.
* The post-promotion check compares the new color's ready replicas with min(old color's count, new color's
  count), at least 1, and switches back only to the color that served before the switch (never to a preview on
  trial) while that color has more ready replicas; the rolled-back revision is then aborted (not retried).
* A color scaled to zero on purpose (spec 0, or KEDA) is not an outage: no fail-over away from it.
* Adapter rollouts: a new served name (or any change while no pod runs) is served at once, there is no traffic
  to protect. Loading one adapter beyond `maxLoras` next to the old one is allowed for one rollout at a time
  (vLLM keeps the extra one in its CPU cache); a desired set above `maxLoras` is refused. The promotion
  annotation of an adapter rollout names the new Adapter object.
* Invariant, checked last and over random sequences in the tests: the stable Service never selects a color
  without ready replicas while the other color has ready replicas (an outage is worse than any gate), and the
  revision of a color that serves traffic is never changed in place.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..api.deployment import (
    ABORT_REASON_ANNOTATION,
    ABORTED_REVISION_ANNOTATION,
    CONDITION_DEGRADED,
    CONDITION_PROGRESSING,
    CONDITION_READY,
    PREVIEW_STARTED_AT_ANNOTATION,
    SCALE_DOWN_AT_ANNOTATION,
    SMOKE_ANNOTATION,
    SWITCHED_AT_ANNOTATION,
    AdapterRollout,
    BlueGreen,
    Color,
    Phase,
    RegionStatus,
)
from .base import Note

COLORS: tuple[Color, Color] = ("blue", "green")
#: Labels of the children (the contract's names; the manifest builders use the same strings).
COLOR_LABEL = "perennial.ai/color"
REVISION_LABEL = "perennial.ai/revision"
PREVIEW_SUFFIX = "-preview"
#: `perennial.ai/preview-started-at` of a preview while `spec.paused`: its step restarts on resume.
PAUSED = "paused"
_MAX_MESSAGE = 1024


def other(color: Color) -> Color:
    return "green" if color == "blue" else "blue"


def rfc3339(t: _dt.datetime) -> str:
    return t.astimezone(_dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


#: How far ahead of `now` a time the controller wrote (with another replica's clock) may be and still be believed.
CLOCK_SKEW = _dt.timedelta(seconds=60)


def parse_time(value: Any, latest: _dt.datetime | None = None) -> _dt.datetime | None:
    """An RFC 3339 annotation value, or None when absent, unreadable or later than `latest` (a hand-edited
    annotation is ignored: a time far in the future would hold a deadline or a delay off forever, or overflow)."""
    if not value or not isinstance(value, str):
        return None
    try:
        t = _dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    t = t if t.tzinfo else t.replace(tzinfo=_dt.UTC)
    if latest is not None and t > latest:
        return None
    return t


def _seconds(delta: _dt.timedelta) -> float:
    return max(0.0, delta.total_seconds())


# ----------------------------------------------------------------------------------------------- pod rollout: input


@dataclass(frozen=True)
class ColorState:
    """What was observed of one color's apps/v1 Deployment."""

    revision: str | None
    replicas: int = 0  # spec.replicas
    status_replicas: int = 0  # status.replicas (pods of every ReplicaSet, old ones included)
    ready_replicas: int = 0
    updated_replicas: int = 0
    available_replicas: int = 0
    generation: int = 1
    observed_generation: int = 1
    progress_deadline_exceeded: bool = False  # condition Progressing=False, reason ProgressDeadlineExceeded
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> ColorState:
        """Read an apps/v1 Deployment (a dict as the API returns it)."""
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        labels = meta.get("labels") or {}
        exceeded = any(
            c.get("type") == "Progressing" and c.get("status") == "False" and c.get("reason") == "ProgressDeadlineExceeded"
            for c in status.get("conditions") or []
        )
        return cls(
            revision=labels.get(REVISION_LABEL),
            replicas=int(spec.get("replicas", 1)),
            status_replicas=int(status.get("replicas") or 0),
            ready_replicas=int(status.get("readyReplicas") or 0),
            updated_replicas=int(status.get("updatedReplicas") or 0),
            available_replicas=int(status.get("availableReplicas") or 0),
            generation=int(meta.get("generation") or 1),
            observed_generation=int(status.get("observedGeneration") or 0),
            progress_deadline_exceeded=exceeded,
            annotations=dict(meta.get("annotations") or {}),
        )

    def fully_ready(self) -> bool:
        """Every pod of the current spec is ready and no pod of an older template is left."""
        return (
            self.replicas > 0
            and self.observed_generation >= self.generation
            and self.updated_replicas >= self.replicas
            and self.ready_replicas >= self.replicas
            and self.status_replicas == self.replicas
        )


@dataclass(frozen=True)
class SmokeResult:
    """The outcome of a smoke test the controller ran (as asked by a `SmokeRequest`)."""

    revision: str
    passed: bool
    message: str = ""


@dataclass(frozen=True)
class RegionObserved:
    """What the controller observed of one region."""

    blue: ColorState | None
    green: ColorState | None
    #: The color the stable Service selects; None when the Service does not exist (yet).
    stable_color: Color | None
    desired_revision: str
    #: The region's replica count (spec); when autoscaled, the autoscaler's minimum (used for a new color only).
    desired_replicas: int
    autoscaled: bool = False
    stable_annotations: Mapping[str, str] = field(default_factory=dict)
    #: A smoke test the controller ran in this pass (after a `SmokeRequest`), if any.
    smoke_result: SmokeResult | None = None

    def color(self, c: Color) -> ColorState | None:
        return self.blue if c == "blue" else self.green


# ---------------------------------------------------------------------------------------------- pod rollout: output


@dataclass(frozen=True)
class ColorTarget:
    """The desired state of one color's apps/v1 Deployment. `annotations` is a merge patch (None removes)."""

    revision: str | None  # None: leave the revision label as it is (a color observed without one)
    replicas: int
    annotations: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class SmokeRequest:
    """Run the smoke test now: every served model name through `color`'s preview Service (pods), or the served
    names given (adapters, through the stable Service), `prompt`/`expectRegex` from the spec."""

    revision: str
    color: Color | None = None
    model_names: tuple[str, ...] = ()
    timeout_seconds: int = 60


@dataclass(frozen=True)
class ConditionPart:
    """This region's contribution to a condition of the Deployment (the controller combines the regions)."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""


@dataclass(frozen=True)
class RegionRollout:
    """The region's status (maps onto `RegionStatus`)."""

    phase: Phase
    active_color: Color | None
    revision: str | None
    ready_replicas: int
    desired_replicas: int
    message: str
    preview_color: Color | None = None
    preview_revision: str | None = None
    pending_promotion: str | None = None


@dataclass
class RegionDecision:
    #: Desired state of every color that exists or must be created; a color absent here is left alone.
    colors: dict[Color, ColorTarget]
    #: The color the stable Service selects; None: no color may receive traffic yet (do not create it).
    stable_color: Color | None
    #: The color the preview Service selects (the preview, else the color that is not active).
    preview_color: Color | None
    #: Merge patch of the stable Service's annotations.
    stable_annotations: dict[str, str | None]
    smoke: SmokeRequest | None
    status: RegionRollout
    conditions: list[ConditionPart]
    notes: list[Note]
    #: Decide again after this many seconds (a delay or a deadline is due), even if nothing changes.
    requeue_after: float | None


# ------------------------------------------------------------------------------------------------- pod rollout: logic


def _smoke_verdict(state: ColorState, revision: str) -> tuple[bool, str] | None:
    """(passed, message) recorded on a color for `revision`, or None."""
    value = state.annotations.get(SMOKE_ANNOTATION) or ""
    rev, sep, verdict = value.partition("=")
    if not sep or rev != revision:
        return None
    if verdict == "passed":
        return True, ""
    if verdict.startswith("failed"):
        return False, verdict.partition(":")[2]
    return None


def smoke_annotation(result: SmokeResult) -> str:
    if result.passed:
        return f"{result.revision}=passed"
    return f"{result.revision}=failed:{result.message}"[:_MAX_MESSAGE]


class _Plan:
    """Accumulates one decision."""

    def __init__(self, obs: RegionObserved, now: _dt.datetime) -> None:
        self.obs = obs
        self.now = now
        self.colors: dict[Color, ColorTarget] = {}
        for c in COLORS:
            s = obs.color(c)
            if s is not None:
                self.colors[c] = ColorTarget(s.revision, s.replicas, {})
        self.stable: Color | None = obs.stable_color
        self.preview: Color | None = None
        self.stable_annotations: dict[str, str | None] = {}
        self.smoke: SmokeRequest | None = None
        self.notes: list[Note] = []
        self.requeue: float | None = None
        self.phase: Phase = "Stable"
        self.message = ""
        self.pending_promotion: str | None = None
        self.conditions: dict[str, ConditionPart] = {}
        self.desired_active = 0
        #: The revision under rollout shown in status (color, revision), if any.
        self.rolling: tuple[Color, str] | None = None

    def set(self, c: Color, *, revision: str | None = None, replicas: int | None = None, **annotations: str | None) -> None:
        cur = self.colors.get(c)
        if cur is None:
            assert revision is not None and replicas is not None
            cur = ColorTarget(revision, replicas, {})
        merged = dict(cur.annotations)
        for key, value in annotations.items():
            merged[_ANNOTATION_KEYS[key]] = value
        self.colors[c] = ColorTarget(revision if revision is not None else cur.revision, replicas if replicas is not None else cur.replicas, merged)

    def note(self, reason: str, message: str, warning: bool = False) -> None:
        self.notes.append(Note(reason, message[:_MAX_MESSAGE], warning))

    def after(self, seconds: float) -> None:
        seconds = max(1.0, float(seconds))
        self.requeue = seconds if self.requeue is None else min(self.requeue, seconds)

    def at(self, when: _dt.datetime) -> None:
        self.after(_seconds(when - self.now))

    def cond(self, ctype: str, status: str, reason: str, message: str = "") -> None:
        self.conditions[ctype] = ConditionPart(ctype, status, reason, message[:_MAX_MESSAGE])  # type: ignore[arg-type]


_ANNOTATION_KEYS = {
    "switched_at": SWITCHED_AT_ANNOTATION,
    "scale_down_at": SCALE_DOWN_AT_ANNOTATION,
    "preview_started_at": PREVIEW_STARTED_AT_ANNOTATION,
    "smoke": SMOKE_ANNOTATION,
    "aborted_revision": ABORTED_REVISION_ANNOTATION,
    "abort_reason": ABORT_REASON_ANNOTATION,
}


def full_count(obs: RegionObserved, active: ColorState | None) -> int:
    """Replicas the preview must have before the switch: the spec's count; when autoscaled, at least what the
    active color has and has ready (so the switch does not shrink capacity under load)."""
    if not obs.autoscaled or active is None:
        return obs.desired_replicas
    return max(obs.desired_replicas, active.replicas, active.ready_replicas)


def in_place_count(obs: RegionObserved, active: ColorState) -> int:
    """Replicas of the active color: the spec's, or the autoscaler's (never written when autoscaled)."""
    return active.replicas if obs.autoscaled else obs.desired_replicas


def preview_count(bg: BlueGreen, full: int) -> int:
    n = bg.preview_replicas if bg.preview_replicas is not None else full
    return max(1, min(n, max(full, 1)))


def decide_region(obs: RegionObserved, bg: BlueGreen, *, paused: bool = False, promote: str | None = None,
                  now: _dt.datetime) -> RegionDecision:
    """Decide one region's next step of a pod rollout. `promote` is the `perennial.ai/promote` annotation of the
    Perennial Deployment; `now` is timezone-aware."""
    failover = _failover_target(obs)
    if failover is not None and _rollback_cause(obs, bg, now) is None:
        # The invariant first: traffic moves to the color with ready pods, and the rest is decided from there.
        S = obs.stable_color
        moved = replace(obs, stable_color=failover, stable_annotations={**obs.stable_annotations, SWITCHED_AT_ANNOTATION: rfc3339(now)})
        d = decide_region(moved, bg, paused=paused, promote=promote, now=now)
        o = obs.color(failover)
        assert o is not None
        message = f"{S} had no ready replicas; {failover} (revision {o.revision}, {o.ready_replicas} ready) serves"
        d.notes.insert(0, Note("FailedOver", f"Switched the stable Service from {S} (no ready replicas) to {failover} "
                                             f"(revision {o.revision}, {o.ready_replicas} ready)", True))
        d.stable_annotations.setdefault(SWITCHED_AT_ANNOTATION, rfc3339(now))
        d.conditions = [ConditionPart(CONDITION_DEGRADED, "True", "FailedOver", message) if c.type == CONDITION_DEGRADED else c
                        for c in d.conditions]
        d.status = replace(d.status, phase="Degraded", message=f"{message}. {d.status.message}"[:_MAX_MESSAGE])
        return d
    p = _Plan(obs, now)
    if obs.stable_color is None:
        recovered = _serving_color_without_service(obs)
        if recovered is not None:
            # The stable Service is gone (deleted by hand) while a color serves: point it back at once.
            return decide_region(replace(obs, stable_color=recovered), bg, paused=paused, promote=promote, now=now)
        _first_rollout(p, bg)
    else:
        _rollout(p, bg, paused=paused, promote=promote)
    _never_select_an_unready_color(p)
    return _finish(p)


def _failover_target(obs: RegionObserved) -> Color | None:
    S = obs.stable_color
    if S is None:
        return None
    s, o = obs.color(S), obs.color(other(S))
    if s is not None and (s.ready_replicas > 0 or deliberately_at_zero(obs, s)):
        return None
    if o is not None and o.ready_replicas > 0:
        return other(S)
    return None


def deliberately_at_zero(obs: RegionObserved, s: ColorState) -> bool:
    """A color scaled to zero on purpose (the spec's replicas are 0, or an autoscaler such as KEDA scaled it to zero)
    serves nothing by design: that is not an outage to fail over from (failing over to the old color would undo the
    rollout and start it again at every scale-to-zero)."""
    return s.replicas == 0 and (obs.autoscaled or obs.desired_replicas == 0)


def _serving_color_without_service(obs: RegionObserved) -> Color | None:
    """A color that served before the stable Service went missing: ready pods, not a preview on trial (it has no
    preview-started-at) or a preview that passed its smoke test; the desired revision first."""
    candidates = []
    for c in COLORS:
        s = obs.color(c)
        if s is None or s.ready_replicas == 0 or s.revision is None:
            continue
        if s.annotations.get(ABORTED_REVISION_ANNOTATION) == s.revision:
            continue
        trial = PREVIEW_STARTED_AT_ANNOTATION in s.annotations
        verdict = _smoke_verdict(s, s.revision)
        if trial and not (verdict and verdict[0]):
            continue
        candidates.append((s.revision != obs.desired_revision, -s.ready_replicas, c))
    return min(candidates)[2] if candidates else None


def _first_rollout(p: _Plan, bg: BlueGreen) -> None:
    """No stable Service: bring up one color at the full count, smoke it, then give it the first traffic."""
    obs = p.obs
    rev = obs.desired_revision
    blue, green = obs.blue, obs.green
    if green is not None and (blue is None or (green.revision == rev and blue.revision != rev)):
        c: Color = "green"
    else:
        c = "blue"
    s = obs.color(c)
    o = obs.color(other(c))
    p.preview = c
    full = full_count(obs, None)
    p.desired_active = full
    if o is not None and o.replicas > 0:
        p.set(other(c), replicas=0, scale_down_at=None, preview_started_at=None)
        p.note("ScaledDown", f"Scaled {other(c)} (revision {o.revision}) to zero: no traffic reaches it")

    if s is not None and s.annotations.get(ABORTED_REVISION_ANNOTATION) == rev:
        _report_aborted(p, c, s, bg, first=True)
        return
    if s is None or s.revision != rev or parse_time(s.annotations.get(PREVIEW_STARTED_AT_ANNOTATION), p.now + CLOCK_SKEW) is None:
        p.set(c, revision=rev, replicas=full, preview_started_at=rfc3339(p.now), smoke=None, scale_down_at=None,
              aborted_revision=None, abort_reason=None)
        p.note("PreviewCreated", f"Created {c} with revision {rev} ({full} replicas): the first rollout of this region")
        if full == 0:
            # Scaled to zero from the start (spec 0, or KEDA's minimum 0): nothing to test; the Service selects it.
            _switch(p, None, c, rev, bg, first=True)
            return
        p.after(bg.progress_deadline_seconds)
        _progressing(p, "FirstRollout", f"Bringing up {c} (revision {rev}): 0/{full} ready", preview=(c, rev))
        return
    if s.replicas != full:
        p.set(c, replicas=full)
    if full == 0:
        # Scaled to zero (the spec says 0 now): nothing to test; the Service selects the (empty) color.
        _switch(p, None, c, rev, bg, first=True)
        return
    started = parse_time(s.annotations.get(PREVIEW_STARTED_AT_ANNOTATION), p.now + CLOCK_SKEW) or p.now
    if not (s.fully_ready() and s.replicas >= full):  # more ready than needed (the spec lowered replicas) is ready
        deadline = started + _dt.timedelta(seconds=bg.progress_deadline_seconds)
        if p.now >= deadline or s.progress_deadline_exceeded:
            _abort(p, c, rev, bg, "ProgressDeadlineExceeded",
                   f"{c} had {s.ready_replicas}/{s.replicas} ready replicas after {bg.progress_deadline_seconds}s", first=True)
            return
        p.at(deadline)
        _progressing(p, "FirstRollout", f"Bringing up {c} (revision {rev}): {s.ready_replicas}/{full} ready", preview=(c, rev))
        return
    verdict = _smoke(p, c, s, rev, bg)
    if verdict is None:
        return
    if not verdict[0]:
        _abort(p, c, rev, bg, "SmokeTestFailed", verdict[1], first=True)
        return
    _switch(p, None, c, rev, bg, first=True)


def _rollout(p: _Plan, bg: BlueGreen, *, paused: bool, promote: str | None) -> None:
    obs = p.obs
    rev = obs.desired_revision
    A = obs.stable_color
    assert A is not None
    B = other(A)
    a, b = obs.color(A), obs.color(B)
    p.preview = B

    if a is None:
        # The active color's Deployment is gone. If the other color serves, the invariant switches to it;
        # otherwise re-create the active color (no traffic to protect).
        full = full_count(obs, None)
        p.desired_active = full
        if b is None or b.ready_replicas == 0:
            p.set(A, revision=rev, replicas=full, preview_started_at=None, smoke=None, scale_down_at=None)
            p.note("PreviewCreated", f"Re-created the active color {A} with revision {rev} ({full} replicas): it was missing")
            p.phase, p.message = "Degraded", f"The active color {A} was missing; re-creating it"
            p.cond(CONDITION_READY, "False", "NoReadyReplicas", p.message)
            p.cond(CONDITION_PROGRESSING, "True", "RecreatingActiveColor", p.message)
            p.cond(CONDITION_DEGRADED, "True", "NoReadyReplicas", p.message)
        return

    target = in_place_count(obs, a)
    p.desired_active = target
    if target != a.replicas:
        p.set(A, replicas=target)
    if SCALE_DOWN_AT_ANNOTATION in a.annotations or PREVIEW_STARTED_AT_ANNOTATION in a.annotations:
        p.set(A, scale_down_at=None, preview_started_at=None)  # it serves: neither old nor on trial

    if _rolled_back(p, A, a, b, bg):
        return

    if a.revision == rev:
        scaling_down = b is not None and _scale_down_old(p, B, b, bg)
        if scaling_down:
            p.phase = "ScalingDown"
            p.cond(CONDITION_PROGRESSING, "True", "ScalingDown", p.message)
        else:
            _steady(p, A, a, target)
        return

    # A pod rollout is wanted: the active color keeps its revision, always.
    if b is not None and b.annotations.get(ABORTED_REVISION_ANNOTATION) == rev:
        _report_aborted(p, B, b, bg, first=False)
        return
    if paused:
        if b is not None and b.revision != rev:
            _scale_down_old(p, B, b, bg)
        elif b is not None and parse_time(b.annotations.get(PREVIEW_STARTED_AT_ANNOTATION), p.now + CLOCK_SKEW) is not None:
            # The deadline does not run while paused: the preview step restarts (and is smoke-tested again) on resume.
            p.set(B, preview_started_at=PAUSED)
            p.rolling = (B, rev)
        p.phase, p.message = "Paused", f"Paused: revision {rev} is not rolled out (spec.paused)"
        p.cond(CONDITION_PROGRESSING, "Unknown", "RolloutPaused", p.message)
        return

    full = full_count(obs, a)
    start = (b is None or b.revision != rev or b.replicas == 0
             or parse_time(b.annotations.get(PREVIEW_STARTED_AT_ANNOTATION), p.now + CLOCK_SKEW) is None)
    if start:
        n = preview_count(bg, full)
        if b is not None and b.revision == rev:
            n = max(n, b.replicas)  # its pods are up (e.g. the spec went back to the old color's revision): keep them
        p.set(B, revision=rev, replicas=n, preview_started_at=rfc3339(p.now), smoke=None, scale_down_at=None,
              aborted_revision=None, abort_reason=None)
        p.note("PreviewCreated", f"Started preview {B} with revision {rev} ({n} replicas); {A} (revision {a.revision}) keeps the traffic")
        if b is None or b.revision != rev or b.replicas != n:
            p.after(bg.progress_deadline_seconds)
            _progressing(p, "PreviewProgressing", f"Preview {B} (revision {rev}): 0/{n} ready", preview=(B, rev))
            return
        # Its pods are already there (a resumed preview, or the spec went back to this color's revision): go on
        # with them in this same pass, as the annotations now say.
        kept = {k: v for k, v in b.annotations.items() if k not in (SMOKE_ANNOTATION, SCALE_DOWN_AT_ANNOTATION,
                                                                     ABORTED_REVISION_ANNOTATION, ABORT_REASON_ANNOTATION)}
        b = replace(b, annotations={**kept, PREVIEW_STARTED_AT_ANNOTATION: rfc3339(p.now)})

    started = parse_time(b.annotations.get(PREVIEW_STARTED_AT_ANNOTATION), p.now + CLOCK_SKEW) or p.now
    deadline = started + _dt.timedelta(seconds=bg.progress_deadline_seconds)
    if not b.fully_ready():
        if p.now >= deadline or b.progress_deadline_exceeded:
            _abort(p, B, rev, bg, "ProgressDeadlineExceeded",
                   f"preview {B} had {b.ready_replicas}/{b.replicas} ready replicas after {bg.progress_deadline_seconds}s")
            return
        p.at(deadline)
        _progressing(p, "PreviewProgressing", f"Preview {B} (revision {rev}): {b.ready_replicas}/{b.replicas} ready", preview=(B, rev))
        return

    verdict = _smoke(p, B, b, rev, bg)
    if verdict is None:
        return
    if not verdict[0]:
        _abort(p, B, rev, bg, "SmokeTestFailed", verdict[1])
        return

    if not (bg.auto_promote or promote == rev):
        p.phase = "Paused"
        p.pending_promotion = rev
        p.message = (f"Preview {B} (revision {rev}) passed its checks and waits for a promotion: "
                     f"perennial promote <name>, or kubectl annotate pdeploy <name> perennial.ai/promote={rev} --overwrite")
        p.cond(CONDITION_PROGRESSING, "Unknown", "WaitingForPromotion", p.message)
        p.rolling = (B, rev)
        return

    n = max(full, 1)
    if b.replicas < n:
        p.set(B, replicas=n, preview_started_at=rfc3339(p.now))
        p.note("PreviewScalingUp", f"Scaling preview {B} from {b.replicas} to {n} replicas before the switch")
        p.after(bg.progress_deadline_seconds)
        p.phase = "Promoting"
        _progressing(p, "PreviewScalingUp", f"Scaling preview {B} (revision {rev}) to {n} replicas before the switch",
                     preview=(B, rev), phase="Promoting")
        return
    _switch(p, A, B, rev, bg, first=False)


def _progressing(p: _Plan, reason: str, message: str, *, preview: tuple[Color, str] | None = None, phase: Phase = "Progressing") -> None:
    p.phase, p.message = phase, message
    if preview:
        p.preview = preview[0]
        p.rolling = preview
    p.cond(CONDITION_PROGRESSING, "True", reason, message)


def _smoke(p: _Plan, c: Color, s: ColorState, rev: str, bg: BlueGreen) -> tuple[bool, str] | None:
    """The smoke verdict for `rev` on color `c`: recorded, just run (then recorded), or asked for (None)."""
    if not bg.smoke_test.enabled:
        return True, "smoke test disabled"
    verdict = _smoke_verdict(s, rev)
    if verdict is not None:
        return verdict
    result = p.obs.smoke_result
    if result is not None and result.revision == rev:
        p.set(c, smoke=smoke_annotation(result))
        if result.passed:
            p.note("SmokeTestPassed", f"Smoke test of {c} (revision {rev}) passed")
        else:
            p.note("SmokeTestFailed", f"Smoke test of {c} (revision {rev}) failed: {result.message}", warning=True)
        return result.passed, result.message
    p.smoke = SmokeRequest(revision=rev, color=c, timeout_seconds=bg.smoke_test.timeout_seconds)
    p.note("PreviewReady", f"Every pod of {c} (revision {rev}) is ready ({s.ready_replicas}); running the smoke test")
    p.after(bg.smoke_test.timeout_seconds)
    _progressing(p, "SmokeTesting", f"Smoke-testing {c} (revision {rev}) through the preview Service", preview=(c, rev))
    return None


def _switch(p: _Plan, old: Color | None, new: Color, rev: str, bg: BlueGreen, *, first: bool) -> None:
    p.stable = new
    p.stable_annotations[SWITCHED_AT_ANNOTATION] = rfc3339(p.now)
    p.set(new, preview_started_at=None)
    if first:
        p.note("Switched", f"The stable Service now selects {new} (revision {rev}): the first traffic of this region")
        p.preview = other(new)
        _steady(p, new, p.obs.color(new), p.desired_active)
        return
    when = p.now + _dt.timedelta(seconds=bg.scale_down_delay_seconds)
    assert old is not None
    if not p.obs.autoscaled:
        p.set(new, replicas=p.obs.desired_replicas)  # it serves now: the spec's count (it had at least that many ready)
    p.set(old, scale_down_at=rfc3339(when))
    p.after(bg.scale_down_delay_seconds)
    p.note("Switched", f"The stable Service now selects {new} (revision {rev}); {old} is kept until {rfc3339(when)} for rollback")
    p.preview = old
    p.phase, p.message = "ScalingDown", f"Switched to {new} (revision {rev}); {old} is kept until {rfc3339(when)} for rollback"
    p.cond(CONDITION_PROGRESSING, "True", "Switched", p.message)


def _steady(p: _Plan, A: Color, a: ColorState | None, target: int) -> None:
    ready = a.ready_replicas if a is not None else 0
    p.preview = other(A)
    if target == 0:
        p.phase, p.message = "Stable", f"{A} is scaled to zero"
        p.cond(CONDITION_PROGRESSING, "False", "RolloutComplete", p.message)
    elif ready == 0:
        p.phase, p.message = "Degraded", f"{A} has no ready replicas (0/{target})"
        p.cond(CONDITION_PROGRESSING, "True", "Scaling", p.message)
    elif ready < target:
        p.phase, p.message = "Progressing", f"Scaling {A}: {ready}/{target} ready"
        p.cond(CONDITION_PROGRESSING, "True", "Scaling", p.message)
    else:
        p.phase, p.message = "Stable", f"{A} serves with {ready}/{target} ready replicas"
        p.cond(CONDITION_PROGRESSING, "False", "RolloutComplete", p.message)


def _scale_down_old(p: _Plan, B: Color, b: ColorState, bg: BlueGreen) -> bool:
    """Scale the color that is not active to zero once its delay is over. True while it still has replicas."""
    if b.replicas == 0:
        return False
    longest = _dt.timedelta(seconds=max(bg.scale_down_delay_seconds, bg.abort_scale_down_delay_seconds)) + CLOCK_SKEW
    when = parse_time(b.annotations.get(SCALE_DOWN_AT_ANNOTATION), p.now + longest)
    if when is None:
        # Either the operator stopped between the switch and this annotation (the old color: keep it for rollback)
        # or a preview of a revision the spec no longer asks for (superseded: the shorter abort delay).
        superseded = PREVIEW_STARTED_AT_ANNOTATION in b.annotations
        delay = bg.abort_scale_down_delay_seconds if superseded else bg.scale_down_delay_seconds
        when = p.now + _dt.timedelta(seconds=delay)
        if delay > 0:
            p.set(B, scale_down_at=rfc3339(when))
    if p.now >= when:
        p.set(B, replicas=0, scale_down_at=None, preview_started_at=None)
        p.note("ScaledDown", f"Scaled {B} (revision {b.revision}) to zero")
        p.message = p.message or f"Scaled {B} to zero"
        return False
    p.at(when)
    p.message = f"{B} (revision {b.revision}) is kept until {rfc3339(when)}, then scaled to zero"
    return True


def _rollback_cause(obs: RegionObserved, bg: BlueGreen, now: _dt.datetime) -> str | None:
    """Within the post-promotion window after a switch, the new (active) color lost ready replicas that the old
    one still has: why to switch back, or None."""
    A = obs.stable_color
    if A is None:
        return None
    a, b = obs.color(A), obs.color(other(A))
    if a is None or b is None or b.revision == a.revision or b.ready_replicas == 0:
        return None
    if b.annotations.get(ABORTED_REVISION_ANNOTATION) == b.revision or PREVIEW_STARTED_AT_ANNOTATION in b.annotations:
        return None  # only the color that served before the switch is a rollback target, never a preview on trial
    switched = parse_time(obs.stable_annotations.get(SWITCHED_AT_ANNOTATION), now + CLOCK_SKEW)
    window = bg.post_promotion_window_seconds if bg.post_promotion_window_seconds is not None else bg.scale_down_delay_seconds
    if switched is None or window == 0 or now >= switched + _dt.timedelta(seconds=window):
        return None
    need = max(1, min(b.replicas, a.replicas))  # what the old color served (it keeps its count during the window)
    if a.ready_replicas >= need or b.ready_replicas <= a.ready_replicas:
        return None
    return f"{A} (revision {a.revision}) had {a.ready_replicas}/{need} ready replicas within {window}s of the switch"


def _rolled_back(p: _Plan, A: Color, a: ColorState, b: ColorState | None, bg: BlueGreen) -> bool:
    """Within the post-promotion window, switch back when the new color lost ready replicas the old one has."""
    cause = _rollback_cause(p.obs, bg, p.now)
    if cause is None or b is None:
        return False
    B = other(A)
    p.stable = B
    p.stable_annotations[SWITCHED_AT_ANNOTATION] = rfc3339(p.now)
    p.set(B, scale_down_at=None)
    _mark_aborted(p, A, a.revision or "", bg, "RolledBack", cause)
    p.note("RolledBack", f"Switched back to {B} (revision {b.revision}): {cause}", warning=True)
    p.preview = A
    p.desired_active = b.replicas
    p.phase, p.message = "Aborted", f"Rolled back to {B} (revision {b.revision}): {cause}"
    p.cond(CONDITION_PROGRESSING, "False", "RolloutAborted", p.message)
    p.cond(CONDITION_DEGRADED, "True", "RolledBack", p.message)
    return True


def _mark_aborted(p: _Plan, c: Color, rev: str, bg: BlueGreen, reason: str, message: str) -> None:
    delay = bg.abort_scale_down_delay_seconds
    if delay == 0:
        p.set(c, replicas=0, aborted_revision=rev, abort_reason=f"{reason}: {message}"[:_MAX_MESSAGE], preview_started_at=None,
              scale_down_at=None)
        p.note("ScaledDown", f"Scaled {c} (revision {rev}) to zero")
    else:
        when = p.now + _dt.timedelta(seconds=delay)
        p.set(c, aborted_revision=rev, abort_reason=f"{reason}: {message}"[:_MAX_MESSAGE], preview_started_at=None,
              scale_down_at=rfc3339(when))
        p.after(delay)


def _abort(p: _Plan, c: Color, rev: str, bg: BlueGreen, reason: str, message: str, *, first: bool = False) -> None:
    _mark_aborted(p, c, rev, bg, reason, message)
    p.note("Aborted", f"Aborted the rollout of revision {rev}: {reason}: {message}", warning=True)
    p.preview = c
    p.rolling = (c, rev)
    _aborted_status(p, rev, f"{reason}: {message}", first=first)


def _aborted_status(p: _Plan, rev: str, cause: str, *, first: bool) -> None:
    active = p.obs.stable_color
    keeps = f"; {active} keeps the traffic" if active and not first else "; nothing serves in this region"
    p.phase, p.message = "Aborted", f"Rollout of revision {rev} aborted ({cause}){keeps}. Change the spec to another revision to retry"
    p.cond(CONDITION_PROGRESSING, "False", "RolloutAborted", p.message)
    # A rollback stays a rollback in the status for as long as the world records it (the abort reason annotation).
    p.cond(CONDITION_DEGRADED, "True", "RolledBack" if cause.startswith("RolledBack:") else "RolloutAborted", p.message)
    if first:
        p.cond(CONDITION_READY, "False", "RolloutAborted", p.message)


def _report_aborted(p: _Plan, c: Color, s: ColorState, bg: BlueGreen, *, first: bool) -> None:
    """The desired revision was aborted before: not retried; the preview goes to zero after its delay."""
    rev = p.obs.desired_revision
    if s.replicas > 0:
        when = parse_time(s.annotations.get(SCALE_DOWN_AT_ANNOTATION),
                          p.now + _dt.timedelta(seconds=bg.abort_scale_down_delay_seconds) + CLOCK_SKEW)
        if when is None or p.now >= when:
            p.set(c, replicas=0, scale_down_at=None, preview_started_at=None)
            p.note("ScaledDown", f"Scaled {c} (aborted revision {rev}) to zero")
        else:
            p.at(when)
    p.preview = c
    p.rolling = (c, rev)
    _aborted_status(p, rev, s.annotations.get(ABORT_REASON_ANNOTATION) or "aborted", first=first)


def _never_select_an_unready_color(p: _Plan) -> None:
    """The invariant: the stable Service never selects a color without ready pods while the other has some."""
    S = p.stable
    if S is None:
        return
    s, o = p.obs.color(S), p.obs.color(other(S))
    if s is not None and (s.ready_replicas > 0 or deliberately_at_zero(p.obs, s)):
        return
    if o is None or o.ready_replicas == 0:
        return
    O = other(S)
    p.stable = O
    p.stable_annotations[SWITCHED_AT_ANNOTATION] = rfc3339(p.now)
    # never scale down, nor change the revision of, the color that now serves
    cur = p.colors.get(O)
    p.colors[O] = ColorTarget(o.revision, max(o.replicas, cur.replicas if cur and cur.revision == o.revision else 0),
                              {SCALE_DOWN_AT_ANNOTATION: None, PREVIEW_STARTED_AT_ANNOTATION: None})
    p.smoke = None
    p.preview = S
    p.note("FailedOver", f"Switched the stable Service from {S} (no ready replicas) to {O} (revision {o.revision}, "
           f"{o.ready_replicas} ready): serving anything beats serving nothing", warning=True)
    p.phase, p.message = "Degraded", f"{S} had no ready replicas; {O} (revision {o.revision}) serves"
    p.cond(CONDITION_DEGRADED, "True", "FailedOver", p.message)
    p.cond(CONDITION_PROGRESSING, "True", "FailedOver", p.message)


def _finish(p: _Plan) -> RegionDecision:
    obs = p.obs
    S = p.stable
    active = obs.color(S) if S else None
    ready = active.ready_replicas if active else 0
    target = p.colors.get(S) if S else None
    desired = target.replicas if target else p.desired_active
    conds = dict(p.conditions)
    if CONDITION_READY not in conds:
        if S is None:
            conds[CONDITION_READY] = ConditionPart(CONDITION_READY, "False", "FirstRolloutInProgress", p.message or "No color serves yet")
        elif ready > 0:
            conds[CONDITION_READY] = ConditionPart(CONDITION_READY, "True", "Serving", f"{S} serves with {ready} ready replicas")
        elif desired == 0:
            conds[CONDITION_READY] = ConditionPart(CONDITION_READY, "True", "ScaledToZero", f"{S} is scaled to zero")
        else:
            conds[CONDITION_READY] = ConditionPart(CONDITION_READY, "False", "NoReadyReplicas", f"{S} has no ready replicas")
    if CONDITION_DEGRADED not in conds:
        if S is not None and ready == 0 and desired > 0:
            conds[CONDITION_DEGRADED] = ConditionPart(CONDITION_DEGRADED, "True", "NoReadyReplicas", f"{S} has no ready replicas")
        else:
            conds[CONDITION_DEGRADED] = ConditionPart(CONDITION_DEGRADED, "False", "AsExpected", "")
    if CONDITION_PROGRESSING not in conds:
        conds[CONDITION_PROGRESSING] = ConditionPart(CONDITION_PROGRESSING, "False", "RolloutComplete", p.message)
    preview = p.preview if p.preview != S else (other(S) if S else None)
    rolling = p.rolling if p.rolling and p.rolling[0] != S else None
    status = RegionRollout(
        phase=p.phase,
        active_color=S,
        revision=active.revision if active else None,
        ready_replicas=ready,
        desired_replicas=desired,
        message=p.message[:_MAX_MESSAGE],
        preview_color=rolling[0] if rolling else None,
        preview_revision=rolling[1] if rolling else None,
        pending_promotion=p.pending_promotion,
    )
    return RegionDecision(
        colors=dict(p.colors),
        stable_color=S,
        preview_color=preview,
        stable_annotations=dict(p.stable_annotations),
        smoke=p.smoke,
        status=status,
        conditions=[conds[t] for t in (CONDITION_READY, CONDITION_PROGRESSING, CONDITION_DEGRADED)],
        notes=list(p.notes),
        requeue_after=p.requeue,
    )


# ==================================================================================================== adapter rollout


@dataclass(frozen=True)
class AdapterInfo:
    """An Adapter object a served name should point to."""

    name: str  # the Adapter object's name (the `lora_name` loaded into the engine)
    uri: str
    rank: int
    base_model: str  # its spec.baseModelRef.name


@dataclass(frozen=True)
class PodRoutes:
    """What one serving pod's sidecar reports at `GET /perennial/routes`."""

    name: str
    ready: bool
    revision: str | None
    errors: Mapping[str, str] = field(default_factory=dict)  # adapter -> error
    #: the revision of the newest document the sidecar read but could not apply (an adapter failed to load):
    #: its `errors` are about that document
    pending: str | None = None


@dataclass(frozen=True)
class AdaptersObserved:
    """What the controller observed of one region's adapter routes."""

    #: The routes document in the ConfigMap (`routes.json`), None when it does not exist yet.
    routes: Mapping[str, Any] | None
    #: The `perennial.ai/adapter-rollouts` annotation of the ConfigMap, parsed (see `parse_progress`).
    progress: Mapping[str, Mapping[str, Any]]
    #: The active color's pods.
    pods: tuple[PodRoutes, ...]
    #: Served name -> the Adapter it should point to (from the spec: pinned, or the family's latest promoted).
    desired: Mapping[str, AdapterInfo]
    base_name: str  # the served base model name
    base_model: str  # the BaseModel object served
    max_loras: int
    max_lora_rank: int
    smoke_result: SmokeResult | None = None  # `revision` is the routes revision the smoke test ran against


@dataclass(frozen=True)
class ServedRoute:
    """Status of one served name (maps onto `ServedAdapterStatus`)."""

    name: str
    adapter: str
    canary_adapter: str | None = None
    canary_weight: int | None = None


@dataclass
class AdapterDecision:
    #: The whole desired routes document (what the ConfigMap's `routes.json` must hold), with its revision.
    routes: dict[str, Any]
    #: The desired `perennial.ai/adapter-rollouts` annotation (`dump_progress`); {} when nothing is under way.
    progress: dict[str, dict[str, Any]]
    #: Smoke-test these preview names through the stable Service now (`revision`: the routes revision).
    smoke: SmokeRequest | None
    served: list[ServedRoute]
    phase: Phase
    message: str
    conditions: list[ConditionPart]
    notes: list[Note]
    requeue_after: float | None
    pending_promotion: str | None = None


def routes_revision(adapters: Mapping[str, Any], routes: Mapping[str, Any]) -> str:
    """First 10 hex chars of sha256 over the canonical JSON of a routes document's adapters and routes."""
    canonical = json.dumps({"adapters": adapters, "routes": routes}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def parse_progress(value: str | None) -> dict[str, dict[str, Any]]:
    """The adapter-rollouts annotation; {} when absent or unreadable (then rollouts restart from their first step)."""
    if not value:
        return {}
    try:
        data = json.loads(value)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: _progress_entry(v) for k, v in data.items() if isinstance(k, str) and isinstance(v, dict)}


_PROGRESS_STRINGS = ("adapter", "from", "aborted", "abortReason", "smoke", "startedAt", "stepAt", "switchedAt")


def _progress_entry(v: Mapping[str, Any]) -> dict[str, Any]:
    """One served name's progress with only the fields of the types the decision reads (the ConfigMap's annotation
    is anyone's with edit rights in the namespace: a wrong type was an exception that stopped every decision)."""
    out: dict[str, Any] = {k: v[k] for k in _PROGRESS_STRINGS if isinstance(v.get(k), str)}
    step = v.get("step")
    if isinstance(step, int) and not isinstance(step, bool) and -1 <= step <= 1000:
        out["step"] = step
    return out


def dump_progress(progress: Mapping[str, Mapping[str, Any]]) -> str:
    return json.dumps(progress, sort_keys=True, separators=(",", ":"))


def fit_problem(info: AdapterInfo, base_model: str, max_lora_rank: int) -> tuple[str, str] | None:
    """(reason, message) when an adapter cannot be served by this engine, else None."""
    if info.base_model != base_model:
        return "BaseModelMismatch", f"Adapter {info.name} was trained on {info.base_model}, this Deployment serves {base_model}"
    if info.rank > max_lora_rank:
        return "AdapterRankTooHigh", f"Adapter {info.name} has LoRA rank {info.rank} > engine.maxLoraRank {max_lora_rank}"
    return None


def _primary(entries: list[Mapping[str, Any]] | None) -> str | None:
    if not entries:
        return None
    return max(entries, key=lambda e: (int(e.get("weight", 0)), str(e.get("adapter"))))["adapter"]


def decide_adapters(obs: AdaptersObserved, bg: BlueGreen, rollout: AdapterRollout, *, paused: bool = False,
                    promote: str | None = None, now: _dt.datetime) -> AdapterDecision:
    """Decide one region's next step of the adapter rollouts (served name -> Adapter) in the running pods.

    Per served name whose Adapter changes: load the new adapter next to the old one under `<served>-preview`,
    wait until every ready pod applied that routes revision, smoke-test the preview name, wait for a promotion
    (`autoPromote: false`: the annotation names the new Adapter), take the canary steps (weights, pauses), move
    the name, unload the old adapter after the delay. A load error, a failed smoke test or an exceeded deadline
    aborts (the name keeps its adapter; not retried while the spec asks for that adapter). Adapters that do not
    fit the engine are refused with a condition, before anything is loaded.
    """
    current = obs.routes or {}
    cur_adapters: dict[str, Any] = {k: dict(v) for k, v in (current.get("adapters") or {}).items()}
    cur_routes: dict[str, list[dict[str, Any]]] = {k: [dict(e) for e in v] for k, v in (current.get("routes") or {}).items()}
    adapters = {k: dict(v) for k, v in cur_adapters.items()}
    routes = {k: [dict(e) for e in v] for k, v in cur_routes.items()}
    progress: dict[str, dict[str, Any]] = {k: dict(v) for k, v in obs.progress.items()}
    notes: list[Note] = []
    requeue: list[float] = []
    problems: list[tuple[str, str]] = []  # (reason, message) of refused or aborted rollouts
    waiting: list[str] = []
    waiting_names: set[str] = set()
    messages: list[str] = []
    smoke_names: list[str] = []
    pending: str | None = None
    stamp = rfc3339(now)
    unload_delay = rollout.unload_delay_seconds if rollout.unload_delay_seconds is not None else bg.scale_down_delay_seconds
    steps = sorted(rollout.canary_steps, key=lambda s: s.weight)

    ready_pods = [p for p in obs.pods if p.ready]
    applied = bool(ready_pods) and obs.routes is not None and all(p.revision == current.get("revision") for p in ready_pods)
    # Only a pod that applied the current document speaks about the adapters in it (an older report is stale).
    load_errors = {a: e for p in ready_pods if current.get("revision") in (p.revision, p.pending) for a, e in p.errors.items()}

    # Refuse what cannot fit before touching anything.
    distinct_desired = {info.name for info in obs.desired.values()}
    if len(distinct_desired) > obs.max_loras:
        problems.append(("TooManyAdapters", f"{len(distinct_desired)} adapters are to be served, engine.maxLoras is {obs.max_loras}"))
    refused = {s: fit_problem(info, obs.base_model, obs.max_lora_rank) for s, info in obs.desired.items()}
    for s, problem in sorted(refused.items()):
        if problem:
            problems.append((problem[0], f"{s}: {problem[1]}"))
    too_many = len(distinct_desired) > obs.max_loras

    def referenced(adapter: str) -> bool:
        return any(e["adapter"] == adapter for entries in routes.values() for e in entries) or any(
            adapter in (pr.get("from"), pr.get("adapter")) for pr in progress.values() if not pr.get("aborted"))

    def drop_unreferenced() -> None:
        for a in list(adapters):
            if not referenced(a):
                del adapters[a]

    def abort(s: str, new: str, reason: str, message: str) -> None:
        routes.pop(s + PREVIEW_SUFFIX, None)
        old = progress.get(s, {}).get("from")
        if old and s in routes:
            routes[s] = [{"adapter": old, "weight": 100}]
        progress[s] = {"aborted": new, "abortReason": f"{reason}: {message}"[:_MAX_MESSAGE]}
        notes.append(Note("Aborted", f"Aborted moving {s} to adapter {new}: {reason}: {message}"[:_MAX_MESSAGE], True))
        problems.append(("RolloutAborted", f"{s}: moving to adapter {new} aborted ({reason}: {message})"))

    # Served names no longer in the spec go at once (no client may rely on a name the spec removed).
    for s in sorted({k for k in routes if not k.endswith(PREVIEW_SUFFIX)} - set(obs.desired)):
        if s + PREVIEW_SUFFIX in obs.desired:
            continue
        routes.pop(s, None)
        routes.pop(s + PREVIEW_SUFFIX, None)
        progress.pop(s, None)
        notes.append(Note("AdapterRemoved", f"Stopped serving {s}"))
    for k in [k for k in routes if k.endswith(PREVIEW_SUFFIX) and k[: -len(PREVIEW_SUFFIX)] not in obs.desired]:
        del routes[k]

    in_flight = sum(1 for s, pr in progress.items() if pr.get("adapter") and not pr.get("switchedAt") and s in obs.desired)

    for s in sorted(obs.desired):
        info = obs.desired[s]
        want = info.name
        entries = routes.get(s)
        pr = progress.get(s, {})
        primary = pr.get("from") if pr.get("adapter") and not pr.get("switchedAt") and pr.get("from") else _primary(entries)

        if refused[s] or too_many:
            continue  # reported above; the name keeps what it serves
        if not entries or (not obs.pods and primary != want and not paused):
            # A new served name, or no pod runs (scaled to zero): no traffic to protect, serve it at once.
            adapters[want] = {"uri": info.uri, "rank": info.rank}
            routes[s] = [{"adapter": want, "weight": 100}]
            routes.pop(s + PREVIEW_SUFFIX, None)
            progress.pop(s, None)
            notes.append(Note("AdapterServed", f"Serving {s} with adapter {want}"))
            continue
        if primary == want and want in load_errors:
            # Served (a new name is served at once), but the pods could not load it: they keep their last document.
            problems.append(("AdapterLoadFailed", f"{s}: adapter {want} does not load in the pods: {load_errors[want]}"))
        if primary == want:
            # Stable. Cancel a preview (or canary) of something else; unload the old adapter after the delay.
            if pr.get("adapter") and pr.get("adapter") != want and not pr.get("switchedAt"):
                routes[s] = [{"adapter": want, "weight": 100}]
                routes.pop(s + PREVIEW_SUFFIX, None)
                progress.pop(s, None)
                notes.append(Note("PreviewAbandoned", f"{s} stays on adapter {want}: the spec no longer asks for {pr.get('adapter')}"))
            elif pr.get("switchedAt") and pr.get("from"):
                switched = parse_time(pr["switchedAt"], now + CLOCK_SKEW)
                if switched is None:  # unreadable or in the future: the delay runs from now (written back)
                    switched, pr = now, {**pr, "switchedAt": stamp}
                    progress[s] = pr
                due = switched + _dt.timedelta(seconds=unload_delay)
                if now >= due:
                    progress.pop(s, None)
                    notes.append(Note("AdapterUnloaded", f"Unloaded adapter {pr['from']} (replaced by {want} under {s})"))
                else:
                    requeue.append(_seconds(due - now))
                    messages.append(f"{s}: adapter {pr['from']} stays loaded until {rfc3339(due)} for rollback")
            elif pr.get("aborted") and pr.get("aborted") != want:
                progress.pop(s, None)  # the spec moved on from the aborted adapter: asking for it again retries it
            continue
        # The name should move to `want`.
        if pr.get("aborted") == want:
            why = pr.get("abortReason", "")
            problems.append(("RolloutAborted", f"{s}: moving to adapter {want} was aborted ({why}); change the spec to another adapter to retry"))
            continue
        if paused:
            waiting.append(f"{s}: moving to adapter {want} is paused (spec.paused)")
            waiting_names.add(s)
            continue
        if pr.get("adapter") != want or pr.get("switchedAt"):
            # Start (or restart): the name keeps its primary adapter at full weight, the new one loads as a preview.
            if len(set(adapters) | {want}) > obs.max_loras and in_flight > 0:
                waiting.append(f"{s}: waiting for a free adapter slot (engine.maxLoras {obs.max_loras})")
                waiting_names.add(s)
                continue
            routes[s] = [{"adapter": primary, "weight": 100}]
            adapters[want] = {"uri": info.uri, "rank": info.rank}
            routes[s + PREVIEW_SUFFIX] = [{"adapter": want, "weight": 100}]
            progress[s] = {"adapter": want, "from": primary, "startedAt": stamp, "step": -1}
            in_flight += 1
            notes.append(Note("PreviewCreated", f"Loading adapter {want} next to {primary} under {s}{PREVIEW_SUFFIX}"))
            requeue.append(bg.progress_deadline_seconds)
            messages.append(f"{s}: loading adapter {want} under {s}{PREVIEW_SUFFIX}")
            continue
        # In progress.
        if want in load_errors:
            abort(s, want, "AdapterLoadFailed", load_errors[want])
            continue
        # The deadline runs from the last change of this name's routes (the start, or the last canary step).
        started = parse_time(pr.get("stepAt") or pr.get("startedAt"), now + CLOCK_SKEW)
        if started is None:  # unreadable or in the future: the deadline runs from now (written back)
            started, pr = now, {**pr, "stepAt": stamp}
            progress[s] = pr
        deadline = started + _dt.timedelta(seconds=bg.progress_deadline_seconds)
        if not applied:
            if now >= deadline:
                abort(s, want, "ProgressDeadlineExceeded", f"not every ready pod applied the routes within {bg.progress_deadline_seconds}s")
            else:
                requeue.append(_seconds(deadline - now))
                done = sum(1 for p in ready_pods if p.revision == current.get("revision"))
                messages.append(f"{s}: {done}/{len(ready_pods)} ready pods loaded adapter {want}")
            continue
        smoke = pr.get("smoke")
        if smoke is None and not bg.smoke_test.enabled:
            smoke = "passed"
        if smoke is None and obs.smoke_result is not None and obs.smoke_result.revision == current.get("revision"):
            r = obs.smoke_result
            smoke = "passed" if r.passed else f"failed:{r.message}"[:_MAX_MESSAGE]
            pr = progress[s] = {**pr, "smoke": smoke}
            notes.append(Note("SmokeTestPassed" if r.passed else "SmokeTestFailed",
                              f"Smoke test of {s}{PREVIEW_SUFFIX} (adapter {want}) {'passed' if r.passed else 'failed: ' + r.message}"[:_MAX_MESSAGE],
                              not r.passed))
        if smoke is None:
            smoke_names.append(s + PREVIEW_SUFFIX)
            messages.append(f"{s}: smoke-testing adapter {want} under {s}{PREVIEW_SUFFIX}")
            continue
        if smoke.startswith("failed"):
            abort(s, want, "SmokeTestFailed", smoke.partition(":")[2])
            continue
        if not (bg.auto_promote or promote == want):
            pending = pending or want
            waiting_names.add(s)
            waiting.append(f"{s}: adapter {want} passed its checks and waits for a promotion "
                           f"(kubectl annotate pdeploy <name> perennial.ai/promote={want} --overwrite)")
            continue
        k = int(pr.get("step", -1))
        if k >= 0:
            due = (parse_time(pr.get("stepAt"), now + CLOCK_SKEW) or now) + _dt.timedelta(seconds=steps[k].pause_seconds if k < len(steps) else 0)
            if now < due:
                requeue.append(_seconds(due - now))
                messages.append(f"{s}: canary at {steps[k].weight}% to adapter {want} until {rfc3339(due)}")
                continue
        if k + 1 < len(steps):
            w = steps[k + 1].weight
            routes[s] = [{"adapter": primary, "weight": 100 - w}, {"adapter": want, "weight": w}]
            progress[s] = {**pr, "step": k + 1, "stepAt": stamp}
            notes.append(Note("CanaryStep", f"Sending {w}% of {s} to adapter {want}"))
            requeue.append(max(1, steps[k + 1].pause_seconds))
            messages.append(f"{s}: canary at {w}% to adapter {want}")
            continue
        routes[s] = [{"adapter": want, "weight": 100}]
        routes.pop(s + PREVIEW_SUFFIX, None)
        progress[s] = {"adapter": want, "from": primary, "switchedAt": stamp}
        notes.append(Note("Switched", f"{s} now serves adapter {want}; {primary} stays loaded {unload_delay}s for rollback"))
        if unload_delay > 0:
            requeue.append(unload_delay)
        else:
            progress.pop(s, None)
            notes.append(Note("AdapterUnloaded", f"Unloaded adapter {primary} (replaced by {want} under {s})"))
        messages.append(f"{s}: moved to adapter {want}")

    drop_unreferenced()
    doc: dict[str, Any] = {"base": {"name": obs.base_name}, "adapters": adapters, "routes": routes}
    doc = {"revision": routes_revision(adapters, routes), **doc}
    if current.get("revision") == doc["revision"] and current.get("base") == doc["base"]:
        doc = dict(current)  # unchanged: keep the document byte for byte

    served = []
    for s in sorted(routes):
        if s.endswith(PREVIEW_SUFFIX):
            continue
        entries = sorted(routes[s], key=lambda e: -int(e.get("weight", 0)))
        main = entries[0]["adapter"]
        canary = entries[1] if len(entries) > 1 else None
        served.append(ServedRoute(s, main, canary["adapter"] if canary else None, int(canary["weight"]) if canary else None))

    smoke_req = None
    if smoke_names and doc.get("revision") == current.get("revision"):
        smoke_req = SmokeRequest(revision=str(current.get("revision")), model_names=tuple(smoke_names), timeout_seconds=bg.smoke_test.timeout_seconds)
        notes.append(Note("PreviewReady", f"Every ready pod loaded {', '.join(smoke_names)}; running the smoke test"))
        requeue.append(bg.smoke_test.timeout_seconds)
    elif smoke_names:
        messages.append("waiting for the pods to apply the routes before the smoke test")

    moving = any(pr.get("adapter") and not pr.get("switchedAt") and s not in waiting_names for s, pr in progress.items())
    conditions = []
    if problems:
        reason, _ = problems[0]
        message = "; ".join(m for _, m in problems)
        conditions.append(ConditionPart(CONDITION_DEGRADED, "True", reason, message[:_MAX_MESSAGE]))
    else:
        conditions.append(ConditionPart(CONDITION_DEGRADED, "False", "AsExpected", ""))
    if waiting and not moving:
        phase: Phase = "Paused"
        conditions.append(ConditionPart(CONDITION_PROGRESSING, "Unknown", "WaitingForPromotion" if pending else "RolloutPaused",
                                        "; ".join(waiting)[:_MAX_MESSAGE]))
    elif moving or smoke_req or any(n.reason in ("Switched", "CanaryStep", "PreviewCreated") for n in notes):
        phase = "Progressing"
        conditions.append(ConditionPart(CONDITION_PROGRESSING, "True", "AdapterRollout", "; ".join(messages + waiting)[:_MAX_MESSAGE]))
    elif any(pr.get("switchedAt") for pr in progress.values()):
        phase = "ScalingDown"
        conditions.append(ConditionPart(CONDITION_PROGRESSING, "True", "UnloadDelay", "; ".join(messages)[:_MAX_MESSAGE]))
    else:
        phase = "Stable"
        conditions.append(ConditionPart(CONDITION_PROGRESSING, "False", "RolloutComplete", ""))
    if problems and phase == "Stable":
        phase = "Aborted" if any(r == "RolloutAborted" for r, _ in problems) else "Degraded"
    message = "; ".join([m for _, m in problems] + messages + waiting) or "Every served name is on its adapter"
    return AdapterDecision(
        routes=doc, progress=progress, smoke=smoke_req, served=served, phase=phase, message=message[:_MAX_MESSAGE],
        conditions=conditions, notes=[replace(n, message=n.message[:_MAX_MESSAGE]) for n in notes],
        requeue_after=max(1.0, min(requeue)) if requeue else None, pending_promotion=pending,
    )


# ============================================================================================ combining for the status

#: Which phase a summary shows when parts disagree: the first in this order.
PHASE_ORDER: tuple[Phase, ...] = ("Unreachable", "Degraded", "Aborted", "Promoting", "Progressing", "ScalingDown", "Paused", "Pending", "Stable")
_WORST = {
    CONDITION_READY: {"False": 2, "Unknown": 1, "True": 0},
    CONDITION_PROGRESSING: {"True": 2, "Unknown": 1, "False": 0},
    CONDITION_DEGRADED: {"True": 2, "Unknown": 1, "False": 0},
}


def worst_phase(*phases: Phase) -> Phase:
    return min(phases, key=PHASE_ORDER.index) if phases else "Pending"


def combine_conditions(parts: list[tuple[str | None, ConditionPart]]) -> list[ConditionPart]:
    """Combine contributions (of the two rollout paths of a region, or of the regions, labelled by region name) into
    one condition per type: Ready is False if any part is, Progressing True if any is, Degraded True if any is.
    The message names every labelled part sharing the worst status, so a lost region is named."""
    out = []
    for ctype in (CONDITION_READY, CONDITION_PROGRESSING, CONDITION_DEGRADED):
        mine = [(label, c) for label, c in parts if c.type == ctype]
        if not mine:
            continue
        rank = _WORST[ctype]
        worst = max(rank[c.status] for _, c in mine)
        chosen = [(label, c) for label, c in mine if rank[c.status] == worst]
        messages = [f"{label}: {c.message}" if label else c.message for label, c in chosen if c.message]
        out.append(ConditionPart(ctype, chosen[0][1].status, chosen[0][1].reason, "; ".join(messages)[:_MAX_MESSAGE]))
    return out


def unreachable_region(name: str, message: str) -> tuple[RegionRollout, list[ConditionPart]]:
    """The status and conditions of a region whose API server cannot be reached (its children are not observed)."""
    text = f"Region {name} is unreachable: {message}"[:_MAX_MESSAGE]
    return (
        RegionRollout(phase="Unreachable", active_color=None, revision=None, ready_replicas=0, desired_replicas=0, message=text),
        [ConditionPart(CONDITION_READY, "False", "RegionUnreachable", text),
         ConditionPart(CONDITION_PROGRESSING, "Unknown", "RegionUnreachable", text),
         ConditionPart(CONDITION_DEGRADED, "True", "RegionUnreachable", text)],
    )


@dataclass(frozen=True)
class Summary:
    """The Deployment-wide part of the status (phase, conditions, the cheap printer-column strings)."""

    phase: Phase
    conditions: list[ConditionPart]
    ready_replicas: int
    desired_replicas: int
    ready_summary: str  # `<ready>/<desired>`
    served_summary: str  # `name=adapter,…`


def served_summary(served: list[ServedRoute], limit: int = 256) -> str:
    parts = []
    for r in served:
        if r.canary_adapter:
            parts.append(f"{r.name}={r.adapter}+{r.canary_adapter}@{r.canary_weight}%")
        else:
            parts.append(f"{r.name}={r.adapter}")
    text = ",".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summarize(regions: list[tuple[str, RegionRollout, list[ConditionPart]]], served: list[ServedRoute]) -> Summary:
    """Combine the regions (each: name, status, conditions of both rollout paths) into the Deployment's summary."""
    ready = sum(r.ready_replicas for _, r, _ in regions)
    desired = sum(r.desired_replicas for _, r, _ in regions)
    labelled = [(name if len(regions) > 1 else None, c) for name, _, conds in regions for c in conds]
    return Summary(
        phase=worst_phase(*(r.phase for _, r, _ in regions)),
        conditions=combine_conditions(labelled),
        ready_replicas=ready,
        desired_replicas=desired,
        ready_summary=f"{ready}/{desired}",
        served_summary=served_summary(served),
    )


def region_status(name: str, pods: RegionDecision, adapters: AdapterDecision | None = None, *, endpoint: str | None = None,
                  routes_revision: str | None = None) -> tuple[RegionStatus, list[ConditionPart]]:
    """One region's `RegionStatus` and conditions from its two decisions (pods, adapters)."""
    st = pods.status
    phase, message, conds = st.phase, st.message, list(pods.conditions)
    pending = st.pending_promotion
    if adapters is not None:
        phase = worst_phase(st.phase, adapters.phase)
        if adapters.phase != "Stable" or any(c.type == CONDITION_DEGRADED and c.status == "True" for c in adapters.conditions):
            message = "; ".join(m for m in (st.message, adapters.message) if m)
        conds = combine_conditions([(None, c) for c in pods.conditions + adapters.conditions])
        pending = pending or adapters.pending_promotion
    return RegionStatus(
        name=name, phase=phase, active_color=st.active_color, revision=st.revision, preview_color=st.preview_color,
        preview_revision=st.preview_revision, pending_promotion=pending, routes_revision=routes_revision,
        ready_replicas=st.ready_replicas, desired_replicas=st.desired_replicas, endpoint=endpoint, message=message[:_MAX_MESSAGE] or None,
    ), conds
