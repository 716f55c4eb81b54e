"""GRPO's generation engine through the real entrypoint: on this CPU machine Transformers generates, and the run
says so (metrics.json, the result's `generation` record, the run's status metrics); asking for vLLM where it cannot
run fails the run at once with a permanent `InvalidConfig` (perennial_trainer.generation). Needs the wiring of
generation.choose into train.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perennial.api.exitcodes import PERMANENT_EXIT_CODES
from tinymodel import tiny_model_path
from trainer_support import FRUIT_REWARD_SPEC, run_config, write_config, write_fruit_data


def _grpo(tmp: Path, monkeypatch, **env: str) -> tuple[int, dict]:
    from perennial_trainer.cli import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    data = write_fruit_data(tmp / "data")
    cfg = write_config(tmp / "run.yaml", run_config(
        name="gen", method="GRPO", base=tiny_model_path(), output=str(tmp / "out"), datasets=[{"name": "p", "uri": data["grpo"]}],
        hp={"maxSteps": 2, "batchSize": 8, "numGenerations": 4, "maxCompletionLength": 8, "learningRate": "3e-4"},
        reward_spec=FRUIT_REWARD_SPEC))
    term = tmp / "termination-log"
    rc = main(["train", "--config", cfg, "--termination-log", str(term)])
    return rc, json.loads(term.read_text())


def test_grpo_on_cpu_generates_with_transformers_and_records_why(tmp_path, monkeypatch):
    monkeypatch.delenv("PERENNIAL_GRPO_GENERATION", raising=False)
    rc, term = _grpo(tmp_path, monkeypatch)
    assert rc == 0 and term["status"] == "Succeeded", term
    assert term["generation"] == {"engine": "transformers", "reason": "no CUDA GPU (vLLM runs on GPUs only)"}
    assert term["metrics"]["train/generation_vllm"] == 0.0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["train/generation_vllm"] == 0.0 and "train/vllm_gpu_memory_utilization" not in metrics
    # what the TrainingRun's status shows
    from perennial.controllers.trainingrun import metrics_list

    assert {"name": "train/generation_vllm", "value": "0"} in metrics_list(term["metrics"])


def test_forced_off_is_recorded(tmp_path, monkeypatch):
    rc, term = _grpo(tmp_path, monkeypatch, PERENNIAL_GRPO_GENERATION="transformers")
    assert rc == 0 and term["generation"]["reason"] == "forced off by $PERENNIAL_GRPO_GENERATION=transformers"


def test_asking_for_vllm_on_cpu_fails_the_run_permanently(tmp_path, monkeypatch):
    rc, term = _grpo(tmp_path, monkeypatch, PERENNIAL_GRPO_GENERATION="vllm")
    assert rc in PERMANENT_EXIT_CODES and term["status"] == "Failed" and term["reason"] == "InvalidConfig"
    assert term["message"] == ("$PERENNIAL_GRPO_GENERATION=vllm asks for vLLM generation, but no CUDA GPU "
                               "(vLLM runs on GPUs only)")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_a_malformed_setting_fails_the_run_permanently(tmp_path, monkeypatch):
    rc, term = _grpo(tmp_path, monkeypatch, PERENNIAL_VLLM_SERVER_URL="http://user:pw@vllm:8000")
    assert rc in PERMANENT_EXIT_CODES and term["reason"] == "InvalidConfig" and "pw" not in term["message"]
