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
