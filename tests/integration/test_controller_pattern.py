"""The controller pattern against the embedded control plane, counted at the server:
write budget, zero idle traffic, zero-write restarts, defaulted children left alone,
terminal outcomes that stick, and the rough edges of issue 10."""

from __future__ import annotations

import json
import time

from harness import API, Cluster, FakeKubelet, wait_for
from test_trainingrun import RESULT, RUBRIC, prerequisites, progress, run_spec

OPERATOR = ("perennial-operator", "kopf")
WRITES = ("create", "update", "patch", "delete", "deletecollection")


def served_watches() -> int:
    """Resources the operator lists: its own kinds and the built-ins it watches that are served here (optional ones
    too where the embedded control plane serves them, as NetworkPolicies; KEDA's are not served here)."""
    from perennial.controllers.manager import BUILTIN_WATCHES, OUR_KINDS
    from perennial.local.store import builtin_types

    here = {(t.group, t.plural) for t in builtin_types()}
    return len(OUR_KINDS) + sum(1 for w in BUILTIN_WATCHES if not w.optional or (w.group, w.plural) in here)


def count(cluster: Cluster, verbs: tuple[str, ...] | None = None, resource: str | None = None) -> int:
    return sum(cluster.server.count(client=c, verb=v, resource=resource) for c in OPERATOR for v in (verbs or (None,)))


def ok(cluster: Cluster, verbs: tuple[str, ...], resource: str) -> int:
    """The operator's requests of these verbs to `resource` that succeeded (2xx)."""
    return sum(r["count"] for r in cluster.server.request_counts()["requests"]
               if r["client"] in OPERATOR and r["verb"] in verbs and r["resource"] == resource and 200 <= int(r["code"]) < 300)


def object_gets(cluster: Cluster) -> int:
    """GETs of single objects (kopf's discovery of API groups aside)."""
    return sum(r["count"] for r in cluster.server.request_counts()["requests"] if r["client"] in OPERATOR and r["verb"] == "get" and not r["resource"].startswith("/"))


def requests(cluster: Cluster) -> int:
    """Everything the operator asked, its long-running watches aside."""
    return count(cluster) - count(cluster, ("watch",))


def acting(cluster: Cluster) -> int:
    """Requests of the operator's own client (kopf's relists and watches under faults aside)."""
    return cluster.server.count(client="perennial-operator")


def quiet(cluster: Cluster, seconds: float = 1.5, timeout: float = 60) -> None:
    """Wait until the operator's own client made no request for `seconds`."""
    deadline = time.monotonic() + timeout
    last, since = acting(cluster), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = acting(cluster)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return
    raise AssertionError("the operator never went quiet")


def test_write_budget_idle_and_restart(clean_cluster: Cluster, tmp_path):
    cluster = clean_cluster
    artifact = tmp_path / "artifacts" / "a"
    artifact.mkdir(parents=True)
    (artifact / "adapter_config.json").write_text("{}")
    n = 8
    cluster.server.reset_request_counts()
    cluster.create("BaseModel", "base", {"source": {"uri": "hf://org/model"}})
    for i in range(n):
        cluster.create("RewardSpec", f"rs{i}", RUBRIC)
        cluster.create("Adapter", f"fam-v{i + 1}", {"baseModelRef": {"name": "base"}, "family": "fam", "version": i + 1, "artifactUri": f"file://{artifact}", "lora": {"rank": 8}})
        cluster.create("TrainingRun", f"wait{i}", run_spec(baseModelRef={"name": "missing"}, rewardSpecRef={"name": "rs0"}))
    for i in range(n):
        cluster.wait_condition("RewardSpec", f"rs{i}", "Validated", "True", "NoTests")
        cluster.wait_condition("Adapter", f"fam-v{i + 1}", "Ready", "True", "Available")
        cluster.wait_condition("TrainingRun", f"wait{i}", "Waiting", "True", "BaseModelNotFound")
    quiet(cluster)
    objects = 3 * n + 1
    status_writes = sum(count(cluster, ("patch", "update"), f"perennial.ai/{p}/status") for p in ("basemodels", "rewardspecs", "adapters", "trainingruns"))
    events = count(cluster, ("create",), "events")
    all_writes = count(cluster, WRITES)
    # RewardSpecs depend on nothing: exactly one write each. Others may see a reference arrive after
    # their first reconcile (watches of different kinds race): at most one more.
    assert count(cluster, ("patch", "update"), "perennial.ai/rewardspecs/status") == n, cluster.server.request_counts()
    assert status_writes <= 2 * objects and events <= status_writes, cluster.server.request_counts()
    assert all_writes == status_writes + events and all_writes <= 3 * objects, cluster.server.request_counts()
    assert object_gets(cluster) == 0, "reads come from the watch-fed cache"
    for kind, name in (("RewardSpec", "rs0"), ("Adapter", "fam-v1"), ("TrainingRun", "wait0"), ("BaseModel", "base")):
        meta = cluster.get(kind, name)["metadata"]
        assert "finalizers" not in meta and "annotations" not in meta, meta

    # Idle: nothing changes, so nothing is asked (resync periods are 1 s here).
    before = requests(cluster)
    time.sleep(3)
    assert requests(cluster) == before

    # Restart: lists and watches, no write, no per-object read.
    cluster.stop_operator()
    cluster.server.reset_request_counts()
    cluster.start_operator()
    wait_for(lambda: count(cluster, ("list",)) >= 10, message="every watched resource listed again")
    quiet(cluster)
    assert count(cluster, WRITES) == 0, cluster.server.request_counts()
    assert object_gets(cluster) == 0, cluster.server.request_counts()
    # one per served watched resource and kopf's CRD scan, whatever the object count
    assert count(cluster, ("list",)) <= served_watches() + 2

    # A reference appearing wakes the runs that wait for it, and nothing else.
    cluster.server.reset_request_counts()
    cluster.create("BaseModel", "missing", {"source": {"uri": "hf://org/model"}})
    for i in range(n):
        wait_for(lambda i=i: cluster.kube.get("batch/v1", "Job", "default", f"wait{i}-train"), message=f"Job of wait{i}")
    quiet(cluster)
    assert count(cluster, ("patch",), "perennial.ai/trainingruns/status") >= n
    assert count(cluster, WRITES, "perennial.ai/rewardspecs/status") == count(cluster, WRITES, "perennial.ai/adapters/status") == 0


def test_running_runs_reach_steady_state_in_three_writes(cluster: Cluster):
    """Creating the Job (status + one Event) and the trainer starting (status) are the only writes to a run:
    the Job controller's bookkeeping (active, startTime) before the pod, the pod's Pending phase and the
    trainer starting make no Event and no write of their own."""
    prerequisites(cluster)
    quiet(cluster)
    cluster.server.reset_request_counts()
    n = 4
    kube = cluster.kube
    for i in range(n):
        cluster.create("TrainingRun", f"steady{i}", run_spec())
    for i in range(n):
        job = wait_for(lambda i=i: kube.get("batch/v1", "Job", "default", f"steady{i}-train"), message=f"Job of steady{i}")
        cluster.wait_condition("TrainingRun", f"steady{i}", "Succeeded", "Unknown", "JobPending")
        # as a real Job controller does: the Job is active (startTime) before its pod exists
        kube.patch("batch/v1", "Job", "default", f"steady{i}-train", {"status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}}, subresource="status")
        kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"steady{i}-train-0", "namespace": "default", "labels": {**job["spec"]["template"]["metadata"].get("labels", {}), "job-name": f"steady{i}-train"},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": f"steady{i}-train", "uid": job["metadata"]["uid"], "controller": True}]},
            "spec": job["spec"]["template"]["spec"]})
        kube.patch("v1", "Pod", "default", f"steady{i}-train-0", {"status": {"phase": "Pending"}}, subresource="status")
    quiet(cluster)
    for i in range(n):
        assert "startTime" not in cluster.get("TrainingRun", f"steady{i}")["status"], "the Job's bookkeeping alone is no reason to write"
        kube.patch("v1", "Pod", "default", f"steady{i}-train-0", {"status": {"phase": "Running", "containerStatuses": [
            {"name": "trainer", "restartCount": 0, "state": {"running": {"startedAt": "2026-01-01T00:00:05Z"}}}]}}, subresource="status")
    for i in range(n):
        cluster.wait_condition("TrainingRun", f"steady{i}", "Started", "True")
        run = cluster.get("TrainingRun", f"steady{i}")
        assert run["status"]["startTime"] == "2026-01-01T00:00:05Z" and run["status"]["attempts"] == 1  # the trainer's own start
    # running trainers' progress is read every second here (time is its trigger): quiet means no more writes
    last, since = -1, time.monotonic()
    while time.monotonic() - since < 2.0:
        time.sleep(0.1)
        if (now := count(cluster, WRITES)) != last:
            last, since = now, time.monotonic()
    # writes that the server took (a write answered with an injected 500, 429 or 409 is sent again: not a write)
    status_writes = ok(cluster, ("patch", "update"), "perennial.ai/trainingruns/status")
    events = ok(cluster, ("create",), "events")
    assert status_writes == 2 * n and events == n, cluster.server.request_counts()
    reasons = [e["reason"] for e in kube.list("v1", "Event", "default") if e["involvedObject"]["name"].startswith("steady")]
    assert sorted(reasons) == ["JobCreated"] * n, reasons


def test_an_object_of_someone_else_with_a_childs_name_is_never_taken_over(cluster: Cluster):
    """A user's own ConfigMap that happens to bear the name of a run's child (not labelled as ours, not owned by
    the run): the operator must not rewrite it, and makes nothing that would depend on it."""
    prerequisites(cluster)
    mine = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "theirs-config", "namespace": "default", "labels": {"team": "search"}},
            "data": {"settings.yaml": "keep: me\n"}}
    cluster.kube.create(mine)
    cluster.create("TrainingRun", "theirs", run_spec())
    wait_for(lambda: cluster.server.count(client="perennial-operator", verb="create", resource="configmaps") >= 1, message="the operator tried")
    time.sleep(2)  # give a wrong operator the time to patch it
    cm = cluster.kube.get("v1", "ConfigMap", "default", "theirs-config")
    assert cm["data"] == {"settings.yaml": "keep: me\n"} and cm["metadata"]["labels"] == {"team": "search"}, cm
    assert not cm["metadata"].get("ownerReferences")
    assert cluster.kube.get("batch/v1", "Job", "default", "theirs-train") is None


def test_defaulted_children_are_left_alone(cluster: Cluster):
    """The control plane defaults every child (Job selector and pod template, PVC, ConfigMap):
    comparing with them must not look like drift."""
    prerequisites(cluster)
    kubelet = FakeKubelet(cluster)
    cluster.create("BaseModel", "cached", {"source": {"uri": "hf://org/model"}, "cache": {"enabled": True, "size": "1Gi"}})
    cluster.create("RewardSpec", "tested", {**RUBRIC, "tests": [{"name": "t", "completion": "<answer>x", "expect": {"min": "0"}}]})
    cluster.create("TrainingRun", "run", run_spec())
    cluster.wait_condition("BaseModel", "cached", "Ready", "False", "Downloading")
    cluster.wait_condition("RewardSpec", "tested", "Validated", "Unknown", "ValidationRunning")
    job = wait_for(lambda: cluster.kube.get("batch/v1", "Job", "default", "run-train"))
    assert job["spec"]["selector"]["matchLabels"] and job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"]  # defaulted
    pod = kubelet.start("run-train")
    kubelet.log(pod, progress(2))
    wait_for(lambda: cluster.get("TrainingRun", "run")["status"].get("progressText") == "2/20")
    quiet(cluster, seconds=0.5)
    cluster.server.reset_request_counts()
    time.sleep(3.5)  # three progress periods of the running trainer; children untouched, status unchanged
    child_writes = sum(count(cluster, WRITES, r) for r in ("batch/jobs", "configmaps", "persistentvolumeclaims"))
    assert child_writes == 0, cluster.server.request_counts()
    assert count(cluster, WRITES) == 0, cluster.server.request_counts()
    assert count(cluster, ("get",), "pods/log") >= 2  # time is the trigger while the trainer runs, and only then


def test_failed_run_stays_failed_when_its_job_goes(cluster: Cluster):
    prerequisites(cluster)
    kubelet = FakeKubelet(cluster)
    cluster.create("TrainingRun", "doomed", run_spec())
    pod = kubelet.start("doomed-train")
    kubelet.finish("doomed-train", pod, exit_code=1, message=json.dumps({"status": "Failed", "reason": "DatasetNotFound", "message": "gone"}), job_condition="Failed", job_reason="PodFailurePolicy")
    cluster.wait_condition("TrainingRun", "doomed", "Succeeded", "False", "DatasetNotFound")
    rv = cluster.get("TrainingRun", "doomed")["metadata"]["resourceVersion"]
    cluster.kube.delete("batch/v1", "Job", "default", "doomed-train", propagation="Background")  # as its TTL does
    wait_for(lambda: cluster.kube.get("batch/v1", "Job", "default", "doomed-train") is None)
    cluster.server.reset_request_counts()
    cluster.restart_operator()
    wait_for(lambda: count(cluster, ("list",)) >= 10, message="every watched resource listed again")
    quiet(cluster)
    assert cluster.kube.get("batch/v1", "Job", "default", "doomed-train") is None
    assert cluster.get("TrainingRun", "doomed")["metadata"]["resourceVersion"] == rv
    assert cluster.condition("TrainingRun", "doomed", "Succeeded")["reason"] == "DatasetNotFound"
    assert not cluster.kube.list(API, "Adapter", "default")


def test_adapter_made_before_a_crash_is_never_made_twice(cluster: Cluster):
    """The operator created the Adapter and died before recording it in the run's status."""
    prerequisites(cluster)
    kubelet = FakeKubelet(cluster)
    cluster.create("TrainingRun", "r", run_spec())
    pod = kubelet.start("r-train")
    cluster.stop_operator()
    run = cluster.get("TrainingRun", "r")
    kubelet.finish("r-train", pod, exit_code=0, message=json.dumps(RESULT), job_condition="Complete")
    cluster.create("Adapter", "fruit-v1", {"baseModelRef": {"name": "base"}, "family": "fruit", "version": 1, "artifactUri": RESULT["artifactUri"], "lora": {"rank": 16},
                                           "lineage": {"trainingRunRef": {"name": "r"}, "trainingRunUid": run["metadata"]["uid"], "method": "GRPO"}})
    cluster.start_operator()
    cluster.wait_condition("TrainingRun", "r", "Succeeded", "True", "AdapterCreated")
    quiet(cluster)
    assert [a["metadata"]["name"] for a in cluster.kube.list(API, "Adapter", "default")] == ["fruit-v1"]
    assert cluster.get("TrainingRun", "r")["status"]["adapterRef"] == {"name": "fruit-v1"}


def test_rewardspec_tests_gate_the_run(cluster: Cluster):
    """A run waits while its RewardSpec's tests run, starts when they pass, and fails fast when they fail."""
    cluster.create("BaseModel", "base", {"source": {"uri": "hf://org/model"}})
    kubelet = FakeKubelet(cluster)
    tested = {**RUBRIC, "tests": [{"name": "t", "completion": "<answer>x", "expect": {"min": "0"}}]}
    cluster.create("RewardSpec", "rubric", tested)
    cluster.create("RewardSpec", "broken", tested)
    cluster.create("TrainingRun", "patient", run_spec())
    cluster.create("TrainingRun", "hopeless", run_spec(rewardSpecRef={"name": "broken"}))
    cluster.wait_condition("TrainingRun", "patient", "Waiting", "True", "RewardSpecNotValidated")
    cluster.wait_condition("TrainingRun", "hopeless", "Waiting", "True", "RewardSpecNotValidated")
    assert cluster.kube.get("batch/v1", "Job", "default", "patient-train") is None

    def finish(rs: str, passed: bool) -> None:
        job = wait_for(lambda: (js := cluster.kube.list("batch/v1", "Job", "default", f"perennial.ai/rewardspec={rs}")) and js[0])
        name = job["metadata"]["name"]
        pod = kubelet.start(name)
        result = {"status": "Succeeded" if passed else "Failed", "message": "1/1 passed" if passed else "0/1 passed; failed: t", "results": [{"name": "t", "passed": passed, "score": "0"}]}
        kubelet.finish(name, pod, exit_code=0 if passed else 1, message=json.dumps(result), job_condition="Complete" if passed else "Failed")

    finish("rubric", True)
    finish("broken", False)
    wait_for(lambda: cluster.kube.get("batch/v1", "Job", "default", "patient-train"), message="the run starts once the tests pass")
    c = cluster.wait_condition("TrainingRun", "hopeless", "Succeeded", "False", "RewardSpecTestsFailed")
    assert "'broken'" in c["message"]
    assert cluster.kube.get("batch/v1", "Job", "default", "hopeless-train") is None
    assert wait_for(lambda: [e for e in cluster.events("hopeless") if e["type"] == "Warning" and e["reason"] == "RewardSpecTestsFailed"])


def test_no_learning_signal_is_reported(cluster: Cluster):
    prerequisites(cluster)
    kubelet = FakeKubelet(cluster)
    cluster.create("TrainingRun", "flat", run_spec())
    pod = kubelet.start("flat-train")
    kubelet.log(pod, "PERENNIAL_PROGRESS " + json.dumps({"step": 4, "totalSteps": 20, "meanReward": 0.0, "fracRewardZeroStd": 1.0, "zeroStdStreak": 3}) + "\n")
    c = cluster.wait_condition("TrainingRun", "flat", "LearningSignal", "False", "NoRewardVariance")
    assert "GRPO is not learning" in c["message"]
    assert wait_for(lambda: [e for e in cluster.events("flat") if e["type"] == "Warning" and e["reason"] == "NoRewardVariance"])
    table = cluster.kube.request("GET", f"/apis/{API}/namespaces/default/trainingruns/flat", query={"includeObject": "None"})
    assert table["status"]["progress"]["fracRewardZeroStd"] == "1"
    result = dict(RESULT, metrics={**RESULT["metrics"], "train/frac_reward_zero_std": 1.0})
    kubelet.finish("flat-train", pod, exit_code=0, message=json.dumps(result), job_condition="Complete")
    cluster.wait_condition("TrainingRun", "flat", "Succeeded", "True", "AdapterCreated")
    assert cluster.condition("TrainingRun", "flat", "LearningSignal")["reason"] == "NoRewardVariance"


def test_chained_runs_applied_at_once(cluster: Cluster):
    """The GRPO run names its parent by TrainingRun: both are applied together; it waits, then continues that Adapter."""
    prerequisites(cluster)
    kubelet = FakeKubelet(cluster)
    sft = run_spec(method="SFT")
    del sft["rewardSpecRef"]
    cluster.create("TrainingRun", "sft", sft)
    cluster.create("TrainingRun", "grpo", run_spec(parentTrainingRunRef={"name": "sft"}))
    cluster.wait_condition("TrainingRun", "grpo", "Waiting", "True", "ParentRunNotFinished")
    pod = kubelet.start("sft-train")
    result = dict(RESULT, artifactUri="file:///artifacts/sft")
    kubelet.finish("sft-train", pod, exit_code=0, message=json.dumps(result), job_condition="Complete")
    cluster.wait_condition("TrainingRun", "sft", "Succeeded", "True", "AdapterCreated")
    # The parent's Adapter exists but its artifact does not: not Ready, so the child keeps waiting.
    cluster.wait_condition("TrainingRun", "grpo", "Waiting", "True", "AdapterNotReady")
    wait_for(lambda: [e for e in cluster.events("sft") if e["reason"] == "AdapterCreated"], message="AdapterCreated Event")
    quiet(cluster)
    assert len([e for e in cluster.events("sft") if e["reason"] == "AdapterCreated"]) == 1


def test_adapter_created_once_per_run(cluster: Cluster):
    prerequisites(cluster)
    kubelet = FakeKubelet(cluster)
    cluster.create("TrainingRun", "once", run_spec())
    pod = kubelet.start("once-train")
    kubelet.finish("once-train", pod, exit_code=0, message=json.dumps(RESULT), job_condition="Complete")
    cluster.wait_condition("TrainingRun", "once", "Succeeded", "True", "AdapterCreated")
    wait_for(lambda: {"AdapterCreated", "JobCreated"} <= {e["reason"] for e in cluster.events("once")}, message="Events")
    quiet(cluster)
    reasons = [e["reason"] for e in cluster.events("once")]
    assert reasons.count("AdapterCreated") == 1 and reasons.count("JobCreated") == 1, reasons


def test_a_hostile_control_plane_is_retried_and_counted(tmp_path):
    """A third of the operator's requests fail (500, 429 with Retry-After, 409): everything converges
    once, without duplicates, and the operator's own metrics show the retries."""
    from harness import running_cluster
    from prometheus_client import REGISTRY

    from perennial.local.faults import FaultConfig

    def retries() -> float:
        return sum(s.value for m in REGISTRY.collect() if m.name == "perennial_api_errors" for s in m.samples if s.name.endswith("_total"))

    before = retries()
    faults = FaultConfig(rate=0.3, faults=("500", "429", "409"), seed=11, retry_after_seconds=1)
    with running_cluster(tmp_path, faults=faults) as cluster:
        prerequisites(cluster)
        kubelet = FakeKubelet(cluster)
        for i in range(6):
            cluster.create("RewardSpec", f"r{i}", RUBRIC)
        cluster.create("TrainingRun", "run", run_spec())
        pod = kubelet.start("run-train")
        kubelet.finish("run-train", pod, exit_code=0, message=json.dumps(RESULT), job_condition="Complete")
        for i in range(6):
            cluster.wait_condition("RewardSpec", f"r{i}", "Ready", "True", timeout=60)
        cluster.wait_condition("TrainingRun", "run", "Succeeded", "True", "AdapterCreated", timeout=60)
        injected = cluster.server.fault_counts()
        assert sum(injected.values()) >= 5, injected
        assert retries() > before
        assert len(cluster.kube.list("batch/v1", "Job", "default", "perennial.ai/trainingrun=run")) == 1
        assert len(cluster.kube.list(API, "Adapter", "default")) == 1


def test_deletions_missed_while_the_watch_was_down_are_noticed(tmp_path):
    """kopf relists after a 410 and reports no deletion: the operator must notice the object is gone."""
    from harness import running_cluster

    from perennial.local.faults import FaultConfig

    # Every watch resumed from a resourceVersion is answered 410 (compacted): kopf can only relist.
    with running_cluster(tmp_path, faults=FaultConfig(rate=1.0, faults=("410",), user_agents=("kopf",))) as cluster:
        cluster.kube.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "weights", "namespace": "default"},
                             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
        cluster.create("BaseModel", "b", {"source": {"uri": "pvc://weights/model"}})
        cluster.wait_condition("BaseModel", "b", "Ready", "True", "SourceAvailable", timeout=30)
        cluster.kube.delete("v1", "PersistentVolumeClaim", "default", "weights")
        cluster.wait_condition("BaseModel", "b", "Ready", "False", "ClaimNotFound", timeout=30)
        assert cluster.server.fault_counts().get("410", 0) > 0


def test_what_an_earlier_operator_left_is_released(clean_cluster: Cluster):
    """Objects from before the controller pattern carry kopf's finalizer and annotations: the operator removes
    them once, so they can be deleted (even one already being deleted)."""
    cluster = clean_cluster
    cluster.stop_operator()
    legacy = {"finalizers": ["perennial.ai/finalizer", "example.com/keep"],
              "annotations": {"perennial.ai/last-handled-configuration": "{}", "perennial.ai/basemodel_resync": "{}", "user/note": "x"}}
    for name in ("old", "leaving"):
        cluster.kube.create({"apiVersion": API, "kind": "BaseModel", "metadata": {"name": name, "namespace": "default", **legacy},
                             "spec": {"source": {"uri": "hf://org/model"}}})
    cluster.kube.delete(API, "BaseModel", "default", "leaving")  # stuck on the old finalizer
    cluster.kube.patch(API, "BaseModel", "default", "leaving", {"metadata": {"finalizers": ["perennial.ai/finalizer"]}})
    cluster.start_operator()
    cluster.wait_condition("BaseModel", "old", "Ready", "True", "SourceAvailable")
    meta = cluster.get("BaseModel", "old")["metadata"]
    assert meta["finalizers"] == ["example.com/keep"] and meta["annotations"] == {"user/note": "x"}
    wait_for(lambda: cluster.get("BaseModel", "leaving") is None, message="the stuck deletion finishes")


async def test_a_watcher_cancelled_as_its_stream_ends_stops(monkeypatch):
    """The operator stopping while one of kopf's watches ends (after every 410 Gone: each watch of
    test_deletions_missed_while_the_watch_was_down_are_noticed) must stop that watcher: kopf's `streaming_block`
    swallowed such a cancellation, the watcher listed and watched again for ever, and the operator never stopped
    (the harness's "operator did not stop"; SIGKILL at the end of a pod's grace period)."""
    import asyncio

    from kopf._cogs.aiokits import aiotoggles
    from kopf._cogs.clients import watching
    from kopf._cogs.configs import configuration

    from perennial.config import OperatorConfig
    from perennial.controllers import listings
    from perennial.runtime import build_registry

    _, manager = build_registry(OperatorConfig(), server="http://127.0.0.1:9")  # installs the operator's stream hooks
    listings.unsubscribe(manager)
    streams = 0
    again = asyncio.Event()
    watcher: asyncio.Task[None] | None = None

    async def one_stream(**_):
        """A stream that ends at once (as on a 410); the stop arrives while the watcher closes it."""
        nonlocal streams
        streams += 1
        if streams == 1:
            asyncio.get_running_loop().call_soon(watcher.cancel)
        else:
            again.set()
        return
        yield

    monkeypatch.setattr(watching, "continuous_watch", one_stream)
    settings = configuration.OperatorSettings()
    settings.watching.reconnect_backoff = 0.01

    async def watch() -> None:
        async for _ in watching.infinite_watch(settings=settings, resource="pods", namespace=None, operator_paused=aiotoggles.ToggleSet(any)):
            pass

    watcher = asyncio.create_task(watch())
    reopened = asyncio.create_task(again.wait())
    try:
        await asyncio.wait([watcher, reopened], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        assert streams == 1, "the watcher was cancelled, yet it opened another stream"
        assert watcher.done() and watcher.cancelled()
    finally:
        watcher.cancel()
        reopened.cancel()
