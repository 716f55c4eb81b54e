"""Grading throughput: the sandbox of issue 11 against the batch path it replaced, side by side.

    python benchmarks/grading.py [--samples 64] [--repeats 3] [--cores 2]

The workload is the seed's Code rubric (+5 format, +10 compiles, +20 tests) on honest samples (a
quarter each: unformatted, not compiling, failing, passing) with assert-style tests, the same samples
with two I/O cases each, and a Python `grade()` grader. The process is pinned to `--cores` CPUs
(default 2, the machine the issue speaks of), and every configuration is timed in the same run,
interleaved, best of `--repeats`:

* ``old``: a frozen copy of the previous batch path (below): one process per batch running every
  sample's code and tests in turn, which is what let a sample forge the others' results;
* ``new``: one fresh confined process per sample (per I/O case) with every layer;
* ``new -seccomp``, ``new -landlock``, ``new -both``: the same with layers turned off, to price each.

Printed: samples/s per configuration and grader, the ratio to ``old``, and each layer's cost per
sample (ms). Scores are checked equal across configurations (0/5/15/35 on the rubric).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer_image")]

from perennial.api import Grader
from perennial_trainer import graders, sandbox

RUBRIC = {"formatPoints": "5", "compilePoints": "10", "testPoints": "20"}
SAMPLES = [
    "def add(a, b):\n    return a + b",  # unformatted: 0
    "```python\ndef add(a, b)\n    return a + b\n```",  # does not compile: 5
    "```python\ndef add(a, b):\n    return a - b\n```",  # tests fail: 15
    "Here:\n```python\ndef add(a, b):\n    return a + b\n```",  # passes: 35
]
ASSERTS = {"tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0"}
IO_SAMPLES = [s.replace("def add(a, b):\n    return a", "a, b = map(int, input().split())\nprint(a").replace("return a", "print(a") for s in SAMPLES]
IO_SAMPLES = [s.replace("print(a + b", "print(a + b)").replace("print(a - b", "print(a - b)") for s in IO_SAMPLES]
IO = {"io_tests": [{"input": "2 3\n", "output": "5\n"}, {"input": "-1 1\n", "output": "0\n"}]}
PY_SOURCE = "def grade(sample, item):\n    return float(sample['output_text'].strip() == item['answer'])\n"


# ----------------------------------------------------------------------------- the old batch path (frozen copy)

import logging
from dataclasses import dataclass

log = logging.getLogger("benchmark.old_sandbox")


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
    except Exception:  # noqa: BLE001, S110 - frozen copy of the old code
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
            preexec_fn=_preexec(memory_mib, cpu_s * len(samples) + 5, drop_root),  # noqa: PLW1509 - frozen copy of the old code
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


def old_code_batch(samples: list[str], item: dict) -> list[float]:
    """The previous `_code_batch` (compile in the trainer, then one shared process for the batch)."""
    import re

    fence = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL)
    fp, cp, tp = 5.0, 10.0, 20.0
    results: list[float | None] = [None] * len(samples)
    to_run, idx = [], []
    for i, text in enumerate(samples):
        m = fence.search(text)
        if not m:
            results[i] = 0.0
            continue
        try:
            compile(m.group(1), "<completion>", "exec")
        except (SyntaxError, ValueError):
            results[i] = fp
            continue
        to_run.append({"code": m.group(1), "tests": item.get("tests", "")})
        idx.append(i)
    for i, r in zip(idx, run_batch("code", to_run)):
        results[i] = fp + cp + tp if r.ok and r.value.get("passed") else fp + cp
    return [float(r) for r in results]  # type: ignore[arg-type]


def old_python_batch(samples: list[str], items: list[dict]) -> list[float]:
    payload = [{"sample": {"output_text": s}, "item": it} for s, it in zip(samples, items)]
    return [float(r.value) if r.ok else 0.0 for r in run_batch("grade", payload, source=PY_SOURCE)]


# ----------------------------------------------------------------------------- the benchmark


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cpus)
    logging.basicConfig(level=logging.ERROR)
    n = args.samples
    code_samples = [SAMPLES[i % 4] for i in range(n)]
    io_samples = [IO_SAMPLES[i % 4] for i in range(n)]
    py_samples = ["red" if i % 2 else "blue" for i in range(n)]
    py_items = [{"answer": "red"}] * n
    expected_code = [[0, 5, 15, 35][i % 4] for i in range(n)]

    def grader(kind: str, off: tuple[str, ...]):
        if kind == "Python":
            g = Grader.model_validate({"name": "py", "type": "Python", "python": {"source": PY_SOURCE}})
        else:
            g = Grader.model_validate({"name": "code", "type": "Code", "code": RUBRIC})
        real = sandbox.Limits.from_api

        def from_api(lim, _off=off):
            x = real(lim)
            x.layers_off = _off
            return x
        return g, from_api

    configs = {"old": None, "new": (), "new -seccomp": ("seccomp",), "new -landlock": ("landlock",), "new -both": ("seccomp", "landlock")}
    workloads = ["Code asserts", "Code I/O (2 cases)", "Python grade()"]
    best: dict[tuple[str, str], float] = {}
    real_from_api = sandbox.Limits.from_api
    print(f"grading {n} samples per workload on {len(cpus)} CPUs (pinned to {cpus}), best of {args.repeats}, interleaved")
    for rep in range(args.repeats):
        for cfg, off in configs.items():
            for w in workloads:
                if cfg == "old" and w.startswith("Code I/O"):
                    continue  # the old path had no I/O tests
                t0 = time.perf_counter()
                if cfg == "old":
                    if w == "Code asserts":
                        scores = old_code_batch(code_samples, ASSERTS)
                        assert scores == expected_code, scores
                    else:
                        scores = old_python_batch(py_samples, py_items)
                else:
                    g, patched = grader("Python" if w.startswith("Python") else "Code", off)
                    sandbox.Limits.from_api = staticmethod(patched)
                    try:
                        if w == "Code asserts":
                            scores = [r.score for r in graders.grade_batch(g, code_samples, [ASSERTS] * n)]
                            assert scores == expected_code, (cfg, scores[:8])
                        elif w.startswith("Code I/O"):
                            scores = [r.score for r in graders.grade_batch(g, io_samples, [IO] * n)]
                            assert scores == expected_code, (cfg, scores[:8])
                        else:
                            scores = [r.score for r in graders.grade_batch(g, py_samples, py_items)]
                    finally:
                        sandbox.Limits.from_api = real_from_api
                dt = time.perf_counter() - t0
                key = (cfg, w)
                best[key] = min(best.get(key, float("inf")), dt)
    print(f"\n{'configuration':<16}" + "".join(f"{w:>26}" for w in workloads))
    for cfg in configs:
        row = f"{cfg:<16}"
        for w in workloads:
            if (cfg, w) not in best:
                row += f"{'-':>26}"
                continue
            rate = n / best[(cfg, w)]
            ratio = f" ({best[('old', w)] / best[(cfg, w)]:.2f}x old)" if ("old", w) in best and cfg != "old" else ""
            row += f"{rate:>14.0f} samples/s{ratio:>2}".rjust(26)
        print(row)
    print("\ncost per sample (ms) of each layer, from the differences (negative = noise):")
    for w in workloads:
        per = {cfg: 1000 * best[(cfg, w)] / n for cfg in configs if (cfg, w) in best}
        parts = [f"seccomp {per['new'] - per['new -seccomp']:+.2f}", f"landlock {per['new'] - per['new -landlock']:+.2f}",
                 f"both {per['new'] - per['new -both']:+.2f}", f"process per sample, all layers {per['new']:.2f} ms/sample"]
        if "old" in per:
            parts.append(f"old shared process {per['old']:.2f} ms/sample")
        print(f"  {w:<20} " + ", ".join(parts))
    print(f"\nsandbox layers here: {sandbox.layers()}")


if __name__ == "__main__":
    main()
