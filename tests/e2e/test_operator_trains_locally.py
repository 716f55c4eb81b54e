"""The operator runs a real training Job: the trainer executes locally on a tiny offline model.

The local runtime (`perennial.local.kubelet`) plays the kubelet: the Job's pod becomes a
`python -m perennial_trainer` process whose real progress lines reach the operator through
the pod log API and whose termination message ends in a real Adapter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
from harness import API, running_cluster, wait_for
from tinymodel import tiny_model_path
from trainer_support import FRUIT_REWARD_SPEC, write_fruit_data

from perennial.local.kubelet import LocalKubelet

pytestmark = pytest.mark.slow
IMAGE = "perennial-trainer:e2e"
STEPS = 8


def _trainer_pid_after_first_step(cluster, pods_dir: Path) -> int | None:
    """The trainer process's pid once it has logged a step short of the last one."""
    steps = []
    for log in pods_dir.rglob("log"):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("PERENNIAL_PROGRESS "):
                steps.append(json.loads(line.split(" ", 1)[1]).get("step") or 0)
    if not any(0 < s < STEPS for s in steps):
        assert not any(s >= STEPS for s in steps), "the trainer finished before it could be held"
        return None
    for pod in cluster.kube.list("v1", "Pod", "default"):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            cid = cs.get("containerID") or ""
            if cs.get("state", {}).get("running") and cid.startswith("local://") and cid != "local://0":
                return int(cid.removeprefix("local://"))
    return None


def _mid_progress(cluster) -> str | None:
    text = (cluster.get("TrainingRun", "fruit-grpo").get("status") or {}).get("progressText")
    return text if text and text != f"{STEPS}/{STEPS}" and not text.startswith("0/") else None


def test_grpo_run_end_to_end_through_the_operator(tmp_path: Path):
    model = tiny_model_path()
    data_dir = tmp_path / "pvc" / "data"
    write_fruit_data(data_dir)
    with running_cluster(tmp_path, trainer_image=IMAGE) as cluster:
        kubelet = LocalKubelet(
            cluster.kube, cluster.server, workdir=tmp_path / "pods", pvc_root=str(tmp_path / "pvc"),
            images={IMAGE: [sys.executable, "-m", "perennial_trainer"]}, poll_seconds=0.2,
        ).start()
        try:
            cluster.create("BaseModel", "tiny", {"source": {"uri": f"file://{model}"}, "resources": {"gpus": 0}})
            cluster.create("RewardSpec", "fruit", FRUIT_REWARD_SPEC)
            # The RewardSpec's own tests run for real in a validation Job.
            cluster.wait_condition("RewardSpec", "fruit", "Validated", "True", "TestsPassed", timeout=120)
            assert len(cluster.get("RewardSpec", "fruit")["status"]["testResults"]) == 3

            cluster.create(
                "TrainingRun",
                "fruit-grpo",
                {
                    "method": "GRPO",
                    "baseModelRef": {"name": "tiny"},
                    "rewardSpecRef": {"name": "fruit"},
                    "datasets": [{"name": "prompts", "uri": "pvc://data/grpo.jsonl"}, {"name": "held-out", "uri": "pvc://data/eval.jsonl", "split": "Eval"}],
                    "hyperparameters": {"maxSteps": STEPS, "numGenerations": 4, "batchSize": 8, "maxCompletionLength": 8, "learningRate": "3e-4"},
                    "lora": {"rank": 8, "alpha": 16},
                    "resources": {"gpus": 0},
                    "evaluation": {"maxSamples": 8},
                    "output": {"adapterFamily": "fruit"},
                    "runPolicy": {"checkpointEverySteps": 4},
                },
            )
            # The operator must read progress while the trainer runs. A tiny run can finish between two
            # of its progress reads, so hold the trainer still (SIGSTOP) after its first step until the
            # TrainingRun shows a step short of the end, then let it go on.
            pid = wait_for(lambda: _trainer_pid_after_first_step(cluster, tmp_path / "pods"), timeout=300, interval=0.02,
                           message="the trainer's first progress line")
            os.kill(pid, signal.SIGSTOP)
            try:
                mid = wait_for(lambda: _mid_progress(cluster), timeout=60, interval=0.2, message="progress in the TrainingRun status while it runs")
            finally:
                os.kill(pid, signal.SIGCONT)
            assert re.fullmatch(rf"\d+/{STEPS}", mid) and mid != f"{STEPS}/{STEPS}"
            seen_progress: set[str] = {mid}

            def finished() -> bool:
                status = cluster.get("TrainingRun", "fruit-grpo").get("status") or {}
                if status.get("progressText"):
                    seen_progress.add(status["progressText"])
                return status.get("phase") in ("Succeeded", "Failed")

            wait_for(finished, timeout=400, interval=0.2, message="the training run to finish")
            run = cluster.get("TrainingRun", "fruit-grpo")
            pod_log = "".join(p.read_text() for p in (tmp_path / "pods").rglob("log"))
            assert run["status"]["phase"] == "Succeeded", (run["status"], pod_log[-3000:])
            # Real progress lines were read while it ran (not only the final state).
            assert any(p != f"{STEPS}/{STEPS}" for p in seen_progress), seen_progress
            assert run["status"]["progressText"] == f"{STEPS}/{STEPS}"
            metric_names = {m["name"] for m in run["status"]["metrics"]}
            assert "eval/mean_reward" in metric_names and "eval/improvement" in metric_names

            adapter_name = run["status"]["adapterRef"]["name"]
            adapter = cluster.get("Adapter", adapter_name)
            artifact = Path(adapter["spec"]["artifactUri"].removeprefix("file://"))
            assert (artifact / "adapter_config.json").exists() and (artifact / "adapter_model.safetensors").exists()
            assert adapter["spec"]["lineage"]["datasets"][0]["sha256"]
            cluster.wait_condition("Adapter", adapter_name, "Ready", "True", "Available")
            assert cluster.condition("Adapter", adapter_name, "ArtifactAvailable")["status"] == "True"
            wait_for(lambda: (cluster.get("Adapter", adapter_name).get("status") or {}).get("meanReward"), message="adapter metrics")
            assert cluster.kube.list(API, "Adapter", "default") and len(cluster.kube.list(API, "Adapter", "default")) == 1
        finally:
            kubelet.stop()
    shutil.rmtree(tmp_path / "pods", ignore_errors=True)
