"""The controller machinery without a server: the work queue, the cache, the change → keys mapping, kopf's listings."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from perennial.config import OperatorConfig
from perennial.controllers import all_controllers, listings
from perennial.controllers.base import Context
from perennial.controllers.manager import Key, Manager
from perennial.controllers.queue import WorkQueue
from perennial.kube.cache import Cache

API = "perennial.ai/v1alpha1"


def o(api: str, kind: str, name: str, rv: str = "1", ns: str = "default", **extra) -> dict:
    meta = {"name": name, "namespace": ns, "uid": f"uid-{kind}-{name}", "resourceVersion": rv, **extra.pop("meta", {})}
    return {"apiVersion": api, "kind": kind, "metadata": meta, **extra}


# ----------------------------------------------------------------------------- queue


async def test_queue_dedupes_serialises_and_reruns_dirty_keys():
    q: WorkQueue[str] = WorkQueue()
    seen: list[str] = []
    gate = asyncio.Event()

    async def process(key: str) -> None:
        seen.append(key)
        if len(seen) == 1:
            q.add("a")  # an event while "a" is processed: "a" runs again afterwards, once
            q.add("a")
            await gate.wait()

    for _ in range(3):
        q.add("a")
    q.add("b")
    workers = asyncio.create_task(q.run_workers(4, process))
    await asyncio.sleep(0.05)
    assert seen.count("a") == 1 and "b" in seen  # never two workers on one key
    gate.set()
    await asyncio.sleep(0.05)
    assert seen.count("a") == 2 and seen.count("b") == 1
    await q.shutdown()
    await asyncio.wait_for(workers, 2)


async def test_queue_add_after_keeps_the_earliest_and_backoff_grows_until_forgotten():
    q: WorkQueue[str] = WorkQueue(base_delay=0.01, max_delay=1.0)
    q.add_after("k", 10)
    q.add_after("k", 0.02)
    q.add_after("k", 5)
    assert q.scheduled == 1
    await asyncio.sleep(0.1)
    assert len(q) == 1 and q.scheduled == 0
    waits = [q.add_rate_limited("x") for _ in range(5)]
    assert waits == sorted(waits) and waits[-1] == pytest.approx(0.16)
    assert q.add_rate_limited("x", delay=0.9) == pytest.approx(0.9)  # the server's Retry-After when longer
    q.forget("x")
    assert q.add_rate_limited("x") == pytest.approx(0.01)
    await q.shutdown()


# ----------------------------------------------------------------------------- cache


def test_cache_indexes_owners_strips_secret_values_and_reports_changes():
    changes = []
    cache = Cache(on_change=lambda old, new: changes.append((old and old["metadata"]["resourceVersion"], new and new["metadata"]["resourceVersion"])))
    job = o("batch/v1", "Job", "j", meta={"uid": "job-uid"})
    pod = o("v1", "Pod", "p", meta={"ownerReferences": [{"uid": "job-uid", "kind": "Job", "name": "j", "apiVersion": "batch/v1"}]})
    cache.put(job)
    cache.put(pod)
    assert [p["metadata"]["name"] for p in cache.owned_by("v1", "Pod", "job-uid")] == ["p"]
    cache.put(dict(pod))  # the same resourceVersion again (a relist, our own write's event): no change
    assert changes == [(None, "1"), (None, "1")]
    cache.put(o("v1", "Pod", "p", rv="2"))  # ownerReference gone
    assert cache.owned_by("v1", "Pod", "job-uid") == []
    cache.put(o("v1", "Secret", "s", data={"token": "c2VjcmV0"}))
    assert cache.get("v1", "Secret", "default", "s")["data"] == {"token": "c2VjcmV0"}  # values kept: pods' output is scrubbed of them
    cache.remove(job)
    assert changes[-1] == ("1", None) and cache.get("batch/v1", "Job", "default", "j") is None
    # A listing taken before our own write landed never takes the cache back.
    cache.put(o("v1", "Pod", "p", rv="1"))
    assert cache.get("v1", "Pod", "default", "p")["metadata"]["resourceVersion"] == "2"


def test_cache_replace_drops_what_a_listing_no_longer_has_but_keeps_newer_writes():
    cache = Cache()
    for name, rv in (("kept", "5"), ("deleted", "3"), ("written-after-the-list", "9")):
        cache.put(o("v1", "PersistentVolumeClaim", name, rv=rv))
    cache.put(o("v1", "PersistentVolumeClaim", "elsewhere", rv="2", ns="other"))
    gone = cache.replace("v1", "PersistentVolumeClaim", "default", {("default", "kept"): "5"})
    assert gone == 1 and cache.get("v1", "PersistentVolumeClaim", "default", "deleted") is None
    assert cache.get("v1", "PersistentVolumeClaim", "default", "written-after-the-list") is not None
    assert cache.get("v1", "PersistentVolumeClaim", "other", "elsewhere") is not None  # another namespace's listing
    assert cache.replace("v1", "PersistentVolumeClaim", None, {}) == 3  # an empty listing: nothing is left


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[object, str]] = []
        self.listings: list[dict] = []

    def observed(self, resource, namespace, raw) -> None:
        self.events.append((raw["type"], raw["object"]["metadata"]["name"]))

    def listed(self, resource, namespace, present) -> None:
        self.listings.append(dict(present))


def test_kopf_streams_through_the_function_we_wrap():
    from kopf._cogs.clients import watching
    from kopf._core.reactor import queueing

    assert "watching.infinite_watch(" in inspect.getsource(queueing.watcher)
    recorder = Recorder()
    listings.subscribe(recorder)
    try:
        assert watching.infinite_watch is listings._infinite_watch
    finally:
        listings.unsubscribe(recorder)


async def test_stream_observer_sees_every_event_and_each_listing_and_passes_everything_through(monkeypatch):
    from kopf._cogs.clients import watching

    stream = [{"type": None, "object": o("v1", "Pod", "a", rv="4")}, watching.Bookmark.LISTED, {"type": "ADDED", "object": o("v1", "Pod", "b")},
              {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}},
              {"type": None, "object": o("v1", "Pod", "b", rv="7")}, watching.Bookmark.LISTED, {"type": "DELETED", "object": o("v1", "Pod", "b")}]

    async def fake(**_):
        for item in stream:
            yield item

    monkeypatch.setattr(listings, "_original", fake)
    recorder = Recorder()
    listings.subscribe(recorder)
    try:
        out = [x async for x in listings._infinite_watch(resource="pods", namespace=None)]
    finally:
        listings.unsubscribe(recorder)
    assert out == stream
    assert recorder.listings == [{("default", "a"): "4"}, {("default", "b"): "7"}]
    assert recorder.events == [(None, "a"), ("ADDED", "b"), (None, "b"), ("DELETED", "b")]

    # A consumed resource's events end with the observer: kopf sees only the listings' ends (and what it skips).
    from types import SimpleNamespace

    pods = SimpleNamespace(group="", plural="pods")
    listings.subscribe(recorder, consumes={("", "pods")})
    try:
        out = [x async for x in listings._infinite_watch(resource=pods, namespace=None)]
    finally:
        listings.unsubscribe(recorder)
    assert out == [watching.Bookmark.LISTED, stream[3], watching.Bookmark.LISTED]
    out = [x async for x in listings._infinite_watch(resource=pods, namespace=None)]  # nobody subscribed: all of it
    assert out == stream


# ----------------------------------------------------------------------------- change → keys


def manager() -> Manager:
    ctx = Context(clusters={}, cache=Cache(), config=OperatorConfig(), clock=lambda: 0.0)
    return Manager(all_controllers(), ctx)


def test_changes_wake_the_object_its_owner_through_jobs_and_its_dependents():
    m = manager()
    run = o(API, "TrainingRun", "r", meta={"generation": 1}, spec={"method": "SFT", "baseModelRef": {"name": "base"}, "datasets": [{"name": "d", "uri": "file:///d"}], "output": {"adapterFamily": "fam"}})
    assert m.keys_for(None, run) == {Key("TrainingRun", "default", "r")}
    m.cache.put(run)
    # status-only changes of an object do not wake it again (generation unchanged)...
    assert Key("TrainingRun", "default", "r") not in m.keys_for(run, {**run, "status": {"phase": "Waiting"}})
    # ...but its references do: the BaseModel it waits for, and Adapters of its family.
    assert m.keys_for(None, o(API, "BaseModel", "base")) == {Key("BaseModel", "default", "base"), Key("TrainingRun", "default", "r")}
    assert m.keys_for(None, o(API, "Adapter", "fam-v1", spec={"family": "fam"})) >= {Key("TrainingRun", "default", "r")}
    # A run chained to another run wakes when that run's Adapter changes (it is named only once made).
    child = o(API, "TrainingRun", "child", meta={"generation": 1}, spec={"method": "SFT", "baseModelRef": {"name": "base"}, "parentTrainingRunRef": {"name": "r"},
                                                                        "datasets": [{"name": "d", "uri": "file:///d"}], "output": {"adapterFamily": "other"}})
    m.cache.put(child)
    made = o(API, "Adapter", "fam-v7", spec={"family": "fam", "lineage": {"trainingRunRef": {"name": "r"}}})
    assert Key("TrainingRun", "default", "child") in m.keys_for(None, made)
    assert Key("TrainingRun", "default", "child") not in m.keys_for(None, o(API, "Adapter", "x-v1", spec={"family": "x", "lineage": {"trainingRunRef": {"name": "elsewhere"}}}))
    assert m.keys_for(None, o(API, "BaseModel", "other")) == {Key("BaseModel", "default", "other")}
    # A pod of its Job wakes it through the Job's ownerReference.
    job = o("batch/v1", "Job", "r-train", meta={"uid": "job-uid", "ownerReferences": [{"apiVersion": API, "kind": "TrainingRun", "name": "r", "uid": "uid-TrainingRun-r"}]})
    m.cache.put(job)
    pod = o("v1", "Pod", "r-train-0", meta={"ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "r-train", "uid": "job-uid"}]})
    assert m.keys_for(None, pod) == {Key("TrainingRun", "default", "r")}
    # An apps/v1 Deployment is never taken for Perennial's Deployment kind.
    assert m.keys_for(None, o("apps/v1", "Deployment", "r")) == set()
    # Once the run is finished it depends on nothing any more.
    done = {**run, "metadata": {**run["metadata"], "resourceVersion": "2"}, "status": {"conditions": [{"type": "Succeeded", "status": "False", "reason": "X"}]}}
    m.keys_for(run, done)
    assert Key("TrainingRun", "default", "r") not in m.keys_for(None, o(API, "BaseModel", "base", rv="3"))


def test_ticker_spreads_first_turns_and_caps_the_total_rate():
    from perennial.controllers.base import Ticker

    now = [100.0]
    t = Ticker(min_interval=5, rate=2, clock=lambda: now[0], rng=lambda: 0.5)
    read, wait = t.poll("a")
    assert not read and wait == pytest.approx(2.5)  # new: its first turn half-way through one interval
    now[0] += 2.5
    assert t.poll("a") == (True, pytest.approx(5))
    assert t.poll("a")[0] is False  # an event-triggered pass in between reads nothing
    for i in range(99):
        t.poll(i)
    assert t.interval() == pytest.approx(50)  # 100 keys at 2 reads/s: each one every 50 s
    t.forget("a")
    assert len(t) == 99


def test_ticker_never_bursts_when_many_keys_arrive_at_once():
    """An operator restart with 1,000 running trainers: their first reads are spread at the capped rate
    (the first keys must not get short intervals because the ticker did not know the others yet)."""
    from perennial.controllers.base import Ticker

    now = [0.0]
    t = Ticker(min_interval=5, rate=20, clock=lambda: now[0], rng=lambda: 0.0)
    waits = sorted(t.poll(i)[1] for i in range(1000))
    reads: list[float] = []
    # run the schedule for 200 s: every key polled when its turn comes
    due = {i: w for i, w in enumerate(waits)}
    while True:
        key = min(due, key=due.get)
        if due[key] > 200:
            break
        now[0] = due[key]
        read, wait = t.poll(key)
        if read:
            reads.append(now[0])
        due[key] = now[0] + wait
    per_second = [sum(1 for r in reads if s <= r < s + 1) for s in range(200)]
    assert max(per_second) <= 21, per_second[:10]
    assert len(reads) >= 20 * 190  # the cap is used, not wasted


async def test_a_resource_never_listed_does_not_hold_reconciles_back_forever():
    """A CRD not installed (kopf never lists it): after READY_TIMEOUT_SECONDS reconciles start anyway."""
    m = manager()
    m._by_plural = {("perennial.ai", "basemodels"): None, ("perennial.ai", "deployments"): None}
    m._listed_once = {("perennial.ai", "basemodels")}
    m._route({Key("BaseModel", "default", "b")})
    assert len(m.queue) == 0  # held until the world is listed
    m._ready_anyway()
    assert len(m.queue) == 1 and m._ready


async def test_a_failed_status_write_still_posts_every_event_of_what_the_pass_did(monkeypatch):
    """The status write failed (409, 5xx): what the pass did stays done, so its Events go now: its own notes and the
    Events it had for other objects or past a message's length (a Deployment's held batch, already taken out of its
    hold); the retry decides from the world again and has nothing left to say about them."""
    import dataclasses

    from perennial.controllers.base import Note, Outcome
    from perennial.kube import ApiError

    m = manager()
    obj = o(API, "RewardSpec", "r", spec={})
    m.cache.put(obj)
    other = o(API, "Adapter", "a")
    posted: list[tuple[str, list[str]]] = []

    async def reconcile(_obj, _ctx):
        return Outcome({"phase": "Ready"}, [Note("Validated", "tests passed")], events=[(other, [Note("Marked", "m")]), (_obj, [Note("More", "x")])])

    async def write_status(*_a, **_k):
        raise ApiError(409, {"message": "conflict"}, "PATCH", "/x")

    async def post_event(target, notes):
        posted.append((target["metadata"]["name"], [n.reason for n in notes]))

    controller = m.controllers["RewardSpec"]
    monkeypatch.setitem(m.controllers, "RewardSpec", dataclasses.replace(controller, reconcile=reconcile))
    monkeypatch.setattr(m, "write_status", write_status)
    monkeypatch.setattr(m, "post_event", post_event)
    await m.process(Key("RewardSpec", "default", "r"))
    assert sorted(posted) == [("a", ["Marked"]), ("r", ["More"]), ("r", ["Validated"])]
    await m.queue.shutdown()
