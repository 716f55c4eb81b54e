"""GRPO's defaults for unset hyperparameters by the base model's size (perennial_trainer.grpo_defaults): a toy base
gets the set the rft_efficacy benchmark measured to learn, a real model keeps the real-model set, set values win."""

from __future__ import annotations

import json

import pytest
from perennial_trainer.config import RunConfig
from perennial_trainer.grpo_defaults import TOY_MAX_PARAMETERS, for_parameters, resolve
from perennial_trainer.train import grpo_group, memory_workload, trl_config
from trainer_support import FRUIT_REWARD_SPEC, run_config

CPU = {"cuda": False, "use_cpu": True, "bf16": False, "gradient_checkpointing": False, "dtype": None}

# config.json of the tests' tiny model (tinymodel.build_tiny_model: hidden 64, 2 layers) and of a Qwen2.5-0.5B-like model
TINY = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "intermediate_size": 128, "vocab_size": 400, "tie_word_embeddings": False}
QWEN_05B = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True}


def _cfg(**hp) -> RunConfig:
    return RunConfig.model_validate(run_config(name="r", method="GRPO", base="/m", output="/o", datasets=[{"name": "d", "uri": "/d.jsonl"}],
                                               reward_spec=FRUIT_REWARD_SPEC, hp=hp))


def _model_dir(tmp_path, config: dict) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_size_picks_the_set():
    assert for_parameters(133_000).name == "toy"
    assert for_parameters(TOY_MAX_PARAMETERS - 1).name == "toy"
    assert for_parameters(TOY_MAX_PARAMETERS).name == "model"
    assert for_parameters(494_000_000).name == "model"
    assert for_parameters(None).name == "model"  # unknown size: never the toy's 100x learning rate


def test_resolve_reads_the_parameter_count_from_config_json(tmp_path):
    toy = resolve(_model_dir(tmp_path / "a", TINY))
    assert toy.name == "toy" and toy.parameters < 200_000 and "toy defaults" in toy.reason
    real = resolve(_model_dir(tmp_path / "b", QWEN_05B))
    assert real.name == "model" and 400_000_000 < real.parameters < 600_000_000
    missing = resolve(str(tmp_path / "nowhere"))
    assert missing.name == "model" and "unknown" in missing.reason


def test_the_tests_tiny_model_is_a_toy():
    from tinymodel import tiny_model_path

    d = resolve(tiny_model_path())
    assert d.name == "toy" and d.metrics["train/grpo_defaults_toy"] == 1.0


def test_unset_hyperparameters_on_a_toy_take_the_toy_set(tmp_path):
    dev = dict(CPU, grpo_defaults=for_parameters(133_000))
    args = trl_config(_cfg(), str(tmp_path), dev, 512, [1.0, 1.0])
    assert args.learning_rate == pytest.approx(1e-3)
    assert args.num_generations == 8 and args.per_device_train_batch_size == 64  # 8 prompts x 8 completions a step
    assert args.entropy_coef == pytest.approx(0.05)
    assert grpo_group(_cfg(numGenerations=16), dev) == (16, 128)  # 8 prompts of any group size
    assert memory_workload(_cfg(), dev)[0] == 64  # the memory estimate sees the same batch


def test_the_toy_batch_is_at_most_the_prompts_there_are(tmp_path):
    # 8 prompts a step over 4 prompts would be an empty epoch (TRL: "max_steps must be set ... was -1")
    dev = dict(CPU, grpo_defaults=for_parameters(133_000))
    assert trl_config(_cfg(), str(tmp_path), dev, 4, [1.0, 1.0]).per_device_train_batch_size == 32
    assert trl_config(_cfg(), str(tmp_path), dev, 1, [1.0, 1.0]).per_device_train_batch_size == 8
    assert trl_config(_cfg(batchSize=64), str(tmp_path), dev, 4, [1.0, 1.0]).per_device_train_batch_size == 64  # set: as set


def test_unset_hyperparameters_on_a_real_model_keep_the_real_set(tmp_path):
    for dev in (dict(CPU, grpo_defaults=for_parameters(494_000_000)), CPU):  # CPU: nothing resolved (unit callers)
        args = trl_config(_cfg(), str(tmp_path), dev, 512, [1.0, 1.0])
        assert args.learning_rate == pytest.approx(1e-5)
        assert args.num_generations == 8 and args.per_device_train_batch_size == 8  # one prompt a step
        assert args.entropy_coef == 0.0  # TRL's


def test_set_hyperparameters_win_over_the_toy_set(tmp_path):
    dev = dict(CPU, grpo_defaults=for_parameters(133_000))
    args = trl_config(_cfg(learningRate="3e-4", batchSize=32, numGenerations=16, entropyCoef="0"), str(tmp_path), dev, 512, [1.0, 1.0])
    assert args.learning_rate == pytest.approx(3e-4)
    assert args.per_device_train_batch_size == 32 and args.num_generations == 16
    assert args.entropy_coef == 0.0


def test_sft_and_dpo_ignore_the_grpo_set(tmp_path):
    from perennial_trainer.config import RunConfig as RC

    dev = dict(CPU, grpo_defaults=for_parameters(133_000))
    for method, lr in (("SFT", 2e-4), ("DPO", 5e-5)):
        cfg = RC.model_validate(run_config(name="r", method=method, base="/m", output="/o", datasets=[{"name": "d", "uri": "/d.jsonl"}]))
        assert trl_config(cfg, str(tmp_path), dev, 36, None).learning_rate == pytest.approx(lr)


def test_record_says_which_set_and_why():
    rec = for_parameters(133_000).record
    assert rec["set"] == "toy" and rec["learningRate"] == 1e-3 and rec["promptsPerStep"] == 8 and rec["entropyCoef"] == 0.05
    assert "133,000 parameters" in rec["reason"]
    assert for_parameters(494_000_000).record["set"] == "model"
    capped = for_parameters(133_000).applied(4).record
    assert capped["promptsPerStep"] == 4 and "4 prompt(s) per step: all the training set has" in capped["reason"]
    assert for_parameters(133_000).applied(8) == for_parameters(133_000)
