"""Loaded by every Python process of a local serving pod (its directory leads PYTHONPATH): the pod's network.

In a cluster each pod has its own network namespace: `0.0.0.0` means the pod's interfaces, `127.0.0.1` is the
pod's own loopback. The local runtime runs pods as processes of one host, so it gives each pod two loopback
addresses of 127.0.0.0/8 and this shim rewrites IPv4 socket addresses of the pod's processes:

- bind to `0.0.0.0` / `""` -> the pod IP (`PERENNIAL_LOCAL_POD_IP`): the pod-facing address the proxy and the
  probes use, so two pods can both listen on :8080;
- bind or connect to `127.0.0.1` / `localhost` -> the pod's loopback (`PERENNIAL_LOCAL_POD_LOOPBACK`): an engine
  on 127.0.0.1:8000 is reached by its sidecar's `http://127.0.0.1:8000` and by nothing outside the pod (no probe,
  no Service: as in a cluster).

Differences from a network namespace: a socket bound to 0.0.0.0 gets only the pod IP (not also the pod loopback),
IPv6 sockets are left alone, and only Python processes are covered. uvloop connects in C (libuv), not through
`socket.connect`: when uvloop is installed, its `Loop` is replaced by a subclass mapping `create_connection`'s host.

A pod process also stops itself once its parent (the runtime) is gone: see `_watch_parent`.
"""

import os
import socket as _socket

_POD_IP = os.environ.get("PERENNIAL_LOCAL_POD_IP", "")
_POD_LO = os.environ.get("PERENNIAL_LOCAL_POD_LOOPBACK", "")


def _install() -> None:
    if not _POD_IP or not _POD_LO:
        return
    cls = _socket.socket
    if getattr(cls, "_perennial_podnet", False):
        return
    orig_bind, orig_connect, orig_connect_ex = cls.bind, cls.connect, cls.connect_ex

    def _map(sock, address, wildcard):  # type: ignore[no-untyped-def]
        if sock.family != _socket.AF_INET or not isinstance(address, tuple) or len(address) != 2:
            return address
        host, port = address
        if host in ("127.0.0.1", "localhost"):
            return (_POD_LO, port)
        if wildcard and host in ("", "0.0.0.0"):
            return (_POD_IP, port)
        return address

    def bind(self, address):  # type: ignore[no-untyped-def]
        return orig_bind(self, _map(self, address, True))

    def connect(self, address):  # type: ignore[no-untyped-def]
        return orig_connect(self, _map(self, address, False))

    def connect_ex(self, address):  # type: ignore[no-untyped-def]
        return orig_connect_ex(self, _map(self, address, False))

    cls.bind, cls.connect, cls.connect_ex = bind, connect, connect_ex
    cls._perennial_podnet = True


def _map_host(host):  # type: ignore[no-untyped-def]
    return _POD_LO if host in ("127.0.0.1", "localhost") else host


def _install_uvloop() -> None:
    if not _POD_IP or not _POD_LO:
        return
    try:
        import uvloop
    except ImportError:
        return
    if getattr(uvloop.Loop, "_perennial_podnet", False):
        return

    class Loop(uvloop.Loop):  # type: ignore[misc,name-defined]
        _perennial_podnet = True

        async def create_connection(self, protocol_factory, host=None, port=None, **kwargs):  # type: ignore[no-untyped-def]
            return await super().create_connection(protocol_factory, _map_host(host), port, **kwargs)

    uvloop.Loop = Loop
    uvloop.new_event_loop = Loop
    policy = getattr(uvloop, "EventLoopPolicy", None)
    if policy is not None:
        policy._loop_factory = lambda self: Loop()  # type: ignore[method-assign]


def _watch_parent() -> None:
    """A pod process stops once its parent is gone. Pods run in sessions of their own (start_new_session), so a
    runtime killed without running its stop() (SIGKILL, OOM, a crash) left them serving, holding ports and memory:
    poll the parent (reparenting changes it), then SIGTERM ourselves (the servers drain), SIGKILL after a grace."""
    if not _POD_IP or not _POD_LO:
        return
    ppid = os.getppid()
    if ppid <= 1:
        return
    import signal
    import threading
    import time

    def watch() -> None:
        while os.getppid() == ppid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30.0)
        os._exit(137)

    threading.Thread(target=watch, name="podnet-parent-watch", daemon=True).start()


_install()
_install_uvloop()
_watch_parent()
