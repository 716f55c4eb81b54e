"""/v1/feedback auth, validation and limits; proxy error mapping; fuzzing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import requests
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from perennial_server.spool import data_end
from srvutil import TOKEN, fake_engine, free_port, read_store

AUTH = {"Authorization": f"Bearer {TOKEN}"}
GOOD = {"response_id": "chatcmpl-1", "type": "thumbs", "thumbs": "up"}


def _err(r: requests.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert set(e) >= {"message", "type", "code"} and e["message"]
    return e


@pytest.fixture
def fake_upstream():
    """A fast OpenAI-like upstream with a slow route and an id-less SSE route."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("model") == "slow":
            await asyncio.sleep(2)
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for piece in ("Hel", "lo ", "jane@example.com"):
                ev = {"object": "chat.completion.chunk", "model": body.get("model"), "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                if body.get("model") != "noid":
                    ev["id"] = "chatcmpl-up1"
                await resp.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        out = {"object": "chat.completion", "model": body.get("model"), "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}
        if body.get("model") != "noid":
            out["id"] = "chatcmpl-up2"
        return web.json_response(out)

    t = fake_engine(chat)
    yield t
    t.stop()


def test_feedback_requires_the_token(fake_upstream, sidecar_factory, tmp_path: Path) -> None:
    t, sc, cfg = sidecar_factory(fake_upstream.url)
    sc.token.check_interval_s = 0.0  # the token file is looked at on every request: no sleeping past the interval
    url = t.url + "/v1/feedback"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer "},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Bearer {TOKEN[:-1]}"}):
        r = requests.post(url, json=GOOD, headers=headers)
        assert _err(r, 401)["type"] == "authentication_error"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert requests.post(url, json=GOOD, headers=AUTH).status_code == 200

    # the mounted Secret changes: the new token works, the old one stops working
    Path(cfg.token_file).write_text("rotated-token-value-which-is-longer\n")
    assert requests.post(url, json=GOOD, headers=AUTH).status_code == 401
    assert requests.post(url, json=GOOD, headers={"Authorization": "Bearer rotated-token-value-which-is-longer"}).status_code == 200
    # no token file: everything refused
    Path(cfg.token_file).unlink()
    assert requests.post(url, json=GOOD, headers={"Authorization": "Bearer rotated-token-value-which-is-longer"}).status_code == 401


def test_feedback_validation_errors(fake_upstream, sidecar_factory) -> None:
    t, _, _ = sidecar_factory(fake_upstream.url, max_body_bytes=2048)
    url = t.url + "/v1/feedback"
    assert _err(requests.post(url, data=b"{not json", headers=AUTH), 400)["code"] == "invalid_json"
    assert _err(requests.post(url, json=[1, 2], headers=AUTH), 400)["code"] == "invalid_json"
    assert _err(requests.post(url, json={**GOOD, "bogus": 1}, headers=AUTH), 400)["param"] == "bogus"
    e = _err(requests.post(url, json={"response_id": "x", "type": "score"}, headers=AUTH), 400)
    assert "`score`" in e["message"]
    assert _err(requests.post(url, json={"response_id": "x", "type": "thumbs", "thumbs": "sideways"}, headers=AUTH), 400)["code"] == "invalid_feedback"
    assert _err(requests.post(url, json={"response_id": "", "thumbs": "up"}, headers=AUTH), 400)["code"] == "invalid_feedback"
    assert _err(requests.post(url, data=b'{"response_id": "x", "score": NaN}', headers=AUTH), 400)["param"] == "score"
    assert _err(requests.post(url, json={"response_id": "x", "type": "preference", "chosen": "this"}, headers=AUTH), 400)["code"] == "invalid_feedback"
    assert _err(requests.post(url, json={"response_id": "x"}, headers=AUTH), 400)["code"] == "missing_type"
    assert _err(requests.post(url, json={**GOOD, "comment": "x" * 4000}, headers=AUTH), 413)["code"] == "body_too_large"
    assert _err(requests.get(url, headers=AUTH), 405)["code"] == "method_not_allowed"


def _spooled(spool_dir: str) -> list[dict]:
    """Every record on the sidecar's local disk (open and closed segments)."""
    out = []
    for p in sorted(Path(spool_dir).glob("*-*.*")):
        if p.suffix in (".open", ".jsonl"):
            data = p.read_bytes()  # an open segment ends in preallocated zeros (spool.data_end)
            out += [json.loads(line) for line in data[:data_end(data)].splitlines() if line.strip()]
    return out


def test_feedback_batch_is_stored_all_or_none(fake_upstream, sidecar_factory) -> None:
    t, _, cfg = sidecar_factory(fake_upstream.url, feedback_batch_max=5, store_uri="")
    url = t.url + "/v1/feedback"
    batch = [{"id": "fb-a", "response_id": "chatcmpl-1", "thumbs": "up"},
             {"id": "fb-b", "response_id": "chatcmpl-2", "score": 0.25},
             {"id": "fb-c", "response_id": "chatcmpl-3", "correction": "mail me at jane@example.com"}]
    r = requests.post(url, json=batch, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and [d["id"] for d in body["data"]] == ["fb-a", "fb-b", "fb-c"]
    assert [d["type"] for d in body["data"]] == ["thumbs", "score", "correction"]
    stored = {rec["id"]: rec for rec in _spooled(cfg.spool_dir)}  # answered 200: already on disk
    assert set(stored) == {"fb-a", "fb-b", "fb-c"}
    assert "jane@example.com" not in stored["fb-c"]["correction"]

    # one bad object: a 400 naming it, and none of the batch is stored
    bad = [{"id": "fb-d", "response_id": "chatcmpl-4", "thumbs": "up"}, {"id": "fb-e", "response_id": "chatcmpl-5", "type": "score", "score": True}]
    e = _err(requests.post(url, json=bad, headers=AUTH), 400)
    assert e["param"] == "[1].score" and e["message"].startswith("feedback[1]: ")
    e = _err(requests.post(url, json=[GOOD, {**GOOD, "nope": 1}], headers=AUTH), 400)
    assert e["param"] == "[1].nope" and e["code"] == "unknown_field"
    assert _err(requests.post(url, json=[], headers=AUTH), 400)["code"] == "invalid_batch_size"
    assert _err(requests.post(url, json=[GOOD] * 6, headers=AUTH), 400)["code"] == "invalid_batch_size"
    assert {rec["id"] for rec in _spooled(cfg.spool_dir)} == {"fb-a", "fb-b", "fb-c"}


def test_feedback_rate_limit(fake_upstream, sidecar_factory) -> None:
    # a bucket of one request, refilled at 0.01/s: after the first request every one within the
    # next 100 s is limited, however slow the machine
    t, _, cfg = sidecar_factory(fake_upstream.url, rate_limit_per_second=0.01, store_uri="")
    s = requests.Session()
    url = t.url + "/v1/feedback"
    assert s.post(url, json={**GOOD, "id": "fb-first"}, headers=AUTH).status_code == 200
    for i in range(3):
        r = s.post(url, json={**GOOD, "id": f"fb-limited-{i}"}, headers=AUTH)
        e = _err(r, 429)
        assert r.headers["Content-Type"].startswith("application/json")
        assert e["type"] == "rate_limit_error" and e["code"] == "rate_limit_exceeded", e
        # whole seconds until the next token (at most the 100 s a token takes), never 0
        assert 1 <= int(r.headers["Retry-After"]) <= 100, r.headers["Retry-After"]
    # the token is checked first: a request without one is a 401 and uses no client's budget
    # (tests/server/test_hostile_clients.py), and nothing is stored
    r = s.post(url, json=GOOD)
    assert _err(r, 401)["code"] == "invalid_api_key"
    assert [rec["id"] for rec in _spooled(cfg.spool_dir)] == ["fb-first"]


def test_proxy_errors_and_ids(fake_upstream, sidecar_factory) -> None:
    t, sc, cfg = sidecar_factory(fake_upstream.url, upstream_timeout_s=0.5, max_body_bytes=4096)
    url = t.url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    # engine ids are kept
    r = requests.post(url, json={"model": "m", "messages": msgs})
    assert r.json()["id"] == "chatcmpl-up2" == r.headers["X-Request-Id"]
    # an engine without ids gets ours, in the body, in every chunk and in the header
    r = requests.post(url, json={"model": "noid", "messages": msgs})
    assert r.json()["id"] == r.headers["X-Request-Id"] and r.json()["id"].startswith("chatcmpl-")
    r = requests.post(url, json={"model": "noid", "messages": msgs, "stream": True}, stream=True)
    rid = r.headers["X-Request-Id"]
    events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
    assert len(events) == 3 and {e["id"] for e in events} == {rid}
    # a slow engine is a 504, a dead one a 502, a huge body a 413
    assert _err(requests.post(url, json={"model": "slow", "messages": msgs}), 504)["code"] == "upstream_timeout"
    assert _err(requests.post(url, json={"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}), 413)["code"] == "body_too_large"
    dead, _, _ = sidecar_factory(f"http://127.0.0.1:{free_port()}")
    assert _err(requests.post(dead.url + "/v1/chat/completions", json={"model": "m", "messages": msgs}), 502)["code"] == "upstream_unavailable"
    assert _err(requests.get(dead.url + "/readyz"), 503)["code"] == "engine_not_ready"
    assert requests.get(dead.url + "/healthz").status_code == 200
    assert requests.get(t.url + "/readyz").status_code == 200
    # captured (with redaction) although the engine gave no ids
    t.stop()
    recs = [r for r in read_store(Path(cfg.store_uri)) if r["kind"] == "interaction"]
    streamed = [r for r in recs if r["id"] == rid]
    assert streamed and streamed[0]["response"] == "Hello [REDACTED:email]" and streamed[0]["stream"] is True


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FEEDBACK_KEYS = ["response_id", "responseId", "type", "score", "thumbs", "label", "correction", "other_response_id", "chosen", "comment", "user", "id"]
feedback_bodies = st.one_of(
    st.dictionaries(st.sampled_from(FEEDBACK_KEYS), json_values | st.sampled_from(["up", "down", "this", "other", "score", "thumbs", "preference", "x", 0.5]), max_size=6),
    st.dictionaries(st.text(max_size=10), json_values, max_size=4),
    json_values,
)
CHAT_KEYS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "stop", "stream", "n", "seed", "stream_options", "max_completion_tokens"]
proxy_values = json_values | st.sampled_from(["tiny-base", "fruit-a", "fruit-b", True, 0, 1, 3, -1, 1e308, 2**70, "\ud800"]) | st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bogus"]), "content": json_values}), max_size=3)
proxy_bodies = st.one_of(st.dictionaries(st.sampled_from(CHAT_KEYS), proxy_values, max_size=8), json_values)
raw_bodies = st.binary(max_size=200)


@pytest.mark.filterwarnings("ignore")
def test_fuzz_never_5xx(engine, sidecar_factory) -> None:
    t, _, _ = sidecar_factory(engine.url, rate_limit_per_second=100000, max_body_bytes=4096)
    s = requests.Session()

    def check(r: requests.Response) -> None:
        assert r.status_code < 500, (r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert "error" in r.json()

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=feedback_bodies, raw=raw_bodies, auth=st.booleans())
    def fuzz_feedback(body, raw, auth) -> None:
        h = AUTH if auth else {}
        check(s.post(t.url + "/v1/feedback", data=json.dumps(body, allow_nan=True), headers={**h, "Content-Type": "application/json"}))
        check(s.post(t.url + "/v1/feedback", data=raw, headers=h))

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=proxy_bodies, raw=raw_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    def fuzz_proxy(body, raw, path) -> None:
        if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
            body["max_tokens"] = 8  # keep generation short; validity is what is fuzzed
        body_bytes = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
        r = s.post(t.url + path, data=body_bytes, headers={"Content-Type": "application/json"})
        check(r) if r.headers.get("Content-Type", "").startswith("application/json") else None
        assert r.status_code < 500, r.text[:300]
        check(s.post(t.url + path, data=raw))

    fuzz_feedback()
    fuzz_proxy()


def test_feedback_metrics_count_every_answer(fake_upstream, sidecar_factory) -> None:
    """Stored one-record requests are counted per group commit: by the time a client has its 200,
    /metrics counts it (requests by code, records by type), and only records that were stored."""
    from concurrent.futures import ThreadPoolExecutor

    t, _, _ = sidecar_factory(fake_upstream.url)
    url = t.url + "/v1/feedback"

    def post(i: int) -> int:
        body = {"response_id": f"chatcmpl-{i}", "score": 0.5} if i % 3 == 0 else dict(GOOD)
        return requests.post(url, json=body, headers=AUTH, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(post, range(30))) == {200}
    assert requests.post(url, json={**GOOD, "id": "fb-m"}, headers=AUTH, timeout=30).status_code == 200
    assert requests.post(url, json={**GOOD, "id": "fb-m"}, headers=AUTH, timeout=30).headers["Idempotent-Replayed"] == "true"
    assert requests.post(url, json=[GOOD, GOOD], headers=AUTH, timeout=30).status_code == 200
    assert requests.post(url, json=GOOD, timeout=30).status_code == 401
    assert requests.post(url, json={"response_id": "x"}, headers=AUTH, timeout=30).status_code == 400
    text = requests.get(t.admin_url + "/metrics", timeout=30).text

    def value(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))

    assert value('perennial_sidecar_requests_total{code="200",route="/v1/feedback"}') == 33
    assert value('perennial_sidecar_requests_total{code="401",route="/v1/feedback"}') == 1
    assert value('perennial_sidecar_requests_total{code="400",route="/v1/feedback"}') == 1
    assert value('perennial_sidecar_captured_records_total{kind="feedback"}') == 33
    assert value('perennial_sidecar_feedback_total{type="score"}') == 10
    assert value('perennial_sidecar_feedback_total{type="thumbs"}') == 23


def test_feedback_without_the_router_answers_as_with_it(fake_upstream, sidecar_factory) -> None:
    """An exact `POST /v1/feedback` skips the router (api_server.Sidecar._around); whatever the
    router would do differently still happens: `Expect: 100-continue` is answered, a query string,
    another method and a trailing slash take their routes, and a middleware added to the app sees
    every request (the shortcut is off then)."""
    import http.client

    t, _, cfg = sidecar_factory(fake_upstream.url, store_uri="")
    url = t.url + "/v1/feedback"
    host, port = t.url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({**GOOD, "id": "fb-expect"}).encode()
    conn.putrequest("POST", "/v1/feedback")
    for k, v in {**AUTH, "Content-Type": "application/json", "Content-Length": str(len(body)), "Expect": "100-continue"}.items():
        conn.putheader(k, v)
    conn.endheaders()
    conn.sock.settimeout(30)
    assert conn.sock.recv(64).startswith(b"HTTP/1.1 100 Continue")  # the router's expect handler answered before the body
    conn.send(body)
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["id"] == "fb-expect"
    conn.close()
    assert requests.post(url + "?x=1", json={**GOOD, "id": "fb-query"}, headers=AUTH).status_code == 200
    assert _err(requests.put(url, json=GOOD, headers=AUTH), 405)["code"] == "method_not_allowed"
    assert {rec["id"] for rec in _spooled(cfg.spool_dir)} == {"fb-expect", "fb-query"}

    seen: list[str] = []

    @web.middleware
    async def watch(request: web.Request, handler):
        seen.append(request.path)
        return await handler(request)

    t2, _, _ = sidecar_factory(fake_upstream.url, app_hook=lambda app: app.middlewares.append(watch), store_uri="")
    assert requests.post(t2.url + "/v1/feedback", json=GOOD, headers=AUTH).status_code == 200
    assert seen == ["/v1/feedback"]


def test_bodies_larger_than_the_read_buffer_pause_and_resume_reading(fake_upstream, sidecar_factory) -> None:
    """A body that arrives faster than the handler reads it, past aiohttp's read buffer (its high-water
    mark: 512 KiB), pauses reading until the handler has read it down (connections.GuardedRequestHandler.
    resume_reading resumes only a paused connection): it is read whole, for feedback and for the proxy, and
    the connection serves the next request."""
    import socket

    from perennial_server import connections

    paused = []
    pause = connections.GuardedRequestHandler.pause_reading

    def watch(self):
        paused.append(True)
        pause(self)

    t, _, cfg = sidecar_factory(fake_upstream.url, store_uri="", max_body_bytes=8 << 20)
    host, port = t.url.split("//")[1].split(":")
    body = b"[" + json.dumps({**GOOD, "id": "fb-big"}).encode() + b" " * (6 << 20) + b"]"
    head = (f"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    small = json.dumps({**GOOD, "id": "fb-after"}).encode()
    head2 = (f"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
             f"Content-Length: {len(small)}\r\n\r\n").encode()
    connections.GuardedRequestHandler.pause_reading = watch
    try:
        with socket.create_connection((host, int(port)), timeout=60) as s:
            # pipelined behind a request the engine takes 2 s to answer: meanwhile the big body is read into its
            # buffer with no handler reading it yet
            slow = json.dumps({"model": "slow", "messages": [{"role": "user", "content": "hi"}]}).encode()
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(slow)}\r\n\r\n".encode()
                      + slow)
            s.sendall(head + body + head2 + small)
            got = b""
            while got.count(b"HTTP/1.1 200") < 3:
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk
    finally:
        connections.GuardedRequestHandler.pause_reading = pause
    assert paused, "the body never filled the read buffer: nothing tested"
    assert b"fb-big" in got and b"fb-after" in got
    assert {rec["id"] for rec in _spooled(cfg.spool_dir) if rec["kind"] == "feedback"} == {"fb-big", "fb-after"}
    r = requests.post(t.url + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x" * (900 << 10)}]}, timeout=60)
    assert r.status_code == 200, r.text
