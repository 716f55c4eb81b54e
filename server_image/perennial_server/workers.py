"""Several sidecar worker processes on one port.

One Python process proxies on about one CPU. With `--workers N` this supervisor starts N
sidecar processes that all listen on the same port (SO_REUSEPORT: the kernel spreads new
connections over them), so a pod that gives the sidecar container N CPUs gets N times the
throughput. Each worker has its own spool (worker 0 the spool dir, worker i the subdir
`w<i>`) and pod name in segment object names (`<pod>-w<i>`), so no two processes ever write
the same file or object. Metrics are shared through prometheus_client's multiprocess mode
(files in `<spool dir>/.metrics`): any worker's /metrics shows the pod's totals.

A worker that dies is restarted (its successor recovers and ships what it left in its spool);
one that dies more than `max_restarts` times in `window_s` stops the whole sidecar with exit
code 1, so Kubernetes restarts the container instead of this loop spinning. SIGTERM/SIGINT go
to every worker; each drains, flushes and ships, then the supervisor exits.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

from .config import SidecarConfig

log = logging.getLogger("perennial_server.workers")


def worker_argv(cfg: SidecarConfig, index: int, log_level: str) -> list[str]:
    argv = [sys.executable, "-m", "perennial_server.cli", "--log-level", log_level, "sidecar"]
    for f in fields(SidecarConfig):
        value = index if f.name == "worker_index" else getattr(cfg, f.name)
        argv += ["--" + f.name.replace("_", "-"), str(value)]
    return argv


def metrics_dir(cfg: SidecarConfig) -> Path:
    """On the spool volume: writable even with a read-only root filesystem."""
    return Path(cfg.spool_dir) / ".metrics"


class Supervisor:
    def __init__(self, cfg: SidecarConfig, log_level: str = "INFO", max_restarts: int = 5, window_s: float = 60.0) -> None:
        self.cfg = cfg
        self.log_level = log_level
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.exits: dict[int, list[float]] = {}
        self.stopping = False
        self.failed = False
        self.mp_dir = metrics_dir(cfg)

    def _spawn(self, index: int) -> None:
        p = subprocess.Popen(worker_argv(self.cfg, index, self.log_level))  # inherits PROMETHEUS_MULTIPROC_DIR (run())
        self.procs[index] = p
        log.info("Started sidecar worker index=%d pid=%d", index, p.pid)

    def _stop(self, *_: object) -> None:
        if not self.stopping:
            log.info("Stopping sidecar workers count=%d", len(self.procs))
        self.stopping = True
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def run(self) -> int:
        # counters of a previous container run would otherwise be summed into this one's
        shutil.rmtree(self.mp_dir, ignore_errors=True)
        self.mp_dir.mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.mp_dir)  # for the workers, set before they import prometheus_client
        from prometheus_client import multiprocess

        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for i in range(self.cfg.workers):
            self._spawn(i)
        rcs: list[int] = []
        kill_at = None
        while self.procs:
            for i, p in list(self.procs.items()):
                rc = p.poll()
                if rc is None:
                    continue
                del self.procs[i]
                multiprocess.mark_process_dead(p.pid, str(self.mp_dir))
                if self.stopping:
                    rcs.append(rc)
                    continue
                now = time.monotonic()
                recent = [t for t in self.exits.get(i, []) if now - t < self.window_s] + [now]
                self.exits[i] = recent
                if len(recent) > self.max_restarts:
                    log.error("Sidecar worker keeps dying index=%d exits=%d within=%.0fs: stopping the sidecar", i, len(recent), self.window_s)
                    self.failed = True
                    self._stop()
                    continue
                log.warning("Sidecar worker exited index=%d pid=%d rc=%s: restarting it", i, p.pid, rc)
                self._spawn(i)
            if self.stopping and kill_at is None:
                kill_at = time.monotonic() + self.cfg.drain_timeout_s + 30.0  # drain, then the final ship
            if kill_at is not None and time.monotonic() > kill_at:
                for p in self.procs.values():
                    p.kill()
            time.sleep(0.05)
        self.sweep()
        if self.failed:
            return 1
        return max((rc for rc in rcs if rc > 0), default=0)

    def sweep(self) -> None:
        """Last resort once every worker is gone: a worker killed before it finished starting (or
        stopping) may have left segments; close and ship them now, before the pod and its
        spool volume go away."""
        if not self.cfg.store_uri:
            return
        from .shipper import Shipper, Store
        from .spool import Spool, closed_segments

        for _, spool_dir, pod in self.cfg.worker_spools():
            d = Path(spool_dir)
            if not any(d.glob("*.open")) and not closed_segments(d):
                continue
            try:
                Spool(d).recover()
                n = Shipper(d, Store(self.cfg.store_uri), deployment=self.cfg.deployment, pod=pod).ship_all()
                log.info("Shipped what a worker left behind dir=%s segments=%d", d, n)
            except Exception as e:  # noqa: BLE001 - the spool keeps them for the next start of this pod
                log.warning("Left segments in the spool dir=%s error=%r", d, e)


def supervise(cfg: SidecarConfig, log_level: str = "INFO") -> int:
    return Supervisor(cfg, log_level).run()
