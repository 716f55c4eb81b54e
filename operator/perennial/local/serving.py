"""The local kubelet for long-running pods (those of apps/v1 ReplicaSets, or bare Pods): containers as processes.

`LocalKubelet` (kubelet.py) runs the pods of batch/v1 Jobs it creates itself. `PodKubelet` runs every other Pod
of the embedded control plane whose containers all use a mapped image (a key of `images`), as a kubelet does:

- each container is a local process (`command[0]` mapped through `commands`, as the Job kubelet maps it; e.g.
  `perennial-server sidecar ...` -> `<python> -m perennial_server.cli sidecar ...`), with the pod's env (`env`,
  `envFrom`, downward API incl. `status.podIP`) and volumes materialised under `<workdir>/<ns>/<pod>/volumes`
  (mountPaths rewritten in command, args, env and workingDir): emptyDir directories, configMap/secret/projected
  volumes written as kubelet writes them (a timestamped `..<time>` directory, the `..data` symlink swapped
  atomically with a rename, each key a symlink through `..data`), updated when the ConfigMap/Secret changes, so a
  file watcher sees one atomic change;
- each pod gets two addresses of 127.0.0.0/8 (pod IP `127.<b>.x.y` and its own loopback `127.<b+1>.x.y`) and its
  Python processes a network shim (`podnet/sitecustomize.py`): binding 0.0.0.0 binds the pod IP, 127.0.0.1 is the
  pod's loopback (for bind and connect). So two pods both listen on :8080 and :8000, the sidecar reaches its
  engine at http://127.0.0.1:8000 and nothing outside the pod does;
- `restartPolicy` Always/OnFailure/Never with exponential restart backoff (`restart_backoff_seconds` doubling up
  to `max_backoff_seconds`; Kubernetes uses 10 s to 300 s), `restartCount`, `lastState`, CrashLoopBackOff;
- startup, readiness and liveness probes run for real (httpGet, tcpSocket, exec; `initialDelaySeconds`,
  `periodSeconds`, `timeoutSeconds`, `successThreshold`, `failureThreshold`): a failed liveness or startup probe
  kills the container (SIGTERM, grace, SIGKILL) and restarts it; readiness drives `ready`;
- pod status: `phase`, `podIP(s)`, `hostIP`, `startTime`, conditions PodScheduled/Initialized/ContainersReady/
  Ready, `containerStatuses` (ready, started, restartCount, state, lastState, `containerID: local://<pid>`);
- a deleted Pod's processes get SIGTERM, the grace period (`deletionGracePeriodSeconds` or the pod's
  `terminationGracePeriodSeconds`, capped by `max_grace_seconds`), then SIGKILL of the process group; its
  addresses and volumes are released afterwards. The embedded API server removes a Pod at once (no graceful
  deletion phase), so the processes may outlive the object by up to the grace period. A container's
  `lifecycle.preStop` hook (sleep, exec, httpGet) runs first, within the grace period (kubelet's 2 s extra for
  SIGTERM when it overran), on pod deletion and before a probe-failure restart; not when the kubelet itself stops
  (a lost node). postStart hooks are not run.

Pods owned by a Job are left to `LocalKubelet`; pods with an unmapped image are left Pending.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import http.client
import logging
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..kube.client import ApiError, Kube
from .informers import Api, LoopThread, StoreReader, controller_of
from .kubelet import DEFAULT_COMMANDS, _ConfigError, _exit_code, _PodSandbox

__all__ = ["PodKubelet"]

log = logging.getLogger(__name__)

PODNET_DIR = str(Path(__file__).resolve().parent / "podnet")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _AddressPool:
    """Pod IP 127.<b>.x.y and pod loopback 127.<b+1>.x.y pairs. `b` is claimed for the kubelet's life with an
    flock on `<tmp>/perennial-local-pods-127.<b>.lock`, so local clusters of other processes on the host (parallel
    test runs, two `perennial dev`) never hand out the same addresses."""

    def __init__(self, octet: int | None = None) -> None:
        self._lock_fd: int | None = None
        if octet is None:
            candidates = list(range(16, 250, 2))
            random.shuffle(candidates)
            for b in candidates:
                if self._claim(b):
                    octet = b
                    break
            else:
                raise RuntimeError("no free 127.<b>.0.0/16 range for local pods")
        self.octet = octet
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def _claim(self, b: int) -> bool:
        path = os.path.join(tempfile.gettempdir(), f"perennial-local-pods-127.{b}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def allocate(self) -> tuple[str, str]:
        with self._lock:
            n = 1
            while n in self._used or n % 256 in (0, 255):
                n += 1
            if n >= 65535:
                raise RuntimeError("no free local pod address")
            self._used.add(n)
        x, y = divmod(n, 256)
        return f"127.{self.octet}.{x}.{y}", f"127.{self.octet + 1}.{x}.{y}"

    def release(self, ip: str) -> None:
        parts = ip.split(".")
        with self._lock:
            self._used.discard(int(parts[2]) * 256 + int(parts[3]))


class PodKubelet:
    """Runs the non-Job Pods of mapped images as local processes (see the module docstring)."""

    def __init__(self, kube: Kube, server_handle: Any, *, workdir: str | os.PathLike[str], pvc_root: str | os.PathLike[str],
                 images: dict[str, list[str]], commands: dict[str, list[str]] | None = None, loop: LoopThread | None = None,
                 node_name: str = "perennial-local", restart_backoff_seconds: float = 1.0, max_backoff_seconds: float = 30.0,
                 max_grace_seconds: float = 30.0, address_octet: int | None = None) -> None:
        self.kube = kube
        self.api = Api(kube)
        self.server = server_handle
        self.workdir = Path(workdir).resolve()
        self.pvc_root = Path(pvc_root).resolve()
        self.images = {k: list(v) for k, v in images.items()}
        self.commands = dict(DEFAULT_COMMANDS if commands is None else commands)
        self.node_name = node_name
        self.restart_backoff_seconds = restart_backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.max_grace_seconds = max_grace_seconds
        self.addresses = _AddressPool(address_octet)
        self._own_loop = loop is None
        self.loop = loop or LoopThread("perennial-pod-kubelet")
        self.reader = StoreReader(server_handle, self.loop)
        self._lock = threading.Lock()
        self._pods: dict[str, _PodWorker] = {}  # uid -> worker
        self._ignored: set[str] = set()
        self._finished: set[str] = set()  # pods whose worker ended: late events of theirs start nothing
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "PodKubelet":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pvc_root.mkdir(parents=True, exist_ok=True)
        self.loop.start()
        self.reader.watch("", "v1", "pods", self._on_pod)
        self.reader.watch("", "v1", "configmaps", self._on_config)
        self.reader.watch("", "v1", "secrets", self._on_config)
        log.info("Started the local pod kubelet node=%s addresses=127.%d.0.0/16", self.node_name, self.addresses.octet)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop watching and end every pod's processes (the Pod objects stay as they are: a lost node)."""
        self._stopped = True
        self.reader.close()
        with self._lock:
            workers = list(self._pods.values())
        for w in workers:
            w.terminate(min(5.0, self.max_grace_seconds), write_status=False, hooks=False)
        deadline = time.monotonic() + timeout
        for w in workers:
            w.thread.join(max(0.1, deadline - time.monotonic()))
        self.addresses.close()
        if self._own_loop:
            self.loop.stop()

    def __enter__(self) -> "PodKubelet":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def pids(self, namespace: str, name: str) -> dict[str, int]:
        """Container name -> pid of the running processes of a pod (for tests and debugging)."""
        with self._lock:
            workers = [w for w in self._pods.values() if w.ns == namespace and w.pod_name == name]
        out: dict[str, int] = {}
        for w in workers:
            for c in w.containers:
                if c.proc is not None and c.proc.poll() is None:
                    out[c.name] = c.proc.pid
        return out

    # ------------------------------------------------------------------ events

    def _eligible(self, pod: dict) -> bool:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        ref = controller_of(pod)
        if ref is not None and ref.get("kind") == "Job" and str(ref.get("apiVersion", "")).startswith("batch/"):
            return False  # the Job kubelet's
        if spec.get("nodeName") and spec["nodeName"] != self.node_name:
            return False
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return False
        images = [c.get("image") for c in (spec.get("containers") or []) + (spec.get("initContainers") or [])]
        if not images or any(i not in self.images for i in images):
            if meta["uid"] not in self._ignored:
                self._ignored.add(meta["uid"])
                log.info("Left a pod of an unmapped image pending pod=%s namespace=%s images=%s", meta["name"], meta.get("namespace"), images)
            return False
        return True

    def _on_pod(self, etype: str, pod: dict) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        with self._lock:
            worker = self._pods.get(uid)
        if etype == "DELETED" or meta.get("deletionTimestamp"):
            if etype == "DELETED":
                self._ignored.discard(uid)
                with self._lock:
                    self._finished.discard(uid)
            if worker is not None:
                grace = meta.get("deletionGracePeriodSeconds")
                if grace is None:
                    grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
                worker.terminate(float(grace), write_status=etype != "DELETED")
            return
        if worker is not None or self._stopped or uid in self._finished or not self._eligible(pod):
            return
        worker = _PodWorker(self, pod)
        with self._lock:
            self._pods[uid] = worker
        worker.thread.start()

    def _on_config(self, etype: str, obj: dict) -> None:
        kind = obj.get("kind") or ""
        ns, name = obj["metadata"].get("namespace"), obj["metadata"]["name"]
        with self._lock:
            workers = [w for w in self._pods.values() if w.ns == ns and (kind, name) in w.config_refs]
        for w in workers:
            w.request_refresh()

    def _done(self, worker: "_PodWorker") -> None:
        with self._lock:
            self._pods.pop(worker.uid, None)
            self._finished.add(worker.uid)


class _Container:
    """One container's process, probes and status."""

    def __init__(self, spec: dict, init: bool = False) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.init = init
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.backoff_n = 0
        self.state: dict[str, Any] = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: dict[str, Any] = {}
        self.started = False
        self.ready = False
        self.done = False  # terminated for good (restart policy)
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()  # the process exited, or the pod is stopping
        self.env: dict[str, str] = {}
        self.cwd = ""

    def watch_exit(self, proc: subprocess.Popen[bytes]) -> None:
        """Wake this container's thread when `proc` exits (a thread blocked in wait(): no polling)."""
        def wait() -> None:
            proc.wait()
            self.wake.set()
        threading.Thread(target=wait, name=f"wait-{proc.pid}", daemon=True).start()


class _PodWorker(_PodSandbox):
    """Runs one pod: its containers' threads, its volumes, its status."""

    def __init__(self, kubelet: PodKubelet, pod: dict) -> None:
        self.k = kubelet  # type: ignore[assignment]
        self.kube = kubelet.kube
        self.api = kubelet.api
        meta = pod["metadata"]
        self.pod = pod
        self.ns: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.job_name = self.pod_name  # for the sandbox's log lines
        self.uid: str = meta["uid"]
        self.pod_spec: dict[str, Any] = dict(pod.get("spec") or {})
        self.template = {"metadata": meta}
        self.container: dict[str, Any] = {}
        self.restart_policy = self.pod_spec.get("restartPolicy") or "Always"
        self.init_containers = [_Container(c, init=True) for c in self.pod_spec.get("initContainers") or []]
        self.containers = [_Container(c) for c in self.pod_spec.get("containers") or []]
        self.pod_dir: Path | None = self.k.workdir / self.ns / self.pod_name
        self.pod_ip, self.pod_lo = kubelet.addresses.allocate()
        self.start_time = _now()
        self.config_refs = self._config_refs()
        self._prep_lock = threading.Lock()
        self._stopping = threading.Event()
        self._grace = 30.0
        self._skip_hooks = False
        self._init_failed = False  # an init container failed under restartPolicy Never: the pod failed
        self._write_status = True
        self._dirty = threading.Event()
        self._refresh = threading.Event()
        self._initialized = not self.init_containers
        self._last_status: dict[str, Any] | None = None
        self._transitions: dict[str, tuple[str, str]] = {}
        self.thread = threading.Thread(target=self._main, name=f"pod-{self.ns}-{self.pod_name}", daemon=True)

    # ------------------------------------------------------------------ control

    def terminate(self, grace: float, write_status: bool = True, hooks: bool = True) -> None:
        if not hooks:
            self._skip_hooks = True  # the kubelet itself stops (a lost node): no preStop hooks
            for c in self.init_containers + self.containers:
                c.wake.set()
        if not self._stopping.is_set():
            self._grace = max(0.0, min(float(grace), self.k.max_grace_seconds))
            self._write_status = write_status
            log.info("Stopping pod processes pod=%s namespace=%s grace=%.0fs", self.pod_name, self.ns, self._grace)
            self._stopping.set()
            for c in self.init_containers + self.containers:
                c.wake.set()
            self._dirty.set()

    def request_refresh(self) -> None:
        self._refresh.set()
        self._dirty.set()

    def mark(self) -> None:
        self._dirty.set()

    def _config_refs(self) -> set[tuple[str, str]]:
        refs: set[tuple[str, str]] = set()
        for vol in self.pod_spec.get("volumes") or []:
            if vol.get("configMap") is not None:
                refs.add(("ConfigMap", vol["configMap"].get("name", "")))
            if vol.get("secret") is not None:
                refs.add(("Secret", vol["secret"].get("secretName", "")))
            for src in (vol.get("projected") or {}).get("sources") or []:
                if src.get("configMap") is not None:
                    refs.add(("ConfigMap", src["configMap"].get("name", "")))
                if src.get("secret") is not None:
                    refs.add(("Secret", src["secret"].get("name", "")))
        return refs

    # ------------------------------------------------------------------ main loop

    def _main(self) -> None:
        try:
            assert self.pod_dir is not None
            self.pod_dir.mkdir(parents=True, exist_ok=True)
            self._bind()
            self._write_pod_status()
            for c in self.init_containers:
                if not self._run_init(c):
                    self._init_failed = not self._stopping.is_set()
                    self.mark()
                    break
            else:
                self._initialized = True
                for c in self.containers:
                    c.thread = threading.Thread(target=self._supervise, args=(c,), name=f"pod-{self.pod_name}-{c.name}", daemon=True)
                    c.thread.start()
            while not self._stopping.is_set():
                self._dirty.wait()
                self._dirty.clear()
                if self._refresh.is_set():
                    self._refresh.clear()
                    self._refresh_volumes()
                if not self._stopping.is_set():
                    self._write_pod_status()
                    if self.containers and all(c.done for c in self.containers):
                        return
            self._kill_all()
        except Exception:
            log.exception("Local pod worker failed pod=%s namespace=%s", self.pod_name, self.ns)
            self._stopping.set()
            self._kill_all()
        finally:
            for c in self.containers:
                if c.thread is not None:
                    c.thread.join(self._grace + 10)
            self.k.addresses.release(self.pod_ip)
            if self.pod_dir is not None and self._stopping.is_set():
                shutil.rmtree(self.pod_dir / "volumes", ignore_errors=True)
            self.k._done(self)

    def _bind(self) -> None:
        """The scheduler's part: the pod is bound to this node (`spec.nodeName`, as a Binding sets it)."""
        if self.pod_spec.get("nodeName"):
            return
        try:
            self.api.patch("v1", "Pod", self.ns, self.pod_name, {"spec": {"nodeName": self.k.node_name}})
        except ApiError as exc:
            log.debug("Could not bind pod=%s to node=%s: %s", self.pod_name, self.k.node_name, exc)

    def _kill_all(self) -> None:
        """Each container's thread ends its own process (SIGTERM, grace, SIGKILL: in parallel); init containers here."""
        for c in self.containers:
            if c.thread is not None:
                c.thread.join(self._grace + 10)
        procs = [c.proc for c in self.init_containers + self.containers if c.proc is not None and c.proc.poll() is None]
        for p in procs:
            _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + self._grace
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            if p.poll() is None:
                _signal(p, signal.SIGKILL)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    log.warning("A pod process did not die pod=%s pid=%d", self.pod_name, p.pid)
        # whatever the container left in its process group goes too (a real runtime kills the cgroup)
        for p in procs:
            _signal(p, signal.SIGKILL)
        if self._write_status:
            for c in self.containers:
                c.ready = False
            try:
                self._write_pod_status()
            except Exception:
                log.debug("Could not write the status of a stopped pod", exc_info=True)

    # ------------------------------------------------------------------ containers

    def _start(self, c: _Container) -> subprocess.Popen[bytes] | None:
        assert self.pod_dir is not None
        try:
            with self._prep_lock:
                self.container = c.spec
                argv, env, cwd, _ = self._prepare(self.pod_name)
        except _ConfigError as exc:
            c.state = {"waiting": {"reason": exc.reason, "message": str(exc)}}
            self.mark()
            return None
        env["PYTHONPATH"] = PODNET_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PERENNIAL_LOCAL_POD_IP"] = self.pod_ip
        env["PERENNIAL_LOCAL_POD_LOOPBACK"] = self.pod_lo
        env.setdefault("HOSTNAME", self.pod_name)
        c.env, c.cwd = env, cwd
        try:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            c.state = {"waiting": {"reason": "RunContainerError", "message": str(exc)}}
            self.mark()
            return None
        log.info("Started container pod=%s namespace=%s container=%s pid=%d ip=%s", self.pod_name, self.ns, c.name, proc.pid, self.pod_ip)
        threading.Thread(target=self._pump, args=(proc, c.name), daemon=True).start()
        c.wake.clear()
        c.watch_exit(proc)
        return proc

    def _run_init(self, c: _Container) -> bool:
        while not self._stopping.is_set():
            proc = self._start(c)
            if proc is None:
                if self._stopping.wait(1.0):
                    return False
                continue
            c.proc = proc
            started = _now()
            c.state = {"running": {"startedAt": started}}
            self.mark()
            while proc.poll() is None:
                if self._stopping.is_set():
                    return False
                c.wake.wait()
                c.wake.clear()  # the loop rechecks the process and the pod: a stale wake-up costs one turn
                if self._stopping.is_set():
                    return False
            rc = _exit_code(proc.returncode)
            c.state = {"terminated": {"exitCode": rc, "reason": "Completed" if rc == 0 else "Error", "startedAt": started, "finishedAt": _now()}}
            self.mark()
            if rc == 0:
                c.done = True
                return True
            if self.restart_policy == "Never":
                return False
            c.last_state, c.restarts, c.backoff_n = c.state, c.restarts + 1, c.backoff_n + 1
            if self._stopping.wait(self._backoff(c)):
                return False
        return False

    def _backoff(self, c: _Container) -> float:
        return min(self.k.restart_backoff_seconds * 2 ** max(0, c.backoff_n - 1), self.k.max_backoff_seconds)

    def _supervise(self, c: _Container) -> None:
        while not self._stopping.is_set():
            proc = self._start(c)
            if proc is None:
                if self._stopping.wait(1.0):
                    return
                continue
            c.proc = proc
            started_at, t0 = _now(), time.monotonic()
            c.state = {"running": {"startedAt": started_at}}
            c.started = c.spec.get("startupProbe") is None
            c.ready = c.started and c.spec.get("readinessProbe") is None
            self.mark()
            killed_by = self._watch_process(c, proc, t0)
            if self._stopping.is_set():
                self._kill_one(c, proc, self._grace)
                return
            if killed_by is not None:
                log.info("Restarting container pod=%s container=%s reason=%s", self.pod_name, c.name, killed_by)
                self._kill_one(c, proc, float(self.pod_spec.get("terminationGracePeriodSeconds", 30)))
            rc = _exit_code(proc.returncode)
            c.started = c.ready = False
            c.state = {"terminated": {"exitCode": rc, "reason": "Completed" if rc == 0 else "Error", "startedAt": started_at,
                                      "finishedAt": _now(), **({"message": killed_by} if killed_by else {})}}
            restart = self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and (rc != 0 or killed_by))
            if not restart:
                c.done = True
                self.mark()
                return
            # the backoff starts over once a container ran for 10 minutes, as kubelet's does
            c.backoff_n = 1 if time.monotonic() - t0 > 600 else c.backoff_n + 1
            c.last_state, c.restarts = c.state, c.restarts + 1
            delay = self._backoff(c)
            c.state = {"waiting": {"reason": "CrashLoopBackOff",
                                   "message": f"back-off {delay:g}s restarting failed container={c.name} pod={self.pod_name}_{self.ns}({self.uid})"}}
            self.mark()
            if self._stopping.wait(delay):
                return

    def _watch_process(self, c: _Container, proc: subprocess.Popen[bytes], t0: float) -> str | None:
        """Wait for the process to exit while running its probes; a reason when a probe says to kill it."""
        probes = {kind: _Probe(kind, c.spec[kind], t0) for kind in ("startupProbe", "livenessProbe", "readinessProbe") if c.spec.get(kind)}
        while proc.poll() is None:
            if self._stopping.is_set():  # checked before each wait: terminate() sets it before waking us
                return None
            now = time.monotonic()
            due = [p.next for kind, p in probes.items() if (kind == "startupProbe") != c.started]
            c.wake.wait(max(0.0, min(due) - now) if due else None)
            c.wake.clear()
            if self._stopping.is_set():
                return None
            now = time.monotonic()
            for kind, probe in probes.items():
                if not probe.due(now) or (kind != "startupProbe" and not c.started) or (kind == "startupProbe" and c.started):
                    continue
                ok = self._probe(c, probe.spec)
                probe.record(ok, time.monotonic())
                if kind == "startupProbe":
                    if probe.successes >= 1:
                        c.started = True
                        c.ready = "readinessProbe" not in probes
                        self.mark()
                    elif probe.failures >= probe.failure_threshold:
                        return "Startup probe failed"
                elif kind == "livenessProbe":
                    if probe.failures >= probe.failure_threshold:
                        return "Liveness probe failed"
                else:
                    if not c.ready and probe.successes >= probe.success_threshold:
                        c.ready = True
                        self.mark()
                    elif c.ready and probe.failures >= probe.failure_threshold:
                        c.ready = False
                        self.mark()
        return None

    def _kill_one(self, c: _Container, proc: subprocess.Popen[bytes], grace: float) -> None:
        """preStop hook, SIGTERM, the rest of the grace period, SIGKILL (kubelet's killContainer)."""
        deadline = time.monotonic() + min(grace, self.k.max_grace_seconds)
        hook = (c.spec.get("lifecycle") or {}).get("preStop")
        if hook and proc.poll() is None and not self._skip_hooks:
            self._pre_stop(c, proc, hook, deadline)
            if time.monotonic() >= deadline:
                deadline = time.monotonic() + 2.0  # kubelet's minimum after a preStop hook used the whole grace
        if proc.poll() is None:
            _signal(proc, signal.SIGTERM)
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        _signal(proc, signal.SIGKILL)  # and whatever it left in its process group
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def _pre_stop(self, c: _Container, proc: subprocess.Popen[bytes], hook: dict, deadline: float) -> None:
        log.info("Running the preStop hook pod=%s container=%s", self.pod_name, c.name)
        try:
            if hook.get("sleep") is not None:
                end = min(deadline, time.monotonic() + float(hook["sleep"].get("seconds") or 0))
                while time.monotonic() < end and proc.poll() is None and not self._skip_hooks:
                    c.wake.wait(max(0.0, end - time.monotonic()))
                    c.wake.clear()
            elif hook.get("exec") is not None or hook.get("httpGet") is not None:
                self._probe(c, {**hook, "timeoutSeconds": max(1.0, deadline - time.monotonic())})
        except Exception:
            log.debug("preStop hook failed pod=%s container=%s", self.pod_name, c.name, exc_info=True)

    def _probe(self, c: _Container, spec: dict) -> bool:
        timeout = float(spec.get("timeoutSeconds") or 1)
        try:
            if spec.get("httpGet") is not None:
                g = spec["httpGet"]
                port = self._port(c, g.get("port"))
                host = g.get("host") or self.pod_ip
                conn_cls = http.client.HTTPSConnection if str(g.get("scheme", "HTTP")).upper() == "HTTPS" else http.client.HTTPConnection
                kwargs: dict[str, Any] = {"timeout": timeout}
                if conn_cls is http.client.HTTPSConnection:
                    kwargs["context"] = ssl._create_unverified_context()  # kubelet does not verify probe certificates
                conn = conn_cls(host, port, **kwargs)
                try:
                    headers = {h["name"]: h.get("value", "") for h in g.get("httpHeaders") or []}
                    headers.setdefault("User-Agent", "kube-probe/1.32")
                    conn.request("GET", g.get("path") or "/", headers=headers)
                    status = conn.getresponse().status
                finally:
                    conn.close()
                return 200 <= status < 400
            if spec.get("tcpSocket") is not None:
                t = spec["tcpSocket"]
                with socket.create_connection((t.get("host") or self.pod_ip, self._port(c, t.get("port"))), timeout=timeout):
                    return True
            if spec.get("exec") is not None:
                command = [str(a) for a in spec["exec"].get("command") or []]
                if not command:
                    return False
                mapped = self.k.commands.get(command[0]) or self.k.commands.get(os.path.basename(command[0]))
                argv = (list(mapped) + command[1:]) if mapped else command
                # in the container's environment (its env, pod network shim and working directory)
                return subprocess.run(argv, env=c.env, cwd=c.cwd or str(self.pod_dir), stdin=subprocess.DEVNULL,
                                      capture_output=True, timeout=timeout).returncode == 0
        except (OSError, http.client.HTTPException, subprocess.TimeoutExpired, ValueError):
            return False
        return True  # grpc probes: not run here

    def _port(self, c: _Container, port: Any) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"no port named {port!r} in container {c.name}")

    def _pump(self, proc: subprocess.Popen[bytes], container: str) -> None:
        assert proc.stdout is not None and self.pod_dir is not None
        with open(self.pod_dir / f"{container}.log", "a", encoding="utf-8") as copy:
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                copy.write(line)
                copy.flush()
                try:
                    self.k.server.append_pod_log(self.ns, self.pod_name, line)
                except Exception:
                    log.debug("Could not append to the pod log", exc_info=True)
        proc.stdout.close()

    # ------------------------------------------------------------------ volumes

    def _field(self, pod_name: str, path: str) -> str | None:
        if path == "status.podIP":
            return self.pod_ip
        if path.startswith("metadata.annotations['"):
            return str((self.pod["metadata"].get("annotations") or {}).get(path[len("metadata.annotations['"):-2], ""))
        return {"metadata.uid": self.uid, "status.podIPs": self.pod_ip}.get(path) or super()._field(pod_name, path)

    def _payload(self, vol: dict) -> dict[str, tuple[bytes, int]] | None:
        """Relative path -> (content, mode) of a configMap/secret/projected volume; None for other volumes."""
        sources: list[tuple[str, dict, int]] = []
        if vol.get("configMap") is not None:
            sources.append(("ConfigMap", vol["configMap"], vol["configMap"].get("defaultMode", 0o644)))
        elif vol.get("secret") is not None:
            ref = dict(vol["secret"])
            ref["name"] = ref.get("secretName", "")
            sources.append(("Secret", ref, ref.get("defaultMode", 0o644)))
        elif vol.get("projected") is not None:
            mode = vol["projected"].get("defaultMode", 0o644)
            for src in vol["projected"].get("sources") or []:
                for kind, key in (("ConfigMap", "configMap"), ("Secret", "secret")):
                    if src.get(key) is not None:
                        sources.append((kind, src[key], mode))
        else:
            return None
        out: dict[str, tuple[bytes, int]] = {}
        for kind, ref, mode in sources:
            data = self._config_data(kind, ref)
            items = ref.get("items")
            pairs = [(i["key"], i.get("path") or i["key"], i.get("mode", mode)) for i in items] if items else [(k, k, mode) for k in data]
            for key, rel, m in pairs:
                if key not in data:
                    if ref.get("optional"):
                        continue
                    raise _ConfigError("CreateContainerConfigError", f"couldn't find key {key} in {kind} {self.ns}/{ref.get('name')}")
                out[rel] = (data[key], int(m) & 0o777)
        return out

    def _materialize(self, vol: dict[str, Any], target: Path) -> Path:
        payload = self._payload(vol)
        if payload is None:
            return super()._materialize(vol, target)
        target.mkdir(parents=True, exist_ok=True)
        _atomic_write(target, payload)
        return target

    def _refresh_volumes(self) -> None:
        assert self.pod_dir is not None
        for vol in self.pod_spec.get("volumes") or []:
            target = self.pod_dir / "volumes" / vol["name"]
            try:
                payload = self._payload(vol)
            except _ConfigError:
                continue  # deleted: kubelet keeps the last content
            if payload is not None and target.exists():
                with self._prep_lock:  # not while a container's start writes the same volume
                    _atomic_write(target, payload)

    # ------------------------------------------------------------------ status

    def _container_status(self, c: _Container) -> dict[str, Any]:
        pid = c.proc.pid if c.proc is not None else None
        out: dict[str, Any] = {"name": c.name, "image": c.spec.get("image", ""), "imageID": "", "ready": c.ready,
                               "restartCount": c.restarts, "state": c.state, "lastState": c.last_state}
        if not c.init:
            out["started"] = c.started
        if pid is not None:
            out["containerID"] = f"local://{pid}"
        return out

    def _condition(self, type_: str, ok: bool, reason: str | None = None) -> dict[str, Any]:
        value = "True" if ok else "False"
        prev = self._transitions.get(type_)
        if prev is None or prev[0] != value:
            self._transitions[type_] = (value, _now())
        cond: dict[str, Any] = {"type": type_, "status": value, "lastProbeTime": None, "lastTransitionTime": self._transitions[type_][1]}
        if reason and not ok:
            cond["reason"] = reason
        return cond

    def _write_pod_status(self) -> None:
        statuses = [self._container_status(c) for c in self.containers]
        ready = bool(self.containers) and all(c.ready for c in self.containers) and not self._stopping.is_set()
        if self._init_failed:
            phase = "Failed"
        elif self.containers and all(c.done for c in self.containers):
            failed = any(int((c.state.get("terminated") or {}).get("exitCode") or 0) != 0 for c in self.containers)
            phase = "Failed" if failed else "Succeeded"
        elif any("running" in c.state or c.restarts for c in self.containers):
            phase = "Running"
        else:
            phase = "Pending"
        if phase in ("Succeeded", "Failed"):
            ready = False
        status: dict[str, Any] = {
            "phase": phase, "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}], "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}], "startTime": self.start_time, "qosClass": "BestEffort",
            "conditions": [
                self._condition("PodReadyToStartContainers", True),
                self._condition("Initialized", self._initialized, "ContainersNotInitialized"),
                self._condition("Ready", ready, "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"),
                self._condition("ContainersReady", ready, "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"),
                self._condition("PodScheduled", True),
            ],
            "containerStatuses": statuses,
        }
        if self.init_containers:
            status["initContainerStatuses"] = [self._container_status(c) for c in self.init_containers]
        if status == self._last_status:
            return
        try:
            self.api.patch_status("v1", "Pod", self.ns, self.pod_name, status)
            self._last_status = status
        except ApiError as exc:
            if exc.status == 404:
                self.terminate(self._grace, write_status=False)
            else:
                log.debug("Could not write pod status pod=%s: %s", self.pod_name, exc)
                self._dirty.set()


class _Probe:
    def __init__(self, kind: str, spec: dict, t0: float) -> None:
        self.kind = kind
        self.spec = spec
        self.period = float(spec.get("periodSeconds") or 10)
        self.success_threshold = int(spec.get("successThreshold") or 1)
        self.failure_threshold = int(spec.get("failureThreshold") or 3)
        self.next = t0 + float(spec.get("initialDelaySeconds") or 0)
        self.successes = 0
        self.failures = 0

    def due(self, now: float) -> bool:
        return now >= self.next

    def record(self, ok: bool, now: float) -> None:
        if ok:
            self.successes += 1
            self.failures = 0
        else:
            self.failures += 1
            self.successes = 0
        self.next = now + self.period


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the container's process group (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def _atomic_write(target: Path, payload: dict[str, tuple[bytes, int]]) -> None:
    """kubelet's AtomicWriter: files in a fresh `..<timestamp>` dir, `..data` swapped to it by rename, each
    top-level entry a symlink through `..data`. Unchanged content is left alone (no event for watchers)."""
    data_link = target / "..data"
    current = data_link.resolve() if data_link.is_symlink() else None
    if current is not None and current.is_dir():
        existing = {str(p.relative_to(current)): p for p in current.rglob("*") if p.is_file()}
        if set(existing) == set(payload) and all(existing[k].read_bytes() == v[0] for k, v in payload.items()):
            return
    stamp = "..%s.%d" % (_dt.datetime.now(_dt.timezone.utc).strftime("%Y_%m_%d_%H_%M_%S.%f"), random.randrange(1 << 30))
    new_dir = target / stamp
    new_dir.mkdir(mode=0o755)
    for rel, (content, mode) in payload.items():
        path = new_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(path, mode)
    tmp_link = target / "..data_tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(stamp, tmp_link)
    os.rename(tmp_link, data_link)  # the atomic switch
    tops = {rel.split("/", 1)[0] for rel in payload}
    for top in tops:
        link = target / top
        if not link.is_symlink():
            if link.exists():
                shutil.rmtree(link) if link.is_dir() else link.unlink()
            os.symlink(f"..data/{top}", link)
    for entry in target.iterdir():
        if entry.name.startswith("..") and entry.name not in ("..data", stamp) and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_symlink() and not entry.name.startswith("..") and entry.name not in tops:
            entry.unlink()
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
