"""A multi-node TrainingRun's decisions (pure): the engine follows the CRDs the cluster serves, and a group's
outcome reads as one Job's — a failed worker fails the run with the trainer's own word, a complete group makes
exactly one Adapter from rank 0's result, restarts of the group count as attempts."""

from __future__ import annotations

import json

import pytest

from perennial.controllers import trainingrun as tr
from perennial.resources import conditions as cond
from perennial.resources import distributed as dist

from test_decide import BASE, NOW, RESULT, decide_run, good_world, obj, reason, ready, run_spec, started

GROUP = {"gpus": 2, "nodes": 2}


def decide(body: dict, world: tr.World, served=(), unknown=()) -> tr.Decision:
    return tr.decide(body, world, now=NOW, image="trainer:1", artifact_uri="file:///art", feedback_store_uri="file:///fb",
                     progress_seconds=5, served=set(served), unknown=set(unknown))


def kinds(d: tr.Decision) -> list[str]:
    return [c["kind"] for c in d.children]


@pytest.mark.parametrize("served,engine,want", [
    ((), "Auto", ["ConfigMap", "Service", "Job"]),
    ({dist.JOBSET_RESOURCE}, "Auto", ["ConfigMap", "JobSet"]),
    ({dist.JOBSET_RESOURCE, dist.TRAINJOB_RESOURCE}, "Auto", ["ConfigMap", "TrainJob"]),
    ({dist.JOBSET_RESOURCE, dist.TRAINJOB_RESOURCE}, "IndexedJob", ["ConfigMap", "Service", "Job"]),
])
def test_the_group_is_made_on_the_engine_the_cluster_serves(served, engine, want):
    body = obj("TrainingRun", "r", run_spec(resources={**GROUP, "distributed": {"engine": engine}}))
    d = decide(body, good_world(), served)
    assert kinds(d) == want
    assert d.status["engine"] == ("IndexedJob" if "Service" in want else want[-1])
    group = d.children[-1]
    assert group["metadata"]["name"] == "r-train" == d.status["jobName"]
    assert group["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_one_node_stays_a_plain_job():
    d = decide(obj("TrainingRun", "r", run_spec()), good_world(), {dist.JOBSET_RESOURCE, dist.TRAINJOB_RESOURCE})
    assert kinds(d) == ["ConfigMap", "Job"] and d.status["engine"] == "Job"
    assert "completionMode" not in d.children[-1]["spec"]


def test_an_engine_not_served_fails_the_run_at_once():
    body = obj("TrainingRun", "r", run_spec(resources={**GROUP, "distributed": {"engine": "TrainJob"}}))
    d = decide(body, good_world(), {dist.JOBSET_RESOURCE})
    assert reason(d, "Succeeded") == ("False", "EngineNotInstalled") and not d.children and d.status["phase"] == "Failed"
    assert "trainjobs.trainer.kubeflow.org" in cond.get(d.status["conditions"], "Succeeded")["message"]


def test_a_run_whose_engine_depends_on_a_resource_discovery_has_not_answered_for_waits():
    # the operator could not yet tell whether the cluster serves JobSets (discovery failing at start): failing the
    # run as EngineNotInstalled (or starting it on IndexedJob under Auto) would be for good
    for engine, asked in (("JobSet", dist.JOBSET_RESOURCE), ("Auto", dist.TRAINJOB_RESOURCE)):
        body = obj("TrainingRun", "r", run_spec(resources={**GROUP, "distributed": {"engine": engine}}))
        d = decide(body, good_world(), (), unknown={dist.JOBSET_RESOURCE, dist.TRAINJOB_RESOURCE})
        assert reason(d, "Waiting") == ("True", "EngineDiscovery") and reason(d, "Succeeded") == ("Unknown", "EngineDiscovery")
        assert not d.children and d.status["phase"] != "Failed" and "completionTime" not in d.status
        assert asked in cond.get(d.status["conditions"], "Waiting")["message"]


def test_a_trainjob_waits_for_the_credentials_secret_it_lists_key_by_key():
    base = ready("BaseModel", "base", {**BASE, "source": {**BASE["source"], "credentialsSecretRef": {"name": "hf"}}})
    body = obj("TrainingRun", "r", run_spec(resources=GROUP))
    served = {dist.TRAINJOB_RESOURCE}
    d = decide(body, good_world(base=base), served)
    assert reason(d, "Succeeded") == ("Unknown", "SecretNotFound") and not d.children
    d = decide(body, good_world(base=base, secret_keys={"hf": ["HF_TOKEN"]}), served)
    env = d.children[-1]["spec"]["trainer"]["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}} in env


def _jobset(conditions=None, restarts=0) -> dict:
    return {"apiVersion": dist.JOBSET_API, "kind": "JobSet", "metadata": {"name": "r-train", "namespace": "default", "uid": "js-uid"},
            "spec": {"replicatedJobs": []}, "status": {"restarts": restarts, "conditions": conditions or []}}


def _trainjob(conditions=None) -> dict:
    return {"apiVersion": dist.TRAINJOB_API, "kind": "TrainJob", "metadata": {"name": "r-train", "namespace": "default", "uid": "tj-uid"},
            "spec": {"trainer": {"env": []}}, "status": {"conditions": conditions or []}}


def _pod(phase, terminated=None):
    state = {"terminated": terminated} if terminated else {"running": {}}
    return {"metadata": {"name": "r-train-node-0-0-x", "namespace": "default", "creationTimestamp": NOW},
            "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "restartCount": 0, "state": state}]}}


GROUP_RUN = obj("TrainingRun", "r", run_spec(resources=GROUP), started()["status"])


@pytest.mark.parametrize("group", [_jobset([{"type": "Failed", "status": "True", "reason": "FailedJobs", "message": "jobset failed", "lastTransitionTime": NOW}], restarts=2),
                                   _trainjob([{"type": "Failed", "status": "True", "reason": "FailedJobs", "message": "failed", "lastTransitionTime": NOW}])])
def test_a_failed_group_fails_the_run_with_the_failed_workers_word(group):
    term = {"exitCode": 11, "message": json.dumps({"status": "Failed", "reason": "DatasetNotFound", "message": "no file"})}
    d = decide(GROUP_RUN, tr.World(job=group, pod=_pod("Failed", term)))
    assert reason(d, "Succeeded") == ("False", "DatasetNotFound") and d.status["phase"] == "Failed"
    assert d.status["engine"] == group["kind"]
    # without the worker's word: the engine's
    d = decide(GROUP_RUN, tr.World(job=group, pod=_pod("Failed", {"exitCode": 1})))
    assert reason(d, "Succeeded")[0] == "False" and reason(d, "Succeeded")[1] == "FailedJobs"


def test_a_complete_group_makes_exactly_one_adapter_from_rank_zeros_result():
    done = _jobset([{"type": "Completed", "status": "True", "lastTransitionTime": NOW}], restarts=1)
    d = decide(GROUP_RUN, tr.World(job=done, pod=_pod("Succeeded", {"exitCode": 0, "message": json.dumps(RESULT)})))
    assert d.adapter["metadata"]["name"] == "fam-v1" and reason(d, "Succeeded") == ("True", "AdapterCreated")
    assert d.status["attempts"] == 2  # the group restarted once, then succeeded


def test_a_running_group_counts_its_restarts_as_attempts():
    d = decide(GROUP_RUN, tr.World(job=_jobset(restarts=2), pod=_pod("Running")))
    assert reason(d, "Succeeded") == ("Unknown", "Training") and d.status["attempts"] == 3  # two restarts, the third attempt runs


def test_pods_of_a_jobset_and_of_a_trainjob_are_found_through_their_jobs():
    from perennial.kube.cache import Cache

    cache = Cache()

    def put(api, kind, name, uid, owner_uid=None, **extra):
        o = {"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": "default", "uid": uid, "resourceVersion": "1"}, **extra}
        if owner_uid:
            o["metadata"]["ownerReferences"] = [{"apiVersion": "x", "kind": "y", "name": "z", "uid": owner_uid, "controller": True}]
        cache.put(o)

    put(dist.TRAINJOB_API, "TrainJob", "r-train", "tj")
    put(dist.JOBSET_API, "JobSet", "r-train", "js", "tj")
    put("batch/v1", "Job", "r-train-node-0", "j", "js")
    put("v1", "Pod", "r-train-node-0-0-a", "p0", "j")
    put("v1", "Pod", "r-train-node-0-1-b", "p1", "j")
    put("v1", "Pod", "unrelated", "p2", "other")
    tj = tr.group_object(cache, "default", "r-train")
    assert tj["kind"] == "TrainJob"  # not the JobSet it made, which has its name
    assert sorted(p["metadata"]["name"] for p in tr.group_pods(cache, tj)) == ["r-train-node-0-0-a", "r-train-node-0-1-b"]
    js = cache.get(dist.JOBSET_API, "JobSet", "default", "r-train")
    assert sorted(p["metadata"]["name"] for p in tr.group_pods(cache, js)) == ["r-train-node-0-0-a", "r-train-node-0-1-b"]


@pytest.mark.parametrize(("answers", "served"), [
    ({"jobset.x-k8s.io": {"resources": [{"name": "jobsets"}]}, "trainer.kubeflow.org": 404}, {dist.JOBSET_RESOURCE}),
    ({"jobset.x-k8s.io": {"resources": [{"name": "jobsets"}]}, "trainer.kubeflow.org": {"resources": [{"name": "trainjobs"}]}},
     {dist.JOBSET_RESOURCE, dist.TRAINJOB_RESOURCE}),
    ({"jobset.x-k8s.io": 404, "trainer.kubeflow.org": {"resources": [{"name": "trainingruntimes"}]}}, set()),
    ({"jobset.x-k8s.io": 403, "trainer.kubeflow.org": 404}, set()),  # cannot tell: not counted as served
])
def test_the_manager_records_which_engines_the_cluster_serves(answers, served):
    import asyncio

    from perennial.config import OperatorConfig
    from perennial.controllers import all_controllers
    from perennial.controllers.base import Context
    from perennial.controllers.manager import Manager
    from perennial.kube import ApiError
    from perennial.kube.cache import Cache

    class Kube:
        async def request(self, method, path, **_):
            answer = answers.get(path.split("/")[2], 404)
            if isinstance(answer, int):
                raise ApiError(answer, {"message": "injected"}, method, path)
            return answer

    ctx = Context(clusters={"local": Kube()}, cache=Cache(), config=OperatorConfig(), clock=lambda: 0.0)  # type: ignore[dict-item]
    m = Manager(all_controllers(), ctx)
    m._by_plural = {(w.group, w.plural): w for w in m.watched()}
    asyncio.run(m._skip_unserved([w for w in m._by_plural.values() if w.group in answers]))
    assert ctx.served == served
