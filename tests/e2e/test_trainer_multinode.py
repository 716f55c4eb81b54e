"""Two pods of a multi-node group, played by two processes on this machine: each runs exactly the command line the
indexed-Job builder gives its pods (`perennial-trainer train ... --nnodes 2 --rdzv-endpoint <pod 0>`), with
`$JOB_COMPLETION_INDEX` 0 and 1 and pod 0's DNS name replaced by 127.0.0.1. torchrun's c10d rendezvous joins
them (gloo on CPU): one set of progress lines, one result, a loadable artifact; and a pod whose trainer fails
permanently exits with the permanent code (what the Job's podFailurePolicy turns into a failed group)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinymodel import tiny_model_path  # noqa: E402
from trainer_support import REPO, progress_lines, run_config, trainer_env, write_config, write_fruit_data  # noqa: E402

from perennial.api import TrainingRunSpec  # noqa: E402
from perennial.api.exitcodes import PERMANENT_EXIT_CODES  # noqa: E402
from perennial.resources import distributed as dist  # noqa: E402
from perennial.resources import trainingrun as tr  # noqa: E402

pytestmark = pytest.mark.slow

TIMEOUT = 600
BODY = {"apiVersion": "perennial.ai/v1alpha1", "kind": "TrainingRun", "metadata": {"name": "big", "namespace": "team", "uid": "u-2"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pod_commands(config: str, port: int) -> list[str]:
    """The command of each pod of a 2-node CPU group, as the operator builds it, made to run here."""
    spec = TrainingRunSpec.model_validate({
        "method": "SFT", "baseModelRef": {"name": "m"}, "datasets": [{"name": "d", "uri": "/data/x.jsonl"}],
        "output": {"adapterFamily": "f"}, "resources": {"gpus": 0, "nodes": 2, "distributed": {"rendezvousPort": port}}})
    cfg = tr.run_config(BODY, spec, base_model_uri="/m", output="/out", parent_adapter_uri=None, reward_spec=None,
                        eval_reward_spec=None, feedback_store_uri=None)
    job = dist.indexed_job(BODY, spec, tr.job(BODY, spec, cfg, image="trainer:1", credential_secrets=[], judge_keys=[]))
    c = job["spec"]["template"]["spec"]["containers"][0]
    cmd = [*c["command"], *c["args"]]
    assert cmd[0] == "perennial-trainer"
    endpoint = cmd.index("--rdzv-endpoint") + 1
    assert cmd[endpoint] == f"big-train-0.big-train.team.svc:{port}"
    cmd[endpoint] = f"127.0.0.1:{port}"  # pod 0's DNS name, here
    cmd[cmd.index(tr.CONFIG_FILE)] = config
    return [sys.executable, "-m", "perennial_trainer", *cmd[1:]]


def _run_group(tmp: Path, config: str) -> list[tuple[subprocess.CompletedProcess, Path]]:
    cmd = pod_commands(config, _free_port())
    procs = []
    for index in (0, 1):
        pod_dir = tmp / f"pod-{index}"
        pod_dir.mkdir()
        env = trainer_env(pod_dir, JOB_COMPLETION_INDEX=str(index))
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), pod_dir))
    out = []
    for p, pod_dir in procs:
        stdout, stderr = p.communicate(timeout=TIMEOUT)
        out.append((subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), pod_dir))
    return out


def test_two_pods_form_one_group_and_write_once(tmp_path):
    data = write_fruit_data(tmp_path / "data")
    config = write_config(tmp_path / "run.yaml", run_config(
        name="big", method="SFT", base=tiny_model_path(), output=str(tmp_path / "out"), checkpoint_dir=str(tmp_path / "ckpt"),
        datasets=[{"name": "format", "uri": data["sft"]}], hp={"learningRate": "1e-3", "maxSteps": 12, "batchSize": 4, "seed": 7}))
    pods = _run_group(tmp_path, config)
    for p, _ in pods:
        assert p.returncode == 0, p.stderr[-4000:]
    lines = [l for p, _ in pods for l in progress_lines(p.stdout)]
    steps = [l["step"] for l in lines if l["phase"] == "Training" and l["step"] > 0]
    assert steps == sorted(set(steps)) and steps[-1] == 12, f"one set of progress lines across the group: {steps}"
    results = [json.loads((d / "termination-log").read_text()) for _, d in pods if (d / "termination-log").exists()]
    assert len(results) == 1 and results[0]["status"] == "Succeeded", results
    assert results[0]["metrics"]["train/processes"] == 2
    out = Path(results[0]["artifactUri"])
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    print(f"group of 2 pods: steps {steps[0]}..{steps[-1]}, result on pod {[d.name for _, d in pods if (d / 'termination-log').exists()]}")


def test_a_permanent_error_in_the_group_exits_with_its_permanent_code(tmp_path):
    config = write_config(tmp_path / "run.yaml", run_config(
        name="big", method="SFT", base=tiny_model_path(), output=str(tmp_path / "out"), checkpoint_dir=str(tmp_path / "ckpt"),
        datasets=[{"name": "missing", "uri": str(tmp_path / "nope.jsonl")}], hp={"maxSteps": 2, "batchSize": 2}))
    pods = _run_group(tmp_path, config)
    codes = [p.returncode for p, _ in pods]
    assert any(c in PERMANENT_EXIT_CODES for c in codes), (codes, [p.stderr[-2000:] for p, _ in pods])
    reasons = [json.loads((d / "termination-log").read_text()).get("reason") for _, d in pods if (d / "termination-log").exists()]
    assert "DatasetNotFound" in reasons, reasons
