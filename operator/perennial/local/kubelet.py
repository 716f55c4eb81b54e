"""A local runtime for the embedded control plane: the Job controller and a kubelet in one.

The embedded API server (`perennial.local.apiserver`) stores Jobs but nothing
runs them. `LocalKubelet` polls batch/v1 Jobs whose container image is one of
Perennial's own (a key of `images`) and runs each Job's Pod as a local process:

- it creates the Pod (`<job>-<5 chars>`, the labels and controller ownerReference
  the Job controller sets), materialises its volumes under
  `<workdir>/<namespace>/<pod>/volumes/<name>` (configMap, secret, emptyDir,
  projected; a persistentVolumeClaim is `<pvc_root>/<claimName>`), maps every
  mountPath to its local directory in command, args, env and workingDir;
- it streams the process output into the pod log API line by line while it
  runs (and into `<pod dir>/log`);
- the container's process runs under a watchdog (`podwatch.py`, the leader of its
  process group) that ends the group once the kubelet's process is gone (killed
  without its stop(): SIGTERM, then SIGKILL after `kill_grace_seconds`), as the
  serving pods end themselves (`podnet`); `containerID` is `local://<the command's pid>`;
- it writes Pod and Job status as the kubelet and the Job controller do:
  Running/Succeeded/Failed, `containerStatuses[0].state`, the termination
  message, `active`/`succeeded`/`failed`, `Complete`/`Failed` conditions with
  `BackoffLimitExceeded` and `DeadlineExceeded`; `restartPolicy: OnFailure`
  restarts the process in the same pod (emptyDir contents survive),
  `Never` creates a new pod;
- a failed pod is matched against the Job's `podFailurePolicy` as the Job
  controller does (rules in order, `onExitCodes` of non-zero exits, `onPodConditions`):
  `FailJob` fails the Job at once (condition reason `PodFailurePolicy`, Kubernetes'
  message), `Ignore` replaces the pod without counting it against `backoffLimit`,
  `Count` (or no match) counts it;
- a deleted Job or Pod kills its process; a Pod left non-terminal by a previous
  kubelet is marked Failed (`NodeLost`, with the `DisruptionTarget` condition the
  taint manager sets on pods of an unreachable node) and counts as a failed attempt
  unless the policy ignores it, so a Job never runs twice at once.

Jobs of other images are left alone (a real cluster would run them). Pods that no Job owns (those of apps/v1
ReplicaSets, bare Pods) are `serving.PodKubelet`'s; `cluster.LocalCluster` starts both with the apps/v1
controllers and the Service proxy. Usage::

    kubelet = LocalKubelet(kube, server, workdir=state / "pods", pvc_root=state / "pvc",
                           images={"perennial-trainer:dev": [sys.executable, "-m", "perennial_trainer"]})
    kubelet.start()
    ...
    kubelet.stop()
"""

from __future__ import annotations

import base64
import collections
import datetime as _dt
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..kube.client import ApiError, Kube

__all__ = ["LocalKubelet", "DEFAULT_COMMANDS"]

log = logging.getLogger(__name__)

# A container `command[0]` -> the local command prefix that replaces it.
DEFAULT_COMMANDS: dict[str, list[str]] = {
    "perennial-trainer": [sys.executable, "-m", "perennial_trainer"],
    "perennial-server": [sys.executable, "-m", "perennial_server.cli"],  # the package has no __main__
    "python": [sys.executable],
    "python3": [sys.executable],
}
INHERITED_ENV = ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")
TERMINATION_MESSAGE_MAX = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"
PODWATCH = str(Path(__file__).resolve().with_name("podwatch.py"))
HANDSHAKE_TIMEOUT = 60.0
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: Any) -> float | None:
    try:
        return _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _is_terminal_job(job: dict[str, Any]) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def _container_of(job: dict[str, Any]) -> dict[str, Any]:
    containers = ((((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers")) or [{}]
    return containers[0]


def _owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])


def match_pod_failure_policy(policy: dict[str, Any] | None, pod: dict[str, Any]) -> tuple[str | None, str | None]:
    """(action, Job failure message) of the first `podFailurePolicy` rule matching a failed pod, as
    Kubernetes' Job controller matches them; (None, None) when no rule does (the failure counts)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    for index, rule in enumerate((policy or {}).get("rules") or []):
        action = rule.get("action")
        req = rule.get("onExitCodes")
        if req is not None:
            values = {int(v) for v in req.get("values") or []}
            for cs in list(status.get("containerStatuses") or []) + list(status.get("initContainerStatuses") or []):
                terminated = (cs.get("state") or {}).get("terminated")
                if terminated is None or (req.get("containerName") and req["containerName"] != cs.get("name")):
                    continue
                code = int(terminated.get("exitCode") or 0)
                if code == 0:
                    continue
                if (req.get("operator") == "In" and code in values) or (req.get("operator") == "NotIn" and code not in values):
                    if action == "FailJob":
                        return action, (f"Container {cs.get('name')} for pod {meta.get('namespace')}/{meta.get('name')} failed "
                                        f"with exit code {code} matching FailJob rule at index {index}")
                    if action in ("Ignore", "Count", "FailIndex"):
                        return action, None
        elif rule.get("onPodConditions") is not None:
            for cond in status.get("conditions") or []:
                if any(cond.get("type") == pat.get("type") and cond.get("status") == pat.get("status", "True")
                       for pat in rule["onPodConditions"]):
                    if action == "FailJob":
                        return action, (f"Pod {meta.get('namespace')}/{meta.get('name')} has condition {cond.get('type')} "
                                        f"matching FailJob rule at index {index}")
                    if action in ("Ignore", "Count", "FailIndex"):
                        return action, None
                    break
    return None, None


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128+N, as runtimes report


def spawn_watched(argv: list[str], env: dict[str, str], cwd: str, grace_seconds: float,
                  **popen: Any) -> tuple[subprocess.Popen[bytes], int]:
    """Start a container's command under `podwatch.py` (the leader of a new session and process group), which ends
    it once this process is gone: (the watchdog's Popen, the command's pid). The watchdog exits as the command does.
    argv/env/cwd travel on a socket, never in the watchdog's environment. OSError when the command cannot start."""
    ours, theirs = socket.socketpair()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", PODWATCH, str(theirs.fileno()), str(os.getpid()),
                                 str(grace_seconds)], cwd=cwd, env={k: os.environ[k] for k in ("PATH", "LANG") if k in os.environ},
                                pass_fds=(theirs.fileno(),), start_new_session=True, **popen)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    try:
        ours.settimeout(HANDSHAKE_TIMEOUT)
        ours.sendall(json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode())
        ours.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := ours.recv(65536):
            answer += chunk
        reply = json.loads(answer or b"{}")
    except (OSError, ValueError) as exc:
        reply = {"error": f"the pod watchdog did not answer: {exc}"}
    finally:
        ours.close()
    if not isinstance(reply, dict) or not isinstance(reply.get("pid"), int):
        message = reply.get("error") if isinstance(reply, dict) else None
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(10)
        raise OSError(message or "the pod watchdog did not start the command")
    return proc, reply["pid"]


class _ConfigError(Exception):
    """A referenced ConfigMap/Secret (or key) is missing: the kubelet waits and retries."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _Cancelled(Exception):
    pass


class LocalKubelet:
    """Runs the Pods of batch/v1 Jobs of known images as local processes (see the module docstring).

    `kube`: a `perennial.kube.Kube` for the embedded server; `server_handle`: the
    embedded server (or its `ServerThread`) for `append_pod_log`; `workdir`: where
    pod directories go; `pvc_root`: where PersistentVolumeClaims live (also
    `PERENNIAL_PVC_ROOT` for the processes); `images`: image -> local command
    prefix; `commands`: `command[0]` -> prefix (defaults to `DEFAULT_COMMANDS`);
    `max_parallel`: Jobs run at once (the rest wait, as on a full node).
    """

    def __init__(
        self,
        kube: Kube,
        server_handle: Any,
        *,
        workdir: str | os.PathLike[str],
        pvc_root: str | os.PathLike[str],
        images: dict[str, list[str]],
        poll_seconds: float = 0.5,
        max_parallel: int = 2,
        commands: dict[str, list[str]] | None = None,
        restart_delay_seconds: float | None = None,
        kill_grace_seconds: float = 5.0,
        node_name: str = "perennial-local",
    ):
        self.kube = kube
        self.server = server_handle
        self.workdir = Path(workdir).resolve()
        self.pvc_root = Path(pvc_root).resolve()
        self.images = {k: list(v) for k, v in images.items()}
        self.commands = dict(DEFAULT_COMMANDS if commands is None else commands)
        self.poll_seconds = poll_seconds
        self.max_parallel = max(1, max_parallel)
        self.restart_delay_seconds = poll_seconds if restart_delay_seconds is None else restart_delay_seconds
        self.kill_grace_seconds = kill_grace_seconds
        self.node_name = node_name
        self._lock = threading.Lock()
        self._workers: dict[str, _JobWorker] = {}
        self._finished: set[str] = set()
        self._ignored: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "LocalKubelet":
        if self._thread is not None and self._thread.is_alive():
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pvc_root.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="perennial-kubelet", daemon=True)
        self._thread.start()
        log.info("Started local kubelet node=%s images=%s", self.node_name, sorted(self.images))
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop polling and terminate every child process (Pods stay as they are: a lost node)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            w.cancel("Stopped")
        deadline = time.monotonic() + timeout
        for w in workers:
            w.thread.join(max(0.1, deadline - time.monotonic()))
        log.info("Stopped local kubelet node=%s", self.node_name)

    def __enter__(self) -> "LocalKubelet":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def running(self) -> dict[str, str]:
        """`namespace/job` -> pod name, for the Jobs whose process runs now."""
        with self._lock:
            return {f"{w.ns}/{w.job_name}": w.pod_name or "" for w in self._workers.values()}

    # ------------------------------------------------------------------ control loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception:  # the API server may be going away: try again next tick
                log.debug("Local kubelet sync failed", exc_info=True)
            self._stop.wait(self.poll_seconds)

    def sync_once(self) -> None:
        """One pass: notice deleted Jobs/Pods, start workers for Jobs that need a Pod."""
        listed_at = time.monotonic()
        jobs = self.kube.list("batch/v1", "Job", None)
        pods = self.kube.list("v1", "Pod", None)
        by_uid = {j["metadata"]["uid"]: j for j in jobs}
        live_pods = {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in pods
                     if not p["metadata"].get("deletionTimestamp")}
        with self._lock:
            workers = dict(self._workers)
        for uid, w in workers.items():
            job = by_uid.get(uid)
            if job is None or job["metadata"].get("deletionTimestamp"):
                w.cancel("JobDeleted")
            else:
                w.notice_deleted_pod(listed_at, live_pods)
        if self._stop.is_set():
            return
        for job in jobs:
            meta = job["metadata"]
            uid = meta["uid"]
            if uid in workers or uid in self._finished or meta.get("deletionTimestamp"):
                continue
            if _is_terminal_job(job):
                self._finished.add(uid)
                continue
            if (job.get("spec") or {}).get("suspend"):
                continue
            image = _container_of(job).get("image")
            if image not in self.images:
                if uid not in self._ignored:
                    self._ignored.add(uid)
                    log.info("Ignored Job of an unmapped image job=%s namespace=%s image=%s", meta["name"], meta["namespace"], image)
                continue
            if int((job.get("spec") or {}).get("parallelism") or 1) > 1:
                self._refuse_group(job)
                continue
            with self._lock:
                if len(self._workers) >= self.max_parallel:
                    return
                worker = _JobWorker(self, job)
                self._workers[uid] = worker
            worker.thread.start()

    def _refuse_group(self, job: dict[str, Any]) -> None:
        """A Job of several pods at once (a multi-node TrainingRun's group): this runtime runs one process per Job,
        and pods on one machine cannot reach each other by their DNS names. Failed at once with the reason, not
        left waiting for a rendezvous that never forms."""
        meta = job["metadata"]
        now = _now()
        message = (f"the local runtime runs one pod per Job; this Job asks for {job['spec'].get('parallelism')} at once "
                   "(a TrainingRun with `resources.nodes` > 1): use `resources.nodes: 1` here (several processes in one pod "
                   "with `resources.gpus` or PERENNIAL_NPROC_PER_NODE), or a cluster")
        self._finished.add(meta["uid"])
        try:
            self.kube.patch("batch/v1", "Job", meta["namespace"], meta["name"], {"status": {"active": 0, "conditions": [
                _condition("FailureTarget", "UnsupportedLocally", message, now), _condition("Failed", "UnsupportedLocally", message, now)]}},
                subresource="status")
        except ApiError as exc:
            if exc.status != 404:
                self._finished.discard(meta["uid"])
                raise
        log.warning("Refused a Job of several pods job=%s namespace=%s", meta["name"], meta["namespace"])

    def _worker_done(self, worker: "_JobWorker", finished: bool) -> None:
        with self._lock:
            self._workers.pop(worker.uid, None)
            if finished:
                self._finished.add(worker.uid)


class _PodSandbox:
    """The pod directory, volumes, env and argv of a container (shared by the Job worker and the serving pods).

    Needs `k` (the kubelet), `kube`, `ns`, `pod_dir`, `pod_spec`, `template`, `container` and `job_name` (for logs)."""

    # ------------------------------------------------------------------ pod sandbox

    def _prepare(self, pod_name: str) -> tuple[list[str], dict[str, str], str, list[Path]]:
        """Volumes, mounts, env, argv and cwd of the container; raises _ConfigError while a reference is missing."""
        assert self.pod_dir is not None
        vol_root = self.pod_dir / "volumes"
        volumes: dict[str, Path] = {}
        for vol in self.pod_spec.get("volumes") or []:
            volumes[vol["name"]] = self._materialize(vol, vol_root / vol["name"])
        mounts: list[tuple[str, str]] = []
        for m in self.container.get("volumeMounts") or []:
            base = volumes.get(m.get("name"))
            if base is None:
                raise _ConfigError("CreateContainerConfigError", f"volume {m.get('name')!r} not found")
            local = base / m["subPath"] if m.get("subPath") else base
            if m.get("subPath") and not local.exists():
                local.mkdir(parents=True, exist_ok=True)
            mp = str(m.get("mountPath") or "").rstrip("/")
            if mp:
                mounts.append((mp, str(local)))
        mounts.sort(key=lambda x: len(x[0]), reverse=True)

        def rewrite(s: str) -> str:
            for mp, local in mounts:
                if s == mp or s.startswith(mp + "/"):
                    return local + s[len(mp):]
            if s.startswith("file://"):
                r = rewrite(s[len("file://"):])
                return "file://" + r if r != s[len("file://"):] else s
            if s.startswith("-") and "=" in s:
                key, value = s.split("=", 1)
                r = rewrite(value)
                return f"{key}={r}" if r != value else s
            return s

        env: dict[str, str] = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        env["HF_HUB_OFFLINE"] = "1"
        container_env: dict[str, str] = {}
        for src in self.container.get("envFrom") or []:
            prefix = src.get("prefix") or ""
            if src.get("configMapRef"):
                data = self._config_data("ConfigMap", src["configMapRef"])
            elif src.get("secretRef"):
                data = self._config_data("Secret", src["secretRef"])
            else:
                continue
            for k, v in data.items():
                container_env[prefix + k] = v.decode("utf-8", errors="replace")
        for item in self.container.get("env") or []:
            name = item["name"]
            if "value" in item or not item.get("valueFrom"):
                container_env[name] = _expand(str(item.get("value") or ""), container_env)
                continue
            vf = item["valueFrom"]
            value: str | None
            if vf.get("secretKeyRef") or vf.get("configMapKeyRef"):
                ref = vf.get("secretKeyRef") or vf.get("configMapKeyRef")
                kind = "Secret" if vf.get("secretKeyRef") else "ConfigMap"
                data = self._config_data(kind, ref)
                if ref.get("key") not in data:
                    if ref.get("optional"):
                        continue
                    raise _ConfigError("CreateContainerConfigError", f"couldn't find key {ref.get('key')} in {kind} {self.ns}/{ref.get('name')}")
                value = data[ref["key"]].decode("utf-8", errors="replace")
            elif vf.get("fieldRef"):
                value = self._field(pod_name, vf["fieldRef"].get("fieldPath", ""))
            else:
                value = None
            if value is not None:
                container_env[name] = value
        for k, v in container_env.items():
            env[k] = rewrite(v)
        termination_log = self.pod_dir / "termination-log"
        env.update({"PERENNIAL_PVC_ROOT": str(self.k.pvc_root), "PERENNIAL_TERMINATION_LOG": str(termination_log),
                    "PYTHONUNBUFFERED": "1"})
        term_paths = [termination_log]
        tmp = self.container.get("terminationMessagePath")
        if tmp and rewrite(tmp) != tmp:
            term_paths.append(Path(rewrite(tmp)))

        command = [_expand(str(c), container_env) for c in self.container.get("command") or []]
        args = [_expand(str(a), container_env) for a in self.container.get("args") or []]
        mapped = self.k.commands.get(command[0]) or self.k.commands.get(os.path.basename(command[0])) if command else None
        if mapped is not None:
            prefix, rest = list(mapped), command[1:] + args
        else:
            if command:
                log.info("Replaced an unknown command with the image's entrypoint pod=%s command=%s", pod_name, command[0])
            prefix, rest = list(self.k.images[self.container.get("image")]), args
        argv = prefix + [rewrite(a) for a in rest]

        cwd = str(self.pod_dir)
        wd = self.container.get("workingDir")
        if wd and rewrite(wd) != wd:
            cwd = rewrite(wd)
            Path(cwd).mkdir(parents=True, exist_ok=True)
        return argv, env, cwd, term_paths

    def _config_data(self, kind: str, ref: dict[str, Any]) -> dict[str, bytes]:
        """The data of a ConfigMap/Secret as bytes ({} when missing and optional)."""
        obj = self.kube.get("v1", kind, self.ns, ref.get("name", ""))
        if obj is None:
            if ref.get("optional"):
                return {}
            raise _ConfigError("CreateContainerConfigError", f'{kind.lower()} "{ref.get("name")}" not found')
        if kind == "Secret":
            return {k: base64.b64decode(v or "") for k, v in (obj.get("data") or {}).items()}
        out = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
        out.update({k: base64.b64decode(v or "") for k, v in (obj.get("binaryData") or {}).items()})
        return out

    def _field(self, pod_name: str, path: str) -> str | None:
        if path.startswith("metadata.labels['"):
            key = path[len("metadata.labels['"):-2]
            return str(((self.template.get("metadata") or {}).get("labels") or {}).get(key, ""))
        return {"metadata.name": pod_name, "metadata.namespace": self.ns, "spec.nodeName": self.k.node_name,
                "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1",
                "spec.serviceAccountName": self.pod_spec.get("serviceAccountName", "default")}.get(path)

    def _materialize(self, vol: dict[str, Any], target: Path) -> Path:
        if vol.get("persistentVolumeClaim"):
            path = self.k.pvc_root / vol["persistentVolumeClaim"]["claimName"]
            path.mkdir(parents=True, exist_ok=True)
            return path
        if vol.get("hostPath"):
            return Path(vol["hostPath"]["path"])
        target.mkdir(parents=True, exist_ok=True)
        if vol.get("configMap") is not None:
            self._write_keys(target, "ConfigMap", vol["configMap"])
        elif vol.get("secret") is not None:
            ref = dict(vol["secret"])
            ref["name"] = ref.get("secretName", "")
            self._write_keys(target, "Secret", ref)
        elif vol.get("projected") is not None:
            for src in vol["projected"].get("sources") or []:
                if src.get("configMap") is not None:
                    self._write_keys(target, "ConfigMap", src["configMap"])
                elif src.get("secret") is not None:
                    self._write_keys(target, "Secret", src["secret"])
        elif vol.get("emptyDir") is None and vol.get("downwardAPI") is None:
            log.info("Used an empty directory for an unsupported volume volume=%s job=%s", vol.get("name"), self.job_name)
        return target

    def _write_keys(self, target: Path, kind: str, ref: dict[str, Any]) -> None:
        data = self._config_data(kind, ref)
        items = ref.get("items")
        pairs = [(i["key"], i.get("path") or i["key"]) for i in items] if items else [(k, k) for k in data]
        for key, rel in pairs:
            if key not in data:
                if ref.get("optional"):
                    continue
                raise _ConfigError("CreateContainerConfigError", f"couldn't find key {key} in {kind} {self.ns}/{ref.get('name')}")
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[key])


class _JobWorker(_PodSandbox):
    """Drives one Job to a terminal state in its own thread."""

    def __init__(self, kubelet: LocalKubelet, job: dict[str, Any]):
        self.k = kubelet
        self.kube = kubelet.kube
        self.job = job
        meta = job["metadata"]
        self.ns: str = meta["namespace"]
        self.job_name: str = meta["name"]
        self.uid: str = meta["uid"]
        spec = job.get("spec") or {}
        self.backoff_limit = int(spec.get("backoffLimit", 6) if spec.get("backoffLimit") is not None else 6)
        self.deadline_seconds = spec.get("activeDeadlineSeconds")
        self.template = spec.get("template") or {}
        self.pod_spec: dict[str, Any] = dict(self.template.get("spec") or {})
        self.restart_policy = self.pod_spec.get("restartPolicy") or "Never"
        self.pod_failure_policy: dict[str, Any] | None = spec.get("podFailurePolicy")
        self.container: dict[str, Any] = (self.pod_spec.get("containers") or [{}])[0]
        status = job.get("status") or {}
        self.failed = int(status.get("failed") or 0)
        self.start_time = status.get("startTime") or _now()
        self.started_at = _parse_time(self.start_time) or time.time()
        self.pod_name: str | None = None
        self.pod_created_at = 0.0
        self.pod_dir: Path | None = None
        self._cancel = threading.Event()
        self.cancel_reason = ""
        # held to change (pod_name, pod_created_at) or the cancellation: the kubelet's loop reads them together
        self._pod_lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None  # the container's watchdog (podwatch.py)
        self._container_pid = 0  # the container's command
        self.thread = threading.Thread(target=self._main, name=f"kubelet-{self.ns}-{self.job_name}", daemon=True)

    # ------------------------------------------------------------------ control

    def cancel(self, reason: str) -> None:
        with self._pod_lock:
            if not self._cancel.is_set() or (self.cancel_reason == "PodDeleted" and reason != "PodDeleted"):
                self.cancel_reason = reason
                self._cancel.set()
                log.info("Killing Job process job=%s namespace=%s reason=%s", self.job_name, self.ns, reason)

    def notice_deleted_pod(self, listed_at: float, live_pods: set[tuple[str, str]]) -> None:
        """Cancel "PodDeleted" if the current pod, created before the list taken at `listed_at`, is not in it. Under
        the lock that names a new pod: a list of before the deleted pod was handled cannot cancel its replacement."""
        with self._pod_lock:
            if (self.pod_name and self.pod_created_at < listed_at and (self.ns, self.pod_name) not in live_pods
                    and not self._cancel.is_set()):
                self.cancel_reason = "PodDeleted"
                self._cancel.set()
                log.info("Killing Job process job=%s namespace=%s reason=PodDeleted", self.job_name, self.ns)

    def _deadline_left(self) -> float | None:
        if not self.deadline_seconds:
            return None
        return self.started_at + float(self.deadline_seconds) - time.time()

    def _main(self) -> None:
        finished = False
        try:
            finished = self._run()
        except _Cancelled:
            if self.cancel_reason == "JobDeleted" and self.pod_name:
                try:  # a pod created after its Job went: collect it as the garbage collector would
                    self.kube.delete("v1", "Pod", self.ns, self.pod_name)
                except Exception:
                    log.debug("Could not delete an orphaned pod", exc_info=True)
        except Exception:
            log.exception("Local kubelet failed to run Job job=%s namespace=%s", self.job_name, self.ns)
        finally:
            self._kill()
            self.k._worker_done(self, finished)

    # ------------------------------------------------------------------ Job controller

    def _run(self) -> bool:
        """Run the Job to completion; True when the Job reached a terminal state."""
        self._adopt()
        if self._finished_early is not None:
            return self._finished_early
        self._patch_job({"startTime": self.start_time, "active": 0, "failed": self.failed})
        while True:
            if self.failed > self.backoff_limit:
                self._fail_job("BackoffLimitExceeded", "Job has reached the specified backoff limit")
                return True
            left = self._deadline_left()
            if left is not None and left <= 0:
                self._fail_job("DeadlineExceeded", "Job was active longer than specified deadline")
                return True
            outcome = self._run_pod()
            if outcome == "Succeeded":
                self._complete_job()
                return True
            if outcome in ("DeadlineExceeded", "PodFailurePolicy"):
                return True  # the Job's Failed condition is written
            if outcome == "BackoffLimitExceeded":
                continue  # the check above writes the Job's condition
            # "Failed" (restartPolicy Never) or "PodDeleted": a new pod, per backoff
            if self._cancel.wait(self.k.restart_delay_seconds):
                self._check_cancel()

    _finished_early: bool | None = None

    def _adopt(self) -> None:
        """Account for Pods a previous kubelet left behind."""
        pods = [p for p in self.kube.list("v1", "Pod", self.ns, f"job-name={self.job_name}") if _owned_by(p, self.uid)]
        failed_pods = 0
        for pod in pods:
            phase = (pod.get("status") or {}).get("phase")
            name = pod["metadata"]["name"]
            if phase == "Succeeded":
                log.info("Adopted succeeded Pod pod=%s job=%s namespace=%s", name, self.job_name, self.ns)
                self._complete_job()
                self._finished_early = True
                return
            if phase == "Failed":
                action, message = match_pod_failure_policy(self.pod_failure_policy, pod)
                if action == "FailJob":
                    self.failed = max(self.failed, failed_pods + 1)
                    self._fail_job("PodFailurePolicy", message or "")
                    self._finished_early = True
                    return
                if action != "Ignore":
                    failed_pods += 1
                continue
            log.info("Marked lost Pod failed pod=%s job=%s namespace=%s", name, self.job_name, self.ns)
            lost = {
                "phase": "Failed", "reason": "NodeLost",
                "message": f"Node {self.k.node_name} which was running pod {name} is unresponsive",
                "conditions": _pod_conditions(False) + [{
                    "type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager", "lastTransitionTime": _now(),
                    "message": "Taint manager: deleting due to NoExecute taint"}],
                "containerStatuses": [self._container_status(False, {"terminated": {
                    "exitCode": 137, "reason": "NodeLost", "finishedAt": _now(),
                    "message": "the local kubelet restarted while the container ran"}}, 0)],
            }
            self._patch_pod(name, lost)
            action, message = match_pod_failure_policy(self.pod_failure_policy, {"metadata": pod["metadata"], "status": lost})
            if action == "Ignore":
                continue
            failed_pods += 1
            self.failed += 1
            if action == "FailJob":
                self._fail_job("PodFailurePolicy", message or "")
                self._finished_early = True
                return
        if self.restart_policy == "Never":
            self.failed = max(self.failed, failed_pods)

    def _complete_job(self) -> None:
        now = _now()
        self._patch_job({
            "active": 0, "ready": 0, "succeeded": 1, "failed": self.failed, "startTime": self.start_time, "completionTime": now,
            "conditions": [
                _condition("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods", now),
                _condition("Complete", "CompletionsReached", "Reached expected number of succeeded pods", now),
            ],
        })
        log.info("Completed Job job=%s namespace=%s", self.job_name, self.ns)

    def _fail_job(self, reason: str, message: str) -> None:
        now = _now()
        self._patch_job({
            "active": 0, "ready": 0, "failed": self.failed, "startTime": self.start_time,
            "conditions": [_condition("FailureTarget", reason, message, now), _condition("Failed", reason, message, now)],
        })
        log.info("Failed Job job=%s namespace=%s reason=%s failed=%d", self.job_name, self.ns, reason, self.failed)

    def _patch_job(self, status: dict[str, Any]) -> None:
        self._check_cancel()
        try:
            self.kube.patch("batch/v1", "Job", self.ns, self.job_name, {"status": status}, subresource="status")
        except ApiError as exc:
            if exc.status == 404:
                self.cancel("JobDeleted")
                raise _Cancelled() from None
            raise

    def _patch_pod(self, name: str, status: dict[str, Any]) -> bool:
        try:
            self.kube.patch("v1", "Pod", self.ns, name, {"status": status}, subresource="status")
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise

    def _check_cancel(self) -> None:
        if self._cancel.is_set() and self.cancel_reason != "PodDeleted":
            raise _Cancelled()

    # ------------------------------------------------------------------ kubelet

    def _create_pod(self) -> dict[str, Any]:
        tmeta = self.template.get("metadata") or {}
        labels = {**(tmeta.get("labels") or {}), "job-name": self.job_name, "batch.kubernetes.io/job-name": self.job_name,
                  "controller-uid": self.uid, "batch.kubernetes.io/controller-uid": self.uid}
        for _ in range(10):
            name = f"{self.job_name}-{''.join(random.choice(_NAME_CHARS) for _ in range(5))}"
            body = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name, "namespace": self.ns, "labels": labels,
                    **({"annotations": dict(tmeta["annotations"])} if tmeta.get("annotations") else {}),
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": self.job_name, "uid": self.uid,
                                         "controller": True, "blockOwnerDeletion": True}],
                },
                "spec": {**self.pod_spec, "nodeName": self.k.node_name},
            }
            try:
                pod = self.kube.create(body)
            except ApiError as exc:
                if exc.status == 409:
                    continue
                raise
            with self._pod_lock:
                self.pod_name, self.pod_created_at = name, time.monotonic()
            log.info("Created Pod pod=%s job=%s namespace=%s", name, self.job_name, self.ns)
            return pod
        raise RuntimeError(f"could not name a pod for Job {self.job_name}")

    def _container_status(self, running: bool, state: dict[str, Any], restarts: int,
                          last: dict[str, Any] | None = None) -> dict[str, Any]:
        pid = self._container_pid if self._proc is not None else 0
        return {
            "name": self.container.get("name", "main"), "image": self.container.get("image", ""), "imageID": "",
            "containerID": f"local://{pid}", "ready": running, "started": running, "restartCount": restarts,
            "state": state, "lastState": last or {},
        }

    def _run_pod(self) -> str:
        """Create a pod and run its container (restarting it per OnFailure). Returns the outcome."""
        self._check_cancel()
        with self._pod_lock:
            if self._cancel.is_set() and self.cancel_reason == "PodDeleted":  # handled: start afresh
                self._cancel.clear()
                self.cancel_reason = ""
            self.pod_name = None  # gone: a late look at it must not cancel the next one
        self._check_cancel()
        self._create_pod()
        assert self.pod_name is not None
        pod_name = self.pod_name
        self.pod_dir = self.k.workdir / self.ns / pod_name
        self.pod_dir.mkdir(parents=True, exist_ok=True)
        self._patch_job({"active": 1, "startTime": self.start_time, "failed": self.failed})
        pod_start = _now()
        self._patch_pod(pod_name, {"phase": "Pending", "startTime": pod_start, "hostIP": "127.0.0.1",
                                   "conditions": _pod_conditions(False),
                                   "containerStatuses": [self._container_status(False, {"waiting": {"reason": "ContainerCreating"}}, 0)]})
        restarts = 0
        last: dict[str, Any] | None = None
        while True:
            try:
                argv, env, cwd, term_paths = self._prepare(pod_name)
            except _ConfigError as exc:
                self._patch_pod(pod_name, {"containerStatuses": [self._container_status(
                    False, {"waiting": {"reason": exc.reason, "message": str(exc)}}, restarts, last)]})
                if self._wait_or_deadline(self.k.poll_seconds):
                    return self._interrupted(pod_name, restarts, last, started=None)
                continue
            for p in term_paths:
                p.unlink(missing_ok=True)
            started = _now()
            tail: collections.deque[str] = collections.deque(maxlen=FALLBACK_LOG_LINES)
            try:
                # under a watchdog that ends the container's processes once this process is gone (podwatch.py)
                self._proc, self._container_pid = spawn_watched(
                    argv, env, cwd, self.k.kill_grace_seconds, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT)
            except OSError as exc:
                self._proc, self._container_pid = None, 0
                rc, reason, message = 128, "StartError", f"failed to start the container process: {exc}"
            else:
                log.info("Started container pod=%s namespace=%s pid=%d argv=%s", pod_name, self.ns, self._container_pid, argv)
                reader = threading.Thread(target=self._pump, args=(self._proc, pod_name, tail), daemon=True)
                reader.start()
                self._patch_pod(pod_name, {"phase": "Running", "podIP": "127.0.0.1", "conditions": _pod_conditions(True),
                                           "containerStatuses": [self._container_status(True, {"running": {"startedAt": started}}, restarts, last)]})
                killed = self._wait_process()
                reader.join(10)
                rc = _exit_code(self._proc.returncode)
                if killed:
                    return self._interrupted(pod_name, restarts, last, started=started, rc=rc, killed_by=killed)
                reason = "Completed" if rc == 0 else "Error"
                message = self._termination_message(term_paths, rc, tail)
            terminated = {"exitCode": rc, "reason": reason, "startedAt": started, "finishedAt": _now(),
                          "containerID": f"local://{self._container_pid if self._proc else 0}"}
            if message:
                terminated["message"] = message
            log.info("Container exited pod=%s namespace=%s exitCode=%d", pod_name, self.ns, rc)
            if rc == 0:
                self._patch_pod(pod_name, {"phase": "Succeeded", "conditions": _pod_conditions(False, done=True),
                                           "containerStatuses": [self._container_status(False, {"terminated": terminated}, restarts, last)]})
                return "Succeeded"
            if self.restart_policy != "OnFailure":
                failed_status = {"phase": "Failed", "conditions": _pod_conditions(False, done=True),
                                 "containerStatuses": [self._container_status(False, {"terminated": terminated}, restarts, last)]}
                self._patch_pod(pod_name, failed_status)
                action, policy_message = match_pod_failure_policy(
                    self.pod_failure_policy, {"metadata": {"namespace": self.ns, "name": pod_name}, "status": failed_status})
                if action != "Ignore":
                    self.failed += 1
                if action == "FailJob":
                    self._fail_job("PodFailurePolicy", policy_message or "")
                    return "PodFailurePolicy"
                self._patch_job({"active": 0, "failed": self.failed})
                return "Failed"
            self.failed += 1
            if self.failed > self.backoff_limit:
                self._patch_pod(pod_name, {"phase": "Failed", "conditions": _pod_conditions(False, done=True),
                                           "containerStatuses": [self._container_status(False, {"terminated": terminated}, restarts, last)]})
                self._patch_job({"active": 0, "failed": self.failed})
                return "BackoffLimitExceeded"
            # OnFailure: the kubelet restarts the container in the same pod (same pod dir: emptyDirs survive).
            restarts += 1
            last = {"terminated": terminated}
            self._patch_job({"failed": self.failed})
            self._patch_pod(pod_name, {"phase": "Running", "conditions": _pod_conditions(False),
                                       "containerStatuses": [self._container_status(False, {"waiting": {
                                           "reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}}, restarts, last)]})
            if self._wait_or_deadline(self.k.restart_delay_seconds):
                return self._interrupted(pod_name, restarts, last, started=None)

    def _wait_or_deadline(self, seconds: float) -> bool:
        """Sleep; True when cancelled or past the Job deadline."""
        left = self._deadline_left()
        if left is not None and left <= seconds:
            self._cancel.wait(max(0.0, left))
            return True
        return self._cancel.wait(seconds)

    def _wait_process(self) -> str | None:
        """Wait for the process; kill it on cancel or deadline. Returns why it was killed, or None."""
        assert self._proc is not None
        while True:
            left = self._deadline_left()
            step = self.k.poll_seconds if left is None else max(0.0, min(self.k.poll_seconds, left))
            try:
                self._proc.wait(timeout=step)
                return None
            except subprocess.TimeoutExpired:
                pass
            if self._cancel.is_set():
                self._kill()
                return self.cancel_reason or "Cancelled"
            left = self._deadline_left()
            if left is not None and left <= 0:
                self._kill()
                return "DeadlineExceeded"

    def _interrupted(self, pod_name: str, restarts: int, last: dict[str, Any] | None, *, started: str | None,
                     rc: int = 137, killed_by: str | None = None) -> str:
        reason = killed_by or (self.cancel_reason if self._cancel.is_set() else "DeadlineExceeded")
        self._check_cancel()  # JobDeleted / Stopped: nothing more to write
        terminated = {"exitCode": rc, "reason": "Error", "finishedAt": _now(), **({"startedAt": started} if started else {})}
        if reason == "PodDeleted":
            self.failed += 1
            self._patch_job({"active": 0, "failed": self.failed})
            return "PodDeleted"
        message = "Pod was active on the node longer than the specified deadline"
        self._patch_pod(pod_name, {"phase": "Failed", "reason": "DeadlineExceeded", "message": message,
                                   "conditions": _pod_conditions(False, done=True),
                                   "containerStatuses": [self._container_status(False, {"terminated": terminated}, restarts, last)]})
        self.failed += 1
        self._fail_job("DeadlineExceeded", "Job was active longer than specified deadline")
        return "DeadlineExceeded"

    def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(self.k.kill_grace_seconds)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(5)

    def _pump(self, proc: subprocess.Popen[bytes], pod_name: str, tail: collections.deque[str]) -> None:
        assert proc.stdout is not None and self.pod_dir is not None
        with open(self.pod_dir / "log", "a", encoding="utf-8") as copy:
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                tail.append(line)
                copy.write(line)
                copy.flush()
                try:
                    self.k.server.append_pod_log(self.ns, pod_name, line)
                except Exception:  # the server is stopping
                    log.debug("Could not append to the pod log", exc_info=True)
        proc.stdout.close()

    def _termination_message(self, paths: list[Path], rc: int, tail: collections.deque[str]) -> str:
        for p in paths:
            try:
                with open(p, "rb") as fh:
                    data = fh.read(TERMINATION_MESSAGE_MAX)
            except OSError:
                continue
            if data:
                return data.decode("utf-8", errors="replace")
        if rc != 0 and self.container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            return "".join(tail)[-FALLBACK_LOG_BYTES:]
        return ""


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion against the container's earlier variables ($$ escapes)."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR_REF.sub(sub, value)


def _condition(type_: str, reason: str, message: str, now: str) -> dict[str, Any]:
    return {"type": type_, "status": "True", "reason": reason, "message": message, "lastProbeTime": now, "lastTransitionTime": now}


def _pod_conditions(ready: bool, done: bool = False) -> list[dict[str, Any]]:
    now = _now()
    ready_reason = {} if ready else {"reason": "PodCompleted" if done else "ContainersNotReady"}
    return [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
        {"type": "Initialized", "status": "True", "lastTransitionTime": now},
        {"type": "ContainersReady", "status": str(ready), "lastTransitionTime": now, **ready_reason},
        {"type": "Ready", "status": str(ready), "lastTransitionTime": now, **ready_reason},
    ]
