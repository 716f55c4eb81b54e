"""Continuous learning, exactly once: the real operator (kopf) against the embedded control plane and a real feedback
store on disk. The operator is stopped at random points of the loop (between a snapshot and its TrainingRun among
them) and started again as a new process would be (the store's in-memory index dropped); at the end a count shows
one TrainingRun per snapshot, no rated record in two snapshots, and every rated record in one."""

from __future__ import annotations

import collections
import datetime as dt
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from harness import API, Cluster, running_cluster, wait_for

from perennial.controllers import learning
from perennial.feedback import store as store_module
from perennial.feedback.store import FeedbackStore
from perennial.kube.aio import AsyncKube
from perennial.kube.client import ApiError
from perennial.local.faults import FaultConfig
from perennial_records import FeedbackRecord, InteractionRecord, parse_record, segment_name

DEP = "chat"


def deployment_spec() -> dict[str, Any]:
    return {
        "baseModelRef": {"name": "base"},
        "engine": {"type": "Transformers"},
        "continuousLearning": {
            "enabled": True, "adapterFamily": "chat", "minNewRecords": 1, "minIntervalSeconds": 0, "maxConcurrentRuns": 16,
            "template": {"method": "SFT", "resources": {"gpus": 0}},
        },
    }


class Feedback:
    """Writes segments the way the sidecar ships them: interactions and their thumbs, each rating with its own id."""

    def __init__(self, root: Path):
        self.root = root
        self.ratings: list[str] = []
        self.seq = 0

    def ship(self, n: int, pod: str = "chat-blue-0", *, adapter: str | None = None, up: int | None = None) -> None:
        """`n` answers (by `adapter`), each rated: thumbs up for the first `up` of them (all if None), down after."""
        now = dt.datetime.now(dt.UTC)
        lines = []
        for i in range(n):
            self.seq += 1
            rid = f"r{self.seq}"
            lines.append(InteractionRecord(id=rid, deployment=DEP, adapter=adapter, messages=[{"role": "user", "content": f"q{self.seq}"}],
                                           response="a", time=now.isoformat()).to_json())
            fb = FeedbackRecord(response_id=rid, type="thumbs", thumbs="up" if up is None or i < up else "down", deployment=DEP, time=now.isoformat())
            lines.append(fb.to_json())
            self.ratings.append(fb.id)
        path = self.root / segment_name(DEP, pod, self.seq, now)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.rename(path)  # shipped whole, as the sidecar's shipper does


def fresh_process() -> None:
    """What a restarted operator process starts from: no store object in memory (the index is read back from the store)."""
    store_module._shared.clear()


def runs(c: Cluster) -> list[dict[str, Any]]:
    return [r for r in c.kube.list(API, "TrainingRun", "default") if (r["metadata"].get("labels") or {}).get(learning.DEPLOYMENT_LABEL) == DEP]


def snapshot_ratings(root: Path) -> dict[int, list[str]]:
    """Feedback record ids of each snapshot's trained parts (the byte ranges it lists), by sequence."""
    store = FeedbackStore(f"file://{root}")
    out: dict[int, list[str]] = {}
    for snap in store.snapshots(DEP):
        ids = []
        for part in snap.segments:
            with open(root / part.name, "rb") as f:
                f.seek(part.offset)
                data = f.read(part.length)
            ids += [r.id for r in map(parse_record, filter(None, data.split(b"\n"))) if isinstance(r, FeedbackRecord)]
        out[snap.sequence] = ids
    return out


def assert_exactly_once(c: Cluster, fb: Feedback, root: Path) -> None:
    by_snapshot = snapshot_ratings(root)
    everything = [i for ids in by_snapshot.values() for i in ids]
    twice = [i for i, n in collections.Counter(everything).items() if n > 1]
    assert not twice, f"records in two snapshots: {twice[:5]}"
    assert sorted(everything) == sorted(fb.ratings), "a rated record in no snapshot"
    made = runs(c)
    seqs = collections.Counter(int(r["metadata"]["labels"][learning.SNAPSHOT_SEQ_LABEL]) for r in made)
    assert all(n == 1 for n in seqs.values()), f"two TrainingRuns of one snapshot: {seqs}"
    assert set(seqs) == set(by_snapshot), f"snapshots {sorted(by_snapshot)} vs runs of snapshots {sorted(seqs)}"
    for r in made:
        seq = int(r["metadata"]["labels"][learning.SNAPSHOT_SEQ_LABEL])
        assert r["metadata"]["name"] == learning.run_name(DEP, seq)
        assert r["spec"]["datasets"][0]["feedback"]["snapshot"].endswith(f"{DEP}-{seq:08d}.json")
        assert r["metadata"]["ownerReferences"][0]["name"] == DEP


def converged(c: Cluster, fb: Feedback, root: Path) -> bool:
    by_snapshot = snapshot_ratings(root)
    trained = sum(len(v) for v in by_snapshot.values())
    return trained == len(fb.ratings) and len(runs(c)) == len(by_snapshot)


@pytest.fixture(params=["clean", "faults"])
def loop(request: pytest.FixtureRequest, tmp_path: Path):
    faults = FaultConfig(rate=0.05, seed=len(request.node.nodeid), retry_after_seconds=1, slow_ms=100, watch_close_after=(0.2, 2.0)) \
        if request.param == "faults" else None
    fresh_process()
    with running_cluster(tmp_path, faults=faults, learning_seconds=0.3) as c:
        yield c, Feedback(tmp_path / "feedback"), tmp_path / "feedback"
    fresh_process()


class Crash:
    """Crashes the operator at a chosen point of the loop: right after a snapshot is written (before its run is
    created) or right after a TrainingRun is created (before anything records it). From then on the operator is dead
    to the world (every request of its client fails, no snapshot is written) until it is started again."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.dead = threading.Event()
        self.at: str | None = None
        self.crashed: collections.Counter[str] = collections.Counter()
        write_snapshot, request = learning.StoreSource.write_snapshot, AsyncKube.request
        crash = self

        def guarded_write_snapshot(self: Any, *args: Any) -> Any:
            if crash.dead.is_set():
                raise RuntimeError("the operator is dead")
            snap = write_snapshot(self, *args)
            crash._maybe("snapshot")
            return snap

        async def guarded_request(self: Any, method: str, path: str, body: Any = None, **kw: Any) -> Any:
            if crash.dead.is_set():
                raise ApiError(0, "the operator is dead", method, path)
            out = await request(self, method, path, body, **kw)
            if method == "POST" and path.endswith("/trainingruns"):
                crash._maybe("create")
            return out

        monkeypatch.setattr(learning.StoreSource, "write_snapshot", guarded_write_snapshot)
        monkeypatch.setattr(AsyncKube, "request", guarded_request)

    def _maybe(self, point: str) -> None:
        if self.at == point:
            self.crashed[point] += 1
            self.dead.set()
            raise RuntimeError(f"crashed after the {point}")

    def revive(self) -> None:
        self.at = None
        self.dead.clear()


def test_stopped_anywhere_the_loop_trains_each_record_once(loop, monkeypatch: pytest.MonkeyPatch):
    c, fb, root = loop
    crash = Crash(monkeypatch)
    c.create("Deployment", DEP, deployment_spec())
    rng = random.Random(1234)
    # each crash point at least twice, then random stops (before a look, while it snapshots, while it creates, after)
    plan = ["snapshot", "create", "snapshot", "create"] + [rng.choice(["snapshot", "create", None]) for _ in range(6)]
    for point in plan:
        crash.at = point
        fb.ship(rng.randint(1, 5))
        if point is not None:
            wait_for(crash.dead.is_set, 30, message=f"a crash after the {point}")
        else:
            time.sleep(rng.uniform(0.0, 1.2))
        c.stop_operator()
        fresh_process()  # a new process: the store's index is read back from the store
        crash.revive()
        if rng.random() < 0.5:
            fb.ship(rng.randint(1, 3))  # records arriving while the operator is down
        c.start_operator()
    assert crash.crashed["snapshot"] >= 2 and crash.crashed["create"] >= 2, crash.crashed
    wait_for(lambda: converged(c, fb, root), 60, message="every rated record in a snapshot with its run")
    assert_exactly_once(c, fb, root)
    latest = max(runs(c), key=lambda r: int(r["metadata"]["labels"][learning.SNAPSHOT_SEQ_LABEL]))
    wait_for(lambda: (c.get("Deployment", DEP).get("status") or {}).get("lastTrainingRun") == latest["metadata"]["name"], 30,
             message="status.lastTrainingRun")
    assert c.get("Deployment", DEP)["status"]["newFeedbackRecords"] == 0


def test_a_snapshot_without_its_run_gets_it_and_no_new_snapshot(tmp_path: Path):
    """The operator stopped right after writing snapshot 1 (simulated by writing it as the operator does, with no
    operator running): the next one creates that snapshot's run, and the records that arrived since go to snapshot 2."""
    fresh_process()
    with running_cluster(tmp_path, learning_seconds=0.3) as c:
        c.stop_operator()
        fb, root = Feedback(tmp_path / "feedback"), tmp_path / "feedback"
        c.create("Deployment", DEP, deployment_spec())
        fb.ship(3)
        store = FeedbackStore(f"file://{root}")
        store.scan(DEP)
        first = store.take_snapshot(DEP, sequence=1)
        assert first is not None and first.counts.ratings == 3
        fb.ship(2)
        fresh_process()
        c.start_operator()
        wait_for(lambda: converged(c, fb, root), 30, message="snapshot 1's run, then snapshot 2 and its run")
        assert_exactly_once(c, fb, root)
        trigger = {r["metadata"]["name"]: r["metadata"]["annotations"][learning.TRIGGER_ANNOTATION] for r in runs(c)}
        assert trigger == {learning.run_name(DEP, 1): "Resumed", learning.run_name(DEP, 2): "MinNewRecords"}
    fresh_process()


def test_a_restart_after_the_run_was_made_makes_no_second_one(tmp_path: Path):
    """Snapshot 1 and its run exist; a restarted operator (a new store object, a new cache) writes no second run of
    snapshot 1 and takes the next records into snapshot 2. (A creation answered 409 is adopted: unit-tested.)"""
    fresh_process()
    with running_cluster(tmp_path, learning_seconds=0.3) as c:
        fb, root = Feedback(tmp_path / "feedback"), tmp_path / "feedback"
        c.create("Deployment", DEP, deployment_spec())
        fb.ship(2)
        wait_for(lambda: converged(c, fb, root), 30, message="snapshot 1 and its run")
        c.stop_operator()
        made = runs(c)
        assert [r["metadata"]["name"] for r in made] == [learning.run_name(DEP, 1)]
        fresh_process()
        created_before = REGISTRY.get_sample_value("perennial_learning_trainingruns_created_total", {"trigger": "MinNewRecords"}) or 0
        c.start_operator()
        fb.ship(1)
        wait_for(lambda: converged(c, fb, root), 30, message="snapshot 2 and its run")
        assert_exactly_once(c, fb, root)
        # counted once the create call returned, inside the operator: maybe just after the run is visible
        wait_for(lambda: REGISTRY.get_sample_value("perennial_learning_trainingruns_created_total", {"trigger": "MinNewRecords"}) == created_before + 1,
                 30, message="the created-runs counter")
        assert REGISTRY.get_sample_value("perennial_learning_trainingruns_created_total", {"trigger": "MinNewRecords"}) == created_before + 1
        wait_for(lambda: REGISTRY.get_sample_value("perennial_feedback_new_records", {"namespace": "default", "deployment": DEP}) == 0, 30,
                 message="the metric of new records")
        wait_for(lambda: (c.get("Deployment", DEP).get("status") or {}).get("lastTrainingRun") == learning.run_name(DEP, 2), 30)
        # this run's Event: posted after the status names it (run 1's Event, before the restart, must not count)
        wait_for(lambda: [e for e in c.events(DEP) if learning.run_name(DEP, 2) in e.get("message", "")
                          and (e.get("reason") == "TrainingRunCreated" or "TrainingRunCreated" in e.get("message", ""))],
                 30, message="an Event says run 2 was created")
    fresh_process()


def test_store_unreachable_is_a_condition_and_serving_status_is_left_alone(tmp_path: Path):
    fresh_process()
    with running_cluster(tmp_path, learning_seconds=0.3) as c:
        spec = deployment_spec()
        spec["feedback"] = {"storeUri": f"file://{tmp_path}/nowhere"}
        c.create("Deployment", DEP, spec)
        learning_cond = c.wait_condition("Deployment", DEP, "Learning", "False", "StoreUnreachable", timeout=30)
        assert "nowhere" in learning_cond["message"]
        # the serving controller's conditions are there too: neither writer removed the other's
        wait_for(lambda: {"Ready", "Learning"} <= {x["type"] for x in (c.get("Deployment", DEP).get("status") or {}).get("conditions") or []}, 30)
        assert runs(c) == []
        # the store appears: the loop recovers
        fb = Feedback(tmp_path / "nowhere")
        fb.ship(1)
        c.wait_condition("Deployment", DEP, "Learning", "True", timeout=30)
        wait_for(lambda: len(runs(c)) == 1, 30, message="a run once the store is back")
    fresh_process()


def test_the_gate_marks_each_learned_adapter_with_its_numbers_and_live_feedback_rolls_one_back(loop, tmp_path: Path):
    """Runs of the loop finish (the test plays the kubelet): an Adapter better than its baseline is `Promoted`, one
    worse is not, each with the held-out numbers, and both objects get an Event saying so. A promoted adapter whose
    users approve of it clearly less than of the one before it is rolled back (`Promoted` False, `RolledBack`)."""
    import json as _json

    from harness import FakeKubelet

    c, fb, _root = loop
    kubelet = FakeKubelet(c)
    c.create("BaseModel", "base", {"source": {"uri": "hf://org/model"}})
    c.wait_condition("BaseModel", "base", "Ready", "True")
    spec = deployment_spec()
    spec["continuousLearning"]["maxConcurrentRuns"] = 1
    spec["continuousLearning"]["promotion"] = {"minImprovement": "0.05"}
    c.create("Deployment", DEP, spec)

    def finish(seq: int, version: int, mean: float, baseline: float) -> str:
        run = learning.run_name(DEP, seq)
        art = tmp_path / "art" / run
        art.mkdir(parents=True)
        (art / "adapter_config.json").write_text("{}")
        pod = kubelet.start(f"{run}-train")
        result = {"status": "Succeeded", "artifactUri": f"file://{art}",
                  "metrics": {"eval/mean_reward": mean, "eval/baseline_mean_reward": baseline, "eval/improvement": mean - baseline, "eval/samples": 20}}
        kubelet.finish(f"{run}-train", pod, exit_code=0, message=_json.dumps(result), job_condition="Complete")
        c.wait_condition("TrainingRun", run, "Succeeded", "True", "AdapterCreated", timeout=30)
        return f"chat-v{version}"

    fb.ship(2)
    wait_for(lambda: c.get("TrainingRun", learning.run_name(DEP, 1)), 30, message="the first run")
    good = finish(1, 1, 0.8, 0.6)
    promoted = c.wait_condition("Adapter", good, "Promoted", "True", "GatePassed", timeout=30)
    assert "held-out mean reward 0.8 vs 0.6 of the base model on 20 held-out examples: improvement 0.2 (minImprovement 0.05)" in promoted["message"]
    assert "Deployment chat" in promoted["message"]

    fb.ship(2)
    wait_for(lambda: c.get("TrainingRun", learning.run_name(DEP, 2)), 30, message="the second run")
    newer = finish(2, 2, 0.9, 0.6)
    c.wait_condition("Adapter", newer, "Promoted", "True", "GatePassed", timeout=30)

    # live feedback: users like chat-v1's answers (32 of 40) and not chat-v2's (10 of 40) -> chat-v2 rolled back
    fb.ship(40, adapter=good, up=32)
    fb.ship(40, adapter=newer, up=10)
    wait_for(lambda: c.get("TrainingRun", learning.run_name(DEP, 3)), 30, message="the third run (its snapshot holds the live feedback)")
    back = c.wait_condition("Adapter", newer, "Promoted", "False", "RolledBack", timeout=30)
    assert "approval 10/40 (25%) vs 32/40 (80%)" in back["message"] and f"falls back to {good}" in back["message"]
    assert c.condition("Adapter", good, "Promoted")["status"] == "True"
    wait_for(lambda: any(e["reason"] == "AdapterRolledBack" and e["type"] == "Warning" for e in c.events(newer)), 30,
             message="a Warning Event on the rolled-back Adapter")

    bad = finish(3, 3, 0.55, 0.6)
    failed = c.wait_condition("Adapter", bad, "Promoted", "False", "BelowMinImprovement", timeout=30)
    assert "improvement -0.05" in failed["message"]
    wait_for(lambda: {"AdapterPromoted"} <= {e["reason"] for e in c.events(good)}, 30, message="an Event on the promoted Adapter")
    wait_for(lambda: {"AdapterNotPromoted"} <= {e["reason"] for e in c.events(bad)}, 30, message="a Warning on the failed one")
    assert all(e["type"] == "Warning" for e in c.events(bad) if e["reason"] == "AdapterNotPromoted")
    wait_for(lambda: f"Adapter {bad} failed the promotion gate" in " ".join(e["message"] for e in c.events(DEP)), 30,
             message="the Deployment's Event names the failed Adapter")
