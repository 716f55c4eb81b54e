"""`perennial dev` stops cleanly on Ctrl-C (SIGINT) or SIGTERM at any moment of its start, not only once it runs.

Found by CI: a Ctrl-C while the operator was still importing its modules ended the process killed by SIGINT
(exit status -2, no traceback) after it had caught the KeyboardInterrupt and stopped everything (CPython 3.11
records a KeyboardInterrupt that passes through code an extension module runs with `PyRun_String` as unhandled
for good); one before the operator's `try` left a traceback. Each moment below is a milestone the process
reaches, not a sleep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from devproc import free_port, listening
from harness import wait_for


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


# id -> (the moment, reached when its predicate of (log, metrics port, health port) holds, the local runtime started by then)
MOMENTS = {
    # the first thing it does once its handler is installed (before it, the interpreter's own start: a Ctrl-C
    # there ends any Python program killed by SIGINT)
    "state-dir": ("once the state dir exists (the control plane starts)", lambda log, metrics, health: (log.parent / "state").is_dir(), False),
    "banner": ("at the banner (the operator imports its modules)", lambda log, metrics, health: "Perennial dev is running" in log.read_text(), False),
    "metrics": ("once the metrics port listens (the operator builds its registry)", lambda log, metrics, health: listening(metrics), True),
    # kopf serves /healthz before its first discovery scan ends; a stop during that scan leaves the scan's requests
    # running (it awaits them through asyncio.as_completed, which does not cancel them) and kopf cancels them as
    # "hung" after 5 s. Our own list of the world starts once kopf's watches do, so after the scan.
    "running": ("once kopf runs and watches (/healthz 200, the world listed)",
                lambda log, metrics, health: "Listed the world" in log.read_text() and _healthy(health), True),
}
CASES = [(moment, signal.SIGINT) for moment in MOMENTS] + [
    ("banner", signal.SIGTERM),  # as a process manager stops it
    ("running", signal.SIGTERM),
]


@pytest.mark.parametrize(("moment", "sig"), CASES, ids=[f"{s.name}-{m}" for m, s in CASES])
def test_perennial_dev_stops_cleanly_whenever_it_is_stopped(tmp_path: Path, moment: str, sig: signal.Signals) -> None:
    what, reached, runtime_started = MOMENTS[moment]
    metrics, health = free_port(), free_port()
    log_path = tmp_path / "dev.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "perennial.cli", "dev", "--state-dir", str(tmp_path / "state"), "--port", str(free_port()),
             "--metrics-port", str(metrics), "--health-port", str(health), "--log-format", "plain", "--verbose"],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            wait_for(lambda: reached(log_path, metrics, health) or proc.poll() is not None, timeout=120, interval=0.02,
                     message=what)
            assert proc.poll() is None, log_path.read_text()[-3000:]
            proc.send_signal(sig)
            proc.wait(60)  # a bound against a hang, not a performance figure
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    if runtime_started:
        # the local runtime had started (before the operator): it was stopped, not left to die with the process
        assert "Started local kubelet" in text and "Stopped local kubelet" in text, text[-3000:]
    if "Signal SIG" in text:  # kopf ran and stopped on the signal
        # and left no task of its own behind (kopf waits 5 s for such "hung" tasks, then cancels them: its waiter of
        # the stop flag did, until the operator's cleanup set the flag)
        assert "Hung tasks stopping is skipped: no tasks given." in text, text[-3000:]
