"""A continuous-learning run's evaluation: the held-out share of its feedback (whole prompts, never trained on) plus
the template's fixed Eval sets, not the Eval sets alone (the promotion gate compares on live data too)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perennial.api import FeedbackRecord, InteractionRecord  # noqa: E402
from perennial_trainer.config import RunConfig  # noqa: E402
from perennial_trainer.train import load_datasets  # noqa: E402
from trainer_support import run_config  # noqa: E402


def test_feedback_keeps_its_held_out_share_next_to_the_eval_sets(tmp_path):
    seg = tmp_path / "store" / "chat" / "2026" / "11" / "29"
    seg.mkdir(parents=True)
    records = []
    for i in range(20):
        records.append(InteractionRecord(id=f"r{i}", messages=[{"role": "user", "content": f"question {i}?"}], response=f"answer {i}"))
        records.append(FeedbackRecord(response_id=f"r{i}", type="thumbs", thumbs="up"))
    (seg / "pod-00000001.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    golden = tmp_path / "golden.jsonl"
    golden.write_text("".join(json.dumps({"prompt": f"golden {i}", "completion": "g"}) + "\n" for i in range(3)))
    datasets = [{"name": "feedback", "feedback": {"deploymentRef": {"name": "chat"}, "storeUri": str(tmp_path / "store"), "minExamples": 1}},
                {"name": "golden", "uri": str(golden), "split": "Eval"}]
    cfg = RunConfig.model_validate(run_config(name="r", method="SFT", base="/m", output=str(tmp_path / "out"), datasets=datasets,
                                              evaluation={"enabled": True, "heldOutPercent": 20}))
    _, train, evals = load_datasets(cfg)
    prompts = lambda rows: {json.dumps(r["prompt"], sort_keys=True) for r in rows}  # noqa: E731
    golden_prompts = {json.dumps(f"golden {i}") for i in range(3)}
    assert golden_prompts <= prompts(evals)  # the fixed set
    held = prompts(evals) - golden_prompts
    assert len(held) == 4 and len(train) == 16  # 20 % of the feedback, held out
    assert not held & prompts(train)  # never trained on
    # without feedback datasets nothing changes: an Eval set alone is the evaluation
    files = [{"name": "train", "uri": str(golden)}, {"name": "golden", "uri": str(golden), "split": "Eval"}]
    cfg = RunConfig.model_validate(run_config(name="r", method="SFT", base="/m", output=str(tmp_path / "out"), datasets=files,
                                              evaluation={"enabled": True, "heldOutPercent": 20}))
    _, train, evals = load_datasets(cfg)
    assert len(train) == 3 and len(evals) == 3


def test_held_out_feedback_carries_the_reference_the_reward_specs_graders_read(tmp_path):
    """A correction (or a thumbs-up answer) is the right answer to its prompt: the held-out rows carry it in the field
    the RewardSpec's reference template reads (`<answer>{{item.answer}}</answer>` -> `answer`), so the gate's held-out
    reward measures correctness, not format only."""
    seg = tmp_path / "store" / "chat" / "2026" / "11" / "29"
    seg.mkdir(parents=True)
    colours = ["red", "green", "blue", "pink", "gold"]
    records = []
    for i in range(20):
        right = colours[i % 5]
        ok = i % 2 == 0
        records.append(InteractionRecord(id=f"r{i}", messages=[{"role": "user", "content": f"colour of fruit {i}?"}],
                                         response=f"<answer>{right if ok else 'grey'}</answer>"))
        records.append(FeedbackRecord(response_id=f"r{i}", type="thumbs", thumbs="up" if ok else "down"))
        if not ok:
            records.append(FeedbackRecord(response_id=f"r{i}", type="correction", correction=f"<answer>{right}</answer>"))
    (seg / "pod-00000001.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    reward_spec = {"graders": [
        {"name": "format", "type": "Regex", "regex": {"pattern": "<answer>[a-z]+</answer>", "mode": "FullMatch"}},
        {"name": "correct", "type": "StringCheck", "stringCheck": {"operation": "Equals", "reference": "<answer>{{item.answer}}</answer>"}}]}
    datasets = [{"name": "feedback", "feedback": {"deploymentRef": {"name": "chat"}, "storeUri": str(tmp_path / "store"), "minExamples": 1}}]
    cfg = RunConfig.model_validate(run_config(name="r", method="SFT", base="/m", output=str(tmp_path / "out"), datasets=datasets,
                                              reward_spec=reward_spec, evaluation={"enabled": True, "heldOutPercent": 25}))
    _, train, evals = load_datasets(cfg)
    assert len(evals) == 5 and len(train) == 15
    for r in evals:
        i = int(r["prompt"][0]["content"].split()[-1].rstrip("?"))
        assert r["answer"] == colours[i % 5], r  # from the correction, or from the approved answer
