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
