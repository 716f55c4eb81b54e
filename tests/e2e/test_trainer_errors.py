"""Permanent trainer failures exit with their own codes (perennial.api.exitcodes), so the Job's
podFailurePolicy ends the run at once; the termination message still says why. Retries are new pods:
an object-store run resumes from the checkpoint it mirrored there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinymodel import tiny_model_path  # noqa: E402
from trainer_support import FRUIT_REWARD_SPEC, REPO, progress_lines, run_config, trainer_env, write_config, write_fruit_data  # noqa: E402

from perennial.api.exitcodes import PERMANENT_EXIT_CODES  # noqa: E402


def _main(tmp: Path, cfg: dict | str, *extra: str) -> tuple[int, dict]:
    from perennial_trainer.cli import main

    path = cfg if isinstance(cfg, str) else write_config(tmp / "run.yaml", cfg)
    term = tmp / "termination"
    rc = main(["--config", path, "--termination-log", str(term), *extra])
    return rc, json.loads(term.read_text())


def _cfg(tmp: Path, **kw) -> dict:
    kw.setdefault("datasets", [{"name": "d", "uri": str(tmp / "d.jsonl")}])
    return run_config(name="r", method=kw.pop("method", "SFT"), base=kw.pop("base", str(tmp / "no-model")),
                      output=str(tmp / "out"), **kw)


def test_missing_dataset_exits_11_as_a_process_with_the_reason(tmp_path):
    path = write_config(tmp_path / "run.yaml", _cfg(tmp_path, datasets=[{"name": "d", "uri": str(tmp_path / "gone.jsonl")}]))
    p = subprocess.run([sys.executable, "-m", "perennial_trainer", "train", "--config", path], cwd=REPO,
                       env=trainer_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert p.returncode == 11, p.stderr[-2000:]
    term = json.loads((tmp_path / "termination-log").read_text())
    assert term["status"] == "Failed" and term["reason"] == "DatasetNotFound" and "gone.jsonl" in term["message"]


@pytest.mark.parametrize("case,code,reason", [
    ("unknown-field", 10, "InvalidConfig"),
    ("grpo-batch", 10, "InvalidConfig"),
    ("reward-spec-schema", 12, "InvalidRewardSpec"),
    ("python-grader-syntax", 12, "InvalidRewardSpec"),
    ("regex-grader", 12, "InvalidRewardSpec"),
    ("unreadable-dataset", 11, "InvalidDataset"),
    ("base-model", 13, "NotFound"),
])
def test_permanent_failures_exit_with_their_code(tmp_path, case, code, reason):
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "colour of a lemon?", "answer": "yellow"}) + "\n")
    grpo = dict(method="GRPO", reward_spec=FRUIT_REWARD_SPEC, hp={"batchSize": 8, "numGenerations": 4})
    if case == "unknown-field":
        cfg = _cfg(tmp_path)
        cfg["spec"]["hyperparameters"]["learningRat"] = "1e-3"
    elif case == "grpo-batch":  # checked before the (missing) data and model are touched
        cfg = _cfg(tmp_path, **{**grpo, "hp": {"batchSize": 12, "numGenerations": 8}})
    elif case == "reward-spec-schema":
        cfg = _cfg(tmp_path, **{**grpo, "reward_spec": {"graders": [{"name": "g", "type": "Regex", "regex": {"pattern": "a", "mood": "x"}}]}})
    elif case == "python-grader-syntax":
        cfg = _cfg(tmp_path, **{**grpo, "reward_spec": {"graders": [{"name": "py", "type": "Python", "python": {"source": "def grade(s, i) return 1"}}]}})
    elif case == "regex-grader":
        cfg = _cfg(tmp_path, **{**grpo, "reward_spec": {"graders": [{"name": "re", "type": "Regex", "regex": {"pattern": "(unclosed"}}]}})
    elif case == "unreadable-dataset":
        (tmp_path / "d.jsonl").write_text("{not json\n")
        cfg = _cfg(tmp_path)
    else:  # valid SFT rows, the base model is missing
        (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "colour of a lemon?", "completion": "yellow"}) + "\n")
        cfg = _cfg(tmp_path)
    rc, term = _main(tmp_path, cfg)
    assert (rc, term["reason"]) == (code, reason), term
    assert rc in PERMANENT_EXIT_CODES and term["status"] == "Failed" and term["message"]
    if case == "python-grader-syntax":
        assert "grader 'py'" in term["message"] and "`python.source` must be valid Python" in term["message"]


def test_unexpected_crash_exits_1_and_is_retried(tmp_path, monkeypatch):
    import perennial_trainer.train as train

    def crash(cfg):
        raise OSError("connection reset by peer")

    monkeypatch.setattr(train, "run", crash)
    rc, term = _main(tmp_path, _cfg(tmp_path))
    assert rc == 1 and rc not in PERMANENT_EXIT_CODES
    assert term["reason"] == "TrainerCrashed" and "connection reset" in term["message"]


class _Killed(BaseException):
    """Stands for the pod dying right after its first mirrored checkpoint (BaseException: nothing catches it)."""


def test_object_store_run_resumes_in_a_new_pod_from_its_mirrored_checkpoint(tmp_path, monkeypatch, capsys):
    import fsspec

    from perennial_trainer import checkpoints

    fs = fsspec.filesystem("memory")
    data = write_fruit_data(tmp_path / "data")
    out = "memory://bucket/team/resume"
    cfg = lambda pod: run_config(  # noqa: E731  every pod has its own, empty, local checkpoint dir (an emptyDir)
        name="resume", method="SFT", base=tiny_model_path(), output=out, checkpoint_dir=str(tmp_path / pod / "ckpt"),
        datasets=[{"name": "format", "uri": data["sft"]}], hp={"learningRate": "1e-3", "maxSteps": 40, "batchSize": 8},
        checkpoint_every=10)
    real_upload = checkpoints.upload_checkpoint

    def upload_then_die(local, remote):
        real_upload(local, remote)
        raise _Killed()

    monkeypatch.setattr(checkpoints, "upload_checkpoint", upload_then_die)
    with pytest.raises(_Killed):
        _main(tmp_path, write_config(tmp_path / "pod1.yaml", cfg("pod1")))
    assert fs.exists("/bucket/team/resume/checkpoints/checkpoint-10/COMPLETE")
    capsys.readouterr()

    monkeypatch.setattr(checkpoints, "upload_checkpoint", real_upload)
    rc, term = _main(tmp_path, write_config(tmp_path / "pod2.yaml", cfg("pod2")))
    stdout = capsys.readouterr().out
    assert rc == 0, term
    assert "PERENNIAL_RESUME" in stdout
    assert progress_lines(stdout)[0]["resumedFromStep"] == 10
    assert term["metrics"]["train/resumed_from_step"] == 10 and term["metrics"]["train/steps"] == 40
    assert fs.exists("/bucket/team/resume/adapter_model.safetensors")
    assert not fs.exists("/bucket/team/resume/checkpoints")  # the mirror is removed after success


def test_restore_ignores_an_incomplete_mirrored_checkpoint(tmp_path):
    import fsspec

    from perennial_trainer import checkpoints

    fs = fsspec.filesystem("memory")
    remote = "memory://bucket/partial/checkpoints"
    for step in (5, 10):
        local = tmp_path / "local" / f"checkpoint-{step}"
        local.mkdir(parents=True)
        (local / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        checkpoints.upload_checkpoint(local, remote)
    assert [p.rsplit("/", 1)[-1] for p in fs.ls("/bucket/partial/checkpoints", detail=False)] == ["checkpoint-10"]
    fs.pipe_file("/bucket/partial/checkpoints/checkpoint-15/trainer_state.json", b"{}")  # upload cut short: no COMPLETE
    restored = checkpoints.restore_checkpoint(remote, tmp_path / "pod2")
    assert restored == str(tmp_path / "pod2" / "checkpoint-10")
    assert json.loads((tmp_path / "pod2" / "checkpoint-10" / "trainer_state.json").read_text()) == {"global_step": 10}
    assert not (tmp_path / "pod2" / "checkpoint-10" / checkpoints.COMPLETE).exists()
    assert checkpoints.restore_checkpoint("memory://bucket/none/checkpoints", tmp_path / "pod3") is None


@pytest.mark.parametrize("parent_field", [{"parentTrainingRunRef": {"name": "first"}}, {"parentAdapterFamily": "fruit"}])
def test_parent_named_by_run_or_family_continues_the_resolved_adapter(tmp_path, parent_field):
    data = write_fruit_data(tmp_path / "data")
    first = run_config(name="first", method="SFT", base=tiny_model_path(), output=str(tmp_path / "first"),
                       datasets=[{"name": "d", "uri": data["sft"]}], hp={"maxSteps": 2, "batchSize": 8})
    rc, term = _main(tmp_path, first)
    assert rc == 0, term
    second = run_config(name="second", method="SFT", base=tiny_model_path(), output=str(tmp_path / "second"),
                        datasets=[{"name": "d", "uri": data["sft"]}], hp={"maxSteps": 2, "batchSize": 8})
    second["spec"].update(parent_field)
    second["parentAdapterUri"] = str(tmp_path / "first")  # what the operator resolved
    rc, term = _main(tmp_path, write_config(tmp_path / "second.yaml", second))
    assert rc == 0, term
    assert term["lineage"]["parentAdapter"] == {"ref": None, "uri": str(tmp_path / "first")}
