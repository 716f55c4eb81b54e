"""Whether a run learned anything: the warnings the trainer reports (never silent).

Three verdicts, each a `{"reason", "message"}` warning in the result (termination message) with its numbers in
`metrics.json`, and the live ones also in the progress lines (`warnings`):

- `NoRewardVariance` (GRPO): in most logged steps every group of completions got the same reward
  (TRL's `frac_reward_zero_std` >= `FLAT`): the advantages are all zero and GRPO has nothing to learn from.
- `RewardCollapsed` (GRPO): the training reward of the last quarter of the logged steps fell well below that
  of the first quarter (by more than `COLLAPSE_DROP` of its size, and by at least `COLLAPSE_MIN`).
- `WorseThanParent` / `WorseThanBase`: the held-out mean reward ended below the baseline's (the parent
  adapter's, or the base model's when the run has no parent). With `evaluation.failIfWorseThanParent`
  the run fails with this reason (a permanent failure, `api/exitcodes.py`).

The operator turns them into conditions (`LearningSignal`, `Improved`), Warning Events and the `Warnings`
printer column.
"""

from __future__ import annotations

from typing import Any

#: A step's `frac_reward_zero_std` at or above this: every group had equal rewards.
FLAT = 0.999
#: More than this share of the logged steps flat: no learning signal over the run.
NO_VARIANCE_SHARE = 0.5
#: The late training reward below the early one by more than this fraction of |early| ...
COLLAPSE_DROP = 0.25
#: ... and by at least this much (rewards near 0 wobble).
COLLAPSE_MIN = 0.05
#: Logged reward steps needed before collapse is judged (a quarter of them on each side).
COLLAPSE_MIN_STEPS = 8


def _w(reason: str, message: str) -> dict[str, str]:
    return {"reason": reason, "message": message}


def reward_trend(rewards: list[float]) -> tuple[float, float] | None:
    """(mean of the first quarter, mean of the last quarter) of the logged training rewards."""
    if len(rewards) < COLLAPSE_MIN_STEPS:
        return None
    k = max(1, len(rewards) // 4)
    return sum(rewards[:k]) / k, sum(rewards[-k:]) / k


def collapsed(early: float, late: float) -> bool:
    drop = early - late
    return drop >= COLLAPSE_MIN and drop > COLLAPSE_DROP * abs(early)


def train_signals(history: list[dict[str, Any]], *, live: bool = False) -> tuple[dict[str, float], list[dict[str, str]]]:
    """(metrics, warnings) from the logged GRPO steps (TRL's `reward` and `frac_reward_zero_std`).

    `live`: judged on the steps so far (the progress lines); no-variance then needs a few logged steps."""
    metrics: dict[str, float] = {}
    warnings: list[dict[str, str]] = []
    fz = [float(h["frac_reward_zero_std"]) for h in history if "frac_reward_zero_std" in h]
    if fz and (not live or len(fz) >= 3):
        flat = sum(1 for f in fz if f >= FLAT)
        share = flat / len(fz)
        metrics["train/flat_steps_share"] = share
        metrics["train/no_reward_variance"] = float(share > NO_VARIANCE_SHARE)
        if share > NO_VARIANCE_SHARE:
            warnings.append(_w("NoRewardVariance", (
                f"in {flat} of {len(fz)} logged steps every group of completions got the same reward "
                f"(frac_reward_zero_std = 1; mean {sum(fz) / len(fz):.3g}): GRPO had no signal to learn from; check the graders "
                "(RewardSpec tests; partial credit such as a `Format` grader), raise `temperature` or `numGenerations`, "
                "or warm up with SFT first")))
    rewards = [float(h["reward"]) for h in history if "reward" in h]
    trend = reward_trend(rewards)
    if trend is not None:
        early, late = trend
        metrics["train/early_mean_reward"] = early
        metrics["train/late_mean_reward"] = late
        metrics["train/reward_collapsed"] = float(collapsed(early, late))
        if collapsed(early, late):
            warnings.append(_w("RewardCollapsed", (
                f"the training reward fell from {early:.4g} (first quarter of {len(rewards)} logged steps) to {late:.4g} "
                "(last quarter): the policy got worse at the task; lower `learningRate`, raise `beta` (KL to the parent) "
                "or train fewer steps")))
    return metrics, warnings


def eval_signals(metrics: dict[str, float], *, has_parent: bool) -> list[dict[str, str]]:
    """`WorseThanParent` / `WorseThanBase` when the held-out mean reward ended below the baseline's."""
    if "eval/mean_reward" not in metrics or "eval/baseline_mean_reward" not in metrics:
        return []
    new, old = metrics["eval/mean_reward"], metrics["eval/baseline_mean_reward"]
    worse = new < old
    metrics["eval/worse_than_baseline"] = float(worse)
    if not worse:
        return []
    who = "its parent adapter" if has_parent else "the base model"
    n = int(metrics.get("eval/samples", 0))
    return [_w("WorseThanParent" if has_parent else "WorseThanBase",
               f"held-out mean reward {new:.4g} is below {who}'s {old:.4g} ({new - old:+.4g}) on {n} prompts")]
