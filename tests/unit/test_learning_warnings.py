"""Never silent, table-tested: what the trainer reports (no reward variance, a collapsed reward, an adapter worse
than its parent) becomes conditions, Warning Events and the `Warnings` column on TrainingRun and Adapter."""

from __future__ import annotations

import json

from perennial.api.adapter import AdapterResource
from perennial.api.trainingrun import TrainingRunResource
from perennial.controllers import adapter as ad
from perennial.controllers import trainingrun as tr
from perennial.controllers.base import condition_notes
from perennial.resources import conditions as cond
from perennial_trainer.signals import eval_signals, train_signals
from test_decide import (
    BASE,
    _job,
    _pod,
    decide_run,
    obj,
    ready,
    reason,
    run_spec,
    started,
)

WORSE = {"eval/mean_reward": 1.5, "eval/baseline_mean_reward": 1.708, "eval/improvement": -0.208, "eval/samples": 24.0}


def _done(result: dict, status: dict | None = None) -> tr.Decision:
    world = tr.World(job=_job([{"type": "Complete", "status": "True"}]), pod=_pod("Succeeded", {"exitCode": 0, "message": json.dumps(result)}))
    return decide_run(started(status), world)


def _line(step: int, **kw) -> str:
    return tr.PROGRESS_PREFIX + json.dumps({"step": step, "totalSteps": 10, "loss": 0.5, **kw}) + "\n"


def test_trainer_verdicts_from_its_history():
    flat = [{"step": i, "reward": 1.0, "frac_reward_zero_std": 1.0 if i != 3 else 0.5} for i in range(1, 9)]
    m, w = train_signals(flat)
    assert [x["reason"] for x in w] == ["NoRewardVariance"] and m["train/flat_steps_share"] == 7 / 8
    assert train_signals(flat[:2], live=True)[1] == []  # live: a couple of flat steps are no verdict yet
    converged = [{"step": i, "reward": 2.0, "frac_reward_zero_std": 0.2 if i < 6 else 1.0} for i in range(1, 9)]
    assert train_signals(converged)[1] == []  # flat only at the end (all right): not a run without signal
    falling = [{"step": i, "reward": r, "frac_reward_zero_std": 0.3} for i, r in enumerate([1.2, 1.3, 1.1, 0.9, 0.7, 0.5, 0.4, 0.3], 1)]
    m, w = train_signals(falling)
    assert [x["reason"] for x in w] == ["RewardCollapsed"] and m["train/early_mean_reward"] == 1.25 and m["train/late_mean_reward"] == 0.35
    noisy = [{"step": i, "reward": r, "frac_reward_zero_std": 0.3} for i, r in enumerate([1.2, 1.3, 1.1, 1.0, 1.3, 1.2, 1.1, 1.15], 1)]
    assert train_signals(noisy)[1] == []
    worse = dict(WORSE)
    [x] = eval_signals(worse, has_parent=True)
    assert x["reason"] == "WorseThanParent" and "1.5 is below its parent adapter's 1.708 (-0.208) on 24 prompts" in x["message"]
    assert eval_signals(dict(WORSE), has_parent=False)[0]["reason"] == "WorseThanBase"
    assert eval_signals({"eval/mean_reward": 1.7, "eval/baseline_mean_reward": 1.7}, has_parent=True) == []


def test_finished_run_reports_every_warning_with_events_and_a_column():
    result = {"status": "Succeeded", "metrics": {**WORSE, "train/frac_reward_zero_std_mean": 0.3},
              "warnings": [{"reason": "RewardCollapsed", "message": "the training reward fell from 1.2 to 0.3"}]}
    d = _done(result, {"parentAdapterRef": {"name": "fruit-v1"}})
    assert reason(d, "Succeeded") == ("True", "AdapterCreated")
    assert reason(d, "LearningSignal") == ("False", "RewardCollapsed")
    assert cond.get(d.status["conditions"], "LearningSignal")["message"] == "the training reward fell from 1.2 to 0.3"
    assert reason(d, "Improved") == ("False", "WorseThanParent")
    assert "1.5 vs its parent's 1.708 (-0.208) on 24 prompts" in cond.get(d.status["conditions"], "Improved")["message"]
    assert d.status["warnings"] == "RewardCollapsed,WorseThanParent"
    notes = {n.reason: n.warning for n in condition_notes(started()["status"]["conditions"], d.status["conditions"], tr.event_for)}
    assert notes["RewardCollapsed"] is True and notes["WorseThanParent"] is True
    # the trainer's verdict wins over the operator's fallback (the mean share of flat groups)
    flat = _done({"status": "Succeeded", "metrics": {"train/frac_reward_zero_std_mean": 0.9},
                  "warnings": [{"reason": "NoRewardVariance", "message": "in 9 of 10 logged steps ..."}]})
    assert reason(flat, "LearningSignal") == ("False", "NoRewardVariance") and flat.status["warnings"] == "NoRewardVariance"
    assert cond.get(flat.status["conditions"], "Improved") is None  # no evaluation: nothing to say
    better = _done({"status": "Succeeded", "metrics": {"eval/mean_reward": 1.9, "eval/baseline_mean_reward": 1.5, "eval/improvement": 0.4,
                                                       "train/frac_reward_zero_std_mean": 0.2}, "warnings": []})
    assert reason(better, "Improved") == ("True", "NotWorseThanBase") and reason(better, "LearningSignal") == ("True", "RewardVaries")
    assert "warnings" not in better.status
    # an unknown reason from the pod is not made a condition
    odd = _done({"status": "Succeeded", "metrics": {}, "warnings": [{"reason": "Whatever", "message": "x"}]})
    assert all(c.get("reason") != "Whatever" for c in odd.status["conditions"]) and "warnings" not in odd.status


def test_live_collapse_while_training():
    d = decide_run(started(), tr.World(job=_job(active=1), pod=_pod("Running"), log=_line(9, fracRewardZeroStd=0.25, warnings=["RewardCollapsed"])))
    assert reason(d, "LearningSignal") == ("False", "RewardCollapsed") and d.status["warnings"] == "RewardCollapsed"


def test_refused_run_keeps_the_numbers():
    failed = {"status": "Failed", "reason": "WorseThanParent", "message": "held-out mean reward 1.5 is below its parent adapter's 1.708",
              "metrics": WORSE}
    world = tr.World(job=_job([{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]), pod=_pod("Failed", {"exitCode": 14, "message": json.dumps(failed)}))
    d = decide_run(started({"parentAdapterRef": {"name": "fruit-v1"}}), world)
    assert reason(d, "Succeeded") == ("False", "WorseThanParent")
    assert reason(d, "Improved") == ("False", "WorseThanParent") and {m["name"] for m in d.status["metrics"]} >= {"eval/mean_reward"}
    assert d.status["warnings"] == "WorseThanParent"


def test_adapter_worse_than_its_parent():
    spec = {"baseModelRef": {"name": "base"}, "family": "fam", "version": 2, "artifactUri": "file:///a", "lora": {"rank": 8},
            "lineage": {"trainingRunRef": {"name": "r"}, "trainingRunUid": "uid-r", "parentAdapterRef": {"name": "fam-v1"}}}
    run = obj("TrainingRun", "r", run_spec(), {"metrics": [{"name": k, "value": f"{v:.4g}"} for k, v in WORSE.items()]}, uid="uid-r")
    parent = obj("Adapter", "fam-v1", {**spec, "version": 1, "lineage": {}})
    st = ad.decide(obj("Adapter", "fam-v2", spec), ad.World(artifact=True, base=ready("BaseModel", "base", BASE), parent=parent, run=run))
    c = cond.get(st["conditions"], "Improved")
    assert (c["status"], c["reason"]) == ("False", "WorseThanParent") and "1.5 vs its parent's 1.708" in c["message"]
    assert cond.get(st["conditions"], "Ready")["status"] == "True"  # still a usable record
    assert st["warnings"] == "WorseThanParent"
    assert [n.reason for n in condition_notes(None, st["conditions"]) if n.warning] == ["WorseThanParent"]
    kept = ad.decide(obj("Adapter", "fam-v2", spec, st), ad.World(artifact=True, base=ready("BaseModel", "base", BASE), parent=parent, run=None))
    assert cond.get(kept["conditions"], "Improved")["reason"] == "WorseThanParent"  # outlives its run


def test_warnings_column_is_in_the_default_table():
    for res in (TrainingRunResource, AdapterResource):
        col = {c.name: c for c in res.printer_columns}["Warnings"]
        assert col.json_path == ".status.warnings" and not col.priority  # shown by plain `kubectl get`
