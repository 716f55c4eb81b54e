"""The sidecar against hostile clients, each attack while a normal client keeps being served.

The sidecar runs as in the pod: `perennial-server sidecar` in its own process, here with a low
file-descriptor limit (hard, so it cannot raise it) and short client timeouts so that the attacks
resolve in seconds. A normal client (fresh connections, like a kubelet probe or a client behind a
pool) calls /healthz, a chat completion and /v1/feedback in a loop during every attack; any failure
of it fails the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import pytest
import requests
from aiohttp import web
from perennial_server.spool import data_end
from srvutil import TOKEN, AppThread, fake_engine, free_port
from waiting import wait_for

AUTH = {"Authorization": f"Bearer {TOKEN}"}
NOFILE = 256  # the sidecar's RLIMIT_NOFILE (soft and hard) in these tests


@pytest.fixture(scope="module")
def upstream() -> Iterator[AppThread]:
    async def chat(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            return web.json_response({"error": {"message": "bad json", "type": "invalid_request_error", "param": None, "code": None}}, status=400)
        model = body.get("model")
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for piece in ("Hel", "lo ", "there"):
                ev = {"id": f"chatcmpl-{model}-{body.get('user', '')}", "object": "chat.completion.chunk", "model": model,
                      "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                await resp.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
                if model == "cut" and piece == "lo ":
                    await asyncio.sleep(0.05)
                    assert request.transport is not None
                    request.transport.abort()  # the engine dies mid-stream
                    return resp
            await resp.write(b"data: [DONE]\n\n")
            return resp
        return web.json_response({"id": f"chatcmpl-{body.get('user', 'x')}", "object": "chat.completion", "model": model,
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]})

    t = fake_engine(chat)
    yield t
    t.stop()


class Sidecar:
    def __init__(self, tmp: Path, upstream: str, *extra: str) -> None:
        (tmp / "token").write_text(TOKEN)
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.spool = tmp / "spool"
        self.log = tmp / "sidecar.log"
        # util-linux prlimit sets RLIMIT_NOFILE (soft and hard) for the sidecar it then executes
        args = ["prlimit", f"--nofile={NOFILE}:{NOFILE}", sys.executable, "-m", "perennial_server.cli", "--log-level", "INFO", "sidecar", "--upstream", upstream,
                "--host", "127.0.0.1", "--port", str(self.port), "--admin-port", str(self.admin_port), "--deployment", "demo", "--pod", "p0",
                "--spool-dir", str(self.spool), "--store-uri", "", "--token-file", str(tmp / "token"),
                "--client-header-timeout-s", "1", "--client-body-timeout-s", "2", "--keepalive-timeout-s", "3", *extra]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PERENNIAL_")}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.time() + 30
        while True:
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert self.proc.poll() is None, self.log.read_text()
            assert time.time() < deadline, "sidecar did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def records(self, kind: str) -> list[dict]:
        out = []
        for p in sorted(self.spool.glob("*-*.*")):
            if p.suffix in (".open", ".jsonl"):
                data = p.read_bytes()  # an open segment ends in preallocated zeros (spool.data_end)
                out += [r for line in data[:data_end(data)].splitlines() if line.strip() and (r := json.loads(line))["kind"] == kind]
        return out


@pytest.fixture
def sidecar(tmp_path: Path, upstream: AppThread) -> Iterator[Sidecar]:
    s = Sidecar(tmp_path, upstream.url)
    yield s
    s.stop()


class NormalClient:
    """/healthz, a chat completion and a feedback record, over and over, each on a fresh connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.refused = 0  # answered 503 at the connection limit (then retried)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _call(self, method: str, path: str, **kw: object) -> requests.Response:
        """One request; a connection refused at the sidecar's connection limit (503 `too_many_connections`, an
        answer with Retry-After, never a silent close) is retried after Retry-After, as a well-behaved client does."""
        for _ in range(10):
            r = requests.request(method, self.url + path, timeout=5, **kw)  # type: ignore[arg-type]
            if r.status_code != 503 or "too_many_connections" not in r.text:
                return r
            self.refused += 1
            time.sleep(float(r.headers["Retry-After"]))
        return r

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                r = self._call("GET", "/healthz")
                assert r.status_code == 200, ("healthz", r.status_code, r.text)
                r = self._call("POST", "/v1/chat/completions", json={"model": "m", "user": f"n{i}", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200, ("chat", r.status_code, r.text)
                r = self._call("POST", "/v1/feedback", json={"id": f"normal-{i}", "response_id": f"chatcmpl-n{i}", "thumbs": "up"}, headers=AUTH)
                assert r.status_code == 200, ("feedback", r.status_code, r.text)
                self.ok += 1
            except (AssertionError, requests.RequestException) as e:
                self.failures.append(repr(e)[:300])
            time.sleep(0.02)

    def __enter__(self) -> Self:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(30)


@contextmanager
def normal_traffic(url: str) -> Iterator[NormalClient]:
    """A normal client runs for the duration of the block; it must never fail and must make progress."""
    with NormalClient(url) as c:
        yield c
        start = c.ok
        wait_for(lambda: c.ok >= start + 2, timeout=30, message="the normal client kept being served")
    assert not c.failures, c.failures[:5]


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _closed_by_peer(s: socket.socket, wait_s: float) -> tuple[bool, bytes]:
    """Read until EOF/reset or `wait_s` passes; (closed by the server, what it sent)."""
    s.settimeout(0.2)
    got = b""
    deadline = time.time() + wait_s
    while time.time() < deadline:
        try:
            b = s.recv(65536)
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True, got
        if not b:
            return True, got
        got += b
    return False, got


def _json_error(raw: bytes, status: int) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"%d" % status and head.startswith(b"HTTP/1."), head[:200]
    assert b"application/json" in head.lower(), head
    return json.loads(body)["error"]


# ---------------------------------------------------------------- malformed input
def test_deeply_nested_json_is_a_json_400_not_a_500(sidecar: Sidecar) -> None:
    deep = b"[" * 100000 + b"]" * 100000
    deep_obj = b'{"response_id": "r", "thumbs": "up", "comment": ' + b"[" * 50000 + b"]" * 50000 + b"}"
    with normal_traffic(sidecar.url):
        for body in (deep, deep_obj):
            r = requests.post(sidecar.url + "/v1/feedback", data=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=10)
            assert r.status_code == 400, (r.status_code, r.text[:300])
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and "Traceback" not in r.text
        # a proxied chat request with a nested body: the engine's answer goes back, the capture drops it quietly
        r = requests.post(sidecar.url + "/v1/chat/completions", data=b'{"model": "m", "x": ' + b"[" * 50000 + b"]" * 50000 + b"}", timeout=10)
        assert r.status_code in (200, 400), r.text[:300]
    log = sidecar.log.read_text()
    assert "RecursionError" not in log and "Traceback" not in log, log[-2000:]


def test_protocol_errors_are_openai_json_and_echo_nothing(sidecar: Sidecar) -> None:
    cases = [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad\x01Header: <script>zz</script>\r\n\r\n",
        b"GARBAGE<script>zz</script> / HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"<script>zz</script>\r\n\r\n",
        b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n<script>zz</script>",
    ]
    with normal_traffic(sidecar.url):
        for raw in cases:
            s = _connect(sidecar.port)
            s.sendall(raw)
            _, got = _closed_by_peer(s, 5)
            s.close()
            assert got, raw[:60]
            err = _json_error(got, int(got.split(b" ", 2)[1]))
            assert set(err) >= {"message", "type", "param", "code"}, err
            assert b"<script>" not in got and b"zz" not in got, got[:400]


# ---------------------------------------------------------------- slow and idle connections
def test_slowloris_headers_are_cut_at_the_header_timeout(sidecar: Sidecar) -> None:
    with normal_traffic(sidecar.url):
        socks = []
        for _ in range(150):
            s = _connect(sidecar.port)
            s.sendall(b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        t0 = time.time()
        # keep trickling a header line every 0.3 s: the header timeout (1 s) counts from the first byte, not between bytes
        open_ = list(socks)
        # without a header timeout every one stays open for as long as it trickles: 30 s is a generous bound for
        # a busy 2-core machine to cut 150 connections whose timeout is 1 s (no timing is asserted beyond it)
        while open_ and time.time() - t0 < 30:
            still = []
            for s in open_:
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                    still.append(s)
                except OSError:
                    s.close()
            open_ = still
            time.sleep(0.3)
            for s in list(open_):
                s.setblocking(False)
                try:
                    if s.recv(65536) == b"":
                        open_.remove(s)
                        s.close()
                except BlockingIOError:
                    pass
                except OSError:
                    open_.remove(s)
                    s.close()
        assert not open_, f"{len(open_)} of 150 slowloris connections still open after {time.time() - t0:.1f} s"


def test_slow_body_is_cut_at_the_body_timeout(sidecar: Sidecar) -> None:
    with normal_traffic(sidecar.url):
        socks = []
        for path in ("/v1/feedback", "/v1/chat/completions") * 20:
            s = _connect(sidecar.port)
            auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
            s.sendall(b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%bContent-Length: 1000\r\n\r\n{" % (path.encode(), auth))
            socks.append(s)
        t0 = time.time()
        for s in socks:
            closed, got = _closed_by_peer(s, max(0.5, 8 - (time.time() - t0)))
            s.close()
            assert closed, "a slow body kept its connection open"
            assert _json_error(got, 408)["code"] == "body_timeout"
        assert time.time() - t0 < 8


def test_idle_connections_cannot_exhaust_file_descriptors(tmp_path: Path, upstream: AppThread) -> None:
    # long header timeout: here only the connection limit (derived from RLIMIT_NOFILE) protects the sidecar
    sc = Sidecar(tmp_path, upstream.url, "--client-header-timeout-s", "600", "--keepalive-timeout-s", "600")
    try:
        socks = []
        with normal_traffic(sc.url):
            for _ in range(300):  # more than the sidecar has file descriptors
                try:
                    socks.append(_connect(sc.port))
                except OSError:
                    pass
            time.sleep(1.5)  # the flood's connections now idle longer than the eviction grace (1 s): they make room
            for _ in range(20):
                assert requests.get(sc.url + "/healthz", timeout=5).status_code == 200
                assert requests.get(sc.admin_url + "/metrics", timeout=5).status_code == 200
        for s in socks:
            s.close()
        log = sc.log.read_text()
        assert "Too many open files" not in log, log[-2000:]
    finally:
        sc.stop()


def test_trickled_head_bytes_never_make_a_slowloris_look_fresher_than_a_waiting_client(tmp_path: Path, upstream: AppThread) -> None:
    """At the connection limit the connection idle the longest makes room. A slowloris trickling header bytes
    must count as idle since its head started: were each trickle to refresh it, a legitimate client whose
    request had not been read yet (a busy server) would be closed without an answer instead."""
    sc = Sidecar(tmp_path, upstream.url, "--client-header-timeout-s", "600", "--keepalive-timeout-s", "600")
    from perennial_server.api_server import ADMIN_MAX_CONNECTIONS
    from perennial_server.connections import auto_max_connections

    # the client port's limit for the test's RLIMIT_NOFILE (what the admin port may hold set aside first)
    limit = auto_max_connections(NOFILE - 2 * ADMIN_MAX_CONNECTIONS)
    try:
        tricklers = []
        for _ in range(limit - 1):
            t = _connect(sc.port)
            t.sendall(b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\n")
            tricklers.append(t)
        waiting = _connect(sc.port)  # the limit is reached; its request is not sent yet
        for _ in range(5):
            time.sleep(0.2)
            for t in tricklers:
                t.sendall(b"X-Slow: 1\r\n")
        newcomer = _connect(sc.port)  # one over the limit: someone must make room
        newcomer.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        closed, got = _closed_by_peer(newcomer, 10)
        assert got.startswith(b"HTTP/1.1 200"), got[:200]
        waiting.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        closed, got = _closed_by_peer(waiting, 10)
        assert got.startswith(b"HTTP/1.1 200"), f"the waiting client was evicted instead of a slowloris: {got[:200]!r}"
        for t in tricklers:
            t.close()
    finally:
        sc.stop()


def test_idle_keepalive_connection_is_closed(sidecar: Sidecar) -> None:
    s = _connect(sidecar.port)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    closed, got = _closed_by_peer(s, 8)
    assert got.startswith(b"HTTP/1.1 200") and closed, got[:200]


# ---------------------------------------------------------------- auth and rate limit
def test_requests_without_a_token_do_not_use_up_a_clients_rate_limit(tmp_path: Path, upstream: AppThread) -> None:
    sc = Sidecar(tmp_path, upstream.url, "--rate-limit-per-second", "5")
    try:
        s = requests.Session()
        for i in range(200):
            r = s.post(sc.url + "/v1/feedback", json={"response_id": "r", "thumbs": "up"}, headers={"Authorization": "Bearer wrong"}, timeout=5)
            assert r.status_code == 401, r.text
        # the valid client from the same address still has its whole burst
        for i in range(5):
            r = requests.post(sc.url + "/v1/feedback", json={"id": f"ok-{i}", "response_id": "r", "thumbs": "up"}, headers=AUTH, timeout=5)
            assert r.status_code == 200, (i, r.text)
    finally:
        sc.stop()


# ---------------------------------------------------------------- clients that go away
def test_client_disconnect_mid_upload_logs_no_error(sidecar: Sidecar) -> None:
    with normal_traffic(sidecar.url):
        for path in ("/v1/feedback", "/v1/chat/completions") * 10:
            s = _connect(sidecar.port)
            s.sendall(b"POST %b HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %b\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"a\": 1"
                      % (path.encode(), TOKEN.encode()))
            time.sleep(0.05)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            s.close()
        time.sleep(0.5)
    log = sidecar.log.read_text()
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]


# ---------------------------------------------------------------- feedback strictness
def test_feedback_is_strict(sidecar: Sidecar) -> None:
    url = sidecar.url + "/v1/feedback"
    good = {"response_id": "chatcmpl-1", "score": 0.5}
    r = requests.post(url, data=json.dumps(good), headers={**AUTH, "Content-Type": "text/plain"}, timeout=5)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    for bad in ("0.5", " 1e3 ", True, [0.5], {"v": 1}, "NaN", 1e7):
        r = requests.post(url, json={**good, "score": bad}, headers=AUTH, timeout=5)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["param"] == "score", r.text
    for bad in (1, True, ["r"]):
        r = requests.post(url, json={**good, "response_id": bad}, headers=AUTH, timeout=5)
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_id", r.text
    r = requests.post(url, json=good, headers=AUTH, timeout=5)
    assert r.status_code == 200, r.text
    stored = sidecar.records("feedback")
    assert [x["score"] for x in stored] == [0.5]


def test_error_param_is_spelled_as_the_client_sent_it(sidecar: Sidecar) -> None:
    url = sidecar.url + "/v1/feedback"
    cases = [
        ({"responseId": "", "thumbs": "up"}, "responseId"),
        ({"response_id": "", "thumbs": "up"}, "response_id"),
        ({"thumbs": "up"}, "response_id"),  # missing: the documented spelling
        ({"responseId": "r", "type": "preference", "otherResponseId": 5, "chosen": "this"}, "otherResponseId"),
        ({"response_id": "r", "type": "preference", "other_response_id": 5, "chosen": "this"}, "other_response_id"),
        ({"response_id": "r", "thumbs": "up", "bogusField": 1}, "bogusField"),
    ]
    for body, param in cases:
        r = requests.post(url, json=body, headers=AUTH, timeout=5)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and f"`{param}`" in err["message"], (body, err)
    r = requests.post(url, json=[{"response_id": "r", "thumbs": "up"}, {"responseId": 3, "thumbs": "up"}], headers=AUTH, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "[1].responseId", r.text


def test_feedback_for_a_response_this_sidecar_did_not_serve_is_flagged(sidecar: Sidecar) -> None:
    url = sidecar.url + "/v1/feedback"
    r = requests.post(sidecar.url + "/v1/chat/completions", json={"model": "m", "user": "seen1", "messages": [{"role": "user", "content": "hi"}]}, timeout=5)
    assert r.status_code == 200 and r.json()["id"] == "chatcmpl-seen1"
    a = requests.post(url, json={"response_id": "chatcmpl-seen1", "thumbs": "up"}, headers=AUTH, timeout=5)
    b = requests.post(url, json={"response_id": "chatcmpl-never-served", "thumbs": "up"}, headers=AUTH, timeout=5)
    assert a.status_code == 200 and a.json()["response_seen"] is True, a.text
    assert b.status_code == 200 and b.json()["response_seen"] is False, b.text
    wait_for(lambda: len(sidecar.records("feedback")) == 2, timeout=10)
    by_resp = {x["responseId"]: x for x in sidecar.records("feedback")}
    assert by_resp["chatcmpl-seen1"]["responseSeen"] is True
    assert by_resp["chatcmpl-never-served"]["responseSeen"] is False


# ---------------------------------------------------------------- idempotency
def test_feedback_id_is_an_idempotency_key(sidecar: Sidecar) -> None:
    url = sidecar.url + "/v1/feedback"
    body = {"id": "fb-same", "response_id": "chatcmpl-1", "thumbs": "up"}
    first = requests.post(url, json=body, headers=AUTH, timeout=5)
    assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers
    again = requests.post(url, json=body, headers=AUTH, timeout=5)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true", again.headers
    assert again.json()["id"] == "fb-same"
    # concurrent retries of one new id: stored once
    results: list[int] = []
    ts = [threading.Thread(target=lambda: results.append(requests.post(url, json={**body, "id": "fb-race"}, headers=AUTH, timeout=10).status_code)) for _ in range(20)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert results == [200] * 20
    # a batch that repeats ids, and one id already stored
    r = requests.post(url, json=[{**body, "id": "fb-b1"}, {**body, "id": "fb-b1"}, {**body, "id": "fb-same"}], headers=AUTH, timeout=5)
    assert r.status_code == 200 and [d["id"] for d in r.json()["data"]] == ["fb-b1", "fb-b1", "fb-same"]
    ids = sorted(x["id"] for x in sidecar.records("feedback"))
    assert ids == ["fb-b1", "fb-race", "fb-same"], ids
    # after a restart the index is rebuilt from disk
    sidecar.stop()
    sc2 = Sidecar(sidecar.spool.parent, _upstream_of(sidecar))
    try:
        r = requests.post(sc2.url + "/v1/feedback", json=body, headers=AUTH, timeout=5)
        assert r.status_code == 200 and r.headers.get("Idempotent-Replayed") == "true", r.headers
        assert sorted(x["id"] for x in sc2.records("feedback")) == ["fb-b1", "fb-race", "fb-same"]
    finally:
        sc2.stop()


def _upstream_of(sc: Sidecar) -> str:
    args = sc.proc.args
    return args[args.index("--upstream") + 1]


# ---------------------------------------------------------------- captures
def test_a_stream_cut_by_the_engine_is_captured(sidecar: Sidecar) -> None:
    r = requests.post(sidecar.url + "/v1/chat/completions", json={"model": "cut", "stream": True, "user": "c1", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert r.status_code == 200
    assert b"upstream_stream_error" in r.content
    wait_for(lambda: any(x["id"] == "chatcmpl-cut-c1" for x in sidecar.records("interaction")), timeout=10, message="the cut stream was captured")
    rec = next(x for x in sidecar.records("interaction") if x["id"] == "chatcmpl-cut-c1")
    assert rec["response"] == "Hello " and rec["finishReason"] == "error", rec


def test_the_engine_answers_deeply_nested_json_with_a_json_400(engine: AppThread) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter"):
        r = requests.post(engine.url + path, data=b"[" * 100000 + b"]" * 100000, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400, (path, r.status_code, r.text[:300])
        assert r.json()["error"]["code"] == "invalid_json" and "Traceback" not in r.text
        r = requests.post(engine.url + path, data=b'{"model": ' + b"[" * 100000 + b"]" * 100000 + b"}", headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400, (path, r.status_code, r.text[:300])
