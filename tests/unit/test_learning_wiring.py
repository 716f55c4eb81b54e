"""The learning loop as a second controller of Deployments: its own keys (never inside the serving reconcile), woken by
its TrainingRuns and its family's Adapters, and a status writer that patches only the loop's fields."""

from __future__ import annotations

from typing import Any

from perennial.config import OperatorConfig
from perennial.controllers import all_controllers, learning
from perennial.controllers.base import Context, Note
from perennial.controllers.manager import Key, Manager
from perennial.kube.cache import Cache
from perennial.resources import conditions as cond

API = "perennial.ai/v1alpha1"
LEARN = learning.KIND


def o(kind: str, name: str, api: str = API, **extra: Any) -> dict:
    meta = {"name": name, "namespace": "default", "uid": f"uid-{kind}-{name}", "resourceVersion": "1", "generation": 1, **extra.pop("meta", {})}
    return {"apiVersion": api, "kind": kind, "metadata": meta, **extra}


DEPLOYMENT_SPEC = {"baseModelRef": {"name": "base"}, "adapters": [{"name": "chat", "track": {"family": "fam"}}],
                   "continuousLearning": {"enabled": True, "adapterFamily": "fam"}}


class RecordingKube:
    def __init__(self) -> None:
        self.patches: list[tuple[str, str, dict]] = []
        self.created: list[dict] = []

    async def patch(self, api_version: str, kind: str, ns: str, name: str, body: dict, subresource: str | None = None) -> dict:
        self.patches.append((kind, subresource or "", body))
        return {"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": ns, "resourceVersion": "2"}, "status": body.get("status")}

    async def create(self, obj: dict) -> dict:
        self.created.append(obj)
        return obj


def manager() -> tuple[Manager, RecordingKube]:
    kube = RecordingKube()
    ctx = Context(clusters={"local": kube}, cache=Cache(), config=OperatorConfig(), clock=lambda: 0.0)  # type: ignore[dict-item]
    return Manager(all_controllers(), ctx), kube


def test_a_deployment_has_a_serving_and_a_learning_key():
    m, _ = manager()
    dep = o("Deployment", "chat", spec=DEPLOYMENT_SPEC)
    assert m.keys_for(None, dep) == {Key("Deployment", "default", "chat"), Key(LEARN, "default", "chat")}


def test_the_loops_runs_and_adapters_wake_the_loop_only():
    m, _ = manager()
    dep = o("Deployment", "chat", spec=DEPLOYMENT_SPEC)
    m.cache.put(dep)
    m.keys_for(None, dep)  # dependencies tracked
    run = o("TrainingRun", "chat-learn-1", meta={"labels": {learning.DEPLOYMENT_LABEL: "chat"},
                                                  "ownerReferences": [{"apiVersion": API, "kind": "Deployment", "name": "chat", "uid": "uid-Deployment-chat"}]},
            spec={"method": "SFT", "baseModelRef": {"name": "base"}, "datasets": [{"name": "d", "uri": "file:///d"}], "output": {"adapterFamily": "fam"}})
    keys = m.keys_for(None, run)
    assert Key(LEARN, "default", "chat") in keys
    assert Key("Deployment", "default", "chat") not in keys  # a run's progress never costs a serving reconcile
    # an Adapter of the learned family: both (the serving one tracks the family, the loop gates it)
    adapter = o("Adapter", "fam-v2", spec={"family": "fam"})
    assert {Key(LEARN, "default", "chat"), Key("Deployment", "default", "chat")} <= m.keys_for(None, adapter)
    # serving children (built-in, labelled) wake the serving controller only
    pod = o("Pod", "chat-blue-0", api="v1", meta={"labels": {"perennial.ai/deployment": "chat", "app.kubernetes.io/managed-by": "perennial-operator"}})
    assert m.keys_for(None, pod) == {Key("Deployment", "default", "chat")}
    # learning off: the family's Adapters no longer wake the loop
    off = o("Deployment", "chat", spec={**DEPLOYMENT_SPEC, "continuousLearning": {"enabled": False, "adapterFamily": "fam"}}, meta={"generation": 2})
    m.keys_for(dep, off)
    assert Key(LEARN, "default", "chat") not in m.keys_for(None, o("Adapter", "fam-v3", spec={"family": "fam"}))


async def test_the_loop_patches_only_its_own_status_fields():
    m, kube = manager()
    serving = {"phase": "Stable", "activeColor": "blue", "servedAdapters": [{"name": "chat", "adapter": "fam-v1"}],
               "conditions": cond.set_condition(None, "Ready", True, "Serving", "", 1)}
    dep = o("Deployment", "chat", spec=DEPLOYMENT_SPEC, status=serving)
    desired = {"newFeedbackRecords": 12, "conditions": cond.set_condition(serving["conditions"], "Learning", True, "Collecting", "12 new", 1)}
    written = await m.write_status(m.controllers[LEARN], dep, desired, [Note("X", "y")])
    assert written
    [(kind, sub, body)] = kube.patches
    assert (kind, sub) == ("Deployment", "status")
    # the serving fields are neither removed nor rewritten; the condition list keeps Ready
    assert set(body["status"]) == {"newFeedbackRecords", "conditions"}
    assert [c["type"] for c in body["status"]["conditions"]] == ["Learning", "Ready"]
    assert body["metadata"]["resourceVersion"] == "1"  # on a stale copy: a 409, retried, never a lost write
    # the same again: no write
    kube.patches.clear()
    dep["status"] = {**serving, **desired}
    assert not await m.write_status(m.controllers[LEARN], dep, desired, [])
    assert kube.patches == []


class ConflictKube:
    """Answers a TrainingRun creation with 409 (it exists: made before a restart, not in the cache yet)."""

    def __init__(self, existing: dict | None):
        self.existing = existing
        self.created: list[dict] = []

    async def create(self, obj: dict) -> dict:
        from perennial.kube.client import ApiError

        raise ApiError(409, {"reason": "AlreadyExists", "message": "exists"}, "POST", "/trainingruns")

    async def get(self, api_version: str, kind: str, ns: str, name: str) -> dict | None:
        return self.existing


class OneSnapshot:
    def get_snapshot(self, store_uri: str, namespace: str, deployment: str, seq: int) -> learning.Snapshot:
        return learning.Snapshot(seq, f"chat/_perennial/snapshots/chat-{seq:08d}.json")


async def test_a_run_answered_409_is_adopted_only_when_it_is_that_snapshots():
    import pytest

    from perennial.api.deployment import DeploymentSpec
    from perennial.kube.client import ApiError

    dep = o("Deployment", "chat", spec=DEPLOYMENT_SPEC)
    spec = DeploymentSpec.model_validate(DEPLOYMENT_SPEC)
    fb = learning.FeedbackView(last_snapshot=learning.Snapshot(3))
    ours = learning.training_run(dep, spec, learning.Snapshot(3, "x.json"), parent=None, store_uri=None, trigger="Resumed")
    for existing, adopted in ((ours, True), (None, False),
                              ({**ours, "metadata": {**ours["metadata"], "labels": {learning.DEPLOYMENT_LABEL: "chat", learning.SNAPSHOT_SEQ_LABEL: "2"}}}, False),
                              ({**ours, "metadata": {**ours["metadata"], "labels": {}}}, False)):
        kube = ConflictKube(existing)
        ctx = Context(clusters={"local": kube}, cache=Cache(), config=OperatorConfig(), clock=lambda: 0.0)  # type: ignore[dict-item]
        d = learning.Decision(create_run=3, trigger="Resumed")
        if adopted:
            run, made = await learning.create_run(ctx, dep, spec, fb, d, OneSnapshot(), [])  # type: ignore[arg-type]
            assert (run["metadata"]["name"], made) == ("chat-learn-3", False)
            assert ctx.cache.get(API, "TrainingRun", "default", "chat-learn-3") is not None
        else:
            with pytest.raises(ApiError):  # someone else's object of that name: never taken for ours
                await learning.create_run(ctx, dep, spec, fb, d, OneSnapshot(), [])  # type: ignore[arg-type]


def test_template_eval_sets_reach_the_run_and_bad_ones_are_refused_at_admission():
    import copy

    import requests

    from perennial import crdgen
    from perennial.api.deployment import DeploymentSpec
    from perennial.api.trainingrun import TrainingRunSpec
    from perennial.local.apiserver import start_in_thread

    spec = copy.deepcopy(DEPLOYMENT_SPEC)
    spec["continuousLearning"]["template"] = {"resources": {"gpus": 0},
                                              "evalDatasets": [{"name": "golden", "uri": "file:///data/golden.jsonl", "split": "Eval"}]}
    dep = o("Deployment", "chat", spec=spec)
    body = learning.training_run(dep, DeploymentSpec.model_validate(spec), learning.Snapshot(1, "s.json"), parent=None, store_uri=None, trigger="x")
    assert [(d["name"], d["split"]) for d in body["spec"]["datasets"]] == [("feedback", "Train"), ("golden", "Eval")]
    TrainingRunSpec.model_validate(body["spec"])

    server = start_in_thread()
    try:
        for crd in crdgen.all_crds():
            server.apply_crd(crd)
        requests.post(server.url + "/api/v1/namespaces", json={"metadata": {"name": "adm"}}).raise_for_status()
        url = server.url + "/apis/perennial.ai/v1alpha1/namespaces/adm/deployments"

        def create(name: str, eval_sets: list) -> requests.Response:
            s = copy.deepcopy(spec)
            s["continuousLearning"]["template"]["evalDatasets"] = eval_sets
            return requests.post(url, json={"apiVersion": API, "kind": "Deployment", "metadata": {"name": name}, "spec": s})

        assert create("ok", [{"name": "golden", "uri": "file:///g.jsonl", "split": "Eval"}]).status_code == 201
        for name, bad in (("train", [{"name": "golden", "uri": "file:///g.jsonl"}]),  # split Train
                          ("named-feedback", [{"name": "feedback", "uri": "file:///g.jsonl", "split": "Eval"}]),
                          ("twice", [{"name": "g", "uri": "file:///a", "split": "Eval"}, {"name": "g", "uri": "file:///b", "split": "Eval"}])):
            r = create(name, bad)
            assert r.status_code == 422 and "evalDatasets" in r.text, (name, r.status_code, r.text[:300])
    finally:
        server.stop()


class CountingSource:
    def __init__(self, view: learning.FeedbackView):
        self.view = view
        self.reads = 0
        self.snapshots: list[int] = []

    def read(self, store_uri: str, namespace: str, deployment: str) -> learning.FeedbackView:
        self.reads += 1
        return self.view

    def write_snapshot(self, store_uri: str, namespace: str, deployment: str, seq: int) -> learning.Snapshot:
        self.snapshots.append(seq)
        return learning.Snapshot(seq, f"s{seq}.json", records=self.view.new_records)

    def get_snapshot(self, store_uri: str, namespace: str, deployment: str, seq: int) -> learning.Snapshot:
        return learning.Snapshot(seq, f"s{seq}.json")


async def test_wakes_between_ticks_decide_on_the_last_read():
    """A run's progress or an Adapter of the family wakes the loop often; the store is read once per tick, and again at
    once after the loop changed it (a snapshot written)."""
    source = CountingSource(learning.FeedbackView(new_records=3))
    controller = learning.make_controller(source, tick_seconds=3600)
    kube = RecordingKube()
    ctx = Context(clusters={"local": kube}, cache=Cache(), config=OperatorConfig(), clock=lambda: 1.8e9)  # type: ignore[dict-item]
    dep = o("Deployment", "chat", spec={**DEPLOYMENT_SPEC, "continuousLearning": {"enabled": True, "adapterFamily": "fam", "minNewRecords": 10}},
            meta={"creationTimestamp": "2026-11-29T00:00:00Z"})
    for _ in range(3):
        out = await controller.reconcile(dep, ctx)
    assert source.reads == 1 and out.status["newFeedbackRecords"] == 3 and out.requeue_after == 3600
    source.view = learning.FeedbackView(new_records=12)  # enough now, but not read before the tick...
    controller = learning.make_controller(source, tick_seconds=3600)  # ...or by a new process
    out = await controller.reconcile(dep, ctx)
    assert source.reads == 2 and source.snapshots == [1] and [r["metadata"]["name"] for r in kube.created] == ["chat-learn-1"]
    await controller.reconcile(dep, ctx)
    assert source.reads == 3  # read again right after it wrote a snapshot


async def test_skipped_records_are_told_once_in_a_warning_event_and_not_again_after_a_restart():
    """Damaged records in the store (counted by reason in the `Learning` condition) get a Warning Event when their count
    grows; the same count again, or a restarted operator whose condition already reports it, tells nothing new."""
    source = CountingSource(learning.FeedbackView(new_records=3))
    ctx = Context(clusters={"local": RecordingKube()}, cache=Cache(), config=OperatorConfig(), clock=lambda: 1.8e9)  # type: ignore[dict-item]
    dep = o("Deployment", "chat", spec={**DEPLOYMENT_SPEC, "feedback": {"enabled": True, "storeUri": "file:///store"},
                                        "continuousLearning": {"enabled": True, "adapterFamily": "fam", "minNewRecords": 10}},
            meta={"creationTimestamp": "2026-11-29T00:00:00Z"})

    def warnings(out: Any) -> list[Note]:
        return [n for n in out.notes if n.reason == "FeedbackRecordsSkipped"]

    controller = learning.make_controller(source, tick_seconds=0)
    assert warnings(await controller.reconcile(dep, ctx)) == []
    source.view = learning.FeedbackView(new_records=3, skipped=7, skipped_reason="InvalidJSON 6, TornLine 1 in 2 segment(s), e.g. chat/x.jsonl")
    out = await controller.reconcile(dep, ctx)
    [told] = warnings(out)
    assert told.warning and "7 record(s)" in told.message and "file:///store" in told.message and "chat/x.jsonl" in told.message
    assert "7 record(s) skipped: InvalidJSON 6, TornLine 1" in cond.get(out.status["conditions"], "Learning")["message"]
    dep["status"] = {"conditions": out.status["conditions"]}
    assert warnings(await controller.reconcile(dep, ctx)) == []  # nothing new
    assert warnings(await learning.make_controller(source, tick_seconds=0).reconcile(dep, ctx)) == []  # a restart: told already
    source.view = learning.FeedbackView(new_records=3, skipped=9, skipped_reason="InvalidJSON 8, TornLine 1")
    assert [n.message.split(" record")[0] for n in warnings(await controller.reconcile(dep, ctx))] == ["9"]
