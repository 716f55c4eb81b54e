"""Run untrusted grading code (Python `grade()` sources, generated code + unit tests)
in a separate process:

* an EMPTY environment (no inherited secrets), ``python -I`` (no user site, no PYTHON* vars);
* a fresh scratch directory as cwd, deleted afterwards;
* RLIMIT_AS (memory), RLIMIT_CPU (CPU seconds), RLIMIT_CORE=0, RLIMIT_NPROC-free but a wall-clock timeout;
* the trainer marks itself non-dumpable, so a same-uid child cannot read ``/proc/<trainer>/environ``;
  when running as root the child also drops every capability (bounding set), so it cannot override that.

A batch of samples runs in one process that answers one JSON line per sample; a sample
that hangs, crashes the process or exhausts its limits gets an error result and the rest
of the batch continues in a new process. Results never raise.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("perennial_trainer.sandbox")


@dataclass
class SandboxResult:
    ok: bool
    value: Any = None
    error: str = ""


# The child: reads {"mode", "source", "samples": [...], "cpu"} from stdin, answers one line per sample.
_CHILD = r'''
import json, resource, sys, io, contextlib, traceback
spec = json.loads(sys.stdin.readline())
out = sys.__stdout__
def emit(obj):
    out.write(json.dumps(obj) + "\n"); out.flush()
def limit_cpu():
    used = resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    new = int(used) + spec["cpu"] + 1
    if hard != resource.RLIM_INFINITY: new = min(new, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (new, hard))
mode = spec["mode"]
grade = None
if mode == "grade":
    ns = {"__name__": "grader"}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(spec["source"], "<grader>", "exec"), ns)
        grade = ns["grade"]
        if not callable(grade): raise TypeError("`grade` is not callable")
    except BaseException as e:
        for _ in spec["samples"]:
            emit({"ok": False, "error": "grader source failed: " + "".join(traceback.format_exception_only(type(e), e)).strip()})
        sys.exit(0)
for s in spec["samples"]:
    limit_cpu()
    try:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            if mode == "grade":
                v = grade(s["sample"], s["item"])
                v = float(v)
                emit({"ok": True, "value": v})
            else:  # code: compile, then run code + tests
                try:
                    code = compile(s["code"], "<completion>", "exec")
                except BaseException as e:
                    emit({"ok": True, "value": {"compiles": False, "passed": False, "error": type(e).__name__ + ": " + str(e)}}); continue
                ns = {"__name__": "__main__"}
                try:
                    exec(code, ns)
                    if s.get("tests"):
                        exec(compile(s["tests"], "<tests>", "exec"), ns)
                    emit({"ok": True, "value": {"compiles": True, "passed": True, "error": ""}})
                except BaseException as e:
                    emit({"ok": True, "value": {"compiles": True, "passed": False, "error": type(e).__name__ + ": " + str(e)[:300]}})
    except BaseException as e:
        emit({"ok": False, "error": type(e).__name__ + ": " + str(e)[:300]})
'''

_dumpable_cleared = False


def _protect_parent() -> None:
    """Make this (trainer) process non-dumpable: same-uid processes can't read /proc/<pid>/environ."""
    global _dumpable_cleared
    if _dumpable_cleared or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except Exception:  # noqa: BLE001
        pass
    _dumpable_cleared = True


def _preexec(memory_mib: int, cpu_total: int, drop_root: bool):
    def fn():
        import resource

        os.setsid()
        mem = memory_mib * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_total, cpu_total))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024 * 1024, 64 * 1024 * 1024))
        except (ValueError, OSError):
            pass
        if drop_root:
            # root without capabilities: cannot ptrace/read /proc/<trainer>/environ of the
            # non-dumpable trainer. Dropping the bounding set keeps them dropped across exec.
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            for cap in range(64):
                libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP

    return fn


def run_batch(mode: str, samples: list[dict[str, Any]], *, source: str = "", timeout_s: float = 10, memory_mib: int = 512, cpu_s: int = 10) -> list[SandboxResult]:
    """Run `samples` (mode `grade`: {"sample", "item"}; mode `code`: {"code", "tests"}) in sandboxes."""
    _protect_parent()
    results: list[SandboxResult] = []
    pending = list(samples)
    while pending:
        done = _run_once(mode, pending, source, timeout_s, memory_mib, cpu_s)
        results.extend(done)
        pending = pending[len(done):]
    return results


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


def _run_once(mode, samples, source, timeout_s, memory_mib, cpu_s) -> list[SandboxResult]:
    """Run as many of `samples` as possible in one process; always returns >= 1 result."""
    scratch = tempfile.mkdtemp(prefix="perennial-sandbox-")
    drop_root = os.geteuid() == 0
    payload = json.dumps({"mode": mode, "source": source, "samples": samples, "cpu": cpu_s}) + "\n"
    script = os.path.join(scratch, "_child.py")
    with open(script, "w") as f:
        f.write(_CHILD)
    os.chmod(script, 0o444)
    results: list[SandboxResult] = []
    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={}, cwd=scratch, close_fds=True,
            preexec_fn=_preexec(memory_mib, cpu_s * len(samples) + 5, drop_root),
        )
        # the payload may exceed a pipe buffer: write it from a thread-free loop with select
        assert proc.stdin and proc.stdout
        _write_all(proc, payload.encode(), timeout_s + 5)
        buf = b""
        deadline = time.monotonic() + timeout_s + 2.0  # first sample also pays interpreter start-up
        while len(results) < len(samples):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                results.append(SandboxResult(False, error=f"timed out after {timeout_s}s (wall clock)"))
                break
            r, _, _ = select.select([proc.stdout], [], [], remaining)
            if not r:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:  # the process died
                proc.wait()
                err = proc.stderr.read().decode(errors="replace")[-300:] if proc.stderr else ""
                rc = proc.returncode
                if rc == -signal.SIGXCPU:
                    why = "exceeded its CPU time limit (SIGXCPU)"
                elif rc < 0:
                    why = f"killed by signal {-rc}"
                else:
                    why = f"exited with {rc}"
                results.append(SandboxResult(False, error=f"sandbox process {why}: {err.strip()}"[:500]))
                break
            buf += chunk
            while b"\n" in buf and len(results) < len(samples):
                line, buf = buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                    results.append(SandboxResult(bool(msg.get("ok")), msg.get("value"), msg.get("error", "")))
                except json.JSONDecodeError:
                    results.append(SandboxResult(False, error="unreadable sandbox answer"))
                deadline = time.monotonic() + timeout_s
    except OSError as e:
        results.append(SandboxResult(False, error=f"sandbox failed to start: {e}"))
    finally:
        if proc is not None and proc.poll() is None:
            _kill(proc)
        shutil.rmtree(scratch, ignore_errors=True)
    return results or [SandboxResult(False, error="sandbox returned nothing")]


def _write_all(proc: subprocess.Popen, data: bytes, timeout_s: float) -> None:
    fd = proc.stdin.fileno()
    deadline = time.monotonic() + timeout_s
    view = memoryview(data)
    while view:
        _, w, _ = select.select([], [fd], [], max(0.0, deadline - time.monotonic()))
        if not w:
            break
        try:
            n = os.write(fd, view[:65536])
        except BrokenPipeError:
            break
        view = view[n:]
    try:
        proc.stdin.close()
    except BrokenPipeError:
        pass
