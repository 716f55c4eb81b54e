"""A GRPO run with its hyperparameters unset on the tests' tiny model (133k parameters) trains with the toy defaults
(perennial_trainer.grpo_defaults: 8 prompts a step, lr 1e-3, entropyCoef 0.05) and says so in its result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tinymodel import tiny_model_path
from trainer_support import (
    FRUIT_REWARD_SPEC,
    run_config,
    write_config,
    write_fruit_data,
)


def test_unset_grpo_hyperparameters_on_the_tiny_model_take_the_toy_set(tmp_path):
    from perennial_trainer.cli import main

    data = write_fruit_data(tmp_path / "data")
    cfg = write_config(tmp_path / "run.yaml", run_config(
        name="defaults", method="GRPO", base=tiny_model_path(), output=str(tmp_path / "out"),
        datasets=[{"name": "p", "uri": data["grpo"]}, {"name": "e", "uri": data["eval"], "split": "Eval"}],
        hp={"maxSteps": 2, "maxCompletionLength": 4}, reward_spec=FRUIT_REWARD_SPEC, evaluation={"enabled": True, "maxSamples": 4}))
    term = tmp_path / "termination-log"
    assert main(["train", "--config", cfg, "--termination-log", str(term)]) == 0, term.read_text()
    result = json.loads(term.read_text())
    rec = result["grpoDefaults"]
    assert rec["set"] == "toy" and rec["learningRate"] == 1e-3 and rec["promptsPerStep"] == 8 and rec["entropyCoef"] == 0.05
    assert "parameters (< 50,000,000): toy defaults" in rec["reason"]
    assert result["metrics"]["train/grpo_defaults_toy"] == 1.0 and result["metrics"]["train/base_parameters"] < 1_000_000
    # the batch really was 8 prompts (of the default 8 completions) a step: an epoch is rows // 8 steps (one prompt: rows)
    rows = len(Path(data["grpo"]).read_text().splitlines())
    assert result["metrics"]["train/epoch"] == pytest.approx(2 / (rows // 8), rel=0.05)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["train/grpo_defaults_toy"] == 1.0
    # what the TrainingRun's status shows (its list keeps 64 metrics: this one among them with evaluation's)
    from perennial.controllers.trainingrun import metrics_list

    assert {"name": "train/grpo_defaults_toy", "value": "1"} in metrics_list(result["metrics"])


def test_the_toy_set_on_fewer_prompts_than_a_step_takes_them_all(tmp_path):
    """4 prompts, no maxSteps: 8 prompts a step would leave TRL an empty epoch (it failed: `max_steps must be set`)."""
    from perennial_trainer.cli import main

    data = write_fruit_data(tmp_path / "data")
    small = tmp_path / "small.jsonl"
    small.write_text("".join(Path(data["grpo"]).read_text().splitlines(True)[:4]))
    cfg = write_config(tmp_path / "run.yaml", run_config(
        name="small", method="GRPO", base=tiny_model_path(), output=str(tmp_path / "out"),
        datasets=[{"name": "p", "uri": str(small)}], hp={"maxCompletionLength": 4}, reward_spec=FRUIT_REWARD_SPEC))
    term = tmp_path / "termination-log"
    assert main(["train", "--config", cfg, "--termination-log", str(term)]) == 0, term.read_text()
    result = json.loads(term.read_text())
    assert result["metrics"]["train/steps"] == 1 and result["metrics"]["train/epoch"] == 1.0
    assert result["grpoDefaults"]["set"] == "toy" and result["grpoDefaults"]["promptsPerStep"] == 4
