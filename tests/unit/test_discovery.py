"""Optional CRDs (LeaderWorkerSet, JobSet, TrainJob, KEDA) installed or removed while the operator runs, without a
server: the manager follows kopf's watch of CustomResourceDefinitions and its listings; a watch whose resource is no
longer served ends quietly. (Against the embedded control plane: tests/integration/test_trainingrun_engines.py and
test_deployment_lws.py.)"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from kopf._cogs.clients import errors as kopf_errors
from kopf._cogs.clients import watching

from perennial.config import OperatorConfig
from perennial.controllers import all_controllers, children, listings
from perennial.controllers.base import Context
from perennial.controllers.manager import CRDS, Key, Manager
from perennial.kube.cache import Cache

API = "perennial.ai/v1alpha1"
LWS = SimpleNamespace(group="leaderworkerset.x-k8s.io", plural="leaderworkersets")
CRD_RESOURCE = SimpleNamespace(group=CRDS[0], plural=CRDS[1])
LWS_ID = "leaderworkersets.leaderworkerset.x-k8s.io"


def obj(api: str, kind: str, name: str, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "resourceVersion": "1", **meta}}


def lws_crd(versions: tuple[tuple[str, bool], ...] = (("v1", True),), **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": LWS_ID, **meta},
            "spec": {"group": LWS.group, "names": {"plural": LWS.plural, "kind": "LeaderWorkerSet"},
                     "versions": [{"name": v, "served": s} for v, s in versions]}}


@pytest.fixture
def m() -> Manager:
    ctx = Context(clusters={}, cache=Cache(), config=OperatorConfig(), clock=lambda: 0.0)
    manager = Manager(all_controllers(), ctx)
    for w in manager.watched():
        manager._by_plural[(w.group, w.plural)] = w
    return manager


async def _on_loop(m: Manager) -> None:
    m._loop = asyncio.get_running_loop()  # streams of this operator's loop only
    m._ready = True


async def test_a_crd_installed_while_running_counts_once_listed_and_wakes_the_deployments_that_wait_for_it(m: Manager):
    await _on_loop(m)
    m.cache.put(obj(API, "Deployment", "big"))
    m.cache.put(obj(API, "TrainingRun", "run"))
    m.queue = type(m.queue)()  # what the puts woke
    children._unserved[("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")] = 0.0
    m.observed(CRD_RESOURCE, None, {"type": "ADDED", "object": lws_crd()})
    assert LWS_ID not in m.ctx.served, "served once listed (the cache whole), not when the CRD appears"
    m.listed(LWS, None, {})
    assert LWS_ID in m.ctx.served
    assert not children.is_unserved("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
    assert m.queue._queued == {Key("Deployment", "default", "big")}  # the TrainingRun: not woken (it picks at its next reconcile)
    m.queue = type(m.queue)()
    m.listed(LWS, None, {})  # listed again (a relist): no second wake
    assert len(m.queue) == 0


@pytest.mark.parametrize("event", [
    {"type": "DELETED", "object": lws_crd()},
    {"type": "MODIFIED", "object": lws_crd(deletionTimestamp="2026-01-01T00:00:00Z")},
    {"type": "MODIFIED", "object": lws_crd(versions=(("v1", False), ("v2", True)))},
])
async def test_a_crd_removed_or_no_longer_serving_our_version_is_unserved_and_its_objects_leave_the_cache(m: Manager, event):
    await _on_loop(m)
    m.ctx.served.add(LWS_ID)
    owner = obj(API, "Deployment", "big")
    m.cache.put(owner)
    m.cache.put(obj("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "big-blue", ownerReferences=[
        {"apiVersion": API, "kind": "Deployment", "name": "big", "uid": "uid-big"}]))
    m.queue = type(m.queue)()
    m.observed(CRD_RESOURCE, None, {"type": "MODIFIED", "object": {**lws_crd(), "metadata": {"name": "other.example.com"},
                                                                   "spec": {"group": "example.com", "names": {"plural": "other"}}}})
    assert LWS_ID in m.ctx.served  # another CRD: nothing
    m.observed(CRD_RESOURCE, None, event)
    assert LWS_ID not in m.ctx.served
    assert m.cache.list("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet") == []
    assert Key("Deployment", "default", "big") in m.queue._queued  # its owner looks again


async def test_a_watch_whose_resource_is_no_longer_served_waits_quietly_and_lists_again(monkeypatch, caplog):
    calls = []

    async def original(**_: Any):
        calls.append(1)
        if len(calls) < 3:
            raise kopf_errors.APINotFoundError({"message": "the server could not find the requested resource"}, status=404, headers={})
        yield {"type": None, "object": obj("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "a")}
        yield watching.Bookmark.LISTED

    monkeypatch.setattr(listings, "_original", original)
    monkeypatch.setattr(listings, "GONE_BACKOFF_SECONDS", (0.01,))
    import logging

    caplog.set_level(logging.DEBUG, logger="perennial.controllers.listings")
    out = [x async for x in listings._infinite_watch(resource=LWS, namespace=None)]
    assert len(calls) == 3 and out[-1] is watching.Bookmark.LISTED
    assert [r.levelname for r in caplog.records if "no longer serves" in r.getMessage()] == ["INFO", "DEBUG"]  # said once, never an error


def test_kopfs_warning_of_unresolved_kinds_is_dropped_when_it_names_only_optional_ones():
    import logging

    from perennial.controllers import manager as mgr

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("kopf._core.reactor.observation", logging.WARNING, __file__, 1, message, None, None)

    lws_sel = "Selector(group='leaderworkerset.x-k8s.io', version='v1', any_name='leaderworkersets')"
    keda_sel = "Selector(group='keda.sh', version='v1alpha1', any_name='scaledobjects')"
    ours = "Selector(group='perennial.ai', version='v1alpha1', any_name='trainingruns')"
    f = mgr._QUIET_OPTIONAL
    assert not f.filter(record(f"Unresolved resources cannot be served (try creating their CRDs): {lws_sel}, {keda_sel}"))
    assert f.filter(record(f"Unresolved resources cannot be served (try creating their CRDs): {lws_sel}, {ours}"))  # our own CRD missing
    assert f.filter(record("Something else entirely"))
    m = Manager(all_controllers(), Context(clusters={}, cache=Cache(), config=OperatorConfig(), clock=lambda: 0.0))
    import kopf

    m.register(kopf.OperatorRegistry())
    m.register(kopf.OperatorRegistry())
    assert logging.getLogger("kopf._core.reactor.observation").filters.count(f) == 1
    listings.unsubscribe(m)
