"""Progress reporting: stdout progress lines, `progress.json`, and the termination message.

Progress line (one per logging step, on stdout)::

    PERENNIAL_PROGRESS {"step": 12, "totalSteps": 40, "loss": 0.031, "meanReward": 1.62,
                        "rewards": {"format": 0.97, "correct": 0.65}, "fracRewardZeroStd": 0.25,
                        "etaSeconds": 21, "epoch": 3.0, "resumedFromStep": 0}

Keys with no value yet (e.g. `meanReward` for SFT) are null. The same object (plus
`updatedAt`) is rewritten atomically to `progress.json`.

Termination message (`/dev/termination-log`, or `$PERENNIAL_TERMINATION_LOG`), compact JSON < 4 KB::

    {"status": "Succeeded"|"Failed", "reason": "...", "message": "...", "artifactUri": "...",
     "metrics": {"eval/mean_reward": 1.9, ...}, "lineage": {...}}
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger("perennial_trainer")

PROGRESS_PREFIX = "PERENNIAL_PROGRESS "
TERMINATION_LIMIT = 4096


def termination_log_path() -> str:
    return os.environ.get("PERENNIAL_TERMINATION_LOG", "/dev/termination-log")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _num(v: Any) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def write_termination(result: dict[str, Any], path: str | None = None) -> str:
    """Write `result` as compact JSON under 4 KB (trimming metrics, then lineage, then the message)."""
    path = path or termination_log_path()
    res = dict(result)

    def dump() -> str:
        return json.dumps(res, separators=(",", ":"), sort_keys=False)

    text = dump()
    if len(text.encode()) > TERMINATION_LIMIT and isinstance(res.get("metrics"), dict):
        keep = {k: v for k, v in res["metrics"].items() if k.startswith("eval/") or k in ("train/loss", "train/mean_reward")}
        res["metrics"] = keep
        text = dump()
    if len(text.encode()) > TERMINATION_LIMIT and isinstance(res.get("lineage"), dict):
        lin = dict(res["lineage"])
        lin.pop("datasets", None)
        res["lineage"] = lin
        text = dump()
    while len(text.encode()) > TERMINATION_LIMIT and len(res.get("message", "")) > 64:
        res["message"] = res["message"][: len(res["message"]) // 2] + "…"
        text = dump()
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        log.warning("cannot write termination message to %s: %s", path, e)
    return text


class ProgressCallback(TrainerCallback):
    """Emits progress lines, keeps `progress.json` and a history for the curves, warns on flat rewards."""

    def __init__(self, progress_paths: list[str], grader_names: list[str] | None = None, stream=None):
        self.paths = progress_paths
        self.grader_names = grader_names or []
        self.stream = stream or sys.stdout
        self.history: list[dict[str, Any]] = []
        self.start_step = 0
        self.t0 = time.monotonic()
        self.zero_std_streak = 0
        self.warned = False
        self.last: dict[str, Any] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step
        self.t0 = time.monotonic()
        if self.start_step:
            log.info("resumed from checkpoint at step %d of %d", self.start_step, state.max_steps)
        self._emit(state, {}, phase="Training")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "train_runtime" in logs:  # the summary log at the end
            return
        rec = {"step": state.global_step, **{k: v for k, v in logs.items() if _num(v) is not None}}
        self.history.append(rec)
        self._emit(state, logs, phase="Training")

    def on_train_end(self, args, state, control, **kwargs):
        self._emit(state, {}, phase="Trained")

    def _emit(self, state, logs: dict[str, Any], phase: str) -> None:
        step, total = state.global_step, state.max_steps
        done = step - self.start_step
        elapsed = time.monotonic() - self.t0
        eta = int(round(elapsed / done * (total - step))) if done > 0 and total else None
        rewards = {}
        for k, v in logs.items():
            if k.startswith("rewards/") and k.endswith("/mean"):
                rewards[k[len("rewards/"):-len("/mean")]] = _num(v)
        mean_reward = _num(logs.get("reward"))
        frac = _num(logs.get("frac_reward_zero_std"))
        obj = {
            "step": step, "totalSteps": total,
            "loss": _num(logs.get("loss", self.last.get("loss"))),
            "meanReward": mean_reward if mean_reward is not None else self.last.get("meanReward"),
            "rewards": rewards or self.last.get("rewards", {}),
            "fracRewardZeroStd": frac if frac is not None else self.last.get("fracRewardZeroStd"),
            "etaSeconds": eta if phase == "Training" else 0,
            "epoch": _num(state.epoch) if state.epoch is not None else None,
            "resumedFromStep": self.start_step,
            "phase": phase,
        }
        self.last = obj
        self.stream.write(PROGRESS_PREFIX + json.dumps(obj, separators=(",", ":")) + "\n")
        self.stream.flush()
        if frac is not None:
            self.zero_std_streak = self.zero_std_streak + 1 if frac >= 1.0 else 0
            if frac >= 1.0 and not self.warned:
                msg = (f"WARNING: frac_reward_zero_std == 1 at step {step}: every group of completions got the "
                       "same reward, so GRPO has NO learning signal. Check the graders (RewardSpec tests), "
                       "raise temperature/num_generations, or warm up with SFT first.")
                log.warning(msg)
                print("!" * 80 + "\n" + msg + "\n" + "!" * 80, file=sys.stderr, flush=True)
                self.warned = True
        stamped = dict(obj, updatedAt=_dt.datetime.now(_dt.timezone.utc).isoformat())
        for p in self.paths:
            try:
                atomic_write_json(p, stamped)
            except OSError as e:
                log.debug("cannot write %s: %s", p, e)
