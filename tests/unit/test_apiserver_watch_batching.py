"""The control plane's watch streams: events already queued for a watcher go out together (one chunk), in order,
complete, and a stop queued behind them ends the stream after them."""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.parse

import pytest

from perennial.local.apiserver import start_in_thread

NS = "default"


@pytest.fixture
def srv():
    server = start_in_thread()
    yield server
    server.stop()


def _watch(srv) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    url = urllib.parse.urlsplit(srv.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("GET", f"/api/v1/namespaces/{NS}/configmaps?watch=true", headers={"Accept": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def _on_loop(srv, fn) -> None:
    """Run `fn` on the server's event loop, in one callback: nothing else (no watcher) runs meanwhile."""

    async def call() -> None:
        fn()

    asyncio.run_coroutine_threadsafe(call(), srv._loop).result(30)


def _read_events(resp: http.client.HTTPResponse, n: int) -> tuple[list[dict], list[int]]:
    """`n` events, and how many events each chunk of the stream held."""
    events: list[dict] = []
    per_chunk: list[int] = []
    buffer = b""
    while len(events) < n:
        data = resp.read1(1 << 20)  # one chunk of the chunked body (or what is left of it)
        if not data:
            break
        *lines, buffer = (buffer + data).split(b"\n")
        got = [json.loads(line) for line in lines if line.strip()]
        per_chunk.append(len(got))
        events += got
    return events, per_chunk


def test_events_queued_for_a_watcher_go_out_together_in_order(srv):
    conn, resp = _watch(srv)
    try:
        _on_loop(srv, lambda: [srv.store.create(srv.store.lookup("", "v1", "configmaps"), NS, {"metadata": {"name": f"cm-{i}"}})
                               for i in range(50)])
        events, per_chunk = _read_events(resp, 50)
    finally:
        conn.close()
    assert [e["object"]["metadata"]["name"] for e in events] == [f"cm-{i}" for i in range(50)]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and len(set(rvs)) == 50
    assert {e["type"] for e in events} == {"ADDED"}
    # all 50 were queued before the watcher ran: far fewer writes than events (one before: 50 chunks)
    assert len(per_chunk) < 10, per_chunk


def test_a_stop_queued_behind_events_ends_the_stream_after_them(srv):
    conn, resp = _watch(srv)
    try:
        def burst_then_stop() -> None:
            for i in range(5):
                srv.store.create(srv.store.lookup("", "v1", "configmaps"), NS, {"metadata": {"name": f"last-{i}"}})
            for w in srv.store.all_watchers():
                w.push(None)  # what a stopping server queues for every watcher

        _on_loop(srv, burst_then_stop)
        events, _ = _read_events(resp, 6)
        assert resp.read1(1 << 20) == b""  # the stream ended
    finally:
        conn.close()
    assert [e["object"]["metadata"]["name"] for e in events] == [f"last-{i}" for i in range(5)]


def _watchers(srv) -> int:
    return sum(len(ws) for ws in srv.server.store.watchers.values())


def test_a_watch_refused_before_it_streams_leaves_no_watcher_behind(srv):
    """A watch answered with an error (a bad `timeoutSeconds`; an HTTP/1.0 client, which cannot take the chunked
    stream) is answered, and the store keeps no watcher for it (one left behind would be fed every event forever)."""
    url = urllib.parse.urlsplit(srv.url)
    before = _watchers(srv)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("GET", f"/api/v1/namespaces/{NS}/configmaps?watch=true&timeoutSeconds=soon")
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 400 and body["reason"] == "BadRequest" and "timeoutSeconds" in body["message"], body
    conn.close()

    class HTTP10(http.client.HTTPConnection):
        _http_vsn, _http_vsn_str = 10, "HTTP/1.0"

    conn = HTTP10(url.hostname, url.port, timeout=30)
    conn.request("GET", f"/api/v1/namespaces/{NS}/configmaps?watch=true")
    resp = conn.getresponse()
    assert resp.status >= 400, resp.status  # an answer, not silence
    resp.read()
    conn.close()
    assert _watchers(srv) == before
