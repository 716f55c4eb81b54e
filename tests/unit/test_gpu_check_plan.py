"""scripts/gpu_check.py's multi-process / QLoRA / vLLM modes: what runs on which machine, what is skipped and why,
and that the failures the CPU rehearsal expects are the trainer's own messages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    return mod


def plan(gc, *a) -> dict[str, dict]:
    return {m["name"]: m for m in gc.mode_plan(*a)}


def test_every_mode_is_planned_on_every_machine(gc):
    for args in [(True, 1, None, None), (True, 8, "x", "y"), (False, 0, "no CUDA", "no CUDA")]:
        assert list(plan(gc, *args)) == list(gc.MODES)


def test_one_gpu_skips_what_needs_two_and_says_why(gc):
    p = plan(gc, True, 1, None, "ModuleNotFoundError: No module named 'vllm'")
    assert p["ddp1"]["nproc"] == 1 and not p["ddp1"].get("skip")
    assert p["ddp"]["skip"] == "skipped: 1 GPU" and p["fsdp"]["skip"] == "skipped: 1 GPU"
    assert not p["qlora"].get("skip") and p["qlora"]["lora"] == {"quantization": "4bit"} and p["qlora"]["outcome"] == "Succeeded"
    assert p["grpo-vllm"]["skip"] == "skipped: vllm not importable (ModuleNotFoundError: No module named 'vllm')"


def test_eight_gpus_run_ddp_and_fsdp2_over_all_of_them(gc):
    p = plan(gc, True, 8, "ModuleNotFoundError: No module named 'bitsandbytes'", None)
    assert (p["ddp"]["nproc"], p["ddp"]["env"], p["ddp"]["fsdp"]) == (8, {"PERENNIAL_FSDP": "0"}, False)
    assert (p["fsdp"]["nproc"], p["fsdp"]["env"], p["fsdp"]["fsdp"]) == (8, {"PERENNIAL_FSDP": "1"}, True)
    assert p["qlora"]["skip"].startswith("skipped: bitsandbytes not importable (ModuleNotFoundError")
    assert not p["grpo-vllm"].get("skip") and p["grpo-vllm"]["env"] == {"PERENNIAL_GRPO_GENERATION": "vllm"}
    assert p["grpo-vllm"]["vllm"] is True


def test_the_cpu_rehearsal_expects_the_trainers_own_refusals(gc, tmp_path):
    """The messages the rehearsal waits for are what the trainer says (a reworded message would make it fail)."""
    p = plan(gc, False, 0, "no CUDA", "no CUDA")
    assert p["ddp"]["nproc"] == 2 and p["fsdp"]["nproc"] == 2 and p["fsdp"]["fsdp"] is False
    from perennial_trainer import generation as G
    from perennial_trainer import train as T
    from perennial_trainer.config import RunConfig
    from perennial_trainer.errors import TrainerError
    from tinymodel import tiny_model_path
    from trainer_support import run_config

    q = p["qlora"]
    cfg = RunConfig.model_validate(run_config(name="q", method="SFT", base=tiny_model_path(), output=str(tmp_path / "o"),
                                              datasets=[{"name": "d", "uri": str(tmp_path / "d.jsonl")}], lora=q["lora"]))
    with pytest.raises(TrainerError) as e:
        T.check_quantization(cfg, {"cuda": False})
    assert (q["outcome"], q["reason"]) == ("Failed", e.value.reason) and q["message_has"] in str(e.value)

    v = p["grpo-vllm"]
    facts = G.Facts(cuda=False, trl_version="1.16.0", grpo_fields=G.TRL_FIELDS)
    with pytest.raises(TrainerError) as e:
        G.decide(facts, G.request_from_env(v["env"]))
    assert (v["outcome"], v["reason"]) == ("Failed", e.value.reason) and v["message_has"] in str(e.value)
    assert "FSDP needs GPUs" in (REPO / "trainer_image" / "perennial_trainer" / "train.py").read_text()
    assert p["fsdp"]["log_has"] == "FSDP needs GPUs"


def test_importable_names_the_error(gc):
    assert gc._importable("json") is None
    assert gc._importable("no_such_module_here").startswith("ModuleNotFoundError: No module named")
