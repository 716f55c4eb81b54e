"""End to end on the tiny model: the continuous-learning loop closes by itself in `perennial dev`, twice.

`perennial dev --demo` runs as a process (the tiny model and the toy data prepared); the test applies a warm-up SFT
run (its Adapter fruit-v1 passes the gate against the base model, so the Deployment's `fruit` track serves it) and a
Deployment `loop` with `continuousLearning` (60 new rated records, SFT on the feedback, the promotion gate on a
held-out evaluation against the served parent). Nothing else is applied: the only feedback is what simulated users
(perennial.simusers.BackgroundUsers: the `openai` client, `POST /v1/feedback` with the generated token) send
through the sidecar, here and from `perennial dev`'s own users. Then:

- the operator creates TrainingRun loop-learn-1 by itself, continuing fruit-v1; its Adapter is Promoted (the gate's
  numbers in the condition) and the Deployment serves it under `fruit`, while the users' requests run across the
  switch with no failed request (and no failed rating);
- a second round: loop-learn-2 continues the promoted adapter; the Adapters' lineage makes the chain
  base -> fruit-v1 -> learn-1's -> learn-2's, each learning Adapter naming its feedback snapshot, whose documents are
  in the store and hold disjoint segment ranges;
- `perennial dev` told the story (run created, promoted, serving with its timings) and wrote the approval chart.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from devproc import free_port, stop_dev
from harness import wait_for
from perennial.kube import connect

ROOT = Path(__file__).resolve().parents[2]
API = "perennial.ai/v1alpha1"
NS = "default"
pytestmark = pytest.mark.slow



def manifests() -> list[dict[str, Any]]:
    docs = [d for f in ("00-volumes.yaml", "01-basemodel.yaml", "02-rewardspec.yaml")
            for d in yaml.safe_load_all((ROOT / "examples" / "local" / f).read_text()) if d]
    docs.append({"apiVersion": API, "kind": "TrainingRun", "metadata": {"name": "warm"}, "spec": {
        "method": "SFT", "baseModelRef": {"name": "tiny"}, "rewardSpecRef": {"name": "fruit-colours"},
        "datasets": [{"name": "format", "uri": "pvc://data/sft.jsonl"}, {"name": "held-out", "uri": "pvc://data/eval.jsonl", "split": "Eval"}],
        "hyperparameters": {"maxSteps": 60, "learningRate": "3e-3", "batchSize": 8}, "lora": {"rank": 8, "alpha": 16},
        "resources": {"gpus": 0}, "evaluation": {"maxSamples": 16}, "output": {"adapterFamily": "fruit"}}})
    docs.append({"apiVersion": API, "kind": "Deployment", "metadata": {"name": "loop"}, "spec": {
        "baseModelRef": {"name": "tiny"},
        "adapters": [{"name": "fruit", "track": {"family": "fruit"}}],  # requirePromotion: the gate decides
        "engine": {"type": "Transformers", "maxLoraRank": 16, "resources": {"cpu": "1", "memory": "1Gi"}},
        "replicas": 1,
        "strategy": {"blueGreen": {"scaleDownDelaySeconds": 5, "smokeTest": {"prompt": "What colour is a banana?", "maxTokens": 4,
                                                                              "timeoutSeconds": 120}},
                     "adapterRollout": {"unloadDelaySeconds": 5}},
        "feedback": {"enabled": True, "samplePercent": 100, "storeUri": "pvc://feedback/loop"},
        "continuousLearning": {
            "enabled": True, "adapterFamily": "fruit", "minNewRecords": 60, "minIntervalSeconds": 0,
            "template": {"method": "SFT", "rewardSpecRef": {"name": "fruit-colours"},
                         "hyperparameters": {"maxSteps": 60, "learningRate": "3e-3", "batchSize": 8}, "lora": {"rank": 8, "alpha": 16},
                         "resources": {"gpus": 0}, "evaluation": {"maxSamples": 128},  # eval.jsonl too (rows after the held-out feedback)
                         "evalDatasets": [{"name": "held-out", "uri": "pvc://data/eval.jsonl", "split": "Eval"}]},
            "promotion": {"requireEvaluation": True, "minImprovement": "0"}},
    }})
    return docs


def test_feedback_through_the_sidecar_trains_gates_promotes_and_serves_twice_with_no_failed_request(tmp_path: Path):
    from perennial.simusers import (
        BackgroundUsers,
        DeploymentSource,
        Settings,
        demo_questions,
    )

    state = tmp_path / "state"
    (tmp_path / "apply").mkdir()
    (tmp_path / "apply" / "loop.yaml").write_text(yaml.safe_dump_all(manifests()))
    log_path = tmp_path / "dev.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed by stop_dev
    proc = subprocess.Popen(
        [sys.executable, "-m", "perennial.cli", "dev", "--demo", "--apply", str(tmp_path / "apply"), "--state-dir", str(state),
         "--port", str(free_port()), "--metrics-port", str(free_port()), "--health-port", str(free_port()),
         "--users", "1", "--users-deployment", "loop", "--users-model", "fruit"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    users = None
    try:
        wait_for(lambda: "Perennial dev is running" in log_path.read_text() or proc.poll() is not None, timeout=180, interval=0.5)
        assert proc.poll() is None, log_path.read_text()
        kube = connect(kubeconfig=str(state / "kubeconfig"))
        source = DeploymentSource(kube, NS, "loop")

        def tail() -> str:
            return log_path.read_text()[-4000:]

        def get(kind: str, name: str) -> dict[str, Any]:
            return kube.get(API, kind, NS, name) or {}

        def served() -> str | None:
            try:
                return source.served_adapter("fruit")
            except LookupError:
                return None

        # The warm-up's Adapter passes the gate against the base model: the track serves it.
        st = wait_for(lambda: served() == "fruit-v1" and str((s := get("Deployment", "loop").get("status") or {}).get("endpoint")).startswith(
            "http://127.0.0.1:") and s, timeout=600, interval=1, message=f"loop serving fruit-v1; dev.log: {tail()}")
        marks["serving fruit-v1"] = time.monotonic() - t0
        assert not kube.list(API, "TrainingRun", NS, "perennial.ai/deployment=loop")  # nothing trains before feedback

        async def probe() -> str | None:
            return await asyncio.to_thread(served)

        settings = Settings(url=st["endpoint"], model="fruit", token=source.token(), users=2, think=0.5, window=15.0,
                            duration=3600.0, timeout=60.0, poll=1.0)
        users = BackgroundUsers(settings, demo_questions(), adapter_probe=probe, out=None).start()

        # Round 1: the operator creates the run by itself, from the sidecar's feedback alone.
        run1 = wait_for(lambda: get("TrainingRun", "loop-learn-1"), timeout=300, interval=1, message=f"loop-learn-1; dev.log: {tail()}")
        marks["learn-1 created"] = time.monotonic() - t0
        assert run1["spec"]["parentAdapterRef"] == {"name": "fruit-v1"}
        assert run1["metadata"]["annotations"]["perennial.ai/learning-trigger"] == "MinNewRecords"
        run1 = wait_for(lambda: (r := get("TrainingRun", "loop-learn-1")).get("status", {}).get("phase") in ("Succeeded", "Failed") and r,
                        timeout=400, interval=1, message="loop-learn-1 finishing")
        assert run1["status"]["phase"] == "Succeeded", (run1["status"], tail())
        new = run1["status"]["adapterRef"]["name"]
        promoted = wait_for(lambda: next((c for c in get("Adapter", new).get("status", {}).get("conditions") or []
                                          if c["type"] == "Promoted" and c["status"] == "True"), None),
                            timeout=120, interval=1, message=f"{new} promoted: {get('Adapter', new).get('status')}")
        assert promoted["reason"] == "GatePassed" and "held-out mean reward" in promoted["message"], promoted
        wait_for(lambda: served() == new, timeout=300, interval=1, message=f"loop serving {new}")
        marks["serving learn-1's"] = time.monotonic() - t0
        # the users' requests run across the switch: answers from the new adapter, none failed
        wait_for(lambda: sum(a.adapter == new for a in users.answers()) >= 10, timeout=180, interval=0.5, message=f"answers of {new}")
        assert not users.sim.errors and not users.sim.feedback_errors, (users.sim.errors, users.sim.feedback_errors)
        before, after = users.approval_since(0, "fruit-v1"), users.approval_since(0, new)
        print(f"approval fruit-v1 {before.format()} -> {new} {after.format()}")

        # Round 2 continues the promoted adapter.
        run2 = wait_for(lambda: get("TrainingRun", "loop-learn-2"), timeout=400, interval=1, message=f"loop-learn-2; dev.log: {tail()}")
        marks["learn-2 created"] = time.monotonic() - t0
        assert run2["spec"]["parentAdapterRef"] == {"name": new}
        run2 = wait_for(lambda: (r := get("TrainingRun", "loop-learn-2")).get("status", {}).get("phase") in ("Succeeded", "Failed") and r,
                        timeout=400, interval=1, message="loop-learn-2 finishing")
        marks["learn-2 finished"] = time.monotonic() - t0
        assert run2["status"]["phase"] == "Succeeded", (run2["status"], tail())
        newer = run2["status"]["adapterRef"]["name"]
        result = users.stop()
        users = None
        assert not result.errors and not result.feedback_errors, (result.errors, result.feedback_errors)

        # Lineage: the chain of Adapters, each learning one naming its snapshot; the snapshots are in the store.
        chain, name = [], newer
        while name:
            chain.append(name)
            name = ((get("Adapter", name).get("spec") or {}).get("lineage") or {}).get("parentAdapterRef", {}).get("name")
        assert chain == [newer, new, "fruit-v1"], chain
        snapshots = []
        for adapter, run in ((new, "loop-learn-1"), (newer, "loop-learn-2")):
            lineage = get("Adapter", adapter)["spec"]["lineage"]
            assert lineage["trainingRunRef"]["name"] == run
            fb = next(d for d in lineage["datasets"] if d["name"] == "feedback")
            # the run's annotation names the document relative to the store (`feedback.storeUri`)
            assert fb["uri"] == "pvc://feedback/loop/" + get("TrainingRun", run)["metadata"]["annotations"]["perennial.ai/feedback-snapshot-uri"]
            assert fb["sha256"] and fb["rows"] > 0, fb
            path = state / "pvc" / fb["uri"].removeprefix("pvc://")
            snapshots.append(json.loads(path.read_text()))
        ranges = [{json.dumps(s, sort_keys=True) for s in doc["segments"]} for doc in snapshots]
        assert ranges[0] and ranges[1] and not ranges[0] & ranges[1], snapshots  # no record in two snapshots

        # perennial dev told the story and wrote the chart
        text = wait_for(lambda: "serving   fruit -> " + new in (t := log_path.read_text()) and t, timeout=60, interval=0.5,
                        message="the story's serving line")
        assert "training  TrainingRun loop-learn-1 created by the operator" in text and f"gate      Adapter {new} promoted (GatePassed)" in text
        assert "approval  [" in text and "users     " in text
    finally:
        if users is not None:
            users.stop()
        stop_dev(proc, log)
        print("timings (s since perennial dev started):", json.dumps({k: round(v) for k, v in marks.items()}))
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    assert (state / "loop.png").stat().st_size > 0 and (state / "loop.json").exists()
