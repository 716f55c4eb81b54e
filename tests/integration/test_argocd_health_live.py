"""Argo CD health checks and actions against the status the operator really writes.

Each flow below drives the real operator on the embedded control plane (the same flows as
test_deployment_controller.py, test_trainingrun.py, test_rewardspec_validation.py), evaluates
`argocd/resource_customizations/perennial.ai/<Kind>/health.lua` with a real Lua 5.1 on the live object, and
checks the health Argo CD would show. The Deployment's actions run as Argo CD runs them (Lua on the live object,
then a JSON merge patch of what the script changed) and the operator must act on the result: `promote` switches
the traffic, `pause` holds a rollout, `resume` lets it go on.

These objects are also the health checks' testdata: `PERENNIAL_ARGOCD_CAPTURE=1 pytest
tests/integration/test_argocd_health_live.py` (or `scripts/argocd-testdata`) rewrites
`testdata/<name>.yaml` and the matching `health_test.yaml` entry of each kind; tests/unit/test_argocd.py then
replays them without a cluster.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from argocd_lua import CUSTOMIZATIONS, GROUP, discover_actions, health, run_action
from harness import API, Cluster, FakeKubelet, running_cluster, wait_for
from test_deployment_controller import NS, Serving, serving, spec  # noqa: F401 - `serving` is a fixture
from test_trainingrun import RESULT, prerequisites, progress, run_spec

CAPTURE = os.environ.get("PERENNIAL_ARGOCD_CAPTURE") == "1"
TIMEOUT = 60
SCRUBBED_PATH = "/var/lib/perennial"


def merge_patch(old: Any, new: Any) -> Any:
    """RFC 7386 merge patch turning `old` into `new` (what Argo CD sends after an action)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for k, v in new.items():
        if k not in old:
            patch[k] = v
        elif old[k] != v:
            patch[k] = merge_patch(old[k], v)
    return patch


def act(cluster: Cluster, kind: str, name: str, action: str) -> dict[str, Any]:
    """Run an action as Argo CD does: discovery must offer it enabled; the script's changes are patched in."""
    live = cluster.get(kind, name)
    offered = discover_actions(kind, live)
    assert offered.get(action, {}).get("disabled") is False, offered
    changed = run_action(kind, action, live)
    patch = merge_patch(json.loads(json.dumps(live)), changed)
    patch.pop("status", None)  # Argo CD patches the object, not its status subresource
    assert patch, f"action {action} changed nothing"
    return cluster.kube.patch(API, kind, NS, name, patch)


def scrub(obj: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """The object as testdata: what `kubectl get -o yaml` shows, less server bookkeeping and the test's tmp path."""
    meta = obj["metadata"]
    keep = {k: meta[k] for k in ("name", "namespace", "generation", "labels") if k in meta}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if not k.startswith("kopf.zalando.org/")}
    if annotations:
        keep["annotations"] = annotations
    out = {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": keep, "spec": obj.get("spec")}
    if obj.get("status") is not None:
        out["status"] = obj["status"]
    return json.loads(json.dumps(out).replace(str(tmp_path), SCRUBBED_PATH))


def check(cluster: Cluster, tmp_path: Path, kind: str, name: str, testdata: str, expected: str) -> dict[str, str]:
    """Assert the health of the live object; in capture mode store it as testdata with its health_test.yaml entry."""
    obj = cluster.get(kind, name)
    assert obj is not None, f"{kind}/{name}"
    hs = health(kind, obj)
    assert hs["status"] == expected, (hs, obj.get("status"))
    assert hs["message"], hs
    if CAPTURE:
        folder = CUSTOMIZATIONS / GROUP / kind
        data = scrub(obj, tmp_path)
        (folder / "testdata" / f"{testdata}.yaml").write_text(yaml.safe_dump(data, sort_keys=False, width=120))
        tests_file = folder / "health_test.yaml"
        doc = yaml.safe_load(tests_file.read_text()) if tests_file.exists() else None
        tests = [t for t in (doc or {}).get("tests") or [] if t["inputPath"] != f"testdata/{testdata}.yaml"]
        tests.append({"healthStatus": {"status": hs["status"], "message": health(kind, data)["message"]}, "inputPath": f"testdata/{testdata}.yaml"})
        tests.sort(key=lambda t: t["inputPath"])
        tests_file.write_text(yaml.safe_dump({"tests": tests}, sort_keys=False, width=120))
    return hs


def wait_health(cluster: Cluster, kind: str, name: str, expected: str, reason: str | None = None) -> None:
    def ok() -> bool:
        obj = cluster.get(kind, name)
        hs = health(kind, obj) if obj else {}
        return hs.get("status") == expected and (reason is None or hs.get("message", "").startswith(reason))

    wait_for(ok, TIMEOUT, message=f"{kind}/{name} {expected} {reason or ''}")


# ----------------------------------------------------------------------------- Deployment


def test_deployment_health_through_a_paused_then_promoted_rollout_and_a_rollback(serving: Serving, tmp_path: Path):
    w, c = serving, serving.cluster
    s = spec()
    s["strategy"]["blueGreen"].update({"autoPromote": False, "scaleDownDelaySeconds": 600, "previewReplicas": 2})
    c.create("Deployment", "chat", s)
    # first rollout under way: nothing serves yet
    c.wait_condition("Deployment", "chat", "Ready", "False", timeout=TIMEOUT)
    check(c, tmp_path, "Deployment", "chat", "progressing_firstRollout", "Progressing")
    w.proxied("chat-preview")
    w.ready("chat-blue")
    wait_for(lambda: w.stable_color() == "blue", TIMEOUT, message="the stable Service selects blue")
    w.proxied("chat")
    c.wait_condition("Deployment", "chat", "Progressing", "False", "RolloutComplete", timeout=TIMEOUT)
    c.wait_condition("Deployment", "chat", "Ready", "True", "Serving", timeout=TIMEOUT)
    check(c, tmp_path, "Deployment", "chat", "healthy_serving", "Healthy")
    assert discover_actions("Deployment", c.get("Deployment", "chat"))["promote"]["disabled"] is True, "nothing waits for a promotion"

    # the `pause` action, then a change the operator has not seen yet (stopped): generation ahead of the status
    act(c, "Deployment", "chat", "pause")
    c.stop_operator()
    w.kube.patch(API, "Deployment", NS, "chat", {"spec": {"engine": {"extraArgs": ["--enforce-eager"]}}})
    check(c, tmp_path, "Deployment", "chat", "progressing_newGeneration", "Progressing")
    c.start_operator()
    c.wait_condition("Deployment", "chat", "Progressing", "Unknown", "RolloutPaused", timeout=TIMEOUT)
    check(c, tmp_path, "Deployment", "chat", "suspended_rolloutPaused", "Suspended")
    assert w.deploy("chat-green") is None, "paused: no preview"

    # `resume`: the preview comes up, passes its smoke test and waits for a person
    act(c, "Deployment", "chat", "resume")
    green = wait_for(lambda: w.deploy("chat-green"), TIMEOUT, message="preview green")
    new = green["metadata"]["labels"]["perennial.ai/revision"]
    w.ready("chat-green")
    wait_for(lambda: w.status()["regions"][0].get("pendingPromotion") == new, TIMEOUT, message="waiting for a promotion")
    hs = check(c, tmp_path, "Deployment", "chat", "suspended_waitingForPromotion", "Suspended")
    assert new in hs["message"]
    assert w.stable_color() == "blue"

    # `promote` sets the annotation the controller matches against the waiting revision: traffic switches
    patched = act(c, "Deployment", "chat", "promote")
    assert patched["metadata"]["annotations"]["perennial.ai/promote"] == new
    wait_for(lambda: w.stable_color() == "green", TIMEOUT, message="promoted by the action")
    wait_health(c, "Deployment", "chat", "Progressing")  # the old color is kept for the scale-down delay
    check(c, tmp_path, "Deployment", "chat", "progressing_scaleDownDelay", "Progressing")

    # the new color loses its pods within the post-promotion window: rolled back, Degraded
    w.ready("chat-green", ready=0)
    wait_for(lambda: w.stable_color() == "blue", TIMEOUT, message="rolled back to blue")
    wait_health(c, "Deployment", "chat", "Degraded")
    check(c, tmp_path, "Deployment", "chat", "degraded_rolledBack", "Degraded")


# ----------------------------------------------------------------------------- the other kinds


@pytest.fixture
def world(tmp_path: Path):
    with running_cluster(tmp_path) as c:
        yield c


def test_basemodel_rewardspec_trainingrun_adapter_health(world: Cluster, tmp_path: Path):
    c = world
    kubelet = FakeKubelet(c)
    prerequisites(c)  # BaseModel `base` (hf:// with a credentials Secret), RewardSpec `rubric` (no tests)

    # BaseModel
    check(c, tmp_path, "BaseModel", "base", "healthy_sourceAvailable", "Healthy")
    c.create("BaseModel", "cached", {"source": {"uri": "hf://org/model"}, "cache": {"enabled": True, "size": "1Gi"}})
    c.wait_condition("BaseModel", "cached", "Ready", "False", "Downloading", timeout=TIMEOUT)
    check(c, tmp_path, "BaseModel", "cached", "progressing_downloading", "Progressing")
    c.create("BaseModel", "gated", {"source": {"uri": "hf://org/gated", "credentialsSecretRef": {"name": "no-such-secret"}}})
    c.wait_condition("BaseModel", "gated", "Ready", "False", "SecretNotFound", timeout=TIMEOUT)
    check(c, tmp_path, "BaseModel", "gated", "degraded_secretNotFound", "Degraded")
    job = wait_for(lambda: c.kube.get("batch/v1", "Job", NS, (c.get("BaseModel", "cached")["status"] or {}).get("downloadJobName", "-")), TIMEOUT, message="download Job")
    pod = kubelet.start(job["metadata"]["name"])
    kubelet.finish(job["metadata"]["name"], pod, exit_code=1, job_condition="Failed", job_reason="BackoffLimitExceeded")
    c.wait_condition("BaseModel", "cached", "Ready", "False", "DownloadFailed", timeout=TIMEOUT)
    check(c, tmp_path, "BaseModel", "cached", "degraded_downloadFailed", "Degraded")

    # RewardSpec: static checks only (no tests), tests running in a Job, tests failed
    c.wait_condition("RewardSpec", "rubric", "Validated", "True", "NoTests", timeout=TIMEOUT)
    check(c, tmp_path, "RewardSpec", "rubric", "healthy_noTests", "Healthy")
    tested = {"graders": [{"name": "fmt", "type": "Regex", "regex": {"pattern": "^<answer>"}}],
              "tests": [{"name": "good", "completion": "<answer>x</answer>", "expect": {"min": "1"}}]}
    c.create("RewardSpec", "tested", tested)
    c.wait_condition("RewardSpec", "tested", "Validated", "Unknown", "ValidationRunning", timeout=TIMEOUT)
    check(c, tmp_path, "RewardSpec", "tested", "progressing_validationRunning", "Progressing")
    job = wait_for(lambda: next(iter(c.kube.list("batch/v1", "Job", NS, "perennial.ai/rewardspec=tested")), None), TIMEOUT, message="validation Job")
    pod = kubelet.start(job["metadata"]["name"])
    passed = {"status": "Succeeded", "reason": "TestsPassed", "message": "1/1 tests passed", "results": [{"name": "good", "passed": True, "score": "1", "message": ""}]}
    kubelet.finish(job["metadata"]["name"], pod, exit_code=0, message=json.dumps(passed), job_condition="Complete")
    c.wait_condition("RewardSpec", "tested", "Validated", "True", "TestsPassed", timeout=TIMEOUT)
    check(c, tmp_path, "RewardSpec", "tested", "healthy_testsPassed", "Healthy")
    c.create("RewardSpec", "wrong", {**tested, "tests": [{"name": "good", "completion": "x", "expect": {"min": "1"}}]})
    job = wait_for(lambda: next(iter(c.kube.list("batch/v1", "Job", NS, "perennial.ai/rewardspec=wrong")), None), TIMEOUT, message="validation Job")
    pod = kubelet.start(job["metadata"]["name"])
    failed = {"status": "Failed", "reason": "TestsFailed", "message": "0/1 tests passed; failed: good",
              "results": [{"name": "good", "passed": False, "score": "0", "message": "score 0 outside [1, inf]"}]}
    kubelet.finish(job["metadata"]["name"], pod, exit_code=1, message=json.dumps(failed), job_condition="Failed", job_reason="BackoffLimitExceeded")
    c.wait_condition("RewardSpec", "wrong", "Validated", "False", "TestsFailed", timeout=TIMEOUT)
    check(c, tmp_path, "RewardSpec", "wrong", "degraded_testsFailed", "Degraded")
    c.create("RewardSpec", "bad-regex", {"graders": [{"name": "fmt", "type": "Regex", "regex": {"pattern": "(unclosed"}}]})
    c.wait_condition("RewardSpec", "bad-regex", "Ready", "False", timeout=TIMEOUT)
    check(c, tmp_path, "RewardSpec", "bad-regex", "degraded_invalidGrader", "Degraded")

    # TrainingRun: training (with progress), succeeded, failed (OOM)
    c.create("TrainingRun", "run1", run_spec())
    c.wait_condition("TrainingRun", "run1", "Succeeded", "Unknown", "JobPending", timeout=TIMEOUT)
    check(c, tmp_path, "TrainingRun", "run1", "progressing_jobPending", "Progressing")
    pod = kubelet.start("run1-train")
    kubelet.log(pod, "loading model\n" + progress(5))
    wait_for(lambda: (c.get("TrainingRun", "run1")["status"].get("progress") or {}).get("step") == 5, TIMEOUT, message="progress 5")
    hs = check(c, tmp_path, "TrainingRun", "run1", "progressing_training", "Progressing")
    assert "5/20" in hs["message"]
    kubelet.finish("run1-train", pod, exit_code=0, message=json.dumps(RESULT), job_condition="Complete")
    c.wait_condition("TrainingRun", "run1", "Succeeded", "True", "AdapterCreated", timeout=TIMEOUT)
    check(c, tmp_path, "TrainingRun", "run1", "healthy_adapterCreated", "Healthy")
    c.create("TrainingRun", "oom", run_spec())
    pod = kubelet.start("oom-train")
    kubelet.finish("oom-train", pod, exit_code=137, reason="OOMKilled", job_condition="Failed", job_reason="BackoffLimitExceeded")
    c.wait_condition("TrainingRun", "oom", "Succeeded", "False", "OOMKilled", timeout=TIMEOUT)
    check(c, tmp_path, "TrainingRun", "oom", "degraded_oomKilled", "Degraded")
    c.create("TrainingRun", "orphan", run_spec(baseModelRef={"name": "not-yet"}))
    c.wait_condition("TrainingRun", "orphan", "Waiting", "True", timeout=TIMEOUT)
    check(c, tmp_path, "TrainingRun", "orphan", "progressing_waitingForBaseModel", "Progressing")

    # Adapter: the run's adapter points at an artifact that is not there; one whose artifact exists is Ready
    c.wait_condition("Adapter", "fruit-v1", "Ready", "False", "ArtifactNotFound", timeout=TIMEOUT)
    check(c, tmp_path, "Adapter", "fruit-v1", "degraded_artifactNotFound", "Degraded")
    artifact = tmp_path / "artifacts" / "support-v1"
    artifact.mkdir(parents=True)
    (artifact / "adapter_config.json").write_text("{}")
    c.create("Adapter", "support-v1", {"baseModelRef": {"name": "base"}, "family": "support", "version": 1,
                                       "artifactUri": f"file://{artifact}", "lora": {"rank": 8}})
    c.wait_condition("Adapter", "support-v1", "Ready", "True", "Available", timeout=TIMEOUT)
    check(c, tmp_path, "Adapter", "support-v1", "healthy_available", "Healthy")
    c.stop_operator()
    c.create("Adapter", "support-v2", {"baseModelRef": {"name": "base"}, "family": "support", "version": 2,
                                       "artifactUri": f"file://{artifact}", "lora": {"rank": 8}})
    check(c, tmp_path, "Adapter", "support-v2", "progressing_noStatusYet", "Progressing")
    c.start_operator()
    c.wait_condition("Adapter", "support-v2", "Ready", "True", "Available", timeout=TIMEOUT)
