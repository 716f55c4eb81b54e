"""Evaluation's generation length: `evaluation.maxCompletionLength` for every method, else the
`hyperparameters.maxCompletionLength` existing manifests set, else 128 (GRPO training keeps its own)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_support import FRUIT_REWARD_SPEC, run_config  # noqa: E402

from perennial_trainer.config import RunConfig  # noqa: E402


def cfg(method: str = "SFT", hp: dict | None = None, evaluation: dict | None = None) -> RunConfig:
    raw = run_config(name="r", method=method, base="/m", output="/out", datasets=[{"name": "d", "uri": "/d.jsonl"}],
                     hp=hp, reward_spec=FRUIT_REWARD_SPEC, evaluation={"enabled": True, **(evaluation or {})})
    return RunConfig.model_validate(raw)


@pytest.mark.parametrize("method,hp,evaluation,expected", [
    ("SFT", {}, {}, 128),
    ("SFT", {"maxCompletionLength": 12}, {}, 12),  # what manifests written before evaluation.maxCompletionLength did
    ("SFT", {"maxCompletionLength": 12}, {"maxCompletionLength": 40}, 40),
    ("DPO", {}, {"maxCompletionLength": 40}, 40),
    ("GRPO", {"maxCompletionLength": 16, "numGenerations": 4}, {}, 16),
    ("GRPO", {"maxCompletionLength": 16, "numGenerations": 4}, {"maxCompletionLength": 64}, 64),
])
def test_evaluate_generates_with_the_evaluation_length(monkeypatch, method, hp, evaluation, expected):
    import peft

    import perennial_trainer.train as train

    class Adapters:  # the PeftModel's adapter switching; generation is recorded below
        def set_adapter(self, name):
            pass

        def load_adapter(self, *a, **k):
            pass

        def disable_adapter(self):
            return contextlib.nullcontext()

    lengths: list[int] = []
    monkeypatch.setattr(train, "load_base", lambda path, dev: (None, None))
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda base, path, adapter_name=None: Adapters())
    monkeypatch.setattr(train, "generate", lambda model, tok, prompts, max_new: lengths.append(max_new) or ["x"] * len(prompts))
    rows = [{"prompt": "colour of a lemon?", "answer": "yellow"}]
    metrics = train.evaluate(cfg(method, hp, evaluation), "/m", "/adapter", None, rows, {})
    assert lengths == [expected, expected] and metrics["eval/samples"] == 1.0


def test_grpo_training_length_is_hyperparameters_only():
    pytest.importorskip("trl")
    import perennial_trainer.train as train

    dev = {"use_cpu": True, "bf16": False, "gradient_checkpointing": False}
    c = cfg("GRPO", {"maxCompletionLength": 16, "numGenerations": 4, "batchSize": 8}, {"maxCompletionLength": 64})
    assert train.trl_config(c, "/tmp/ckpt", dev, 8, [1.0, 1.0]).max_completion_length == 16
