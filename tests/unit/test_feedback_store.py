"""The operator's reader of the feedback store: incremental scans, the index that survives a restart,
bad segments counted and skipped, exactly-once snapshots, typed errors for an unreachable store."""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractFileSystem
from perennial.feedback.snapshot import Cursor, Snapshot, snapshot_name
from perennial.feedback.store import (
    FeedbackStore,
    SegmentChanged,
    SnapshotConflict,
    StoreUnavailable,
)
from perennial_records import FeedbackRecord, InteractionRecord, segment_name

DEP = "chat"
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(autouse=True)
def _today_is_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stores here see the day NOW was taken on, even when a test runs after midnight (CI collected these at
    23:5x and ran them at 00:1x: the recent and old days moved by one)."""
    import perennial.feedback.store as store_module

    monkeypatch.setattr(store_module, "utcnow", lambda: NOW)


def inter(rid: str, when: dt.datetime) -> str:
    return InteractionRecord(id=rid, deployment=DEP, messages=[{"role": "user", "content": "q " + rid}], response="a", time=when.isoformat()).to_json()


def thumbs(rid: str, when: dt.datetime, up: bool = True) -> str:
    return FeedbackRecord(response_id=rid, type="thumbs", thumbs="up" if up else "down", deployment=DEP, time=when.isoformat()).to_json()


def lines(*recs: str) -> bytes:
    return "".join(r + "\n" for r in recs).encode()


class Reads:
    """Counts reads of segment objects (`.jsonl`) through the store's filesystem class."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    @property
    def n(self) -> int:
        return len(self.paths)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    """Every read of a `.jsonl` object through cat_file or open (read modes), counted once per call."""
    r = Reads()
    depth = [0]
    for cls in (MemoryFileSystem, LocalFileSystem):
        for meth in ("cat_file", "_open"):
            orig = getattr(cls, meth)

            def wrapped(self, path, *a, __orig=orig, __meth=meth, **kw):  # type: ignore[no-untyped-def]
                mode = (a[0] if a else kw.get("mode", "rb")) if __meth == "_open" else "rb"
                if depth[0] == 0 and "r" in mode and str(path).endswith(".jsonl"):
                    r.paths.append(str(path))
                depth[0] += 1
                try:
                    return __orig(self, path, *a, **kw)
                finally:
                    depth[0] -= 1

            monkeypatch.setattr(cls, meth, wrapped)
    return r


@pytest.fixture
def mem() -> str:
    root = f"memory://fbtest-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root[len("memory://"):]):
        fs.rm(root[len("memory://"):], recursive=True)


def put(uri: str, name: str, data: bytes) -> None:
    fs, root = fsspec.core.url_to_fs(uri)
    path = f"{root.rstrip('/')}/{name}"
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def append(uri: str, name: str, data: bytes) -> None:
    fs, root = fsspec.core.url_to_fs(uri)
    path = f"{root.rstrip('/')}/{name}"
    fs.pipe_file(path, fs.cat_file(path) + data)


def make_store(uri: str, days: int, per_day: int, recs: int = 3) -> int:
    """`days` x `per_day` segments of `recs` records (interactions, each rated in the same segment); returns ratings."""
    ratings = 0
    for d in range(days):
        day = NOW - dt.timedelta(days=days - 1 - d)
        for i in range(per_day):
            rs = []
            for k in range(recs):
                rid = f"r{d}-{i}-{k}"
                rs += [inter(rid, day), thumbs(rid, day)]
                ratings += 1
            put(uri, segment_name(DEP, f"pod{i % 3}", d * per_day + i, day), lines(*rs))
    return ratings


# ------------------------------------------------------------------------------ incremental reads


def test_second_tick_reads_only_the_new_segments_of_a_large_store(mem: str, reads: Reads) -> None:
    ratings = make_store(mem, days=10, per_day=300)  # 3000 segments, 18000 records
    store = FeedbackStore(mem)
    first = store.scan(DEP)
    assert first.segments_read == 3000 == reads.n == first.new_segments
    assert first.records_read == 18000
    assert first.pending.ratings == ratings and first.pending.interactions == ratings

    for i in range(5):
        put(mem, segment_name(DEP, "podx", 10_000 + i, NOW), lines(inter(f"n{i}", NOW), thumbs(f"n{i}", NOW)))
    reads.paths.clear()
    second = store.scan(DEP)
    assert second.segments_read == 5 == reads.n
    assert all("podx" in p for p in reads.paths)
    assert second.records_read == 10
    assert second.pending.ratings == ratings + 5
    assert second.segments == 3005
    # and a tick with nothing new reads nothing
    reads.paths.clear()
    third = store.scan(DEP)
    assert reads.n == 0 and third.records_read == 0 and third.pending == second.pending


def test_a_restarted_operator_reads_no_old_segment(mem: str, reads: Reads) -> None:
    ratings = make_store(mem, days=4, per_day=50)
    FeedbackStore(mem).scan(DEP)
    reads.paths.clear()
    again = FeedbackStore(mem).scan(DEP)  # a new process: the index comes from the store
    assert reads.n == 0 and again.segments_read == 0 and again.records_read == 0
    assert again.segments == 200 and again.pending.ratings == ratings
    put(mem, segment_name(DEP, "podx", 99999, NOW), lines(inter("late", NOW), thumbs("late", NOW)))
    third = FeedbackStore(mem).scan(DEP)
    assert reads.n == 1 and third.pending.ratings == ratings + 1


def test_restart_on_a_local_store_lists_only_changed_days_and_reads_nothing_old(tmp_path, reads: Reads) -> None:
    uri = f"file://{tmp_path}/store"
    os.makedirs(f"{tmp_path}/store")
    make_store(uri, days=6, per_day=20)
    FeedbackStore(uri).scan(DEP)
    reads.paths.clear()
    res = FeedbackStore(uri).scan(DEP)
    assert reads.n == 0 and res.records_read == 0
    assert res.days_total == 6 and res.days_listed == 2  # the recent days only: older day dirs kept their mtime
    # a segment shipped late into an old day is still found (its directory's mtime changed)
    old_day = NOW - dt.timedelta(days=5)
    put(uri, segment_name(DEP, "slow", 7, old_day), lines(inter("slow", old_day), thumbs("slow", old_day)))
    res2 = FeedbackStore(uri).scan(DEP)
    assert reads.n == 1 and res2.new_segments == 1 and res2.days_listed == 3


def test_late_segment_in_an_old_day_of_an_object_store_is_found_by_the_full_rescan(mem: str, reads: Reads) -> None:
    make_store(mem, days=5, per_day=2)
    store = FeedbackStore(mem, full_rescan_seconds=3600)
    store.scan(DEP)
    old_day = NOW - dt.timedelta(days=4)
    put(mem, segment_name(DEP, "slow", 7, old_day), lines(inter("slow", old_day), thumbs("slow", old_day)))
    res = store.scan(DEP)
    assert res.new_segments == 0 and res.days_listed == 2  # memory dirs have no mtime: not listed until the rescan
    store.full_rescan_seconds = 0
    res = store.scan(DEP)
    assert res.full_listing and res.new_segments == 1 and res.pending.ratings == 31
    assert res.late_segments == 1  # found where no tick looks (the metric counts these)


def test_index_is_one_file_per_day_however_many_ticks(mem: str) -> None:
    make_store(mem, days=3, per_day=4)
    store = FeedbackStore(mem)
    for i in range(20):
        put(mem, segment_name(DEP, "podt", 500 + i, NOW), lines(inter(f"t{i}", NOW)))
        store.scan(DEP)
    fs, root = fsspec.core.url_to_fs(mem)
    files = fs.ls(f"{root}/{DEP}/_perennial/index", detail=False)
    assert len(files) == 3


def test_a_corrupt_index_file_only_costs_a_reread(mem: str, reads: Reads) -> None:
    make_store(mem, days=2, per_day=5)
    FeedbackStore(mem).scan(DEP)
    fs, root = fsspec.core.url_to_fs(mem)
    idx = sorted(fs.ls(f"{root}/{DEP}/_perennial/index", detail=False))
    fs.pipe_file(idx[0], b"{not json")
    reads.paths.clear()
    res = FeedbackStore(mem).scan(DEP)
    assert reads.n == 5 and res.segments == 10 and res.pending.ratings == 30


# ------------------------------------------------------------------------------ bad segments


def test_torn_corrupt_and_invalid_lines_are_counted_and_skipped(mem: str) -> None:
    good = lines(inter("a", NOW), thumbs("a", NOW))
    bad = (good + b"{not json\n" + b'{"kind":"mystery"}\n' + b'{"kind":"feedback","responseId":"a","type":"thumbs"}\n'
           + b"[1,2]\n" + b"\xff\xfe\n" + b'{"kind":"interaction","id":"b","resp')
    name = segment_name(DEP, "pod", 1, NOW)
    put(mem, name, bad)
    store = FeedbackStore(mem)
    res = store.scan(DEP)
    assert res.skipped == {"InvalidJSON": 2, "UnknownKind": 1, "InvalidRecord": 2, "TornLine": 1}
    assert res.pending.ratings == 1 and res.pending.interactions == 1
    assert res.damaged_segments == 1 and res.damaged_examples == [name]
    # the torn line is completed later (the object grew): only the new bytes are a new part
    append(mem, name, b'onse":"x"}\n')
    res = store.scan(DEP)
    assert res.changed_segments == 1 and res.records_read == 1
    assert res.pending.interactions == 2 and "TornLine" not in res.skipped


def test_a_final_line_without_newline_that_is_a_whole_record_counts(mem: str) -> None:
    put(mem, segment_name(DEP, "pod", 1, NOW), lines(inter("a", NOW)) + thumbs("a", NOW).encode())
    res = FeedbackStore(mem).scan(DEP)
    assert res.pending.ratings == 1 and not res.skipped


def test_a_rewritten_segment_is_reread_as_one_new_part(mem: str) -> None:
    name = segment_name(DEP, "pod", 1, NOW)
    put(mem, name, lines(inter("a", NOW), thumbs("a", NOW)))
    store = FeedbackStore(mem)
    store.scan(DEP)
    put(mem, name, lines(inter("b", NOW), thumbs("b", NOW), thumbs("b", NOW)))
    res = store.scan(DEP)
    assert res.changed_segments == 1 and res.pending.ratings == 2 and res.pending.parts == 1


# ------------------------------------------------------------------------------ pending


def test_pending_reports_the_oldest_rating(mem: str) -> None:
    old = NOW - dt.timedelta(hours=5)
    put(mem, segment_name(DEP, "p", 1, old), lines(inter("a", old), thumbs("a", old + dt.timedelta(minutes=1))))
    put(mem, segment_name(DEP, "p", 2, NOW), lines(inter("b", NOW), thumbs("b", NOW)))
    store = FeedbackStore(mem)
    store.scan(DEP)
    p = store.pending(DEP)
    assert p.ratings == 2
    assert p.oldest_rating == (old + dt.timedelta(minutes=1)).astimezone(dt.UTC)
    assert 5 * 3600 - 120 < p.age_seconds(NOW) < 5 * 3600
    s1 = store.take_snapshot(DEP)
    assert store.pending(DEP).ratings == 0 and store.pending(DEP).oldest_rating is None
    # an older cursor (before snapshot 1) counts snapshot 1's ratings as pending again
    assert store.pending(DEP, Cursor(sequence=1)).ratings == 2
    assert store.pending(DEP, s1.cursor).ratings == 0


# ------------------------------------------------------------------------------ snapshots


def _read_doc(uri: str, deployment: str, name: str) -> bytes:
    fs, root = fsspec.core.url_to_fs(uri)
    return fs.cat_file(f"{root}/{deployment}/_perennial/snapshots/{name}.json")


def test_snapshots_are_exactly_once_and_idempotent(mem: str) -> None:
    ratings = make_store(mem, days=2, per_day=10)
    store = FeedbackStore(mem)
    store.scan(DEP)
    s1 = store.take_snapshot(DEP)
    assert s1 is not None and s1.name == snapshot_name(DEP, 1) and s1.counts.ratings == ratings
    assert s1.cursor.sequence == 2 and s1.cursor.after == s1.name and s1.previous is None
    assert store.pending(DEP).ratings == 0
    assert store.take_snapshot(DEP) is None  # nothing new: no empty snapshot
    before = _read_doc(mem, DEP, s1.name)
    # a retry with the same parts is the same snapshot; the document is untouched
    again = store.write_snapshot(DEP, s1.name, s1.segments)
    assert again.identity() == s1.identity() and _read_doc(mem, DEP, s1.name) == before
    # by segment names too
    assert store.write_snapshot(DEP, s1.name, s1.segment_names()).identity() == s1.identity()
    with pytest.raises(SnapshotConflict):
        store.write_snapshot(DEP, s1.name, s1.segments[:-1])
    # the next snapshot may not take a part of the first again
    put(mem, segment_name(DEP, "new", 1, NOW), lines(inter("n", NOW), thumbs("n", NOW)))
    store.scan(DEP)
    with pytest.raises(SnapshotConflict):
        store.write_snapshot(DEP, snapshot_name(DEP, 2), [s1.segments[0]])
    with pytest.raises(SnapshotConflict):  # and none may skip a sequence number
        store.write_snapshot(DEP, snapshot_name(DEP, 3), store.plan_snapshot(DEP)[1])
    s2 = store.take_snapshot(DEP)
    assert s2 is not None and s2.sequence == 2 and s2.previous == s1.name
    assert [p.name for p in s2.segments] == [segment_name(DEP, "new", 1, NOW)] and s2.counts.ratings == 1
    # every part in exactly one snapshot
    keys1, keys2 = {p.key for p in s1.segments}, {p.key for p in s2.segments}
    assert not keys1 & keys2 and len(keys1) + len(keys2) == 21
    # the document is what the trainer reads
    assert Snapshot.model_validate_json(_read_doc(mem, DEP, s2.name)) == s2


def test_a_crash_after_writing_a_snapshot_is_recovered_by_its_name(mem: str) -> None:
    make_store(mem, days=1, per_day=4)
    a = FeedbackStore(mem)
    a.scan(DEP)
    name, parts = a.plan_snapshot(DEP)
    snap = a.write_snapshot(DEP, name, parts)
    # the operator dies before creating the TrainingRun; the next one finds the snapshot it owes a run
    b = FeedbackStore(mem)
    assert b.latest_snapshot(DEP) == snap
    res = b.scan(DEP)
    assert res.pending.ratings == 0 and res.cursor.sequence == 2
    # a retry of the write (same deterministic name, same parts) from the new process is a no-op
    assert b.write_snapshot(DEP, name, parts).identity() == snap.identity()
    assert b.plan_snapshot(DEP) is None


def test_a_grown_segment_goes_into_the_next_snapshot_with_only_its_new_bytes(mem: str) -> None:
    name = segment_name(DEP, "pod", 1, NOW)
    put(mem, name, lines(inter("a", NOW), thumbs("a", NOW)))
    store = FeedbackStore(mem)
    store.scan(DEP)
    s1 = store.take_snapshot(DEP)
    append(mem, name, lines(thumbs("a", NOW, up=False)))
    res = store.scan(DEP)
    assert res.pending.ratings == 1 and res.pending.interactions == 0
    s2 = store.take_snapshot(DEP)
    assert s2.segments[0].offset == s1.segments[0].length and s2.counts.ratings == 1
    # the rated interaction is in the first snapshot's part: named for the join
    assert [(r.name, r.offset, r.snapshot) for r in s2.join_segments] == [(name, 0, s1.name)]


def test_a_late_rating_names_the_earlier_segment_of_its_interaction(mem: str) -> None:
    t0 = NOW - dt.timedelta(hours=2)
    put(mem, segment_name(DEP, "p1", 1, t0), lines(inter("early", t0), inter("other", t0)))
    put(mem, segment_name(DEP, "p1", 2, t0), lines(inter("unrelated", t0)))
    store = FeedbackStore(mem)
    store.scan(DEP)
    s1 = store.take_snapshot(DEP)
    assert s1.counts.ratings == 0
    put(mem, segment_name(DEP, "p2", 1, NOW), lines(thumbs("early", NOW), thumbs("nowhere", NOW)))
    store.scan(DEP)
    s2 = store.take_snapshot(DEP)
    assert [r.name for r in s2.join_segments] == [segment_name(DEP, "p1", 1, t0)]
    assert s2.join_segments[0].snapshot == s1.name
    assert s2.counts.unmatched_ratings == 1


def test_a_segment_changed_after_the_scan_is_not_snapshotted(mem: str) -> None:
    name = segment_name(DEP, "pod", 1, NOW)
    put(mem, name, lines(inter("a", NOW), thumbs("a", NOW)))
    store = FeedbackStore(mem)
    store.scan(DEP)
    put(mem, name, lines(inter("b", NOW), thumbs("b", NOW)))
    with pytest.raises(SegmentChanged):
        store.take_snapshot(DEP)
    assert store.latest_snapshot(DEP) is None
    store.scan(DEP)
    assert store.take_snapshot(DEP).counts.ratings == 1


def test_snapshot_on_a_local_store_is_create_only(tmp_path) -> None:
    os.makedirs(tmp_path / "store")
    put(str(tmp_path / "store"), segment_name(DEP, "pod", 1, NOW), lines(inter("a", NOW), thumbs("a", NOW)))
    store = FeedbackStore(str(tmp_path / "store"))
    store.scan(DEP)
    s1 = store.take_snapshot(DEP)
    path = tmp_path / "store" / DEP / "_perennial" / "snapshots" / f"{s1.name}.json"
    assert json.loads(path.read_text())["segments"][0]["sha256"] == s1.segments[0].sha256
    # another writer put other content under the next name first: refused, not overwritten
    put(str(tmp_path / "store"), segment_name(DEP, "pod", 2, NOW), lines(thumbs("a", NOW)))
    store.scan(DEP)
    name, parts = store.plan_snapshot(DEP)
    other = s1.model_copy(update={"name": name, "sequence": 2, "previous": s1.name, "segments": s1.segments})
    orig = store._write

    def racing_write(p: str, data: bytes, *, create_only: bool = False) -> None:
        if create_only:  # the other writer wins the race between our listing and our write
            (path.parent / f"{name}.json").write_text(other.to_json())
        orig(p, data, create_only=create_only)

    store._write = racing_write  # type: ignore[method-assign]
    with pytest.raises(SnapshotConflict):
        store.write_snapshot(DEP, name, parts)
    assert Snapshot.model_validate_json((path.parent / f"{name}.json").read_text()) == other
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]


def test_pvc_uri_resolves_under_the_pvc_root(tmp_path) -> None:
    os.makedirs(tmp_path / "feedback-claim" / "store")
    put(str(tmp_path / "feedback-claim" / "store"), segment_name(DEP, "pod", 1, NOW), lines(inter("a", NOW), thumbs("a", NOW)))
    store = FeedbackStore("pvc://feedback-claim/store", pvc_root=str(tmp_path))
    assert store.scan(DEP).pending.ratings == 1
    assert (tmp_path / "feedback-claim" / "store" / DEP / "_perennial" / "index").is_dir()


def test_an_empty_deployment_prefix_is_nothing_pending(mem: str) -> None:
    put(mem, "other/x.txt", b"x")
    res = FeedbackStore(mem).scan(DEP)
    assert res.segments == 0 and res.pending.ratings == 0 and res.cursor.sequence == 1


# ------------------------------------------------------------------------------ unreachable


class FlakyFS(AbstractFileSystem):
    """A store behind a network that is down while `down` is set; a memory store otherwise."""

    protocol = "flakyfb"
    down = True

    def __init__(self, **kw):  # type: ignore[no-untyped-def]
        super().__init__(**kw)
        self.mem = MemoryFileSystem()

    def _check(self) -> None:
        if FlakyFS.down:
            raise ConnectionError("connection refused")

    def ls(self, path, detail=True, **kw):  # type: ignore[no-untyped-def]
        self._check()
        return self.mem.ls("/" + path.lstrip("/"), detail=detail, **kw)

    def cat_file(self, path, start=None, end=None, **kw):  # type: ignore[no-untyped-def]
        self._check()
        return self.mem.cat_file("/" + path.lstrip("/"), start=start, end=end)

    def pipe_file(self, path, value, **kw):  # type: ignore[no-untyped-def]
        self._check()
        return self.mem.pipe_file("/" + path.lstrip("/"), value)

    def _open(self, path, mode="rb", **kw):  # type: ignore[no-untyped-def]
        self._check()
        return self.mem._open("/" + path.lstrip("/"), mode=mode, **kw)


def test_an_unreachable_store_raises_a_typed_error_and_recovers(mem: str) -> None:
    fsspec.register_implementation("flakyfb", FlakyFS, clobber=True)
    bucket = f"b{uuid.uuid4().hex[:8]}"
    put(f"memory://{bucket}", segment_name(DEP, "pod", 1, NOW), lines(inter("a", NOW), thumbs("a", NOW)))
    store = FeedbackStore(f"flakyfb://{bucket}")
    FlakyFS.down = True
    with pytest.raises(StoreUnavailable) as e:
        store.scan(DEP)
    assert e.value.reason == "FeedbackStoreUnavailable" and "connection refused" in str(e.value)
    FlakyFS.down = False
    assert store.scan(DEP).pending.ratings == 1
    FlakyFS.down = True
    with pytest.raises(StoreUnavailable):
        store.take_snapshot(DEP)
    FlakyFS.down = False
    assert store.take_snapshot(DEP).counts.ratings == 1


def test_a_missing_local_store_is_unavailable_not_empty(tmp_path) -> None:
    with pytest.raises(StoreUnavailable, match="mounted"):
        FeedbackStore(str(tmp_path / "not-mounted")).scan(DEP)


async def test_async_wrappers_run_off_the_loop(mem: str) -> None:
    put(mem, segment_name(DEP, "pod", 1, NOW), lines(inter("a", NOW), thumbs("a", NOW)))
    store = FeedbackStore(mem)
    res = await store.scan_async(DEP)
    assert res.pending.ratings == 1
    snap = await store.take_snapshot_async(DEP)
    assert (await store.latest_snapshot_async(DEP)) == snap
    assert (await store.pending_async(DEP)).ratings == 0


def test_a_lost_index_never_makes_a_grown_segment_train_twice(mem: str) -> None:
    name = segment_name(DEP, "pod", 1, NOW)
    put(mem, name, lines(inter("a", NOW), thumbs("a", NOW)))
    store = FeedbackStore(mem)
    store.scan(DEP)
    s1 = store.take_snapshot(DEP)
    append(mem, name, lines(inter("b", NOW), thumbs("b", NOW)))
    fs, root = fsspec.core.url_to_fs(mem)
    fs.rm(f"{root}/{DEP}/_perennial/index", recursive=True)  # the index is only a cache
    res = FeedbackStore(mem).scan(DEP)
    assert res.pending.ratings == 1  # not 2: the first snapshot's bytes stay consumed
    s2 = FeedbackStore(mem).take_snapshot(DEP)
    assert [(p.offset, p.ratings) for p in s2.segments] == [(s1.segments[0].length, 1)]


def test_links_and_oversized_segments_are_never_read(tmp_path, reads: Reads) -> None:
    store_dir = tmp_path / "store"
    seg = store_dir / segment_name(DEP, "pod", 1, NOW)
    seg.parent.mkdir(parents=True)
    seg.write_bytes(lines(inter("a", NOW), thumbs("a", NOW)))
    secret = tmp_path / "secret.jsonl"
    secret.write_bytes(lines(inter("s", NOW), thumbs("s", NOW)))
    os.symlink(secret, seg.parent / "evil-00000001.jsonl")  # a link written by a compromised sidecar
    big = seg.parent / "big-00000001.jsonl"
    big.write_bytes(lines(*[inter(f"b{i}", NOW) for i in range(50)]))
    store = FeedbackStore(str(store_dir), max_segment_bytes=4096)
    res = store.scan(DEP)
    assert reads.paths == [str(seg)]
    assert res.pending.ratings == 1 and res.skipped == {"SegmentTooLarge": 1} and res.damaged_examples == [f"{DEP}/{NOW:%Y/%m/%d}/big-00000001.jsonl"]
    reads.paths.clear()
    assert store.scan(DEP).pending.ratings == 1 and reads.n == 0


def test_shared_store_is_one_object_per_uri(mem: str) -> None:
    from perennial.feedback.store import shared_store

    assert shared_store(mem) is shared_store(mem + "/") is not shared_store(mem, {"skip_instance_cache": True})


def test_a_store_that_goes_away_is_unavailable_and_nothing_is_forgotten(tmp_path, reads: Reads) -> None:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    ratings = make_store(str(store_dir), days=3, per_day=2)
    store = FeedbackStore(str(store_dir), full_rescan_seconds=0)
    store.scan(DEP)
    store_dir.rename(tmp_path / "away")  # the volume is unmounted under the operator
    with pytest.raises(StoreUnavailable):
        store.scan(DEP)
    assert not store_dir.exists()  # nothing written where the store was
    (tmp_path / "away").rename(store_dir)
    reads.paths.clear()
    res = store.scan(DEP)
    assert res.pending.ratings == ratings and reads.n == 0 and res.removed_segments == 0


def test_an_object_store_bucket_that_goes_away_is_unavailable(mem: str) -> None:
    make_store(mem, days=1, per_day=2)
    store = FeedbackStore(mem, full_rescan_seconds=0)
    store.scan(DEP)
    fs, root = fsspec.core.url_to_fs(mem)
    saved = {k: v for k, v in fs.store.items() if k.startswith(root + "/")}
    fs.rm(root, recursive=True)
    with pytest.raises(StoreUnavailable):
        store.scan(DEP)
    for k, v in saved.items():
        fs.store[k] = v
    assert store.scan(DEP).pending.ratings == 6


def test_take_snapshot_by_sequence_is_a_retry_safe_commit_point(mem: str) -> None:
    make_store(mem, days=1, per_day=3)
    store = FeedbackStore(mem)
    store.scan(DEP)
    s1 = store.take_snapshot(DEP, sequence=1)
    assert s1 is not None and s1.sequence == 1
    put(mem, segment_name(DEP, "new", 1, NOW), lines(inter("n", NOW), thumbs("n", NOW)))
    store.scan(DEP)
    # a controller that crashed after writing 1 asks for 1 again: the same document, nothing new taken
    assert FeedbackStore(mem).take_snapshot(DEP, sequence=1) == s1
    assert store.get_snapshot(DEP, 1) == s1 and store.get_snapshot(DEP, 2) is None
    with pytest.raises(SnapshotConflict):
        store.take_snapshot(DEP, sequence=3)
    assert store.take_snapshot(DEP, sequence=2).counts.ratings == 1


def test_ratings_of_responses_that_never_existed_cost_a_bounded_search(mem: str, reads: Reads) -> None:
    t0 = NOW - dt.timedelta(hours=1)
    for i in range(40):
        put(mem, segment_name(DEP, "p", i, t0), lines(*[inter(f"x{i}-{k}", t0) for k in range(20)]))
    later = NOW + dt.timedelta(hours=2)  # interactions after every rating are never searched
    put(mem, segment_name(DEP, "future", 1, NOW), lines(inter("f", later)))
    store = FeedbackStore(mem)
    store.scan(DEP)
    store.take_snapshot(DEP)
    put(mem, segment_name(DEP, "spam", 1, NOW), lines(*[thumbs(f"nope{k}", NOW) for k in range(100)]))
    store.scan(DEP)
    size = len(lines(*[inter(f"x39-{k}", t0) for k in range(20)]))
    store.join_budget_bytes = 5 * size
    reads.paths.clear()
    s2 = store.take_snapshot(DEP)
    assert s2.counts.unmatched_ratings == 100 and not s2.join_segments
    searched = [p for p in reads.paths if "spam" not in p]
    assert len(searched) == 5 and not [p for p in searched if "future" in p]


def test_old_consumed_days_leave_memory_and_still_count(tmp_path, reads: Reads) -> None:
    uri = str(tmp_path / "store")
    os.makedirs(uri)
    ratings = make_store(uri, days=30, per_day=3)
    old_day = NOW - dt.timedelta(days=25)
    put(uri, segment_name(DEP, "only", 1, old_day), lines(inter("old-unrated", old_day)))
    store = FeedbackStore(uri, keep_days=8)
    first = store.scan(DEP)
    assert first.segments_in_memory == first.segments == 91  # nothing in a snapshot yet: all of it pending
    s1 = store.take_snapshot(DEP, lookback_seconds=40 * 86400)
    res = store.scan(DEP)
    assert res.segments == 91 and res.segments_in_memory == 3 * 9  # the last 9 days (today and 8 before)
    assert res.pending.ratings == 0
    # a rating of a 25-day-old interaction, an evicted day: found through its day's index file
    put(uri, segment_name(DEP, "late", 1, NOW), lines(thumbs("old-unrated", NOW)))
    store.scan(DEP)
    reads.paths.clear()
    s2 = store.take_snapshot(DEP, lookback_seconds=40 * 86400)
    assert [r.name for r in s2.join_segments] == [segment_name(DEP, "only", 1, old_day)] and s2.counts.unmatched_ratings == 0
    assert s2.join_segments[0].snapshot == s1.name
    # a segment shipped late into an evicted (sealed) day: no tick looks there; the next full rescan finds it, counts
    # it as late, and reads none of the day's old segments again
    put(uri, segment_name(DEP, "slow", 9, old_day), lines(inter("slow", old_day), thumbs("slow", old_day)))
    reads.paths.clear()
    res = store.scan(DEP)
    assert reads.n == 0 and res.new_segments == 0 and res.pending.ratings == 0 and not res.full_listing
    store.full_rescan_seconds = 0
    res = store.scan(DEP)
    store.full_rescan_seconds = 3600
    assert reads.n == 1 and res.new_segments == 1 and res.pending.ratings == 1 and res.segments == 93
    assert res.full_listing and res.late_segments == 1
    s3 = store.take_snapshot(DEP)
    assert [p.name for p in s3.segments] == [segment_name(DEP, "slow", 9, old_day)]
    # a restarted operator holds the same, reading no segment
    reads.paths.clear()
    again = FeedbackStore(uri, keep_days=8).scan(DEP)
    assert reads.n == 0 and again.segments == 93 and again.pending.ratings == 0 and again.segments_in_memory == 3 * 9 + 1
    assert FeedbackStore(uri).pending(DEP, Cursor(sequence=1)).ratings == ratings + 2


def test_an_evicted_day_whose_index_file_is_lost_is_read_again_without_double_counting(tmp_path) -> None:
    uri = str(tmp_path / "store")
    os.makedirs(uri)
    old_day = NOW - dt.timedelta(days=20)
    name = segment_name(DEP, "p", 1, old_day)
    put(uri, name, lines(inter("a", old_day), thumbs("a", old_day)) + b"{torn")
    put(uri, segment_name(DEP, "p", 3, NOW), lines(inter("c", NOW)))
    store = FeedbackStore(uri, keep_days=8)
    store.scan(DEP)
    store.take_snapshot(DEP)
    res = store.scan(DEP)
    assert res.segments_in_memory == 1 and res.segments == 2 and res.skipped == {"TornLine": 1}
    os.unlink(tmp_path / "store" / DEP / "_perennial" / "index" / f"{old_day:%Y-%m-%d}.json")
    put(uri, segment_name(DEP, "p", 2, old_day), lines(inter("b", old_day), thumbs("b", old_day)))
    store.full_rescan_seconds = 0  # a sealed day: only a full rescan looks at it
    res = store.scan(DEP)
    assert res.segments == 3 and res.skipped == {"TornLine": 1} and res.damaged_segments == 1
    assert res.pending.ratings == 1  # only the new segment: the first stays in its snapshot


class CachingMemFS(MemoryFileSystem):
    """Lists like s3fs and gcsfs do by default: from a listings cache that only `invalidate_cache` empties."""

    protocol = "cachingmem"
    root_marker = "/"

    def __init__(self, *a, **kw):  # type: ignore[no-untyped-def]
        super().__init__(*a, **kw)
        self.listings: dict = {}

    @classmethod
    def _strip_protocol(cls, path):  # type: ignore[no-untyped-def]
        path = path.removeprefix("cachingmem://")
        return MemoryFileSystem._strip_protocol(path)

    def ls(self, path, detail=True, **kw):  # type: ignore[no-untyped-def]
        key = (self._strip_protocol(path).rstrip("/"), detail)
        if key not in self.listings:
            self.listings[key] = super().ls(path, detail=detail, **kw)
        return self.listings[key]

    def invalidate_cache(self, path=None):  # type: ignore[no-untyped-def]
        self.listings.clear()


def test_listings_caches_of_object_store_filesystems_are_bypassed(mem: str) -> None:
    fsspec.register_implementation("cachingmem", CachingMemFS, clobber=True)
    root = mem[len("memory://"):]
    uri = f"cachingmem://{root}"
    put(mem, segment_name(DEP, "p", 1, NOW), lines(inter("a", NOW), thumbs("a", NOW)))
    store = FeedbackStore(uri)
    assert store.scan(DEP).pending.ratings == 1
    put(mem, segment_name(DEP, "p", 2, NOW), lines(inter("b", NOW), thumbs("b", NOW)))
    assert store.scan(DEP).pending.ratings == 2


def test_a_snapshot_takes_its_counts_from_the_index_not_the_caller(mem: str) -> None:
    put(mem, segment_name(DEP, "p", 1, NOW), lines(inter("a", NOW), thumbs("a", NOW)))
    store = FeedbackStore(mem)
    store.scan(DEP)
    name, parts = store.plan_snapshot(DEP)
    forged = [parts[0].model_copy(update={"ratings": 1000})]
    assert store.write_snapshot(DEP, name, forged).counts.ratings == 1
    with pytest.raises(SegmentChanged):
        store.write_snapshot(DEP, snapshot_name(DEP, 2), [parts[0].model_copy(update={"offset": 5})])


def _index_reads(uri: str, fn) -> list[str]:  # type: ignore[no-untyped-def]
    """Paths of the index files read (cat_file) while fn() runs."""
    seen: list[str] = []
    fs, _ = fsspec.core.url_to_fs(uri)
    cls = type(fs)
    orig = cls.cat_file

    def counting(self, path, *a, **kw):  # type: ignore[no-untyped-def]
        if "/_perennial/index/" in str(path):
            seen.append(str(path))
        return orig(self, path, *a, **kw)

    cls.cat_file = counting  # type: ignore[method-assign]
    try:
        fn()
    finally:
        cls.cat_file = orig  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_restarts_and_full_rescans_never_read_the_index_of_old_consumed_days(kind: str, tmp_path, mem: str, reads: Reads) -> None:
    uri = str(tmp_path / "store") if kind == "local" else mem
    if kind == "local":
        os.makedirs(uri)
    ratings = make_store(uri, days=40, per_day=2)
    store = FeedbackStore(uri, keep_days=8, full_rescan_seconds=0)  # every tick is a full listing
    store.scan(DEP)
    store.take_snapshot(DEP)
    before = store.scan(DEP)
    assert before.segments_in_memory == 2 * 9
    # a full rescan of an unchanged history reads no index file
    assert _index_reads(uri, lambda: store.scan(DEP)) == []
    # a restarted operator reads the index files of the days it holds, not of the 31 evicted ones
    restarted = FeedbackStore(uri, keep_days=8, full_rescan_seconds=0)
    reads.paths.clear()
    got = _index_reads(uri, lambda: restarted.scan(DEP))
    res = restarted.scan(DEP)
    assert len(got) <= 9 and reads.n == 0
    assert (res.segments, res.segments_in_memory, res.pending.ratings) == (80, 18, 0)
    assert FeedbackStore(uri).pending(DEP, Cursor(sequence=1)).ratings == ratings
    # a late segment in an evicted day: that day's index file only, its other segment not read again
    old_day = NOW - dt.timedelta(days=30)
    put(uri, segment_name(DEP, "slow", 5, old_day), lines(inter("slow", old_day), thumbs("slow", old_day)))
    reads.paths.clear()
    got = _index_reads(uri, lambda: restarted.scan(DEP))
    assert got == [f"{restarted.root}/{DEP}/_perennial/index/{old_day:%Y-%m-%d}.json"] and reads.n == 1
    res = restarted.scan(DEP)
    assert (res.segments, res.pending.ratings) == (81, 1)


# ------------------------------------------------------------------------------ live approval per adapter


def served(rid: str, when: dt.datetime, adapter: str | None) -> str:
    return InteractionRecord(id=rid, deployment=DEP, adapter=adapter, messages=[{"role": "user", "content": "q"}],
                             response="a", time=when.isoformat()).to_json()


def test_approval_per_adapter_joins_thumbs_across_segments_and_ticks(mem: str) -> None:
    t = NOW - dt.timedelta(hours=1)
    put(mem, segment_name(DEP, "p1", 1, t), lines(served("a1", t, "v1"), served("a2", t, "v1"), served("b1", t, "v2"),
                                                 served("base", t, None), thumbs("a1", t)))
    # ratings from another pod: one arrives before its interaction's segment is in the store
    put(mem, segment_name(DEP, "p2", 1, NOW), lines(thumbs("a2", NOW, up=False), thumbs("b1", NOW), thumbs("base", NOW),
                                                   thumbs("c1", NOW, up=False),
                                                   FeedbackRecord(response_id="a1", type="score", score=0.1, time=NOW.isoformat()).to_json()))
    store = FeedbackStore(mem)
    store.scan(DEP)
    got = store.approval(DEP)
    assert {k: (v.up, v.total) for k, v in got.items()} == {"v1": (1, 2), "v2": (1, 1), "": (1, 1)}
    put(mem, segment_name(DEP, "p3", 1, NOW), lines(served("c1", NOW, "v2"), served("c2", NOW, "v2"), thumbs("c2", NOW)))
    store.scan(DEP)  # the waiting rating of c1 meets its interaction; c2 joins in the same segment
    got = store.approval(DEP)
    assert (got["v2"].up, got["v2"].total) == (2, 3) and got["v2"].rate == pytest.approx(2 / 3)
    store.scan(DEP)
    assert store.approval(DEP) == got  # nothing counted twice


def test_approval_after_a_restart_reads_only_the_window(mem: str, reads: Reads) -> None:
    old = NOW - dt.timedelta(days=20)
    put(mem, segment_name(DEP, "old", 1, old), lines(served("o", old, "v1"), thumbs("o", old, up=False)))
    put(mem, segment_name(DEP, "new", 1, NOW), lines(served("n", NOW, "v1"), thumbs("n", NOW)))
    FeedbackStore(mem).scan(DEP)
    store = FeedbackStore(mem)
    store.scan(DEP)
    reads.paths.clear()
    got = store.approval(DEP, window_seconds=3 * 86400)
    assert {k: (v.up, v.total) for k, v in got.items()} == {"v1": (1, 1)}
    assert reads.n == 1 and "new" in reads.paths[0]


# ------------------------------------------------------------------------------ tick cost against the store's history


class CountingFS:
    """Stands in for a FeedbackStore's fsspec filesystem and counts the calls the store makes on it, by method
    (`invalidate_cache`, which touches no storage, is not counted)."""

    FREE = frozenset({"invalidate_cache"})

    def __init__(self, fs: AbstractFileSystem) -> None:
        self._fs = fs
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        attr = getattr(self._fs, name)
        if not callable(attr) or name in self.FREE:
            return attr

        def counted(*a, **kw):  # type: ignore[no-untyped-def]
            self.calls.append((name, str(a[0]) if a else ""))
            return attr(*a, **kw)

        return counted

    def count(self, fn) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
        self.calls.clear()
        fn()
        return list(self.calls)


def _counted(store: FeedbackStore) -> CountingFS:
    store.fs = CountingFS(store.fs)  # type: ignore[assignment]
    return store.fs  # type: ignore[return-value]


def _tick_calls(uri: str, days: int) -> dict[str, list[tuple[str, str]]]:
    """fs calls of an idle tick and of a restarted operator's first and second ticks, on a store of `days` past days
    (2 segments a day) that one snapshot consumed, after one new segment today."""
    make_store(uri, days=days, per_day=2)
    store = FeedbackStore(uri, keep_days=8)
    store.scan(DEP)
    store.take_snapshot(DEP, lookback_seconds=0)
    store.scan(DEP)
    put(uri, segment_name(DEP, "new", 1, NOW), lines(inter("new", NOW), thumbs("new", NOW)))
    assert store.scan(DEP).pending.ratings == 1
    fs = _counted(store)
    idle = fs.count(lambda: store.scan(DEP))
    restarted = FeedbackStore(uri, keep_days=8)
    rfs = _counted(restarted)
    holder: dict = {}
    restart = rfs.count(lambda: holder.setdefault("res", restarted.scan(DEP)))
    res = holder["res"]
    assert (res.segments, res.pending.ratings, res.records_read) == (2 * days + 1, 1, 0)
    idle_after_restart = rfs.count(lambda: restarted.scan(DEP))
    return {"idle": idle, "restart": restart, "idle after restart": idle_after_restart}


def _shape(calls: list[tuple[str, str]]) -> list[str]:
    return sorted(name for name, _ in calls)


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_idle_and_restart_ticks_make_as_many_store_calls_whatever_the_number_of_past_days(kind: str, tmp_path, mem: str) -> None:
    """A store of 20 past days and one of 90 (three months more of history, every old day consumed): an idle tick and
    a restarted operator's ticks make the same calls (no listing of old days, months or years; no index file of an
    old day read)."""
    got = {}
    for days in (20, 90):
        if kind == "local":
            uri = str(tmp_path / f"store-{days}")
            os.makedirs(uri)
        else:
            uri = f"{mem}-{days}"
        got[days] = _tick_calls(uri, days)
    for tick in ("idle", "restart", "idle after restart"):
        small, large = _shape(got[20][tick]), _shape(got[90][tick])
        assert small == large, f"{tick} tick: 20 past days {len(small)} calls, 90 past days {len(large)} calls: {got[90][tick]}"
        # bounded by what is held in memory (keep_days=8: an index file read on restart and a stat per tick each)
        assert len(large) <= 32, got[90][tick]


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_an_operator_down_for_days_lists_the_days_it_missed_without_a_full_rescan(kind: str, tmp_path, mem: str,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import perennial.feedback.store as store_module

    uri = str(tmp_path / "store") if kind == "local" else mem
    if kind == "local":
        os.makedirs(uri)
    make_store(uri, days=3, per_day=1)
    store = FeedbackStore(uri, full_rescan_seconds=30 * 86400)
    assert store.scan(DEP).full_listing
    # the operator is down for 4 days; segments are shipped on each of them; then it starts again
    for d in range(1, 5):
        day = NOW + dt.timedelta(days=d)
        put(uri, segment_name(DEP, "gap", d, day), lines(inter(f"g{d}", day), thumbs(f"g{d}", day)))
    monkeypatch.setattr(store_module, "utcnow", lambda: NOW + dt.timedelta(days=4))
    res = FeedbackStore(uri, full_rescan_seconds=30 * 86400).scan(DEP)
    assert not res.full_listing and res.new_segments == 4 and res.pending.ratings == 9 + 4
    # and the next restart's window starts where this tick's began: an older day is listed only when its directory
    # says it changed (local), else by the next full rescan
    put(uri, segment_name(DEP, "gap", 9, NOW + dt.timedelta(days=1)), lines(inter("x", NOW), thumbs("x", NOW)))
    res = FeedbackStore(uri, full_rescan_seconds=30 * 86400).scan(DEP)
    assert not res.full_listing
    assert (res.new_segments, res.days_listed) == ((1, 3) if kind == "local" else (0, 2))


def test_a_restart_reads_no_snapshot_of_sealed_days_until_one_is_needed(mem: str) -> None:
    """One snapshot a day for 30 days: a restart loads the snapshots that hold parts of the days it keeps in memory,
    not the 28 of sealed days; asking for what they hold loads them, and exactly-once still holds."""
    ratings = 0
    store = FeedbackStore(mem, full_rescan_seconds=0)  # the history is written here in one go: every day listed
    for d in range(30):
        day = NOW - dt.timedelta(days=29 - d)
        put(mem, segment_name(DEP, "p", d, day), lines(inter(f"a{d}", day), thumbs(f"a{d}", day)))
        ratings += 1
        store.scan(DEP)
        assert store.take_snapshot(DEP).sequence == d + 1
    store.full_rescan_seconds = 3600
    store.scan(DEP)
    restarted = FeedbackStore(mem)
    fs = _counted(restarted)
    holder: dict = {}
    calls = fs.count(lambda: holder.setdefault("res", restarted.scan(DEP)))
    read = sorted(path.rsplit("/", 1)[-1] for name, path in calls if name == "cat_file" and "/snapshots/" in path)
    # 29 and 30 hold parts of yesterday and today; 31: the look for a new one (by name, not a listing)
    assert read == [f"{snapshot_name(DEP, n)}.json" for n in (29, 30, 31)]
    res = holder["res"]
    assert res.pending.ratings == 0 and res.cursor.sequence == 31 and res.cursor.after == snapshot_name(DEP, 30)
    # an idle tick does not list the 30 snapshot documents: it looks for the next one by name
    idle = fs.count(lambda: restarted.scan(DEP))
    assert [c for c in idle if "/snapshots" in c[1]] == [("cat_file", f"{restarted.root}/{DEP}/_perennial/snapshots/{snapshot_name(DEP, 31)}.json")]
    # what the sealed snapshots hold is still known when asked for
    assert restarted.get_snapshot(DEP, 3).counts.ratings == 1
    assert restarted.pending(DEP, Cursor(sequence=1)).ratings == ratings
    again = FeedbackStore(mem)
    again.scan(DEP)
    first = FeedbackStore(mem).get_snapshot(DEP, 1)
    with pytest.raises(SnapshotConflict):  # a part of a sealed day is in a snapshot: never taken twice
        again.write_snapshot(DEP, snapshot_name(DEP, 31), first.segments)
    assert [s.sequence for s in FeedbackStore(mem).snapshots(DEP)] == list(range(1, 31))
    # a late segment unseals its day: its old part stays consumed, only the new one is pending
    old = NOW - dt.timedelta(days=20)
    put(mem, segment_name(DEP, "late", 1, old), lines(inter("late", old), thumbs("late", old)))
    late = FeedbackStore(mem, full_rescan_seconds=0)
    res = late.scan(DEP)
    assert res.late_segments == 1 and res.pending.ratings == 1
    assert [p.name for p in late.take_snapshot(DEP).segments] == [segment_name(DEP, "late", 1, old)]


def test_a_sealed_day_whose_directory_goes_and_comes_back_is_not_pending_again(tmp_path) -> None:
    """Exactly-once across sealing: a restarted operator does not load the snapshots of sealed days. A sealed day's
    directory missing from one full rescan (moved away, a restore from backup) is dropped from the index; when it is
    back, its segments must be matched against the snapshots that hold them, not counted as new ratings to train on."""
    uri = str(tmp_path / "store")
    os.makedirs(uri)
    store = FeedbackStore(uri, full_rescan_seconds=0)
    for d in range(10):
        day = NOW - dt.timedelta(days=9 - d)
        put(uri, segment_name(DEP, "p", d, day), lines(inter(f"a{d}", day), thumbs(f"a{d}", day)))
        store.scan(DEP)
        store.take_snapshot(DEP)
    assert store.scan(DEP).pending.ratings == 0
    restarted = FeedbackStore(uri, full_rescan_seconds=0)  # every tick a full rescan
    assert restarted.scan(DEP).pending.ratings == 0
    old = tmp_path / "store" / DEP / f"{NOW - dt.timedelta(days=5):%Y/%m/%d}"
    os.rename(old, f"{old}.away")
    assert restarted.scan(DEP).pending.ratings == 0
    os.rename(f"{old}.away", old)
    res = restarted.scan(DEP)
    assert res.segments == 10 and res.pending.ratings == 0
    assert FeedbackStore(uri).scan(DEP).pending.ratings == 0
    assert restarted.take_snapshot(DEP) is None  # nothing to take twice
