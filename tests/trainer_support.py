"""Helpers for trainer tests and the overhead benchmark: run configs for the fruit→colour toy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from perennial_trainer.demo import write_fruit_data  # noqa: F401  (the demo's data is the tests' data)

REPO = Path(__file__).resolve().parents[1]

FRUIT_REWARD_SPEC: dict[str, Any] = {
    "description": "answer in <answer>colour</answer> form, with the right colour",
    "graders": [
        {"name": "format", "type": "Regex", "regex": {"pattern": "<answer>[a-z]+</answer>", "mode": "FullMatch"}},
        {"name": "correct", "type": "StringCheck", "stringCheck": {"operation": "Equals", "reference": "<answer>{{item.answer}}</answer>"}},
    ],
    "tests": [
        {"name": "right", "completion": "<answer>red</answer>", "item": {"answer": "red"}, "expect": {"min": "2", "max": "2"}},
        {"name": "wrong-colour", "completion": "<answer>blue</answer>", "item": {"answer": "red"}, "expect": {"min": "1", "max": "1"}},
        {"name": "unformatted", "completion": "red", "item": {"answer": "red"}, "expect": {"max": "0"}},
    ],
}


def run_config(*, name: str, method: str, base: str, output: str, datasets: list[dict], hp: dict | None = None,
               parent: str | None = None, reward_spec: dict | None = None, evaluation: dict | None = None,
               checkpoint_dir: str | None = None, checkpoint_every: int = 50, lora: dict | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "method": method, "baseModelRef": {"name": "tiny"}, "datasets": datasets,
        "hyperparameters": hp or {}, "lora": lora or {"rank": 8, "alpha": 16, "dropout": "0"},
        "evaluation": evaluation or {"enabled": False}, "output": {"adapterFamily": "fruit"},
        "runPolicy": {"checkpointEverySteps": checkpoint_every},
    }
    if parent:
        spec["parentAdapterRef"] = {"name": "parent"}
    if reward_spec:
        spec["rewardSpecRef"] = {"name": "fruit"}
    cfg: dict[str, Any] = {"runName": name, "namespace": "test", "spec": spec, "baseModelUri": base, "outputUri": output}
    if parent:
        cfg["parentAdapterUri"] = parent
    if reward_spec:
        cfg["rewardSpec"] = reward_spec
    if checkpoint_dir:
        cfg["checkpointDir"] = checkpoint_dir
    return cfg


def write_config(path: str | os.PathLike, cfg: dict[str, Any]) -> str:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def trainer_env(tmp: str | os.PathLike, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PERENNIAL_TERMINATION_LOG"] = str(Path(tmp) / "termination-log")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("OMP_NUM_THREADS", None)  # the trainer picks 1 thread for tiny models on CPU
    env.update(extra)
    return env


def run_trainer(args: list[str], tmp: str | os.PathLike, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "perennial_trainer", *args], cwd=REPO, env=trainer_env(tmp, **env),
                          capture_output=True, text=True, timeout=timeout)


def progress_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(l.split(" ", 1)[1]) for l in stdout.splitlines() if l.startswith("PERENNIAL_PROGRESS ")]
