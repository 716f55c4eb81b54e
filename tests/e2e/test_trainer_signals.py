"""Never silent: the trainer reports a GRPO run without reward variance and an adapter worse than its parent
(progress lines, metrics.json, the termination message), and `evaluation.failIfWorseThanParent` fails the run
with a permanent exit code. Real runs on the tiny offline model, a few steps each."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perennial.api.exitcodes import PERMANENT_EXIT_CODES, exit_code_for
from perennial_trainer.demo import write_jsonl
from tinymodel import tiny_model_path
from trainer_support import (
    FRUIT_REWARD_SPEC,
    progress_lines,
    run_config,
    write_config,
    write_fruit_data,
)

pytestmark = pytest.mark.slow

#: Every completion gets the same reward: no group ever has variance.
CONSTANT_REWARD = {"graders": [{"name": "always", "type": "Regex", "regex": {"pattern": "^", "mode": "Search"}}]}


def _main(tmp: Path, name: str, cfg: dict, capsys) -> tuple[int, dict, str]:
    from perennial_trainer.cli import main

    path = write_config(tmp / f"{name}.yaml", cfg)
    term = tmp / f"{name}.termination"
    capsys.readouterr()
    rc = main(["--config", path, "--termination-log", str(term)])
    return rc, json.loads(term.read_text()), capsys.readouterr().out


def test_constant_reward_grpo_run_reports_no_reward_variance(tmp_path, capsys):
    data = write_fruit_data(tmp_path / "data")
    out = tmp_path / "out"
    rc, result, stdout = _main(tmp_path, "flat", run_config(
        name="flat", method="GRPO", base=tiny_model_path(), output=str(out),
        datasets=[{"name": "prompts", "uri": data["grpo"]}],
        hp={"maxSteps": 4, "batchSize": 8, "numGenerations": 4, "maxCompletionLength": 4, "learningRate": "1e-4"},
        reward_spec=CONSTANT_REWARD), capsys)
    assert rc == 0, result
    lines = [l for l in progress_lines(stdout) if l["step"] > 0]
    assert [l["fracRewardZeroStd"] for l in lines if l["phase"] == "Training"] == [1.0] * 4
    assert "NoRewardVariance" in lines[-1]["warnings"]  # live, in the progress lines
    assert [w["reason"] for w in result["warnings"]] == ["NoRewardVariance"]
    assert "4 of 4 logged steps" in result["warnings"][0]["message"] and "NoRewardVariance" in result["message"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train/flat_steps_share"] == 1.0 and metrics["train/no_reward_variance"] == 1.0
    assert result["metrics"]["train/no_reward_variance"] == 1.0


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """An SFT adapter that answers in the format (the child's baseline)."""
    from perennial_trainer.cli import main

    tmp = tmp_path_factory.mktemp("signals")
    data = write_fruit_data(tmp / "data")
    cfg = run_config(name="parent", method="SFT", base=tiny_model_path(), output=str(tmp / "parent"),
                     datasets=[{"name": "format", "uri": "file://" + data["sft"]}],
                     hp={"learningRate": "3e-3", "maxSteps": 30, "batchSize": 16, "seed": 42})
    assert main(["--config", write_config(tmp / "parent.yaml", cfg), "--termination-log", str(tmp / "parent.term")]) == 0
    rows = [json.loads(l) for l in Path(data["grpo"]).read_text().splitlines()]
    data["garbage"] = write_jsonl(tmp / "data" / "garbage.jsonl",
                                  [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": "I do not know"}]} for r in rows])
    return tmp, data


def _child(tmp: Path, data: dict, name: str, evaluation: dict) -> dict:
    """SFT from the parent on answers without the format: held-out reward falls below the parent's."""
    return run_config(name=name, method="SFT", base=tiny_model_path(), output=str(tmp / name), parent=str(tmp / "parent"),
                      datasets=[{"name": "garbage", "uri": "file://" + data["garbage"]}, {"name": "heldout", "uri": data["eval"], "split": "Eval"}],
                      hp={"learningRate": "3e-3", "maxSteps": 20, "batchSize": 16, "seed": 42, "maxCompletionLength": 12},
                      reward_spec=FRUIT_REWARD_SPEC, evaluation=evaluation)


def test_adapter_worse_than_its_parent_is_reported(parent, capsys):
    tmp, data = parent
    rc, result, _ = _main(tmp, "worse", _child(tmp, data, "worse", {"enabled": True}), capsys)
    assert rc == 0 and result["status"] == "Succeeded", result
    m = result["metrics"]
    assert m["eval/mean_reward"] < m["eval/baseline_mean_reward"] and m["eval/worse_than_baseline"] == 1.0
    [w] = result["warnings"]
    assert w["reason"] == "WorseThanParent" and f"{m['eval/baseline_mean_reward']:.4g}" in w["message"]
    assert json.loads((tmp / "worse" / "metrics.json").read_text())["eval/worse_than_baseline"] == 1.0


def test_fail_if_worse_than_parent_fails_the_run_permanently(parent, capsys):
    tmp, data = parent
    rc, result, _ = _main(tmp, "refused", _child(tmp, data, "refused", {"enabled": True, "failIfWorseThanParent": True}), capsys)
    assert result["status"] == "Failed" and result["reason"] == "WorseThanParent", result
    assert rc == exit_code_for("WorseThanParent") and rc in PERMANENT_EXIT_CODES
    assert "below its parent adapter's" in result["message"] and "failIfWorseThanParent" in result["message"]
    assert result["metrics"]["eval/worse_than_baseline"] == 1.0  # the numbers reach the run's status
