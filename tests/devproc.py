"""Stopping a `perennial dev` subprocess as a user does (Ctrl-C), in the tests that start one."""

from __future__ import annotations

import signal
import subprocess
from typing import IO


def stop_dev(proc: subprocess.Popen, log: IO) -> None:
    """SIGINT, then an exit within 60 s (AssertionError otherwise); the caller checks the exit code."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("perennial dev did not stop on SIGINT") from None
    finally:
        log.close()
