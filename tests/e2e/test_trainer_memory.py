"""A run that cannot fit its GPUs fails in seconds, before any weight is read, with the estimate in the termination
message (which the TrainingRun controller copies into the run's Succeeded=False condition) and a permanent exit
code (the Job's podFailurePolicy fails it at once, no retry)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perennial.api.exitcodes import PERMANENT_EXIT_CODES
from tinymodel import tiny_model_path
from trainer_support import run_config, write_config, write_fruit_data

LLAMA3_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80,
              "vocab_size": 128256, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def _run(tmp: Path, base: str, monkeypatch, gpu_memory: str) -> tuple[int, dict]:
    from perennial_trainer.cli import main

    monkeypatch.setenv("PERENNIAL_GPU_MEMORY", gpu_memory)  # one GPU of this size (this machine has none)
    data = write_fruit_data(tmp / "data")
    cfg = write_config(tmp / "run.yaml", run_config(name="big", method="SFT", base=base, output=str(tmp / "out"),
                                                    datasets=[{"name": "d", "uri": data["sft"]}], hp={"maxSteps": 1, "batchSize": 4}))
    term = tmp / "termination-log"
    rc = main(["train", "--config", cfg, "--termination-log", str(term)])
    return rc, json.loads(term.read_text())


def test_a_70b_base_on_one_24gb_gpu_fails_fast_with_the_estimate(tmp_path, monkeypatch):
    base = tmp_path / "llama-70b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(LLAMA3_70B))  # no weights at all: they are never read
    rc, term = _run(tmp_path, str(base), monkeypatch, "24Gi")
    print(term["message"])
    assert rc in PERMANENT_EXIT_CODES
    assert term["status"] == "Failed" and term["reason"] == "InsufficientGPUMemory"
    assert term["message"].startswith("the run does not fit its GPUs: estimated ") and "70.55B parameters" in term["message"]
    assert "each GPU has 24.0 GiB" in term["message"] and "sharded with FSDP" in term["message"]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    # What the TrainingRun controller makes of that pod: the Job fails at once (podFailurePolicy FailJob on this
    # exit code), and the run's Succeeded=False condition carries the trainer's reason and the estimate.
    from perennial.controllers import trainingrun as controller
    from perennial.resources.trainingrun import pod_failure_policy

    assert rc in pod_failure_policy()["rules"][0]["onExitCodes"]["values"]
    pod = {"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": rc, "message": json.dumps(term)}}}]}}
    job = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]}}
    reason, message = controller.failure(controller.Observed(job, pod))
    assert reason == "InsufficientGPUMemory" and message == term["message"]


def test_the_tiny_model_fits_and_trains(tmp_path, monkeypatch):
    rc, term = _run(tmp_path, tiny_model_path(), monkeypatch, "24Gi")
    assert rc == 0 and term["status"] == "Succeeded", term


def test_a_bad_gpu_memory_setting_is_a_config_error(tmp_path, monkeypatch):
    rc, term = _run(tmp_path, tiny_model_path(), monkeypatch, "lots")
    assert rc in PERMANENT_EXIT_CODES and term["reason"] == "InvalidConfig" and "PERENNIAL_GPU_MEMORY" in term["message"]


def _cfg(tmp: Path, base: str, lora: dict) -> str:
    data = write_fruit_data(tmp / "data")
    return write_config(tmp / "q.yaml", run_config(name="q", method="SFT", base=base, output=str(tmp / "qout"), lora=lora,
                                                   datasets=[{"name": "d", "uri": data["sft"]}], hp={"maxSteps": 1, "batchSize": 1}))


def test_qlora_estimate_uses_4bit_weights(tmp_path, monkeypatch):
    """70B with `lora.quantization: 4bit` on one 24 GB GPU: ~40 GiB, still too big, and the message says 4-bit."""
    from perennial_trainer.cli import main

    base = tmp_path / "llama-70b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(LLAMA3_70B))
    monkeypatch.setenv("PERENNIAL_GPU_MEMORY", "24Gi")
    from perennial_trainer import train

    # as on a GPU machine with bitsandbytes (this one has neither): the estimate decides
    monkeypatch.setattr(train, "check_quantization", lambda cfg, dev: dict(dev, quantize=True))
    cfg = _cfg(tmp_path, str(base), {"rank": 16, "alpha": 32, "dropout": "0", "quantization": "4bit"})
    rc = main(["train", "--config", cfg, "--termination-log", str(tmp_path / "t")])
    term = json.loads((tmp_path / "t").read_text())
    assert rc in PERMANENT_EXIT_CODES and term["reason"] == "InsufficientGPUMemory", term
    assert "(70.55B parameters, 4-bit)" in term["message"] and "QLoRA" not in term["message"].split("It would fit")[-1]


def test_qlora_on_cpu_is_refused_clearly(tmp_path):
    from perennial_trainer.cli import main

    cfg = _cfg(tmp_path, tiny_model_path(), {"rank": 8, "alpha": 16, "dropout": "0", "quantization": "4bit"})
    rc = main(["train", "--config", cfg, "--termination-log", str(tmp_path / "t")])
    term = json.loads((tmp_path / "t").read_text())
    assert rc in PERMANENT_EXIT_CODES and term["reason"] == "InvalidConfig", term
    assert "lora.quantization" in term["message"] and "GPU" in term["message"]
