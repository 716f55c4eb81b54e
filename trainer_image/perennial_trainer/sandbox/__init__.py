"""Run untrusted code (model-written programs, RewardSpec `grade()` sources) for the graders.

Defence in depth, every layer unprivileged (a pod with no capabilities and
``allowPrivilegeEscalation: false`` is enough):

* the trainer starts small trusted *supervisors* (``supervisor.py``: one per CPU, kept for the life of
  the trainer process; empty environment, non-dumpable, child subreapers) and reads their answers with
  bounded reads and a deadline; the trainer never runs untrusted code and makes itself non-dumpable;
* one fresh process per sample (no state shared between samples), forked by a zygote that the supervisor
  forked before reading any job (so a sample's memory holds no other sample's code, input or output),
  which confines itself before anything untrusted runs: own process group, unprivileged uid when started as root,
  rlimits (memory, CPU, file size, open files, processes), a scratch directory, a minimal environment,
  Landlock (files, TCP, signals) and seccomp (sockets, exec, fork, signals, ptrace, ...);
* the verdict is the supervisor's observation: exit status, limits hit, the bytes on stdout (compared
  *by the trainer* for I/O tests: expected outputs never enter the sandbox), and a compile record
  written before untrusted code runs. Assert-style tests necessarily run in the untrusted process;
  their "passed" record is checked against a per-sample nonce, but code that inspects its own
  interpreter can forge it (see `CodeGrader` in the API): use I/O tests where the reward matters.

`layers()` says which kernel layers this machine provides; where Landlock is missing a warning is
logged once (and `requireLandlock` refuses to grade).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("perennial_trainer.sandbox")

_HERE = os.path.dirname(os.path.abspath(__file__))
SUPERVISOR = os.path.join(_HERE, "supervisor.py")
_RESULT_LINE_CAP = 4 << 20
STDOUT_HEAD = 1024  # characters of an I/O case's stdout kept once it was compared (the reason shows no more)


def normalise_output(text: str) -> list[str]:
    """Output lines without trailing whitespace, trailing blank lines dropped (the usual judge rule)."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


@dataclass
class Limits:
    """Per-sample limits (`SandboxLimits` of the API)."""

    timeout_s: float = 10
    memory_mib: int = 512
    cpu_s: int = 10
    processes: int = 1  # 1: the sample cannot fork at all (seccomp); more: RLIMIT_NPROC on top of the uid's tasks
    file_size_mib: int = 16
    scratch_mib: int = 64
    require_landlock: bool = False
    layers_off: tuple[str, ...] = ()  # "seccomp", "landlock": for tests and benchmarks of single layers only

    @classmethod
    def from_api(cls, lim: Any) -> Limits:
        return cls(timeout_s=lim.timeout_seconds, memory_mib=lim.memory_mi_b, cpu_s=lim.cpu_seconds,
                   processes=getattr(lim, "processes", 1), file_size_mib=getattr(lim, "file_size_mi_b", 16),
                   scratch_mib=getattr(lim, "scratch_mi_b", 64), require_landlock=getattr(lim, "require_landlock", False))


@dataclass
class Job:
    """One sample. `kind`: ``grade`` (call `grade(sample, item)` of `code`), ``compile`` (compile `code`
    only), ``asserts`` (run `code`, then the assert-style `tests`), ``io`` (run `code` as a script with
    `stdin`; the trainer compares its stdout with `expected` as the result arrives, then keeps only its
    head: a batch of floods does not pile up in the trainer). `expected` never leaves this process."""

    kind: str
    code: str
    tests: str = ""
    stdin: str = ""
    sample: Any = None
    item: Any = None
    expected: str | None = None


@dataclass
class Outcome:
    exit_code: int | None = None
    signal: int | None = None
    limit: str | None = None  # wall, cpu, output, scratch
    compiled: bool | None = None
    compile_error: str = ""
    passed: bool = False  # asserts: the tests ran to the end (nonce record) and the process exited 0
    failed: str | None = None  # asserts: "assertion" or "error" as reported (untrusted)
    value: Any = None  # grade
    error: str = ""
    stdout: str = ""
    stdout_truncated: bool = False
    matched: bool | None = None  # io with `expected`: the stdout equals it (normalised); then `stdout` is only a head
    stderr: str = ""
    wall_s: float = 0.0
    refused: str = ""  # the sandbox refused to run (e.g. Landlock required but missing)
    extra: dict = field(default_factory=dict)

    @property
    def crashed(self) -> bool:
        """The process did not end normally with status 0 (signal, limit, non-zero exit)."""
        return bool(self.refused or self.limit or self.signal is not None or (self.exit_code or 0) != 0 or self.exit_code is None)

    def why(self, timeout_s: float | None = None) -> str:
        """A human reason for an abnormal end."""
        if self.refused:
            return f"sandbox refused to run: {self.refused}"
        if self.limit == "wall":
            return f"timed out after {timeout_s:g}s (wall clock)" if timeout_s is not None else "timed out (wall clock)"
        if self.limit == "cpu" or self.signal == signal.SIGXCPU:
            return "exceeded its CPU time limit (SIGXCPU)"
        if self.limit == "output":
            return "wrote more than 1 MiB to stdout"
        if self.limit == "scratch":
            return "filled its scratch directory past its limit (size, 4 KiB per entry, or nesting past 64 or out of sight)"
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        if self.exit_code not in (0, None):
            tail = self.stderr.strip().splitlines()[-1:] if self.stderr.strip() else []
            return f"exited with {self.exit_code}" + (f": {tail[0][:300]}" if tail else "")
        return self.error or "no result"


_layers: dict | None = None
_warned = False
_parent_protected = False


def _protect_parent() -> None:
    """The trainer makes itself non-dumpable: a same-uid process cannot read its memory or environ."""
    global _parent_protected
    if _parent_protected or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    _parent_protected = True


def _sys_path() -> list[str]:
    paths = [_HERE]
    try:
        import pyseccomp

        paths.append(os.path.dirname(os.path.abspath(pyseccomp.__file__)))
    except ImportError:
        log.warning("pyseccomp is not installed: the sandbox runs without its seccomp filter")
    return paths


def sandbox_uid() -> tuple[int, int]:
    """The uid/gid untrusted code runs as when the trainer is root (`PERENNIAL_SANDBOX_UID`, default nobody)."""
    uid = int(os.environ.get("PERENNIAL_SANDBOX_UID", "65534"))
    return uid, int(os.environ.get("PERENNIAL_SANDBOX_GID", str(uid)))


def _note_layers(layers: dict) -> None:
    global _layers, _warned
    _layers = layers
    if not layers.get("landlock") and not _warned:
        _warned = True
        log.warning("Landlock is not available in this kernel (Linux >= 5.13 with `landlock` in the LSM list): "
                    "sandboxed grader code can read every file its uid can read and connect to TCP ports; "
                    "set `limits.requireLandlock: true` on Code/Python graders to refuse to grade without it")
    if not layers.get("seccomp"):
        log.warning("seccomp is not available to the sandbox (pyseccomp/libseccomp missing): sockets, signals, "
                    "fork and ptrace are not filtered")


def layers() -> dict:
    """Which isolation layers this machine provides, as reported by a supervisor: {"landlock": ABI
    version or 0, "seccomp": bool, "subreaper": bool, "no_new_privs": bool, "uid": the sandbox uid}."""
    if _layers is None:
        run([], Limits())
    return dict(_layers or {}, uid=sandbox_uid()[0] if os.geteuid() == 0 else os.geteuid())


class _Supervisor:
    """One long-lived supervisor process (per limits configuration), serving batch after batch."""

    def __init__(self, cfg: dict):
        self.errf = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the supervisor; closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", SUPERVISOR], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.errf, env={}, cwd="/", close_fds=True, start_new_session=True,
        )
        self.buf = b""
        self.lock = threading.Lock()
        self.owner = os.getpid()  # a forked copy of the trainer must not use (or kill) its parent's supervisors
        self.proc.stdin.write((json.dumps(cfg) + "\n").encode())
        self.proc.stdin.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> str:
        if self.owner != os.getpid():
            return ""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.errf.seek(0, os.SEEK_END)
        self.errf.seek(max(0, self.errf.tell() - 2000))
        err = self.errf.read().decode(errors="replace").strip()
        self.errf.close()
        return err


_pool: dict[str, _Supervisor] = {}
_pool_lock = threading.Lock()
_POOL_MAX = 4 * 8  # supervisors kept: four limits configurations at up to 8 CPUs (shards) each


def _supervisor(cfg: dict) -> _Supervisor:
    key = json.dumps(cfg, sort_keys=True)
    with _pool_lock:
        sup = _pool.get(key)
        if sup is not None and (sup.owner != os.getpid() or not sup.alive()):
            sup.close()
            sup = None
        if sup is None:
            # the oldest idle ones go first; one in use (a shard of a running batch) is never closed
            idle = [k for k, v in _pool.items() if not v.lock.locked()]
            while len(_pool) >= _POOL_MAX and idle:
                _pool.pop(idle.pop(0)).close()
            sup = _pool[key] = _Supervisor(cfg)
        else:
            _pool[key] = _pool.pop(key)  # most recently used last
        return sup


def _drop(sup: _Supervisor) -> str:
    with _pool_lock:
        for k, v in list(_pool.items()):
            if v is sup:
                del _pool[k]
    return sup.close()


def close_all() -> None:
    """Stop the supervisors (they also die with the trainer)."""
    with _pool_lock:
        sups = list(_pool.values())
        _pool.clear()
    for sup in sups:
        sup.close()


atexit.register(close_all)


def run(jobs: list[Job], limits: Limits, *, parallel: int | None = None) -> list[Outcome]:
    """Run every job in its own confined process; one `Outcome` per job, in order. Never raises for
    anything the jobs do; a supervisor that fails gives error outcomes (and is replaced next time).

    The jobs are shared among `parallel` supervisors (default: one per CPU this process may use, at most
    8), each running one sample at a time: a supervisor's own work per sample (fork, bookkeeping) is about
    as much as a small sample's, so one supervisor per core keeps every core busy."""
    _protect_parent()
    parallel = parallel or max(1, min(8, len(os.sched_getaffinity(0))))
    uid, gid = sandbox_uid()
    cfg = {
        "parent": os.getpid(), "sys_path": _sys_path(), "parallel": 1, "uid": uid, "gid": gid,
        "scratch_root": tempfile.gettempdir(), "require_landlock": limits.require_landlock,
        "layers_off": list(limits.layers_off),
        "limits": {"timeout_s": limits.timeout_s, "memory_mib": limits.memory_mib, "cpu_s": limits.cpu_s,
                   "processes": limits.processes, "file_size_mib": limits.file_size_mib, "scratch_mib": limits.scratch_mib},
    }
    outcomes: list[Outcome | None] = [None] * len(jobs)
    n_shards = max(1, min(parallel, len(jobs)))
    shards = {k: list(range(k, len(jobs), n_shards)) for k in range(n_shards)}
    why = ""
    for attempt in range(2):  # a supervisor found dead (its starting thread ended: PDEATHSIG) is replaced once
        retry, why = _run_shards(jobs, limits, cfg, shards, outcomes)
        if not retry:
            break
        shards = retry
    missing = [i for i, o in enumerate(outcomes) if o is None]
    if missing:
        log.error("%s; %d of %d samples have no result", why, len(missing), len(jobs))
        for i in missing:
            outcomes[i] = Outcome(error=why or "sandbox gave no result")
    return outcomes  # type: ignore[return-value]


def _run_shards(jobs, limits, cfg, shards, outcomes) -> tuple[dict, str]:
    """Feed each shard to its supervisor and collect the answers of all of them in one select loop.
    Returns (the shards to retry: their supervisor died before answering anything, why)."""
    active: dict[int, tuple[_Supervisor, int, list[int]]] = {}  # stdout fd -> (supervisor, shard, job ids)
    groups: dict[int, int] = {}  # job id -> process group of the sample while it runs
    writers, retry, why = [], {}, ""
    try:
        for k, ids in shards.items():
            try:
                sup = _supervisor(dict(cfg, shard=k))
            except OSError as e:
                return {}, f"sandbox failed to start: {e}"
            sup.lock.acquire()
            lines = [json.dumps({"id": i, "kind": jobs[i].kind, "code": jobs[i].code, "tests": jobs[i].tests,
                                 "stdin": jobs[i].stdin, "sample": jobs[i].sample, "item": jobs[i].item}) for i in ids]
            payload = ("\n".join(lines + [json.dumps({"end": True})]) + "\n").encode()
            w = threading.Thread(target=_feed, args=(sup.proc, payload), daemon=True)
            w.start()
            writers.append(w)
            active[sup.proc.stdout.fileno()] = (sup, k, ids)
        deadline = time.monotonic() + 30 + max((len(ids) for ids in shards.values()), default=0) * (limits.timeout_s + 3)
        got = {k: 0 for k in shards}
        while active:
            left = deadline - time.monotonic()
            if left <= 0:
                why = "sandbox supervisor passed its deadline"
                break
            ready, _, _ = select.select(list(active), [], [], min(left, 1.0))
            for fd in ready:
                sup, k, ids = active[fd]
                chunk = os.read(fd, 1 << 16)
                finished = not chunk
                sup.buf += chunk
                while b"\n" in sup.buf and not finished:
                    line, sup.buf = sup.buf.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                    except (ValueError, RecursionError):  # a line nested past this stack's depth is not a result
                        continue
                    if not isinstance(msg, dict):
                        continue
                    if "layers" in msg:
                        _note_layers(msg["layers"])
                    elif "started" in msg:
                        if isinstance(msg.get("pgid"), int) and msg["pgid"] > 1:
                            groups[msg["started"]] = msg["pgid"]
                    elif msg.get("done"):
                        finished = True
                    elif isinstance(msg.get("id"), int) and msg["id"] in ids and outcomes[msg["id"]] is None:
                        got[k] += 1
                        groups.pop(msg["id"], None)
                        if "refused" in msg:
                            outcomes[msg["id"]] = Outcome(refused=str(msg["refused"]))
                        else:
                            o = Outcome(**{f: msg[f] for f in Outcome.__dataclass_fields__ if f in msg and f not in ("extra", "matched")})
                            expected = jobs[msg["id"]].expected
                            if expected is not None:
                                o.matched = normalise_output(o.stdout) == normalise_output(expected)
                                o.stdout = o.stdout[:STDOUT_HEAD]
                            outcomes[msg["id"]] = o
                if len(sup.buf) > _RESULT_LINE_CAP:
                    why, chunk = "sandbox supervisor wrote an over-long line", b""
                if finished:
                    del active[fd]
                    sup.lock.release()
                    if not chunk or any(outcomes[i] is None for i in ids):  # died, or answered only part
                        err = _drop(sup)
                        why = why or f"sandbox supervisor ended early (exit {sup.proc.returncode}){': ' + err.splitlines()[-1] if err else ''}"
                        if not got[k]:
                            retry[k] = ids
    finally:
        for sup, k, ids in active.values():  # past the deadline: these are stuck
            sup.lock.release()
            err = _drop(sup)
            why = why or f"sandbox supervisor failed: {err[-300:]}"
        for w in writers:
            w.join(timeout=5)
        for pgid in groups.values():  # samples whose supervisor died: their children survive it otherwise
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return retry, why


def _feed(proc: subprocess.Popen, payload: bytes) -> None:
    try:
        proc.stdin.write(payload)
        proc.stdin.flush()
    except (BrokenPipeError, OSError, ValueError):
        pass
