"""Pure parts of the controllers: conditions, RewardSpec static validation, BaseModel builders."""

from __future__ import annotations

import pydantic
import pytest

from perennial.api.basemodel import BaseModelSpec
from perennial.api.rewardspec import RewardSpecSpec
from perennial.controllers.manager import status_patch
from perennial.controllers.rewardspec import spec_problems
from perennial.resources import basemodel as bm
from perennial.resources import conditions as cond
from perennial.resources.common import child_name


def test_transition_time_moves_only_when_status_flips():
    first = cond.set_condition(None, "Ready", False, "Downloading", "x", 1)
    stamp = first[0]["lastTransitionTime"]
    first[0]["lastTransitionTime"] = "2000-01-01T00:00:00Z"
    same = cond.set_condition(first, "Ready", False, "StillDownloading", "y", 2)
    assert same[0]["lastTransitionTime"] == "2000-01-01T00:00:00Z"
    flipped = cond.set_condition(same, "Ready", True, "Cached", "z", 2)
    assert flipped[0]["lastTransitionTime"] != "2000-01-01T00:00:00Z" and stamp


def test_status_patch_ignores_transition_times_only_and_removes_dropped_fields():
    a = {"observedGeneration": 1, "conditions": cond.set_condition(None, "Ready", True, "Ok", "", 1)}
    b = {"observedGeneration": 1, "conditions": [dict(a["conditions"][0], lastTransitionTime="1999-01-01T00:00:00Z")]}
    assert status_patch(a, b) is None
    assert status_patch(a, {**b, "observedGeneration": 2}) == {"observedGeneration": 2}
    # A field the new status no longer has is removed (merge patch null), e.g. a moved source's old resolvedUri.
    assert status_patch({**a, "resolvedUri": "hf://old"}, a) == {"resolvedUri": None}
    # ...at any depth: a progress line without an ETA removes the old one.
    progress = {"step": 3, "totalSteps": 9, "etaSeconds": 12}
    assert status_patch({**a, "progress": progress}, {**a, "progress": {"step": 3, "totalSteps": 9}}) == {"progress": {"etaSeconds": None}}
    assert status_patch({**a, "progress": progress}, {**a, "progress": dict(progress)}) is None
    assert cond.transitions(a["conditions"], cond.set_condition(a["conditions"], "Ready", False, "Broken", "", 1))


def _rs(**grader):
    return RewardSpecSpec.model_validate({"graders": [{"name": "g", **grader}]})


def test_rewardspec_static_problems():
    assert spec_problems(_rs(type="Regex", regex={"pattern": "^<a>"})) == []
    assert "does not compile" in spec_problems(_rs(type="Regex", regex={"pattern": "("}))[0]
    assert "does not parse" in spec_problems(_rs(type="Python", python={"source": "def grade(:"}))[0]
    assert "must define `def grade" in spec_problems(_rs(type="Python", python={"source": "def score(a, b): return 1"}))[0]
    assert "two arguments" in spec_problems(_rs(type="Python", python={"source": "def grade(a): return 1"}))[0]
    assert spec_problems(_rs(type="Python", python={"source": "def grade(sample, item):\n    return 1.0"})) == []
    assert "not a valid JSON Schema" in spec_problems(_rs(type="JSONSchema", jsonSchema={"schema": {"type": "nope"}}))[0]
    assert "must not all be 0" in spec_problems(_rs(type="Regex", weight="0", regex={"pattern": "a"}))[0]
    judge = {"endpoint": "http://j/v1", "model": "m", "rubric": "r", "minScore": 5, "maxScore": 5}
    with pytest.raises(pydantic.ValidationError, match="`minScore` must be less than `maxScore`"):
        _rs(type="LLMJudge", llmJudge=judge)  # the schema refuses it (CEL in the CRD); the controller's check stays
    bad = _rs(type="LLMJudge", llmJudge={**judge, "maxScore": 6})
    bad.graders[0].llm_judge.max_score = 5  # as if it came past the schema
    assert "minScore" in spec_problems(bad)[0]


def test_child_names_are_bounded_and_deterministic():
    long = "x" * 60
    name = child_name(long, "weights")
    assert len(name) <= 63 and name == child_name(long, "weights") and name.endswith("-weights")


def test_download_job_uses_secret_by_reference_and_restricted_pods():
    spec = BaseModelSpec.model_validate(
        {"source": {"uri": "hf://org/m", "revision": "v1", "credentialsSecretRef": {"name": "hf"}}, "cache": {"enabled": True}}
    )
    body = {"apiVersion": "perennial.ai/v1alpha1", "kind": "BaseModel", "metadata": {"name": "m", "namespace": "ns", "uid": "u1"}}
    job = bm.download_job(body, spec, "img:1")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "hf"}}]
    assert "value" not in str(container.get("envFrom"))
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u1"
    assert "--revision" in container["args"]
    other = BaseModelSpec.model_validate({"source": {"uri": "hf://org/m", "revision": "v2"}, "cache": {"enabled": True}})
    assert bm.download_job_name("m", spec) != bm.download_job_name("m", other)
    pvc = bm.cache_pvc(body, spec)
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"


def test_missing_credential_keys():
    assert bm.missing_credential_keys("hf", {"data": {"HF_TOKEN": "eA=="}}) == []
    assert bm.missing_credential_keys("s3", {"data": {"AWS_ACCESS_KEY_ID": "eA=="}}) == ["AWS_SECRET_ACCESS_KEY"]
    assert bm.missing_credential_keys("file", {}) == []
