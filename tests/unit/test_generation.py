"""GRPO's generation engine (`perennial_trainer.generation`): vLLM (TRL's colocate or server mode) when the image, the
GPUs and the settings allow, else Transformers' generate; the choice and its reason recorded."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from perennial.memory import GiB, estimate, shape_of
from perennial_trainer import generation as G
from perennial_trainer.errors import TrainerError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA3_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 128256, "intermediate_size": 14336,
             "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072}
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672, "num_attention_heads": 64}
TRL_FIELDS = frozenset(G.TRL_FIELDS | {"vllm_server_host", "vllm_enable_sleep_mode"})
H100 = 80 * GiB


def facts(config=LLAMA3_8B, *, gpus=1, gpu=H100, sharded=False, quantized=False, batch=8, prompt=256, completion=256,
          **kw) -> G.Facts:
    """What a pod with `gpus` GPUs of `gpu` bytes sees, with the training estimate `perennial.memory` makes."""
    shape = shape_of(config)
    train = estimate(shape, lora_rank=16, lora_targets=["all-linear"], batch=batch, seq=prompt + completion, gpus=gpus,
                     sharded=sharded, quantized=quantized).per_gpu
    base = {"cuda": True, "trl_version": "1.16.0", "grpo_fields": TRL_FIELDS, "trl_vllm_specifier": "<=0.31.0,>=0.22.0",
                "vllm_version": "0.30.0", "world_size": gpus, "local_world_size": gpus, "gpu_bytes": gpu, "train_bytes": train,
                "shape": G.model_shape(config), "quantized": quantized, "per_device_batch": batch, "max_prompt_tokens": prompt,
                "max_completion_tokens": completion}
    return G.Facts(**{**base, **kw})


AUTO = G.Request()


# ------------------------------------------------------------------------------------ falling back, and why


def test_cpu_generates_with_transformers_and_says_why():
    c = G.decide(facts(cuda=False, gpu_bytes=None, train_bytes=None), AUTO)
    assert (c.engine, c.mode) == ("transformers", None)
    assert c.kwargs == {"use_vllm": False}
    assert "no CUDA" in c.reason and c.record == {"engine": "transformers", "reason": c.reason}
    assert c.metrics == {"train/generation_vllm": 0.0}


@pytest.mark.parametrize("change, why", [
    ({"vllm_version": None}, "vllm is not installed"),
    ({"vllm_import_error": "ImportError: libcudart.so.12: cannot open shared object file"}, "does not import: ImportError: libcudart"),
    ({"vllm_version": "0.33.0"}, "vllm 0.33.0 is outside the range TRL 1.16.0 supports vllm<=0.31.0,>=0.22.0"),
    ({"vllm_version": "0.21.1"}, "outside the range"),
    ({"grpo_fields": frozenset({"use_vllm", "vllm_mode"})}, "GRPOConfig lacks vllm_gpu_memory_utilization"),
])
def test_what_vllm_needs_missing_falls_back_with_the_reason(change, why):
    c = G.decide(facts(**change), AUTO)
    assert c.engine == "transformers" and why in c.reason, c.reason
    assert c.kwargs.get("use_vllm") is False


@pytest.mark.parametrize("change", [{"cuda": False}, {"vllm_version": None}, {"vllm_import_error": "boom"}])
def test_asking_for_vllm_where_it_cannot_run_fails_the_run_clearly(change):
    with pytest.raises(TrainerError) as e:
        G.decide(facts(**change), G.request_from_env({G.ENGINE_ENV: "vllm"}))
    assert e.value.reason == "InvalidConfig"
    assert str(e.value).startswith("$PERENNIAL_GRPO_GENERATION=vllm asks for vLLM generation, but ")


def test_forced_off_wins_over_everything():
    c = G.decide(facts(), G.request_from_env({G.ENGINE_ENV: "Transformers", G.SERVER_ENV: "http://vllm:8000"}))
    assert c.engine == "transformers" and c.reason == "forced off by $PERENNIAL_GRPO_GENERATION=transformers"


def test_a_version_outside_trls_range_is_used_only_when_asked_for():
    c = G.decide(facts(vllm_version="0.33.0"), G.request_from_env({G.ENGINE_ENV: "vllm"}))
    assert c.engine == "vllm" and "outside the range" in c.reason and "used because it was asked for" in c.reason


def test_a_local_version_suffix_is_inside_the_range():
    assert G.decide(facts(vllm_version="0.31.0+cu129"), AUTO).engine == "vllm"


# ------------------------------------------------------------------------------------ colocate: sized to the GPUs


def test_8b_on_one_80gb_gpu_colocates_with_what_training_leaves():
    f = facts()
    c = G.decide(f, AUTO)
    assert (c.engine, c.mode) == ("vllm", "colocate")
    kw = c.kwargs
    assert kw["use_vllm"] is True and kw["vllm_mode"] == "colocate" and kw["vllm_tensor_parallel_size"] == 1
    assert kw["vllm_max_model_length"] == 512  # the longest prompt + maxCompletionLength
    util = kw["vllm_gpu_memory_utilization"]
    # vLLM gets its bf16 weights (16 GB) and the KV cache of the generation batch, and no more than training leaves
    assert 8.03e9 * 2 / H100 < util * 0.9 and util * H100 + f.train_bytes <= H100
    assert c.metrics == {"train/generation_vllm": 1.0, "train/generation_vllm_server": 0.0,
                         "train/vllm_gpu_memory_utilization": util, "train/vllm_tensor_parallel_size": 1.0}
    assert c.record == {"engine": "vllm", "mode": "colocate", "vllm": "0.30.0", "reason": c.reason}
    assert "tensor parallel 1" in c.reason and "GiB" in c.reason


def test_70b_sharded_over_8_gpus_splits_vllm_over_gpus_of_the_pod():
    """FSDP keeps 1/8 of the 70B weights per GPU; a vLLM engine per GPU would need all 140 GB: tensor parallel."""
    f = facts(LLAMA3_70B, gpus=8, sharded=True)
    c = G.decide(f, AUTO)
    tp = c.kwargs["vllm_tensor_parallel_size"]
    assert c.mode == "colocate" and tp in (2, 4, 8) and 8 % tp == 0
    assert G.vllm_bytes(f, tp, 1) <= c.kwargs["vllm_gpu_memory_utilization"] * H100
    assert c.kwargs["vllm_gpu_memory_utilization"] * H100 + f.train_bytes <= H100
    assert G.vllm_bytes(f, tp // 2, 1) * G.VLLM_MARGIN > H100 - f.train_bytes  # a smaller split would not fit


def test_unmeasured_prompts_size_the_kv_cache_for_the_models_whole_context():
    """Without the prompts' length vLLM takes the model's 128k context: its KV cache for one sequence must fit too,
    which takes a larger share of each GPU than with measured prompts (here: all that training leaves), and no
    vllm_max_model_length is passed."""
    measured = G.decide(facts(LLAMA3_70B, gpus=8, sharded=True), AUTO)
    f = facts(LLAMA3_70B, gpus=8, sharded=True, max_prompt_tokens=None)
    unmeasured = G.decide(f, AUTO)
    assert "vllm_max_model_length" not in unmeasured.kwargs
    tp, util = unmeasured.kwargs["vllm_tensor_parallel_size"], unmeasured.kwargs["vllm_gpu_memory_utilization"]
    assert util > measured.kwargs["vllm_gpu_memory_utilization"] and "fewer sequences at once" in unmeasured.reason
    assert G.vllm_bytes(f, tp, 1) <= util * H100 and util * H100 + f.train_bytes <= H100
    # on a smaller GPU the 128k context needs the widest split
    assert G.decide(facts(LLAMA3_70B, gpus=8, sharded=True, max_prompt_tokens=None, gpu_bytes=72 * GiB), AUTO
                    ).kwargs["vllm_tensor_parallel_size"] == 8


def test_max_model_len_never_exceeds_the_models_context():
    c = G.decide(facts(max_prompt_tokens=200_000), AUTO)
    assert c.kwargs["vllm_max_model_length"] == 131072


def test_a_gpu_training_already_fills_falls_back_with_the_numbers():
    """QLoRA 70B on one 80 GB GPU: training takes ~55 GiB; vLLM's 4-bit copy (~35 GiB) does not fit beside it."""
    c = G.decide(facts(LLAMA3_70B, quantized=True), AUTO)
    assert c.engine == "transformers"
    assert c.reason.startswith("GPU memory: training's estimated 54.7 GiB leaves 25.3 GiB of 80.0 GiB, and vLLM needs at least 39.9 GiB per GPU")
    with pytest.raises(TrainerError, match="asks for vLLM generation, but GPU memory"):
        G.decide(facts(LLAMA3_70B, quantized=True), G.Request(engine="vllm", source="$PERENNIAL_GRPO_GENERATION=vllm"))


def test_qlora_weights_count_at_4_bit_for_vllm():
    full, q = facts(LLAMA3_70B), facts(LLAMA3_70B, quantized=True)
    assert G.vllm_bytes(q, 1, 1) < G.vllm_bytes(full, 1, 1) * 0.3


def test_explicit_settings_are_passed_through():
    c = G.decide(facts(gpus=4), G.request_from_env({G.UTILIZATION_ENV: "0.45", G.TP_ENV: "2"}))
    assert c.kwargs["vllm_gpu_memory_utilization"] == 0.45 and c.kwargs["vllm_tensor_parallel_size"] == 2
    assert "$PERENNIAL_VLLM_GPU_MEMORY_UTILIZATION" in c.reason


@pytest.mark.parametrize("tp, procs", [(3, 4), (2, 1), (8, 4)])
def test_a_tensor_parallel_size_that_does_not_divide_the_pods_processes_is_a_config_error(tp, procs):
    with pytest.raises(TrainerError, match="must divide the trainer processes per pod") as e:
        G.decide(facts(gpus=procs), G.request_from_env({G.TP_ENV: str(tp)}))
    assert e.value.reason == "InvalidConfig"


def test_tensor_parallel_stays_inside_one_pod():
    """2 pods x 2 processes: a split over 4 ranks would cross pods; the widest considered is 2."""
    f = facts(LLAMA3_70B, gpus=4, sharded=True, world_size=4, local_world_size=2)
    assert G._size_colocate(f, AUTO)[0] in (None, 1, 2)


def test_without_a_model_config_trls_default_share_is_used():
    c = G.decide(facts(shape=None), AUTO)
    assert c.kwargs["vllm_gpu_memory_utilization"] == 0.3 and "no memory estimate" in c.reason


# ------------------------------------------------------------------------------------ server mode


def test_a_named_server_selects_server_mode():
    c = G.decide(facts(), G.request_from_env({G.SERVER_ENV: "http://vllm-grpo.team.svc:8000/"}))
    assert (c.engine, c.mode) == ("vllm", "server")
    assert c.kwargs == {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": "http://vllm-grpo.team.svc:8000"}
    assert c.metrics == {"train/generation_vllm": 1.0, "train/generation_vllm_server": 1.0}


@pytest.mark.parametrize("url", ["ftp://vllm:8000", "vllm:8000", "http://user:secret@vllm:8000", "http://vllm:8000/?token=x",
                                 "http://vllm:port", "http://:8000"])
def test_a_bad_server_url_is_a_config_error_that_does_not_echo_credentials(url):
    with pytest.raises(TrainerError) as e:
        G.request_from_env({G.SERVER_ENV: url})
    assert e.value.reason == "InvalidConfig" and "PERENNIAL_VLLM_SERVER_URL" in str(e.value) and "secret" not in str(e.value)


# ------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("env, match", [
    ({G.ENGINE_ENV: "fast"}, "expected one of auto, transformers, vllm"),
    ({G.UTILIZATION_ENV: "1.5"}, "fraction of GPU memory"),
    ({G.UTILIZATION_ENV: "0"}, "fraction of GPU memory"),
    ({G.UTILIZATION_ENV: "lots"}, "fraction of GPU memory"),
    ({G.UTILIZATION_ENV: "nan"}, "fraction of GPU memory"),
    ({G.TP_ENV: "0"}, "whole number"),
    ({G.TP_ENV: "two"}, "whole number"),
])
def test_malformed_settings_are_config_errors(env, match):
    with pytest.raises(TrainerError, match=match) as e:
        G.request_from_env(env)
    assert e.value.reason == "InvalidConfig"


def test_no_settings_is_auto():
    assert G.request_from_env({}) == G.Request(engine="auto", source="default")


# ------------------------------------------------------------------------------------ against the installed TRL


def test_the_kwargs_are_grpoconfig_fields_of_the_installed_trl(tmp_path):
    from trl import GRPOConfig

    version, fields, spec = G.trl_facts()
    assert G.TRL_FIELDS <= fields
    import trl

    assert version == trl.__version__
    for c in (G.decide(facts(grpo_fields=fields, trl_vllm_specifier=spec), AUTO),
              G.decide(facts(grpo_fields=fields, trl_vllm_specifier=spec), G.request_from_env({G.SERVER_ENV: "http://v:8000"})),
              G.decide(facts(cuda=False, grpo_fields=fields), AUTO)):
        args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **c.kwargs)
        for k, v in c.kwargs.items():
            assert getattr(args, k) == v


def test_trls_declared_vllm_range_is_read_from_its_metadata():
    _, _, spec = G.trl_facts()
    assert spec is not None
    assert G._in_range("0.30.0", spec) and not G._in_range("0.99.0", spec) and not G._in_range("0.1.0", spec)


def test_vllm_facts_reads_an_installed_vllm_and_its_import_error(tmp_path, monkeypatch):
    assert G.vllm_facts(try_import=True) == (None, None)  # not in this venv
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise ImportError('undefined symbol: _ZN3c10torch')\n")
    dist = tmp_path / "vllm-0.30.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.30.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    assert G.vllm_facts(try_import=False) == ("0.30.0", None)
    version, error = G.vllm_facts(try_import=True)
    assert version == "0.30.0" and error == "ImportError: undefined symbol: _ZN3c10torch"


def test_choose_on_this_cpu_machine_uses_transformers(tmp_path):
    from perennial_trainer.config import RunConfig
    from perennial_trainer.distributed import World
    from tinymodel import tiny_model_path
    from trainer_support import run_config

    cfg = RunConfig.model_validate(run_config(name="g", method="GRPO", base=tiny_model_path(), output=str(tmp_path / "o"),
                                              datasets=[{"name": "p", "uri": str(tmp_path / "p.jsonl")}],
                                              hp={"batchSize": 8, "numGenerations": 4}))
    dev = {"cuda": False, "bf16": False, "fsdp": False, "quantize": False}
    measured = []
    c = G.choose(cfg, tiny_model_path(), dev, World(), env={}, max_prompt_tokens=lambda: measured.append(1) or 10)
    assert c.engine == "transformers" and "no CUDA" in c.reason and c.kwargs == {"use_vllm": False}
    assert measured == []  # the prompts are tokenized only when colocated vLLM is possible
    with pytest.raises(TrainerError, match="no CUDA"):
        G.choose(cfg, tiny_model_path(), dev, World(), env={G.ENGINE_ENV: "vllm"})


def test_the_record_stays_short():
    c = G.Choice("transformers", None, "x" * 5000)
    assert len(c.record["reason"]) == 300


def test_facts_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        facts().cuda = False  # type: ignore[misc]
