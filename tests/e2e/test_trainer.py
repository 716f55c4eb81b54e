"""The trainer end to end on a tiny offline model: SFT, DPO and GRPO adapters, evaluation against the
parent, artifacts, progress lines, termination message, and resuming after a SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinymodel import FRUITS, fruit_rows, tiny_model_path  # noqa: E402
from trainer_support import (  # noqa: E402
    FRUIT_REWARD_SPEC,
    REPO,
    progress_lines,
    run_config,
    trainer_env,
    write_config,
    write_fruit_data,
)

pytestmark = pytest.mark.slow

# The recipe of FACTS.md: a short SFT warm-up on the answer FORMAT only (random colours), then GRPO
# against the RewardSpec (format + correct). Evaluated on a phrasing never trained on.
SFT_HP = {"learningRate": "3e-3", "maxSteps": 30, "batchSize": 16, "seed": 42}
GRPO_HP = {"learningRate": "3e-4", "maxSteps": 80, "batchSize": 32, "numGenerations": 16,
           "maxCompletionLength": 12, "entropyCoef": "0.05", "temperature": "1.0", "seed": 42}
DPO_HP = {"learningRate": "3e-3", "maxSteps": 40, "batchSize": 8, "beta": "0.1", "seed": 42}


def _train(tmp: Path, name: str, cfg: dict, capsys=None) -> tuple[dict, str]:
    """Run `perennial-trainer --config` in this process (saves the interpreter start-up)."""
    from perennial_trainer.cli import main

    path = write_config(tmp / f"{name}.yaml", cfg)
    term = tmp / f"{name}.termination"
    rc = main(["--config", path, "--termination-log", str(term)])
    out = capsys.readouterr().out if capsys else ""
    result = json.loads(term.read_text())
    assert rc == 0, result
    return result, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer")
    base = tiny_model_path()
    data = write_fruit_data(tmp / "data")
    out = {"base": base, "tmp": tmp, "data": data}
    from perennial_trainer.cli import main  # noqa: F401  (import cost outside the timings)

    t = time.monotonic()
    out["sft"] = _train(tmp, "sft", run_config(
        name="fruit-sft", method="SFT", base=base, output=str(tmp / "out" / "sft"),
        datasets=[{"name": "format", "uri": "file://" + data["sft"]}], hp=SFT_HP))[0]
    out["sft_seconds"] = time.monotonic() - t
    t = time.monotonic()
    out["grpo"] = _train(tmp, "grpo", run_config(
        name="fruit-grpo", method="GRPO", base=base, output=str(tmp / "out" / "grpo"), parent=str(tmp / "out" / "sft"),
        datasets=[{"name": "prompts", "uri": data["grpo"]}, {"name": "heldout", "uri": data["eval"], "split": "Eval"}],
        hp=GRPO_HP, reward_spec=FRUIT_REWARD_SPEC, evaluation={"enabled": True}))[0]
    out["grpo_seconds"] = time.monotonic() - t
    t = time.monotonic()
    out["dpo"] = _train(tmp, "dpo", run_config(
        name="fruit-dpo", method="DPO", base=base, output=str(tmp / "out" / "dpo"),
        datasets=[{"name": "pairs", "uri": data["dpo"]}], hp=DPO_HP, reward_spec=FRUIT_REWARD_SPEC,
        evaluation={"enabled": True, "heldOutPercent": 25}))[0]
    out["dpo_seconds"] = time.monotonic() - t
    return out


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_each_method_writes_a_complete_artifact(runs, method):
    res = runs[method]
    assert res["status"] == "Succeeded"
    d = Path(res["artifactUri"])
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "metrics.json",
              "progress.json", "manifest.json", "curves.png"):
        assert (d / f).is_file(), f
    assert not (d / "checkpoints").exists()  # default checkpoints are cleaned up after success
    manifest = json.loads((d / "manifest.json").read_text())
    lin = manifest["lineage"]
    assert lin["method"] == method.upper() and lin["baseModel"]["uri"] == runs["base"]
    assert len(lin["configHash"]) == 64 and all(len(ds["sha256"]) == 64 for ds in lin["datasets"])
    assert manifest["files"]["adapter_model.safetensors"]
    assert json.loads((d / "progress.json").read_text())["phase"] == "Trained"
    assert len(json.dumps(res)) < 4096 and res["lineage"] == lin


def test_grpo_lineage_names_parent_and_hashes_data(runs):
    lin = runs["grpo"]["lineage"]
    assert lin["parentAdapter"]["uri"].endswith("sft")
    import hashlib

    want = hashlib.sha256(Path(runs["data"]["grpo"]).read_bytes()).hexdigest()
    assert {d["name"]: d["sha256"] for d in lin["datasets"]}["prompts"] == want


def test_grpo_raises_held_out_reward_over_parent(runs):
    m = json.loads((Path(runs["grpo"]["artifactUri"]) / "metrics.json").read_text())
    print({k: round(v, 3) for k, v in m.items() if k.startswith("eval/")}, "seconds:",
          {k: round(runs[k], 1) for k in ("sft_seconds", "grpo_seconds", "dpo_seconds")})
    assert m["eval/samples"] == len(FRUITS)  # the held-out phrasing of every question
    assert m["eval/improvement"] == pytest.approx(m["eval/mean_reward"] - m["eval/baseline_mean_reward"])
    assert m["eval/improvement"] >= 0.25, m
    assert m["eval/rewards/correct"] > m["eval/baseline_rewards/correct"]
    assert runs["grpo"]["metrics"]["eval/improvement"] == pytest.approx(m["eval/improvement"], abs=1e-5)
    # The operator's LearningSignal condition reads these: the last step's and the whole run's share of flat groups.
    assert 0 <= m["train/frac_reward_zero_std_mean"] <= 1 and "train/frac_reward_zero_std" in m


def test_two_adapters_in_one_peft_model(runs):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(runs["base"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["base"]), runs["grpo"]["artifactUri"], adapter_name="grpo")
    model.load_adapter(runs["dpo"]["artifactUri"], adapter_name="dpo")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What colour is a banana?"}], tokenize=False, add_generation_prompt=True)
    enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
    outs = {}
    for name in ("grpo", "dpo"):
        model.set_adapter(name)
        with torch.no_grad():
            g = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
        outs[name] = tok.decode(g[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert outs["grpo"].startswith("<answer>") and outs["grpo"].endswith("</answer>"), outs
    assert outs["dpo"] and outs["dpo"] != outs["grpo"], outs  # each adapter really is applied


def test_progress_lines_while_training(tmp_path):
    """Run through the real entry point (a subprocess) and read its progress lines."""
    base = tiny_model_path()
    data = write_fruit_data(tmp_path / "data")
    cfg = write_config(tmp_path / "run.yaml", run_config(
        name="progress", method="GRPO", base=base, output=str(tmp_path / "out"),
        datasets=[{"name": "prompts", "uri": data["grpo"]}],
        hp={"maxSteps": 3, "batchSize": 8, "numGenerations": 4, "maxCompletionLength": 4}, reward_spec=FRUIT_REWARD_SPEC))
    p = subprocess.run([sys.executable, "-m", "perennial_trainer", "--config", cfg, "--learning-rate", "1e-4"],
                       cwd=REPO, env=trainer_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = progress_lines(p.stdout)
    steps = [l for l in lines if l["phase"] == "Training" and l["step"] > 0]
    assert [l["step"] for l in steps] == [1, 2, 3]
    for l in steps:
        assert set(l) >= {"step", "totalSteps", "loss", "meanReward", "rewards", "fracRewardZeroStd", "etaSeconds", "epoch"}
        assert l["totalSteps"] == 3 and set(l["rewards"]) == {"format", "correct"}
    term = json.loads((tmp_path / "termination-log").read_text())
    assert term["status"] == "Succeeded" and term["artifactUri"] == str(tmp_path / "out")
    cfg_used = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert cfg_used["lineage"]["trainingRun"] == "progress"


def test_sigkilled_run_resumes_from_checkpoint(tmp_path):
    base = tiny_model_path()
    data = write_fruit_data(tmp_path / "data")
    ckpt = tmp_path / "ckpt"
    cfg = write_config(tmp_path / "run.yaml", run_config(
        name="resume", method="SFT", base=base, output=str(tmp_path / "out"), checkpoint_dir=str(ckpt),
        datasets=[{"name": "format", "uri": data["sft"]}], hp={"learningRate": "1e-3", "maxSteps": 150, "batchSize": 16},
        checkpoint_every=25))
    cmd = [sys.executable, "-m", "perennial_trainer", "train", "--config", cfg]
    first = subprocess.Popen(cmd, cwd=REPO, env=trainer_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(ckpt.glob("checkpoint-*/trainer_state.json")):
        time.sleep(0.05)
    time.sleep(0.3)  # let the checkpoint finish writing, then kill mid-training
    first.send_signal(signal.SIGKILL)
    out1 = first.communicate()[0]
    assert first.returncode == -signal.SIGKILL
    done1 = [l["step"] for l in progress_lines(out1)]
    assert done1 and max(done1) < 150, "the first attempt must be killed before finishing"
    second = subprocess.run(cmd, cwd=REPO, env=trainer_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "PERENNIAL_RESUME" in second.stdout
    lines = progress_lines(second.stdout)
    assert lines[0]["resumedFromStep"] >= 25 and lines[0]["step"] >= 25
    assert lines[-1]["step"] == 150
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["train/resumed_from_step"] >= 25 and metrics["train/steps"] == 150


def test_sft_on_chat_messages_from_parquet_on_a_pvc(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("PERENNIAL_PVC_ROOT", str(tmp_path / "pvc"))
    (tmp_path / "pvc" / "data").mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": r["prompt"][0]["content"]},
                          {"role": "assistant", "content": f"<answer>{r['answer']}</answer>"}]} for r in fruit_rows()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pvc" / "data" / "chat.parquet")
    res, _ = _train(tmp_path, "chat", run_config(
        name="chat", method="SFT", base=tiny_model_path(), output="pvc://data/out",
        datasets=[{"name": "chat", "uri": "pvc://data/chat.parquet"}], hp={"maxSteps": 3, "batchSize": 8},
        reward_spec=FRUIT_REWARD_SPEC, evaluation={"enabled": True, "heldOutPercent": 10}))
    assert res["artifactUri"] == "pvc://data/out"
    assert (tmp_path / "pvc" / "data" / "out" / "adapter_model.safetensors").is_file()
    assert res["metrics"]["eval/samples"] == 5 and "eval/baseline_mean_reward" in res["metrics"]


def test_dpo_from_a_feedback_snapshot_reports_what_it_used_and_dropped(tmp_path):
    """Feedback as the sidecar stores it -> a snapshot document -> a DPO adapter; the counts reach the result."""
    import hashlib

    from perennial.api import FeedbackRecord, InteractionRecord

    store = tmp_path / "store"
    recs = []
    for i, r in enumerate(fruit_rows()):
        good, bad = f"g{i}", f"b{i}"
        recs += [InteractionRecord(id=good, deployment="chat", messages=r["prompt"], response=f"<answer>{r['answer']}</answer>"),
                 InteractionRecord(id=bad, deployment="chat", messages=r["prompt"], response="<answer>blue</answer>" if r["answer"] != "blue" else "<answer>red</answer>"),
                 FeedbackRecord(response_id=good, type="thumbs", thumbs="up", deployment="chat"),
                 FeedbackRecord(response_id=bad, type="thumbs", thumbs="down", deployment="chat")]
    long_q = [{"role": "user", "content": "colour of " + "banana " * 200}]  # > maxLength: it would be cut, not trained on
    recs += [InteractionRecord(id="long-g", deployment="chat", messages=long_q, response="<answer>yellow</answer>"),
             InteractionRecord(id="long-b", deployment="chat", messages=long_q, response="<answer>blue</answer>"),
             FeedbackRecord(response_id="long-g", type="thumbs", thumbs="up", deployment="chat"),
             FeedbackRecord(response_id="long-b", type="thumbs", thumbs="down", deployment="chat")]
    recs += [FeedbackRecord(response_id="nobody-served-this", type="score", score=1.0, deployment="chat"),
             FeedbackRecord(response_id="g0", type="score", score=1000.0, deployment="chat")]  # forged
    data = "".join(x.to_json() + "\n" for x in recs).encode()
    seg = "chat/2026/11/29/pod-a-00000001.jsonl"
    (store / seg).parent.mkdir(parents=True)
    (store / seg).write_bytes(data)
    snap = "chat/_perennial/snapshots/chat-00000001.json"
    (store / snap).parent.mkdir(parents=True)
    (store / snap).write_text(json.dumps({"kind": "FeedbackSnapshot", "deployment": "chat", "segments": [
        {"name": seg, "offset": 0, "length": len(data), "sha256": hashlib.sha256(data).hexdigest()}]}))
    res, _ = _train(tmp_path, "fb", run_config(
        name="fb", method="DPO", base=tiny_model_path(), output=str(tmp_path / "out"), hp={"maxSteps": 2, "batchSize": 8, "maxLength": 128},
        datasets=[{"name": "fb", "feedback": {"deploymentRef": {"name": "chat"}, "storeUri": str(store), "snapshot": snap}}]))
    n = len(fruit_rows())
    m = res["metrics"]
    assert m["data/feedback_rows"] == n and m["data/feedback_records"] == 4 * n + 6
    assert m["data/dropped/interactionMissing"] == 1 and m["data/dropped/scoreOutOfRange"] == 1 and m["data/dropped/tooLong"] == 1
    assert f"feedback 'fb': {n} rows" in res["message"] and "scoreOutOfRange 1" in res["message"] and "tooLong 1" in res["message"]
    lineage = json.loads((tmp_path / "out" / "manifest.json").read_text())["lineage"]["datasets"][0]
    assert lineage["uri"] == f"{store}/{snap}" and lineage["sha256"] == hashlib.sha256((store / snap).read_bytes()).hexdigest()
    assert lineage["feedback"]["dropped"] == {"interactionMissing": 1, "scoreOutOfRange": 1, "tooLong": 1}


def test_grpo_from_feedback_prompts_with_the_human_feedback_grader(tmp_path):
    """GRPO on the prompts of the feedback, graded by the RewardSpec including a HumanFeedback grader: unrated
    prompts (the first one here) and rated ones train together (every row has the rating column)."""
    from perennial.api import FeedbackRecord, InteractionRecord

    store = tmp_path / "store"
    recs = []
    for i, r in enumerate(fruit_rows()[:16]):
        recs.append(InteractionRecord(id=f"r{i}", deployment="chat", messages=r["prompt"], response=f"<answer>{r['answer']}</answer>"))
        if i:  # the first prompt is unrated
            recs.append(FeedbackRecord(response_id=f"r{i}", type="thumbs", thumbs="up", deployment="chat"))
    seg = store / "chat" / "2026" / "11" / "29" / "pod-a-00000001.jsonl"
    seg.parent.mkdir(parents=True)
    seg.write_text("".join(x.to_json() + "\n" for x in recs))
    spec = {"graders": [FRUIT_REWARD_SPEC["graders"][0], {"name": "human", "type": "HumanFeedback", "humanFeedback": {"missingScore": "0.25"}}]}
    res, _ = _train(tmp_path, "grpo-fb", run_config(
        name="grpo-fb", method="GRPO", base=tiny_model_path(), output=str(tmp_path / "out"), reward_spec=spec,
        hp={"maxSteps": 2, "batchSize": 8, "numGenerations": 4, "maxCompletionLength": 8},
        datasets=[{"name": "fb", "feedback": {"deploymentRef": {"name": "chat"}, "storeUri": str(store)}}]))
    assert res["metrics"]["data/feedback_rows"] == 16 and res["metrics"]["train/steps"] == 2
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    # each step holds a rated prompt (1.0): the rating column survived the unrated first row (0.25, missingScore)
    assert progress["rewards"]["human"] > 0.25
