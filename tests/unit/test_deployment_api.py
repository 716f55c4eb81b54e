"""The Perennial Deployment's API model: rollout settings, defaults, validation, status."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml
from perennial.api.deployment import (
    BlueGreen,
    DeploymentResource,
    DeploymentStatus,
    SmokeTest,
)

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_fit_gpus_and_keep_argo_vocabulary():
    bg = BlueGreen()
    assert bg.auto_promote is True and bg.preview_replicas is None
    assert bg.scale_down_delay_seconds == 300  # Argo's 30 is too short when a lost GPU replica takes minutes to load
    assert bg.abort_scale_down_delay_seconds == 30  # Argo's default
    assert bg.progress_deadline_seconds == 1800  # Argo's 600 is too short for a large image and model load
    assert bg.post_promotion_window_seconds is None  # the whole scale-down delay
    assert bg.smoke_test.enabled and bg.smoke_test.expect_regex is None


def test_the_example_still_parses_with_the_fields_it_always_had():
    doc = yaml.safe_load((ROOT / "examples" / "05-deployment.yaml").read_text())
    dep = DeploymentResource.model_validate(doc)
    assert dep.spec.strategy.blue_green.scale_down_delay_seconds == 300
    assert dep.spec.strategy.blue_green.smoke_test.expect_regex == "yellow"
    assert dep.spec.strategy.adapter_rollout.canary_steps == []


def test_smoke_expect_regex_must_compile():
    with pytest.raises(pydantic.ValidationError, match="`expectRegex` must be a valid Python regular expression"):
        SmokeTest(expectRegex="(yellow")
    assert SmokeTest(expectRegex="yel+ow").expect_regex == "yel+ow"


def test_status_round_trips_the_rollout_fields_and_ignores_unknown_ones():
    wire = {
        "observedGeneration": 3, "phase": "Progressing", "activeColor": "blue", "revision": "abc123", "readySummary": "2/3",
        "servedAdapters": [{"name": "fruit", "adapter": "fruit-v1", "canaryAdapter": "fruit-v2", "canaryWeight": 10}],
        "servedSummary": "fruit=fruit-v1+fruit-v2@10%", "selector": "perennial.ai/deployment=d,perennial.ai/color=blue",
        "regions": [{"name": "eu", "phase": "Paused", "activeColor": "blue", "previewColor": "green", "previewRevision": "def456",
                     "pendingPromotion": "def456", "readyReplicas": 2, "desiredReplicas": 3, "endpoint": "http://d.ns.svc", "message": "m"}],
        "somethingOld": 1,
    }
    status = DeploymentStatus.model_validate(wire)
    out = status.to_dict()
    assert out["regions"][0]["pendingPromotion"] == "def456" and out["servedAdapters"][0]["canaryWeight"] == 10
    assert "somethingOld" not in out
    with pytest.raises(pydantic.ValidationError):
        DeploymentStatus.model_validate({"regions": [{"name": "eu", "phase": "Sleeping"}]})
