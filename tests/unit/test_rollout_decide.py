"""The pure rollout decision of one region (controllers/rollout.py): table tests, no server, no I/O, `now` given."""

from __future__ import annotations

import datetime as dt
import json
import random
from dataclasses import replace

import pytest
from perennial.api.deployment import ABORT_REASON_ANNOTATION as ABORT_REASON
from perennial.api.deployment import ABORTED_REVISION_ANNOTATION as ABORTED
from perennial.api.deployment import PREVIEW_STARTED_AT_ANNOTATION as STARTED
from perennial.api.deployment import SCALE_DOWN_AT_ANNOTATION as SCALE_DOWN_AT
from perennial.api.deployment import SMOKE_ANNOTATION as SMOKE
from perennial.api.deployment import SWITCHED_AT_ANNOTATION as SWITCHED_AT
from perennial.api.deployment import BlueGreen
from perennial.controllers.rollout import (
    ColorState,
    RegionObserved,
    SmokeResult,
    decide_region,
    rfc3339,
)

T0 = dt.datetime(2026, 11, 29, 12, 0, 0, tzinfo=dt.UTC)


def t(seconds: float) -> str:
    return rfc3339(T0 + dt.timedelta(seconds=seconds))


def col(rev: str, n: int = 2, ready: int | None = None, *, updated: int | None = None, status: int | None = None,
        gen: int = 1, observed: int = 1, exceeded: bool = False, **ann: str) -> ColorState:
    """A color's apps/v1 Deployment; fully ready unless told otherwise. Annotations by short key."""
    keys = {"started": STARTED, "scale_down_at": SCALE_DOWN_AT, "smoke": SMOKE, "aborted": ABORTED, "abort_reason": ABORT_REASON}
    r = n if ready is None else ready
    return ColorState(revision=rev, replicas=n, status_replicas=n if status is None else status, ready_replicas=r,
                      updated_replicas=n if updated is None else updated, available_replicas=r, generation=gen,
                      observed_generation=observed, progress_deadline_exceeded=exceeded,
                      annotations={keys[k]: v for k, v in ann.items()})


def world(blue=None, green=None, stable="blue", desired="r2", replicas=2, switched_at=None, smoke_result=None, autoscaled=False):
    return RegionObserved(blue=blue, green=green, stable_color=stable, desired_revision=desired, desired_replicas=replicas,
                          autoscaled=autoscaled, stable_annotations={SWITCHED_AT: switched_at} if switched_at else {},
                          smoke_result=smoke_result)


ANY = object()
BG = {}  # defaults: autoPromote, smoke on, scaleDownDelay 300, abortScaleDownDelay 30, deadline 1800


def run(obs, bg=BG, now=0, paused=False, promote=None):
    return decide_region(obs, BlueGreen(**bg), paused=paused, promote=promote, now=T0 + dt.timedelta(seconds=now))


# Each row: id, observed world, BlueGreen settings, now (s after T0), paused, promote annotation, expectations.
# Expectations: stable, phase, notes (the exact list of Event reasons), smoke (color asked to smoke-test or None),
# colors {color: (revision, replicas)}, ann {color: {annotation: value | None (removed) | ANY}}, requeue, conditions
# {type: (status, reason)}, pending (the promotion awaited), preview (status.previewColor).
ROWS = [
    # ---------------------------------------------------------------- first rollout (no stable Service yet)
    ("first: nothing exists -> blue at the full count, no traffic yet",
     world(stable=None, desired="r1", replicas=3), BG, 0, False, None,
     {"stable": None, "phase": "Progressing", "notes": ["PreviewCreated"], "colors": {"blue": ("r1", 3)}, "ann": {"blue": {STARTED: t(0)}},
          "requeue": 1800, "conditions": {"Ready": ("False", "FirstRolloutInProgress"), "Progressing": ("True", "FirstRollout")}}),
    ("first: coming up -> wait, requeue at the deadline",
     world(blue=col("r1", 3, 1, started=t(0)), stable=None, desired="r1", replicas=3), BG, 100, False, None,
     {"stable": None, "phase": "Progressing", "notes": [], "smoke": None, "requeue": 1700}),
    ("first: every pod ready -> smoke test through the preview Service first",
     world(blue=col("r1", 3, started=t(0)), stable=None, desired="r1", replicas=3), BG, 100, False, None,
     {"stable": None, "phase": "Progressing", "notes": ["PreviewReady"], "smoke": "blue", "requeue": 60, "preview_service": "blue"}),
    ("first: smoke passed -> the stable Service selects it, no promotion needed",
     world(blue=col("r1", 3, started=t(0)), stable=None, desired="r1", replicas=3, smoke_result=SmokeResult("r1", True)),
     {"autoPromote": False}, 100, False, None,
     {"stable": "blue", "phase": "Stable", "notes": ["SmokeTestPassed", "Switched"], "ann": {"blue": {SMOKE: "r1=passed", STARTED: None}},
          "stable_ann": {SWITCHED_AT: t(100)}, "conditions": {"Ready": ("True", "Serving")}}),
    ("first: smoke failed -> aborted, no traffic ever, scaled down after the abort delay",
     world(blue=col("r1", 3, started=t(0)), stable=None, desired="r1", replicas=3, smoke_result=SmokeResult("r1", False, "said 'no'")),
     BG, 100, False, None,
     {"stable": None, "phase": "Aborted", "notes": ["SmokeTestFailed", "Aborted"], "colors": {"blue": ("r1", 3)},
          "ann": {"blue": {ABORTED: "r1", SCALE_DOWN_AT: t(130), SMOKE: "r1=failed:said 'no'"}}, "requeue": 30,
          "conditions": {"Ready": ("False", "RolloutAborted"), "Degraded": ("True", "RolloutAborted")}}),
    ("first: aborted revision is not retried; scaled to zero when the delay is over",
     world(blue=col("r1", 3, started=None, aborted="r1", abort_reason="SmokeTestFailed: x", scale_down_at=t(130)), stable=None,
           desired="r1", replicas=3), BG, 131, False, None,
     {"stable": None, "phase": "Aborted", "notes": ["ScaledDown"], "colors": {"blue": ("r1", 0)}, "smoke": None}),
    ("first: the spec changes before the first switch -> the same color takes the new revision",
     world(blue=col("r1", 3, 1, started=t(0)), stable=None, desired="r2", replicas=3), BG, 100, False, None,
     {"stable": None, "notes": ["PreviewCreated"], "colors": {"blue": ("r2", 3)}, "ann": {"blue": {STARTED: t(100), SMOKE: None}}}),
    ("first: deadline exceeded -> aborted",
     world(blue=col("r1", 3, 2, started=t(0)), stable=None, desired="r1", replicas=3), BG, 1800, False, None,
     {"stable": None, "phase": "Aborted", "notes": ["Aborted"], "ann": {"blue": {ABORTED: "r1"}}}),
    ("first: smoke disabled -> switch as soon as every pod is ready",
     world(blue=col("r1", 3, started=t(0)), stable=None, desired="r1", replicas=3), {"smokeTest": {"enabled": False}}, 100, False, None,
     {"stable": "blue", "notes": ["Switched"], "smoke": None}),
    ("first: scaled to zero from the start (KEDA minimum 0) -> created and selected at once, nothing to test",
     world(stable=None, desired="r1", replicas=0, autoscaled=True), BG, 0, False, None,
     {"stable": "blue", "notes": ["PreviewCreated", "Switched"], "colors": {"blue": ("r1", 0)}, "smoke": None, "phase": "Stable",
          "conditions": {"Ready": ("True", "ScaledToZero")}}),
    ("first: green already carries the desired revision -> it goes on, no blue is made",
     world(blue=None, green=col("r1", 3, 1, started=t(0)), stable=None, desired="r1", replicas=3), BG, 10, False, None,
     {"stable": None, "notes": [], "absent": ["blue"], "preview_service": "green", "preview": "green"}),
    ("first: a leftover color of another revision gets no traffic and is scaled to zero",
     world(blue=col("r0", 2, 0, started=t(0), aborted="r0"), green=col("r1", 3, 1, started=t(0)), stable=None, desired="r1", replicas=3),
     BG, 10, False, None, {"stable": None, "notes": ["ScaledDown"], "colors": {"blue": ("r0", 0), "green": ("r1", 3)}}),
    ("first: replicas raised while coming up -> the color grows, not ready until it has them all",
     world(blue=col("r1", 3, started=t(0)), stable=None, desired="r1", replicas=5), BG, 10, False, None,
     {"stable": None, "notes": [], "smoke": None, "colors": {"blue": ("r1", 5)}}),
    ("first: the spec scales to zero while coming up -> selected at once, nothing to test",
     world(blue=col("r1", 3, 1, started=t(0)), stable=None, desired="r1", replicas=0), BG, 10, False, None,
     {"stable": "blue", "notes": ["Switched"], "colors": {"blue": ("r1", 0)}}),
    ("service deleted by hand while blue serves -> point it back at once",
     world(blue=col("r1", 2), green=None, stable=None, desired="r1"), BG, 0, False, None,
     {"stable": "blue", "phase": "Stable", "notes": [], "colors": {"blue": ("r1", 2)}}),
    ("service deleted during a rollout -> back to the serving color, not the preview on trial",
     world(blue=col("r1", 2), green=col("r2", 1, started=t(0)), stable=None, desired="r2"), BG, 10, False, None,
     {"stable": "blue", "notes": ["PreviewReady"], "smoke": "green"}),

    # ---------------------------------------------------------------- steady state and replica changes
    ("steady: nothing to do, no requeue",
     world(blue=col("r2", 2), stable="blue", desired="r2"), BG, 0, False, None,
     {"stable": "blue", "phase": "Stable", "notes": [], "smoke": None, "requeue": None, "colors": {"blue": ("r2", 2)}, "preview_service": "green",
          "conditions": {"Ready": ("True", "Serving"), "Progressing": ("False", "RolloutComplete"), "Degraded": ("False", "AsExpected")}}),
    ("replicas changed alone -> the active color is scaled in place, no preview",
     world(blue=col("r2", 2), stable="blue", desired="r2", replicas=5), BG, 0, False, None,
     {"stable": "blue", "colors": {"blue": ("r2", 5)}, "notes": [], "absent": ["green"]}),
    ("scaling in place: phase Progressing until ready",
     world(blue=col("r2", 5, 2), stable="blue", desired="r2", replicas=5), BG, 0, False, None,
     {"phase": "Progressing", "conditions": {"Progressing": ("True", "Scaling"), "Ready": ("True", "Serving")}}),
    ("autoscaled: the autoscaler's count is never written",
     world(blue=col("r2", 7), stable="blue", desired="r2", replicas=1, autoscaled=True), BG, 0, False, None,
     {"colors": {"blue": ("r2", 7)}, "notes": []}),
    ("active color has no ready replicas and nothing else does -> Degraded, stays",
     world(blue=col("r2", 2, 0), stable="blue", desired="r2"), BG, 0, False, None,
     {"stable": "blue", "phase": "Degraded", "conditions": {"Ready": ("False", "NoReadyReplicas"), "Degraded": ("True", "NoReadyReplicas")}}),
    ("scaled to zero (KEDA) -> Ready, not degraded",
     world(blue=col("r2", 0), stable="blue", desired="r2", replicas=0, autoscaled=True), BG, 0, False, None,
     {"phase": "Stable", "conditions": {"Ready": ("True", "ScaledToZero"), "Degraded": ("False", "AsExpected")}}),
    ("active Deployment deleted, nothing else serves -> re-created",
     world(blue=None, green=None, stable="blue", desired="r2"), BG, 0, False, None,
     {"stable": "blue", "colors": {"blue": ("r2", 2)}, "notes": ["PreviewCreated"], "phase": "Degraded"}),

    # ---------------------------------------------------------------- pod rollout: preview
    ("new revision -> preview at previewReplicas on the other color, traffic stays",
     world(blue=col("r1", 4), stable="blue", desired="r2", replicas=4), {"previewReplicas": 1}, 0, False, None,
     {"stable": "blue", "phase": "Progressing", "notes": ["PreviewCreated"], "colors": {"blue": ("r1", 4), "green": ("r2", 1)},
          "ann": {"green": {STARTED: t(0), SMOKE: None, ABORTED: None, SCALE_DOWN_AT: None}}, "requeue": 1800, "preview": "green",
          "preview_service": "green"}),
    ("preview replaces the old color kept from the last rollout",
     world(blue=col("r1", 4), green=col("r0", 4, scale_down_at=t(100)), stable="blue", desired="r2", replicas=4), {"previewReplicas": 2}, 0, False, None,
     {"colors": {"green": ("r0", 4)} and {"green": ("r2", 2)}, "notes": ["PreviewCreated"], "ann": {"green": {SCALE_DOWN_AT: None}}}),
    ("preview not all ready -> wait",
     world(blue=col("r1", 4), green=col("r2", 2, 1, started=t(0)), stable="blue", desired="r2", replicas=4), {"previewReplicas": 2}, 60, False, None,
     {"stable": "blue", "phase": "Progressing", "notes": [], "smoke": None, "requeue": 1740, "conditions": {"Progressing": ("True", "PreviewProgressing")}}),
    ("preview ready but its generation is not observed yet -> wait",
     world(blue=col("r1", 4), green=col("r2", 2, gen=3, observed=2, started=t(0)), stable="blue", desired="r2", replicas=4),
     {"previewReplicas": 2}, 60, False, None, {"notes": [], "smoke": None}),
    ("preview ready but an old pod is still terminating -> wait",
     world(blue=col("r1", 4), green=col("r2", 2, status=3, started=t(0)), stable="blue", desired="r2", replicas=4),
     {"previewReplicas": 2}, 60, False, None, {"notes": [], "smoke": None}),
    ("preview all ready -> smoke test it",
     world(blue=col("r1", 4), green=col("r2", 2, started=t(0)), stable="blue", desired="r2", replicas=4), {"previewReplicas": 2}, 60, False, None,
     {"stable": "blue", "notes": ["PreviewReady"], "smoke": "green", "requeue": 60, "conditions": {"Progressing": ("True", "SmokeTesting")}}),
    ("smoke passed -> scale the preview to the full count first (no switch yet)",
     world(blue=col("r1", 4), green=col("r2", 2, started=t(0)), stable="blue", desired="r2", replicas=4, smoke_result=SmokeResult("r2", True)),
     {"previewReplicas": 2}, 60, False, None,
     {"stable": "blue", "phase": "Promoting", "notes": ["SmokeTestPassed", "PreviewScalingUp"], "colors": {"green": ("r2", 4)},
          "ann": {"green": {SMOKE: "r2=passed", STARTED: t(60)}}}),
    ("scaled up but not all ready -> wait, never switch early",
     world(blue=col("r1", 4), green=col("r2", 4, 3, smoke="r2=passed", started=t(60)), stable="blue", desired="r2", replicas=4),
     {"previewReplicas": 2}, 90, False, None, {"stable": "blue", "notes": [], "smoke": None}),
    ("full and ready -> switch, keep the old color for the delay",
     world(blue=col("r1", 4), green=col("r2", 4, smoke="r2=passed", started=t(60)), stable="blue", desired="r2", replicas=4),
     {"previewReplicas": 2}, 90, False, None,
     {"stable": "green", "phase": "ScalingDown", "notes": ["Switched"], "stable_ann": {SWITCHED_AT: t(90)},
          "ann": {"blue": {SCALE_DOWN_AT: t(390)}, "green": {STARTED: None}}, "colors": {"blue": ("r1", 4), "green": ("r2", 4)},
          "requeue": 300, "preview_service": "blue"}),
    ("no previewReplicas -> full count at once, switch right after the smoke test",
     world(blue=col("r1", 3), green=col("r2", 3, started=t(0)), stable="blue", desired="r2", replicas=3, smoke_result=SmokeResult("r2", True)),
     BG, 60, False, None, {"stable": "green", "notes": ["SmokeTestPassed", "Switched"]}),
    ("autoscaled: the preview scales to at least the active color's count before the switch",
     world(blue=col("r1", 6, 5), green=col("r2", 1, smoke="r2=passed", started=t(0)), stable="blue", desired="r2", replicas=1, autoscaled=True),
     {"previewReplicas": 1}, 60, False, None, {"stable": "blue", "colors": {"green": ("r2", 6), "blue": ("r1", 6)}, "notes": ["PreviewScalingUp"]}),
    ("smoke failed -> abort, traffic never leaves the active color",
     world(blue=col("r1", 4), green=col("r2", 2, started=t(0)), stable="blue", desired="r2", replicas=4,
           smoke_result=SmokeResult("r2", False, "no match for 'yellow'")), {"previewReplicas": 2}, 60, False, None,
     {"stable": "blue", "phase": "Aborted", "notes": ["SmokeTestFailed", "Aborted"], "colors": {"blue": ("r1", 4), "green": ("r2", 2)},
          "ann": {"green": {ABORTED: "r2", SCALE_DOWN_AT: t(90), STARTED: None, ABORT_REASON: "SmokeTestFailed: no match for 'yellow'"}},
          "requeue": 30, "conditions": {"Ready": ("True", "Serving"), "Degraded": ("True", "RolloutAborted"), "Progressing": ("False", "RolloutAborted")}}),
    ("smoke failure recorded on the color -> abort too (after a restart)",
     world(blue=col("r1", 4), green=col("r2", 2, smoke="r2=failed:boom", started=t(0)), stable="blue", desired="r2", replicas=4),
     BG, 60, False, None, {"stable": "blue", "phase": "Aborted", "notes": ["Aborted"], "ann": {"green": {ABORTED: "r2"}}}),
    ("a smoke verdict of another revision does not count",
     world(blue=col("r1", 4), green=col("r2", 4, smoke="r1=passed", started=t(0)), stable="blue", desired="r2", replicas=4),
     BG, 60, False, None, {"stable": "blue", "smoke": "green", "notes": ["PreviewReady"]}),
    ("an unreadable smoke annotation (edited by hand) is no verdict -> the smoke test runs",
     world(blue=col("r1", 4), green=col("r2", 4, smoke="r2=maybe", started=t(0)), stable="blue", desired="r2", replicas=4),
     BG, 60, False, None, {"stable": "blue", "smoke": "green", "notes": ["PreviewReady"]}),
    ("deadline exceeded -> abort",
     world(blue=col("r1", 4), green=col("r2", 2, 1, started=t(0)), stable="blue", desired="r2", replicas=4), {"previewReplicas": 2}, 1800, False, None,
     {"stable": "blue", "phase": "Aborted", "notes": ["Aborted"], "ann": {"green": {ABORTED: "r2", SCALE_DOWN_AT: t(1830)}}}),
    ("apps/v1 ProgressDeadlineExceeded -> abort before our own deadline",
     world(blue=col("r1", 4), green=col("r2", 2, 1, exceeded=True, started=t(0)), stable="blue", desired="r2", replicas=4), BG, 600, False, None,
     {"stable": "blue", "phase": "Aborted", "notes": ["Aborted"]}),
    ("abortScaleDownDelaySeconds 0 -> preview scaled to zero at once",
     world(blue=col("r1", 4), green=col("r2", 2, 1, started=t(0)), stable="blue", desired="r2", replicas=4),
     {"previewReplicas": 2, "abortScaleDownDelaySeconds": 0}, 1800, False, None,
     {"stable": "blue", "notes": ["ScaledDown", "Aborted"], "colors": {"green": ("r2", 0)}}),
    ("aborted revision: not retried while the spec asks for it; preview kept until its delay",
     world(blue=col("r1", 4), green=col("r2", 2, aborted="r2", abort_reason="SmokeTestFailed: boom", scale_down_at=t(90)),
           stable="blue", desired="r2", replicas=4), BG, 80, False, None,
     {"stable": "blue", "phase": "Aborted", "notes": [], "smoke": None, "requeue": 10, "colors": {"green": ("r2", 2)}, "preview": "green",
          "conditions": {"Degraded": ("True", "RolloutAborted")}}),
    ("aborted revision: scaled to zero after the delay, still not retried",
     world(blue=col("r1", 4), green=col("r2", 2, aborted="r2", scale_down_at=t(90)), stable="blue", desired="r2", replicas=4),
     BG, 90, False, None, {"stable": "blue", "phase": "Aborted", "notes": ["ScaledDown"], "colors": {"green": ("r2", 0)}}),
    ("aborted revision at zero: nothing to do",
     world(blue=col("r1", 4), green=col("r2", 0, aborted="r2"), stable="blue", desired="r2", replicas=4),
     BG, 5000, False, None, {"stable": "blue", "phase": "Aborted", "notes": [], "requeue": None}),
    ("spec moves on to another revision -> a fresh preview, the abort mark cleared",
     world(blue=col("r1", 4), green=col("r2", 0, aborted="r2", abort_reason="x"), stable="blue", desired="r3", replicas=4),
     BG, 5000, False, None,
     {"stable": "blue", "notes": ["PreviewCreated"], "colors": {"green": ("r3", 4)}, "ann": {"green": {ABORTED: None, ABORT_REASON: None}}}),
    ("spec reverted to the active revision mid-rollout -> the preview is abandoned after the abort delay",
     world(blue=col("r1", 4), green=col("r2", 2, 1, started=t(0)), stable="blue", desired="r1", replicas=4), BG, 60, False, None,
     {"stable": "blue", "phase": "ScalingDown", "notes": [], "ann": {"green": {SCALE_DOWN_AT: t(90)}}, "requeue": 30}),

    # ---------------------------------------------------------------- promotion and pause
    ("autoPromote false -> Paused waiting for the annotation, no deadline",
     world(blue=col("r1", 4), green=col("r2", 4, smoke="r2=passed", started=t(0)), stable="blue", desired="r2", replicas=4),
     {"autoPromote": False}, 5000, False, None,
     {"stable": "blue", "phase": "Paused", "pending": "r2", "notes": [], "requeue": None, "conditions": {"Progressing": ("Unknown", "WaitingForPromotion")}}),
    ("a stale promotion (another revision) does not promote",
     world(blue=col("r1", 4), green=col("r2", 4, smoke="r2=passed", started=t(0)), stable="blue", desired="r2", replicas=4),
     {"autoPromote": False}, 60, False, "r1", {"stable": "blue", "phase": "Paused", "pending": "r2"}),
    ("promotion annotation names the revision -> switch",
     world(blue=col("r1", 4), green=col("r2", 4, smoke="r2=passed", started=t(0)), stable="blue", desired="r2", replicas=4),
     {"autoPromote": False}, 60, False, "r2", {"stable": "green", "notes": ["Switched"]}),
    ("paused -> no preview is started",
     world(blue=col("r1", 4), stable="blue", desired="r2", replicas=4), BG, 0, True, None,
     {"stable": "blue", "phase": "Paused", "notes": [], "absent": ["green"], "conditions": {"Progressing": ("Unknown", "RolloutPaused")}}),
    ("paused -> a ready preview is not switched to",
     world(blue=col("r1", 4), green=col("r2", 4, smoke="r2=passed", started=t(0)), stable="blue", desired="r2", replicas=4),
     BG, 60, True, "r2", {"stable": "blue", "phase": "Paused", "notes": [], "colors": {"green": ("r2", 4)}}),
    ("paused -> a running preview's clock stops (its step restarts on resume)",
     world(blue=col("r1", 4), green=col("r2", 2, 1, started=t(0)), stable="blue", desired="r2", replicas=4), BG, 60, True, None,
     {"stable": "blue", "phase": "Paused", "notes": [], "ann": {"green": {STARTED: "paused"}}, "colors": {"green": ("r2", 2)}, "preview": "green", "requeue": None}),
    ("paused past the deadline, then resumed -> the step restarts instead of aborting",
     world(blue=col("r1", 4), green=col("r2", 2, 2, started="paused", smoke="r2=passed"), stable="blue", desired="r2", replicas=4),
     {"previewReplicas": 2}, 9000, False, None,
     {"stable": "blue", "phase": "Progressing", "notes": ["PreviewCreated", "PreviewReady"], "smoke": "green", "colors": {"green": ("r2", 2)},
          "ann": {"green": {STARTED: t(9000), SMOKE: None}}}),
    ("a paused preview is never a rollback target",
     world(blue=col("r3", 4, started="paused"), green=col("r2", 4, 1), stable="green", desired="r3", replicas=4, switched_at=t(90)),
     BG, 150, True, None, {"stable": "green", "notes": [], "phase": "Paused"}),
    ("paused -> an old color is still scaled down when its delay is over",
     world(blue=col("r1", 4), green=col("r0", 4, scale_down_at=t(100)), stable="blue", desired="r2", replicas=4), BG, 100, True, None,
     {"stable": "blue", "phase": "Paused", "notes": ["ScaledDown"], "colors": {"green": ("r0", 0)}}),
    ("paused -> replica changes still scale the active color",
     world(blue=col("r1", 4), stable="blue", desired="r2", replicas=6), BG, 0, True, None, {"colors": {"blue": ("r1", 6)}}),

    # ---------------------------------------------------------------- after the switch: delay, scale-down, rollback
    ("old color kept until scale-down-at",
     world(blue=col("r1", 4, scale_down_at=t(390)), green=col("r2", 4), stable="green", desired="r2", replicas=4, switched_at=t(90)),
     BG, 200, False, None, {"stable": "green", "phase": "ScalingDown", "notes": [], "requeue": 190, "colors": {"blue": ("r1", 4)}}),
    ("old color scaled to zero when the delay is over",
     world(blue=col("r1", 4, scale_down_at=t(390)), green=col("r2", 4), stable="green", desired="r2", replicas=4, switched_at=t(90)),
     BG, 390, False, None,
     {"stable": "green", "phase": "Stable", "notes": ["ScaledDown"], "colors": {"blue": ("r1", 0)}, "ann": {"blue": {SCALE_DOWN_AT: None}}}),
    ("operator stopped between the switch and the annotation -> the old color gets the full delay",
     world(blue=col("r1", 4), green=col("r2", 4), stable="green", desired="r2", replicas=4, switched_at=t(90)),
     BG, 100, False, None, {"stable": "green", "phase": "ScalingDown", "ann": {"blue": {SCALE_DOWN_AT: t(400)}}, "notes": []}),
    ("new color loses ready replicas within the window -> switched back (RolledBack)",
     world(blue=col("r1", 4, scale_down_at=t(390)), green=col("r2", 4, 2), stable="green", desired="r2", replicas=4, switched_at=t(90)),
     BG, 150, False, None,
     {"stable": "blue", "phase": "Aborted", "notes": ["RolledBack"], "stable_ann": {SWITCHED_AT: t(150)},
          "ann": {"blue": {SCALE_DOWN_AT: None}, "green": {ABORTED: "r2", SCALE_DOWN_AT: t(180)}}, "colors": {"blue": ("r1", 4), "green": ("r2", 4)},
          "conditions": {"Degraded": ("True", "RolledBack"), "Ready": ("True", "Serving")}}),
    ("after a rollback the revision is not retried, and the status still says it was rolled back",
     world(blue=col("r1", 4), green=col("r2", 4, 2, aborted="r2", abort_reason="RolledBack: green (revision r2) had 2/4 ready",
                                         scale_down_at=t(180)), stable="blue", desired="r2", replicas=4, switched_at=t(150)),
     BG, 160, False, None, {"stable": "blue", "phase": "Aborted", "notes": [], "colors": {"green": ("r2", 4)},
                            "conditions": {"Degraded": ("True", "RolledBack"), "Ready": ("True", "Serving")}, "message": "green (revision r2)"}),
    ("a loss after the window -> no rollback",
     world(blue=col("r1", 4, scale_down_at=t(390)), green=col("r2", 4, 2), stable="green", desired="r2", replicas=4, switched_at=t(90)),
     {"postPromotionWindowSeconds": 60}, 151, False, None, {"stable": "green", "notes": []}),
    ("window 0 turns automatic rollback off",
     world(blue=col("r1", 4, scale_down_at=t(390)), green=col("r2", 4, 1), stable="green", desired="r2", replicas=4, switched_at=t(90)),
     {"postPromotionWindowSeconds": 0}, 100, False, None, {"stable": "green", "notes": []}),
    ("no rollback when the old color is no better",
     world(blue=col("r1", 4, 1, scale_down_at=t(390)), green=col("r2", 4, 2), stable="green", desired="r2", replicas=4, switched_at=t(90)),
     BG, 150, False, None, {"stable": "green", "notes": []}),
    ("replicas lowered with the revision: the new color's smaller count is not a loss",
     world(blue=col("r1", 4, scale_down_at=t(390)), green=col("r2", 2), stable="green", desired="r2", replicas=2, switched_at=t(90)),
     BG, 150, False, None, {"stable": "green", "notes": []}),
    ("rollback works while paused (safety)",
     world(blue=col("r1", 4, scale_down_at=t(390)), green=col("r2", 4, 0), stable="green", desired="r2", replicas=4, switched_at=t(90)),
     BG, 150, True, None, {"stable": "blue", "notes": ["RolledBack"]}),
    ("a preview on trial is never a rollback target",
     world(blue=col("r3", 4, started=t(100)), green=col("r2", 4, 1), stable="green", desired="r3", replicas=4, switched_at=t(90)),
     BG, 150, False, None, {"stable": "green", "notes": ["PreviewReady"], "smoke": "blue"}),
    ("spec reverted to the old color's revision within the delay -> its pods are reused at their count",
     world(blue=col("r1", 4, scale_down_at=t(390)), green=col("r2", 4), stable="green", desired="r1", replicas=4, switched_at=t(90)),
     {"previewReplicas": 1}, 150, False, None,
     {"stable": "green", "notes": ["PreviewCreated", "PreviewReady"], "smoke": "blue", "colors": {"blue": ("r1", 4)},
          "ann": {"blue": {SCALE_DOWN_AT: None, STARTED: t(150)}}}),

    # ---------------------------------------------------------------- the invariant as a last resort
    ("active lost every ready pod, the old color still has some -> fail over",
     world(blue=col("r1", 4, 0), green=col("r0", 4, 4, scale_down_at=t(5000)), stable="blue", desired="r1", replicas=4, switched_at=t(0)),
     {"postPromotionWindowSeconds": 0}, 100, False, None,
     {"stable": "green", "phase": "Degraded", "notes": ["FailedOver", "PreviewCreated"], "ann": {"green": {SCALE_DOWN_AT: None}},
          "colors": {"green": ("r0", 4), "blue": ("r1", 4)}, "conditions": {"Degraded": ("True", "FailedOver")}}),
    ("after a fail-over the desired revision comes back as a preview (its pods kept), and is switched to when it passes",
     world(blue=col("r1", 4, started=t(100)), green=col("r0", 4), stable="green", desired="r1", replicas=4, switched_at=t(100)),
     {"postPromotionWindowSeconds": 0}, 130, False, None, {"stable": "green", "notes": ["PreviewReady"], "smoke": "blue"}),
    ("failing over cancels a scale-down due now",
     world(blue=col("r1", 4, 0), green=col("r0", 4, 3, scale_down_at=t(50)), stable="blue", desired="r1", replicas=4),
     BG, 100, False, None, {"stable": "green", "notes": ["FailedOver", "PreviewCreated"], "colors": {"green": ("r0", 4)},
                                "ann": {"green": {SCALE_DOWN_AT: None}}}),
    ("autoscaled to zero (KEDA) after the switch: not an outage, no fail-over to the old color",
     world(blue=col("r1", 4, scale_down_at=t(390)), green=col("r2", 0), stable="green", desired="r2", replicas=0, autoscaled=True,
           switched_at=t(90)), {"postPromotionWindowSeconds": 0}, 150, False, None,
     {"stable": "green", "notes": [], "phase": "ScalingDown", "conditions": {"Ready": ("True", "ScaledToZero")}}),
    ("a color at zero that should serve (spec says 2) is an outage: fail over",
     world(blue=col("r1", 4, scale_down_at=t(390)), green=col("r2", 0), stable="green", desired="r2", replicas=2, switched_at=t(90)),
     {"postPromotionWindowSeconds": 0}, 150, False, None, {"stable": "blue", "notes": ["FailedOver", "PreviewCreated"]}),
    ("active Deployment deleted while the other color serves -> fail over",
     world(blue=None, green=col("r1", 2), stable="blue", desired="r2"), BG, 0, False, None,
     {"stable": "green", "notes": ["FailedOver", "PreviewCreated"], "colors": {"green": ("r1", 2), "blue": ("r2", 2)}}),
]


def _check(d, exp):
    if "stable" in exp:
        assert d.stable_color == exp["stable"]
    if "phase" in exp:
        assert d.status.phase == exp["phase"], d.status.message
    if "notes" in exp:
        assert [n.reason for n in d.notes] == exp["notes"], d.notes
    if "smoke" in exp:
        assert (d.smoke.color if d.smoke else None) == exp["smoke"]
    for c, (rev, n) in exp.get("colors", {}).items():
        assert (d.colors[c].revision, d.colors[c].replicas) == (rev, n), c
    for c in exp.get("absent", []):
        assert c not in d.colors
    for c, anns in exp.get("ann", {}).items():
        for key, value in anns.items():
            assert key in d.colors[c].annotations, (c, key, d.colors[c].annotations)
            if value is not ANY:
                assert d.colors[c].annotations[key] == value, (c, key)
    for key, value in exp.get("stable_ann", {}).items():
        assert d.stable_annotations.get(key) == value
    if "requeue" in exp:
        assert d.requeue_after == (None if exp["requeue"] is None else pytest.approx(exp["requeue"]))
    conds = {c.type: (c.status, c.reason) for c in d.conditions}
    assert set(conds) == {"Ready", "Progressing", "Degraded"}
    for ctype, want in exp.get("conditions", {}).items():
        assert conds[ctype] == want, (ctype, conds[ctype], d.status.message)
    if "pending" in exp:
        assert d.status.pending_promotion == exp["pending"]
    if "preview" in exp:
        assert d.status.preview_color == exp["preview"]
    if "preview_service" in exp:
        assert d.preview_color == exp["preview_service"]
    if "message" in exp:
        assert exp["message"] in d.status.message


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_decide_region(row):
    _, obs, bg, now, paused, promote, exp = row
    d = run(obs, bg, now, paused, promote)
    _check(d, exp)
    _invariants(obs, d)


def _invariants(obs: RegionObserved, d) -> None:
    """What must hold for every decision."""
    ready = {c: (obs.color(c).ready_replicas if obs.color(c) else 0) for c in ("blue", "green")}
    s = d.stable_color
    if s is not None:
        # never select a color without ready pods while the other has some (unless it is at zero on purpose)
        on_purpose = obs.color(s) is not None and obs.color(s).replicas == 0 and (obs.autoscaled or obs.desired_replicas == 0)
        assert ready[s] > 0 or ready["blue" if s == "green" else "green"] == 0 or on_purpose, (s, ready)
        # the serving color keeps its revision and is not scaled to zero while it serves
        cur = obs.color(s)
        if cur is not None and ready[s] > 0:
            assert d.colors[s].revision == cur.revision
            assert d.colors[s].replicas > 0 or (obs.desired_replicas == 0 and not obs.autoscaled)  # unless the spec says 0
    # every message is short enough for the status
    assert len(d.status.message) <= 1024
    assert all(len(n.message) <= 1024 for n in d.notes)


def test_status_reports_region_state():
    d = run(world(blue=col("r1", 4, 3), green=col("r2", 2, 1, started=t(0)), stable="blue", desired="r2", replicas=4),
            {"previewReplicas": 2}, 10)
    st = d.status
    assert (st.active_color, st.revision, st.ready_replicas, st.desired_replicas) == ("blue", "r1", 3, 4)
    assert (st.preview_color, st.preview_revision) == ("green", "r2")
    assert "1/2" in st.message


def test_from_object_reads_an_apps_v1_deployment():
    obj = {"metadata": {"generation": 4, "labels": {"perennial.ai/revision": "abc", "perennial.ai/color": "green"},
                        "annotations": {STARTED: t(0)}},
           "spec": {"replicas": 3},
           "status": {"observedGeneration": 4, "replicas": 3, "readyReplicas": 3, "updatedReplicas": 3, "availableReplicas": 3,
                      "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}}
    s = ColorState.from_object(obj)
    assert (s.revision, s.replicas, s.ready_replicas, s.generation, s.observed_generation) == ("abc", 3, 3, 4, 4)
    assert s.progress_deadline_exceeded and s.fully_ready() and s.annotations[STARTED] == t(0)
    stale = ColorState.from_object({**obj, "status": {**obj["status"], "observedGeneration": 3, "conditions": []}})
    assert not stale.fully_ready() and not stale.progress_deadline_exceeded


# ------------------------------------------------------------------------------------------------ property test


class _World:
    """A tiny region: two apps/v1 Deployments whose pods become ready (or fail) at random, a stable Service,
    a smoke test that passes or fails at random, and a spec that changes revision now and then."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.colors: dict[str, ColorState | None] = {"blue": None, "green": None}
        self.stable: str | None = None
        self.stable_ann: dict[str, str] = {}
        self.revision = "r1"
        self.replicas = 3
        self.now = 0.0
        self.next_rev = 2
        self.autoscaled = False

    def observed(self, smoke=None) -> RegionObserved:
        return RegionObserved(blue=self.colors["blue"], green=self.colors["green"], stable_color=self.stable,  # type: ignore[arg-type]
                              desired_revision=self.revision, desired_replicas=self.replicas, stable_annotations=dict(self.stable_ann),
                              smoke_result=smoke, autoscaled=self.autoscaled)

    def apply(self, d) -> None:
        for c, target in d.colors.items():
            cur = self.colors[c]
            ann = dict(cur.annotations) if cur else {}
            for k, v in target.annotations.items():
                if v is None:
                    ann.pop(k, None)
                else:
                    ann[k] = v
            if cur is None or cur.revision != target.revision:
                # a new template: every pod replaced, none ready yet
                cur = ColorState(revision=target.revision, replicas=target.replicas, status_replicas=target.replicas,
                                 generation=(cur.generation + 1 if cur else 1), observed_generation=(cur.generation + 1 if cur else 1),
                                 annotations=ann)
            else:
                ready = min(cur.ready_replicas, target.replicas)
                cur = replace(cur, replicas=target.replicas, status_replicas=max(target.replicas, ready), ready_replicas=ready,
                              updated_replicas=min(cur.updated_replicas, target.replicas), annotations=ann)
            self.colors[c] = cur
        if d.stable_color is not None:
            self.stable = d.stable_color
        for k, v in d.stable_annotations.items():
            if v is None:
                self.stable_ann.pop(k, None)
            else:
                self.stable_ann[k] = v

    def kubelet(self) -> None:
        """Pods come up, crash, recover; ReplicaSets settle."""
        for c, s in self.colors.items():
            if s is None:
                continue
            r = self.rng.random()
            ready = s.ready_replicas
            if r < 0.5 and ready < s.replicas:
                ready += 1
            elif r < 0.6 and ready > 0:
                ready -= 1  # a pod crashed
            elif r < 0.62:
                ready = 0  # a node went away
            self.colors[c] = replace(s, ready_replicas=ready, available_replicas=ready, updated_replicas=s.replicas,
                                     status_replicas=s.replicas, observed_generation=s.generation,
                                     progress_deadline_exceeded=False)


@pytest.mark.parametrize("seed", range(40))
def test_safety_invariant_over_random_sequences(seed):
    rng = random.Random(seed)
    w = _World(rng)
    bg = BlueGreen(previewReplicas=rng.choice([None, 1, 2]), scaleDownDelaySeconds=rng.choice([0, 30, 300]),
                   abortScaleDownDelaySeconds=rng.choice([0, 30]), progressDeadlineSeconds=rng.choice([600, 1800]),
                   autoPromote=rng.random() < 0.8)
    if seed % 3 == 0:  # an HPA or KEDA owns the active color's replicas (KEDA may scale it to zero)
        w.autoscaled, w.replicas = True, seed % 2
    switches = 0
    for _ in range(300):
        w.now += rng.choice([1, 5, 30, 120])
        if w.autoscaled and w.stable and w.colors[w.stable] is not None and rng.random() < 0.1:
            w.colors[w.stable] = replace(w.colors[w.stable], replicas=rng.randint(0, 6))  # the autoscaler writes spec.replicas
            w.colors[w.stable] = replace(w.colors[w.stable], ready_replicas=min(w.colors[w.stable].ready_replicas, w.colors[w.stable].replicas))
        if rng.random() < 0.03:
            w.revision = f"r{w.next_rev}"
            w.next_rev += 1
        if rng.random() < 0.03 and not w.autoscaled:
            w.replicas = rng.randint(1, 5)
        now = T0 + dt.timedelta(seconds=w.now)
        promote = w.revision if rng.random() < 0.3 else None
        paused = rng.random() < 0.05
        before = w.stable
        obs = w.observed()
        d = decide_region(obs, bg, paused=paused, promote=promote, now=now)
        if d.smoke is not None:
            obs = w.observed(SmokeResult(d.smoke.revision, rng.random() < 0.8, "random verdict"))
            d = decide_region(obs, bg, paused=paused, promote=promote, now=now)
        _invariants(obs, d)
        if d.stable_color != before and before is not None:
            switches += 1
            target = obs.color(d.stable_color)
            # a switch goes to a color with ready pods only
            assert target is not None and target.ready_replicas > 0
            # and, unless it is a fail-over or a rollback, to a fully ready color whose revision passed its smoke test
            if not {n.reason for n in d.notes} & {"FailedOver", "RolledBack"}:
                assert target.fully_ready()
                assert target.annotations.get(SMOKE) == f"{target.revision}=passed" or \
                    d.colors[d.stable_color].annotations.get(SMOKE) == f"{target.revision}=passed"
        w.apply(d)
        if not {n.reason for n in d.notes} & {"RolledBack", "FailedOver"}:  # (after those, the rollout restarts next pass)
            _is_a_fixpoint(w, bg, paused, promote, now)
        w.kubelet()
    assert w.stable is not None  # the region got to serve at some point


def _is_a_fixpoint(w, bg, paused, promote, now) -> None:
    """Deciding again on the world the last decision made, at the same time, changes nothing and says nothing
    (no write, no duplicate Event): a decision is applied once, and a reconcile with nothing new is free."""
    obs = w.observed()
    d = decide_region(obs, bg, paused=paused, promote=promote, now=now)
    if bg.scale_down_delay_seconds == 0 and [n.reason for n in d.notes] == ["ScaledDown"]:
        return  # with no delay the old color is due at the switch, and is scaled down once the switch is seen applied
    assert d.notes == [] and d.smoke is None, d.notes
    assert d.stable_color == obs.stable_color
    for c, target in d.colors.items():
        cur = obs.color(c)
        assert cur is not None and (target.revision, target.replicas) == (cur.revision, cur.replicas), (c, target, cur)
        assert all(cur.annotations.get(k) == v for k, v in target.annotations.items()), (c, target.annotations, cur.annotations)
    assert all(obs.stable_annotations.get(k) == v for k, v in d.stable_annotations.items())


def test_a_rollout_walks_through_every_step_to_the_old_color_at_zero():
    """preview up -> smoke -> scale up -> switch -> delay -> old color at zero, with the Events of each step."""
    w = _World(random.Random(0))
    w.colors["blue"] = col("r1", 3)
    w.stable = "blue"
    w.revision = "r2"
    bg = BlueGreen(previewReplicas=1, scaleDownDelaySeconds=60)
    reasons = []
    for step in range(40):
        w.now += 10
        obs = w.observed()
        d = decide_region(obs, bg, now=T0 + dt.timedelta(seconds=w.now))
        if d.smoke:  # the controller runs the smoke test, then decides again with its result (and posts both notes)
            reasons += [n.reason for n in d.notes]
            d = decide_region(w.observed(SmokeResult("r2", True)), bg, now=T0 + dt.timedelta(seconds=w.now))
        _invariants(obs, d)
        reasons += [n.reason for n in d.notes]
        w.apply(d)
        # pods come up one per step, never crash
        for c, s in w.colors.items():
            if s is not None and s.ready_replicas < s.replicas:
                w.colors[c] = replace(s, ready_replicas=s.ready_replicas + 1, updated_replicas=s.replicas, status_replicas=s.replicas,
                                      observed_generation=s.generation)
    assert reasons == ["PreviewCreated", "PreviewReady", "SmokeTestPassed", "PreviewScalingUp", "Switched", "ScaledDown"]
    assert w.stable == "green" and w.colors["blue"].replicas == 0 and w.colors["green"].replicas == 3
    final = decide_region(w.observed(), bg, now=T0 + dt.timedelta(seconds=w.now))
    assert final.status.phase == "Stable" and final.requeue_after is None and final.notes == []


# ================================================================================================== adapter rollout

from perennial.api.deployment import AdapterRollout
from perennial.controllers.rollout import (
    AdapterInfo,
    AdaptersObserved,
    PodRoutes,
    decide_adapters,
    dump_progress,
    parse_progress,
    routes_revision,
)

V1 = AdapterInfo("fruit-v1", "s3://b/fruit-v1", 8, "qwen")
V2 = AdapterInfo("fruit-v2", "s3://b/fruit-v2", 8, "qwen")
V3 = AdapterInfo("fruit-v3", "s3://b/fruit-v3", 8, "qwen")
OTHER = AdapterInfo("veg-v1", "s3://b/veg-v1", 8, "qwen")
INFOS = {a.name: a for a in (V1, V2, V3, OTHER)}


def doc(routes: dict, loaded: list[str] | None = None) -> dict:
    """A routes document: routes {served: [(adapter, weight)]}; loaded adapters default to the routed ones."""
    r = {s: [{"adapter": a, "weight": w} for a, w in entries] for s, entries in routes.items()}
    names = loaded if loaded is not None else sorted({e["adapter"] for es in r.values() for e in es})
    adapters = {n: {"uri": INFOS[n].uri, "rank": INFOS[n].rank} for n in names}
    return {"revision": routes_revision(adapters, r), "base": {"name": "qwen"}, "adapters": adapters, "routes": r}


def pods(d: dict | None, n: int = 2, *, ready: bool = True, behind: int = 0, errors: dict | None = None):
    rev = d["revision"] if d else None
    return tuple(PodRoutes(f"p{i}", ready, "old" if i < behind else rev, errors or {}) for i in range(n))


def aobs(routes, desired, *, progress=None, pod_list=None, max_loras=4, max_rank=64, base="qwen", smoke=None):
    return AdaptersObserved(routes=routes, progress=progress or {}, pods=pods(routes) if pod_list is None else pod_list,
                            desired=desired, base_name="qwen", base_model=base, max_loras=max_loras, max_lora_rank=max_rank,
                            smoke_result=smoke)


def arun(o, bg=None, ar=None, now=0, paused=False, promote=None):
    return decide_adapters(o, BlueGreen(**(bg or {})), AdapterRollout(**(ar or {})), paused=paused, promote=promote,
                           now=T0 + dt.timedelta(seconds=now))


STABLE = doc({"fruit": [("fruit-v1", 100)]})
PREVIEW = doc({"fruit": [("fruit-v1", 100)], "fruit-preview": [("fruit-v2", 100)]})
STARTED_P = {"fruit": {"adapter": "fruit-v2", "from": "fruit-v1", "startedAt": t(0), "step": -1}}
PASSED_P = {"fruit": {**STARTED_P["fruit"], "smoke": "passed"}}
SWITCHED = doc({"fruit": [("fruit-v2", 100)]}, loaded=["fruit-v1", "fruit-v2"])
SWITCHED_P = {"fruit": {"adapter": "fruit-v2", "from": "fruit-v1", "switchedAt": t(100)}}
CANARY10 = doc({"fruit": [("fruit-v1", 90), ("fruit-v2", 10)], "fruit-preview": [("fruit-v2", 100)]})

# id, observed, BlueGreen, AdapterRollout, now, paused, promote, expectations:
# routes {served: [(adapter, weight)]}, loaded (adapters in the document), progress (per served name, a subset),
# notes, smoke (preview names asked), phase, conditions, pending, requeue, same (document unchanged, byte for byte)
AROWS = [
    ("a new served name is served at once", aobs(None, {"fruit": V1}), None, None, 0, False, None,
     {"routes": {"fruit": [("fruit-v1", 100)]}, "loaded": ["fruit-v1"], "notes": ["AdapterServed"], "progress": {}}),
    ("stable: nothing to do, the document is kept as is", aobs(STABLE, {"fruit": V1}), None, None, 0, False, None,
     {"same": True, "notes": [], "smoke": None, "phase": "Stable", "requeue": None,
          "conditions": {"Progressing": ("False", "RolloutComplete"), "Degraded": ("False", "AsExpected")}}),
    ("adapter changed -> the new one is loaded next to the old under <served>-preview, no traffic moves",
     aobs(STABLE, {"fruit": V2}), None, None, 0, False, None,
     {"routes": {"fruit": [("fruit-v1", 100)], "fruit-preview": [("fruit-v2", 100)]}, "loaded": ["fruit-v1", "fruit-v2"],
          "notes": ["PreviewCreated"], "progress": {"fruit": {"adapter": "fruit-v2", "from": "fruit-v1", "startedAt": t(0)}},
          "phase": "Progressing", "requeue": 1800}),
    ("not every ready pod applied the routes -> wait",
     aobs(PREVIEW, {"fruit": V2}, progress=STARTED_P, pod_list=pods(PREVIEW, 3, behind=1)), None, None, 30, False, None,
     {"same": True, "notes": [], "smoke": None, "phase": "Progressing", "requeue": 1770}),
    ("an unready pod does not hold the rollout up",
     aobs(PREVIEW, {"fruit": V2}, progress=STARTED_P, pod_list=pods(PREVIEW, 2) + (PodRoutes("p9", False, "old"),)), None, None, 30, False, None,
     {"smoke": ("fruit-preview",)}),
    ("every ready pod applied -> smoke-test the preview name",
     aobs(PREVIEW, {"fruit": V2}, progress=STARTED_P), None, None, 30, False, None,
     {"same": True, "smoke": ("fruit-preview",), "notes": ["PreviewReady"], "requeue": 60, "phase": "Progressing"}),
    ("smoke passed -> the name moves, the old adapter stays loaded for the delay",
     aobs(PREVIEW, {"fruit": V2}, progress=STARTED_P, smoke=SmokeResult(PREVIEW["revision"], True)), None, None, 100, False, None,
     {"routes": {"fruit": [("fruit-v2", 100)]}, "loaded": ["fruit-v1", "fruit-v2"], "notes": ["SmokeTestPassed", "Switched"],
          "progress": {"fruit": {"adapter": "fruit-v2", "from": "fruit-v1", "switchedAt": t(100)}}, "requeue": 300}),
    ("smoke failed -> aborted: preview and new adapter removed, the name untouched",
     aobs(PREVIEW, {"fruit": V2}, progress=STARTED_P, smoke=SmokeResult(PREVIEW["revision"], False, "no 'yellow'")), None, None, 100, False, None,
     {"routes": {"fruit": [("fruit-v1", 100)]}, "loaded": ["fruit-v1"], "notes": ["SmokeTestFailed", "Aborted"],
          "progress": {"fruit": {"aborted": "fruit-v2"}}, "phase": "Aborted", "conditions": {"Degraded": ("True", "RolloutAborted")}}),
    ("an aborted adapter is not retried while the spec asks for it",
     aobs(STABLE, {"fruit": V2}, progress={"fruit": {"aborted": "fruit-v2", "abortReason": "SmokeTestFailed: x"}}), None, None, 500, False, None,
     {"same": True, "notes": [], "phase": "Aborted", "conditions": {"Degraded": ("True", "RolloutAborted")}}),
    ("the spec moves on to another adapter -> a fresh rollout",
     aobs(STABLE, {"fruit": V3}, progress={"fruit": {"aborted": "fruit-v2"}}), None, None, 500, False, None,
     {"routes": {"fruit": [("fruit-v1", 100)], "fruit-preview": [("fruit-v3", 100)]}, "notes": ["PreviewCreated"],
          "progress": {"fruit": {"adapter": "fruit-v3"}}}),
    ("the spec went back to the served adapter -> the abort record is cleared (asking again retries)",
     aobs(STABLE, {"fruit": V1}, progress={"fruit": {"aborted": "fruit-v2"}}), None, None, 500, False, None,
     {"same": True, "notes": [], "progress": {}, "phase": "Stable", "conditions": {"Degraded": ("False", "AsExpected")}}),
    ("a pod failed to load the adapter -> aborted",
     aobs(PREVIEW, {"fruit": V2}, progress=STARTED_P, pod_list=pods(PREVIEW, 2, errors={"fruit-v2": "rank mismatch"})), None, None, 30, False, None,
     {"routes": {"fruit": [("fruit-v1", 100)]}, "loaded": ["fruit-v1"], "notes": ["Aborted"], "conditions": {"Degraded": ("True", "RolloutAborted")}}),
    ("a load error from a pod that has not applied the current routes yet is stale: no abort",
     aobs(PREVIEW, {"fruit": V2}, progress=STARTED_P, pod_list=(PodRoutes("p0", True, "older", {"fruit-v2": "old failure"}),
                                                             PodRoutes("p1", True, PREVIEW["revision"]))), None, None, 30, False, None,
     {"same": True, "notes": [], "phase": "Progressing", "conditions": {"Degraded": ("False", "AsExpected")}}),
    ("canary: the deadline runs from the last step, not from the start of the rollout",
     aobs(CANARY10, {"fruit": V2}, progress={"fruit": {**PASSED_P["fruit"], "step": 0, "stepAt": t(1700)}}, pod_list=pods(CANARY10, 2, behind=1)),
     None, {"canarySteps": [{"weight": 10, "pauseSeconds": 60}]}, 1850, False, None, {"same": True, "notes": [], "requeue": 1650}),
    ("deadline exceeded while the pods did not apply -> aborted",
     aobs(PREVIEW, {"fruit": V2}, progress=STARTED_P, pod_list=pods(PREVIEW, 2, behind=1)), None, None, 1800, False, None,
     {"routes": {"fruit": [("fruit-v1", 100)]}, "notes": ["Aborted"]}),
    ("autoPromote false -> waits for the annotation naming the adapter",
     aobs(PREVIEW, {"fruit": V2}, progress=PASSED_P), {"autoPromote": False}, None, 100, False, "fruit-v1",
     {"same": True, "notes": [], "pending": "fruit-v2", "phase": "Paused", "conditions": {"Progressing": ("Unknown", "WaitingForPromotion")}}),
    ("promotion annotation names the adapter -> moves",
     aobs(PREVIEW, {"fruit": V2}, progress=PASSED_P), {"autoPromote": False}, None, 100, False, "fruit-v2",
     {"routes": {"fruit": [("fruit-v2", 100)]}, "notes": ["Switched"]}),
    ("canary: first step sends 10%",
     aobs(PREVIEW, {"fruit": V2}, progress=PASSED_P), None, {"canarySteps": [{"weight": 50, "pauseSeconds": 120}, {"weight": 10, "pauseSeconds": 60}]},
     100, False, None,
     {"routes": {"fruit": [("fruit-v1", 90), ("fruit-v2", 10)], "fruit-preview": [("fruit-v2", 100)]}, "notes": ["CanaryStep"],
          "progress": {"fruit": {"step": 0, "stepAt": t(100)}}, "requeue": 60, "served": [("fruit", "fruit-v1", "fruit-v2", 10)]}),
    ("canary: the pause is not over -> stay",
     aobs(CANARY10, {"fruit": V2}, progress={"fruit": {**PASSED_P["fruit"], "step": 0, "stepAt": t(100)}}), None,
     {"canarySteps": [{"weight": 10, "pauseSeconds": 60}, {"weight": 50, "pauseSeconds": 120}]}, 130, False, None,
     {"same": True, "notes": [], "requeue": 30}),
    ("canary: the pause is over -> next weight",
     aobs(CANARY10, {"fruit": V2}, progress={"fruit": {**PASSED_P["fruit"], "step": 0, "stepAt": t(100)}}), None,
     {"canarySteps": [{"weight": 10, "pauseSeconds": 60}, {"weight": 50, "pauseSeconds": 120}]}, 160, False, None,
     {"routes": {"fruit": [("fruit-v1", 50), ("fruit-v2", 50)], "fruit-preview": [("fruit-v2", 100)]}, "notes": ["CanaryStep"]}),
    ("canary: the last pause is over -> the name moves entirely",
     aobs(CANARY10, {"fruit": V2}, progress={"fruit": {**PASSED_P["fruit"], "step": 0, "stepAt": t(100)}}), None,
     {"canarySteps": [{"weight": 10, "pauseSeconds": 60}]}, 160, False, None,
     {"routes": {"fruit": [("fruit-v2", 100)]}, "notes": ["Switched"]}),
    ("canary: the pods did not apply the last step yet -> no next step",
     aobs(CANARY10, {"fruit": V2}, progress={"fruit": {**PASSED_P["fruit"], "step": 0, "stepAt": t(100)}}, pod_list=pods(CANARY10, 2, behind=1)),
     None, {"canarySteps": [{"weight": 10, "pauseSeconds": 60}]}, 160, False, None, {"same": True, "notes": []}),
    ("spec reverted mid-canary -> all traffic back on the old adapter, the new one unloaded",
     aobs(CANARY10, {"fruit": V1}, progress={"fruit": {**PASSED_P["fruit"], "step": 0, "stepAt": t(100)}}), None,
     {"canarySteps": [{"weight": 10, "pauseSeconds": 60}]}, 130, False, None,
     {"routes": {"fruit": [("fruit-v1", 100)]}, "loaded": ["fruit-v1"], "notes": ["PreviewAbandoned"], "progress": {}}),
    ("old adapter kept loaded until the unload delay",
     aobs(SWITCHED, {"fruit": V2}, progress=SWITCHED_P), None, None, 200, False, None,
     {"same": True, "notes": [], "requeue": 200, "phase": "ScalingDown"}),
    ("unload delay over -> the old adapter is unloaded",
     aobs(SWITCHED, {"fruit": V2}, progress=SWITCHED_P), None, {"unloadDelaySeconds": 60}, 160, False, None,
     {"routes": {"fruit": [("fruit-v2", 100)]}, "loaded": ["fruit-v2"], "notes": ["AdapterUnloaded"], "progress": {}, "phase": "Stable"}),
    ("unloadDelaySeconds 0 -> moved and unloaded in one step",
     aobs(PREVIEW, {"fruit": V2}, progress=PASSED_P), None, {"unloadDelaySeconds": 0}, 100, False, None,
     {"routes": {"fruit": [("fruit-v2", 100)]}, "loaded": ["fruit-v2"], "notes": ["Switched", "AdapterUnloaded"]}),
    ("smoke test disabled -> moves once every pod applied",
     aobs(PREVIEW, {"fruit": V2}, progress=STARTED_P), {"smokeTest": {"enabled": False}}, None, 30, False, None,
     {"routes": {"fruit": [("fruit-v2", 100)]}, "notes": ["Switched"], "smoke": None}),
    ("rank above maxLoraRank -> refused before loading, with a clear reason",
     aobs(STABLE, {"fruit": AdapterInfo("fruit-v2", "s3://b/fruit-v2", 128, "qwen")}), None, None, 0, False, None,
     {"same": True, "notes": [], "conditions": {"Degraded": ("True", "AdapterRankTooHigh")}, "phase": "Degraded", "message": "rank 128 > engine.maxLoraRank 64"}),
    ("adapter of another base model -> refused",
     aobs(STABLE, {"fruit": AdapterInfo("fruit-v2", "s3://b/x", 8, "llama")}), None, None, 0, False, None,
     {"same": True, "conditions": {"Degraded": ("True", "BaseModelMismatch")}}),
    ("more adapters than maxLoras -> refused",
     aobs(STABLE, {"fruit": V1, "veg": OTHER}, max_loras=1), None, None, 0, False, None,
     {"same": True, "notes": [], "conditions": {"Degraded": ("True", "TooManyAdapters")}}),
    ("a served name removed from the spec stops at once and its adapter is unloaded",
     aobs(doc({"fruit": [("fruit-v1", 100)], "veg": [("veg-v1", 100)]}), {"fruit": V1}), None, None, 0, False, None,
     {"routes": {"fruit": [("fruit-v1", 100)]}, "loaded": ["fruit-v1"], "notes": ["AdapterRemoved"]}),
    ("paused -> no adapter rollout starts",
     aobs(STABLE, {"fruit": V2}), None, None, 0, True, None,
     {"same": True, "notes": [], "phase": "Paused", "conditions": {"Progressing": ("Unknown", "RolloutPaused")}}),
    ("no pod runs (scaled to zero) -> the name points to the new adapter at once",
     aobs(STABLE, {"fruit": V2}, pod_list=()), None, None, 0, False, None,
     {"routes": {"fruit": [("fruit-v2", 100)]}, "loaded": ["fruit-v2"], "notes": ["AdapterServed"]}),
    ("one free adapter slot -> the second change waits for the first",
     aobs(doc({"fruit": [("fruit-v1", 100)], "veg": [("veg-v1", 100)]}), {"fruit": V2, "veg": V3}, max_loras=3), None, None, 0, False, None,
     {"routes": {"fruit": [("fruit-v1", 100)], "fruit-preview": [("fruit-v2", 100)], "veg": [("veg-v1", 100)]},
          "notes": ["PreviewCreated"], "message": "waiting for a free adapter slot"}),
    ("one name waits for its smoke test while another starts: no smoke test until the pods applied the new routes",
     aobs(doc({"fruit": [("fruit-v1", 100)], "fruit-preview": [("fruit-v2", 100)], "veg": [("veg-v1", 100)]}), {"fruit": V2, "veg": V3},
          progress=STARTED_P), None, None, 30, False, None,
     {"smoke": None, "notes": ["PreviewCreated"], "message": "waiting for the pods to apply the routes before the smoke test"}),
    ("two names can roll out side by side when the slots allow",
     aobs(doc({"fruit": [("fruit-v1", 100)], "veg": [("veg-v1", 100)]}), {"fruit": V2, "veg": V3}, max_loras=4), None, None, 0, False, None,
     {"notes": ["PreviewCreated", "PreviewCreated"], "loaded": ["fruit-v1", "fruit-v2", "fruit-v3", "veg-v1"]}),
]


def _routes_of(d):
    return {s: [(e["adapter"], e["weight"]) for e in es] for s, es in d.routes["routes"].items()}


@pytest.mark.parametrize("row", AROWS, ids=[r[0] for r in AROWS])
def test_decide_adapters(row):
    _, o, bg, ar, now, paused, promote, exp = row
    d = arun(o, bg, ar, now, paused, promote)
    if exp.get("same"):
        assert d.routes == dict(o.routes)
    if "routes" in exp:
        assert _routes_of(d) == exp["routes"]
    if "loaded" in exp:
        assert sorted(d.routes["adapters"]) == exp["loaded"]
    if "notes" in exp:
        assert [n.reason for n in d.notes] == exp["notes"], d.notes
    if "smoke" in exp:
        assert (d.smoke.model_names if d.smoke else None) == exp["smoke"]
        if d.smoke:
            assert d.smoke.revision == o.routes["revision"]
    if "phase" in exp:
        assert d.phase == exp["phase"], d.message
    if "progress" in exp:
        if exp["progress"] == {}:
            assert d.progress == {}
        for s, sub in exp["progress"].items():
            assert {k: d.progress[s].get(k) for k in sub} == sub, d.progress
    conds = {c.type: (c.status, c.reason) for c in d.conditions}
    assert set(conds) == {"Progressing", "Degraded"}
    for ctype, want in exp.get("conditions", {}).items():
        assert conds[ctype] == want, (conds, d.message)
    if "pending" in exp:
        assert d.pending_promotion == exp["pending"]
    if "requeue" in exp:
        assert d.requeue_after == (None if exp["requeue"] is None else pytest.approx(exp["requeue"]))
    if "served" in exp:
        assert [(r.name, r.adapter, r.canary_adapter, r.canary_weight) for r in d.served] == exp["served"]
    if "message" in exp:
        assert exp["message"] in d.message
    _adapter_invariants(o, d)


def _adapter_invariants(o, d) -> None:
    doc_ = d.routes
    # the revision is the document's own
    assert doc_["revision"] == routes_revision(doc_["adapters"], doc_["routes"])
    for s, entries in doc_["routes"].items():
        # every route points to a loaded adapter, weights add up to 100
        assert all(e["adapter"] in doc_["adapters"] for e in entries), (s, entries)
        assert sum(e["weight"] for e in entries) == 100
    # a served name that was served keeps being served (never dropped by a rollout) while the spec has it
    for s in (o.routes or {}).get("routes", {}):
        if s in o.desired:
            assert s in doc_["routes"]
    # the progress annotation round-trips
    assert parse_progress(dump_progress(d.progress)) == d.progress


def test_parse_progress_ignores_garbage():
    assert parse_progress(None) == {} and parse_progress("not json") == {} and parse_progress("[1]") == {}
    assert parse_progress('{"fruit": {"adapter": "a"}, "x": 3}') == {"fruit": {"adapter": "a"}}


def test_routes_revision_is_canonical():
    a = {"x": {"uri": "u", "rank": 8}}
    r = {"s": [{"adapter": "x", "weight": 100}]}
    assert routes_revision(a, r) == routes_revision(dict(reversed(list(a.items()))), r)
    assert routes_revision(a, r) != routes_revision(a, {"s-preview": r["s"], **r})
    assert len(routes_revision(a, r)) == 10


def test_an_adapter_change_walks_through_every_step_without_new_pods():
    """load next to the old -> pods apply -> smoke -> canary -> move -> delay -> unload; the served name always answers."""
    o = aobs(STABLE, {"fruit": V2})
    ar = AdapterRollout(canarySteps=[{"weight": 25, "pauseSeconds": 30}])
    bg = BlueGreen(scaleDownDelaySeconds=60)
    routes, progress, reasons = STABLE, {}, []
    for step in range(30):
        now = T0 + dt.timedelta(seconds=10 * step)
        obs = replace(o, routes=routes, progress=progress, pods=pods(routes))  # the sidecars apply each document at once
        d = decide_adapters(obs, bg, ar, now=now)
        if d.smoke:
            reasons += [n.reason for n in d.notes]
            d = decide_adapters(replace(obs, smoke_result=SmokeResult(d.smoke.revision, True)), bg, ar, now=now)
        _adapter_invariants(obs, d)
        assert "fruit" in d.routes["routes"]
        reasons += [n.reason for n in d.notes]
        routes, progress = d.routes, d.progress
    assert reasons == ["PreviewCreated", "PreviewReady", "SmokeTestPassed", "CanaryStep", "Switched", "AdapterUnloaded"]
    assert _routes_of(d) == {"fruit": [("fruit-v2", 100)]} and list(d.routes["adapters"]) == ["fruit-v2"] and d.progress == {}


@pytest.mark.parametrize("seed", range(30))
def test_adapter_safety_over_random_sequences(seed):
    """Random spec changes, lagging pods, load errors, smoke verdicts, pauses and promotions: the served name always
    answers, every route points to a loaded adapter, and traffic only reaches an adapter that every ready pod loaded
    and that passed its smoke test (or a name that had no traffic to protect)."""
    rng = random.Random(1000 + seed)
    bg = BlueGreen(autoPromote=rng.random() < 0.7, scaleDownDelaySeconds=rng.choice([0, 60]), progressDeadlineSeconds=rng.choice([60, 600]))
    ar = AdapterRollout(canarySteps=rng.choice([[], [{"weight": 20, "pauseSeconds": 30}], [{"weight": 10, "pauseSeconds": 0}, {"weight": 60, "pauseSeconds": 20}]]))
    desired = {"fruit": V1}
    routes, progress = None, {}
    applied = ["none"] * 3  # the revision each of the 3 pods applied
    now = 0
    for _ in range(250):
        now += rng.choice([1, 10, 30])
        if rng.random() < 0.05:
            desired = {"fruit": rng.choice([V1, V2, V3])}
        if rng.random() < 0.02:
            desired = {**desired, "veg": OTHER} if "veg" not in desired else {"fruit": desired["fruit"]}
        # each pod applies the latest document sometimes; sometimes one fails to load an adapter
        if routes is not None:
            applied = [routes["revision"] if rng.random() < 0.6 else a for a in applied]
        errors = {rng.choice(["fruit-v2", "fruit-v3"]): "load failed"} if rng.random() < 0.02 else {}
        pod_list = tuple(PodRoutes(f"p{i}", rng.random() < 0.9, a, errors if i == 0 else {}) for i, a in enumerate(applied))
        o = aobs(routes, desired, progress=progress, pod_list=pod_list, max_loras=4)
        when = T0 + dt.timedelta(seconds=now)
        promote = rng.choice([None, desired["fruit"].name])
        paused = rng.random() < 0.05
        d = decide_adapters(o, bg, ar, paused=paused, promote=promote, now=when)
        if d.smoke is not None:
            o = replace(o, smoke_result=SmokeResult(d.smoke.revision, rng.random() < 0.8, "random verdict"))
            d = decide_adapters(o, bg, ar, paused=paused, promote=promote, now=when)
        _adapter_invariants(o, d)
        before = (o.routes or {}).get("routes", {})
        ready_applied = all(p.revision == (o.routes or {}).get("revision") for p in o.pods if p.ready) and any(p.ready for p in o.pods)
        for s, entries in d.routes["routes"].items():
            if s.endswith("-preview"):
                continue
            old = {e["adapter"] for e in before.get(s, [])}
            for e in entries:
                if e["adapter"] in old:
                    continue
                served_at_once = any(n.reason == "AdapterServed" for n in d.notes)
                smoke_ok = (o.progress.get(s, {}).get("smoke") == "passed"
                            or (o.smoke_result is not None and o.smoke_result.passed and o.smoke_result.revision == o.routes["revision"]))
                assert served_at_once or (smoke_ok and ready_applied), (s, e, o.progress, d.notes)
        # deciding again on what was just decided (pods unchanged, same time) changes nothing and says nothing
        again = decide_adapters(replace(o, routes=d.routes, progress=d.progress, smoke_result=None), bg, ar, paused=paused,
                                promote=promote, now=when)
        assert again.notes == [] and again.routes == d.routes and again.progress == d.progress, (again.notes, d.notes)
        routes, progress = d.routes, d.progress


# ============================================================================================ combining for the status

from perennial.controllers.rollout import (
    ConditionPart,
    ServedRoute,
    combine_conditions,
    summarize,
    unreachable_region,
    worst_phase,
)


def test_a_region_combines_its_pod_and_adapter_rollouts():
    pod = run(world(blue=col("r2", 2), stable="blue", desired="r2"))
    ad = arun(aobs(PREVIEW, {"fruit": V2}, progress=STARTED_P, pod_list=pods(PREVIEW, 2, behind=1)), now=30)
    conds = {c.type: (c.status, c.reason) for c in combine_conditions([(None, c) for c in pod.conditions + ad.conditions])}
    assert conds == {"Ready": ("True", "Serving"), "Progressing": ("True", "AdapterRollout"), "Degraded": ("False", "AsExpected")}
    assert worst_phase(pod.status.phase, ad.phase) == "Progressing"


def test_a_lost_region_makes_the_deployment_not_ready_and_degraded_naming_it_while_the_other_serves():
    eu = run(world(blue=col("r2", 3), stable="blue", desired="r2", replicas=3))
    us_status, us_conds = unreachable_region("us-east", "connection refused")
    s = summarize([("eu-west", eu.status, eu.conditions), ("us-east", us_status, us_conds)],
                  [ServedRoute("fruit", "fruit-v2"), ServedRoute("veg", "veg-v1", "veg-v2", 10)])
    conds = {c.type: c for c in s.conditions}
    assert (conds["Ready"].status, conds["Ready"].reason) == ("False", "RegionUnreachable")
    assert "us-east" in conds["Ready"].message and "eu-west" not in conds["Ready"].message
    assert conds["Degraded"].status == "True" and "us-east" in conds["Degraded"].message
    assert s.phase == "Unreachable" and s.ready_summary == "3/3"
    assert s.served_summary == "fruit=fruit-v2,veg=veg-v1+veg-v2@10%"


def test_summary_of_one_region_and_cut_columns():
    d = run(world(blue=col("r1", 4), green=col("r2", 2, 1, started=t(0)), stable="blue", desired="r2", replicas=4), {"previewReplicas": 2}, 10)
    s = summarize([("default", d.status, d.conditions)], [ServedRoute(f"name-{i}", "adapter-with-a-long-name") for i in range(20)])
    assert s.phase == "Progressing" and s.ready_summary == "4/4"
    assert len(s.served_summary) == 256 and s.served_summary.endswith("...")
    # one region: messages are not labelled
    assert not {c.type: c for c in s.conditions}["Progressing"].message.startswith("default:")


def test_combine_prefers_the_worst_status_per_type():
    parts = [("a", ConditionPart("Progressing", "Unknown", "RolloutPaused", "paused")),
             ("b", ConditionPart("Progressing", "False", "RolloutComplete", "")),
             ("c", ConditionPart("Degraded", "True", "RolloutAborted", "smoke failed"))]
    conds = {c.type: c for c in combine_conditions(parts)}
    assert (conds["Progressing"].status, conds["Progressing"].reason, conds["Progressing"].message) == ("Unknown", "RolloutPaused", "a: paused")
    assert conds["Degraded"].message == "c: smoke failed"


def test_every_condition_reason_the_decisions_use_is_documented_for_kubectl_explain():
    import re
    from pathlib import Path

    import perennial.controllers.rollout as rollout_module
    from perennial.api.deployment import DeploymentStatus

    controller = Path(rollout_module.__file__).with_name("deployment.py")
    source = Path(rollout_module.__file__).read_text() + (controller.read_text() if controller.exists() else "")
    reasons = set(re.findall(r'(?:cond\(|ConditionPart\()CONDITION_\w+, "\w+", "(\w+)"', source))
    reasons |= set(re.findall(r'problems\.append\(\("(\w+)"', source)) | set(re.findall(r'return "(\w+)", f"', source))
    reasons |= {"WaitingForPromotion", "RolloutPaused", "AdapterRollout", "UnloadDelay"}
    assert len(reasons) > 20
    doc = DeploymentStatus.model_fields["conditions"].description
    assert {r for r in reasons if f"`{r}`" not in doc} == set()


def test_region_status_merges_both_paths_into_the_api_model():
    from perennial.controllers.rollout import region_status

    pod = run(world(blue=col("r2", 2), stable="blue", desired="r2"))
    ad = arun(aobs(PREVIEW, {"fruit": V2}, progress=PASSED_P), {"autoPromote": False}, None, 100)
    st, conds = region_status("eu", pod, ad, endpoint="http://d.ns.svc", routes_revision=PREVIEW["revision"])
    wire = st.to_dict()
    assert wire["phase"] == "Paused" and wire["pendingPromotion"] == "fruit-v2" and wire["activeColor"] == "blue"
    assert wire["readyReplicas"] == 2 and wire["desiredReplicas"] == 2 and wire["endpoint"] == "http://d.ns.svc"
    assert "perennial.ai/promote=fruit-v2" in wire["message"]
    assert {c.type: c.reason for c in conds}["Progressing"] == "WaitingForPromotion"
    alone, _ = region_status("eu", pod)
    assert alone.phase == "Stable" and alone.pending_promotion is None


def test_the_last_resort_switch_keeps_the_serving_color_as_it_is():
    """`_never_select_an_unready_color` (a net under the decision): it moves traffic to the color with ready pods
    and undoes any change of that color's revision or count planned in the same pass."""
    from perennial.controllers.rollout import _never_select_an_unready_color, _Plan

    obs = world(blue=col("r1", 2, 0), green=col("r0", 3, 3, scale_down_at=t(0)), stable="blue", desired="r1")
    plan = _Plan(obs, T0)
    plan.set("green", revision="r9", replicas=0, scale_down_at=t(0))
    _never_select_an_unready_color(plan)
    assert plan.stable == "green" and plan.stable_annotations[SWITCHED_AT] == t(0)
    assert (plan.colors["green"].revision, plan.colors["green"].replicas) == ("r0", 3)
    assert plan.colors["green"].annotations[SCALE_DOWN_AT] is None
    assert [n.reason for n in plan.notes] == ["FailedOver"]
    # a color at zero on purpose is left selected
    obs = world(blue=col("r1", 0), green=col("r0", 3, 3), stable="blue", desired="r1", replicas=0, autoscaled=True)
    plan = _Plan(obs, T0)
    _never_select_an_unready_color(plan)
    assert plan.stable == "blue" and plan.notes == []


# ------------------------------------------------------------------------------ hostile annotations (a user's kubectl)
FAR = "9999-12-31T23:59:59Z"  # adding any delay to it overflows datetime


@pytest.mark.parametrize("value", [FAR, "3000-01-01T00:00:00Z", "garbage", "2026-13-45"])
def test_a_preview_started_in_the_future_or_unreadable_still_meets_its_deadline(value):
    """preview-started-at is written by the controller: a value in the future (clock skew, a hand edit) or one that
    does not parse restarts the step at `now` (rewritten), so the progress deadline still runs; it never crashes."""
    for obs in (world(blue=col("r1"), green=col("r2", 2, 0, started=value)),  # pod rollout
                world(blue=col("r1", 3, 1, started=value), stable=None, desired="r1", replicas=3)):  # first rollout
        d = run(obs, now=100)
        preview = "green" if obs.stable_color else "blue"
        assert d.colors[preview].annotations.get(STARTED) == t(100), d.colors
        _invariants(obs, d)
        # the next pass sees the rewritten annotation: the deadline is reached and the rollout aborts
        later = replace(obs, **{preview: replace(obs.color(preview), annotations={STARTED: t(100)})})
        assert run(later, now=100 + 1800).status.phase == "Aborted"


@pytest.mark.parametrize("value", [FAR, "3000-01-01T00:00:00Z"])
def test_a_scale_down_time_far_in_the_future_is_bounded_by_the_delay(value):
    """The old color kept for rollback goes to zero at most scaleDownDelaySeconds after now, whatever the annotation
    says (a hand-edited far-future time kept GPUs busy forever, or crashed the decision)."""
    obs = world(blue=col("r2"), green=col("r1", 2, 2, scale_down_at=value), stable="blue")
    d = run(obs, now=100)
    assert d.requeue_after is not None and d.requeue_after <= 300
    _invariants(obs, d)
    aborted = world(blue=col("r1"), green=col("r2", 2, 2, aborted="r2", scale_down_at=value), stable="blue")
    d = run(aborted, now=100)
    assert d.requeue_after is None or d.requeue_after <= 300


def test_a_switch_time_far_in_the_future_does_not_crash_or_arm_a_rollback_forever():
    obs = world(blue=col("r1", 2, 2, scale_down_at=t(300)), green=col("r2", 2, 1), stable="green", switched_at=FAR)
    d = run(obs, now=100)
    _invariants(obs, d)
    assert d.stable_color == "green"  # a switch "in the future" is no switch within the rollback window


@pytest.mark.parametrize("pr", [
    {"adapter": "fruit-v2", "from": "fruit-v1", "startedAt": t(0), "step": "x"},
    {"adapter": "fruit-v2", "from": "fruit-v1", "startedAt": t(0), "step": None, "smoke": "passed"},
    {"adapter": "fruit-v2", "from": "fruit-v1", "startedAt": 5, "stepAt": ["x"], "step": 0, "smoke": "passed"},
    {"adapter": "fruit-v2", "from": "fruit-v1", "switchedAt": 12},
    {"adapter": "fruit-v2", "from": "fruit-v1", "switchedAt": FAR},
    {"adapter": "fruit-v2", "from": "fruit-v1", "startedAt": FAR, "step": -1},
    {"adapter": "fruit-v2", "from": "fruit-v1", "startedAt": t(0), "step": 10**30, "smoke": "passed"},
    {"adapter": "fruit-v2", "from": "fruit-v1", "startedAt": t(0), "step": 1.5, "smoke": {"x": 1}},
])
def test_a_hand_edited_adapter_rollouts_annotation_never_crashes_the_decision(pr):
    """The adapter-rollouts annotation is on a ConfigMap anyone with edit rights in the namespace can change: values of
    the wrong type or far-future times are treated as unreadable, never an exception (which stopped every decision of
    the Deployment, failover included)."""
    for routes in (PREVIEW, SWITCHED, CANARY10):
        o = aobs(routes, {"fruit": V2}, progress=parse_progress(json.dumps({"fruit": pr})))  # as the controller reads it
        d = arun(o, ar={"canarySteps": [{"weight": 10, "pauseSeconds": 30}]}, now=200)
        assert "fruit" in d.routes["routes"]
        _adapter_invariants(o, d)
        assert d.requeue_after is None or d.requeue_after <= 1800


def test_a_served_adapter_the_pods_cannot_load_is_degraded_naming_it_and_the_error():
    """A new served name is served at once; when the pods cannot load its adapter they keep their last document and
    report the new one as pending with the error: the region says so (the status must not claim it is served)."""
    two = doc({"fruit": [("fruit-v1", 100)], "veg": [("veg-v1", 100)]})
    failing = tuple(PodRoutes(f"p{i}", True, STABLE["revision"], {"veg-v1": "adapter_config.json missing"}, pending=two["revision"])
                    for i in range(2))
    d = arun(aobs(two, {"fruit": V1, "veg": OTHER}, pod_list=failing))
    conds = {c.type: (c.status, c.reason, c.message) for c in d.conditions}
    assert conds["Degraded"][:2] == ("True", "AdapterLoadFailed") and "veg-v1" in conds["Degraded"][2] and "missing" in conds["Degraded"][2]
    assert d.phase == "Degraded"
    ok = arun(aobs(two, {"fruit": V1, "veg": OTHER}, pod_list=pods(two)))
    assert {c.type: c.status for c in ok.conditions}.get("Degraded") != "True", "loaded: no problem"
    stale = tuple(PodRoutes(f"p{i}", True, STABLE["revision"], {"veg-v1": "an older document's error"}, pending="zzz") for i in range(2))
    assert {c.type: c.status for c in arun(aobs(two, {"fruit": V1, "veg": OTHER}, pod_list=stale)).conditions}.get("Degraded") != "True", \
        "errors about another document say nothing about this one"
