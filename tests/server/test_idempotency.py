"""The feedback-id index (idempotency.py): a window of the last `max_ids` ids, oldest dropped first."""

from __future__ import annotations

from pathlib import Path

from perennial_server.idempotency import FeedbackIds


def test_a_full_index_forgets_the_oldest_ids_first(tmp_path: Path) -> None:
    ids = FeedbackIds(tmp_path, max_ids=3)
    for i in range(5):
        ids.add(f"fb-{i}")
    assert len(ids) == 3
    assert [f"fb-{i}" in ids for i in range(5)] == [False, False, True, True, True]
    ids.add("fb-2")  # re-adding a known id neither grows the index nor drops another
    assert len(ids) == 3 and "fb-3" in ids and "fb-4" in ids


def test_the_window_survives_a_restart_from_journal_and_spool(tmp_path: Path) -> None:
    ids = FeedbackIds(tmp_path, max_ids=4)
    ids.journal(["fb-a", "fb-b"])  # shipped (their segment left the spool)
    (tmp_path / "00000001-20260101.jsonl").write_bytes(b'{"kind":"feedback","id":"fb-c"}\n{"kind":"interaction","id":"x"}\n')
    again = FeedbackIds(tmp_path, max_ids=4)
    assert again.load() == 3
    assert all(f in again for f in ("fb-a", "fb-b", "fb-c")) and "x" not in again


def test_seen_responses_forget_the_oldest_first() -> None:
    from perennial_server.capture import SeenResponses

    seen = SeenResponses(max_ids=3)
    for rid in ("a", "b", "c", "d", "e"):
        seen.add(rid)
    assert [r in seen for r in ("a", "b", "c", "d", "e")] == [False, False, True, True, True]


async def test_a_cancelled_retry_neither_fails_nor_duplicates_the_request_it_waits_for(tmp_path: Path) -> None:
    """A retry that waits for another request storing the same id, then is cancelled (its client
    gone, the server draining), must leave that request alone: it is stored once and answered."""
    import asyncio
    import json
    import time

    from perennial_server.api_server import Sidecar
    from perennial_server.config import SidecarConfig
    from perennial_server.protocol import parse_feedback
    from perennial_server.spool import closed_segments

    sc = Sidecar(SidecarConfig(spool_dir=str(tmp_path / "spool"), upstream="http://127.0.0.1:1", deployment="demo", namespace="ns"))
    await sc.spool.start()
    real = sc.spool._write_batch

    def slow(data: bytes, sync: bool, keys: list[bytes] | None = None):  # the first request's fsync takes a while
        time.sleep(0.3)
        return real(data, sync, keys)

    sc.spool._write_batch = slow  # type: ignore[method-assign]
    handler = sc.feedback.__self__
    for copies in (1, 2):  # one item (store_one); an array holding the id twice (the batch path)
        fid = f"fb-same-{copies}"
        parsed = parse_feedback(json.dumps({"id": fid, "response_id": "r1", "thumbs": "up"}).encode(), 10)
        assert isinstance(parsed, tuple), parsed
        items = parsed[0] * copies
        first = asyncio.create_task(handler.store(items))
        await asyncio.sleep(0.05)
        retry = asyncio.create_task(handler.store(items))
        await asyncio.sleep(0.05)
        retry.cancel()
        answers, replayed = await asyncio.wait_for(first, timeout=30)
        assert not replayed and answers[0]["id"] == fid
        assert fid in sc.feedback_ids and fid not in sc.feedback_ids.inflight
    await sc.spool.close()
    stored = [json.loads(x)["id"] for s in closed_segments(tmp_path / "spool") for x in s.path.read_text().splitlines()]
    assert len(stored) == len(set(stored)) == 2


def test_the_ids_of_a_segment_are_read_as_the_records_hold_them(tmp_path: Path) -> None:
    """The shipper journals a segment's feedback ids with a regex pass, not a JSON parse per line:
    the same ids (escapes, non-ASCII, quotes), interactions never taken for feedback (even one that
    holds a `"kind":"feedback"` of its own), a torn last line skipped; other layouts parsed."""
    import json

    from perennial_records import FeedbackRecord, InteractionRecord
    from perennial_server.idempotency import feedback_ids

    fids = ["fb-plain", 'fb-"quoted"\\back', "fb-ünï-\u2028-\U0001f600", "fb-\x01ctl"]
    lines = [FeedbackRecord(id=f, response_id="r", type="thumbs", thumbs="up").to_json().encode() for f in fids]
    lines.insert(1, InteractionRecord(id="chatcmpl-1", params={"meta": {"kind": "feedback", "id": "not-feedback"}}).to_json().encode())
    data = b"\n".join(lines) + b"\n"
    assert feedback_ids(data) == fids
    assert feedback_ids(data + lines[0][:60]) == fids  # torn last line
    reordered = json.dumps({"id": "fb-other-layout", "kind": "feedback", "responseId": "r"}, separators=(",", ":")).encode()
    assert feedback_ids(data + reordered + b"\n") == [*fids, "fb-other-layout"]
    ids = FeedbackIds(tmp_path, max_ids=100)
    ids.journal_segment(data)
    again = FeedbackIds(tmp_path, max_ids=100)
    assert again.load() == len(fids) and all(f in again for f in fids) and "chatcmpl-1" not in again


def test_shipped_ids_are_journaled_from_the_spools_keys_and_replayed_after_a_restart(sidecar_factory, tmp_path: Path,
                                                                                      monkeypatch) -> None:
    """The shipper journals the ids the handlers handed the spool with each record, without reading the segment
    again: every path's ids (one record with and without an id, an array, a one-item array) reach the journal,
    and a retry after a restart is a replay."""
    import json
    import time

    import perennial_server.idempotency as idem
    import requests

    from srvutil import TOKEN

    def no_scan(data: bytes) -> list[bytes]:
        raise AssertionError("a segment this process wrote was read again for its ids")

    monkeypatch.setattr(idem, "_raw_feedback_ids", no_scan)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    t, sc, cfg = sidecar_factory("http://127.0.0.1:1")
    url = t.url + "/v1/feedback"
    good = {"response_id": "chatcmpl-1", "type": "thumbs", "thumbs": "up"}
    answers = [requests.post(url, json={**good, "id": "fb-one"}, headers=auth), requests.post(url, json=good, headers=auth),
               requests.post(url, json=[{**good, "id": "fb-b1"}, {**good, "id": "fb-b2"}], headers=auth),
               requests.post(url, json=[{**good, "id": "fb-single"}], headers=auth)]
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    expected = {"fb-one", answers[1].json()["id"], "fb-b1", "fb-b2", "fb-single"}

    def journaled() -> list[str]:
        out = []
        for name in idem.JOURNAL:
            p = Path(cfg.spool_dir) / name
            if p.exists():
                out += [json.loads(line) for line in p.read_text().splitlines()]
        return out

    deadline = time.monotonic() + 30
    while set(journaled()) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(journaled()) == sorted(expected), "each id journaled once"
    t.stop()
    monkeypatch.undo()
    t2, _, _ = sidecar_factory("http://127.0.0.1:1", spool_dir=cfg.spool_dir)
    for fid in sorted(expected):
        r = requests.post(t2.url + "/v1/feedback", json={**good, "id": fid}, headers=auth)
        assert r.status_code == 200 and r.headers.get("Idempotent-Replayed") == "true", (fid, r.status_code, r.headers)
