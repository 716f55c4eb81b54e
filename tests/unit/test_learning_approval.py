"""Live approval per adapter for the automatic rollback, read from the snapshots of a real feedback store on disk:
thumbs joined to the interaction (and so the adapter) they rate, in the snapshot or its join segments, over a window
of the last snapshots, each snapshot read once."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from perennial.controllers import learning as ln
from perennial.feedback.store import FeedbackStore
from perennial_records import FeedbackRecord, InteractionRecord, segment_name

DEP = "chat"


class Writer:
    def __init__(self, root: Path):
        self.root = root
        self.seq = 0

    def segment(self, *records: str) -> None:
        self.seq += 1
        now = dt.datetime.now(dt.UTC)
        path = self.root / segment_name(DEP, "pod", self.seq, now)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(r + "\n" for r in records))


def inter(rid: str, adapter: str | None) -> str:
    return InteractionRecord(id=rid, deployment=DEP, adapter=adapter, messages=[{"role": "user", "content": "q"}], response="a").to_json()


def thumbs(rid: str, up: bool) -> str:
    return FeedbackRecord(response_id=rid, type="thumbs", thumbs="up" if up else "down", deployment=DEP).to_json()


def test_approval_per_adapter_over_the_last_snapshots(tmp_path: Path, monkeypatch):
    w = Writer(tmp_path)
    uri = f"file://{tmp_path}"
    store = FeedbackStore(uri)
    source = ln.StoreSource(approval_snapshots=2)
    monkeypatch.setattr(source, "_store", lambda _uri: store)

    # snapshot 1: v1 served, 3 of 4 up; a score rating is no thumbs
    w.segment(*(inter(f"a{i}", "fam-v1") for i in range(4)), *(thumbs(f"a{i}", i < 3) for i in range(4)),
              FeedbackRecord(response_id="a0", type="score", score=0.1, deployment=DEP).to_json())
    assert source.read(uri, "default", DEP).approval == {}  # no snapshot yet
    assert source.write_snapshot(uri, "default", DEP, 1).seq == 1
    view = source.read(uri, "default", DEP)
    assert view.approval == {"fam-v1": ln.Approval(3, 4)}

    # snapshot 2: v2 answers; one rating arrives late for an interaction snapshot 1 holds (joined through joinSegments);
    # the base model (no adapter) is counted under ""
    w.segment(inter("b0", "fam-v2"), inter("b1", "fam-v2"), inter("c0", None), thumbs("b0", False), thumbs("b1", False), thumbs("c0", True))
    w.segment(inter("late-unrated", "fam-v1"))
    w.segment(thumbs("a3", True), thumbs("nobody", True))  # a0..a3 are in snapshot 1's segment; "nobody" matches nothing
    source.read(uri, "default", DEP)
    assert source.write_snapshot(uri, "default", DEP, 2).seq == 2
    view = source.read(uri, "default", DEP)
    assert view.approval == {"fam-v1": ln.Approval(4, 5), "fam-v2": ln.Approval(0, 2), ln.BASE_MODEL: ln.Approval(1, 1)}

    # snapshot 3: the window (2 snapshots) drops snapshot 1; tallies are read once and forgotten out of the window
    w.segment(inter("d0", "fam-v2"), thumbs("d0", True))
    source.read(uri, "default", DEP)
    source.write_snapshot(uri, "default", DEP, 3)
    reads = []
    real = store._read_range
    monkeypatch.setattr(store, "_read_range", lambda p: reads.append(p.name) or real(p))
    view = source.read(uri, "default", DEP)
    assert view.approval == {"fam-v1": ln.Approval(1, 1), "fam-v2": ln.Approval(1, 3), ln.BASE_MODEL: ln.Approval(1, 1)}
    assert len(reads) == 1  # snapshot 3's one part, once; snapshot 2's tally is kept
    reads.clear()
    assert source.read(uri, "default", DEP).approval == view.approval
    assert reads == []  # a tick without a new snapshot reads no record
    # a restarted operator (a new source) reads the window, never the snapshots before it
    fresh = ln.StoreSource(approval_snapshots=2)
    monkeypatch.setattr(fresh, "_store", lambda _uri: store)
    assert fresh.read(uri, "default", DEP).approval == view.approval
    window = [p.name for seq in (2, 3) for doc in [store.get_snapshot(DEP, seq)] for p in list(doc.segments) + list(doc.join_segments)]
    assert sorted(reads) == sorted(window)  # snapshot 1's parts are outside the window: not read
