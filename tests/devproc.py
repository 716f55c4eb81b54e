"""For the tests that start a `perennial dev` subprocess: free ports for it, whether one listens yet, and stopping it as a
user does (Ctrl-C)."""

from __future__ import annotations

import signal
import socket
import subprocess
from typing import IO


def free_port() -> int:
    """A port free on 127.0.0.1 now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on the port yet (False while refused; other errors raise)."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return False
    return True


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
