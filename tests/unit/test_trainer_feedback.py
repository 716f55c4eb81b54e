"""Feedback-store records -> SFT / DPO / GRPO rows (continuous learning, trainer side), without torch:
joins across segments, duplicates, the latest rating, drop counts per reason, minimums, snapshots."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from perennial.api import FeedbackRecord, InteractionRecord
from perennial_trainer.errors import TrainerError
from perennial_trainer.feedback import (
    DEFAULT_MIN_EXAMPLES,
    Segment,
    build_rows,
    load_feedback,
)

T0 = "2026-11-29T10:00:00+00:00"


def chat(q: str, history: list[dict] | None = None) -> list[dict]:
    return (history or []) + [{"role": "user", "content": q}]


def inter(rid: str, q: str = "colour of banana?", response: str = "<answer>yellow</answer>", time: str = T0, **kw) -> InteractionRecord:
    if "prompt" not in kw and "messages" not in kw:
        kw["messages"] = chat(q)
    return InteractionRecord(id=rid, response=response, time=time, **kw)


def fb(rid: str, time: str = "2026-11-29T11:00:00+00:00", **kw) -> FeedbackRecord:
    if "type" not in kw:
        kw.setdefault("thumbs", "up")
        kw["type"] = "thumbs"
    return FeedbackRecord(response_id=rid, time=time, **kw)


def seg(name: str, *records, join_only: bool = False, extra_lines: list[str] | None = None) -> Segment:
    lines = [r.to_json() if hasattr(r, "to_json") else r for r in records] + (extra_lines or [])
    return Segment(name=name, data=("\n".join(lines) + "\n").encode(), join_only=join_only)


def texts(rows, key="completion"):
    out = []
    for r in rows:
        v = r[key]
        out.append(v[0]["content"] if isinstance(v, list) else v)
    return out


# ------------------------------------------------------------------------------------------ joins


def test_cross_segment_join_with_the_rating_shipped_first_from_another_pod_and_region():
    # the rating was made (and shipped) before its interaction's segment: another pod, another region
    a = seg("dep/2026/11/29/pod-b-00000001.jsonl", fb("r1", time="2026-11-29T09:00:00+00:00", deployment="dep"))
    b = seg("dep/2026/11/29/pod-a-00000007.jsonl", inter("r1", region="eu", deployment="dep", time="2026-11-29T09:00:05+00:00"))
    for order in ([a, b], [b, a]):
        out = build_rows(order, "SFT")
        assert texts(out.rows) == ["<answer>yellow</answer>"]
        assert out.dropped == {}
        assert out.counts["interactions"] == 1 and out.counts["feedback"] == 1 and out.counts["rows"] == 1


def test_rating_for_a_response_that_does_not_exist_is_dropped_and_counted():
    out = build_rows([seg("s1", inter("r1"), fb("r1"), fb("nope"), fb("nope2", type="correction", correction="x"))], "SFT")
    assert len(out.rows) == 1
    assert out.dropped == {"interactionMissing": 2}


def test_a_forged_huge_score_is_not_a_top_rating():
    # in the schema's bounds but outside [0, 1]: dropped, not clamped to 1 (the old code made it a thumbs-up)
    out = build_rows([seg("s1", inter("r1"), fb("r1", type="score", score=1e6),
                          extra_lines=['{"kind":"feedback","responseId":"r1","type":"score","score":1e300}'])], "SFT", min_rating=0.5)
    assert out.rows == []
    assert out.dropped == {"scoreOutOfRange": 1, "unparsable": 1, "unrated": 1}


def test_duplicate_feedback_ids_count_once_and_the_latest_rating_wins():
    up = fb("r1", id="fb-1", time="2026-11-29T11:00:00+00:00")
    retry = fb("r1", id="fb-1", time="2026-11-29T11:00:01+00:00")  # a retried request, stored twice (two pods)
    down = fb("r1", id="fb-2", time="2026-11-29T12:00:00+00:00", thumbs="down")
    out = build_rows([seg("s1", inter("r1"), up), seg("s2", retry, down)], "SFT")
    assert out.rows == []  # the user changed their mind: the later thumbs down wins
    assert out.dropped == {"duplicate": 1, "superseded": 1, "belowThreshold": 2}
    # the same records in another order of segments: the same result (time decides, not file order)
    again = build_rows([seg("s2", down, retry), seg("s1", up, inter("r1"))], "SFT")
    assert again.rows == [] and again.dropped == out.dropped
    flipped = build_rows([seg("s1", inter("r1"), fb("r1", id="a", thumbs="down", time="2026-11-29T11:00:00+00:00"),
                               fb("r1", id="b", time="2026-11-29T11:30:00+00:00"))], "SFT")
    assert texts(flipped.rows) == ["<answer>yellow</answer>"]


def test_duplicate_interactions_count_once():
    out = build_rows([seg("s1", inter("r1"), fb("r1")), seg("s1-copy", inter("r1"))], "SFT")
    assert len(out.rows) == 1 and out.dropped == {"duplicate": 1}


def test_unparsable_lines_redacted_empty_and_other_deployments_are_counted():
    out = build_rows([seg("s1", inter("r1"), fb("r1"),
                          inter("r2", response=""), fb("r2"),                     # empty
                          inter("r4", response="[REDACTED:email] [REDACTED:phone]."), fb("r4"),  # redacted to nothing
                          inter("r3", deployment="other"), fb("r3"),            # another Deployment's record
                          extra_lines=["not json", '{"kind": "interaction"}', '[1,2]'])], "SFT", deployment="dep")
    assert texts(out.rows) == ["<answer>yellow</answer>"]
    assert out.dropped == {"unparsable": 3, "empty": 4, "otherDeployment": 1, "interactionMissing": 1}
    kept = build_rows([seg("s1", inter("r1", response="mail [REDACTED:email] today"), fb("r1"))], "SFT")
    assert texts(kept.rows) == ["mail [REDACTED:email] today"]  # partly redacted text is still an answer


# ------------------------------------------------------------------------------------------ methods


def _mixed():
    return seg("s1",
               inter("r1", response="<answer>yellow</answer>"),
               inter("r2", response="<answer>blue</answer>"),
               inter("r3", q="colour of lime?", response="<answer>red</answer>"),
               inter("r4", prompt="plain prompt", response="meh"),
               inter("r5", prompt="plain prompt", response="better"),
               inter("r6", q="colour of kiwi?", response="<answer>green</answer>"),
               inter("r7", q="what next?", messages=chat("and a plum?", [{"role": "system", "content": "be brief"},
                                                                          {"role": "user", "content": "colour of lime?"},
                                                                          {"role": "assistant", "content": "<answer>green</answer>"}]),
                     response="<answer>purple</answer>"),
               fb("r1", type="thumbs", thumbs="up"),
               fb("r2", type="score", score=0.1, time="2026-11-29T11:05:00+00:00"),
               fb("r3", type="correction", correction="<answer>green</answer>"),
               fb("r4", type="preference", other_response_id="r5", chosen="other"),
               fb("r6", type="label", label="nice"),
               fb("r7", type="score", score=0.9))


def test_sft_rows_rated_high_and_corrections_multi_turn_kept_as_chat():
    out = build_rows([_mixed()], "SFT")
    assert sorted(texts(out.rows)) == ["<answer>green</answer>", "<answer>purple</answer>", "<answer>yellow</answer>"]
    multi = [r for r in out.rows if texts([r]) == ["<answer>purple</answer>"]][0]
    assert [m["role"] for m in multi["prompt"]] == ["system", "user", "assistant", "user"]  # the whole conversation
    assert all(isinstance(r["prompt"], list) for r in out.rows)
    assert out.dropped == {"belowThreshold": 2, "notForMethod": 3, "unusableType": 1, "unrated": 1}
    # a lower threshold takes the 0.1 answer too
    assert len(build_rows([_mixed()], "SFT", min_rating=0.05).rows) == 4


def test_dpo_rows_corrections_preferences_and_differently_rated_answers():
    out = build_rows([_mixed()], "DPO")
    pairs = {(texts([r], "chosen")[0], texts([r], "rejected")[0]) for r in out.rows}
    assert pairs == {("<answer>green</answer>", "<answer>red</answer>"),   # correction vs original
                     ("<answer>yellow</answer>", "<answer>blue</answer>"),  # differently rated, same prompt
                     ("better", "meh")}                                     # explicit preference
    plain = [r for r in out.rows if r["prompt"] == "plain prompt"][0]
    assert plain["chosen"] == "better" and plain["rejected"] == "meh"
    assert out.dropped == {"unusableType": 1, "unrated": 1, "unpaired": 2}  # r6's label; r6; r7 and its score


def test_dpo_preference_between_different_prompts_or_identical_texts_is_dropped():
    out = build_rows([seg("s1", inter("a", q="q1", response="x"), inter("b", q="q2", response="y"),
                          inter("c", q="q1", response="same"), inter("d", q="q1", response="same"),
                          fb("a", type="preference", other_response_id="b", chosen="this"),
                          fb("c", type="preference", other_response_id="d", chosen="this"))], "DPO")
    assert out.rows == []
    assert out.dropped == {"promptMismatch": 3, "identical": 3}


def test_dpo_rated_pairs_of_one_prompt_grow_linearly_not_quadratically():
    # 60 rated answers to one prompt (a popular question, or a flood): each answer is in at most one pair
    recs = []
    for i in range(60):
        recs += [inter(f"r{i}", response=f"answer {i}"), fb(f"r{i}", type="score", score=(i % 2) * 1.0)]
    out = build_rows([seg("s1", *recs)], "DPO")
    assert len(out.rows) == 30 and out.dropped == {}
    assert all(int(texts([r], "chosen")[0].split()[1]) % 2 == 1 and int(texts([r], "rejected")[0].split()[1]) % 2 == 0 for r in out.rows)


def test_grpo_rows_are_distinct_prompts_with_rating_and_reference():
    out = build_rows([_mixed()], "GRPO")
    prompts = [r["prompt"] for r in out.rows]
    assert len(prompts) == 5 and "plain prompt" in prompts
    banana = [r for r in out.rows if r["prompt"] == chat("colour of banana?")][0]
    assert banana["feedback_score"] == 0.1  # r2's score is the later rating of the two answers
    lime = [r for r in out.rows if r["prompt"] == chat("colour of lime?")][0]
    assert lime["reference"] == "<answer>green</answer>"
    # the same columns in every row (`datasets.Dataset.from_list` keeps only the first row's), None when unknown
    assert all(set(r) == {"prompt", "feedback_score", "reference"} for r in out.rows)
    assert [r["feedback_score"] for r in out.rows if r["prompt"] == "plain prompt"] == [None]
    assert out.dropped == {"notForMethod": 1, "unusableType": 1}


# ------------------------------------------------------------------------------------------ join-only segments


def test_join_only_segments_complete_joins_but_are_never_trained_on_twice():
    old = seg("dep/old.jsonl", inter("r1"), fb("r1"), inter("r2", response="late rated"), join_only=True)
    new = seg("dep/new.jsonl", fb("r2", time="2026-11-30T10:00:00+00:00"), inter("r3", response="fresh"), fb("r3"))
    out = build_rows([old, new], "SFT")
    assert sorted(texts(out.rows)) == ["fresh", "late rated"]  # r1 was trained on in the earlier run
    assert out.counts["joinedFromEarlier"] == 1 and out.dropped == {}
    # the earlier run, then this one: r1, r2, r3 each trained on exactly once
    first = build_rows([seg("dep/old.jsonl", inter("r1"), fb("r1"), inter("r2", response="late rated"))], "SFT")
    assert texts(first.rows) == ["<answer>yellow</answer>"] and first.dropped == {"unrated": 1}


# ------------------------------------------------------------------------------------------ store + snapshot


def _write(store: Path, name: str, *records) -> tuple[str, str]:
    p = store / name
    p.parent.mkdir(parents=True, exist_ok=True)
    data = ("\n".join(r.to_json() for r in records) + "\n").encode()
    p.write_bytes(data)
    return name, hashlib.sha256(data).hexdigest()


def _store(tmp_path: Path, n: int = 20):
    store = tmp_path / "store"
    inters = [inter(f"r{i}", q=f"q{i}", response=f"a{i}", deployment="dep") for i in range(n)]
    ratings = [fb(f"r{i}", deployment="dep") for i in range(n)]
    s1 = _write(store, "dep/2026/11/29/pod-a-00000001.jsonl", *inters)
    s2 = _write(store, "dep/2026/11/29/pod-b-00000001.jsonl", *ratings)
    return store, [s1, s2]


def _snapshot(store: Path, segs, join=(), name="dep/snapshots/run-1.json", **extra) -> str:
    doc = {"apiVersion": "perennial.ai/v1alpha1", "kind": "FeedbackSnapshot", "deployment": "dep",
           "segments": [{"name": n, "sha256": h, "records": 20} for n, h in segs],
           "joinSegments": [{"name": n, "sha256": h} for n, h in join],
           "window": {"start": T0, "end": "2026-11-29T12:00:00+00:00"}, **extra}
    (store / name).parent.mkdir(parents=True, exist_ok=True)
    (store / name).write_text(json.dumps(doc))
    return name


def test_snapshot_dataset_reads_exactly_its_segments(tmp_path):
    store, segs = _store(tmp_path)
    _write(store, "dep/2026/11/29/pod-c-00000001.jsonl", inter("x", deployment="dep"), fb("x", deployment="dep"))  # not in it
    snap = _snapshot(store, segs)
    ds = load_feedback("fb", str(store), "SFT", snapshot=snap)
    assert len(ds.rows) == 20 and ds.stats["dropped"] == {}
    assert ds.stats["segments"] == 2 and ds.uri.endswith("run-1.json")
    assert ds.sha256 == hashlib.sha256((store / snap).read_bytes()).hexdigest()  # the lineage names the snapshot
    # an absolute URI works too
    assert len(load_feedback("fb", str(store), "SFT", snapshot="file://" + str(store / snap)).rows) == 20


def test_segment_modified_after_the_snapshot_is_refused(tmp_path):
    store, segs = _store(tmp_path)
    snap = _snapshot(store, segs)
    p = store / segs[1][0]
    p.write_bytes(p.read_bytes() + fb("r1", type="score", score=1.0).to_json().encode() + b"\n")  # appended later
    with pytest.raises(TrainerError) as e:
        load_feedback("fb", str(store), "SFT", snapshot=snap)
    assert e.value.reason == "DatasetHashMismatch" and segs[1][0] in str(e.value) and e.value.exit_code == 11


def test_snapshot_segment_missing_escaping_or_without_hash_is_refused(tmp_path):
    store, segs = _store(tmp_path)
    (tmp_path / "secret.jsonl").write_text("x\n")
    cases = {
        "gone": ([("dep/none.jsonl", "0" * 64)], "DatasetNotFound"),
        "escape": ([("../secret.jsonl", hashlib.sha256(b"x\n").hexdigest())], "InvalidDataset"),
        "absolute": ([(str(tmp_path / "secret.jsonl"), hashlib.sha256(b"x\n").hexdigest())], "InvalidDataset"),
    }
    for key, (bad, reason) in cases.items():
        snap = _snapshot(store, segs + bad, name=f"dep/snapshots/{key}.json")
        with pytest.raises(TrainerError) as e:
            load_feedback("fb", str(store), "SFT", snapshot=snap)
        assert e.value.reason == reason, key
    (store / "nohash.json").write_text(json.dumps({"segments": [{"name": segs[0][0]}]}))
    with pytest.raises(TrainerError, match="sha256") as e:
        load_feedback("fb", str(store), "SFT", snapshot="nohash.json")
    assert e.value.reason == "InvalidDataset"
    (store / "garbage.json").write_text("{not json")
    with pytest.raises(TrainerError) as e:
        load_feedback("fb", str(store), "SFT", snapshot="garbage.json")
    assert e.value.reason == "InvalidDataset"
    with pytest.raises(TrainerError) as e:
        load_feedback("fb", str(store), "SFT", snapshot="dep/snapshots/none.json")
    assert e.value.reason == "DatasetNotFound"


def test_snapshot_join_segments_are_verified_and_used_only_to_join(tmp_path):
    store = tmp_path / "store"
    old = _write(store, "dep/2026/11/28/pod-a-00000001.jsonl", *[inter(f"r{i}", q=f"q{i}", response=f"a{i}") for i in range(20)],
                 *[fb(f"r{i}") for i in range(10)])
    new = _write(store, "dep/2026/11/29/pod-b-00000001.jsonl", *[fb(f"r{i}", time="2026-11-30T00:00:00+00:00") for i in range(10, 20)])
    snap = _snapshot(store, [new], join=[old])
    ds = load_feedback("fb", str(store), "SFT", snapshot=snap, min_examples=10)
    assert sorted(texts(ds.rows)) == sorted(f"a{i}" for i in range(10, 20))
    assert ds.stats["joinedFromEarlier"] == 10
    p = store / old[0]
    p.write_bytes(p.read_bytes().replace(b"a1", b"zz"))
    with pytest.raises(TrainerError, match="sha256"):
        load_feedback("fb", str(store), "SFT", snapshot=snap, min_examples=10)


def test_too_little_data_is_refused_with_the_counts(tmp_path):
    store, segs = _store(tmp_path, n=5)
    snap = _snapshot(store, segs)
    with pytest.raises(TrainerError) as e:
        load_feedback("fb", str(store), "SFT", snapshot=snap)
    msg = str(e.value)
    assert e.value.reason == "InsufficientData" and e.value.exit_code == 11  # permanent: no retry makes more data
    assert "5 usable SFT examples" in msg and f"minimum is {DEFAULT_MIN_EXAMPLES['SFT']}" in msg and "minExamples" in msg
    assert len(load_feedback("fb", str(store), "SFT", snapshot=snap, min_examples=5).rows) == 5
    with pytest.raises(TrainerError, match="minimum is 6"):
        load_feedback("fb", str(store), "SFT", snapshot=snap, min_examples=6)
    # drop reasons are in the message
    _write(store, "dep/x.jsonl", fb("ghost"))
    with pytest.raises(TrainerError, match="interactionMissing 1"):
        load_feedback("fb", str(store), "SFT", segments=[s for s, _ in segs] + ["dep/x.jsonl"])


def test_every_segment_of_the_deployment_when_none_is_listed(tmp_path):
    store, _ = _store(tmp_path)
    _write(store, "other/2026/11/29/pod-a-00000001.jsonl", *[inter(f"o{i}", q=f"o{i}", deployment="other") for i in range(30)],
           *[fb(f"o{i}", deployment="other") for i in range(30)])
    ds = load_feedback("fb", str(store), "SFT", deployment="dep")
    assert len(ds.rows) == 20  # another Deployment's segments in a shared store are not read
    assert len(load_feedback("fb", str(store), "SFT").rows) == 50  # no Deployment named: the whole store


def test_feedback_of_a_join_segment_is_never_trained_here():
    # the store's snapshots train on the ratings of their own parts; a join part's ratings are another snapshot's
    old = seg("dep/old.jsonl", fb("r1"), fb("r2", type="correction", correction="fixed"), join_only=True)
    new = seg("dep/new.jsonl", inter("r1"), inter("r2", q="other"), inter("r3", q="third"), fb("r3"))
    for method in ("SFT", "DPO"):
        out = build_rows([old, new], method)
        assert [r for r in out.rows if texts([r], "completion" if method == "SFT" else "chosen") == ["fixed"]] == []
    sft = build_rows([old, new], "SFT")
    assert len(sft.rows) == 1 and sft.dropped == {"unrated": 2}
    grpo = build_rows([old, new], "GRPO")  # prompts of the snapshot's interactions; no rating taken from the join part
    assert len(grpo.rows) == 3 and all(r["feedback_score"] is None or r["prompt"] == chat("third") for r in grpo.rows)


# ------------------------------------------------------------------------------ with the operator's FeedbackStore


@pytest.fixture
def mem_store():
    import uuid

    import fsspec

    root = f"memory://trainer-fb-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root[len("memory://"):]):
        fs.rm(root[len("memory://"):], recursive=True)


def _put(uri: str, name: str, data: bytes, append: bool = False) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    path = f"{root.rstrip('/')}/{name}"
    fs.makedirs(posix_dir(path), exist_ok=True)
    fs.pipe_file(path, (fs.cat_file(path) if append else b"") + data)


def posix_dir(path: str) -> str:
    return path.rsplit("/", 1)[0]


def _lines(*recs) -> bytes:
    return "".join(r.to_json() + "\n" for r in recs).encode()


def test_snapshots_of_the_operators_store_train_each_rating_exactly_once(mem_store):
    import datetime as dt

    from perennial.feedback.store import FeedbackStore
    from perennial_records import segment_name

    now = dt.datetime.now(dt.UTC)
    t = now.isoformat()
    dep = "chat"
    s_a, s_b, s_c = (segment_name(dep, p, 1, now) for p in ("pod-a", "pod-b", "pod-c"))
    # pod a served 20 answers and got 10 ratings; pod b (another region) took 5 ratings of pod a's answers
    _put(mem_store, s_a, _lines(*[inter(f"r{i}", q=f"q{i}", response=f"a{i}", deployment=dep, time=t) for i in range(20)],
                                *[fb(f"r{i}", deployment=dep, time=t) for i in range(10)]))
    _put(mem_store, s_b, _lines(*[fb(f"r{i}", deployment=dep, time=t) for i in range(10, 15)]))
    store = FeedbackStore(mem_store)
    store.scan(dep)
    snap1 = store.take_snapshot(dep)
    run1 = load_feedback("fb", mem_store, "SFT", snapshot=store.snapshot_path(dep, snap1.name), min_examples=1, deployment=dep)
    assert sorted(texts(run1.rows)) == sorted(f"a{i}" for i in range(15))
    assert run1.stats["dropped"] == {"unrated": 5}
    # later: pod a's segment grows with the last 5 ratings, pod c re-rates r3 (down) and rates an answer nobody served
    _put(mem_store, s_a, _lines(*[fb(f"r{i}", deployment=dep, time=t) for i in range(15, 20)]), append=True)
    later = (now + dt.timedelta(minutes=5)).isoformat()
    _put(mem_store, s_c, _lines(fb("r3", thumbs="down", deployment=dep, time=later), fb("ghost", deployment=dep, time=later)))
    store.scan(dep)
    snap2 = store.take_snapshot(dep)
    assert snap2.join_segments  # the rated interactions are in snapshot 1's part
    run2 = load_feedback("fb", mem_store, "SFT", snapshot=store.snapshot_uri(dep, snap2.name), min_examples=1, deployment=dep)
    assert sorted(texts(run2.rows)) == sorted(f"a{i}" for i in range(15, 20))
    assert run2.stats["dropped"] == {"belowThreshold": 1, "interactionMissing": 1}
    assert run2.stats["joinedFromEarlier"] == 5  # r15..r19 from the earlier part (r3's thumbs down makes no row)
    # every rated answer trained on exactly once across the two runs
    both = texts(run1.rows) + texts(run2.rows)
    assert sorted(both) == sorted(f"a{i}" for i in range(20))
    # the segment grows again after the snapshot: its snapshotted byte range is unchanged, so the run still reads
    _put(mem_store, s_a, _lines(fb("r0", deployment=dep, time=later)), append=True)
    assert len(load_feedback("fb", mem_store, "SFT", snapshot=store.snapshot_path(dep, snap2.name), min_examples=1).rows) == 5
    # but bytes changed inside a snapshotted range: refused
    import fsspec

    fs, root = fsspec.core.url_to_fs(mem_store)
    path = f"{root}/{s_b}"
    fs.pipe_file(path, fs.cat_file(path).replace(b'"up"', b'"down"', 1))
    with pytest.raises(TrainerError) as e:
        load_feedback("fb", mem_store, "SFT", snapshot=store.snapshot_path(dep, snap1.name), min_examples=1)
    assert e.value.reason == "DatasetHashMismatch" and s_b in str(e.value)
    # the store's own documents are never read as segments
    whole = load_feedback("fb", mem_store, "SFT", deployment=dep, min_examples=1)
    assert sorted(whole.files) == sorted([s_a, s_b, s_c])
    assert len(whole.rows) == 18  # all but r3 (re-rated down) and r10 (changed to down above)


def test_both_segments_and_a_snapshot_must_agree(tmp_path):
    store, segs = _store(tmp_path)
    snap = _snapshot(store, segs)
    assert len(load_feedback("fb", str(store), "SFT", snapshot=snap, segments=[n for n, _ in segs]).rows) == 20
    with pytest.raises(TrainerError, match="not the segments of snapshot") as e:
        load_feedback("fb", str(store), "SFT", snapshot=snap, segments=[segs[0][0]])
    assert e.value.reason == "InvalidDataset"


def test_a_byte_range_part_is_read_and_verified(tmp_path):
    store = tmp_path / "store"
    name, _ = _write(store, "dep/s.jsonl", *[inter(f"r{i}", q=f"q{i}", response=f"a{i}") for i in range(20)])
    head = (store / name).read_bytes()
    tail = _lines(*[fb(f"r{i}") for i in range(20)])
    (store / name).write_bytes(head + tail)
    doc = {"segments": [{"name": name, "offset": len(head), "length": len(tail), "sha256": hashlib.sha256(tail).hexdigest()}],
           "joinSegments": [{"name": name, "offset": 0, "length": len(head), "sha256": hashlib.sha256(head).hexdigest()}]}
    (store / "snap.json").write_text(json.dumps(doc))
    ds = load_feedback("fb", str(store), "SFT", snapshot="snap.json")
    assert len(ds.rows) == 20 and ds.stats["joinedFromEarlier"] == 20
    (store / name).write_bytes(head + tail[:-10])  # truncated inside the range
    with pytest.raises(TrainerError) as e:
        load_feedback("fb", str(store), "SFT", snapshot="snap.json")
    assert e.value.reason == "DatasetHashMismatch"


def test_rows_longer_than_max_length_are_dropped_counted_and_the_minimum_rechecked(tmp_path):
    from perennial_trainer.data import LoadedDataset
    from perennial_trainer.feedback import drop_too_long

    store, segs = _store(tmp_path, n=20)
    fbds = load_feedback("fb", str(store), "SFT", snapshot=_snapshot(store, segs))
    fbds.rows[3]["completion"][0]["content"] = "long " * 500
    fbds.rows[7]["completion"][0]["content"] = "long " * 500
    filed = LoadedDataset("file", "/x.jsonl", "Train", [{"prompt": "p", "completion": "long " * 500}], "0" * 64)
    train, evals = fbds.rows[:18] + filed.rows, fbds.rows[18:]

    def too_long(r):
        return len(json.dumps(r).split()) > 100

    train2, evals2 = drop_too_long([fbds, filed], [train, evals], too_long, {"fb": 16})
    assert len(train2) == 17 and evals2 == evals  # the file dataset's long row is the user's to truncate
    assert fbds.stats["dropped"] == {"tooLong": 2} and len(fbds.rows) == 18
    fbds.rows[0]["completion"][0]["content"] = "long " * 500
    fbds.rows[1]["completion"][0]["content"] = "long " * 500
    fbds.rows[2]["completion"][0]["content"] = "long " * 500
    with pytest.raises(TrainerError, match="the minimum is 16") as e:
        drop_too_long([fbds], [fbds.rows], too_long, {"fb": 16})
    assert e.value.reason == "InsufficientData"


def test_a_snapshot_on_another_claim_is_mounted_read_only_into_the_training_pod():
    from perennial.api import TrainingRunSpec
    from perennial.resources import trainingrun as tr

    body = {"apiVersion": "perennial.ai/v1alpha1", "kind": "TrainingRun", "metadata": {"name": "run1", "namespace": "team", "uid": "u-1"}}
    spec = TrainingRunSpec.model_validate({
        "method": "SFT", "baseModelRef": {"name": "m"}, "output": {"adapterFamily": "fam"},
        "datasets": [{"name": "fb", "feedback": {"deploymentRef": {"name": "chat"}, "storeUri": "pvc://feedback/team",
                                                  "snapshot": "pvc://snapshots/chat/chat-00000001.json", "minExamples": 4}}]})
    config = tr.run_config(body, spec, base_model_uri="/models/m", output="pvc://artifacts/out", parent_adapter_uri=None,
                           reward_spec=None, eval_reward_spec=None, feedback_store_uri=None)
    job = tr.job(body, spec, config, image="trainer:1", credential_secrets=[], judge_keys=[])
    pod = job["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims["feedback"] is True and claims["snapshots"] is True
    mounts = {m["mountPath"]: m.get("readOnly") for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/mnt/pvc/snapshots"] is True


def test_a_correction_wins_over_a_rating_and_content_parts():
    out = build_rows([seg("s1", inter("r1"), fb("r1"), fb("r1", type="correction", correction="<answer>yellow!</answer>"),
                          inter("r2", q="x", messages=[{"role": "user", "content": [{"type": "text", "text": "colour of "}, {"type": "text", "text": "plum?"}]}],
                                response="<answer>purple</answer>"), fb("r2"),
                          inter("r3", q="y", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]), fb("r3"))],
                     "SFT")
    assert sorted(texts(out.rows)) == ["<answer>purple</answer>", "<answer>yellow!</answer>"]
    plum = [r for r in out.rows if texts([r]) == ["<answer>purple</answer>"]][0]
    assert plum["prompt"] == [{"role": "user", "content": "colour of plum?"}]  # text parts joined
    assert out.dropped == {"superseded": 1, "unsupportedContent": 2}
    # DPO: a correction that says what the answer already said is no preference
    same = build_rows([seg("s1", inter("r1"), fb("r1", type="correction", correction=" <answer>yellow</answer> "))], "DPO")
    assert same.rows == [] and same.dropped == {"identical": 2}


def test_the_api_documents_the_trainers_default_minimums():
    from perennial.api.trainingrun import FeedbackSnapshot

    doc = FeedbackSnapshot.model_fields["min_examples"].description
    assert all(f"{m} {n}" in doc for m, n in DEFAULT_MIN_EXAMPLES.items())


# ------------------------------------------------------------------------------- held-out references

FRUIT_SPEC = {"graders": [
    {"name": "format", "type": "Regex", "regex": {"pattern": "<answer>[a-z]+</answer>", "mode": "FullMatch"}},
    {"name": "correct", "type": "StringCheck", "stringCheck": {"operation": "Equals", "reference": "<answer>{{item.answer}}</answer>"}},
]}


def _spec(raw):
    from perennial.api.rewardspec import RewardSpecSpec

    return RewardSpecSpec.model_validate(raw)


def _refs():
    return seg("s1",
               inter("r1", response="<answer>yellow</answer>"), fb("r1", thumbs="up"),                       # approved: a reference
               inter("r2", q="colour of lime?", response="<answer>red</answer>"),
               fb("r2", thumbs="down"), fb("r2", type="correction", correction="<answer>green</answer>"),      # corrected
               inter("r3", q="colour of plum?", response="<answer>purple</answer>"), fb("r3", type="score", score=0.7))  # liked, not "right"


@pytest.mark.parametrize("method", ["SFT", "DPO", "GRPO"])
def test_rows_carry_the_reference_a_correction_or_a_thumbs_up_gives(method):
    recs = [_refs()]
    if method == "DPO":  # a differently rated second answer to the banana prompt makes a rated pair
        recs.append(seg("s2", inter("r9", response="<answer>blue</answer>"), fb("r9", thumbs="down")))
    out = build_rows(recs, method)
    by_prompt = {json.dumps(r["prompt"]): r for r in out.rows}
    assert all("reference" in r for r in out.rows), out.rows  # one column set for every row
    assert by_prompt[json.dumps(chat("colour of lime?"))]["reference"] == "<answer>green</answer>"
    assert by_prompt[json.dumps(chat("colour of banana?"))]["reference"] == "<answer>yellow</answer>"
    if method != "DPO":
        assert by_prompt[json.dumps(chat("colour of plum?"))]["reference"] is None  # a 0.7 says "good enough", not "right"


def test_held_out_rows_get_the_field_the_graders_read_so_the_gate_grades_correctness():
    from perennial_trainer.feedback import with_reference_fields
    from perennial_trainer.graders import score_all

    rows = build_rows([_refs()], "SFT").rows
    spec = _spec(FRUIT_SPEC)
    items = with_reference_fields(rows, spec)
    by_prompt = {json.dumps(r["prompt"]): r for r in items}
    assert by_prompt[json.dumps(chat("colour of lime?"))]["answer"] == "green"   # `<answer>{{item.answer}}</answer>` inverted
    assert by_prompt[json.dumps(chat("colour of banana?"))]["answer"] == "yellow"
    assert "answer" not in by_prompt[json.dumps(chat("colour of plum?"))]
    assert all("answer" not in r for r in rows)  # the rows given are left as they are
    lime = by_prompt[json.dumps(chat("colour of lime?"))]
    # the gate's held-out reward now tells a right answer from a well-formed wrong one (it was 1 vs 1: format only)
    right, wrong = score_all(spec, [{"output_text": "<answer>green</answer>"}, {"output_text": "<answer>red</answer>"}], [lime, lime])
    assert (right.total, wrong.total) == (2.0, 1.0)


def test_reference_fields_respect_the_graders_options_and_never_overwrite():
    from perennial_trainer.feedback import with_reference_fields

    spec = _spec({"graders": [
        {"name": "exact", "type": "StringCheck", "stringCheck": {"operation": "Equals", "reference": "Answer: {{item.city}}.", "caseSensitive": False}},
        {"name": "close", "type": "Similarity", "similarity": {"metric": "FuzzyRatio", "reference": "{{item.text}}"}},
        {"name": "two", "type": "StringCheck", "stringCheck": {"operation": "Contains", "reference": "{{item.a}} and {{item.b}}"}},
    ]})
    rows = [{"prompt": "p1", "completion": "x", "reference": "  ANSWER: Paris.\n"},
            {"prompt": "p2", "completion": "x", "reference": "no prefix here", "text": "kept"},
            {"prompt": "p3", "completion": "x", "reference": None},
            {"prompt": "p4", "completion": "x"}]
    out = with_reference_fields(rows, spec)
    assert out[0]["city"] == "Paris" and out[0]["text"] == "  ANSWER: Paris.\n"  # stripped, case-insensitive prefix
    assert "city" not in out[1] and out[1]["text"] == "kept"  # no match: nothing; an existing field is never overwritten
    assert out[2] == rows[2] and out[3] == rows[3]
    assert not any({"a", "b"} & set(r) for r in out)  # two placeholders: not invertible
    assert with_reference_fields(rows, None) == rows
