"""The decide functions of every controller, table-tested without any server: observed world in, status and actions out."""

from __future__ import annotations

import json

import pytest

from perennial.controllers import adapter as ad
from perennial.controllers import basemodel as bm
from perennial.controllers import rewardspec as rs
from perennial.controllers import trainingrun as tr
from perennial.controllers.base import condition_notes
from perennial.controllers.manager import status_patch
from perennial.resources import conditions as cond

API = "perennial.ai/v1alpha1"
NOW = "2026-11-29T12:00:00Z"


def obj(kind: str, name: str, spec: dict, status: dict | None = None, generation: int = 1, uid: str = "uid-1") -> dict:
    body = {"apiVersion": API, "kind": kind, "metadata": {"name": name, "namespace": "default", "uid": uid, "generation": generation, "creationTimestamp": "2026-11-29T11:00:00Z"}, "spec": spec}
    if status is not None:
        body["status"] = status
    return body


def ready(kind: str, name: str, spec: dict, *extra: tuple[str, str, str]) -> dict:
    conds = cond.set_condition(None, "Ready", True, "Ok", "", 1)
    for ctype, status, reason in extra:
        conds = cond.set_condition(conds, ctype, status, reason, "", 1)
    return obj(kind, name, spec, {"observedGeneration": 1, "conditions": conds})


BASE = {"source": {"uri": "hf://org/model"}}
RUBRIC = {"graders": [{"name": "fmt", "type": "Regex", "regex": {"pattern": "^<a>"}}]}


def run_spec(**overrides) -> dict:
    spec = {
        "method": "GRPO", "baseModelRef": {"name": "base"}, "rewardSpecRef": {"name": "rubric"},
        "datasets": [{"name": "d", "uri": "pvc://data/train.jsonl"}], "output": {"adapterFamily": "fam"},
        "hyperparameters": {"numGenerations": 4, "batchSize": 8},
    }
    spec.update(overrides)
    return spec


def decide_run(body: dict, world: tr.World) -> tr.Decision:
    return tr.decide(body, world, now=NOW, image="trainer:1", artifact_uri="file:///art", feedback_store_uri="file:///fb", progress_seconds=5)


def good_world(**kw) -> tr.World:
    w = tr.World(job=None, pod=None, base=ready("BaseModel", "base", BASE), reward_specs={"rubric": ready("RewardSpec", "rubric", RUBRIC, ("Validated", "True", "TestsPassed"))})
    for k, v in kw.items():
        setattr(w, k, v)
    return w


def reason(decision, ctype: str) -> tuple[str, str]:
    c = cond.get(decision.status["conditions"], ctype)
    return c["status"], c["reason"]


# ----------------------------------------------------------------------------- TrainingRun: references

NOT_READY_BASE = obj("BaseModel", "base", BASE, {"conditions": cond.set_condition(None, "Ready", False, "Downloading", "", 1)})
STALE_READY_BASE = obj("BaseModel", "base", BASE, {"conditions": cond.set_condition(None, "Ready", True, "Ok", "", 1)}, generation=2)


@pytest.mark.parametrize(
    "world_changes, expected",
    [
        ({"base": None}, ("Unknown", "BaseModelNotFound")),
        ({"base": NOT_READY_BASE}, ("Unknown", "BaseModelNotReady")),
        ({"base": STALE_READY_BASE}, ("Unknown", "BaseModelNotReady")),  # Ready of an older generation
        ({"reward_specs": {"rubric": None}}, ("Unknown", "RewardSpecNotFound")),
        ({"reward_specs": {"rubric": ready("RewardSpec", "rubric", RUBRIC, ("Validated", "Unknown", "ValidationRunning"))}}, ("Unknown", "RewardSpecNotValidated")),
        ({"reward_specs": {"rubric": ready("RewardSpec", "rubric", RUBRIC, ("Validated", "False", "ValidationJobFailed"))}}, ("Unknown", "RewardSpecNotValidated")),
        ({"reward_specs": {"rubric": ready("RewardSpec", "rubric", RUBRIC, ("Validated", "False", "TestsFailed"))}}, ("False", "RewardSpecTestsFailed")),
        ({"reward_specs": {"rubric": obj("RewardSpec", "rubric", RUBRIC, {"conditions": cond.set_condition(None, "Ready", False, "InvalidGrader", "", 1)})}}, ("Unknown", "RewardSpecNotReady")),
        ({}, ("Unknown", "JobPending")),
    ],
)
def test_run_waits_for_ready_references_and_fails_fast_on_failed_tests(world_changes, expected):
    d = decide_run(obj("TrainingRun", "r", run_spec()), good_world(**world_changes))
    assert reason(d, "Succeeded") == expected
    started = expected == ("Unknown", "JobPending")
    assert [c["kind"] for c in d.children] == (["ConfigMap", "Job"] if started else [])
    if expected[0] == "Unknown" and not started:
        assert reason(d, "Waiting") == ("True", expected[1]) and d.status["phase"] == "Waiting"
    if expected[0] == "False":
        assert d.status["phase"] == "Failed"


def _run_with(name: str, status: str, adapter: str | None = None) -> dict:
    st = {"conditions": cond.set_condition(None, "Succeeded", status, "AdapterCreated" if status == "True" else ("Training" if status == "Unknown" else "OOMKilled"), "", 1)}
    if adapter:
        st["adapterRef"] = {"name": adapter}
    return obj("TrainingRun", name, run_spec(), st, uid="uid-parent")


PARENT = ready("Adapter", "fam-v3", {"baseModelRef": {"name": "base"}, "family": "fam", "version": 3, "artifactUri": "file:///art/p", "lora": {"rank": 8}})
FOREIGN = ready("Adapter", "x-v1", {"baseModelRef": {"name": "other"}, "family": "x", "version": 1, "artifactUri": "file:///x", "lora": {"rank": 8}})


@pytest.mark.parametrize(
    "spec_changes, world_changes, expected, parent_uri",
    [
        ({"parentAdapterRef": {"name": "fam-v3"}}, {"parent_adapter": None}, ("Unknown", "AdapterNotFound"), None),
        ({"parentAdapterRef": {"name": "x-v1"}}, {"parent_adapter": FOREIGN}, ("False", "ParentAdapterMismatch"), None),
        ({"parentAdapterRef": {"name": "fam-v3"}}, {"parent_adapter": PARENT}, ("Unknown", "JobPending"), "file:///art/p"),
        ({"parentTrainingRunRef": {"name": "sft"}}, {"parent_run": None}, ("Unknown", "ParentRunNotFound"), None),
        ({"parentTrainingRunRef": {"name": "sft"}}, {"parent_run": _run_with("sft", "Unknown")}, ("Unknown", "ParentRunNotFinished"), None),
        ({"parentTrainingRunRef": {"name": "sft"}}, {"parent_run": _run_with("sft", "False")}, ("False", "ParentRunFailed"), None),
        ({"parentTrainingRunRef": {"name": "sft"}}, {"parent_run": _run_with("sft", "True", "fam-v3"), "parent_adapter": PARENT}, ("Unknown", "JobPending"), "file:///art/p"),
        ({"parentAdapterFamily": "fam"}, {"parent_family": []}, ("Unknown", "NoReadyAdapterInFamily"), None),
        ({"parentAdapterFamily": "fam"}, {"parent_family": [PARENT, obj("Adapter", "fam-v4", dict(PARENT["spec"], version=4))]}, ("Unknown", "JobPending"), "file:///art/p"),
    ],
)
def test_parent_named_by_adapter_run_or_family(spec_changes, world_changes, expected, parent_uri):
    d = decide_run(obj("TrainingRun", "r", run_spec(**spec_changes)), good_world(**world_changes))
    assert reason(d, "Succeeded") == expected
    if parent_uri:
        config = json.dumps(d.children[0]["data"])
        assert parent_uri in config
        assert d.status["parentAdapterRef"] == {"name": "fam-v3"}  # the newest *Ready* one of a family
        job = d.children[1]
        assert job["metadata"]["annotations"][tr.PARENT_ANNOTATION] == "fam-v3"
        # The status write after making the Job failed: the next pass reads the parent back from the Job.
        job["status"] = {"active": 1}
        again = decide_run(obj("TrainingRun", "r", run_spec(**spec_changes)), tr.World(job=job, pod=None))
        assert again.status["parentAdapterRef"] == {"name": "fam-v3"} and not again.children
        job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
        finished = decide_run(obj("TrainingRun", "r", run_spec(**spec_changes)), tr.World(job=job, pod=_pod("Succeeded", {"exitCode": 0, "message": json.dumps(RESULT)})))
        assert finished.adapter["spec"]["lineage"]["parentAdapterRef"] == {"name": "fam-v3"}


# ----------------------------------------------------------------------------- TrainingRun: the Job and the outcome


def _job(conditions: list[dict] | None = None, **status) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "r-train", "namespace": "default", "uid": "job-uid"}, "status": {"conditions": conditions or [], **status}}


def _pod(phase: str, terminated: dict | None = None) -> dict:
    state = {"terminated": terminated} if terminated else {"running": {}}
    return {"metadata": {"name": "r-train-0", "namespace": "default", "creationTimestamp": NOW}, "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "restartCount": 0, "state": state}]}}


def _line(step: int, frac: float | None = None, streak: int | None = None) -> str:
    extra = {} if streak is None else {"zeroStdStreak": streak}
    return tr.PROGRESS_PREFIX + json.dumps({"step": step, "totalSteps": 10, "loss": 0.5, "fracRewardZeroStd": frac, **extra}) + "\n"


def started(extra_status: dict | None = None) -> dict:
    conds = cond.set_condition(None, "Succeeded", "Unknown", "Training", "", 1)
    conds = cond.set_condition(conds, "Started", True, "TrainerStarted", "", 1)
    return obj("TrainingRun", "r", run_spec(), {"conditions": conds, **(extra_status or {})})


def test_running_progress_keeps_updated_at_while_the_step_stands_and_polls_only_while_running():
    world = tr.World(job=_job(active=1, startTime=NOW), pod=_pod("Running"), log=_line(3, 0.25))
    first = decide_run(started(), world)
    assert first.status["progress"]["step"] == 3 and first.status["progressText"] == "3/10" and first.requeue_after == 5
    again = tr.decide(started({"progress": first.status["progress"]}), world, now="2026-11-29T12:00:09Z", image="i", artifact_uri="file:///a", feedback_store_uri="f", progress_seconds=5)
    assert again.status["progress"]["updatedAt"] == first.status["progress"]["updatedAt"] == NOW
    moved = tr.decide(started({"progress": first.status["progress"]}), tr.World(job=world.job, pod=world.pod, log=_line(4, 0.25)), now="2026-11-29T12:00:09Z", image="i", artifact_uri="file:///a", feedback_store_uri="f", progress_seconds=5)
    assert moved.status["progress"]["updatedAt"] == "2026-11-29T12:00:09Z"
    assert reason(first, "LearningSignal") == ("True", "RewardVaries")
    pending = decide_run(obj("TrainingRun", "r", run_spec()), tr.World(job=_job(), pod=None))
    assert reason(pending, "Succeeded") == ("Unknown", "JobPending") and pending.requeue_after is None


def test_grpo_without_reward_variance_says_so_and_sft_never_does():
    world = tr.World(job=_job(active=1), pod=_pod("Running"), log=_line(3, 1.0))
    d = decide_run(started(), world)
    assert reason(d, "LearningSignal") == ("False", "NoRewardVariance")
    # The trainer counts flat steps in a row: one flat step is noise, three are a verdict that sticks while training.
    one = decide_run(started(), tr.World(job=_job(active=1), pod=_pod("Running"), log=_line(3, 1.0, streak=1)))
    assert reason(one, "LearningSignal") == ("True", "RewardVaries")
    three = decide_run(started(), tr.World(job=_job(active=1), pod=_pod("Running"), log=_line(5, 1.0, streak=3)))
    assert reason(three, "LearningSignal") == ("False", "NoRewardVariance")
    later = decide_run(started({"conditions": three.status["conditions"]}), tr.World(job=_job(active=1), pod=_pod("Running"), log=_line(6, 0.5, streak=0)))
    assert reason(later, "LearningSignal") == ("False", "NoRewardVariance")
    sft = obj("TrainingRun", "r", run_spec(method="SFT"), started()["status"])
    assert cond.get(decide_run(sft, world).status["conditions"], "LearningSignal") is None
    result = {"status": "Succeeded", "metrics": {"train/frac_reward_zero_std": 1.0}}
    done = decide_run(started(), tr.World(job=_job([{"type": "Complete", "status": "True"}]), pod=_pod("Succeeded", {"exitCode": 0, "message": json.dumps(result)})))
    assert reason(done, "LearningSignal") == ("False", "NoRewardVariance") and reason(done, "Succeeded") == ("True", "AdapterCreated")
    # Flat only at the end (every completion right: converged) is not a run without signal: the run's mean decides.
    result["metrics"]["train/frac_reward_zero_std_mean"] = 0.4
    converged = decide_run(started(), tr.World(job=_job([{"type": "Complete", "status": "True"}]), pod=_pod("Succeeded", {"exitCode": 0, "message": json.dumps(result)})))
    assert reason(converged, "LearningSignal") == ("True", "RewardVaries")


COMPLETE = _job([{"type": "Complete", "status": "True"}], succeeded=1, completionTime=NOW)
RESULT = {"status": "Succeeded", "artifactUri": "file:///art/default/r", "metrics": {"eval/mean_reward": 1.5}}


def _adapter(name: str, version: int, uid: str) -> dict:
    return obj("Adapter", name, {"baseModelRef": {"name": "base"}, "family": "fam", "version": version, "artifactUri": "file:///a", "lora": {"rank": 8}, "lineage": {"trainingRunUid": uid}})


@pytest.mark.parametrize(
    "family, create, ref",
    [
        ([], "fam-v1", "fam-v1"),
        ([_adapter("fam-v1", 1, "other"), _adapter("fam-v2", 2, "other2")], "fam-v3", "fam-v3"),
        # made before a restart cut in between creating it and recording it: never a second one
        ([_adapter("fam-v1", 1, "other"), _adapter("fam-v2", 2, "uid-1")], None, "fam-v2"),
    ],
)
def test_a_complete_job_makes_exactly_one_adapter(family, create, ref):
    world = tr.World(job=COMPLETE, pod=_pod("Succeeded", {"exitCode": 0, "message": json.dumps(RESULT)}), family=family)
    d = decide_run(started(), world)
    assert (d.adapter["metadata"]["name"] if d.adapter else None) == create
    assert d.status["adapterRef"] == {"name": ref} and d.status["phase"] == "Succeeded"
    assert {"name": "eval/mean_reward", "value": "1.5"} in d.status["metrics"]


@pytest.mark.parametrize("outcome", ["True", "False"])
@pytest.mark.parametrize("world", [tr.World(job=None, pod=None), tr.World(job=COMPLETE, pod=None), tr.World(job=_job([{"type": "Failed", "status": "True"}]), pod=None)])
def test_terminal_outcomes_stick_whatever_happens_to_the_job(outcome, world):
    conds = cond.set_condition(None, "Succeeded", outcome, "AdapterCreated" if outcome == "True" else "OOMKilled", "m", 1)
    status = {"observedGeneration": 1, "conditions": conds, "phase": "Succeeded" if outcome == "True" else "Failed", "jobName": "r-train", "completionTime": NOW}
    if outcome == "True":
        status["adapterRef"] = {"name": "fam-v1"}
    d = decide_run(obj("TrainingRun", "r", run_spec(), status), world)
    assert d.status == status and not d.children and d.adapter is None and d.requeue_after is None


@pytest.mark.parametrize("finished", [{"type": "Complete", "status": "True", "lastTransitionTime": NOW}, {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "lastTransitionTime": NOW}])
def test_a_job_seen_finished_before_its_pod_waits_for_the_trainers_result(finished):
    """Jobs and pods are separate watches: the Job may say it finished while its pod still looks running (or is not seen)."""
    for pod in (_pod("Running"), None):
        d = decide_run(started(), tr.World(job=_job([finished]), pod=pod))
        assert reason(d, "Succeeded") == ("Unknown", "Training") and d.adapter is None and 0 < d.requeue_after <= 5
    # the pod's final state arrives: decided from the trainer's own word
    term = {"exitCode": 0 if finished["type"] == "Complete" else 11, "message": json.dumps(RESULT if finished["type"] == "Complete" else {"status": "Failed", "reason": "DatasetNotFound"})}
    d = decide_run(started(), tr.World(job=_job([finished]), pod=_pod("Succeeded" if term["exitCode"] == 0 else "Failed", term)))
    assert reason(d, "Succeeded") == (("True", "AdapterCreated") if finished["type"] == "Complete" else ("False", "DatasetNotFound"))
    # a pod that never comes (deleted, never started) is given up on after the grace period
    late = tr.decide(started(), tr.World(job=_job([finished]), pod=None), now="2026-11-29T12:00:31Z", image="t", artifact_uri="file:///art", feedback_store_uri="file:///fb", progress_seconds=5)
    assert late.status["phase"] in ("Succeeded", "Failed") and late.requeue_after is None


def test_failed_job_says_why():
    term = {"exitCode": 11, "message": json.dumps({"status": "Failed", "reason": "DatasetNotFound", "message": "no file"})}
    d = decide_run(started(), tr.World(job=_job([{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]), pod=_pod("Failed", term)))
    assert reason(d, "Succeeded") == ("False", "DatasetNotFound") and d.status["phase"] == "Failed"


# ----------------------------------------------------------------------------- BaseModel, RewardSpec, Adapter


SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}, "data": {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}}


@pytest.mark.parametrize(
    "spec, world, expected, children",
    [
        (BASE, bm.World(), ("True", "SourceAvailable"), 0),
        ({"source": {"uri": "s3://b/m", "credentialsSecretRef": {"name": "s3"}}}, bm.World(), ("False", "SecretNotFound"), 0),
        ({"source": {"uri": "s3://b/m", "credentialsSecretRef": {"name": "s3"}}}, bm.World(secret={**SECRET, "data": {"AWS_ACCESS_KEY_ID": ""}}), ("False", "SecretKeyMissing"), 0),
        ({"source": {"uri": "s3://b/m", "credentialsSecretRef": {"name": "s3"}}}, bm.World(secret=SECRET), ("True", "SourceAvailable"), 0),
        ({"source": {"uri": "pvc://weights/m"}}, bm.World(), ("False", "ClaimNotFound"), 0),
        ({**BASE, "cache": {"enabled": True}}, bm.World(), ("False", "Downloading"), 2),
        ({**BASE, "cache": {"enabled": True}}, bm.World(job={"status": {"conditions": [{"type": "Complete", "status": "True"}]}}), ("True", "Cached"), 2),
        ({**BASE, "cache": {"enabled": True}}, bm.World(job={"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}), ("False", "DownloadFailed"), 2),
    ],
)
def test_basemodel(spec, world, expected, children):
    d = bm.decide(obj("BaseModel", "m", spec), world, "trainer:1")
    assert reason(d, "Ready") == expected and len(d.children) == children


def test_basemodel_status_drops_what_no_longer_holds():
    cached = {"observedGeneration": 1, "resolvedUri": "pvc://m-cache/model", "cacheClaimName": "m-cache", "downloadJobName": "m-download", "conditions": cond.set_condition(None, "Ready", True, "Cached", "", 1)}
    d = bm.decide(obj("BaseModel", "m", BASE, cached, generation=2), bm.World(), "trainer:1")
    assert d.status["resolvedUri"] == "hf://org/model" and "cacheClaimName" not in d.status and "downloadJobName" not in d.status


TESTED = {**RUBRIC, "tests": [{"name": "t", "completion": "<a>", "expect": {"min": "1"}}]}


@pytest.mark.parametrize(
    "job, pods, expected",
    [
        (None, [], ("Unknown", "ValidationRunning")),
        ({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}, [_pod("Succeeded", {"message": json.dumps({"results": [{"name": "t", "passed": True, "score": "1"}]})})], ("True", "TestsPassed")),
        ({"status": {"conditions": [{"type": "Failed", "status": "True"}]}}, [_pod("Failed", {"message": json.dumps({"message": "0/1", "results": [{"name": "t", "passed": False}]})})], ("False", "TestsFailed")),
        ({"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]}}, [], ("False", "ValidationJobFailed")),
    ],
)
def test_rewardspec_validation(job, pods, expected):
    d = rs.decide(obj("RewardSpec", "r", TESTED), rs.World(job, pods), "trainer:1")
    assert reason(d, "Validated") == expected and reason(d, "Ready") == ("True", "Valid")
    assert [c["kind"] for c in d.children] == ["ConfigMap", "Job"]


def test_rewardspec_results_are_awaited_when_the_job_is_seen_finished_first():
    job = {"status": {"conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": NOW}]}}
    waiting = rs.decide(obj("RewardSpec", "r", TESTED), rs.World(job, [_pod("Running")]), "trainer:1", NOW)
    assert reason(waiting, "Validated") == ("Unknown", "ValidationRunning") and waiting.requeue_after and "validatedGeneration" not in waiting.status
    done = rs.decide(obj("RewardSpec", "r", TESTED), rs.World(job, [_pod("Succeeded", {"message": json.dumps({"results": [{"name": "t", "passed": True, "score": "1"}]})})]), "trainer:1", NOW)
    assert reason(done, "Validated") == ("True", "TestsPassed")
    gave_up = rs.decide(obj("RewardSpec", "r", TESTED), rs.World(job, []), "trainer:1", "2026-11-29T12:01:00Z")
    assert reason(gave_up, "Validated") == ("False", "ValidationJobFailed") and gave_up.requeue_after is None


def test_adapter_metrics_come_from_its_own_run_and_outlive_it():
    spec = {"baseModelRef": {"name": "base"}, "family": "fam", "version": 1, "artifactUri": "file:///a", "lora": {"rank": 8}, "lineage": {"trainingRunRef": {"name": "r"}, "trainingRunUid": "uid-r"}}
    run = obj("TrainingRun", "r", run_spec(), {"metrics": [{"name": "eval/mean_reward", "value": "1.5"}, {"name": "eval/improvement", "value": "0.2"}]}, uid="uid-r")
    base = ready("BaseModel", "base", BASE)
    st = ad.decide(obj("Adapter", "fam-v1", spec), ad.World(artifact=True, base=base, parent=None, run=run))
    assert st["meanReward"] == "1.5" and st["improvement"] == "0.2"
    assert cond.get(st["conditions"], "Ready")["status"] == "True"
    kept = ad.decide(obj("Adapter", "fam-v1", spec, st), ad.World(artifact=True, base=base, parent=None, run=None))
    assert kept["meanReward"] == "1.5"
    impostor = obj("TrainingRun", "r", run_spec(), {"metrics": [{"name": "eval/mean_reward", "value": "9"}]}, uid="uid-other")
    broken = ad.decide(obj("Adapter", "fam-v1", spec, st), ad.World(artifact=True, base=base, parent=None, run=impostor))
    assert broken["meanReward"] == "1.5" and cond.get(broken["conditions"], "Ready")["reason"] == "LineageBroken"


def test_finished_download_and_validation_stick_when_their_jobs_are_gone():
    """A Job's TTL deletes it: a cached BaseModel must not download again, a validated RewardSpec not test again."""
    spec = {**BASE, "cache": {"enabled": True}}
    cached = bm.decide(obj("BaseModel", "m", spec), bm.World(job={"status": {"conditions": [{"type": "Complete", "status": "True"}]}}), "trainer:1")
    claim = {"metadata": {"name": cached.status["cacheClaimName"]}}
    after = bm.decide(obj("BaseModel", "m", spec, cached.status), bm.World(job=None, cache_claim=claim), "trainer:1")
    assert reason(after, "Ready") == ("True", "Cached") and [c["kind"] for c in after.children] == ["PersistentVolumeClaim"]
    lost = bm.decide(obj("BaseModel", "m", spec, cached.status), bm.World(job=None, cache_claim=None), "trainer:1")
    assert reason(lost, "Ready") == ("False", "Downloading") and len(lost.children) == 2  # the cache itself is gone
    newer = bm.decide(obj("BaseModel", "m", spec, cached.status, generation=2), bm.World(job=None, cache_claim=claim), "trainer:1")
    assert reason(newer, "Ready") == ("False", "Downloading")  # a new revision downloads again

    done = rs.decide(obj("RewardSpec", "r", TESTED), rs.World({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}, [_pod("Succeeded", {"message": json.dumps({"results": [{"name": "t", "passed": True, "score": "1"}]})})]), "trainer:1")
    gone = rs.decide(obj("RewardSpec", "r", TESTED, done.status), rs.World(None, []), "trainer:1")
    assert reason(gone, "Validated") == ("True", "TestsPassed") and gone.children == [] and gone.status["testResults"] == done.status["testResults"]
    changed = rs.decide(obj("RewardSpec", "r", TESTED, done.status, generation=2), rs.World(None, []), "trainer:1")
    assert reason(changed, "Validated") == ("Unknown", "ValidationRunning") and len(changed.children) == 2


@pytest.mark.parametrize("condition, expected", [
    ({"type": "Started", "status": "True", "reason": "TrainerStarted"}, None),
    ({"type": "Waiting", "status": "False", "reason": "ReferencesResolved"}, None),
    ({"type": "Succeeded", "status": "Unknown", "reason": "JobPending"}, None),
    ({"type": "Succeeded", "status": "Unknown", "reason": "Training"}, None),
    ({"type": "Succeeded", "status": "Unknown", "reason": "ImagePullBackOff"}, "Warning"),
    ({"type": "Succeeded", "status": "Unknown", "reason": "CrashLoopBackOff"}, "Warning"),
    ({"type": "Waiting", "status": "True", "reason": "BaseModelNotFound"}, "Normal"),
    ({"type": "Succeeded", "status": "True", "reason": "AdapterCreated"}, "Normal"),
    ({"type": "Succeeded", "status": "False", "reason": "OOMKilled"}, "Warning"),
    ({"type": "LearningSignal", "status": "False", "reason": "NoRewardVariance"}, "Warning"),
])
def test_run_events_say_what_was_done_and_what_went_wrong_not_every_step(condition, expected):
    assert tr.event_for(condition) == expected
    notes = condition_notes(None, [{**condition, "message": "m", "lastTransitionTime": NOW}], tr.event_for)
    assert [(n.reason, n.warning) for n in notes] == ([] if expected is None else [(condition["reason"], expected == "Warning")])


def test_the_job_controllers_bookkeeping_is_shown_once_the_trainer_started():
    pending = decide_run(obj("TrainingRun", "r", run_spec()), tr.World(job=_job(active=1, startTime=NOW), pod=None))
    assert "startTime" not in pending.status and "attempts" not in pending.status
    running = decide_run(obj("TrainingRun", "r", run_spec()), tr.World(job=_job(active=1, startTime=NOW), pod=_pod("Running")))
    assert running.status["startTime"] == NOW and running.status["attempts"] == 1


def test_the_pod_seen_before_the_jobs_own_update_changes_nothing_later():
    """The pod's and the Job's watch events race: whichever comes first, the status is the same (no second write)."""
    pod = _pod("Running")
    pod["status"]["containerStatuses"][0]["state"] = {"running": {"startedAt": "2026-11-29T12:00:03Z"}}
    pod_first = decide_run(obj("TrainingRun", "r", run_spec()), tr.World(job=_job(), pod=pod))
    both = decide_run(obj("TrainingRun", "r", run_spec(), pod_first.status), tr.World(job=_job(active=1, startTime=NOW), pod=pod))
    assert pod_first.status["startTime"] == both.status["startTime"] == "2026-11-29T12:00:03Z"
    assert pod_first.status["attempts"] == both.status["attempts"] == 1
    assert status_patch(pod_first.status, both.status) is None


# ----------------------------------------------------------------------------- the pods' NetworkPolicy while they run
# NetworkPolicies are watched (the operator's cache holds them), so the policy of pods that run untrusted code goes
# with every pass while they run, not only with the Job's creation: one deleted or edited meanwhile is restored
# (no write when it matches). Before, it was made with the Job only, and a policy deleted while the pods ran stayed gone.


def test_a_running_trainers_network_policy_goes_with_every_pass_while_it_runs():
    from perennial.resources.networkpolicy import EgressSettings

    running = tr.World(job=_job(active=1), pod=_pod("Running"), run_config={"model": {"uri": "hf://org/model"}, "datasets": []})
    d = tr.decide(started(), running, now=NOW, image="trainer:1", artifact_uri="file:///art", feedback_store_uri="file:///fb",
                  progress_seconds=5, egress=EgressSettings())
    assert [c["kind"] for c in d.children] == ["NetworkPolicy"], d.children
    assert d.children[0]["spec"]["policyTypes"] == ["Ingress", "Egress"]
    # without egress policies (the operator's setting), or without the run's config in the cache: nothing to apply
    assert tr.decide(started(), running, now=NOW, image="t", artifact_uri="file:///a", feedback_store_uri="f", progress_seconds=5).children == []
    unread = tr.World(job=_job(active=1), pod=_pod("Running"))
    assert tr.decide(started(), unread, now=NOW, image="t", artifact_uri="file:///a", feedback_store_uri="f", progress_seconds=5,
                     egress=EgressSettings()).children == []


def test_validation_and_download_pods_keep_their_network_policy_while_they_run():
    from perennial.resources.networkpolicy import EgressSettings

    running = {"status": {"active": 1}}
    d = rs.decide(obj("RewardSpec", "r", TESTED), rs.World(running, [_pod("Running")]), "trainer:1", NOW, egress=EgressSettings())
    assert [c["kind"] for c in d.children] == ["NetworkPolicy", "ConfigMap", "Job"]
    d = bm.decide(obj("BaseModel", "m", {**BASE, "cache": {"enabled": True}}), bm.World(job=running), "trainer:1", egress=EgressSettings())
    assert "NetworkPolicy" in [c["kind"] for c in d.children]


def test_the_run_config_read_back_from_a_configmap_edited_by_hand_is_bounded():
    """The trainer's policy while it runs is built from the run's ConfigMap, which a namespace user can edit: malformed
    YAML, a non-mapping or an oversized text (up to the API's 1 MiB, parsed on every pass and cached) read as None."""
    cm = lambda text: {"data": {"run.yaml": text}}  # noqa: E731
    assert tr._run_config(cm("model:\n  uri: hf://org/model\n")) == {"model": {"uri": "hf://org/model"}}
    assert tr._run_config(cm("model: [unclosed")) is None
    assert tr._run_config(cm("- a list\n")) is None
    assert tr._run_config(cm("pad: " + "x" * (tr.RUN_CONFIG_MAX_CHARS + 1))) is None
    assert tr._run_config({"data": {"run.yaml": 42}}) is None and tr._run_config(None) is None
