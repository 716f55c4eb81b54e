"""The watchdog a local Job pod's container runs under (`perennial.local.podwatch`): the kubelet sees the command's
own pid and exit status, a start failure is a clear error, and the command's environment stays out of the
watchdog's own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from perennial.local.kubelet import spawn_watched


def _run(argv: list[str], env: dict[str, str] | None = None, tmp: str = "/") -> tuple[subprocess.Popen[bytes], int]:
    return spawn_watched(argv, env or {"PATH": os.environ["PATH"]}, tmp, 2.0, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_the_commands_exit_code_and_output_come_back(tmp_path: Path) -> None:
    proc, pid = _run([sys.executable, "-c", "import os, sys; print('hi from', os.getpid(), os.getcwd()); sys.exit(3)"],
                     tmp=str(tmp_path))
    out = proc.stdout.read().decode()  # type: ignore[union-attr]
    assert proc.wait(30) == 3
    assert out == f"hi from {pid} {tmp_path}\n" and pid != proc.pid


def test_death_by_a_signal_is_reported_as_that_signal() -> None:
    proc, _ = _run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert proc.wait(30) == -signal.SIGKILL


def test_sigterm_to_the_group_reaches_the_command_which_exits_as_it_chooses() -> None:
    script = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\nprint('ready', flush=True)\ntime.sleep(60)"
    proc, _ = _run([sys.executable, "-c", script])
    assert proc.stdout.readline() == b"ready\n"  # type: ignore[union-attr]
    os.killpg(proc.pid, signal.SIGTERM)  # what the kubelet does on deletion
    assert proc.wait(30) == 7


def test_a_command_that_cannot_start_is_an_oserror_with_the_reason() -> None:
    with pytest.raises(OSError, match="no-such-binary"):
        _run(["/nonexistent/no-such-binary"])


def test_the_commands_environment_is_not_in_the_watchdogs() -> None:
    proc, pid = _run([sys.executable, "-c", "import time\nprint('ready', flush=True)\ntime.sleep(60)"],
                     env={"PATH": os.environ["PATH"], "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-podwatch"})
    try:
        assert proc.stdout.readline() == b"ready\n"  # type: ignore[union-attr]
        assert b"wJalrXUtnFEMI-podwatch" in Path(f"/proc/{pid}/environ").read_bytes()  # the command has it
        watchdog = Path(f"/proc/{proc.pid}/environ").read_bytes() + Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"wJalrXUtnFEMI-podwatch" not in watchdog
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def test_what_the_command_left_running_ends_with_it(tmp_path: Path) -> None:
    """As a container's processes end with its main process: a helper the command started and left behind (still
    holding the log pipe) is killed when the command exits, and the command's status still comes back."""
    from waiting import wait_for

    pidfile = tmp_path / "helper"
    script = ("import subprocess, sys\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(1)'])\n"
              f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
              "sys.exit(5)\n")
    proc, _ = _run([sys.executable, "-c", script])
    try:
        assert proc.wait(30) == 5
        helper = int(pidfile.read_text())
        wait_for(lambda: not _alive(helper), 30, 0.05, "the helper ended")
        assert proc.stdout.read() == b""  # type: ignore[union-attr]  # EOF: nobody holds the log pipe any more
    finally:
        if pidfile.exists() and _alive(pid := int(pidfile.read_text())):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
