"""The local kubelet runs the Pods of Jobs of mapped images as processes against the embedded control plane."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from perennial.kube import connect
from perennial.kube.client import Kube
from perennial.local.apiserver import start_in_thread
from perennial.local.kubelet import LocalKubelet
from waiting import wait_for

NS = "default"


class Env:
    def __init__(self, server: Any, kube: Kube, tmp: Path):
        self.server, self.kube, self.tmp = server, kube, tmp
        self.kubelet: LocalKubelet | None = None

    def start_kubelet(self) -> LocalKubelet:
        self.kubelet = LocalKubelet(self.kube, self.server, workdir=self.tmp / "pods", pvc_root=self.tmp / "pvc",
                                    images={"tiny:1": [sys.executable, "-c"]}, poll_seconds=0.05,
                                    restart_delay_seconds=0.05, kill_grace_seconds=2)
        return self.kubelet.start()

    def job(self, name: str, script: str, *, args: list[str] | None = None, restart: str = "Never", backoff: int = 0,
            image: str = "tiny:1", **spec: Any) -> dict[str, Any]:
        container: dict[str, Any] = {"name": "main", "image": image, "args": [textwrap.dedent(script), *(args or [])]}
        container.update(spec.pop("container", {}))
        pod_spec: dict[str, Any] = {"restartPolicy": restart, "containers": [container]}
        pod_spec.update(spec.pop("pod", {}))
        return self.kube.create({
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": NS},
            "spec": {"backoffLimit": backoff, "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec}, **spec},
        })

    def get_job(self, name: str) -> dict[str, Any]:
        job = self.kube.get("batch/v1", "Job", NS, name)
        assert job is not None
        return job

    def pods(self, job: str) -> list[dict[str, Any]]:
        return sorted(self.kube.list("v1", "Pod", NS, f"job-name={job}"), key=lambda p: p["metadata"]["creationTimestamp"])

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        for c in (self.get_job(name).get("status") or {}).get("conditions") or []:
            if c["type"] == type_ and c["status"] == "True":
                return c
        return None


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    server = start_in_thread()
    e = Env(server, connect(server=server.url), tmp_path)
    try:
        yield e
    finally:
        if e.kubelet is not None:
            e.kubelet.stop()
        server.stop()


def test_job_runs_with_volumes_env_and_termination_message(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOST_SECRET", "leaked")
    env.kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo", "namespace": NS},
                     "data": {"greeting": "hello from a configmap", "mode": "fast"}})
    env.kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": NS},
                     "stringData": {"token": "s3cret", "REGION": "local"}})
    script = """
        import os, sys, pathlib
        print("line one", flush=True)
        print("greeting:", pathlib.Path(sys.argv[1]).read_text())
        print("only item:", sorted(os.listdir(os.environ["DEMO_DIR"])))
        print("token:", os.environ["TOKEN"], "region:", os.environ["CREDS_REGION"], "mode:", os.environ["MODE"])
        print("host secret:", os.environ.get("HOST_SECRET"), "offline:", os.environ["HF_HUB_OFFLINE"])
        pathlib.Path(sys.argv[2], "scratch.txt").write_text("x")
        pathlib.Path(os.environ["PERENNIAL_TERMINATION_LOG"]).write_text('{"status": "Succeeded"}')
        print("pvc root ok:", os.path.isdir(os.environ["PERENNIAL_PVC_ROOT"]), "cwd:", os.getcwd())
        print("line last")
    """
    env.start_kubelet()
    env.job("demo", script, args=["/etc/demo/greeting", "/scratch"], container={
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "DEMO_DIR", "value": "/etc/demo"},
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "demo", "key": "mode"}}}],
        "envFrom": [{"secretRef": {"name": "creds"}, "prefix": "CREDS_"}],
        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/demo"}, {"name": "scratch", "mountPath": "/scratch"}],
    }, pod={"volumes": [{"name": "cfg", "configMap": {"name": "demo", "items": [{"key": "greeting", "path": "greeting"}]}},
                        {"name": "scratch", "emptyDir": {}}]})

    wait_for(lambda: env.condition("demo", "Complete"), message="Job Complete")
    job = env.get_job("demo")
    assert env.condition("demo", "SuccessCriteriaMet")
    assert job["status"]["succeeded"] == 1 and job["status"]["active"] == 0
    assert job["status"]["startTime"] and job["status"]["completionTime"]
    [pod] = env.pods("demo")
    meta = pod["metadata"]
    assert meta["name"].startswith("demo-") and len(meta["name"]) == len("demo-") + 5
    assert meta["labels"]["app"] == "demo" and meta["labels"]["controller-uid"] == job["metadata"]["uid"]
    assert meta["labels"]["batch.kubernetes.io/job-name"] == "demo"
    assert meta["ownerReferences"][0]["uid"] == job["metadata"]["uid"] and meta["ownerReferences"][0]["controller"]
    assert pod["status"]["phase"] == "Succeeded"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    assert terminated["message"] == '{"status": "Succeeded"}'

    text = env.kube.pod_log(NS, meta["name"])
    assert text.startswith("line one\n") and text.rstrip().endswith("line last")
    assert "greeting: hello from a configmap" in text
    assert "only item: ['greeting']" in text
    assert "token: s3cret region: local mode: fast" in text
    assert "host secret: None offline: 1" in text
    pod_dir = env.tmp / "pods" / NS / meta["name"]
    assert "pvc root ok: True" in text and f"cwd: {pod_dir}" in text
    assert (pod_dir / "volumes" / "scratch" / "scratch.txt").read_text() == "x"
    assert (pod_dir / "log").read_text() == text


def test_log_streams_while_running(env: Env) -> None:
    env.start_kubelet()
    env.job("stream", """
        import time
        print("started", flush=True)
        time.sleep(30)
    """)
    pod = wait_for(lambda: env.pods("stream"), message="pod")[0]
    wait_for(lambda: "started" in env.kube.pod_log(NS, pod["metadata"]["name"]), message="streamed line")
    running = env.pods("stream")[0]
    assert running["status"]["phase"] == "Running"
    assert "startedAt" in running["status"]["containerStatuses"][0]["state"]["running"]
    assert env.get_job("stream")["status"]["active"] == 1


def test_failing_job_never_creates_new_pods_until_backoff_limit(env: Env) -> None:
    env.start_kubelet()
    env.job("fail", "import sys; print('boom'); sys.exit(3)", backoff=1)
    wait_for(lambda: env.condition("fail", "Failed"), message="Job Failed")
    assert env.condition("fail", "Failed")["reason"] == "BackoffLimitExceeded"
    job = env.get_job("fail")
    assert job["status"]["failed"] == 2 and job["status"]["active"] == 0 and not env.condition("fail", "Complete")
    pods = env.pods("fail")
    assert len(pods) == 2
    for pod in pods:
        assert pod["status"]["phase"] == "Failed"
        term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert term["exitCode"] == 3 and term["reason"] == "Error"
        assert env.kube.pod_log(NS, pod["metadata"]["name"]) == "boom\n"
    time.sleep(0.3)
    assert len(env.pods("fail")) == 2  # no third attempt


def test_on_failure_restarts_in_the_same_pod_and_keeps_empty_dir(env: Env) -> None:
    env.start_kubelet()
    env.job("retry", """
        import os, sys
        marker = os.path.join(sys.argv[1], "checkpoint")
        if os.path.exists(marker):
            print("resumed from", open(marker).read())
            sys.exit(0)
        open(marker, "w").write("step-5")
        print("crashing")
        sys.exit(7)
    """, args=["/ckpt"], restart="OnFailure", backoff=2, container={
        "volumeMounts": [{"name": "ckpt", "mountPath": "/ckpt"}]}, pod={"volumes": [{"name": "ckpt", "emptyDir": {}}]})
    wait_for(lambda: env.condition("retry", "Complete"), message="Job Complete")
    [pod] = env.pods("retry")
    status = pod["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 7
    assert status["state"]["terminated"]["exitCode"] == 0
    assert env.get_job("retry")["status"]["failed"] == 1
    log_text = env.kube.pod_log(NS, pod["metadata"]["name"])
    assert "crashing" in log_text and "resumed from step-5" in log_text


def test_deleting_a_running_job_kills_its_process(env: Env) -> None:
    env.start_kubelet()
    env.job("sleeper", """
        import os, sys, time
        open(os.path.join(sys.argv[1], "pid"), "w").write(str(os.getpid()))
        time.sleep(60)
    """, args=["/data"], container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
        pod={"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "claim"}}]})
    pid_file = env.tmp / "pvc" / "claim" / "pid"
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), message="pid file"))
    os.kill(pid, 0)  # alive
    env.kube.delete("batch/v1", "Job", NS, "sleeper")

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, message="process killed")
    wait_for(lambda: not env.kubelet.running(), message="worker exit")  # type: ignore[union-attr]
    assert env.pods("sleeper") == []


def test_active_deadline_kills_and_fails_the_job(env: Env) -> None:
    env.start_kubelet()
    env.job("slow", "import time; time.sleep(60)", backoff=3, activeDeadlineSeconds=1)
    wait_for(lambda: env.condition("slow", "Failed"), message="Job Failed")
    assert env.condition("slow", "Failed")["reason"] == "DeadlineExceeded"
    [pod] = env.pods("slow")
    assert pod["status"]["phase"] == "Failed" and pod["status"]["reason"] == "DeadlineExceeded"


def test_unmapped_image_is_left_alone(env: Env) -> None:
    kubelet = env.start_kubelet()
    env.job("foreign", "print('never')", image="somebody-else:1")
    env.job("mine", "print('ran')")
    wait_for(lambda: env.condition("mine", "Complete"), message="mapped Job Complete")
    kubelet.sync_once()
    assert env.pods("foreign") == []
    assert not (env.get_job("foreign").get("status") or {}).get("active")


def test_restarted_kubelet_marks_lost_pod_failed_and_retries(env: Env) -> None:
    kubelet = env.start_kubelet()
    env.job("lost", """
        import os, sys, time
        marker = os.path.join(sys.argv[1], "first-attempt")
        if os.path.exists(marker):
            print("second attempt")
            sys.exit(0)
        open(marker, "w").write("")
        time.sleep(60)
    """, args=["/data"], backoff=2, container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
        pod={"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "lost"}}]})
    wait_for(lambda: (env.tmp / "pvc" / "lost" / "first-attempt").exists(), message="first attempt")
    first = env.pods("lost")[0]["metadata"]["name"]
    kubelet.stop()
    assert env.pods("lost")[0]["status"]["phase"] == "Running"  # the node vanished: the API still says Running

    env.start_kubelet()
    wait_for(lambda: env.condition("lost", "Complete"), message="Job Complete")
    pods = {p["metadata"]["name"]: p for p in env.pods("lost")}
    assert len(pods) == 2
    assert pods[first]["status"]["phase"] == "Failed" and pods[first]["status"]["reason"] == "NodeLost"
    [second] = [p for n, p in pods.items() if n != first]
    assert second["status"]["phase"] == "Succeeded"
    assert env.get_job("lost")["status"]["failed"] == 1


def test_deleted_pod_counts_as_a_failure_and_is_replaced(env: Env) -> None:
    env.start_kubelet()
    env.job("evicted", """
        import os, sys, time
        marker = os.path.join(sys.argv[1], "pid")
        if os.path.exists(marker):
            sys.exit(0)
        open(marker, "w").write(str(os.getpid()))
        time.sleep(60)
    """, args=["/data"], backoff=1, container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
        pod={"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "evicted"}}]})
    pid_file = env.tmp / "pvc" / "evicted" / "pid"
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), message="pid file"))
    first = env.pods("evicted")[0]["metadata"]["name"]
    env.kube.delete("v1", "Pod", NS, first)
    wait_for(lambda: env.condition("evicted", "Complete"), message="Job Complete")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    [second] = env.pods("evicted")
    assert second["metadata"]["name"] != first and second["status"]["phase"] == "Succeeded"
    assert env.get_job("evicted")["status"]["failed"] == 1


def test_a_late_look_at_the_deleted_pod_does_not_kill_its_replacement(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kubelet's loop may look at the worker between its handling of a deleted pod and the creation of the
    replacement: the worker still named the deleted pod, so the loop cancelled it again "PodDeleted", and the
    replacement was killed as if it had been deleted (a second failure: BackoffLimitExceeded, or a stall). The loop is
    made to look at exactly that moment."""
    from perennial.local.kubelet import _JobWorker

    kubelet = env.start_kubelet()
    created: list[str | None] = []
    original = _JobWorker._create_pod

    def create_pod(self: _JobWorker) -> dict[str, Any]:
        created.append(self.pod_name)
        if len(created) == 2:
            kubelet.sync_once()  # the loop looks now: the deleted pod is still absent from the list
        return original(self)

    monkeypatch.setattr(_JobWorker, "_create_pod", create_pod)
    env.job("late", """
        import os, sys, time
        marker = os.path.join(sys.argv[1], "pid")
        if os.path.exists(marker):
            time.sleep(1)
            sys.exit(0)
        open(marker, "w").write(str(os.getpid()))
        time.sleep(60)
    """, args=["/data"], backoff=1, container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
        pod={"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "late"}}]})
    pid_file = env.tmp / "pvc" / "late" / "pid"
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), message="pid file")
    first = env.pods("late")[0]["metadata"]["name"]
    env.kube.delete("v1", "Pod", NS, first)
    wait_for(lambda: env.condition("late", "Complete") or env.condition("late", "Failed"), 60, message="Job finished")
    assert env.condition("late", "Complete"), env.get_job("late")["status"]
    assert env.get_job("late")["status"]["failed"] == 1 and len(created) == 2


def test_missing_config_map_waits_then_runs(env: Env) -> None:
    env.start_kubelet()
    env.job("later", "import sys; print(open(sys.argv[1]).read())", args=["/cfg/k"],
            container={"volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}]},
            pod={"volumes": [{"name": "cfg", "configMap": {"name": "late"}}]})

    def waiting_reason() -> str | None:
        pods = env.pods("later")
        statuses = pods[0]["status"].get("containerStatuses") if pods else None
        return ((statuses or [{}])[0].get("state") or {}).get("waiting", {}).get("reason")

    assert wait_for(lambda: waiting_reason() == "CreateContainerConfigError", message="config error")
    assert not env.condition("later", "Complete")
    env.kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "late", "namespace": NS}, "data": {"k": "value"}})
    wait_for(lambda: env.condition("later", "Complete"), message="Job Complete")
    assert env.kube.pod_log(NS, env.pods("later")[0]["metadata"]["name"]) == "value\n"


def test_max_parallel_holds_back_extra_jobs(env: Env) -> None:
    kubelet = LocalKubelet(env.kube, env.server, workdir=env.tmp / "pods", pvc_root=env.tmp / "pvc",
                           images={"tiny:1": [sys.executable, "-c"]}, poll_seconds=0.05, max_parallel=1)
    env.kubelet = kubelet.start()
    env.job("first", "import time; time.sleep(60)")
    wait_for(lambda: env.pods("first"), message="first pod")
    env.job("second", "print('ok')")
    time.sleep(0.3)
    assert env.pods("second") == []
    env.kube.delete("batch/v1", "Job", NS, "first")
    wait_for(lambda: env.condition("second", "Complete"), message="second Job Complete")


# ---------------------------------------------------------------- podFailurePolicy

POLICY = {"rules": [
    {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [10, 11]}},
    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    {"action": "Count", "onExitCodes": {"operator": "NotIn", "values": [10, 11]}},
]}

# Counts attempts on a PVC; exits with the code of its attempt (argv[2:]), 0 after the list.
ATTEMPTS = """
    import os, sys
    marker = os.path.join(sys.argv[1], "attempts")
    n = int(open(marker).read()) if os.path.exists(marker) else 0
    open(marker, "w").write(str(n + 1))
    codes = [int(c) for c in sys.argv[2:]]
    print("attempt", n + 1)
    sys.exit(codes[n] if n < len(codes) else 0)
"""


def _attempts_job(env: Env, name: str, codes: list[int], backoff: int) -> None:
    env.job(name, ATTEMPTS, args=["/data", *map(str, codes)], backoff=backoff, podFailurePolicy=POLICY,
            container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
            pod={"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}]})


def test_fail_job_rule_fails_the_job_at_once_with_kubernetes_reason_and_message(env: Env) -> None:
    env.start_kubelet()
    _attempts_job(env, "permanent", [11], backoff=5)
    wait_for(lambda: env.condition("permanent", "Failed"), message="Job Failed")
    [pod] = env.pods("permanent")  # no retry although backoffLimit is 5
    failed = env.condition("permanent", "Failed")
    assert failed["reason"] == "PodFailurePolicy"
    assert failed["message"] == (f"Container main for pod {NS}/{pod['metadata']['name']} failed with exit code 11 "
                                 "matching FailJob rule at index 0")
    assert env.condition("permanent", "FailureTarget")["reason"] == "PodFailurePolicy"
    assert env.get_job("permanent")["status"]["failed"] == 1
    time.sleep(0.3)
    assert len(env.pods("permanent")) == 1 and (env.tmp / "pvc" / "permanent" / "attempts").read_text() == "1"


def test_count_rule_and_unmatched_failures_count_against_backoff_limit(env: Env) -> None:
    env.start_kubelet()
    _attempts_job(env, "transient", [1, 1, 1], backoff=1)
    wait_for(lambda: env.condition("transient", "Failed"), message="Job Failed")
    assert env.condition("transient", "Failed")["reason"] == "BackoffLimitExceeded"
    assert env.get_job("transient")["status"]["failed"] == 2 and len(env.pods("transient")) == 2

    _attempts_job(env, "flaky", [1], backoff=1)  # one transient failure, then success
    wait_for(lambda: env.condition("flaky", "Complete"), message="Job Complete")
    assert env.get_job("flaky")["status"]["failed"] == 1 and len(env.pods("flaky")) == 2


def test_ignore_rule_replaces_the_pod_without_counting(env: Env) -> None:
    ignore_exit_3 = {"rules": [{"action": "Ignore", "onExitCodes": {"operator": "In", "values": [3]}}]}
    env.start_kubelet()
    env.job("ignored", ATTEMPTS, args=["/data", "3", "3"], backoff=0, podFailurePolicy=ignore_exit_3,
            container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
            pod={"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "ignored"}}]})
    wait_for(lambda: env.condition("ignored", "Complete"), message="Job Complete")
    assert env.get_job("ignored")["status"]["failed"] == 0  # backoffLimit 0, yet two failed pods were replaced
    assert sorted(p["status"]["phase"] for p in env.pods("ignored")) == ["Failed", "Failed", "Succeeded"]


def test_lost_pod_is_a_disruption_the_policy_ignores(env: Env) -> None:
    kubelet = env.start_kubelet()
    env.job("disrupted", """
        import os, sys, time
        marker = os.path.join(sys.argv[1], "first-attempt")
        if os.path.exists(marker):
            sys.exit(0)
        open(marker, "w").write("")
        time.sleep(60)
    """, args=["/data"], backoff=0, podFailurePolicy=POLICY,
        container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
        pod={"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "disrupted"}}]})
    wait_for(lambda: (env.tmp / "pvc" / "disrupted" / "first-attempt").exists(), message="first attempt")
    kubelet.stop()
    env.start_kubelet()
    wait_for(lambda: env.condition("disrupted", "Complete"), message="Job Complete")
    pods = env.pods("disrupted")
    [first] = [p for p in pods if p["status"].get("reason") == "NodeLost"]
    [second] = [p for p in pods if p is not first]
    assert any(c["type"] == "DisruptionTarget" and c["status"] == "True" for c in first["status"]["conditions"])
    assert second["status"]["phase"] == "Succeeded"
    assert env.get_job("disrupted")["status"]["failed"] == 0  # backoffLimit 0 and not failed: the loss was not counted


def test_match_pod_failure_policy_table() -> None:
    from perennial.local.kubelet import match_pod_failure_policy

    def pod(code: int | None = None, name: str = "main", conditions: list[dict] | None = None) -> dict:
        statuses = [] if code is None else [{"name": name, "state": {"terminated": {"exitCode": code}}}]
        return {"metadata": {"namespace": "ns", "name": "p"}, "status": {"containerStatuses": statuses, "conditions": conditions or []}}

    assert match_pod_failure_policy(None, pod(10)) == (None, None)
    assert match_pod_failure_policy(POLICY, pod(10)) == ("FailJob", "Container main for pod ns/p failed with exit code 10 matching FailJob rule at index 0")
    assert match_pod_failure_policy(POLICY, pod(10, name="sidecar")) == (None, None)  # containerName restricts rule 0; 10 is not NotIn [10, 11]
    assert match_pod_failure_policy(POLICY, pod(12, name="sidecar")) == ("Count", None)
    assert match_pod_failure_policy(POLICY, pod(1)) == ("Count", None)
    assert match_pod_failure_policy(POLICY, pod(0)) == (None, None)  # exit code 0 never matches
    disrupted = [{"type": "DisruptionTarget", "status": "True"}]
    assert match_pod_failure_policy(POLICY, pod(137, conditions=disrupted)) == ("Ignore", None)
    assert match_pod_failure_policy(POLICY, pod(10, conditions=disrupted)) == ("FailJob", "Container main for pod ns/p failed with exit code 10 matching FailJob rule at index 0")
    fail_on_condition = {"rules": [{"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget"}]}]}
    assert match_pod_failure_policy(fail_on_condition, pod(conditions=disrupted)) == ("FailJob", "Pod ns/p has condition DisruptionTarget matching FailJob rule at index 0")
    assert match_pod_failure_policy(fail_on_condition, pod(conditions=[{"type": "DisruptionTarget", "status": "False"}])) == (None, None)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie nobody reaps (PID 1 of a container may not) is gone too


def test_job_pod_processes_do_not_outlive_a_killed_kubelet(tmp_path: Path) -> None:
    """`perennial dev` killed (SIGKILL, OOM, a crash) runs no stop(): a training Job's process, in a session of its
    own, went on for hours holding its memory (and a GPU) with nobody left to stop it or read its result. The
    container's processes (the trainer and what it started) now end once the kubelet's process is gone."""
    import subprocess

    pidfile = tmp_path / "pids"
    job_script = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(1)'])\n"
        f"open({str(pidfile)!r} + '.tmp', 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        f"os.rename({str(pidfile)!r} + '.tmp', {str(pidfile)!r})\n"
        "while True: time.sleep(1)\n"
    )
    owner_code = textwrap.dedent(f"""
        import sys, time
        from perennial.kube import connect
        from perennial.local.apiserver import start_in_thread
        from perennial.local.kubelet import LocalKubelet
        server = start_in_thread()
        kube = connect(server=server.url)
        LocalKubelet(kube, server, workdir={str(tmp_path / 'pods')!r}, pvc_root={str(tmp_path / 'pvc')!r},
                     images={{"tiny:1": [sys.executable, "-c"]}}, poll_seconds=0.05).start()
        kube.create({{"apiVersion": "batch/v1", "kind": "Job", "metadata": {{"name": "long", "namespace": "default"}},
                     "spec": {{"backoffLimit": 0, "template": {{"spec": {{"restartPolicy": "Never", "containers": [
                         {{"name": "main", "image": "tiny:1", "args": [{job_script!r}]}}]}}}}}}}})
        time.sleep(600)
    """)
    owner = subprocess.Popen([sys.executable, "-c", owner_code])
    pids: list[int] = []
    try:
        wait_for(pidfile.exists, 60, 0.1, "the Job's process and its child started")
        pids = [int(p) for p in pidfile.read_text().split()]
        assert all(_alive(p) for p in pids)  # alive while the kubelet is
        owner.kill()
        owner.wait()
        wait_for(lambda: not any(_alive(p) for p in pids), 60, 0.1, "the orphaned Job processes exited")
    finally:
        owner.kill()
        owner.wait()
        for p in pids:
            if _alive(p):
                os.kill(p, 9)


def test_a_job_of_several_pods_at_once_is_refused_with_the_reason(env: Env) -> None:
    """A multi-node TrainingRun's indexed Job: this runtime runs one process per Job (and its pods could not reach each
    other by DNS name), so the Job fails at once saying why, instead of one pod waiting for a rendezvous forever."""
    env.start_kubelet()
    env.job("group", "print('never runs')", completionMode="Indexed", completions=2, parallelism=2)
    env.job("single", "print('ok')")
    failed = wait_for(lambda: env.condition("group", "Failed"), 20, message="group Job failed")
    assert failed["reason"] == "UnsupportedLocally" and "resources.nodes" in failed["message"]
    assert env.pods("group") == []
    wait_for(lambda: env.condition("single", "Complete"), 30, message="one-pod Job still runs")
