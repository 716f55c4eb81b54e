"""The first process of a local Job pod's container: starts the container's command and ends it with its owner.

In a cluster a node's containers do not outlive the node. The local kubelet runs a container as a process in a
session of its own (so a signal to its process group reaches everything it started); a kubelet killed without its
stop() (SIGKILL, OOM, a crash of `perennial dev`) left such a process running for hours, holding memory and GPUs,
with nobody to stop it or read its result. The kubelet therefore starts this watchdog as the group's leader; it
starts the container's command in the same group, then

- waits for the command (a pidfd: woken at its exit), kills what it left running in the group (as a container's
  processes end with its main process; they would hold the log pipe open) and exits as the command did (the same
  code, or the same signal), so the kubelet sees the container's own status;
- ignores SIGTERM/SIGINT/SIGHUP itself: the kubelet's SIGTERM to the group reaches the command, whose exit ends
  the watchdog; the kubelet's SIGKILL to the group ends both;
- once its owner (the kubelet's process, its parent) is gone (a pidfd on it; else polling getppid every second):
  SIGTERM to the group, `grace` seconds for the command to end, then SIGKILL to the group (itself included).

The command's argv, environment and working directory arrive on a socket (an inherited fd), not on the watchdog's
command line or in its environment: credentials in a container's env stay out of this process's
`/proc/<pid>/environ` and `cmdline`, and it makes itself non-dumpable before reading them (as the trainer does), so
no other process of the same user reads them from its memory. The watchdog answers `{"pid": N}` (the command's
pid) or `{"error": "..."}` (the command could not be started: exit 128) and closes the socket.

Usage (the kubelet's): `python -I -S podwatch.py <socket fd> <owner pid> <grace seconds>`. Standard library only,
no site packages (it starts in a few milliseconds).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
START_ERROR_EXIT = 128


def _non_dumpable() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    except (OSError, AttributeError):
        pass


def _pidfd(pid: int) -> int | None:
    """A pidfd of `pid` (readable once it exits); None where the kernel or Python has none; -1 if already gone."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return opener(pid)
    except ProcessLookupError:
        return -1
    except OSError:
        return None


def _read_spec(sock: socket.socket) -> dict:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
    return json.loads(b"".join(chunks) or b"null")


def _exit_like(returncode: int) -> None:
    """Exit with the command's status: its code, or death by its signal."""
    if returncode < 0:
        sig = -returncode
        try:
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            time.sleep(5)  # a signal whose default is to go on: fall through
        except (OSError, ValueError):
            pass
        os._exit(128 + sig)
    os._exit(returncode & 0xFF)


def _kill_the_rest() -> None:
    """SIGKILL every other process of our process group (what the command started and left behind), as a
    container's processes end with its main process. Linux (/proc); elsewhere nothing."""
    me, group = os.getpid(), os.getpgid(0)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            if int(fields[2]) == group:  # state, ppid, pgrp
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue


def _wait(child: subprocess.Popen, owner: int) -> bool:
    """Wait until the command exits (True) or the owner is gone (False, unless the command ended meanwhile)."""
    child_fd, owner_fd = _pidfd(child.pid), _pidfd(owner)  # the owner's, opened before its check below
    if owner_fd == -1:
        return child.poll() is not None
    while True:
        if os.getppid() != owner:  # reparented: the owner is gone
            return child.poll() is not None
        if child_fd is not None and child_fd >= 0:
            watched = [child_fd] + ([owner_fd] if owner_fd is not None else [])
            ready = select.select(watched, [], [], None if owner_fd is not None else 1.0)[0]
            if child_fd in ready:
                child.wait()
                return True
        else:
            try:
                child.wait(timeout=1.0)
                return True
            except subprocess.TimeoutExpired:
                ready = select.select([owner_fd], [], [], 0)[0] if owner_fd is not None else []
        if owner_fd is not None and owner_fd in ready:
            return child.poll() is not None


def main(argv: list[str]) -> None:
    fd, owner, grace = int(argv[1]), int(argv[2]), float(argv[3])
    _non_dumpable()
    for sig in _SIGNALS:  # a handler, not SIG_IGN: the command starts with the default action (exec resets it)
        signal.signal(sig, lambda *_: None)
    sock = socket.socket(fileno=fd)
    try:
        spec = _read_spec(sock)
        if not isinstance(spec, dict) or os.getppid() != owner:
            os._exit(START_ERROR_EXIT)  # the kubelet went before it said what to run
        try:
            child = subprocess.Popen(spec["argv"], env=spec["env"], cwd=spec["cwd"], stdin=subprocess.DEVNULL)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            sock.sendall(json.dumps({"error": str(exc)}).encode())
            os._exit(START_ERROR_EXIT)
        sock.sendall(json.dumps({"pid": child.pid}).encode())
    except OSError:  # the kubelet closed its end
        os._exit(START_ERROR_EXIT)
    finally:
        sock.close()
    del spec  # the command's environment is not kept here
    if _wait(child, owner):
        _kill_the_rest()
        _exit_like(child.returncode)
    group = os.getpgid(0)
    try:
        os.killpg(group, signal.SIGTERM)  # our own handler ignores it
        child.wait(timeout=grace)
    except (subprocess.TimeoutExpired, OSError):
        pass
    os.killpg(group, signal.SIGKILL)  # what the command left, and this process


if __name__ == "__main__":
    main(sys.argv)
