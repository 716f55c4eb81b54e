"""`perennial dev --demo`'s loop story: the lines it prints from the objects, the threshold from the users' ratings."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from perennial.devloop import (
    LoopStory,
    Round,
    describe_gate,
    describe_run_created,
    describe_run_finished,
    rating_records_after,
)
from perennial.simusers import Answer

API = "perennial.ai/v1alpha1"


def run(name: str, phase: str | None = None, adapter: str | None = None, parent: str | None = "fruit-v2") -> dict[str, Any]:
    status: dict[str, Any] = {}
    if phase:
        status = {"phase": phase, "conditions": [{"type": "Succeeded", "status": "True" if phase == "Succeeded" else "False",
                                                  "reason": "Done" if phase == "Succeeded" else "TooLittleData", "message": "3 examples"}]}
        if adapter:
            status["adapterRef"] = {"name": adapter}
    return {"metadata": {"name": name, "creationTimestamp": "2026-11-29T23:00:10Z",
                         "labels": {"perennial.ai/deployment": "fruit-chat", "perennial.ai/feedback-snapshot": "1"},
                         "annotations": {"perennial.ai/learning-trigger": "MinNewRecords"}},
            "spec": {"method": "SFT", **({"parentAdapterRef": {"name": parent}} if parent else {})}, "status": status}


def test_run_lines_name_the_snapshot_trigger_parent_and_outcome():
    line = describe_run_created(run("fruit-chat-learn-1"), 41.6)
    assert "fruit-chat-learn-1 created by the operator (42 s after the threshold)" in line
    assert "snapshot 1 (trigger MinNewRecords), continuing fruit-v2" in line
    assert "continuing the base model" in describe_run_created(run("x", parent=None), None)
    assert describe_run_finished(run("fruit-chat-learn-1", "Succeeded", "fruit-v3")).endswith("Succeeded -> Adapter fruit-v3")
    assert "Failed: TooLittleData: 3 examples" in describe_run_finished(run("fruit-chat-learn-1", "Failed"))


def test_gate_lines():
    assert describe_gate("fruit-v3", ("True", "GatePassed", "m")).startswith("gate      Adapter fruit-v3 promoted (GatePassed)")
    assert "not promoted (BelowMinImprovement)" in describe_gate("fruit-v3", ("False", "BelowMinImprovement", "m"))
    assert "ROLLED BACK" in describe_gate("fruit-v3", ("False", "RolledBack", "m"))


def test_threshold_counts_rating_records_after_the_last_run():
    answers = [Answer(t, 0, "fruit-v2", ok, feedback=("up" if ok else "down+correction")) for t, ok in
               [(1.0, True), (2.0, False), (3.0, True), (4.0, False), (5.0, False)]]
    # records: up 1, down+correction 2 -> cumulative 1, 3, 4, 6, 8
    assert rating_records_after(answers, 100.0, 100.0, 6) == 104.0
    assert rating_records_after(answers, 100.0, 102.5, 4) == 105.0  # counted from 103: 1, 3, 5
    assert rating_records_after(answers, 100.0, 100.0, 9) is None
    assert Round("r", created=110.0, threshold=100.0, adapter_created=150.0, served=160.0).timings() == \
        "threshold -> run +10 s, adapter +50 s, serving +60 s"


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def get(self, api: str, kind: str, ns: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.objects.get((api, kind), []) if o["metadata"]["name"] == name), None)

    def list(self, api: str, kind: str, ns: str | None, selector: str | None = None) -> list[dict[str, Any]]:
        return list(self.objects.get((api, kind), []))


class FakeUsers:
    def __init__(self, answers: list[Answer]) -> None:
        self._answers, self.started_wall = answers, time.time() - 100
        self.sim = SimpleNamespace(s=SimpleNamespace(window=30.0), errors={}, feedback_errors={}, probe_errors={})

    def answers(self) -> list[Answer]:
        return list(self._answers)

    @property
    def elapsed(self) -> float:
        return 65.0


def test_the_story_of_one_round(tmp_path: Path):
    kube = FakeKube()
    lines: list[str] = []
    story = LoopStory(kube, tmp_path / "loop", out=lines.append, chart_seconds=1e9)
    dep = {"metadata": {"name": "fruit-chat"}, "spec": {"continuousLearning": {"enabled": True, "adapterFamily": "fruit", "minNewRecords": 4}},
           "status": {"newFeedbackRecords": 3, "servedAdapters": [{"name": "fruit", "adapter": "fruit-v2"}],
                      "conditions": [{"type": "Ready", "status": "True"}]}}
    kube.objects[(API, "Deployment")] = [dep]
    answers = [Answer(t, 0, "fruit-v2", False, feedback="down+correction") for t in (10.0, 20.0, 35.0)]
    story.users = FakeUsers(answers)  # as if started: the users' part is simusers' (tested there)
    story.state.served = "fruit-v2"
    story.poll()
    assert any(x.startswith("feedback  the users have sent 4 rating records") for x in lines), lines
    assert any(x.startswith("approval  [   30s-   60s] fruit -> fruit-v2: 0.000") and "sent since the last run 6/4, in the store not trained on 3" in x for x in lines), lines
    created = run("fruit-chat-learn-1")
    created["metadata"]["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    kube.objects[(API, "TrainingRun")] = [created]
    story.poll()
    assert "TrainingRun fruit-chat-learn-1 created by the operator" in lines[-1]
    kube.objects[(API, "TrainingRun")] = [{**created, "status": {"phase": "Succeeded", "adapterRef": {"name": "fruit-v3"}}}]
    kube.objects[(API, "Adapter")] = [{"metadata": {"name": "fruit-v3", "creationTimestamp": created["metadata"]["creationTimestamp"]},
                                       "spec": {"family": "fruit"},
                                       "status": {"conditions": [{"type": "Promoted", "status": "True", "reason": "GatePassed", "message": "0.9 vs 0.1"}]}}]
    story.poll()
    assert lines[-2].endswith("Succeeded -> Adapter fruit-v3") and "promoted (GatePassed)" in lines[-1], lines
    dep["status"]["servedAdapters"] = [{"name": "fruit", "adapter": "fruit-v3"}]
    story.poll()
    assert lines[-1].startswith("serving   fruit -> fruit-v3 (was fruit-v2, approval 0.000") and "threshold -> run +" in lines[-1], lines
    n = len(lines)
    story.poll()  # nothing new: nothing printed
    assert len(lines) == n
