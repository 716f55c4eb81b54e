"""TrainingRun controller against the embedded control plane; the test plays the kubelet."""

from __future__ import annotations

import base64
import json
import random
import shutil
import subprocess
import time

import yaml
from harness import API, Cluster, FakeKubelet, wait_for

from perennial.resources import networkpolicy as netpol
from perennial_trainer.config import RunConfig

RUBRIC = {
    "graders": [
        {"name": "fmt", "type": "Regex", "regex": {"pattern": "^<answer>"}},
        {"name": "judge", "type": "LLMJudge", "weight": "0.5", "llmJudge": {"endpoint": "http://judge:8000/v1", "model": "j", "rubric": "Be strict.", "apiKeySecretRef": {"name": "judge-key", "key": "token"}}},
    ]
}


def run_spec(**overrides):
    spec = {
        "method": "GRPO",
        "baseModelRef": {"name": "base"},
        "rewardSpecRef": {"name": "rubric"},
        "datasets": [{"name": "prompts", "uri": "pvc://data/fruit/train.jsonl"}],
        "hyperparameters": {"maxSteps": 20, "numGenerations": 4},
        "resources": {"gpus": 2, "memory": "32Gi", "sharedMemory": "8Gi", "nodeSelector": {"gpu": "h100"}, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "output": {"adapterFamily": "fruit", "artifactUri": "pvc://artifacts/adapters"},
        "runPolicy": {"backoffLimit": 3, "activeDeadlineSeconds": 3600},
    }
    spec.update(overrides)
    return spec


def prerequisites(cluster: Cluster) -> None:
    cluster.kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf", "namespace": "default"}, "data": {"HF_TOKEN": base64.b64encode(b"hf_secret_value").decode()}})
    cluster.create("BaseModel", "base", {"source": {"uri": "hf://org/model", "credentialsSecretRef": {"name": "hf"}}})
    cluster.create("RewardSpec", "rubric", RUBRIC)
    cluster.wait_condition("BaseModel", "base", "Ready", "True")
    cluster.wait_condition("RewardSpec", "rubric", "Ready", "True")


RESULT = {
    "status": "Succeeded",
    "artifactUri": "pvc://artifacts/adapters/default/run1",
    "metrics": {"eval/mean_reward": 1.85, "eval/baseline_mean_reward": 1.1, "eval/improvement": 0.75, "train/loss": 0.12},
    "lineage": {"configHash": "abc123", "datasets": [{"name": "prompts", "uri": "pvc://data/fruit/train.jsonl", "sha256": "f" * 64, "rows": 12}]},
}


def progress(step: int, total: int = 20, reward: float = 1.5) -> str:
    return "PERENNIAL_PROGRESS " + json.dumps({"step": step, "totalSteps": total, "loss": 0.5 / step, "meanReward": reward, "etaSeconds": (total - step) * 2, "fracRewardZeroStd": 0.25}) + "\n"


def test_job_progress_success_adapter_and_delete(cluster: Cluster, tmp_path):
    prerequisites(cluster)
    kubelet = FakeKubelet(cluster)
    cluster.create("TrainingRun", "run1", run_spec())
    job = wait_for(lambda: cluster.kube.get("batch/v1", "Job", "default", "run1-train"), message="Job")
    run = cluster.get("TrainingRun", "run1")

    # The Job: GPUs, placement, volumes, secrets by reference, security, policy, ownership.
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2 and c["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert c["resources"]["limits"]["memory"] == "32Gi"
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"data", "artifacts"}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/etc/perennial", "/dev/shm", "/mnt/pvc/data", "/var/run/secrets/perennial"} <= mounts
    # inputs read-only; the artifacts claim writable only below this run's own output directory
    by_path = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert by_path["/mnt/pvc/data"]["readOnly"] is True
    out = [m for m in c["volumeMounts"] if m["mountPath"].startswith("/mnt/pvc/artifacts/")]
    assert len(out) == 1 and out[0]["subPath"] and out[0]["mountPath"].endswith("/default/run1") and not out[0].get("readOnly")
    assert c["envFrom"] == [{"secretRef": {"name": "hf"}}]
    assert "hf_secret_value" not in json.dumps(job)
    projected = volumes["grader-secrets"]["projected"]["sources"][0]["secret"]
    assert projected == {"name": "judge-key", "items": [{"key": "token", "path": "judge-key/token"}]}
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False and c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["restartPolicy"] == "Never" and job["spec"]["podFailurePolicy"]["rules"]
    assert job["spec"]["backoffLimit"] == 3 and job["spec"]["activeDeadlineSeconds"] == 3600 and job["spec"]["ttlSecondsAfterFinished"] == 86400
    assert job["metadata"]["ownerReferences"][0]["uid"] == run["metadata"]["uid"]
    assert job["metadata"]["labels"]["perennial.ai/trainingrun"] == "run1"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"

    # The run config is the trainer's contract.
    cm = cluster.kube.get("v1", "ConfigMap", "default", "run1-config")
    config = RunConfig.model_validate(yaml.safe_load(cm["data"]["run.yaml"]))
    assert config.base_model_uri == "hf://org/model"
    assert config.output_uri == "pvc://artifacts/adapters/default/run1"
    assert config.reward_spec is not None and [g.name for g in config.reward_spec.graders] == ["fmt", "judge"]
    assert config.run_uid == run["metadata"]["uid"]

    cluster.wait_condition("TrainingRun", "run1", "Succeeded", "Unknown", "JobPending")
    assert cluster.get("TrainingRun", "run1")["status"]["phase"] == "Pending"
    pod_name = kubelet.start("run1-train")
    kubelet.log(pod_name, "loading model\n" + progress(1) + progress(5, reward=1.4))
    wait_for(lambda: (cluster.get("TrainingRun", "run1")["status"].get("progress") or {}).get("step") == 5, message="progress 5")
    st = cluster.get("TrainingRun", "run1")["status"]
    assert st["phase"] == "Running" and st["progressText"] == "5/20"
    assert st["progress"]["percent"] == 25 and st["progress"]["meanReward"] == "1.4" and st["progress"]["etaSeconds"] == 30
    kubelet.log(pod_name, progress(12, reward=1.8))
    wait_for(lambda: cluster.get("TrainingRun", "run1")["status"]["progressText"] == "12/20", message="progress 12")
    if shutil.which("kubectl"):
        config = cluster.server.write_kubeconfig(tmp_path / "kubeconfig")
        table = subprocess.run(["kubectl", f"--kubeconfig={config}", "get", "trainingruns"], capture_output=True, text=True, timeout=60).stdout
        row = next(line for line in table.splitlines() if line.startswith("run1 "))
        assert "GRPO" in row and "Running" in row and "12/20" in row and "1.8" in row, table

    kubelet.finish("run1-train", pod_name, exit_code=0, message=json.dumps(RESULT), job_condition="Complete")
    cluster.wait_condition("TrainingRun", "run1", "Succeeded", "True", "AdapterCreated")
    st = cluster.get("TrainingRun", "run1")["status"]
    assert st["phase"] == "Succeeded" and st["adapterRef"] == {"name": "fruit-v1"}
    assert {"name": "eval/improvement", "value": "0.75"} in st["metrics"]
    adapter = cluster.get("Adapter", "fruit-v1")
    assert adapter["spec"]["artifactUri"] == RESULT["artifactUri"]
    assert adapter["spec"]["version"] == 1 and adapter["spec"]["lora"]["rank"] == 16
    lineage = adapter["spec"]["lineage"]
    assert lineage["trainingRunRef"] == {"name": "run1"} and lineage["trainingRunUid"] == run["metadata"]["uid"]
    assert lineage["datasets"][0]["sha256"] == "f" * 64 and lineage["configHash"] == "abc123" and lineage["method"] == "GRPO"
    wait_for(lambda: cluster.get("Adapter", "fruit-v1").get("status", {}).get("meanReward") == "1.85", message="adapter metrics")
    assert "ownerReferences" not in adapter["metadata"]
    # Events are posted after the status write that notes them (in the background, retried): wait, do not read once
    wait_for(lambda: {"JobCreated", "AdapterCreated"} <= {e["reason"] for e in cluster.events("run1")}, message="the run's Events")

    # Deleting the run removes its Job and config, never its Adapter.
    cluster.kube.delete(API, "TrainingRun", "default", "run1")
    wait_for(lambda: cluster.get("TrainingRun", "run1") is None, message="run deleted")
    wait_for(lambda: cluster.kube.get("batch/v1", "Job", "default", "run1-train") is None, message="Job collected")
    wait_for(lambda: cluster.kube.get("v1", "ConfigMap", "default", "run1-config") is None, message="config collected")
    time.sleep(1.5)
    assert cluster.get("Adapter", "fruit-v1") is not None


def test_failures_say_why(cluster: Cluster):
    prerequisites(cluster)
    kubelet = FakeKubelet(cluster)
    cluster.create("TrainingRun", "oom", run_spec())
    cluster.create("TrainingRun", "bad-data", run_spec())
    cluster.create("TrainingRun", "slow", run_spec())
    pod = kubelet.start("oom-train")
    kubelet.finish("oom-train", pod, exit_code=137, reason="OOMKilled", job_condition="Failed", job_reason="BackoffLimitExceeded")
    c = cluster.wait_condition("TrainingRun", "oom", "Succeeded", "False", "OOMKilled")
    assert "memory" in c["message"]
    pod = kubelet.start("bad-data-train")
    trainer_error = {"status": "Failed", "reason": "DatasetColumnMissing", "message": "dataset 'prompts' (train.jsonl) has no column 'prompt'"}
    kubelet.finish("bad-data-train", pod, exit_code=1, message=json.dumps(trainer_error), job_condition="Failed", job_reason="BackoffLimitExceeded")
    c = cluster.wait_condition("TrainingRun", "bad-data", "Succeeded", "False", "DatasetColumnMissing")
    assert "no column 'prompt'" in c["message"]
    pod = kubelet.start("slow-train")
    kubelet.finish("slow-train", pod, exit_code=143, job_condition="Failed", job_reason="DeadlineExceeded")
    cluster.wait_condition("TrainingRun", "slow", "Succeeded", "False", "DeadlineExceeded")
    assert cluster.get("TrainingRun", "slow")["status"]["phase"] == "Failed"
    warnings = wait_for(lambda: {e["reason"] for e in cluster.events("oom") if e["type"] == "Warning"})
    assert "OOMKilled" in warnings
    assert not cluster.kube.list(API, "Adapter", "default")


def test_waits_for_missing_base_model_then_proceeds(cluster: Cluster):
    cluster.create("RewardSpec", "rubric", RUBRIC)
    cluster.create("TrainingRun", "early", run_spec())
    c = cluster.wait_condition("TrainingRun", "early", "Waiting", "True", "BaseModelNotFound")
    assert "'base'" in c["message"]
    assert cluster.get("TrainingRun", "early")["status"]["phase"] == "Waiting"
    assert cluster.kube.get("batch/v1", "Job", "default", "early-train") is None
    cluster.kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf", "namespace": "default"}, "data": {"HF_TOKEN": "eA=="}})
    cluster.create("BaseModel", "base", {"source": {"uri": "hf://org/model", "credentialsSecretRef": {"name": "hf"}}})
    wait_for(lambda: cluster.kube.get("batch/v1", "Job", "default", "early-train"), message="Job after BaseModel appeared")
    cluster.wait_condition("TrainingRun", "early", "Waiting", "False")


def test_impossible_spec_fails_fast(cluster: Cluster):
    prerequisites(cluster)
    cluster.create("BaseModel", "other", {"source": {"uri": "hf://org/other"}})
    cluster.create("Adapter", "foreign", {"baseModelRef": {"name": "other"}, "family": "x", "version": 1, "artifactUri": "file:///x", "lora": {"rank": 8}})
    cluster.create("TrainingRun", "mismatch", run_spec(parentAdapterRef={"name": "foreign"}))
    c = cluster.wait_condition("TrainingRun", "mismatch", "Succeeded", "False", "ParentAdapterMismatch")
    assert "'other'" in c["message"]
    assert wait_for(lambda: [e for e in cluster.events("mismatch") if e["type"] == "Warning" and e["reason"] == "ParentAdapterMismatch"])
    assert cluster.kube.get("batch/v1", "Job", "default", "mismatch-train") is None


def test_operator_restarts_never_duplicate_jobs_or_adapters(cluster: Cluster):
    prerequisites(cluster)
    kubelet = FakeKubelet(cluster)
    rng = random.Random(7)
    names = [f"r{i}" for i in range(4)]
    for name in names:
        cluster.create("TrainingRun", name, run_spec())
        if rng.random() < 0.5:
            cluster.restart_operator()
    for name in names:
        pod = kubelet.start(f"{name}-train")
        kubelet.log(pod, progress(3))
        if rng.random() < 0.5:
            cluster.restart_operator()
        kubelet.finish(f"{name}-train", pod, exit_code=0, message=json.dumps(RESULT), job_condition="Complete")
        if rng.random() < 0.5:
            cluster.restart_operator()
    for name in names:
        cluster.wait_condition("TrainingRun", name, "Succeeded", "True", timeout=30)
    cluster.restart_operator()
    time.sleep(2.5)
    jobs = cluster.kube.list("batch/v1", "Job", "default")
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(f"{n}-train" for n in names)
    adapters = cluster.kube.list(API, "Adapter", "default")
    assert len(adapters) == len(names)
    assert sorted(a["spec"]["version"] for a in adapters) == [1, 2, 3, 4]
    assert sorted(a["spec"]["lineage"]["trainingRunRef"]["name"] for a in adapters) == names
    refs = {cluster.get("TrainingRun", n)["status"]["adapterRef"]["name"] for n in names}
    assert refs == {a["metadata"]["name"] for a in adapters}


def test_a_running_trainers_network_policy_deleted_or_edited_is_restored(cluster: Cluster):
    """The trainer pods run untrusted code (reward functions, model output): their NetworkPolicy stays while they
    run. Policies are watched: one deleted or edited while the Job runs is restored at once (before, it was made
    with the Job only, and stayed gone)."""
    prerequisites(cluster)
    kubelet = FakeKubelet(cluster)
    cluster.create("TrainingRun", "run1", run_spec())
    wait_for(lambda: cluster.kube.get("batch/v1", "Job", "default", "run1-train"), message="Job")
    kubelet.start("run1-train")
    cluster.wait_condition("TrainingRun", "run1", "Started", "True")
    name = netpol.policy_name("run1")
    made = cluster.kube.get("networking.k8s.io/v1", "NetworkPolicy", "default", name)
    assert made is not None and made["spec"]["policyTypes"] == ["Ingress", "Egress"]

    cluster.kube.delete("networking.k8s.io/v1", "NetworkPolicy", "default", name)
    back = wait_for(lambda: cluster.kube.get("networking.k8s.io/v1", "NetworkPolicy", "default", name), message="the policy restored")
    assert back["metadata"]["uid"] != made["metadata"]["uid"] and back["spec"] == made["spec"]

    cluster.kube.patch("networking.k8s.io/v1", "NetworkPolicy", "default", name, {"spec": {"egress": [{}]}})  # allow all egress
    wait_for(lambda: cluster.kube.get("networking.k8s.io/v1", "NetworkPolicy", "default", name)["spec"] == made["spec"],
             message="the edited policy repaired")
