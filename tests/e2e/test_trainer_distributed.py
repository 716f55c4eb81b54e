"""Two trainer processes in one pod (torchrun, gloo on CPU) through the real entrypoint
(`python -m perennial_trainer train --nproc-per-node 2`): one set of progress lines, one result, one artifact
that loads like a single-process one, resume after a SIGKILL of the pod's processes, and the loss curve of a
single-process run with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinymodel import tiny_model_path
from trainer_support import (
    FRUIT_REWARD_SPEC,
    REPO,
    progress_lines,
    run_config,
    trainer_env,
    write_config,
    write_fruit_data,
)

pytestmark = pytest.mark.slow

TIMEOUT = 600  # a busy 2-core machine: a 2-process start alone takes ~15 s


def _cmd(cfg: str, nproc: int) -> list[str]:
    return [sys.executable, "-m", "perennial_trainer", "train", "--config", cfg, "--nproc-per-node", str(nproc)]


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _config(tmp: Path, method: str, *, steps: int, batch: int, every: int = 1000, name: str = "run", lr: str = "1e-3") -> str:
    data = write_fruit_data(tmp / "data")
    if method == "SFT":
        hp = {"learningRate": lr, "maxSteps": steps, "batchSize": batch, "seed": 7}
        ds = [{"name": "format", "uri": data["sft"]}]
        extra = {}
    else:
        hp = {"learningRate": "1e-4", "maxSteps": steps, "batchSize": batch, "numGenerations": 4, "maxCompletionLength": 4, "seed": 7}
        ds = [{"name": "prompts", "uri": data["grpo"]}]
        extra = {"reward_spec": FRUIT_REWARD_SPEC}
    return write_config(tmp / f"{name}.yaml", run_config(
        name=name, method=method, base=tiny_model_path(), output=str(tmp / f"out-{name}"), checkpoint_dir=str(tmp / f"ckpt-{name}"),
        datasets=ds, hp=hp, checkpoint_every=every, **extra))


def _one_set(lines: list[dict]) -> list[int]:
    steps = [l["step"] for l in lines if l["phase"] == "Training" and l["step"] > 0]
    assert steps == sorted(set(steps)), f"progress lines repeated (more than one process reporting?): {steps}"
    return steps


def _loads_and_generates(adapter: str) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_model_path()
    tok = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What colour is a banana?"}], tokenize=False, add_generation_prompt=True)
    enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        g = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert any(n.startswith("base_model.model.") and "lora_" in n for n, _ in model.named_parameters())
    return tok.decode(g[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("method,steps,batch,every", [("SFT", 40, 8, 8), ("GRPO", 24, 4, 4)])
def test_two_processes_write_once_and_resume_after_a_kill(tmp_path, method, steps, batch, every):
    cfg = _config(tmp_path, method, steps=steps, batch=batch, every=every)
    ckpt = tmp_path / "ckpt-run"
    env = trainer_env(tmp_path)
    # The pod is killed: every process of it at once (its own session here, as a container's processes).
    first = subprocess.Popen(_cmd(cfg, 2), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and not any(ckpt.glob("checkpoint-*/trainer_state.json")) and first.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    workers = _children(first.pid)
    os.killpg(first.pid, signal.SIGKILL)
    out1, err1 = first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL, err1[-3000:]
    assert len(workers) >= 1
    done1 = _one_set(progress_lines(out1))
    assert done1 and max(done1) < steps, "the first attempt must be killed before finishing"
    assert "PERENNIAL_RESULT" not in out1

    second = subprocess.run(_cmd(cfg, 2), cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert second.returncode == 0, second.stderr[-4000:]
    assert second.stdout.count("PERENNIAL_RESUME") == 1 and second.stdout.count("PERENNIAL_RESULT ") == 1
    if method == "SFT":  # the other rank stays quiet: no second set of progress bars
        assert second.stderr.count("Tokenizing train dataset: 100%") == 1, second.stderr[-3000:]
    lines = progress_lines(second.stdout)
    steps2 = _one_set(lines)
    assert lines[0]["resumedFromStep"] >= every and steps2[0] == lines[0]["resumedFromStep"] and steps2[-1] == steps
    assert [l["phase"] for l in lines].count("Trained") == 1
    term = json.loads((tmp_path / "termination-log").read_text())
    assert term["status"] == "Succeeded" and term["metrics"]["train/steps"] == steps
    assert term["metrics"]["train/resumed_from_step"] >= every
    assert term["metrics"]["train/processes"] == 2 and term["metrics"]["train/fsdp"] == 0  # DDP (gloo)
    out = Path(term["artifactUri"])
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "metrics.json", "manifest.json", "progress.json", "curves.png"):
        assert (out / f).is_file(), f
    assert not (out / "training_args.bin").exists()
    # 2 processes x batch per step: an epoch is covered in half the steps of one process
    rows = 48 if method == "SFT" else len(Path(write_fruit_data(tmp_path / "data")["grpo"]).read_text().splitlines())
    per_step = 2 * batch if method == "SFT" else 2 * batch // 4  # GRPO: prompts (batch counts completions)
    assert term["metrics"]["train/epoch"] == pytest.approx(steps * per_step / rows, rel=0.05)
    if method == "GRPO":
        assert set(lines[-1]["rewards"]) == {"format", "correct"}
    assert isinstance(_loads_and_generates(str(out)), str)


def test_a_killed_launcher_takes_its_workers_with_it(tmp_path):
    """SIGKILL of the launcher alone (not its session): no orphan worker trains on next to a retried run."""
    cfg = _config(tmp_path, "SFT", steps=100000, batch=8, every=100000)
    p = subprocess.Popen(_cmd(cfg, 2), cwd=REPO, env=trainer_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        seen = ""
        while time.monotonic() < deadline and '"step":2,' not in seen:
            line = p.stdout.readline()
            assert line or p.poll() is None, "the run ended before training"
            seen += line
        workers = _children(p.pid)
        assert len(workers) == 2, workers
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "workers outlived their launcher"
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_failing_worker_fails_the_run_with_its_permanent_exit_code(tmp_path):
    """A bad dataset: every worker fails the same way; rank 0's termination message and exit code (11) reach the pod."""
    cfg = _config(tmp_path, "SFT", steps=2, batch=8)
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(cfg).read_text().replace(str(tmp_path / "data" / "sft.jsonl"), str(tmp_path / "missing.jsonl")))
    p = subprocess.run(_cmd(str(bad), 2), cwd=REPO, env=trainer_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 11, p.stderr[-3000:]
    term = json.loads((tmp_path / "termination-log").read_text())
    assert term["status"] == "Failed" and term["reason"] == "DatasetNotFound", term


def test_loss_curve_matches_one_process_with_the_same_global_batch(tmp_path):
    """DDP averages the gradients of the two halves of a batch of 16: the 2 x 8 curve is the 1 x 16 one."""
    steps = 12
    curves = {}
    for nproc, batch in ((1, 16), (2, 8)):
        cfg = _config(tmp_path, "SFT", steps=steps, batch=batch, name=f"p{nproc}")
        p = subprocess.run(_cmd(cfg, nproc), cwd=REPO, env=trainer_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT)
        assert p.returncode == 0, p.stderr[-3000:]
        curves[nproc] = [l["loss"] for l in progress_lines(p.stdout) if l["phase"] == "Training" and l["step"] > 0]
    print("\nSFT loss, 1 process x batch 16:", " ".join(f"{x:.4f}" for x in curves[1]))
    print("SFT loss, 2 processes x batch 8:", " ".join(f"{x:.4f}" for x in curves[2]))
    assert len(curves[1]) == len(curves[2]) == steps
    assert curves[1][-1] < curves[1][0] - 1.0  # it learns (so equal curves are not two flat lines)
    for a, b in zip(curves[1], curves[2], strict=True):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-3)


def test_two_pods_one_process_each_join_by_c10d_and_write_once(tmp_path):
    """`--nnodes 2` as the multi-node groups run it (one launcher per pod, c10d rendezvous on pod 0's endpoint):
    one artifact, one result, written by whichever launcher holds global rank 0."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _config(tmp_path, "SFT", steps=6, batch=8, name="nodes")
    procs = []
    for node in (0, 1):
        pod = tmp_path / f"pod{node}"
        pod.mkdir()
        cmd = [sys.executable, "-m", "perennial_trainer", "train", "--config", cfg, "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "run-uid",
               "--termination-log", str(pod / "termination-log")]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=trainer_env(pod), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [out.count("PERENNIAL_RESULT ") for out, _ in outs]
    assert sorted(results) == [0, 1], results
    writer = results.index(1)
    steps = _one_set(progress_lines(outs[writer][0]))
    assert steps[-1] == 6 and not progress_lines(outs[1 - writer][0])
    term = json.loads((tmp_path / f"pod{writer}" / "termination-log").read_text())
    assert term["status"] == "Succeeded" and term["metrics"]["train/processes"] == 2
    assert not (tmp_path / f"pod{1 - writer}" / "termination-log").exists()
    assert term["metrics"]["train/epoch"] == pytest.approx(6 * 16 / 48)
    assert isinstance(_loads_and_generates(term["artifactUri"]), str)
