"""kill -9 the sidecar while clients send feedback: after a restart every
feedback request that got a 2xx is in the store, at least once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from srvutil import TOKEN, fake_engine, free_port, read_store
from waiting import wait_for


def _start(tmp: Path, port: int, upstream: str | None = None) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "perennial_server.cli", "--log-level", "WARNING", "sidecar",
        "--upstream", upstream or f"http://127.0.0.1:{free_port()}", "--host", "127.0.0.1", "--port", str(port),
        "--admin-port", "0", "--deployment", "demo", "--pod", "demo-pod-1", "--spool-dir", str(tmp / "spool"), "--store-uri", f"file://{tmp / 'store'}",
        "--token-file", str(tmp / "token"), "--rate-limit-per-second", "100000", "--segment-max-bytes", "8192",
        "--segment-max-age-s", "0.3", "--ship-interval-s", "0.1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERENNIAL_")}
    p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / f"sidecar-{time.time()}.log", "w"))
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                return p
        except requests.RequestException:
            pass
        assert p.poll() is None, "sidecar exited at start"
        time.sleep(0.05)
    raise AssertionError("sidecar did not start")


def test_kill_9_loses_no_acknowledged_feedback_and_retries_store_nothing_twice(tmp_path: Path) -> None:
    """Clients retry every request that got no answer with the same `id` (across the crash and the
    restart) until it is acknowledged: every acknowledged id is in the store exactly once."""
    (tmp_path / "token").write_text(TOKEN)
    port = free_port()
    proc = _start(tmp_path, port)
    acked: list[str] = []
    retried: list[str] = []
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(n: int) -> None:
        s = requests.Session()
        i = 0
        while not stop.is_set():
            fid = f"fb-{n}-{i}"
            body = {"id": fid, "response_id": f"chatcmpl-{n}-{i}", "type": "score", "score": (i % 10) / 10}
            attempts = 0
            while True:  # the same id until acknowledged
                attempts += 1
                try:
                    r = s.post(f"http://127.0.0.1:{port}/v1/feedback", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
                except requests.RequestException:
                    s = requests.Session()
                    time.sleep(0.02)
                    continue  # the sidecar is gone: not acknowledged, may or may not be stored
                if 200 <= r.status_code < 300:
                    with lock:
                        acked.append(fid)
                        if attempts > 1:
                            retried.append(fid)
                    break
                errors.append(f"{r.status_code} {r.text}")
                break
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked) > 300, timeout=60, message="300 acknowledged records before the crash")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    left = [p.name for p in (tmp_path / "spool").glob("*") if p.suffix in (".open", ".jsonl")]
    assert left, "the crash left nothing unshipped: the test would not exercise recovery"
    assert (tmp_path / "spool" / "feedback-ids.0").exists(), "nothing was shipped before the crash: the journal would not be exercised"
    time.sleep(0.3)  # clients keep retrying against the dead port

    # restart: it rebuilds the id index, closes and ships what its predecessor left; clients retry into it
    n_before = len(acked)
    proc2 = _start(tmp_path, port)
    wait_for(lambda: len(acked) > n_before + 200, timeout=60, message="clients acknowledged after the restart")
    stop.set()
    for t in threads:
        t.join(20)
    proc2.send_signal(signal.SIGTERM)
    assert proc2.wait(30) == 0
    assert not errors, errors[:3]
    assert retried, "no request was retried across the crash: the test would not exercise idempotency"

    stored = [r["id"] for r in read_store(tmp_path / "store") if r["kind"] == "feedback"]
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acknowledged feedback records lost, e.g. {sorted(missing)[:5]}"
    dups = sorted({i for i in stored if stored.count(i) > 1}) if len(stored) != len(set(stored)) else []
    assert not dups, f"{len(dups)} feedback ids stored more than once, e.g. {dups[:5]} (retried: {len(retried)})"
    assert not [p for p in (tmp_path / "spool").glob("*") if p.suffix in (".open", ".jsonl")], "spool drained"
    # object names are idempotent and never reused across the restart
    names = [p.name for p in (tmp_path / "store").rglob("*.jsonl")]
    assert len(names) == len(set(names)) and all(n.startswith("demo-pod-1-") for n in names)
    print(f"acknowledged {len(acked)}, retried across the crash {len(retried)}, stored {len(stored)} (no duplicates)")


def test_sigterm_drains_in_flight_requests_then_ships(tmp_path: Path) -> None:
    import asyncio

    from aiohttp import web

    in_flight, released = threading.Event(), threading.Event()

    async def slow_chat(request: web.Request) -> web.Response:
        in_flight.set()
        await asyncio.to_thread(released.wait, 60)  # answers only once the sidecar is shutting down
        return web.json_response({"id": "chatcmpl-slow", "object": "chat.completion", "model": "m",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "done"}, "finish_reason": "stop"}]})

    up = fake_engine(slow_chat)
    (tmp_path / "token").write_text(TOKEN)
    port = free_port()
    args = [sys.executable, "-m", "perennial_server.cli", "--log-level", "WARNING", "sidecar", "--upstream", up.url, "--host", "127.0.0.1",
            "--port", str(port), "--spool-dir", str(tmp_path / "spool"), "--store-uri", str(tmp_path / "store"), "--token-file", str(tmp_path / "token"),
            "--deployment", "demo", "--pod", "p0", "--admin-port", "0"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                    break
            except requests.RequestException:
                assert time.time() < deadline
                time.sleep(0.05)
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(r=requests.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)))
        t.start()
        assert in_flight.wait(30), "the request reached the engine"
        proc.send_signal(signal.SIGTERM)  # while the request is in flight

        def refused() -> bool:
            try:
                requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            except requests.ConnectionError:
                return True
            except requests.Timeout:
                pass
            return False

        wait_for(refused, message="the sidecar stopped accepting connections")  # it is draining
        released.set()
        t.join(30)
        assert result["r"].status_code == 200 and result["r"].json()["id"] == "chatcmpl-slow"
        assert proc.wait(30) == 0
    finally:
        released.set()
        if proc.poll() is None:
            proc.kill()
        up.stop()
    ids = [r["id"] for r in read_store(tmp_path / "store") if r["kind"] == "interaction"]
    assert ids == ["chatcmpl-slow"]


def test_kill_9_loses_only_the_last_moments_of_interactions(tmp_path: Path) -> None:
    """Interactions are captured off the response path (capture.py): kill -9 may lose those answered
    in the last ~70 ms (built every 20 ms, written every 50 ms; the page cache survives kill -9).
    Measured here: every interaction answered 2 s or more before the kill is stored; the loss is printed."""
    from aiohttp import web

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"id": f"chatcmpl-{body['user']}", "object": "chat.completion", "model": "m",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]})

    up = fake_engine(chat)
    (tmp_path / "token").write_text(TOKEN)
    port = free_port()
    proc = _start(tmp_path, port, upstream=up.url)
    answered: list[tuple[str, float]] = []
    stop = threading.Event()

    def client(n: int) -> None:
        s = requests.Session()
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "m", "user": f"{n}-{i}", "messages": [{"role": "user", "content": "hi"}]}, timeout=5)
            except requests.RequestException:
                return
            if r.status_code == 200:
                answered.append((r.json()["id"], time.monotonic()))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: len(answered) > 2000, timeout=120, message="2000 answered interactions")
        killed_at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        stop.set()
        for t in threads:
            t.join(10)
        proc2 = _start(tmp_path, port, upstream=up.url)
        proc2.send_signal(signal.SIGTERM)
        assert proc2.wait(30) == 0
    finally:
        stop.set()
        up.stop()
    stored = {r["id"] for r in read_store(tmp_path / "store") if r["kind"] == "interaction"}
    lost = [(rid, killed_at - at) for rid, at in answered if rid not in stored and at <= killed_at]
    old = [rid for rid, age in lost if age >= 2.0]
    print(f"answered {len(answered)}, lost on kill -9: {len(lost)} ({100 * len(lost) / len(answered):.2f}%), "
          f"oldest lost answered {max((a for _, a in lost), default=0) * 1000:.0f} ms before the kill")
    assert not old, f"{len(old)} interactions answered 2 s or more before the kill were lost, e.g. {old[:3]}"
