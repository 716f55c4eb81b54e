"""`resources.gpus: N` runs N trainer processes in the pod: the Job's container starts the trainer's launcher
(`perennial-trainer train ... --nproc-per-node N`, torchrun inside), and the trainer's own parser accepts what the
Job passes."""

from __future__ import annotations

import pytest
from perennial.api import TrainingRunSpec
from perennial.resources import trainingrun as tr

BODY = {"apiVersion": "perennial.ai/v1alpha1", "kind": "TrainingRun", "metadata": {"name": "run1", "namespace": "team", "uid": "u-1"}}


def build(gpus: int) -> dict:
    spec = TrainingRunSpec.model_validate({
        "method": "SFT", "baseModelRef": {"name": "m"}, "datasets": [{"name": "d", "uri": "pvc://data/train.jsonl"}],
        "output": {"adapterFamily": "fam"}, "resources": {"gpus": gpus}})
    config = tr.run_config(BODY, spec, base_model_uri="/models/m", output="pvc://artifacts/out", parent_adapter_uri=None,
                           reward_spec=None, eval_reward_spec=None, feedback_store_uri=None)
    return tr.job(BODY, spec, config, image="trainer:1", credential_secrets=[], judge_keys=[])


def _container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("gpus", [0, 1])
def test_one_gpu_or_cpu_runs_one_process(gpus):
    c = _container(build(gpus))
    assert c["command"] == ["perennial-trainer"] and c["args"] == ["train", "--config", tr.CONFIG_FILE]


@pytest.mark.parametrize("gpus", [2, 8])
def test_n_gpus_run_n_processes_through_the_launcher(gpus):
    job = build(gpus)
    c = _container(job)
    assert c["command"] == ["perennial-trainer"]
    assert c["args"] == ["train", "--config", tr.CONFIG_FILE, "--nproc-per-node", str(gpus)]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus

    import kubernetes_validate

    kubernetes_validate.validate(job, "1.30.0", strict=True)


def test_the_trainer_parses_what_the_job_passes():
    from perennial_trainer.cli import _parser, worker_argv

    args = _container(build(4))["args"]
    a = _parser().parse_args(args)
    assert a.command == "train" and a.nproc_per_node == 4 and a.train_config == tr.CONFIG_FILE
    # the workers get the same command line without the launcher's flags
    assert worker_argv(args) == ["train", "--config", tr.CONFIG_FILE]
    assert worker_argv(["train", "--nproc-per-node=4", "--nnodes", "2", "--config", "x"]) == ["train", "--config", "x"]
