"""The TRL/transformers callback behind the progress lines (see `perennial_trainer.progress`)."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
import time
from typing import Any

from transformers import TrainerCallback

from .progress import PROGRESS_PREFIX, _num, atomic_write_json
from .signals import train_signals

log = logging.getLogger("perennial_trainer")


class ProgressCallback(TrainerCallback):
    """Emits progress lines, keeps `progress.json` and a history for the curves, warns on flat rewards."""

    def __init__(self, progress_paths: list[str], grader_names: list[str] | None = None, stream=None,
                 remote_uri: str | None = None, remote_every_s: float = 15.0):
        self.paths = progress_paths
        self.remote_uri = remote_uri  # object-store output: progress.json is uploaded at most every `remote_every_s`
        self.remote_every_s = remote_every_s
        self._remote_at = 0.0
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
        if frac is not None:
            self.zero_std_streak = self.zero_std_streak + 1 if frac >= 1.0 else 0
        obj = {
            "step": step, "totalSteps": total,
            "loss": _num(logs.get("loss", self.last.get("loss"))),
            "meanReward": mean_reward if mean_reward is not None else self.last.get("meanReward"),
            "rewards": rewards or self.last.get("rewards", {}),
            "fracRewardZeroStd": frac if frac is not None else self.last.get("fracRewardZeroStd"),
            # logged steps in a row where every group's rewards were equal (the operator warns at 3)
            "zeroStdStreak": self.zero_std_streak,
            # what the run shows so far: `NoRewardVariance`, `RewardCollapsed` (perennial_trainer.signals)
            "warnings": [w["reason"] for w in train_signals(self.history, live=True)[1]],
            "etaSeconds": eta if phase == "Training" else 0,
            "epoch": _num(state.epoch) if state.epoch is not None else None,
            "resumedFromStep": self.start_step,
            "phase": phase,
        }
        self.last = obj
        self.stream.write(PROGRESS_PREFIX + json.dumps(obj, separators=(",", ":")) + "\n")
        self.stream.flush()
        if frac is not None:
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
        now = time.monotonic()
        if self.remote_uri and (phase != "Training" or now - self._remote_at >= self.remote_every_s):
            self._remote_at = now
            try:
                from .storage import filesystem

                fs, path = filesystem(self.remote_uri)
                fs.pipe(path.rstrip("/") + "/progress.json", json.dumps(stamped).encode())
            except Exception as e:  # noqa: BLE001 - progress upload is best effort
                log.debug("cannot upload progress to %s: %s", self.remote_uri, e)
