"""Trainer plumbing without training: config, URIs, datasets, feedback snapshots, errors, termination message."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perennial.api import FeedbackRecord, InteractionRecord  # noqa: E402
from perennial_trainer.config import RunConfig, load_config  # noqa: E402
from perennial_trainer.data import check_columns, feedback_to_rows, load_feedback_dataset, load_uri_dataset, split_held_out  # noqa: E402
from perennial_trainer.errors import TrainerError  # noqa: E402
from perennial_trainer.progress import write_termination  # noqa: E402
from perennial_trainer.storage import resolve_uri  # noqa: E402
from trainer_support import FRUIT_REWARD_SPEC, run_config, write_config  # noqa: E402


def _cfg(tmp_path, **kw):
    kw.setdefault("datasets", [{"name": "d", "uri": str(tmp_path / "d.jsonl")}])
    return run_config(name="r", method=kw.pop("method", "SFT"), base="/models/x", output=str(tmp_path / "out"), **kw)


def test_run_config_round_trip_and_overrides(tmp_path):
    cfg = _cfg(tmp_path, method="GRPO", reward_spec=FRUIT_REWARD_SPEC, hp={"maxSteps": 5})
    path = write_config(tmp_path / "run.yaml", cfg)
    rc = load_config(path, {"spec.hyperparameters.maxSteps": 7, "outputUri": "s3://b/x", "checkpointDir": None})
    assert rc.spec.hyperparameters.max_steps == 7 and rc.output_uri == "s3://b/x"
    assert rc.reward_spec.graders[0].name == "format" and rc.grading_spec() is rc.reward_spec
    assert RunConfig.model_validate(rc.to_dict()) == rc
    assert len(rc.config_hash()) == 64
    with pytest.raises(TrainerError, match="invalid"):
        load_config(write_config(tmp_path / "bad.yaml", {**cfg, "bogus": 1}))


def test_uri_resolution(monkeypatch):
    monkeypatch.setenv("PERENNIAL_PVC_ROOT", "/data/pvc")
    assert resolve_uri("pvc://claim/a/b.jsonl") == "/data/pvc/claim/a/b.jsonl"
    assert resolve_uri("file:///x/y") == "/x/y" and resolve_uri("/x/y") == "/x/y"
    assert resolve_uri("s3://bucket/k") == "s3://bucket/k"


def test_jsonl_parquet_pvc_and_hash(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("PERENNIAL_PVC_ROOT", str(tmp_path))
    (tmp_path / "claim").mkdir()
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    (tmp_path / "claim" / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "claim" / "b.parquet")
    a = load_uri_dataset("a", "pvc://claim/a.jsonl")
    b = load_uri_dataset("b", "file://" + str(tmp_path / "claim" / "b.parquet"))
    assert a.rows == rows == b.rows and len(a.sha256) == 64
    both = load_uri_dataset("dir", "pvc://claim")
    assert len(both.rows) == 4
    with pytest.raises(TrainerError, match="differs"):
        load_uri_dataset("a", "pvc://claim/a.jsonl", expected_sha256="0" * 64)
    with pytest.raises(TrainerError, match="does not exist"):
        load_uri_dataset("gone", "pvc://claim/none.jsonl")


def test_missing_column_error_names_dataset_file_and_column(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    ds = load_uri_dataset("pairs", str(f))
    with pytest.raises(TrainerError) as e:
        check_columns(ds, "DPO")
    msg = str(e.value)
    assert "'pairs'" in msg and str(f) in msg and "'rejected'" in msg and e.value.reason == "MissingColumn"


def test_missing_column_fails_the_run_cleanly(tmp_path):
    from perennial_trainer.cli import main

    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    path = write_config(tmp_path / "run.yaml", _cfg(tmp_path))
    term = tmp_path / "term"
    assert main(["--config", path, "--termination-log", str(term)]) == 11  # a permanent dataset error (perennial.api.exitcodes)
    res = json.loads(term.read_text())
    assert res["status"] == "Failed" and res["reason"] == "MissingColumn" and "'completion'" in res["message"]


def _records():
    chat = lambda q: [{"role": "user", "content": q}]  # noqa: E731
    return [
        InteractionRecord(id="r1", messages=chat("colour of banana?"), response="<answer>yellow</answer>"),
        InteractionRecord(id="r2", messages=chat("colour of banana?"), response="<answer>blue</answer>"),
        InteractionRecord(id="r3", messages=chat("colour of lime?"), response="<answer>red</answer>"),
        InteractionRecord(id="r4", prompt="plain prompt", response="meh"),
        InteractionRecord(id="r5", prompt="plain prompt", response="better"),
        FeedbackRecord(response_id="r1", type="thumbs", thumbs="up"),
        FeedbackRecord(response_id="r2", type="score", score=0.1),
        FeedbackRecord(response_id="r3", type="correction", correction="<answer>green</answer>"),
        FeedbackRecord(response_id="r4", type="preference", other_response_id="r5", chosen="other"),
        FeedbackRecord(response_id="missing", type="thumbs", thumbs="up"),
    ]


def test_feedback_to_rows():
    recs = _records()
    sft = feedback_to_rows(recs, "SFT")
    assert {r["completion"][0]["content"] for r in sft} == {"<answer>yellow</answer>", "<answer>green</answer>"}
    assert feedback_to_rows(recs, "SFT", min_rating=0.05) and len(feedback_to_rows(recs, "SFT", min_rating=0.05)) == 3
    dpo = feedback_to_rows(recs, "DPO")
    pairs = {(r["chosen"][0]["content"] if isinstance(r["chosen"], list) else r["chosen"],
              r["rejected"][0]["content"] if isinstance(r["rejected"], list) else r["rejected"]) for r in dpo}
    assert ("<answer>green</answer>", "<answer>red</answer>") in pairs   # correction vs original
    assert ("<answer>yellow</answer>", "<answer>blue</answer>") in pairs  # differently rated, same prompt
    assert ("better", "meh") in pairs                                     # explicit preference (same prompt)
    grpo = feedback_to_rows(recs, "GRPO")
    assert len(grpo) == 3 and all("prompt" in r for r in grpo)
    banana = [r for r in grpo if r["prompt"] == [{"role": "user", "content": "colour of banana?"}]][0]
    assert "feedback_score" in banana


def test_feedback_snapshot_from_store(tmp_path):
    seg = tmp_path / "store" / "dep" / "2026" / "11" / "25"
    seg.mkdir(parents=True)
    (seg / "pod-00000001.jsonl").write_text("\n".join(r.to_json() for r in _records()) + "\nnot json\n")
    ds = load_feedback_dataset("fb", str(tmp_path / "store"), [], "SFT", None, min_examples=2)
    assert len(ds.rows) == 2 and len(ds.sha256) == 64
    assert ds.stats["dropped"]["unparsable"] == 1 and ds.stats["dropped"]["interactionMissing"] == 1
    only = load_feedback_dataset("fb", str(tmp_path / "store"), ["dep/2026/11/25/pod-00000001.jsonl"], "DPO", None, min_examples=3)
    assert len(only.rows) == 3
    with pytest.raises(TrainerError) as e:  # too little data: a permanent failure, not a worse adapter
        load_feedback_dataset("fb", str(tmp_path / "store"), [], "SFT", None)
    assert e.value.reason == "InsufficientData" and e.value.exit_code == 11
    with pytest.raises(TrainerError, match="not found"):
        load_feedback_dataset("fb", str(tmp_path / "store"), ["dep/nope.jsonl"], "SFT", None)


def test_held_out_split_is_deterministic():
    rows = [{"i": i} for i in range(20)]
    a, b = split_held_out(rows, 25, 1)
    assert len(b) == 5 and len(a) == 15 and split_held_out(rows, 25, 1) == (a, b)


def test_termination_message_stays_under_4k(tmp_path):
    big = {"status": "Succeeded", "reason": "Trained", "message": "m" * 10000, "artifactUri": "/x",
           "metrics": {f"train/m{i}": 1.0 for i in range(300)} | {"eval/mean_reward": 1.5},
           "lineage": {"datasets": [{"name": str(i), "sha256": "a" * 64} for i in range(40)], "configHash": "c"}}
    text = write_termination(big, str(tmp_path / "t"))
    assert len(text.encode()) < 4096 and (tmp_path / "t").read_text() == text
    res = json.loads(text)
    assert res["metrics"] == {"eval/mean_reward": 1.5} and res["status"] == "Succeeded"


def test_upload_to_object_store(tmp_path):
    import fsspec

    from perennial_trainer.storage import localize, upload_dir

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "x.bin").write_bytes(b"xyz")
    upload_dir(tmp_path / "a", "memory://artifacts/ns/run")
    fs = fsspec.filesystem("memory")
    assert fs.cat("/artifacts/ns/run/sub/x.bin") == b"xyz"
    got = localize("memory://artifacts/ns/run", tmp_path / "dl")
    assert (Path(got) / "adapter_config.json").read_text() == "{}"


def test_progress_callback_lines_and_zero_std_warning(tmp_path, capsys):
    import io
    from types import SimpleNamespace

    from perennial_trainer.callbacks import ProgressCallback

    out = io.StringIO()
    cb = ProgressCallback([str(tmp_path / "progress.json")], ["format"], stream=out)
    state = SimpleNamespace(global_step=0, max_steps=10, epoch=0.0)
    cb.on_train_begin(None, state, None)
    state.global_step, state.epoch = 1, 0.1
    cb.on_log(None, state, None, logs={"loss": 0.5, "reward": 0.0, "rewards/format/mean": 0.0, "frac_reward_zero_std": 1.0})
    lines = [json.loads(l.split(" ", 1)[1]) for l in out.getvalue().splitlines()]
    assert all(l.startswith("PERENNIAL_PROGRESS {") for l in out.getvalue().splitlines())
    assert lines[-1] | {"etaSeconds": None} == {"step": 1, "totalSteps": 10, "loss": 0.5, "meanReward": 0.0, "rewards": {"format": 0.0},
                                                 "fracRewardZeroStd": 1.0, "zeroStdStreak": 1, "warnings": [], "etaSeconds": None, "epoch": 0.1, "resumedFromStep": 0,
                                                 "phase": "Training"}
    assert "NO learning signal" in capsys.readouterr().err
    assert json.loads((tmp_path / "progress.json").read_text())["step"] == 1
    # flat steps in a row are counted (the operator reports no learning signal at 3); a varied one resets the count
    for step, frac in ((2, 1.0), (3, 1.0), (4, 0.5)):
        state.global_step = step
        cb.on_log(None, state, None, logs={"loss": 0.5, "frac_reward_zero_std": frac})
    streaks = [json.loads(l.split(" ", 1)[1])["zeroStdStreak"] for l in out.getvalue().splitlines()[-3:]]
    assert streaks == [2, 3, 0]
    # and judged over the run so far (perennial_trainer.signals): most logged steps flat is no learning signal
    warned = [json.loads(l.split(" ", 1)[1])["warnings"] for l in out.getvalue().splitlines()[-3:]]
    assert warned == [[], ["NoRewardVariance"], ["NoRewardVariance"]]


def test_resume_skips_a_checkpoint_killed_mid_save(tmp_path):
    from perennial_trainer.train import last_complete_checkpoint

    for n, complete in [(10, True), (20, True), (30, False)]:
        c = tmp_path / f"checkpoint-{n}"
        c.mkdir()
        (c / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (c / "trainer_state.json").write_text("{}")  # written last by the Trainer
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-20")
    assert not (tmp_path / "checkpoint-30").exists()
    assert last_complete_checkpoint(str(tmp_path / "missing")) is None


def _feedback_store(tmp_path, n: int, ghosts: int = 0) -> tuple[Path, str]:
    """A store with one segment of `n` rated chat answers (and `ghosts` ratings of answers nobody served), and
    a snapshot document of it in the operator's format."""
    import hashlib

    store = tmp_path / "store"
    seg = store / "chat" / "2026" / "11" / "29" / "pod-a-00000001.jsonl"
    seg.parent.mkdir(parents=True)
    recs = [InteractionRecord(id=f"r{i}", deployment="chat", messages=[{"role": "user", "content": f"colour of fruit {i}?"}],
                              response="<answer>red</answer>") for i in range(n)]
    recs += [FeedbackRecord(response_id=f"r{i}", type="thumbs", thumbs="up", deployment="chat") for i in range(n)]
    recs += [FeedbackRecord(response_id=f"ghost{i}", type="thumbs", thumbs="up", deployment="chat") for i in range(ghosts)]
    data = "".join(r.to_json() + "\n" for r in recs).encode()
    seg.write_bytes(data)
    snap = "chat/_perennial/snapshots/chat-00000001.json"
    (store / snap).parent.mkdir(parents=True)
    (store / snap).write_text(json.dumps({
        "apiVersion": "perennial.ai/v1alpha1", "kind": "FeedbackSnapshot", "deployment": "chat", "name": "chat-00000001", "sequence": 1,
        "segments": [{"name": str(seg.relative_to(store)), "offset": 0, "length": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                      "interactions": n, "ratings": n + ghosts}],
        "joinSegments": [], "window": {}, "counts": {}, "cursor": {"sequence": 2}}))
    return store, snap


def test_too_little_feedback_fails_the_run_permanently_with_the_counts(tmp_path):
    from perennial_trainer.cli import main

    store, snap = _feedback_store(tmp_path, n=3, ghosts=2)
    cfg = _cfg(tmp_path, datasets=[{"name": "fb", "feedback": {"deploymentRef": {"name": "chat"}, "storeUri": str(store), "snapshot": snap}}])
    term = tmp_path / "term"
    assert main(["--config", write_config(tmp_path / "run.yaml", cfg), "--termination-log", str(term)]) == 11
    res = json.loads(term.read_text())
    assert res["status"] == "Failed" and res["reason"] == "InsufficientData"
    assert "only 3 usable SFT examples" in res["message"] and "minimum is 16" in res["message"] and "interactionMissing 2" in res["message"]
    # the template can lower the minimum: then the data is accepted (the run goes on to load the model, absent here)
    cfg["spec"]["datasets"][0]["feedback"]["minExamples"] = 3
    assert main(["--config", write_config(tmp_path / "run.yaml", cfg), "--termination-log", str(term)]) == 13
    assert json.loads(term.read_text())["reason"] in ("BaseModelUnavailable", "NotFound")


def test_held_out_split_never_puts_one_prompt_on_both_sides():
    import random

    rows = [{"prompt": [{"role": "user", "content": f"q{i % 6}"}], "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(60)]
    train, held = split_held_out(rows, 20, 7)
    assert held and train and len(train) + len(held) == 60
    key = lambda r: r["prompt"][0]["content"]  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in held}
    assert len(held) == 10  # whole prompts: 1 of 6 groups of 10 rows ~ 20% of 60 rounded to whole groups
    # distinct prompts (and rows without one): exactly the row-by-row split it always was
    singles = [{"prompt": f"p{i}"} for i in range(20)]
    idx = list(range(20))
    random.Random(3).shuffle(idx)
    assert split_held_out(singles, 25, 3)[1] == [singles[i] for i in sorted(idx[:5])]
    # a single prompt cannot be split by prompt: rows then
    same = [{"prompt": "p", "completion": str(i)} for i in range(10)]
    assert len(split_held_out(same, 20, 1)[1]) == 2
