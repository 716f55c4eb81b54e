"""Never silent, against the embedded control plane with the operator running (the test plays the kubelet): a run
whose trainer reports no reward variance, a collapsed reward or an adapter worse than its baseline shows it in
conditions, Warning Events and the `Warnings` column of `kubectl get tr` / `kubectl get adapter`; with
`evaluation.failIfWorseThanParent` the trainer's refusal fails the run and keeps the numbers."""

from __future__ import annotations

import json

from harness import Cluster, FakeKubelet, wait_for
from test_kubectl_perennial import cells, table
from test_trainingrun import RESULT, prerequisites, run_spec

WORSE = {**RESULT["metrics"], "eval/mean_reward": 1.5, "eval/baseline_mean_reward": 1.708, "eval/improvement": -0.208,
         "eval/samples": 24, "train/frac_reward_zero_std_mean": 0.97, "train/flat_steps_share": 0.95, "train/no_reward_variance": 1.0}


def warnings_of(cluster: Cluster, name: str) -> set[str]:
    """The reasons Warning Events name: one Event per reconcile, named by its first warning, the others in its
    message as `(also: Reason: ...)`."""
    said = " ".join(f"{e['reason']}: {e['message']}" for e in cluster.events(name) if e["type"] == "Warning")
    return {r for r in ("NoRewardVariance", "RewardCollapsed", "WorseThanBase", "WorseThanParent") if f"{r}: " in said}


def test_flat_and_worse_run_warns_on_the_run_and_its_adapter(cluster: Cluster):
    prerequisites(cluster)
    kubelet = FakeKubelet(cluster)
    cluster.create("TrainingRun", "flat", run_spec())
    pod = kubelet.start("flat-train")
    line = {"step": 9, "totalSteps": 20, "meanReward": 0.2, "fracRewardZeroStd": 0.5, "zeroStdStreak": 0, "warnings": ["RewardCollapsed"]}
    kubelet.log(pod, "PERENNIAL_PROGRESS " + json.dumps(line) + "\n")
    cluster.wait_condition("TrainingRun", "flat", "LearningSignal", "False", "RewardCollapsed", timeout=60)
    wait_for(lambda: cells(table(cluster, "trainingruns"), "flat")["Warnings"] == "RewardCollapsed", timeout=60, message="Warnings column while training")

    result = {**RESULT, "metrics": WORSE, "warnings": [
        {"reason": "NoRewardVariance", "message": "in 19 of 20 logged steps every group of completions got the same reward"},
        {"reason": "WorseThanBase", "message": "held-out mean reward 1.5 is below the base model's 1.708"}]}
    kubelet.finish("flat-train", pod, exit_code=0, message=json.dumps(result), job_condition="Complete")
    cluster.wait_condition("TrainingRun", "flat", "Succeeded", "True", "AdapterCreated", timeout=60)
    signal = cluster.wait_condition("TrainingRun", "flat", "LearningSignal", "False", "NoRewardVariance")
    assert "19 of 20 logged steps" in signal["message"]
    improved = cluster.wait_condition("TrainingRun", "flat", "Improved", "False", "WorseThanBase")
    assert "1.5 vs the base model's 1.708 (-0.208) on 24 prompts" in improved["message"]
    wait_for(lambda: {"RewardCollapsed", "NoRewardVariance", "WorseThanBase"} <= warnings_of(cluster, "flat"), timeout=60, message=f"Warning Events {[(e['type'], e['reason']) for e in cluster.events('flat')]}")
    row = wait_for(lambda: (r := cells(table(cluster, "trainingruns"), "flat"))["Warnings"] == "NoRewardVariance,WorseThanBase" and r, timeout=60,
                   message="Warnings column of the finished run")
    assert {c["name"]: c.get("priority", 0) for c in table(cluster, "trainingruns")["columnDefinitions"]}["Warnings"] == 0

    adapter = cluster.get("TrainingRun", "flat")["status"]["adapterRef"]["name"]
    assert row["Adapter"] == adapter
    cluster.wait_condition("Adapter", adapter, "Improved", "False", "WorseThanBase", timeout=60)
    cluster.wait_condition("Adapter", adapter, "LearningSignal", "False", "NoRewardVariance")
    wait_for(lambda: cells(table(cluster, "adapters"), adapter)["Warnings"] == "NoRewardVariance,WorseThanBase", timeout=60, message="Adapter Warnings column")
    wait_for(lambda: {"WorseThanBase", "NoRewardVariance"} <= warnings_of(cluster, adapter), timeout=60, message="Adapter Warning Events")


def test_fail_if_worse_than_parent_fails_the_run_with_the_numbers(cluster: Cluster):
    prerequisites(cluster)
    kubelet = FakeKubelet(cluster)
    cluster.create("TrainingRun", "strict", run_spec(evaluation={"failIfWorseThanParent": True}))
    assert cluster.get("TrainingRun", "strict")["spec"]["evaluation"]["failIfWorseThanParent"] is True
    pod = kubelet.start("strict-train")
    refused = {"status": "Failed", "reason": "WorseThanBase", "metrics": WORSE,
               "message": "held-out mean reward 1.5 is below the base model's 1.708 (-0.208) on 24 prompts; `evaluation.failIfWorseThanParent` is set"}
    kubelet.finish("strict-train", pod, exit_code=14, message=json.dumps(refused), job_condition="Failed", job_reason="PodFailurePolicy")
    c = cluster.wait_condition("TrainingRun", "strict", "Succeeded", "False", "WorseThanBase", timeout=60)
    assert "failIfWorseThanParent" in c["message"]
    cluster.wait_condition("TrainingRun", "strict", "Improved", "False", "WorseThanBase")
    status = cluster.get("TrainingRun", "strict")["status"]
    assert {"name": "eval/baseline_mean_reward", "value": "1.708"} in status["metrics"] and "adapterRef" not in status
    assert cells(table(cluster, "trainingruns"), "strict")["Phase"] == "Failed"
    wait_for(lambda: "WorseThanBase" in warnings_of(cluster, "strict"), timeout=60, message="Warning Event")
