"""Never silent: whether a run learned and whether its adapter beat its parent, as conditions (pure).

The trainer (`perennial_trainer.signals`) judges the run and reports `warnings` in its result and progress lines,
with the numbers in its metrics; here they become conditions on the TrainingRun and its Adapter:

- `LearningSignal` False `NoRewardVariance` / `RewardCollapsed` (GRPO);
- `Improved` False `WorseThanParent` (`WorseThanBase` without a parent): the held-out mean reward is below the
  baseline's; True `NotWorseThanParent` / `NotWorseThanBase` otherwise (only when the run was evaluated).

Both are health conditions: turning False makes a Warning Event. `status.warnings` lists the reasons of those that
are False (the `Warnings` printer column of `kubectl get tr` / `kubectl get adapter`).
"""

from __future__ import annotations

from typing import Any

from ..resources import conditions as cond
from .base import default_event_type

#: `LearningSignal` reasons the trainer may report (anything else from the pod is ignored), most fundamental first.
TRAINER_REASONS = ("NoRewardVariance", "RewardCollapsed")
WARNING_CONDITIONS = ("LearningSignal", "Improved")


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def trainer_warning(warnings: Any) -> tuple[str, str] | None:
    """The most fundamental known `LearningSignal` warning of a trainer result: (reason, message)."""
    found = {}
    for w in warnings if isinstance(warnings, list) else []:
        if isinstance(w, dict) and w.get("reason") in TRAINER_REASONS:
            found.setdefault(w["reason"], str(w.get("message") or w["reason"])[:1024])
    for r in TRAINER_REASONS:
        if r in found:
            return r, found[r]
    return None


def from_metrics(metrics: list[dict[str, Any]] | None) -> tuple[str, str] | None:
    """The `LearningSignal` warning the trainer's metric flags say (for an Adapter: it has only the metrics)."""
    by = {m.get("name"): m.get("value") for m in metrics or []}
    if _num(by.get("train/no_reward_variance")) == 1:
        return "NoRewardVariance", (f"in {_num(by.get('train/flat_steps_share')) or 1:.0%} of the logged training steps every group of "
                                    "completions got the same reward: GRPO had no signal to learn from")
    if _num(by.get("train/reward_collapsed")) == 1:
        return "RewardCollapsed", (f"the training reward fell from {by.get('train/early_mean_reward')} (first quarter of the steps) to "
                                   f"{by.get('train/late_mean_reward')} (last quarter)")
    return None


def improved(metrics: list[dict[str, Any]] | None, conds: Any, gen: int | None, *, has_parent: bool) -> Any:
    """`Improved` from the held-out evaluation in `metrics` (status form: name/value strings); unchanged without one."""
    by = {m.get("name"): m.get("value") for m in metrics or []}
    new, base = _num(by.get("eval/mean_reward")), _num(by.get("eval/baseline_mean_reward"))
    if new is None or base is None:
        return conds
    diff = _num(by.get("eval/improvement"))
    diff = new - base if diff is None else diff
    who, suffix = ("its parent's", "Parent") if has_parent else ("the base model's", "Base")
    n = _num(by.get("eval/samples"))
    numbers = (f"held-out mean reward {by['eval/mean_reward']} vs {who} {by['eval/baseline_mean_reward']} ({diff:+.4g})"
               + (f" on {int(n)} prompts" if n else ""))
    if diff < 0:
        return cond.set_condition(conds, "Improved", False, f"WorseThan{suffix}", numbers + "; the adapter is worse than its baseline "
                                  "(set `evaluation.failIfWorseThanParent` to fail such runs)", gen)
    return cond.set_condition(conds, "Improved", True, f"NotWorseThan{suffix}", numbers, gen)


def event_for(c: dict[str, Any]) -> str | None:
    """`Improved` True is status only (an Event for every adapter that did not get worse would be noise); the
    rest as the default: a Warning when a health condition turns False."""
    if c["type"] == "Improved" and c["status"] == "True":
        return None
    return default_event_type(c)


def warnings_text(conds: Any) -> str | None:
    """`status.warnings`: the reasons of the warning conditions that are False, comma-separated."""
    out = [c.get("reason") or t for t in WARNING_CONDITIONS if (c := cond.get(conds, t)) and c.get("status") == "False"]
    return ",".join(out) or None
