"""The TRL argument objects perennial_trainer builds from a run config (no training)."""

from __future__ import annotations

import pytest

from perennial_trainer.config import RunConfig
from perennial_trainer.train import trl_config
from trainer_support import FRUIT_REWARD_SPEC, run_config

CPU = {"cuda": False, "use_cpu": True, "bf16": False, "gradient_checkpointing": False, "dtype": None}
# no GPU here: transformers refuses bf16 and use_cpu=False without one, so only the checkpointing choice is checked
GPU = {"cuda": True, "use_cpu": True, "bf16": False, "gradient_checkpointing": True, "dtype": None}


def _cfg(method: str, **hp) -> RunConfig:
    raw = run_config(name="r", method=method, base="/m", output="/o", datasets=[{"name": "d", "uri": "/d.jsonl"}],
                     reward_spec=FRUIT_REWARD_SPEC if method == "GRPO" else None, hp=hp, checkpoint_every=25)
    return RunConfig.model_validate(raw)


@pytest.mark.parametrize("method", ["SFT", "DPO", "GRPO"])
def test_cpu_runs_turn_off_what_trl_turns_on_for_gpus(method, tmp_path):
    # TRL defaults to bf16 and activation checkpointing; both only cost (or break) on CPU
    args = trl_config(_cfg(method), str(tmp_path), CPU, 36, [1.0, 1.0] if method == "GRPO" else None)
    assert args.bf16 is False
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False
    assert args.use_cpu is True
    assert args.save_strategy == "steps" and args.save_steps == 25
    assert args.report_to == [] or args.report_to in ("none", ["none"])


def test_gpu_runs_keep_activation_checkpointing(tmp_path):
    args = trl_config(_cfg("GRPO"), str(tmp_path), GPU, 36, [1.0, 1.0])
    assert args.activation_checkpointing is True


def test_grpo_batch_must_divide_into_generations(tmp_path):
    from perennial_trainer.errors import TrainerError

    with pytest.raises(TrainerError, match="must be a multiple of `hyperparameters.numGenerations`") as e:
        trl_config(_cfg("GRPO", batchSize=12, numGenerations=8), str(tmp_path), CPU, 36, [1.0, 1.0])
    assert e.value.reason == "InvalidConfig" and e.value.exit_code == 10
