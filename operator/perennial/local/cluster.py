"""What a cluster's nodes and controllers add to the embedded API server, in one object for `perennial dev` and tests.

- `LocalKubelet` (kubelet.py): the batch/v1 Job controller and the kubelet of the Jobs' pods (polling, as before);
- `LocalControllerManager` (controllers.py): apps/v1 Deployments -> ReplicaSets -> Pods;
- `PodKubelet` (serving.py): every other pod of a mapped image as local processes, with probes and a pod IP;
- `LocalServiceProxy` (proxy.py): a local port per Service relaying to its ready pods.
The last three share one event loop thread and are driven by the store's watch. Usage::

    cluster = LocalCluster(kube, server, workdir=state / "pods", pvc_root=state / "pvc", images={...}).start()
    ...
    cluster.stop()
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..kube.client import Kube
from .controllers import LocalControllerManager
from .informers import LoopThread
from .kubelet import LocalKubelet
from .proxy import LocalServiceProxy
from .serving import PodKubelet

__all__ = ["LocalCluster"]


class LocalCluster:
    """The local runtime: Job kubelet, apps/v1 controllers, pod kubelet and service proxy (see the module docstring).

    `kubelet_options` go to `LocalKubelet`, `pod_options` to `PodKubelet` (e.g. `restart_backoff_seconds`)."""

    def __init__(self, kube: Kube, server_handle: Any, *, workdir: str | os.PathLike[str], pvc_root: str | os.PathLike[str],
                 images: dict[str, list[str]], commands: dict[str, list[str]] | None = None,
                 kubelet_options: dict[str, Any] | None = None, pod_options: dict[str, Any] | None = None) -> None:
        self.loop = LoopThread("perennial-local-runtime")
        self.jobs = LocalKubelet(kube, server_handle, workdir=workdir, pvc_root=pvc_root, images=images, commands=commands,
                                 **(kubelet_options or {}))
        self.controllers = LocalControllerManager(kube, server_handle, loop=self.loop)
        self.pods = PodKubelet(kube, server_handle, workdir=Path(workdir), pvc_root=pvc_root, images=images, commands=commands,
                               loop=self.loop, **(pod_options or {}))
        self.proxy = LocalServiceProxy(kube, server_handle, loop=self.loop)

    def start(self) -> "LocalCluster":
        self.loop.start()
        self.jobs.start()
        self.controllers.start()
        self.pods.start()
        self.proxy.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop what started (also when start() was interrupted part way, as `perennial dev` stopped while starting:
        what the parts would hand to a loop that never ran fails at once, see `LoopThread.submit`)."""
        self.proxy.stop()
        self.controllers.stop()
        self.pods.stop(timeout)
        self.jobs.stop(timeout)
        self.loop.stop()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
