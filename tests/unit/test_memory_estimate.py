"""The training memory estimate (`perennial.memory`): parameter counts from real configs, what fits which GPU,
and the message a run that cannot fit fails with."""

from __future__ import annotations

import pytest
from perennial.memory import GiB, check_fits, count_parameters, estimate, shape_of

LLAMA3_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 128256, "intermediate_size": 14336,
             "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False}
LLAMA3_70B = {"hidden_size": 8192, "num_hidden_layers": 80, "vocab_size": 128256, "intermediate_size": 28672,
              "num_attention_heads": 64, "num_key_value_heads": 8, "tie_word_embeddings": False}
QWEN25_05B = {"hidden_size": 896, "num_hidden_layers": 24, "vocab_size": 151936, "intermediate_size": 4864,
              "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True}
MIXTRAL_8X7B = {"hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 32000, "intermediate_size": 14336,
                "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8, "tie_word_embeddings": False}
ALL = {"lora_rank": 16, "lora_targets": ["all-linear"]}


@pytest.mark.parametrize("config,published", [
    (LLAMA3_8B, 8_030_261_248), (LLAMA3_70B, 70_553_706_496), (QWEN25_05B, 494_032_768), (MIXTRAL_8X7B, 46_702_792_704)])
def test_parameter_count_from_config_matches_the_published_one(config, published):
    assert count_parameters(config) == pytest.approx(published, rel=0.001)


def test_parameter_count_of_the_tiny_model_is_exact():
    import json
    from pathlib import Path

    from perennial_trainer.tinymodel import tiny_model_path
    from transformers import AutoModelForCausalLM

    path = tiny_model_path()
    config = json.loads((Path(path) / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())


# (config, GPU GiB, gpus, sharded, quantized, batch, seq, fits)
CASES = [
    ("70B on one 24 GB GPU", LLAMA3_70B, 24, 1, False, False, 1, 1024, False),
    ("70B QLoRA on one 24 GB GPU", LLAMA3_70B, 24, 1, False, True, 1, 1024, False),
    ("70B QLoRA on one 80 GB GPU", LLAMA3_70B, 80, 1, False, True, 1, 1024, True),
    ("70B bf16 on 8 x 80 GB, DDP", LLAMA3_70B, 80, 8, False, False, 1, 1024, False),
    ("70B bf16 on 8 x 80 GB, FSDP", LLAMA3_70B, 80, 8, True, False, 1, 1024, True),
    ("8B bf16 on one 24 GB GPU, batch 1", LLAMA3_8B, 24, 1, False, False, 1, 1024, True),
    ("8B bf16 on one 24 GB GPU, batch 8 (the logits)", LLAMA3_8B, 24, 1, False, False, 8, 1024, False),
    ("8B bf16 on one 80 GB GPU, batch 8", LLAMA3_8B, 80, 1, False, False, 8, 1024, True),
    ("0.5B on one 24 GB GPU", QWEN25_05B, 24, 1, False, False, 8, 1024, True),
    ("Mixtral 8x7B bf16 on one 80 GB GPU", MIXTRAL_8X7B, 80, 1, False, False, 1, 1024, False),
    ("Mixtral 8x7B QLoRA on one 80 GB GPU", MIXTRAL_8X7B, 80, 1, False, True, 1, 1024, True),
]


@pytest.mark.parametrize("what,config,gib,gpus,sharded,quantized,batch,seq,fits", CASES, ids=[c[0] for c in CASES])
def test_what_fits(what, config, gib, gpus, sharded, quantized, batch, seq, fits):
    why = check_fits(shape_of(config), gib * GiB, gpus=gpus, sharded=sharded, quantized=quantized, batch=batch, seq=seq, **ALL)
    est = estimate(shape_of(config), gpus=gpus, sharded=sharded, quantized=quantized, batch=batch, seq=seq, **ALL)
    print(f"{what}: {est.per_gpu / GiB:.1f} GiB per GPU")
    assert (why is None) == fits, why


def test_the_message_says_the_estimate_and_what_would_fit():
    why = check_fits(shape_of(LLAMA3_70B), 24 * GiB, batch=1, seq=1024, **ALL)
    assert why.startswith("the run does not fit its GPUs: estimated ")
    assert "70.55B parameters" in why and "base weights 131.4 GiB" in why and "each GPU has 24.0 GiB" in why
    assert "It would fit with 8 GPUs of this size sharded with FSDP" in why  # 131 GiB / 8 + the rest < 24 GiB
    assert "QLoRA" not in why  # 4-bit 70B (~38 GiB) does not fit 24 GiB either
    why80 = check_fits(shape_of(LLAMA3_70B), 80 * GiB, batch=1, seq=1024, **ALL)
    assert "4-bit QLoRA base weights (" in why80 and "2 GPUs of this size sharded" in why80


def test_sharding_divides_the_weights_and_ddp_does_not():
    s = shape_of(LLAMA3_8B)
    ddp = [estimate(s, gpus=n, batch=1, seq=512, **ALL).per_gpu for n in (1, 2, 8)]
    fsdp = [estimate(s, gpus=n, sharded=True, batch=1, seq=512, **ALL).per_gpu for n in (1, 2, 8)]
    assert ddp[0] == ddp[1] == ddp[2] and fsdp[0] == ddp[0]
    assert fsdp[0] > fsdp[1] > fsdp[2]


def test_a_config_without_the_needed_fields_is_a_clear_error():
    with pytest.raises(ValueError, match="hidden_size"):
        shape_of({"model_type": "llama"})
