"""RewardSpec tests run in a validation Job; `Validated` and per-test results come from it."""

from __future__ import annotations

import json

from harness import API, Cluster, FakeKubelet, wait_for

SPEC = {
    "graders": [{"name": "fmt", "type": "Regex", "regex": {"pattern": "^<answer>"}}],
    "tests": [
        {"name": "good", "completion": "<answer>x</answer>", "expect": {"min": "1"}},
        {"name": "bad", "completion": "x", "expect": {"max": "0"}},
    ],
}


def _job(cluster: Cluster, exclude: set[str] = frozenset()) -> dict:
    def find():
        jobs = [j for j in cluster.kube.list("batch/v1", "Job", "default", "perennial.ai/rewardspec=rs") if j["metadata"]["name"] not in exclude]
        return jobs[0] if jobs else None

    return wait_for(find, message="validation Job")


def test_validation_job_reports_per_test_results(cluster: Cluster):
    kubelet = FakeKubelet(cluster)
    cluster.create("RewardSpec", "rs", SPEC)
    job = _job(cluster)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["grade", "--reward-spec", "/etc/perennial/rewardspec.yaml", "--tests"]
    assert {k: v for k, v in container["resources"]["limits"].items() if k != "ephemeral-storage"} == {"cpu": "1", "memory": "1Gi"}
    assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    cluster.wait_condition("RewardSpec", "rs", "Validated", "Unknown", "ValidationRunning")

    pod = kubelet.start(job["metadata"]["name"])
    results = [{"name": "good", "passed": True, "score": "1", "message": ""}, {"name": "bad", "passed": True, "score": "0", "message": ""}]
    kubelet.finish(job["metadata"]["name"], pod, exit_code=0, message=json.dumps({"status": "Succeeded", "reason": "TestsPassed", "message": "2/2 tests passed", "results": results}), job_condition="Complete")
    cluster.wait_condition("RewardSpec", "rs", "Validated", "True", "TestsPassed")
    status = cluster.get("RewardSpec", "rs")["status"]
    assert [r["name"] for r in status["testResults"]] == ["good", "bad"] and status["validatedGeneration"] == 1

    # A changed spec is validated again, by a new Job.
    changed = dict(SPEC, tests=SPEC["tests"] + [{"name": "wrong", "completion": "nope", "expect": {"min": "1"}}])
    cluster.kube.patch(API, "RewardSpec", "default", "rs", {"spec": changed})
    cluster.wait_condition("RewardSpec", "rs", "Validated", "Unknown", "ValidationRunning")
    job2 = _job(cluster, exclude={job["metadata"]["name"]})
    pod = kubelet.start(job2["metadata"]["name"])
    results.append({"name": "wrong", "passed": False, "score": "0", "message": "score 0 outside [1, inf]"})
    kubelet.finish(job2["metadata"]["name"], pod, exit_code=1, message=json.dumps({"status": "Failed", "reason": "TestsFailed", "message": "2/3 tests passed; failed: wrong", "results": results}), job_condition="Failed", job_reason="BackoffLimitExceeded")
    c = cluster.wait_condition("RewardSpec", "rs", "Validated", "False", "TestsFailed")
    assert "wrong" in c["message"]
    status = cluster.get("RewardSpec", "rs")["status"]
    assert status["validatedGeneration"] == 2
    assert {r["name"]: r["passed"] for r in status["testResults"]} == {"good": True, "bad": True, "wrong": False}
    assert cluster.condition("RewardSpec", "rs", "Ready")["status"] == "True"
