"""The continuous-learning loop's decisions, table-tested without any server: the policy (when to snapshot and train),
the TrainingRun it builds, the promotion gate, and the automatic rollback's test of "worse with little data"."""

from __future__ import annotations

import datetime as _dt
import math

import pytest

from perennial.api.deployment import ContinuousLearning, DeploymentSpec, PromotionGate
from perennial.api.trainingrun import TrainingRunSpec
from perennial.controllers import learning as ln
from perennial.controllers.manager import status_patch
from perennial.resources import conditions as cond

T0 = _dt.datetime(2026, 11, 29, 12, 0, 0, tzinfo=_dt.timezone.utc)
CREATED = T0 - _dt.timedelta(days=1)
TICK = 30.0


def spec(**kw) -> ContinuousLearning:
    return ContinuousLearning.model_validate({"enabled": True, "adapterFamily": "fam", "minNewRecords": 100, "minIntervalSeconds": 600, **kw})


def observed(cl: ContinuousLearning | None = None, *, new: int = 0, oldest: _dt.datetime | None = None, last: int | None = None,
             runs: list[ln.RunInfo] | None = None, now: _dt.datetime = T0, error: str | None = None, recorded: str | None = None,
             conditions: list | None = None) -> ln.Observed:
    fb = None if error else ln.FeedbackView(new_records=new, oldest_new=oldest, last_snapshot=ln.Snapshot(last, f"snap-{last}") if last else None)
    return ln.Observed(name="chat", namespace="default", generation=3, spec=cl if cl is not None else spec(), created=CREATED, now=now,
                       conditions=conditions, feedback=fb, store_error=error, runs=runs or [], recorded_run=recorded)


def run(seq: int, *, ago: float = 3600, finished: bool = True) -> ln.RunInfo:
    return ln.RunInfo(ln.run_name("chat", seq), seq, T0 - _dt.timedelta(seconds=ago), finished)


def learning_cond(d: ln.Decision) -> dict:
    return cond.get(d.status["conditions"], "Learning") or {}


# ----------------------------------------------------------------------------- the policy

POLICY = [
    # (case, observed, snapshot written, run created, trigger, Learning reason)
    ("below the count: collecting", observed(new=99), None, None, None, "Collecting"),
    ("the count reached: snapshot 1 and its run", observed(new=100), 1, 1, "MinNewRecords", "TrainingRunCreated"),
    ("the next snapshot follows the last one", observed(new=150, last=4, runs=[run(4)]), 5, 5, "MinNewRecords", "TrainingRunCreated"),
    ("a snapshot without its run (a stop in between): its run first, no new snapshot",
     observed(new=500, last=4, runs=[run(3)]), None, 4, "Resumed", "TrainingRunCreated"),
    ("a snapshot without its run is resumed even below the count", observed(new=0, last=2, runs=[run(1)]), None, 2, "Resumed", "TrainingRunCreated"),
    ("a snapshot whose run was recorded (the run deleted since) is not trained again",
     observed(new=0, last=2, recorded=ln.run_name("chat", 2)), None, None, None, "Collecting"),
    ("the oldest record too old: MaxAge", observed(spec(maxAgeSeconds=3600), new=1, oldest=T0 - _dt.timedelta(seconds=3601)), 1, 1, "MaxAge", "TrainingRunCreated"),
    ("MaxAge not yet", observed(spec(maxAgeSeconds=3600), new=1, oldest=T0 - _dt.timedelta(seconds=10)), None, None, None, "Collecting"),
    ("MaxAge needs a record", observed(spec(maxAgeSeconds=3600), new=0, oldest=None), None, None, None, "Collecting"),
    ("schedule due since the last run, with records", observed(spec(schedule="0 * * * *"), new=1, last=1, runs=[run(1, ago=3700)]), 2, 2, "Schedule", "TrainingRunCreated"),
    ("schedule due but nothing new", observed(spec(schedule="0 * * * *"), new=0, last=1, runs=[run(1, ago=3700)]), None, None, None, "Collecting"),
    ("schedule not due since the last run", observed(spec(schedule="0 0 * * *"), new=5, last=1, runs=[run(1, ago=3700)]), None, None, None, "Collecting"),
    ("a cron macro", observed(spec(schedule="@hourly"), new=1, last=1, runs=[run(1, ago=3700)]), 2, 2, "Schedule", "TrainingRunCreated"),
    ("min interval holds the count back", observed(new=1000, last=1, runs=[run(1, ago=60)]), None, None, None, "MinIntervalNotElapsed"),
    ("max concurrent runs holds it back", observed(spec(minIntervalSeconds=0), new=1000, last=1, runs=[run(1, ago=60, finished=False)]), None, None, None, "WaitingForRun"),
    ("two slots: a second run while one is in flight",
     observed(spec(minIntervalSeconds=0, maxConcurrentRuns=2), new=1000, last=1, runs=[run(1, ago=60, finished=False)]), 2, 2, "MinNewRecords", "TrainingRunCreated"),
    ("store unreachable: nothing, a False condition", observed(new=1000, error="ConnectionError: refused"), None, None, None, "StoreUnreachable"),
    ("an invalid schedule", observed(spec(schedule="61 * * * *"), new=5), None, None, None, "InvalidSchedule"),
]


@pytest.mark.parametrize("case,o,snap,create,trigger,reason", POLICY, ids=[p[0] for p in POLICY])
def test_policy(case, o, snap, create, trigger, reason):
    d = ln.decide_learning(o, tick_seconds=TICK)
    assert (d.snapshot, d.create_run, d.trigger) == (snap, create, trigger)
    assert learning_cond(d)["reason"] == reason
    assert learning_cond(d)["status"] == ("False" if reason in ("StoreUnreachable", "InvalidSchedule") else "True")
    assert d.requeue_after is not None and 0 < d.requeue_after <= TICK  # enabled: time is a trigger (the store cannot be watched)


def test_disabled_does_nothing_and_is_not_timed():
    before = cond.set_condition(cond.set_condition(None, "Ready", True, "Serving", "", 3), "Learning", True, "Collecting", "", 3)
    for cl in (spec(enabled=False), None):
        o = observed(cl, new=10**6, last=4, runs=[run(3)], conditions=before)
        o.spec = cl
        d = ln.decide_learning(o, tick_seconds=TICK)
        assert (d.snapshot, d.create_run, d.requeue_after) == (None, None, None)
        assert [c["type"] for c in d.status["conditions"]] == ["Ready"]  # the loop's condition goes, the others stay
        assert "newFeedbackRecords" not in d.status


def test_status_fields_from_the_runs():
    d = ln.decide_learning(observed(new=7, last=2, runs=[run(1, ago=7200), run(2, ago=3600)]), tick_seconds=TICK)
    assert d.status["newFeedbackRecords"] == 7
    assert d.status["lastTrainingRun"] == "chat-learn-2"
    assert d.status["lastTrainingTime"] == "2026-11-29T11:00:00Z"


def test_waits_are_timed_to_the_trigger():
    # MaxAge fires in 100 s: looked at again then, not a whole tick later
    d = ln.decide_learning(observed(spec(maxAgeSeconds=3600), new=1, oldest=T0 - _dt.timedelta(seconds=3500)), tick_seconds=300)
    assert d.requeue_after == pytest.approx(100)
    d = ln.decide_learning(observed(new=1000, last=1, runs=[run(1, ago=590)]), tick_seconds=300)
    assert d.requeue_after == pytest.approx(10)


def test_unchanged_status_is_no_write():
    o = observed(new=5, last=1, runs=[run(1)])
    first = ln.decide_learning(o, tick_seconds=TICK)
    o.conditions = first.status["conditions"]
    again = ln.decide_learning(o, tick_seconds=TICK)
    assert status_patch(first.status, again.status) is None


def test_run_names_are_deterministic_and_valid():
    assert ln.run_name("chat", 7) == ln.run_name("chat", 7) == "chat-learn-7"
    long = ln.run_name("d" * 63, 12345678)
    assert len(long) <= 63 and long.endswith("-learn-12345678")
    assert ln._seq_of(ln.run_name("chat", 9), "chat") == 9
    assert ln._seq_of("other-learn-9", "chat") is None


def test_next_cron():
    assert ln.next_cron("*/15 * * * *", T0) == T0 + _dt.timedelta(minutes=15)
    assert ln.next_cron("@daily", T0) == _dt.datetime(2026, 11, 30, tzinfo=_dt.timezone.utc)
    with pytest.raises(ValueError, match="not a valid cron"):
        ln.next_cron("99 * * * *", T0)


# ----------------------------------------------------------------------------- the TrainingRun

DEPLOYMENT = {
    "apiVersion": "perennial.ai/v1alpha1", "kind": "Deployment",
    "metadata": {"name": "chat", "namespace": "team", "uid": "dep-uid", "generation": 1},
    "spec": {"baseModelRef": {"name": "base"}, "adapters": [{"name": "chat", "track": {"family": "fam"}}],
             "feedback": {"storeUri": "file:///fb"},
             "continuousLearning": {"enabled": True, "adapterFamily": "fam", "template": {
                 "method": "GRPO", "rewardSpecRef": {"name": "rubric"}, "hyperparameters": {"numGenerations": 4, "batchSize": 8},
                 "evaluation": {"heldOutPercent": 20}, "resources": {"gpus": 0}}}},
}


def adapter(name: str, family: str = "fam", *, status: dict | None = None, parent: str | None = None, run: str = "chat-learn-1") -> dict:
    lineage = {"trainingRunRef": {"name": run}}
    if parent:
        lineage["parentAdapterRef"] = {"name": parent}
    return {"metadata": {"name": name, "namespace": "team", "generation": 1, "resourceVersion": "1"},
            "spec": {"family": family, "version": 1, "lineage": lineage}, "status": status or {}}


def test_training_run_from_the_template():
    dspec = DeploymentSpec.model_validate(DEPLOYMENT["spec"])
    served = [{"name": "chat", "adapter": "fam-v3"}, {"name": "other", "adapter": "x-v1"}]
    parent = ln.served_parent("fam", served, {"fam-v3": adapter("fam-v3"), "x-v1": adapter("x-v1", "x")})
    assert parent == "fam-v3"
    body = ln.training_run(DEPLOYMENT, dspec, ln.Snapshot(4, "snapshots/chat-00000004.json", ("a.jsonl", "b.jsonl"), 120),
                           parent=parent, store_uri="file:///fb", trigger="MinNewRecords")
    TrainingRunSpec.model_validate(body["spec"])  # a valid run
    meta = body["metadata"]
    assert meta["name"] == "chat-learn-4" and meta["namespace"] == "team"
    assert meta["labels"][ln.DEPLOYMENT_LABEL] == "chat" and meta["labels"][ln.SNAPSHOT_SEQ_LABEL] == "4"
    assert meta["ownerReferences"] == [{"apiVersion": "perennial.ai/v1alpha1", "kind": "Deployment", "name": "chat", "uid": "dep-uid",
                                        "controller": False, "blockOwnerDeletion": True}]
    s = body["spec"]
    assert s["parentAdapterRef"] == {"name": "fam-v3"} and s["output"] == {"adapterFamily": "fam"}
    assert s["method"] == "GRPO" and s["rewardSpecRef"] == {"name": "rubric"} and s["baseModelRef"] == {"name": "base"}
    assert s["datasets"][0]["feedback"]["deploymentRef"] == {"name": "chat"}
    assert s["datasets"][0]["feedback"]["snapshot"] == "snapshots/chat-00000004.json"  # the document: exactly its verified ranges
    assert "segments" not in s["datasets"][0]["feedback"]
    assert s["evaluation"]["heldOutPercent"] == 20  # held out from the same feedback
    # continueFromServed off, or nothing of the family served: from the base model
    dspec.continuous_learning.template.continue_from_served = False
    assert "parentAdapterRef" not in ln.training_run(DEPLOYMENT, dspec, ln.Snapshot(5), parent="fam-v3", store_uri=None, trigger="x")["spec"]
    assert ln.served_parent("fam", [{"name": "other", "adapter": "x-v1"}], {"x-v1": adapter("x-v1", "x")}) is None


# ----------------------------------------------------------------------------- the promotion gate


def evaluated(mean: str | None, improvement: str | None, baseline: str | None = None, samples: str = "40") -> dict:
    status: dict = {"conditions": cond.set_condition(None, "Ready", True, "Available", "", 1)}
    if mean is not None:
        status["meanReward"] = mean
        status["metrics"] = [{"name": "eval/mean_reward", "value": mean}, {"name": "eval/samples", "value": samples}]
        if baseline is not None:
            status["metrics"].append({"name": "eval/baseline_mean_reward", "value": baseline})
    if improvement is not None:
        status["improvement"] = improvement
    return status


GATE = [
    ("better than its parent", evaluated("0.8", "0.1", "0.7"), {}, True, "GatePassed"),
    ("no better", evaluated("0.7", "0", "0.7"), {"minImprovement": "0.01"}, False, "BelowMinImprovement"),
    ("worse", evaluated("0.6", "-0.1"), {}, False, "BelowMinImprovement"),
    ("equal passes a zero minImprovement", evaluated("0.7", "0"), {}, True, "GatePassed"),
    ("better but below the floor", evaluated("0.4", "0.2"), {"minMeanReward": "0.5"}, False, "BelowMinMeanReward"),
    ("at the floor", evaluated("0.5", "0.2"), {"minMeanReward": "0.5"}, True, "GatePassed"),
    ("no evaluation, required", evaluated(None, None), {}, False, "NoEvaluation"),
    ("no evaluation, not required", evaluated(None, None), {"requireEvaluation": False}, True, "PromotedWithoutEvaluation"),
    ("an unreadable number is no evaluation", {"meanReward": "NaN", "improvement": "x"}, {}, False, "NoEvaluation"),
]


@pytest.mark.parametrize("case,status,g,promoted,reason", GATE, ids=[g[0] for g in GATE])
def test_gate(case, status, g, promoted, reason):
    r = ln.gate(adapter("fam-v2", status=status, parent="fam-v1"), PromotionGate.model_validate(g), served="fam-v1")
    assert (r.promoted, r.reason) == (promoted, reason)


def test_gate_message_has_the_numbers():
    r = ln.gate(adapter("fam-v2", status=evaluated("0.8", "0.1", "0.7"), parent="fam-v1"), PromotionGate(min_improvement="0.05"), served="fam-v1")
    assert "0.8 vs 0.7 of parent fam-v1 on 40 held-out examples" in r.message
    assert "improvement 0.1 (minImprovement 0.05" in r.message


def test_gate_agrees_with_what_the_deployment_reads():
    """The Deployment's `track` (controllers/deployment.py `passes_gate`) and the Adapter's `Promoted` condition
    never disagree on the numbers."""
    from perennial.controllers.deployment import passes_gate

    for _case, status, g, _promoted, _reason in GATE:
        a = adapter("fam-v2", status=status)
        gate = PromotionGate.model_validate(g)
        assert ln.gate(a, gate, served=None).promoted == passes_gate(a, gate), _case


# ----------------------------------------------------------------------------- worse with little data


def test_fisher_exact_matches_the_textbook():
    # Fisher's tea-tasting table [[3, 1], [1, 3]]: one-sided p = 17/70
    assert ln.fisher_less(1, 4, 3, 4) == pytest.approx(17 / 70)
    # the tail sums to 1 at the top and is the point probability at the bottom
    assert ln.fisher_less(4, 4, 4, 8) == pytest.approx(1.0)
    assert ln.fisher_less(0, 10, 10, 10) == pytest.approx(1 / math.comb(20, 10))


def test_fisher_tail_equals_the_exact_sum():
    """The log-space tail against the hypergeometric sum in exact integers, on every table up to 12 x 12."""
    for n in range(1, 13):
        for m in range(1, 13):
            for a in range(n + 1):
                for b in range(m + 1):
                    ups, total = a + b, n + m
                    lo = max(0, n - (total - ups))
                    exact = sum(math.comb(ups, k) * math.comb(total - ups, n - k) for k in range(lo, a + 1)) / math.comb(total, n)
                    assert ln.fisher_less(a, n, b, m) == pytest.approx(exact, rel=1e-9, abs=1e-12), (a, n, b, m)


WORSE = [
    ("too few samples, however bad", ln.Approval(0, 10), ln.Approval(10, 10), False, "TooFewSamples"),
    ("a clear drop with enough samples", ln.Approval(12, 40), ln.Approval(32, 40), True, "LiveApprovalDropped"),
    ("a small drop that chance explains", ln.Approval(27, 40), ln.Approval(30, 40), False, "NotSignificant"),
    ("better is never worse", ln.Approval(38, 40), ln.Approval(20, 40), False, "NotWorse"),
    ("significant but trivial with huge samples", ln.Approval(79000, 100000), ln.Approval(80000, 100000), False, "NotWorse"),
    ("a large sample, a real drop", ln.Approval(700, 1000), ln.Approval(800, 1000), True, "LiveApprovalDropped"),
]


@pytest.mark.parametrize("case,new,old,is_worse,reason", WORSE, ids=[w[0] for w in WORSE])
def test_worse(case, new, old, is_worse, reason):
    v = ln.worse(new, old)
    assert (v.worse, v.reason) == (is_worse, reason)


# ----------------------------------------------------------------------------- Promoted on the Adapters


def versioned(a: dict, version: int) -> dict:
    a["spec"]["version"] = version
    return a


def test_adapters_are_gated_once_and_rolled_back_for_good():
    g = PromotionGate()
    v1 = versioned(adapter("fam-v1", status=evaluated("0.7", "0.1"), run="manual"), 1)  # not the loop's: no Promoted, a track serves it
    good = versioned(adapter("fam-v2", status=evaluated("0.8", "0.1", "0.7"), parent="fam-v1"), 2)
    bad = versioned(adapter("fam-v3", status=evaluated("0.5", "-0.2", "0.7"), parent="fam-v1", run="chat-learn-2"), 3)
    not_ready = versioned(adapter("fam-v4", status={}, run="chat-learn-3"), 4)
    family = [v1, good, bad, not_ready]
    acts = ln.decide_adapters("chat", g, [good, bad, not_ready], family, approval={})
    assert {a.adapter["metadata"]["name"]: (cond.get(a.conditions, "Promoted")["status"], a.note.reason) for a in acts} == {
        "fam-v2": ("True", "AdapterPromoted"), "fam-v3": ("False", "AdapterNotPromoted")}
    assert any(c["type"] == "Ready" for c in acts[0].conditions)  # the Adapter controller's conditions kept
    # written: nothing more to do
    good["status"]["conditions"] = acts[0].conditions
    bad["status"]["conditions"] = acts[1].conditions
    assert ln.decide_adapters("chat", g, [good, bad], family, approval={}) == []
    assert ln.fallback_of(bad, family) is good  # v3 not promoted: a track serves v2, and without v2, v1
    # too few thumbs: not yet
    assert ln.decide_adapters("chat", g, [good], family, approval={"fam-v2": ln.Approval(0, 20), "fam-v1": ln.Approval(20, 20)}) == []
    # live approval of the new adapter drops against the one a track falls back to: rolled back, with the numbers
    approval = {"fam-v2": ln.Approval(10, 40), "fam-v1": ln.Approval(30, 40)}
    acts = ln.decide_adapters("chat", g, [good], family, approval=approval)
    promoted = cond.get(acts[0].conditions, "Promoted")
    assert (promoted["status"], promoted["reason"], acts[0].note.reason, acts[0].note.warning) == ("False", "RolledBack", "AdapterRolledBack", True)
    assert "10/40" in promoted["message"] and "30/40" in promoted["message"] and "falls back to fam-v1" in promoted["message"]
    # it sticks: better numbers later do not promote it again
    good["status"]["conditions"] = acts[0].conditions
    assert ln.decide_adapters("chat", g, [good], family, approval={"fam-v2": ln.Approval(40, 40), "fam-v1": ln.Approval(0, 40)}) == []
    # the first adapter of a family has nothing to fall back to: never rolled back
    first = versioned(adapter("fam-v1", status=evaluated("0.9", "0.1", "0.8")), 1)
    acts = ln.decide_adapters("chat", g, [first], [first], approval={"fam-v1": ln.Approval(0, 400)})
    assert cond.get(acts[0].conditions, "Promoted")["status"] == "True"


def test_a_changed_gate_decides_again():
    a = adapter("fam-v2", status=evaluated("0.8", "0.1", "0.7"))
    first = ln.decide_adapters("chat", PromotionGate(), [a], [a], approval={})
    a["status"]["conditions"] = first[0].conditions
    stricter = ln.decide_adapters("chat", PromotionGate(min_improvement="0.2"), [a], [a], approval={})
    assert cond.get(stricter[0].conditions, "Promoted")["status"] == "False"


def test_every_reason_the_loop_writes_is_documented_for_kubectl_explain():
    import re
    from pathlib import Path

    from perennial.api.adapter import AdapterStatus
    from perennial.api.deployment import DeploymentStatus

    source = Path(ln.__file__).read_text()
    learning = set(re.findall(r'done\("(?:True|False)", "(\w+)"', source)) | set(re.findall(r'CONDITION_LEARNING, False, "(\w+)"', source))
    promoted = set(re.findall(r'GateResult\((?:True|False), "(\w+)"', source)) | {"RolledBack"}
    assert {"Collecting", "StoreUnreachable", "SnapshotFailed"} <= learning and {"GatePassed", "NoEvaluation"} <= promoted
    doc = DeploymentStatus.model_fields["conditions"].description
    assert {r for r in learning if f"`{r}`" not in doc} == set()
    doc = AdapterStatus.model_fields["conditions"].description
    assert {r for r in promoted if f"`{r}`" not in doc} == set()


def test_an_adapter_whose_runs_results_have_not_reached_it_yet_gets_no_verdict():
    """The TrainingRun controller makes the Adapter before it writes the run's status: a Ready Adapter without any
    metrics yet is not judged (it was marked not promoted, NoEvaluation, with a Warning, then promoted a moment later)."""
    g = PromotionGate()
    fresh = adapter("fam-v2", status={"conditions": cond.set_condition(None, "Ready", True, "Available", "", 1)}, parent="fam-v1")
    assert ln.decide_adapters("chat", g, [fresh], [fresh], approval={}) == []
    # the run's results arrived without an evaluation: now it is judged (and not promoted)
    fresh["status"]["metrics"] = [{"name": "train/loss", "value": "0.5"}]
    (act,) = ln.decide_adapters("chat", g, [fresh], [fresh], approval={})
    assert cond.get(act.conditions, "Promoted")["reason"] == "NoEvaluation"
