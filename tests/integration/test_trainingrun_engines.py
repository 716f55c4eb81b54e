"""Multi-node TrainingRuns against the embedded control plane: the operator runs the group on the engine whose CRD
the cluster serves (an indexed Job and a headless Service without any; a JobSet or a Kubeflow TrainJob when their
CRDs are installed), and a group's outcome is the run's — one failed worker fails the run with the trainer's own
word, a complete group makes the Adapter. The test plays the engines' controllers and the kubelet."""

from __future__ import annotations

import json
import time
from pathlib import Path

from harness import API, Cluster, running_cluster, wait_for

from perennial.resources import distributed as dist

RESULT = {"status": "Succeeded", "artifactUri": "file:///art/default/big", "metrics": {"train/loss": 0.1}}
NOW = "2026-01-01T00:10:00Z"


def engine_crd(group: str, version: str, plural: str, kind: str) -> dict:
    """A stand-in CRD of an engine, so that the API server serves its resource (the engines' own schemas are
    checked against the builders in tests/unit/test_distributed_resources.py)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "listKind": f"{kind}List"},
            "versions": [{"name": version, "served": True, "storage": True, "subresources": {"status": {}},
                          "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
        },
    }


JOBSET_CRD = engine_crd("jobset.x-k8s.io", "v1alpha2", "jobsets", "JobSet")
TRAINJOB_CRD = engine_crd("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob")


def prerequisites(c: Cluster) -> None:
    c.create("BaseModel", "base", {"source": {"uri": "hf://org/model"}})
    c.wait_condition("BaseModel", "base", "Ready", "True")


def group_run(c: Cluster, name: str, engine: str = "Auto") -> None:
    c.create("TrainingRun", name, {
        "method": "SFT", "baseModelRef": {"name": "base"}, "datasets": [{"name": "d", "uri": "pvc://data/train.jsonl"}],
        "output": {"adapterFamily": name}, "resources": {"gpus": 2, "nodes": 2, "distributed": {"engine": engine}},
    })


def pod(c: Cluster, name: str, owner: dict, labels: dict, index: int, phase: str, message: str = "", exit_code: int = 0) -> None:
    c.kube.create({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {**labels, dist.COMPLETION_INDEX: str(index)},
                     "ownerReferences": [{"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
                                          "uid": owner["metadata"]["uid"], "controller": True}]},
        "spec": {"containers": [{"name": "trainer", "image": "trainer:test"}]},
    })
    state = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
    if phase in ("Succeeded", "Failed"):
        state = {"terminated": {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error", "message": message, "finishedAt": NOW}}
    c.kube.patch("v1", "Pod", "default", name, {"status": {"phase": phase, "containerStatuses": [{"name": "trainer", "restartCount": 0, "state": state}]}}, subresource="status")


def test_without_engine_crds_the_group_is_an_indexed_job_and_one_failed_worker_fails_the_run(cluster: Cluster):
    prerequisites(cluster)
    group_run(cluster, "big")
    job = wait_for(lambda: cluster.kube.get("batch/v1", "Job", "default", "big-train"), message="indexed Job")
    svc = wait_for(lambda: cluster.kube.get("v1", "Service", "default", "big-train"), message="headless Service")
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 2, 2)
    assert svc["spec"]["clusterIP"] == "None" and job["spec"]["template"]["spec"]["subdomain"] == "big-train"
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--nnodes") + 1] == "2" and args[args.index("--rdzv-endpoint") + 1] == "big-train-0.big-train.default.svc:29400"
    wait_for(lambda: (cluster.get("TrainingRun", "big").get("status") or {}).get("engine") == "IndexedJob", message="status.engine")
    # no JobSet was tried: the cluster does not serve it
    labels = job["spec"]["template"]["metadata"]["labels"]
    pod(cluster, "big-train-0-a", job, labels, 0, "Running")
    pod(cluster, "big-train-1-a", job, labels, 1, "Running")
    cluster.kube.patch("batch/v1", "Job", "default", "big-train", {"status": {"active": 2, "startTime": "2026-01-01T00:00:00Z"}}, subresource="status")
    cluster.wait_condition("TrainingRun", "big", "Succeeded", "Unknown", "Training")
    # worker 1 hits a permanent trainer error: the Job fails as a whole (its podFailurePolicy) and so does the run
    pod(cluster, "big-train-1-b", job, labels, 1, "Failed", json.dumps({"status": "Failed", "reason": "DatasetNotFound", "message": "no such file"}), 11)
    cluster.kube.patch("batch/v1", "Job", "default", "big-train", {"status": {"active": 0, "failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "pod failed", "lastTransitionTime": NOW}]}}, subresource="status")
    failed = cluster.wait_condition("TrainingRun", "big", "Succeeded", "False", timeout=30)
    assert failed["reason"] == "DatasetNotFound" and "no such file" in failed["message"]
    assert cluster.kube.get(dist.JOBSET_API, "JobSet", "default", "big-train") is None


def _install(c: Cluster, *crds: dict) -> None:
    for crd in crds:
        c.kube.apply(crd)
    wait_for(lambda: all(c.kube.request("GET", f"/apis/{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}") for crd in crds), message="CRDs served")
    c.restart_operator()  # found at start too (installed while it runs: test_engine_crds_installed_and_removed_...)


def test_with_the_jobset_crd_the_group_is_a_jobset_and_its_completion_makes_the_adapter(tmp_path: Path):
    with running_cluster(tmp_path) as c:
        _install(c, JOBSET_CRD)
        prerequisites(c)
        group_run(c, "big")
        js = wait_for(lambda: c.kube.get(dist.JOBSET_API, "JobSet", "default", "big-train"), message="JobSet")
        assert c.kube.get("batch/v1", "Job", "default", "big-train") is None  # not also an indexed Job
        assert c.kube.get("v1", "Service", "default", "big-train") is None  # JobSet makes its own
        rj = js["spec"]["replicatedJobs"][0]
        assert rj["template"]["spec"]["completions"] == 2 and js["spec"]["failurePolicy"]["maxRestarts"] == 2
        wait_for(lambda: (c.get("TrainingRun", "big").get("status") or {}).get("engine") == "JobSet", message="status.engine")
        # play the JobSet controller: one child Job of two pods, a restart, then success
        child = c.kube.create({"apiVersion": "batch/v1", "kind": "Job", "metadata": {
            "name": "big-train-node-0", "namespace": "default", "labels": rj["template"]["metadata"]["labels"],
            "ownerReferences": [{"apiVersion": dist.JOBSET_API, "kind": "JobSet", "name": "big-train", "uid": js["metadata"]["uid"], "controller": True}]},
            "spec": rj["template"]["spec"]})
        labels = rj["template"]["spec"]["template"]["metadata"]["labels"]
        pod(c, "big-train-node-0-0-a", child, labels, 0, "Running")
        pod(c, "big-train-node-0-1-a", child, labels, 1, "Running")
        c.kube.patch(dist.JOBSET_API, "JobSet", "default", "big-train", {"status": {"restarts": 1}}, subresource="status")
        c.wait_condition("TrainingRun", "big", "Succeeded", "Unknown", "Training", timeout=30)
        wait_for(lambda: (c.get("TrainingRun", "big").get("status") or {}).get("attempts") == 2, message="attempts counted from the JobSet's restarts")
        c.kube.patch("v1", "Pod", "default", "big-train-node-0-1-a", {"status": {"phase": "Succeeded", "containerStatuses": [
            {"name": "trainer", "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": "", "finishedAt": NOW}}}]}}, subresource="status")
        c.kube.patch("v1", "Pod", "default", "big-train-node-0-0-a", {"status": {"phase": "Succeeded", "containerStatuses": [
            {"name": "trainer", "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": json.dumps(RESULT), "finishedAt": NOW}}}]}}, subresource="status")
        c.kube.patch(dist.JOBSET_API, "JobSet", "default", "big-train", {"status": {"restarts": 1, "terminalState": "Completed", "conditions": [
            {"type": "Completed", "status": "True", "reason": "AllJobsCompleted", "message": "jobset completed successfully", "lastTransitionTime": NOW}]}}, subresource="status")
        done = c.wait_condition("TrainingRun", "big", "Succeeded", "True", "AdapterCreated", timeout=30)
        assert "big-v1" in done["message"]
        adapter = c.get("Adapter", "big-v1")
        assert adapter["spec"]["artifactUri"] == RESULT["artifactUri"]
        time.sleep(1)
        assert [a["metadata"]["name"] for a in c.kube.list(API, "Adapter", "default")] == ["big-v1"]


def test_with_the_trainjob_crd_the_group_is_a_trainjob_and_an_engine_not_served_fails_the_run(tmp_path: Path):
    with running_cluster(tmp_path) as c:
        prerequisites(c)
        # before the CRDs: TrainJob asked for by name is refused at once
        group_run(c, "named", engine="TrainJob")
        refused = c.wait_condition("TrainingRun", "named", "Succeeded", "False", "EngineNotInstalled")
        assert "trainjobs.trainer.kubeflow.org" in refused["message"]
        _install(c, JOBSET_CRD, TRAINJOB_CRD)
        group_run(c, "big")
        tj = wait_for(lambda: c.kube.get(dist.TRAINJOB_API, "TrainJob", "default", "big-train"), message="TrainJob")
        assert c.kube.get(dist.JOBSET_API, "JobSet", "default", "big-train") is None  # the TrainJob makes it, not us
        assert tj["spec"]["trainer"]["numNodes"] == 2 and tj["spec"]["trainer"]["numProcPerNode"] == 2
        assert tj["spec"]["runtimeRef"]["name"] == "torch-distributed"
        wait_for(lambda: (c.get("TrainingRun", "big").get("status") or {}).get("engine") == "TrainJob", message="status.engine")
        c.kube.patch(dist.TRAINJOB_API, "TrainJob", "default", "big-train", {"status": {"conditions": [
            {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "trainjob exceeded its deadline", "lastTransitionTime": NOW}]}}, subresource="status")
        failed = c.wait_condition("TrainingRun", "big", "Succeeded", "False", timeout=60)
        assert failed["reason"] == "DeadlineExceeded"


def _engine_requests(c: Cluster) -> int:
    """The operator's requests to the engines' resources (lists and watches of kopf, creates of ours)."""
    return sum(r["count"] for r in c.server.request_counts()["requests"]
               if r["client"] != "test" and r["resource"].split("/")[:2] in (["jobset.x-k8s.io", "jobsets"], ["trainer.kubeflow.org", "trainjobs"]))


def watch_stopped(caplog, resource: str) -> bool:
    """kopf's last word on its watch-stream of `resource` (`<plural>.<version>.<group>`) is that it stopped."""
    said = [m for r in caplog.records for m in [r.getMessage()] if m.startswith((f"Starting the watch-stream for {resource} ",
                                                                                 f"Stopping the watch-stream for {resource} "))]
    return bool(said) and said[-1].startswith("Stopping")


#: longer than the first two waits of a watch whose resource is gone (listings.GONE_BACKOFF_SECONDS): a watch that
#: kopf did not stop would list again within it
QUIET_WINDOW_SECONDS = 7.0


def test_engine_crds_installed_and_removed_while_the_operator_runs(cluster: Cluster, caplog):
    """No restart: a run created after the engines' CRDs appear runs on them; one that started keeps its engine (its
    group made again on the same engine, never moved); a removed CRD stops its watch quietly and new runs fall back."""
    import logging

    c = cluster
    prerequisites(c)
    group_run(c, "before")
    first = wait_for(lambda: c.kube.get("batch/v1", "Job", "default", "before-train"), message="indexed Job")
    wait_for(lambda: (c.get("TrainingRun", "before").get("status") or {}).get("engine") == "IndexedJob", message="status.engine")

    for crd in (JOBSET_CRD, TRAINJOB_CRD):
        c.kube.apply(crd)
    # the operator learns of them from its watch of CRDs (not at once): once it watches their kinds, it uses them
    for resource in ("jobset.x-k8s.io/jobsets", "trainer.kubeflow.org/trainjobs"):
        wait_for(lambda r=resource: c.server.count(verb="watch", resource=r), timeout=30, message=f"the operator watches {resource}")
    group_run(c, "after")
    wait_for(lambda: c.kube.get(dist.TRAINJOB_API, "TrainJob", "default", "after-train"), timeout=30, message="TrainJob, without a restart")
    wait_for(lambda: (c.get("TrainingRun", "after").get("status") or {}).get("engine") == "TrainJob", message="status.engine")
    assert c.kube.get("batch/v1", "Job", "default", "after-train") is None

    # A run that started keeps its engine: its indexed Job, deleted, is made again as an indexed Job.
    c.kube.delete("batch/v1", "Job", "default", "before-train")

    def remade() -> dict | None:
        for _, api, kind in dist.GROUP_KINDS:
            if (o := c.kube.get(api, kind, "default", "before-train")) is not None and o["metadata"]["uid"] != first["metadata"]["uid"]:
                return o
        return None

    again = wait_for(remade, timeout=30, message="the run's group made again")
    assert (again["kind"], again["spec"].get("completionMode")) == ("Job", "Indexed"), again["kind"]
    assert (c.get("TrainingRun", "before").get("status") or {}).get("engine") == "IndexedJob"

    # TrainJob's CRD removed (its TrainJobs go with it): the run on it fails (never moved to another engine), new runs
    # use JobSet; then JobSet's removed too: new runs are indexed Jobs again.
    caplog.clear()
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="kopf._cogs.clients.watching")
    c.kube.delete("apiextensions.k8s.io/v1", "CustomResourceDefinition", None, "trainjobs.trainer.kubeflow.org")
    failed = c.wait_condition("TrainingRun", "after", "Succeeded", "False", "EngineNotInstalled", timeout=30)
    assert "TrainJob" in failed["message"], failed
    group_run(c, "later")
    wait_for(lambda: c.kube.get(dist.JOBSET_API, "JobSet", "default", "later-train"), timeout=30, message="JobSet")
    assert c.kube.get(dist.TRAINJOB_API, "TrainJob", "default", "later-train") is None
    c.kube.delete("apiextensions.k8s.io/v1", "CustomResourceDefinition", None, "jobsets.jobset.x-k8s.io")
    group_run(c, "last")
    wait_for(lambda: c.kube.get("batch/v1", "Job", "default", "last-train"), timeout=30, message="an indexed Job again")
    wait_for(lambda: (c.get("TrainingRun", "last").get("status") or {}).get("engine") == "IndexedJob", message="status.engine")

    # The watches of the removed kinds ended cleanly: kopf stopped them, no more requests to them, no errors logged.
    wait_for(lambda: watch_stopped(caplog, "trainjobs.v1alpha1.trainer.kubeflow.org") and watch_stopped(caplog, "jobsets.v1alpha2.jobset.x-k8s.io"),
             timeout=60, message="kopf stopped its watches of the removed kinds")
    c.server.reset_request_counts()
    time.sleep(QUIET_WINDOW_SECONDS)
    assert _engine_requests(c) == 0, c.server.request_counts()
    assert watch_stopped(caplog, "trainjobs.v1alpha1.trainer.kubeflow.org") and watch_stopped(caplog, "jobsets.v1alpha2.jobset.x-k8s.io")
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR and any(k in r.getMessage() for k in ("trainjobs", "jobsets", "TrainJob", "JobSet"))]
    assert not noisy, [r.getMessage() for r in noisy]

    # Installed again: watched again, used again.
    c.kube.apply(JOBSET_CRD)
    wait_for(lambda: c.server.count(verb="watch", resource="jobset.x-k8s.io/jobsets"), timeout=30, message="the operator watches jobsets again")
    group_run(c, "again")
    wait_for(lambda: c.kube.get(dist.JOBSET_API, "JobSet", "default", "again-train"), timeout=30, message="JobSet again")


def test_a_run_waits_while_discovery_cannot_tell_whether_its_engine_is_served(tmp_path: Path, monkeypatch):
    # At start the API server's discovery fails for JobSet's group (5xx, over and over): reconciles start anyway
    # after READY_TIMEOUT_SECONDS, but a run naming JobSet must not fail for good as EngineNotInstalled (nor an
    # Auto run start on an indexed Job because TrainJob/JobSet looked absent): they wait, and go on once discovery
    # answers (here: not served, as no CRD is installed).
    from perennial.controllers import manager
    from perennial.kube import ApiError
    from perennial.kube.aio import AsyncKube

    failing = {f"/apis/{dist.JOBSET_API}", f"/apis/{dist.TRAINJOB_API}"}
    request = AsyncKube.request

    async def flaky(self, method, path, *args, **kwargs):
        if path in failing:
            raise ApiError(503, {"kind": "Status", "message": "injected: discovery unavailable"}, method, path)
        return await request(self, method, path, *args, **kwargs)

    monkeypatch.setattr(AsyncKube, "request", flaky)
    monkeypatch.setattr(manager, "READY_TIMEOUT_SECONDS", 2.0)
    monkeypatch.setattr(manager, "DISCOVERY_ATTEMPTS", 2)
    monkeypatch.setattr(manager, "DISCOVERY_RETRY_SECONDS", 0.5)
    with running_cluster(tmp_path) as c:
        prerequisites(c)
        group_run(c, "named", engine="JobSet")
        group_run(c, "auto")
        for name in ("named", "auto"):
            waiting = c.wait_condition("TrainingRun", name, "Waiting", "True", "EngineDiscovery", timeout=30)
            assert "not known yet" in waiting["message"]
        time.sleep(2)  # several discovery retries later: still waiting, nothing made
        assert c.condition("TrainingRun", "named", "Succeeded")["status"] == "Unknown"
        assert c.kube.get("batch/v1", "Job", "default", "auto-train") is None
        failing.clear()  # discovery answers: neither engine CRD is installed
        refused = c.wait_condition("TrainingRun", "named", "Succeeded", "False", "EngineNotInstalled", timeout=30)
        assert "jobsets.jobset.x-k8s.io" in refused["message"]
        wait_for(lambda: c.kube.get("batch/v1", "Job", "default", "auto-train"), timeout=30, message="the Auto run's indexed Job")
        # the status that names the engine is written after the children (a reader may see the Job first)
        wait_for(lambda: (c.get("TrainingRun", "auto").get("status") or {}).get("engine"), timeout=30, message="the Auto run's engine in its status")
        assert c.get("TrainingRun", "auto")["status"]["engine"] == "IndexedJob"
