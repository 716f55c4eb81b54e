"""Operator at scale: the operator and the embedded control plane in separate processes, on 127.0.0.1.

For each kind and size N (default 1,000 and 10,000; `--quick`: 200) it starts a fresh
`perennial control-plane` and measures:

  * raw create throughput: the N objects created with no operator running (objects/s, a thread
    pool of `--concurrency` (16) threads over the `kubernetes` client, `perennial.kube`'s `Kube`);
  * convergence: a fresh control plane with the operator (`perennial run`, its own process)
    running, the same N creates by the same client; objects/s from the first create until a
    watch shows every object with the expected condition at the current `observedGeneration`
    (then confirmed by a LIST);
    and convergence / raw (target >= 0.5);
  * writes and reads per object by the operator (its own client `perennial-operator` plus
    `kopf`), counted by the control plane (`/debug/perennial/requests`) from the first create
    until the operator is quiet: writes to the objects themselves (status), Events, children
    (ConfigMaps, Jobs) and other; target <= 3 writes per object (children apart);
  * idle: requests/s of the operator and CPU% of each process over `--idle-seconds` (60),
    targets 0 requests/s (progress reads of running TrainingRuns are time-triggered by design:
    reported apart) and < 1 % of a core;
  * RSS per object of each process (VmRSS before the creates and after convergence);
  * restart: SIGTERM, start again, writes (target 0) and reads by verb (target: list/watch
    only, no per-object get) until the operator is quiet, and the time that took.

Kinds: RewardSpecs without tests (Ready=True); waiting TrainingRuns (their BaseModel does not
exist: Waiting=True); running TrainingRuns (BaseModel and RewardSpec Ready: the operator makes a
ConfigMap + Job per run, this script plays the Job controller and kubelet from a watch on Jobs:
the Job's status `active: 1`, a Pod owned by it in phase Running, Started=True); Adapters (a
`file://` artifact with `adapter_config.json`, their BaseModel exists: Ready=True); Deployments
(one replica serving a pinned Adapter: the first blue-green rollout, preview, smoke test, switch,
to Ready=True and Progressing=False; this script plays the ReplicaSet controller, kubelet,
sidecars, kube-proxy and engines: `ServingCluster`). Pod logs cannot be written over HTTP (the
embedded server feeds them in-process only), so running pods have no log lines: the operator's
progress reads find an empty log.

The operator logs plain text (`BENCH_OPERATOR_LOG_FORMAT=json`: with timestamps, for a timeline; `--keep-logs`).

Nothing is asserted: targets print as met / not met; the exit status is 0 unless something
crashed. Every wait is bounded; both processes are killed on exit (Ctrl-C too) and the temp
directory removed. Usage:

    python benchmarks/operator_scale.py [--quick] [--sizes 1000 10000] [--kinds rewardspec waiting running adapter deployment]
                                        [--idle-seconds 60] [--concurrency 16] [--keep-logs]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import kubernetes
import yaml

HOST = "127.0.0.1"  # never anything else
NS = "default"
API = "perennial.ai/v1alpha1"
GROUP = "perennial.ai"
REPO = Path(__file__).resolve().parent.parent
PERENNIAL = str(Path(sys.executable).with_name("perennial"))
BENCH_UA = "OpenAPI-Generator/perennial-bench"  # the benchmark's own requests: classified apart from the operator's
OPERATOR_CLIENTS = ("perennial-operator", "kopf")
CLK_TCK = os.sysconf("SC_CLK_TCK")
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
READ_VERBS = ("get", "list", "watch")
PROGRESS_RESOURCE = "pods/log"  # time-triggered progress reads of running TrainingRuns
KINDS = ("rewardspec", "waiting", "running", "adapter", "deployment")
KIND_OF = {"rewardspec": "RewardSpec", "waiting": "TrainingRun", "running": "TrainingRun", "adapter": "Adapter", "deployment": "Deployment"}
PLURAL_OF = {"RewardSpec": "rewardspecs", "TrainingRun": "trainingruns", "Adapter": "adapters", "Deployment": "deployments"}
#: the condition each kind converges to
EXPECTED = {"rewardspec": ("Ready", "True"), "waiting": ("Waiting", "True"), "running": ("Started", "True"), "adapter": ("Ready", "True"),
            "deployment": ("Ready", "True")}
#: and, for some kinds, more conditions that must hold too (a Deployment's first rollout done, not only serving)
ALSO_EXPECTED = {"deployment": (("Progressing", "False"),)}
#: the children of each kind's objects (their writes are counted apart from the <= 3 writes per object)
CHILDREN = {"running": ("configmaps", "batch/jobs", "networking.k8s.io/networkpolicies"),
            "deployment": ("apps/deployments", "services", "configmaps", "secrets", "policy/poddisruptionbudgets",
                           "autoscaling/horizontalpodautoscalers", "networking.k8s.io/networkpolicies")}


class Interrupted(Exception):
    pass


def own_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# ----------------------------------------------------------------------------- processes


class Proc:
    """A child process in its own session, logging to a file; CPU and RSS from /proc."""

    def __init__(self, name: str, argv: list[str], logfile: Path, env: dict[str, str] | None = None):
        self.name = name
        self.logfile = logfile
        self._log = open(logfile, "ab")
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, cwd=REPO, start_new_session=True)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime (fields 14, 15)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> float:
        """SIGTERM, wait (bounded), SIGKILL if needed; returns seconds to exit."""
        t0 = time.monotonic()
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not exit {timeout:.0f}s after SIGTERM: SIGKILL")
                self.kill()
        self._log.close()
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if not self._log.closed:
            self._log.close()


class ControlPlane:
    def __init__(self, workdir: Path, procs: list[Proc]):
        self.port = free_port()
        self.state = workdir / f"cp-{self.port}"
        self.url = f"http://{HOST}:{self.port}"
        self.proc = Proc("control plane", [PERENNIAL, "control-plane", "--host", HOST, "--port", str(self.port), "--state-dir", str(self.state)],
                         workdir / f"control-plane-{self.port}.log")
        procs.append(self.proc)
        wait_until(lambda: self._started(), 90, "the control plane to start", 0.2)
        self.kubeconfig = self.state / "kubeconfig"
        # the control plane serves HTTPS with a bearer token: both come from the kubeconfig it wrote
        cfg = yaml.safe_load(self.kubeconfig.read_text())
        cluster, user = cfg["clusters"][0]["cluster"], cfg["users"][0]["user"]
        self.url = cluster["server"]
        self.ca_pem = base64.b64decode(cluster["certificate-authority-data"]).decode()
        self.ssl = ssl.create_default_context(cadata=self.ca_pem)
        self.headers = {"Authorization": f"Bearer {user['token']}"}

    def _started(self) -> bool:
        if not self.proc.alive():
            raise RuntimeError(f"the control plane exited:\n{self.proc.tail()}")
        return "Press Ctrl-C" in self.proc.logfile.read_text(errors="replace")

    def requests(self) -> list[dict[str, Any]]:
        req = urllib.request.Request(f"{self.url}/debug/perennial/requests", headers=self.headers)
        with urllib.request.urlopen(req, timeout=30, context=self.ssl) as r:
            return json.loads(r.read())["requests"]

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.url}/debug/perennial/requests", method="DELETE", headers=self.headers)
        with urllib.request.urlopen(req, timeout=30, context=self.ssl) as r:
            r.read()


def operator_env() -> tuple[dict[str, str], dict[str, str]]:
    """The operator's environment: ours, minus anything that would point it elsewhere; what was set, for the report."""
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["PYTHONUNBUFFERED"] = "1"
    settings = {k: v for k, v in os.environ.items() if k.startswith("PERENNIAL_")}
    return env, settings


def start_operator(cp: ControlPlane, workdir: Path, procs: list[Proc], tag: str) -> Proc:
    env, _ = operator_env()
    argv = [PERENNIAL, "run", "--kubeconfig", str(cp.kubeconfig), "--standalone", "--metrics-port", "0", "--health-port", "0", "--log-format", os.environ.get("BENCH_OPERATOR_LOG_FORMAT", "plain")]
    proc = Proc("operator", argv, workdir / f"operator-{cp.port}-{tag}.log", env=env)
    procs.append(proc)
    return proc


# ----------------------------------------------------------------------------- the load generator's client


def client(cp: ControlPlane, pool: int) -> Any:
    from perennial.kube import Kube

    cfg = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(cp.kubeconfig), client_configuration=cfg)
    cfg.connection_pool_maxsize = pool + 4
    api = kubernetes.client.ApiClient(cfg)
    api.user_agent = BENCH_UA
    return Kube(api)


def create_all(kube: Any, objs: list[dict[str, Any]], concurrency: int, *, with_writes: bool = False,
               run_start: bool = False, created: list[int] | None = None) -> tuple[float, float, int]:
    """Create `objs` with a fixed concurrency; returns (start, end, failures) in time.monotonic().
    `with_writes`: also make, for each, the writes a perfect operator makes (one status patch, one Event; with
    `run_start`, those of starting a run: `running_floor`). `created`: its first item counts the creates done."""
    failures = 0
    errors: list[str] = []

    def one(obj: dict[str, Any]) -> None:
        made = kube.create(obj)
        if created is not None:
            created[0] += 1  # for a timeline only (threads may race: approximate)
        floor(made)

    def floor(created: dict[str, Any]) -> None:
        if with_writes and run_start:  # a waiting run's writes are a status and an Event, as for any kind
            running_floor(kube, created)
        elif with_writes:
            m = created["metadata"]
            cond = {"type": "Ready", "status": "True", "reason": "Valid", "message": "floor", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}
            kube.patch(created["apiVersion"], created["kind"], m["namespace"], m["name"], {"status": {"observedGeneration": 1, "conditions": [cond]}}, subresource="status")
            kube.create({"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": f"{m['name']}.", "namespace": m["namespace"]},
                         "involvedObject": {"apiVersion": created["apiVersion"], "kind": created["kind"], "name": m["name"], "namespace": m["namespace"], "uid": m["uid"]},
                         "reason": "Valid", "message": "floor", "type": "Normal", "source": {"component": "benchmark"}, "count": 1})

    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(concurrency, thread_name_prefix="create") as pool:
        for fut in cf.as_completed([pool.submit(one, o) for o in objs]):
            exc = fut.exception()
            if exc is not None:
                failures += 1
                if len(errors) < 3:
                    errors.append(str(exc)[:300])
    t1 = time.monotonic()
    for e in errors:
        log(f"create failed: {e}")
    return t0, t1, failures


def running_floor(kube: Any, run: dict[str, Any]) -> None:
    """What starting one run takes of the control plane with a perfect operator and this script's kubelet:
    the operator's ConfigMap, Job, status (JobPending), Event and status (Started), and the kubelet's Job
    status, Pod and Pod status -- made by the load generator itself, in that order."""
    m = run["metadata"]
    name, ns = m["name"], m["namespace"]
    owner = [{"apiVersion": API, "kind": "TrainingRun", "name": name, "uid": m["uid"], "controller": True, "blockOwnerDeletion": True}]
    labels = {"app.kubernetes.io/managed-by": "perennial-operator", "perennial.ai/training-run": name}
    kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-config", "namespace": ns, "labels": labels, "ownerReferences": owner},
                 "data": {"run.json": json.dumps(run["spec"])}})
    pod_spec = {"restartPolicy": "Never", "automountServiceAccountToken": False,
                "containers": [{"name": "trainer", "image": "perennial-trainer:bench", "args": ["train", "--config", "/etc/perennial/run.json"],
                                "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}},
                                "volumeMounts": [{"name": "config", "mountPath": "/etc/perennial", "readOnly": True}]}],
                "volumes": [{"name": "config", "configMap": {"name": f"{name}-config"}}]}
    job = kube.create({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{name}-train", "namespace": ns, "labels": labels, "ownerReferences": owner},
                       "spec": {"backoffLimit": 3, "template": {"metadata": {"labels": labels}, "spec": pod_spec}}})
    pending = {"type": "Succeeded", "status": "Unknown", "reason": "JobPending", "message": "floor", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}
    kube.patch(API, "TrainingRun", ns, name, {"status": {"observedGeneration": 1, "phase": "Pending", "conditions": [pending]}}, subresource="status")
    kube.create({"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": f"{name}.", "namespace": ns},
                 "involvedObject": {"apiVersion": API, "kind": "TrainingRun", "name": name, "namespace": ns, "uid": m["uid"]},
                 "reason": "JobCreated", "message": "floor", "type": "Normal", "source": {"component": "benchmark"}, "count": 1})
    kube.patch("batch/v1", "Job", ns, f"{name}-train", {"status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}}, subresource="status")
    kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-train-0", "namespace": ns, "labels": {**labels, "job-name": f"{name}-train"},
                 "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": f"{name}-train", "uid": job["metadata"]["uid"], "controller": True}]},
                 "spec": pod_spec})
    kube.patch("v1", "Pod", ns, f"{name}-train-0", {"status": {"phase": "Running", "containerStatuses": [
        {"name": "trainer", "restartCount": 0, "ready": True, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}}, subresource="status")
    started = {"type": "Started", "status": "True", "reason": "TrainerStarted", "message": "floor", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}
    kube.patch(API, "TrainingRun", ns, name, {"status": {"phase": "Running", "conditions": [pending, started]}}, subresource="status")


# ----------------------------------------------------------------------------- the objects


RUBRIC = {"graders": [{"name": "fmt", "type": "Regex", "regex": {"pattern": "^<answer>"}}]}


def meta(name: str) -> dict[str, Any]:
    return {"name": name, "namespace": NS}


def run_spec() -> dict[str, Any]:
    return {
        "method": "GRPO",
        "baseModelRef": {"name": "base"},
        "rewardSpecRef": {"name": "rubric"},
        "datasets": [{"name": "prompts", "uri": "pvc://data/fruit/train.jsonl"}],
        "hyperparameters": {"maxSteps": 20, "numGenerations": 4},
        "output": {"adapterFamily": "bench", "artifactUri": "pvc://artifacts/adapters"},
    }


def objects(kind: str, n: int, artifact_dir: Path) -> list[dict[str, Any]]:
    if kind == "rewardspec":
        return [{"apiVersion": API, "kind": "RewardSpec", "metadata": meta(f"rs-{i}"), "spec": RUBRIC} for i in range(n)]
    if kind in ("waiting", "running"):
        return [{"apiVersion": API, "kind": "TrainingRun", "metadata": meta(f"run-{i}"), "spec": run_spec()} for i in range(n)]
    if kind == "adapter":
        return [{"apiVersion": API, "kind": "Adapter", "metadata": meta(f"ad-{i}"),
                 "spec": {"baseModelRef": {"name": "base"}, "family": "bench", "version": i + 1,
                          "artifactUri": f"file://{artifact_dir}", "lora": {"rank": 8}}} for i in range(n)]
    if kind == "deployment":
        return [{"apiVersion": API, "kind": "Deployment", "metadata": meta(f"chat-{i}"), "spec": deployment_spec()} for i in range(n)]
    raise ValueError(kind)


def deployment_spec() -> dict[str, Any]:
    """One replica serving the base model and one pinned Adapter; the first rollout brings up blue as the preview,
    smoke-tests every served name through the preview Service, switches the stable Service and scales blue up."""
    return {"baseModelRef": {"name": "base"}, "adapters": [{"name": "support", "adapterRef": {"name": "support-v1"}}], "replicas": 1,
            "strategy": {"blueGreen": {"previewReplicas": 1, "smokeTest": {"expectRegex": "(?i)hello", "timeoutSeconds": 10}}}}


def prerequisites(kind: str, artifact_dir: Path) -> list[dict[str, Any]]:
    """What the objects of `kind` reference (none for waiting runs: their BaseModel is missing on purpose)."""
    base = {"apiVersion": API, "kind": "BaseModel", "metadata": meta("base"), "spec": {"source": {"uri": "hf://org/model"}}}
    rubric = {"apiVersion": API, "kind": "RewardSpec", "metadata": meta("rubric"), "spec": RUBRIC}
    adapter = {"apiVersion": API, "kind": "Adapter", "metadata": meta("support-v1"),
               "spec": {"baseModelRef": {"name": "base"}, "family": "support", "version": 1, "artifactUri": f"file://{artifact_dir}", "lora": {"rank": 8}}}
    return {"rewardspec": [], "waiting": [rubric], "running": [base, rubric], "adapter": [base], "deployment": [base, adapter]}[kind]


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return None


def converged(obj: dict[str, Any], ctype: str, status: str, *also: tuple[str, str]) -> bool:
    gen = obj["metadata"].get("generation")
    st = obj.get("status") or {}
    if st.get("observedGeneration") != gen:
        return False
    for t, want in ((ctype, status), *also):
        c = condition(obj, t)
        if not (c and c.get("status") == want and c.get("observedGeneration", gen) == gen):
            return False
    return True


class ConvergencePoller:
    """LISTs the kind until every object shows the expected condition; the interval grows with the LIST's cost."""

    def __init__(self, kube: Any, kind: str, n: int):
        self.kube, self.kind, self.n = kube, kind, n
        self.ctype, self.status = EXPECTED[kind]
        self.done = 0
        self.lists = 0
        self.list_seconds = 0.0
        self.example: dict[str, Any] | None = None

    def poll(self) -> int:
        t = time.monotonic()
        items = self.kube.list(API, KIND_OF[self.kind], NS)
        self.list_seconds += time.monotonic() - t
        self.lists += 1
        also = ALSO_EXPECTED.get(self.kind, ())
        pending = [o for o in items if not converged(o, self.ctype, self.status, *also)]
        self.done = len(items) - len(pending)
        self.example = pending[0] if pending else None
        return self.done

    def wait(self, timeout: float, procs: list[Proc]) -> float:
        """Blocks until converged; returns time.monotonic() at the LIST that saw it."""
        deadline = time.monotonic() + timeout
        last_report = time.monotonic()
        while True:
            t = time.monotonic()
            if self.poll() >= self.n:
                return t
            for p in procs:
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited during convergence:\n{p.tail()}")
            if time.monotonic() > deadline:
                st = (self.example or {}).get("status") or {}
                example = {"name": (self.example or {}).get("metadata", {}).get("name"), "phase": st.get("phase"),
                           "conditions": [f"{c.get('type')}={c.get('status')} {c.get('reason')}: {c.get('message')}"[:200] for c in st.get("conditions") or []]}
                raise TimeoutError(f"{self.done}/{self.n} {self.kind} converged after {timeout:.0f}s; one that did not: {example}")
            if time.monotonic() - last_report > 15:
                log(f"  converged {self.done}/{self.n}")
                last_report = time.monotonic()
            took = time.monotonic() - t
            time.sleep(max(0.1, min(5.0, 3 * took)))  # the poll costs the machine at most ~25 %


class ConvergenceWatch:
    """Sees convergence as `kubectl wait` does: a watch on the kind (opened before the first create), each object's
    latest state judged as it arrives; converged at the event that made the last object converge, then confirmed by
    one LIST (`ConvergencePoller`, which also takes over if the LIST disagrees). Unlike polling, this costs the
    control plane and this script one watch event per status change instead of repeated LISTs of every object,
    and it is late by one event's delivery instead of by up to a polling interval.

    The watch runs in a process of its own, as `kubectl wait` would (`_convergence_watch`): in this one its thread
    took the GIL from the 16 threads creating the objects (which the raw baseline's creates, with no watch, never
    lose), and slowed the load generator itself. Its CPU counts as this script's (`cpu_seconds`)."""

    def __init__(self, cp: ControlPlane, kube: Any, kind: str, n: int):
        import multiprocessing as mp

        self.kind, self.n = kind, n
        self.poller = ConvergencePoller(kube, kind, n)
        ctx = mp.get_context("spawn")
        self._done = ctx.Value("q", 0, lock=False)
        self._done_at = ctx.Value("d", -1.0, lock=False)
        self._connected = ctx.Event()
        self._stop = ctx.Event()
        self._errors = ctx.Queue()
        self.errors: list[str] = []
        plural = PLURAL_OF[KIND_OF[kind]]
        endpoint = {"url": cp.url, "ca": cp.ca_pem, "headers": cp.headers}
        self.proc = ctx.Process(target=_convergence_watch, name="convergence watch", daemon=True,
                                args=(endpoint, f"/apis/{API}/namespaces/{NS}/{plural}", kind, n, self._done, self._done_at,
                                      self._connected, self._stop, self._errors))
        self.proc.start()
        if not self._connected.wait(60):
            raise RuntimeError("the convergence watch did not connect in 60 s")

    @property
    def done(self) -> int:
        return self._done.value

    @property
    def done_at(self) -> float | None:
        return self._done_at.value if self._done_at.value >= 0 else None

    def cpu_seconds(self) -> float:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return self._cpu_at_exit
        self._cpu_at_exit = (int(fields[11]) + int(fields[12])) / CLK_TCK
        return self._cpu_at_exit

    _cpu_at_exit = 0.0

    def wait(self, timeout: float, procs: list[Proc]) -> float:
        """Blocks until converged; returns time.monotonic() of the watch event that showed it (or of the LIST)."""
        deadline = time.monotonic() + timeout
        last_report = time.monotonic()
        try:
            while self.done_at is None:
                for p in procs:
                    if not p.alive():
                        raise RuntimeError(f"{p.name} exited during convergence:\n{p.tail()}")
                if not self.proc.is_alive():
                    raise RuntimeError(f"the convergence watch exited ({self.proc.exitcode})")
                if time.monotonic() > deadline:
                    self.poller.poll()  # names one object that did not converge
                    return self.poller.wait(0, procs)
                if time.monotonic() - last_report > 15:
                    log(f"  converged {self.done}/{self.n}")
                    last_report = time.monotonic()
                time.sleep(0.05)
            done_at = self.done_at
            assert done_at is not None
            if self.poller.poll() >= self.n:
                return done_at
            self._collect_errors()
            log(f"  the watch saw {self.n} converged but a LIST {self.poller.done}: polling (watch errors: {self.errors})")
            return self.poller.wait(max(1.0, deadline - time.monotonic()), procs)
        finally:
            self.stop()

    def _collect_errors(self) -> None:
        import queue

        try:
            while True:
                self.errors.append(self._errors.get_nowait())
        except queue.Empty:
            pass

    def stop(self) -> None:
        if self.proc.is_alive():
            self.cpu_seconds()
            self._stop.set()
            self.proc.join(15)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        self._collect_errors()


def _convergence_watch(endpoint: dict[str, Any], path: str, kind: str, n: int, done: Any, done_at: Any, connected: Any,
                       stop: Any, errors_out: Any) -> None:
    """The convergence watch's process (`ConvergenceWatch`): counts the objects showing the expected condition."""
    ctype, status = EXPECTED[kind]
    also = ALSO_EXPECTED.get(kind, ())
    cp = type("Endpoint", (), {"url": endpoint["url"], "headers": endpoint["headers"], "ssl": ssl.create_default_context(cadata=endpoint["ca"])})()
    state: dict[str, bool] = {}
    count = [0]

    def on_event(etype: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        ok = etype != "DELETED" and converged(obj, ctype, status, *also)
        if ok != state.get(name, False):
            count[0] += 1 if ok else -1
            done.value = count[0]
        if etype == "DELETED":
            state.pop(name, None)
        else:
            state[name] = ok
        if count[0] >= n and done_at.value < 0:
            done_at.value = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process

    errors: list[str] = []
    watch = Watch(cp, path, "", on_event, errors, connected=connected)  # type: ignore[arg-type]
    stop.wait()
    watch.stop()
    for e in errors:
        errors_out.put(e)


# ----------------------------------------------------------------------------- the parts of a cluster this script plays

MANAGED = "app.kubernetes.io/managed-by=perennial-operator"
LOCAL_URL = "perennial.ai/local-url"  # where the local kube-proxy says a Service answers


class Watch:
    """One watch of a resource (`path`: its collection) with a label selector, in a thread, resumed from the last
    resourceVersion (bookmarks on), relisted from now on an ERROR (410); `on_event(type, object)` is called in order."""

    def __init__(self, cp: ControlPlane, path: str, selector: str, on_event: Callable[[str, dict[str, Any]], None], errors: list[str],
                 connected: Any = None):
        self.cp, self.path, self.selector, self.on_event, self.errors = cp, path, selector, on_event, errors
        self.connected = connected  # an Event set once the server accepted the watch
        self.stop_flag = threading.Event()
        self.conn: http.client.HTTPSConnection | None = None
        self.thread = threading.Thread(target=self._run, name=f"watch {path.rsplit('/', 1)[-1]}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        rv = ""
        selector = urllib.parse.quote(self.selector, safe="")
        while not self.stop_flag.is_set():
            conn = None
            try:
                conn = self.conn = http.client.HTTPSConnection(HOST, int(self.cp.url.rsplit(":", 1)[1]), timeout=120, context=self.cp.ssl)  # bookmarks come every 20 s
                path = f"{self.path}?watch=true&allowWatchBookmarks=true&timeoutSeconds=300" + (f"&labelSelector={selector}" if selector else "")
                if rv:
                    path += f"&resourceVersion={rv}"
                conn.request("GET", path, headers={"User-Agent": BENCH_UA, "Accept": "application/json", **self.cp.headers})
                resp = conn.getresponse()
                if resp.status != 200:
                    resp.read()
                    rv = ""
                    time.sleep(0.5)
                    continue
                if self.connected is not None:
                    self.connected.set()
                buffer, expired = b"", False
                while not self.stop_flag.is_set() and not expired:
                    data = resp.read1(1 << 20)  # what the stream holds now (all the events of a chunk), not line by line
                    if not data:
                        break
                    *lines, buffer = (buffer + data).split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        ev = json.loads(line)
                        obj = ev.get("object") or {}
                        if ev.get("type") == "ERROR":
                            rv, expired = "", True
                            break
                        rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                        if ev.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                            self.on_event(ev["type"], obj)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                if self.stop_flag.is_set():
                    break
                if len(self.errors) < 5:
                    self.errors.append(f"watch {self.path}: {exc!r}"[:300])
                time.sleep(0.5)
            finally:
                if conn is not None:
                    conn.close()

    def stop(self) -> None:
        self.stop_flag.set()
        conn = self.conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked reading the stream
            except OSError:
                pass
        self.thread.join(15)



class Kubelet:
    """Plays the Job controller and kubelet for the operator's training Jobs, from a watch on Jobs:
    the Job's status (active 1, startTime), then a Pod owned by it (the template's labels plus
    `job-name`), then the Pod's status (phase Running) -- as `tests/harness.py`'s FakeKubelet does."""

    def __init__(self, cp: ControlPlane, kube: Any, concurrency: int):
        self.cp, self.url, self.kube = cp, cp.url, kube
        self.stop_flag = threading.Event()
        self.seen: set[str] = set()
        self.started = 0
        #: time.monotonic() when the last of `expected` Jobs was seen, and when its Pod was Running
        self.expected = 0
        self.all_jobs_at: float | None = None
        self.all_pods_at: float | None = None
        self.errors: list[str] = []
        self.pool = cf.ThreadPoolExecutor(concurrency, thread_name_prefix="kubelet")
        self.watch = Watch(cp, f"/apis/batch/v1/namespaces/{NS}/jobs", MANAGED, self._on_job, self.errors)

    def _start_pod(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        tpl = job["spec"]["template"]
        try:
            now = "2026-01-01T00:00:00Z"
            self.kube.patch("batch/v1", "Job", NS, name, {"status": {"active": 1, "startTime": now}}, subresource="status")
            pod = f"{name}-0"
            self.kube.create({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": NS,
                             "labels": {**(tpl.get("metadata") or {}).get("labels", {}), "job-name": name, "batch.kubernetes.io/job-name": name},
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job["metadata"]["uid"],
                                                  "controller": True, "blockOwnerDeletion": True}]},
                "spec": tpl["spec"],
            })
            self.kube.patch("v1", "Pod", NS, pod, {"status": {"phase": "Running", "containerStatuses": [
                {"name": "trainer", "restartCount": 0, "ready": True, "state": {"running": {"startedAt": now}}}]}}, subresource="status")
            self.started += 1
            if self.expected and self.started >= self.expected and self.all_pods_at is None:
                self.all_pods_at = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - reported
            if len(self.errors) < 5:
                self.errors.append(f"{name}: {exc}"[:300])

    def _on_job(self, kind: str, obj: dict[str, Any]) -> None:
        if kind in ("ADDED", "MODIFIED"):
            name = obj["metadata"]["name"]
            if name not in self.seen and name.endswith("-train"):
                self.seen.add(name)
                if self.expected and len(self.seen) >= self.expected and self.all_jobs_at is None:
                    self.all_jobs_at = time.monotonic()
                self.pool.submit(self._start_pod, obj)

    def stop(self) -> None:
        self.stop_flag.set()
        self.watch.stop()
        self.pool.shutdown(wait=True, cancel_futures=True)


class ServingCluster:
    """Plays, for the operator's serving children (a Perennial Deployment's apps/v1 Deployments, Services, routes
    ConfigMap), the parts of a cluster the embedded control plane does not run, with the stand-ins of
    `tests/integration/test_deployment_controller.py` (imported, not copied):

      * the ReplicaSet controller and kubelet: from a watch on apps/v1 Deployments, each gets `spec.replicas` Pods
        of its template (its labels, owned by it), each Running and Ready with a pod IP of its own on 127.<b>.0.0/16
        (`perennial.local.serving`'s address pool, shared with local clusters of other processes), then the apps/v1
        Deployment's status (observedGeneration, ready/available replicas) -- the test's `run_pods` and `ready`;
        a changed template replaces the Pods, a smaller `replicas` deletes the extra ones;
      * each Pod's sidecar: `GET /perennial/routes` answered on the pod IP's admin port (the template's, unchanged)
        by the test's `Sidecars.answer` from the routes ConfigMap the Pod mounts -- read from a watch on ConfigMaps,
        as a kubelet syncs a mounted ConfigMap, not one GET per read;
      * the local kube-proxy: each Service annotated with `perennial.ai/local-url`, the URL of the test's `Engines`
        (chat completions: the smoke test's target, through the preview and then the stable Service). A Service's
        name resolves at once in a cluster; here it answers once annotated, so an apps/v1 Deployment is made ready
        only after this script's watch saw every Service of its Perennial Deployment annotated (as the test's
        `proxied` waits for the operator's cache before `ready`): else a smoke test could find no address.
    """

    def __init__(self, cp: ControlPlane, kube: Any, concurrency: int):
        sys.path[:0] = [str(REPO / "tests" / "integration"), str(REPO / "tests")]
        import test_deployment_controller as standins
        from perennial.local.serving import _AddressPool
        from perennial.resources import deployment as build

        self.cp, self.kube, self.standins, self.build = cp, kube, standins, build
        self.errors: list[str] = []
        self.engines = standins.Engines()
        self.addresses = _AddressPool()
        self.config_maps: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, dict[str, Any]]] = {}  # apps/v1 Deployment -> pod name -> {ip, config_map, site}
        self.by_ip: dict[str, dict[str, Any]] = {}
        self.services: dict[str, tuple[str, bool]] = {}  # Service -> (its perennial.ai/deployment label, annotated)
        self.unproxied: dict[str, set[str]] = {}  # perennial.ai/deployment label -> apps/v1 Deployments waiting for its Services
        self.locks: dict[str, threading.Lock] = {}
        self.lock = threading.Lock()
        self.pods_started = 0
        self.sidecar_reads = 0
        self.pool = cf.ThreadPoolExecutor(concurrency, thread_name_prefix="serving")
        self.loop = __import__("asyncio").new_event_loop()
        self.loop_thread = threading.Thread(target=self.loop.run_forever, name="sidecars", daemon=True)
        self.loop_thread.start()
        self.runner = self._call(self._runner())
        self.watches = [
            Watch(cp, f"/api/v1/namespaces/{NS}/configmaps", MANAGED, self._on_config_map, self.errors),
            Watch(cp, f"/api/v1/namespaces/{NS}/services", MANAGED, self._on_service, self.errors),
            Watch(cp, f"/apis/apps/v1/namespaces/{NS}/deployments", MANAGED, self._on_deployment, self.errors),
        ]

    # -- the sidecars (aiohttp, one site per pod IP, in the loop's thread)

    def _call(self, coro: Any, timeout: float = 30) -> Any:
        import asyncio
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _runner(self) -> Any:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/perennial/routes", self._routes)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        return runner

    async def _routes(self, request: Any) -> Any:
        from aiohttp import web

        self.sidecar_reads += 1
        ip = request.transport.get_extra_info("sockname")[0]
        pod = self.by_ip.get(ip)
        cm = self.config_maps.get(pod["config_map"]) if pod else None
        if cm is None:
            return web.json_response({"error": "no routes document mounted yet"}, status=503)
        view = type("ConfigMapView", (), {"get": lambda _self, api, kind, ns, name: self.config_maps.get(name)})()
        shim = type("Sidecar", (), {"reads": 0, "frozen": None, "kube": view, "config_map": pod["config_map"]})()
        status, body = self.standins.Sidecars.answer(shim, "GET", b"")
        return web.json_response(body, status=status)

    async def _listen(self, ip: str, port: int) -> Any:
        from aiohttp import web

        site = web.TCPSite(self.runner, ip, port, reuse_address=True)
        await site.start()
        return site

    # -- the watches' handlers

    def _on_config_map(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "DELETED":
            self.config_maps.pop(obj["metadata"]["name"], None)
        elif self.build.ROUTES_KEY in (obj.get("data") or {}):
            self.config_maps[obj["metadata"]["name"]] = obj

    def _on_service(self, kind: str, obj: dict[str, Any]) -> None:
        name, label = obj["metadata"]["name"], (obj["metadata"].get("labels") or {}).get(self.build.LABEL_DEPLOYMENT, "")
        annotated = bool((obj["metadata"].get("annotations") or {}).get(LOCAL_URL))
        with self.lock:
            if kind == "DELETED":
                self.services.pop(name, None)
            else:
                self.services[name] = (label, annotated)
            waiting = self.unproxied.pop(label, set()) if annotated else set()
        if kind != "DELETED" and not annotated:
            self.pool.submit(self._guard, name, lambda: self.kube.patch(
                "v1", "Service", NS, name, {"metadata": {"annotations": {LOCAL_URL: self.engines.url}}}))
        for d in waiting:
            self.pool.submit(self._guard, d, lambda d=d: self._scale(d))

    def _proxied(self, label: str, deployment: str) -> bool:
        """Every Service of the Perennial Deployment labelled `label` is annotated (there is one); else `deployment`
        waits for the next annotation."""
        with self.lock:
            mine = [annotated for lab, annotated in self.services.values() if lab == label]
            if mine and all(mine):
                return True
            self.unproxied.setdefault(label, set()).add(deployment)
            return False

    def _on_deployment(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self.pool.submit(self._guard, name, lambda: self._forget(name))
            return
        st, replicas = obj.get("status") or {}, (obj.get("spec") or {}).get("replicas", 1)
        if st.get("observedGeneration") == obj["metadata"].get("generation") and st.get("readyReplicas", 0) == replicas \
                and len(self.pods.get(name, {})) == replicas:
            return
        self.pool.submit(self._guard, name, lambda: self._scale(name))

    def _guard(self, name: str, fn: Callable[[], Any]) -> None:
        with self.lock:
            lock = self.locks.setdefault(name, threading.Lock())
        try:
            with lock:
                fn()
        except Exception as exc:  # noqa: BLE001 - reported
            if len(self.errors) < 5:
                self.errors.append(f"{name}: {type(exc).__name__}: {exc}"[:300])

    def _forget(self, deployment: str, keep: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        for pod, rec in list(self.pods.get(deployment, {}).items()):
            if pod in keep:
                continue
            self.kube.delete("v1", "Pod", NS, pod)
            self._call(rec["site"].stop())
            self.by_ip.pop(rec["ip"], None)
            self.addresses.release(rec["ip"])
            del self.pods[deployment][pod]

    def _scale(self, name: str) -> None:
        """The ReplicaSet controller and kubelet for one apps/v1 Deployment, from its current state."""
        d = self.kube.get("apps/v1", "Deployment", NS, name)
        if d is None:
            self._forget(name)
            return
        replicas = d["spec"].get("replicas", 1)
        template = d["spec"]["template"]
        rev = short_hash(template)
        wanted = [f"{name}-{rev}-{i}" for i in range(replicas)]
        self._forget(name, keep=set(wanted))
        have = self.pods.setdefault(name, {})
        routes = next((v["configMap"]["name"] for v in template["spec"].get("volumes") or [] if v.get("name") == "routes" and "configMap" in v), None)
        for pod in wanted:
            if pod in have:
                continue
            ip, _ = self.addresses.allocate()
            port = next((int(p["containerPort"]) for c in template["spec"]["containers"] for p in c.get("ports") or []
                         if p.get("name") == "admin"), self.build.SIDECAR_PORT)
            rec = {"ip": ip, "config_map": routes, "site": self._call(self._listen(ip, port))}
            self.by_ip[ip] = rec
            have[pod] = rec
            self.kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": pod, "namespace": NS, "labels": template["metadata"]["labels"],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": d["metadata"]["uid"],
                                     "controller": True, "blockOwnerDeletion": True}]}, "spec": template["spec"]})
            self.kube.patch("v1", "Pod", NS, pod, {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}, subresource="status")
            self.pods_started += 1
        if not self._proxied((d["metadata"].get("labels") or {}).get(self.build.LABEL_DEPLOYMENT, ""), name):
            return
        status = {"observedGeneration": d["metadata"]["generation"], "replicas": replicas, "updatedReplicas": replicas,
                  "readyReplicas": replicas, "availableReplicas": replicas}
        st = d.get("status") or {}
        if any(st.get(k) != v for k, v in status.items()):
            self.kube.patch("apps/v1", "Deployment", NS, name, {"status": status}, subresource="status")

    def stop(self) -> None:
        for w in self.watches:
            w.stop_flag.set()
        for w in self.watches:
            w.stop()
        self.pool.shutdown(wait=True, cancel_futures=True)
        try:
            self._call(self.runner.cleanup())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.loop_thread.join(10)
            self.engines.close()
            self.addresses.close()


def short_hash(obj: Any) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


class Profile:
    """`--profile DIR`: while converging, py-spy samples each process (collapsed stacks, `DIR/<kind>-<n>-<process>.txt`,
    for flamegraph.pl or speedscope) and a thread writes a timeline every 0.1 s (`DIR/<kind>-<n>-timeline.tsv`: objects
    created, status writes of the operator (the control plane's counts), objects converged (this script's watch), CPU
    seconds of each process) -- where each process spends its CPU, and where the pipeline
    waits. py-spy runs in processes of its own, sampling only while a thread holds the GIL (`--gil`: CPU in Python and
    in C called with the GIL held), and each sample pauses the process it reads: the figures of a profiled run are not
    the benchmark's (`--no-spy`: the timeline alone)."""

    def __init__(self, outdir: Path, tag: str, procs: dict[str, int], sample: Callable[[], dict[str, float]], spy: bool = True):
        self.outdir, self.tag, self.sample = outdir, tag, sample
        outdir.mkdir(parents=True, exist_ok=True)
        exe = str(Path(sys.executable).with_name("py-spy"))
        self.spies = [subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--gil", "--output",
                                        str(outdir / f"{tag}-{name.replace(' ', '-')}.txt")], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL) for name, pid in procs.items() if spy]
        self.stop_flag = threading.Event()
        self.rows: list[str] = []
        self.thread = threading.Thread(target=self._run, name="timeline", daemon=True)
        time.sleep(1.0 if spy else 0.0)  # py-spy attached
        self.t0 = time.monotonic()
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_flag.wait(0.1):
            row = self.sample()
            if not self.rows:
                self.rows.append("t\t" + "\t".join(row))
            self.rows.append(f"{time.monotonic() - self.t0:.2f}\t" + "\t".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(5)
        (self.outdir / f"{self.tag}-timeline.tsv").write_text("\n".join(self.rows) + "\n")
        for spy in self.spies:
            spy.send_signal(signal.SIGINT)
        for spy in self.spies:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()


# ----------------------------------------------------------------------------- request accounting


def operator_requests(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["client"] in OPERATOR_CLIENTS]


def categorise(rows: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Writes by target (object / events / children / other), reads by verb, progress reads apart. A create answered
    404 (its kind is not served here: NetworkPolicy, which the embedded control plane does not serve and the operator
    skips, trying again in each new process) wrote nothing: counted apart as `unserved`, not as a write."""
    own = f"{GROUP}/{PLURAL_OF[KIND_OF[kind]]}"
    out: dict[str, Any] = {"writes": Counter(), "write_verbs": Counter(), "reads": Counter(), "read_resources": Counter(),
                           "progress": 0, "errors": Counter(), "total": 0, "unserved": Counter()}
    for r in operator_requests(rows):
        n, verb, res = r["count"], r["verb"], r["resource"]
        out["total"] += n
        if r["code"] >= 400:
            out["errors"][f"{verb} {res} {r['code']}"] += n
        if res == PROGRESS_RESOURCE:
            out["progress"] += n
        elif verb == "create" and r["code"] == 404:
            out["unserved"][res] += n
        elif verb in WRITE_VERBS:
            if res == own or res.startswith(own + "/"):
                target = "object"
            elif res in ("events", "events.k8s.io/events"):
                target = "events"
            elif res in CHILDREN.get(kind, ()) or (kind == "running" and res.endswith("networkpolicies")):
                target = "children"
            else:
                target = "other"
            out["writes"][target] += n
            out["write_verbs"][f"{verb} {res}"] += n
        elif verb in READ_VERBS:
            out["reads"][verb] += n
            out["read_resources"][f"{verb} {res}"] += n
        else:
            out["reads"][verb] += n
            out["read_resources"][f"{verb} {res}"] += n
    return out


def non_progress_total(cp: ControlPlane) -> int:
    return sum(r["count"] for r in operator_requests(cp.requests()) if r["resource"] != PROGRESS_RESOURCE)


def wait_quiet(cp: ControlPlane, quiet: float, timeout: float, procs: list[Proc], t0: float | None = None,
               need: Callable[[list[dict[str, Any]]], bool] | None = None) -> tuple[float, bool]:
    """Until the operator made no new request (progress reads aside) for `quiet` seconds.
    Returns (the time of its last request counted from `t0`, whether it got quiet in time)."""
    start = time.monotonic() if t0 is None else t0
    deadline = time.monotonic() + timeout
    last_total, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited:\n{p.tail()}")
        rows = cp.requests()
        total = sum(r["count"] for r in operator_requests(rows) if r["resource"] != PROGRESS_RESOURCE)
        if total != last_total:
            last_total, last_change = total, time.monotonic()
        elif time.monotonic() - last_change >= quiet and total > 0 and (need is None or need(rows)):
            return last_change - start, True
        time.sleep(0.25)
    return last_change - start, False


def watched_resources(rows: list[dict[str, Any]]) -> set[str]:
    return {r["resource"] for r in rows if r["client"] == "kopf" and r["verb"] == "watch"}


def kopf_watching(rows: list[dict[str, Any]]) -> bool:
    """kopf has opened its watches (5 of our kinds + 5 built-in)."""
    return len({r["resource"] for r in rows if r["client"] == "kopf" and r["verb"] == "watch"}) >= 10


# ----------------------------------------------------------------------------- one scenario


@dataclass
class Result:
    kind: str
    n: int
    raw_rate: float = 0.0
    raw_failures: int = 0
    converge_rate: float = 0.0
    converge_seconds: float = 0.0
    create_seconds: float = 0.0
    converge_failures: int = 0
    converge_cpu: dict[str, float] = field(default_factory=dict)
    #: CPU per converged object of each process (µs), the load-independent figure
    cpu_us_per_object: dict[str, float] = field(default_factory=dict)
    #: CPU per raw create (µs): the control plane's and this script's (the client)
    raw_cpu_us_per_object: dict[str, float] = field(default_factory=dict)
    floor_rate: float = 0.0
    steady: dict[str, Any] = field(default_factory=dict)
    idle_seconds: float = 0.0
    idle: dict[str, Any] = field(default_factory=dict)
    idle_cpu: dict[str, float] = field(default_factory=dict)
    rss_before: dict[str, int] = field(default_factory=dict)
    rss_after: dict[str, int] = field(default_factory=dict)
    restart: dict[str, Any] = field(default_factory=dict)
    restart_quiet_seconds: float = 0.0
    restart_quiet: bool = False
    restart_stop_seconds: float = 0.0
    kubelet_started: int = 0
    notes: list[str] = field(default_factory=list)
    log_counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None


def operator_log_counts(proc: Proc) -> dict[str, int]:
    text = proc.logfile.read_text(errors="replace") if proc.logfile.exists() else ""
    return {
        "status updates logged": text.count("Updated status"),
        "requeued after API errors": text.count("Requeued after an API error"),
        "reconcile failures": text.count("Reconcile failed"),
        "tracebacks": text.count("Traceback"),
    }


def raw_create(args: argparse.Namespace, kind: str, n: int, workdir: Path, procs: list[Proc], artifact_dir: Path, *, with_writes: bool = False,
               cpu: dict[str, float] | None = None) -> tuple[float, int]:
    """Objects/s and failures; `cpu`: filled with the CPU per object (µs) of the control plane and of this script."""
    cp = ControlPlane(workdir, procs)
    try:
        kube = client(cp, args.concurrency)
        create_all(kube, prerequisites(kind, artifact_dir), 1)
        c0 = {"control plane": cp.proc.cpu_seconds(), "this script": own_cpu_seconds()}
        t0, t1, failures = create_all(kube, objects(kind, n, artifact_dir), args.concurrency, with_writes=with_writes,
                                      run_start=kind == "running")
        if cpu is not None:
            cpu.update({"control plane": (cp.proc.cpu_seconds() - c0["control plane"]) / n * 1e6,
                        "this script": (own_cpu_seconds() - c0["this script"]) / n * 1e6})
        return n / (t1 - t0), failures
    finally:
        cp.proc.stop()


def scenario(args: argparse.Namespace, kind: str, n: int, workdir: Path, procs: list[Proc]) -> Result:
    res = Result(kind, n)
    artifact_dir = workdir / "artifact"
    artifact_dir.mkdir(exist_ok=True)
    (artifact_dir / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))

    log(f"{kind} x{n}: raw create throughput (no operator)")
    res.raw_rate, res.raw_failures = raw_create(args, kind, n, workdir, procs, artifact_dir, cpu=res.raw_cpu_us_per_object)
    log(f"  raw: {res.raw_rate:.0f} objects/s")
    # The floor: what the control plane allows anything that writes what the operator writes per object
    # (one status patch, one Event; for running runs also their children and this script's kubelet:
    # `running_floor`), issued by the load generator itself with no operator.
    if kind != "deployment":  # a Deployment's floor (its children, pods, routes reads, smoke test) is not modelled
        res.floor_rate, _ = raw_create(args, kind, n, workdir, procs, artifact_dir, with_writes=True)
        log(f"  floor ({'the writes of a run start' if kind == 'running' else 'create + status + Event'}, no operator): {res.floor_rate:.0f} objects/s")

    cp = ControlPlane(workdir, procs)
    kube = client(cp, args.concurrency)
    kubelet = None
    serving: ServingCluster | None = None
    op = None
    profile: Profile | None = None
    poller: ConvergenceWatch | None = None
    try:
        prereq = prerequisites(kind, artifact_dir)
        create_all(kube, prereq, 1)
        op = start_operator(cp, workdir, procs, "first")
        wait_quiet(cp, 2.0, 90, [cp.proc, op], need=kopf_watching)
        for p in prereq:
            wait_until(lambda p=p: converged(kube.get(API, p["kind"], NS, p["metadata"]["name"]) or {"metadata": {}}, "Ready", "True"),
                       60, f"{p['kind']}/{p['metadata']['name']} Ready")
        wait_quiet(cp, 2.0, 60, [cp.proc, op])
        watches = watched_resources(cp.requests())  # what a restarted operator must watch again before it is "quiet"
        res.rss_before = {"operator": op.rss_kib(), "control plane": cp.proc.rss_kib()}
        if kind == "running":
            kubelet = Kubelet(cp, kube, max(4, args.concurrency // 2))
        if kind == "deployment":
            serving = ServingCluster(cp, kube, max(4, args.concurrency // 2))
        cp.reset()

        log(f"{kind} x{n}: convergence with the operator running")
        objs = objects(kind, n, artifact_dir)
        poller = ConvergenceWatch(cp, kube, kind, n)
        if kubelet is not None:
            kubelet.expected = n
        created = [0]
        if args.profile:
            profile = Profile(Path(args.profile), f"{kind}-{n}", {"operator": op.pid, "control plane": cp.proc.pid, "this script": os.getpid()},
                              lambda: {"created": created[0], "status writes": sum(r["count"] for r in cp.requests() if r["client"] in OPERATOR_CLIENTS
                                                                                     and r["verb"] == "patch" and r["resource"].endswith("/status")),
                                       "converged": poller.done, "cpu operator": op.cpu_seconds(),
                                       "cpu control plane": cp.proc.cpu_seconds(), "cpu this script": own_cpu_seconds() + poller.cpu_seconds()},
                              spy=not args.no_spy)
        cpu0 = {"operator": op.cpu_seconds(), "control plane": cp.proc.cpu_seconds(), "this script": own_cpu_seconds() + poller.cpu_seconds()}
        t0, t1, res.converge_failures = create_all(kube, objs, args.concurrency, created=created)
        res.create_seconds = t1 - t0
        timeout = args.converge_timeout or (120 + n * 0.15)
        t_done = poller.wait(timeout, [cp.proc, op])
        res.converge_seconds = t_done - t0
        if profile is not None:
            profile.stop()
        # Who was the bottleneck: each process's CPU over the convergence, in % of one core (100 = saturated).
        res.converge_cpu = {k: 100 * (p.cpu_seconds() - cpu0[k]) / max(res.converge_seconds, 1e-9) for k, p in (("operator", op), ("control plane", cp.proc))}
        res.converge_cpu["this script"] = 100 * (own_cpu_seconds() + poller.cpu_seconds() - cpu0["this script"]) / max(res.converge_seconds, 1e-9)
        res.cpu_us_per_object = {k: v / 100 * res.converge_seconds / n * 1e6 for k, v in res.converge_cpu.items()}
        res.converge_rate = n / res.converge_seconds
        log(f"  converged in {res.converge_seconds:.1f}s ({res.converge_rate:.0f} objects/s; seen by a watch, confirmed by {poller.poller.lists} LIST(s))")
        _, quiet = wait_quiet(cp, 3.0, 60 + n * 0.02, [cp.proc, op])
        if not quiet:
            res.notes.append("the operator did not get quiet after convergence (counts cut at the timeout)")
        res.steady = categorise(cp.requests(), kind)
        res.rss_after = {"operator": op.rss_kib(), "control plane": cp.proc.rss_kib()}
        if kubelet is not None:
            res.kubelet_started = kubelet.started
            if kubelet.all_jobs_at is not None:
                res.notes.append(f"the operator had made all {n} Jobs {kubelet.all_jobs_at - t0:.1f} s after the first create; "
                                 f"this script's kubelet had all their Pods Running at {(kubelet.all_pods_at or t_done) - t0:.1f} s")
            if kubelet.errors:
                res.notes.append("kubelet errors: " + " | ".join(kubelet.errors))
        if serving is not None:
            res.kubelet_started = serving.pods_started
            res.notes.append(f"this script's cluster stand-ins: {serving.pods_started} serving pods started, their sidecars read "
                             f"{serving.sidecar_reads} times, {len(serving.engines.models)} smoke requests answered")
            if serving.errors:
                res.notes.append("stand-in errors: " + " | ".join(serving.errors))

        log(f"{kind} x{n}: idle for {args.idle_seconds:.0f}s")
        cpu0 = {"operator": op.cpu_seconds(), "control plane": cp.proc.cpu_seconds()}
        cp.reset()
        t_idle = time.monotonic()
        end = t_idle + args.idle_seconds
        cpu_mid: dict[str, float] | None = None
        while time.monotonic() < end:
            if cpu_mid is None and time.monotonic() >= t_idle + args.idle_seconds / 2:
                cpu_mid = {"operator": op.cpu_seconds(), "control plane": cp.proc.cpu_seconds(), "t": time.monotonic()}
            for p in (cp.proc, op):
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited while idle:\n{p.tail()}")
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        rows = cp.requests()
        res.idle_seconds = time.monotonic() - t_idle
        res.idle = categorise(rows, kind)
        res.idle_cpu = {"operator": 100 * (op.cpu_seconds() - cpu0["operator"]) / res.idle_seconds,
                        "control plane": 100 * (cp.proc.cpu_seconds() - cpu0["control plane"]) / res.idle_seconds}
        if cpu_mid is not None:  # the second half alone: without the tail of watch events still being drained after convergence
            half = time.monotonic() - cpu_mid["t"]
            res.idle_cpu["operator, 2nd half"] = 100 * (op.cpu_seconds() - cpu_mid["operator"]) / half
            res.idle_cpu["control plane, 2nd half"] = 100 * (cp.proc.cpu_seconds() - cpu_mid["control plane"]) / half

        log(f"{kind} x{n}: restart")
        res.log_counts = operator_log_counts(op)
        res.restart_stop_seconds = op.stop()
        cp.reset()
        t_start = time.monotonic()
        op = start_operator(cp, workdir, procs, "restart")
        res.restart_quiet_seconds, res.restart_quiet = wait_quiet(cp, args.quiet_seconds, 120 + n * 0.05, [cp.proc, op], t0=t_start,
                                                                   need=lambda rows: watches <= watched_resources(rows))
        res.restart = categorise(cp.requests(), kind)
        restart_counts = operator_log_counts(op)
        res.log_counts = {k: v + restart_counts[k] for k, v in res.log_counts.items()}
    finally:
        if profile is not None and not profile.stop_flag.is_set():
            profile.stop()
        if poller is not None:
            poller.stop()
        if kubelet is not None:
            kubelet.stop()
        if serving is not None:
            serving.stop()
        if op is not None:
            op.stop()
        cp.proc.stop()
    return res


# ----------------------------------------------------------------------------- report


def fmt_counter(c: Counter, per: float = 1.0, digits: int = 2) -> str:
    if not c:
        return "-"
    return ", ".join(f"{k} {v / per:.{digits}f}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]))


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def reads_per_verb(r: Result, which: str) -> Counter:
    return r.__dict__[which]["reads"]


def per_object_gets(d: dict[str, Any]) -> int:
    """GETs of objects (discovery GETs such as `/apis` aside)."""
    return sum(v for k, v in d["read_resources"].items() if k.startswith("get ") and not k.startswith("get /"))


def restart_reads(d: dict[str, Any]) -> str:
    """Lists and watches by how many resources they cover; discovery and object GETs apart."""
    rr = d["read_resources"]
    out = []
    for verb in ("list", "watch"):
        keys = [k for k in rr if k.startswith(verb + " ")]
        if keys:
            out.append(f"{verb} {sum(rr[k] for k in keys)} over {len(keys)} resources")
    discovery = sum(v for k, v in rr.items() if k.startswith("get /"))
    out.append(f"discovery GETs {discovery}")
    gets = Counter({k: v for k, v in rr.items() if k.startswith("get ") and not k.startswith("get /")})
    out.append(f"object GETs {sum(gets.values())}" + (f" ({fmt_counter(gets, 1, 0)})" if gets else ""))
    if d["progress"]:
        out.append(f"pod log reads {d['progress']}")
    return "; ".join(out)


def cpu_budget(r: Result) -> str:
    """Where CPU bounds the ratio (every process on the same cores): convergence / raw is at most the CPU of a raw
    create over the CPU of a converged object. With the operator's own CPU at zero that is the ceiling any operator
    could reach here; the operator CPU per object that would allow 0.5x follows."""
    raw, conv, op = sum(r.raw_cpu_us_per_object.values()), sum(r.cpu_us_per_object.values()), r.cpu_us_per_object.get("operator", 0.0)
    if not raw or not conv:
        return "-"
    rest = conv - op
    allow = 2 * raw - rest
    return (f"CPU-bound ratio raw/converged {raw / conv:.2f}x; with an operator costing no CPU {raw / rest:.2f}x; 0.5x needs the operator "
            + (f"at <= {allow:,.0f} µs per object (now {op:,.0f})" if allow > 0 else f"to cost less than nothing (the rest alone is {rest:,.0f} µs > 2 x {raw:,.0f})"))


def print_result(r: Result) -> None:
    n = r.n
    st, idle, rs = r.steady, r.idle, r.restart
    w = st["writes"]
    rss = {k: (r.rss_after[k] - r.rss_before[k]) * 1024 / n for k in r.rss_before}
    print(f"\n== {r.kind} x {n:,} ({KIND_OF[r.kind]}, expecting {'='.join(EXPECTED[r.kind])}) ==")
    rows = [
        ("raw create (no operator)", f"{r.raw_rate:,.0f} objects/s" + (f" ({r.raw_failures} failed)" if r.raw_failures else "")),
        ("convergence", f"{r.converge_rate:,.0f} objects/s ({r.converge_seconds:.1f} s; creates took {r.create_seconds:.1f} s)"
         + (f" ({r.converge_failures} creates failed)" if r.converge_failures else "")),
        ("convergence / raw", f"{r.converge_rate / r.raw_rate:.2f}x" if r.raw_rate else "-"),
        ("floor / raw", (f"{r.floor_rate / r.raw_rate:.2f}x ({r.floor_rate:,.0f} objects/s: the load generator making the operator's writes itself, "
                         f"no operator); convergence / floor {r.converge_rate / r.floor_rate:.2f}x") if r.floor_rate and r.raw_rate else "-"),
        ("  CPU while converging", ", ".join(f"{k} {v:.0f} % of a core" for k, v in r.converge_cpu.items())
         + " (this script: the load generator, the convergence watch (its own process) and the stand-ins, on the same cores)"),
        ("  CPU per object", ", ".join(f"{k} {v:,.0f} µs" for k, v in r.cpu_us_per_object.items())
         + f", all {sum(r.cpu_us_per_object.values()):,.0f} µs; a raw create: " + ", ".join(f"{k} {v:,.0f} µs" for k, v in r.raw_cpu_us_per_object.items())
         + f", all {sum(r.raw_cpu_us_per_object.values()):,.0f} µs (the load-independent figures: CPU, not wall time)"),
        ("  CPU budget", cpu_budget(r)),
        ("writes/object to steady", f"{(w['object'] + w['events'] + w['other']) / n:.2f} (status/object {w['object'] / n:.2f}, Events {w['events'] / n:.2f}, "
                                    f"other {w['other'] / n:.2f}); children {w['children'] / n:.2f}"
                                    + (f"; creates of kinds not served here (404, wrote nothing) {fmt_counter(st['unserved'], 1, 0)}" if st["unserved"] else "")),
        ("  by verb", fmt_counter(st["write_verbs"], n)),
        ("reads/object to steady", fmt_counter(st["reads"], n, 3) + (f"; progress reads (pods/log) {st['progress'] / n:.2f}" if st["progress"] else "")),
        ("  by resource", fmt_counter(st["read_resources"], 1, 0)),
        ("idle requests/s", f"{(idle['total'] - idle['progress']) / r.idle_seconds:.2f} over {r.idle_seconds:.0f} s"
                            + (f" ({fmt_counter(Counter({k: v for k, v in idle['write_verbs'].items()}) + idle['read_resources'], r.idle_seconds)})" if idle['total'] - idle['progress'] else "")
                            + (f"; progress reads {idle['progress'] / r.idle_seconds:.1f}/s" if r.kind == "running" else "")),
        ("idle CPU", f"operator {r.idle_cpu['operator']:.2f} % of a core, control plane {r.idle_cpu['control plane']:.2f} %"
                     + (f" (second half of the window: operator {r.idle_cpu['operator, 2nd half']:.2f} %, control plane {r.idle_cpu['control plane, 2nd half']:.2f} %)"
                        if "operator, 2nd half" in r.idle_cpu else "")),
        ("RSS", f"operator {r.rss_before['operator'] / 1024:.0f} -> {r.rss_after['operator'] / 1024:.0f} MiB ({rss['operator'] / 1024:.1f} KiB/object), "
                f"control plane {r.rss_before['control plane'] / 1024:.0f} -> {r.rss_after['control plane'] / 1024:.0f} MiB ({rss['control plane'] / 1024:.1f} KiB/object)"),
        ("restart", f"quiet after {r.restart_quiet_seconds:.1f} s{'' if r.restart_quiet else ' (NOT quiet by the timeout)'} (SIGTERM exit took {r.restart_stop_seconds:.1f} s); "
                    f"writes {sum(rs['writes'].values())}"
                    + (f" (and creates of kinds not served here, 404: {fmt_counter(rs['unserved'], 1, 0)})" if rs["unserved"] else "")
                    + f"; reads {fmt_counter(rs['reads'], 1, 0)}"
                    + (f"; progress reads {rs['progress']}" if rs["progress"] else "")),
    ]
    rows.append(("  restart reads", restart_reads(rs)))
    if sum(rs["writes"].values()):
        rows.append(("  restart writes", fmt_counter(rs["write_verbs"], 1, 0)))
    errors = st["errors"] + idle["errors"] + rs["errors"]
    if errors:
        rows.append(("operator requests >= 400", fmt_counter(errors, 1, 0)))
    if r.kind in ("running", "deployment"):
        rows.append(("kubelet (this script)", f"started {r.kubelet_started} pods"))
    rows.append(("operator log", ", ".join(f"{k} {v}" for k, v in r.log_counts.items())))
    for note in r.notes:
        rows.append(("note", note))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def figures(r: Result) -> dict[str, float]:
    n = r.n
    w = r.steady["writes"]
    idle_req = (r.idle["total"] - r.idle["progress"]) / r.idle_seconds
    return {
        "raw create/s": r.raw_rate,
        "convergence/s": r.converge_rate,
        "convergence/raw": r.converge_rate / r.raw_rate if r.raw_rate else 0.0,
        "CPU µs/object operator": r.cpu_us_per_object.get("operator", 0.0),
        "CPU µs/object all": sum(r.cpu_us_per_object.values()),
        "CPU µs/raw create all": sum(r.raw_cpu_us_per_object.values()),
        "writes/object": (w["object"] + w["events"] + w["other"]) / n,
        "children writes/object": w["children"] / n,
        "reads/object": sum(r.steady["reads"].values()) / n,
        "idle requests/s": idle_req,
        "idle progress reads/s": r.idle["progress"] / r.idle_seconds,
        "idle CPU % operator": r.idle_cpu["operator"],
        "idle CPU % control plane": r.idle_cpu["control plane"],
        "RSS KiB/object operator": (r.rss_after["operator"] - r.rss_before["operator"]) / n,
        "RSS KiB/object control plane": (r.rss_after["control plane"] - r.rss_before["control plane"]) / n,
        "restart writes": sum(r.restart["writes"].values()),
        "restart gets": per_object_gets(r.restart),
        "restart progress reads": r.restart["progress"],
        "restart seconds to quiet": r.restart_quiet_seconds,
    }


def print_summary(results: list[Result]) -> None:
    ok = [r for r in results if r.error is None]
    print("\n== summary ==")
    head = f"  {'kind':<11} {'N':>6} {'raw/s':>7} {'conv/s':>7} {'ratio':>6} {'µs/o op':>7} {'µs/o':>6} {'µs/raw':>6} {'wr/obj':>6} {'child':>5} {'rd/obj':>6} {'idle r/s':>8} {'prog/s':>6} " \
           f"{'cpu op%':>7} {'cpu cp%':>7} {'KiB/o op':>8} {'KiB/o cp':>8} {'rst wr':>6} {'rst get':>7} {'rst s':>5}"
    print(head)
    print("  (µs/o op: the operator's CPU per converged object; µs/o: every process's, this script's included; "
          "µs/raw: the control plane's and this script's per raw create)")
    for r in ok:
        f = figures(r)
        print(f"  {r.kind:<11} {r.n:>6} {f['raw create/s']:>7.0f} {f['convergence/s']:>7.0f} {f['convergence/raw']:>6.2f} "
              f"{f['CPU µs/object operator']:>7.0f} {f['CPU µs/object all']:>6.0f} {f['CPU µs/raw create all']:>6.0f} {f['writes/object']:>6.2f} "
              f"{f['children writes/object']:>5.2f} {f['reads/object']:>6.3f} {f['idle requests/s']:>8.2f} {f['idle progress reads/s']:>6.1f} "
              f"{f['idle CPU % operator']:>7.2f} {f['idle CPU % control plane']:>7.2f} {f['RSS KiB/object operator']:>8.1f} "
              f"{f['RSS KiB/object control plane']:>8.1f} {f['restart writes']:>6.0f} {f['restart gets']:>7.0f} {f['restart seconds to quiet']:>5.1f}")
    for r in results:
        if r.error is not None:
            print(f"  {r.kind:<11} {r.n:>6} FAILED: {r.error.splitlines()[0][:160]}")

    print("\n== targets ==")
    for r in ok:
        f = figures(r)
        checks = [
            (f"convergence >= 0.5x raw ({f['convergence/raw']:.2f}x)", f["convergence/raw"] >= 0.5),
            (f"<= 3 writes/object to steady ({f['writes/object']:.2f}, children apart)", f["writes/object"] <= 3),
            (f"0 idle requests/s ({f['idle requests/s']:.2f}" + (", progress reads apart)" if r.kind == "running" else ")"), f["idle requests/s"] == 0),
            (f"idle operator CPU < 1 % ({f['idle CPU % operator']:.2f} %)", f["idle CPU % operator"] < 1),
            (f"restart: 0 writes ({f['restart writes']:.0f})", f["restart writes"] == 0 and r.restart_quiet),
            (f"restart: no per-object get ({f['restart gets']:.0f} gets" + (
                f", {f['restart progress reads']:.0f} pod log reads: no burst, at most the idle rate {f['idle progress reads/s']:.1f}/s over "
                f"{f['restart seconds to quiet']:.1f} s (+5)" if r.kind == "running" else "") + ")",
             f["restart gets"] == 0 and r.restart_quiet and (r.kind != "running" or f["restart progress reads"]
                                                             <= 1.2 * f["idle progress reads/s"] * f["restart seconds to quiet"] + 5)),
        ]
        if not r.restart_quiet:
            checks.append((f"restart: quiet within the timeout (not quiet after {f['restart seconds to quiet']:.0f} s: restart counts incomplete)", False))
        print(f"  {r.kind} x {r.n:,}: " + "; ".join(f"{what} {met(good)}" for what, good in checks))

    sizes = sorted({r.n for r in ok})
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        print(f"\n== growth from {lo:,} to {hi:,} objects ({hi / lo:.0f}x the objects; each figure at {hi:,} / at {lo:,}) ==")
        for kind in KINDS:
            a = next((r for r in ok if r.kind == kind and r.n == lo), None)
            b = next((r for r in ok if r.kind == kind and r.n == hi), None)
            if a is None or b is None:
                continue
            fa, fb = figures(a), figures(b)
            parts = []
            for k in fa:
                if fa[k] == 0 and fb[k] == 0:
                    parts.append(f"{k} 0 -> 0")
                elif fa[k] == 0:
                    parts.append(f"{k} 0 -> {fb[k]:.3g}")
                else:
                    parts.append(f"{k} {fa[k]:.3g} -> {fb[k]:.3g} ({fb[k] / fa[k]:.2f}x)")
            print(f"  {kind}: " + "; ".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="objects of each kind (default 1000 10000)")
    parser.add_argument("--quick", action="store_true", help="200 objects of each kind, 10 s idle")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent creates (threads) of the load generator")
    parser.add_argument("--idle-seconds", type=float, default=None, help="idle measurement (default 60; 10 with --quick)")
    parser.add_argument("--quiet-seconds", type=float, default=3.0, help="no operator request for this long means quiet (restart)")
    parser.add_argument("--converge-timeout", type=float, default=None, help="seconds (default 120 + 0.15 per object)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the processes' logs")
    parser.add_argument("--profile", metavar="DIR", help="py-spy each process while converging, and a timeline, into DIR (class Profile)")
    parser.add_argument("--no-spy", action="store_true", help="with --profile: the timeline only (no py-spy)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = [200]
    if args.idle_seconds is None:
        args.idle_seconds = 10.0 if args.quick else 60.0

    _, settings = operator_env()
    print(f"operator_scale: sizes {args.sizes}, kinds {args.kinds}, concurrency {args.concurrency}, idle {args.idle_seconds:.0f} s, "
          f"{os.cpu_count()} CPUs; operator environment: {settings or 'defaults (no PERENNIAL_* set)'}")
    print("Pod logs: not settable over HTTP, so running pods log nothing "
          "(progress reads find an empty log).", flush=True)

    def on_term(*_: Any) -> None:
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="perennial-scale-"))
    procs: list[Proc] = []
    results: list[Result] = []
    crashed = False
    try:
        for n in args.sizes:
            for kind in args.kinds:
                try:
                    r = scenario(args, kind, n, workdir, procs)
                except (TimeoutError, RuntimeError, OSError, urllib.error.URLError) as exc:
                    r = Result(kind, n, error=f"{type(exc).__name__}: {exc}")
                    log(f"{kind} x{n} failed: {r.error}")
                    crashed = crashed or not isinstance(exc, TimeoutError)  # a timeout is a measurement, not a crash
                    for p in procs:
                        p.kill()
                results.append(r)
                if r.error is None:
                    print_result(r)
                    sys.stdout.flush()
        print_summary(results)
    except (KeyboardInterrupt, Interrupted):
        log("interrupted")
        crashed = True
        if results:
            print_summary(results)
    except Exception:
        traceback.print_exc()
        crashed = True
    finally:
        for p in procs:
            p.kill()
        if args.keep_logs:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
