"""`--workers N`: N sidecar processes on one port, each with its own spool, one set of metrics,
restarted when they die, and every acknowledged feedback record shipped exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from srvutil import TOKEN, free_port, read_store
from waiting import wait_for


def start(tmp: Path, port: int, workers: int, *extra: str, admin_port: int | None = None) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "perennial_server.cli", "--log-level", "INFO", "sidecar",
        "--upstream", f"http://127.0.0.1:{free_port()}", "--host", "127.0.0.1", "--port", str(port),
        "--admin-port", str(admin_port or free_port()),  # shared by the workers, like the client port
        "--deployment", "demo", "--pod", "demo-pod", "--spool-dir", str(tmp / "spool"), "--store-uri", str(tmp / "store"),
        "--token-file", str(tmp / "token"), "--rate-limit-per-second", "100000", "--ship-interval-s", "0.2",
        "--workers", str(workers), *extra,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERENNIAL_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / f"sidecar-{time.time()}.log", "w"))


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "sidecar exited at start"
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise AssertionError("sidecar did not start")


def workers_of(pid: int) -> dict[int, int]:
    """worker index -> pid of the supervisor's children."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"--worker-index" in argv:
            out[int(argv[argv.index(b"--worker-index") + 1])] = int(d.name)
    return out


def send_feedback(port: int, ids: list[str]) -> list[str]:
    acked = []
    for fid in ids:
        # a new connection each time: SO_REUSEPORT spreads connections, not requests
        r = requests.post(f"http://127.0.0.1:{port}/v1/feedback", json={"id": fid, "response_id": "chatcmpl-" + fid, "type": "thumbs", "thumbs": "up"},
                          headers={"Authorization": f"Bearer {TOKEN}", "Connection": "close"}, timeout=10)
        assert r.status_code == 200, r.text
        acked.append(fid)
    return acked


def listening(port: int) -> int:
    """How many sockets listen on `port` (one per worker that has bound it: SO_REUSEPORT)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                n += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port
    return n


def metric(port: int, line_prefix: str) -> float:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(line_prefix))


class Running:
    def __init__(self, proc: subprocess.Popen, port: int, workers: dict[int, int], admin_port: int) -> None:
        self.proc, self.port, self.workers, self.admin_port = proc, port, workers, admin_port
        self.rc: int | None = None


@contextlib.contextmanager
def running(tmp: Path, workers: int) -> Iterator[Running]:
    """A healthy sidecar with `workers` worker processes; SIGTERM on leaving (exit code in `.rc`)."""
    (tmp / "token").write_text(TOKEN)
    port, admin_port = free_port(), free_port()
    proc = start(tmp, port, workers, admin_port=admin_port)
    r = Running(proc, port, {}, admin_port)
    try:
        wait_healthy(port, proc)
        if workers > 1:
            r.workers = wait_for(lambda: len(w := workers_of(proc.pid)) == workers and w, message=f"{workers} workers")
            # a worker that is still starting takes no connections: the kernel spreads them over bound sockets only
            wait_for(lambda: listening(port) == workers, timeout=60, message=f"{workers} workers listening on {port}")
        yield r
    finally:
        proc.send_signal(signal.SIGTERM)
        r.rc = proc.wait(60)


def stored_feedback_ids(tmp: Path) -> list[str]:
    return sorted(r["id"] for r in read_store(tmp / "store") if r["kind"] == "feedback")


def test_workers_share_the_port_metrics_and_ship_every_record_once(tmp_path: Path) -> None:
    with running(tmp_path, 2) as sc:
        acked = send_feedback(sc.port, [f"fb-{i}" for i in range(80)])
        # one /metrics answer counts what both workers accepted
        assert metric(sc.admin_port, 'perennial_sidecar_feedback_total{type="thumbs"}') == 80  # the admin port's
        # both workers took connections: each has written to its own spool
        assert {p.parent.name for p in (tmp_path / "spool").rglob("next_seq")} == {"spool", "w1"}
    assert sc.rc == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in sc.workers.values()), "workers outlived the supervisor"
    assert stored_feedback_ids(tmp_path) == sorted(acked), "every acknowledged record exactly once"
    names = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "store").rglob("*.jsonl")}
    assert names == {"demo-pod", "demo-pod-w1"}, names


def test_a_killed_worker_is_replaced_and_nothing_it_acknowledged_is_lost(tmp_path: Path) -> None:
    with running(tmp_path, 2) as sc:
        first = sc.workers
        acked = send_feedback(sc.port, [f"a-{i}" for i in range(40)])
        os.kill(first[1], signal.SIGKILL)
        again = wait_for(lambda: (w := workers_of(sc.proc.pid)).get(1) not in (None, first[1]) and w, message="worker 1 restarted")
        assert again[0] == first[0], "the other worker keeps serving"
        acked += send_feedback(sc.port, [f"b-{i}" for i in range(40)])
    assert sc.rc == 0
    assert stored_feedback_ids(tmp_path) == sorted(acked)


def test_spools_of_former_workers_are_recovered_and_shipped(tmp_path: Path) -> None:
    """The pod ran 4 workers before; now 1: what workers 2 and 3 left is shipped under their names."""
    line = lambda i: json.dumps({"kind": "feedback", "schemaVersion": 1, "id": f"old-{i}", "responseId": "chatcmpl-x", "type": "thumbs", "thumbs": "down"})
    w2, w3 = tmp_path / "spool" / "w2", tmp_path / "spool" / "w3"
    w2.mkdir(parents=True)
    w3.mkdir()
    (w2 / "00000004-20261120.jsonl").write_text(line(1) + "\n" + line(2) + "\n")
    (w3 / "00000007-20261121.open").write_text(line(3) + "\n" + line(4)[:20])  # torn by a crash
    with running(tmp_path, 1) as sc:
        store = tmp_path / "store"
        wait_for(lambda: len(list(store.rglob("*.jsonl"))) == 2, message="the orphaned segments shipped")
    assert sc.rc == 0
    names = sorted(str(p.relative_to(tmp_path / "store")) for p in (tmp_path / "store").rglob("*.jsonl"))
    assert names == ["demo/2026/11/20/demo-pod-w2-00000004.jsonl", "demo/2026/11/21/demo-pod-w3-00000007.jsonl"]
    assert sorted(r["id"] for r in read_store(tmp_path / "store")) == ["old-1", "old-2", "old-3"]


def test_workers_that_cannot_start_stop_the_sidecar_instead_of_looping(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN)
    with socket.socket() as taken:  # the port is held by someone else (no SO_REUSEPORT): every worker fails to bind
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = start(tmp_path, taken.getsockname()[1], 2)
        rc = proc.wait(120)
    assert rc == 1
    log = "".join(p.read_text() for p in tmp_path.glob("sidecar-*.log"))
    assert "keeps dying" in log


def test_what_a_worker_killed_during_shutdown_left_is_shipped_by_the_supervisor(tmp_path: Path) -> None:
    with running(tmp_path, 2) as sc:
        acked = send_feedback(sc.port, [f"fb-{i}" for i in range(60)])
        assert any((tmp_path / "spool" / "w1").glob("*.open")), "worker 1 holds records in its open segment"
        os.kill(sc.workers[1], signal.SIGKILL)  # dies holding them, and the pod is going away (SIGTERM next):
    assert sc.rc == 0
    assert stored_feedback_ids(tmp_path) == sorted(acked)
    assert "Shipped what a worker left behind" in "".join(p.read_text() for p in tmp_path.glob("sidecar-*.log"))
