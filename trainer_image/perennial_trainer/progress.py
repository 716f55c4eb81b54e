"""Progress reporting: stdout progress lines, `progress.json`, and the termination message.

Progress line (one per logging step, on stdout)::

    PERENNIAL_PROGRESS {"step": 12, "totalSteps": 40, "loss": 0.031, "meanReward": 1.62,
                        "rewards": {"format": 0.97, "correct": 0.65}, "fracRewardZeroStd": 0.25,
                        "etaSeconds": 21, "epoch": 3.0, "resumedFromStep": 0}

Keys with no value yet (e.g. `meanReward` for SFT) are null. The same object (plus
`updatedAt`) is rewritten atomically to `progress.json`.

Everything written here (termination message, progress.json, metrics.json) passes through
`redact.redact` first: no secret value the trainer knows leaves the pod in it.

Termination message (`/dev/termination-log`, or `$PERENNIAL_TERMINATION_LOG`), compact JSON < 4 KB::

    {"status": "Succeeded"|"Failed", "reason": "...", "message": "...", "artifactUri": "...",
     "metrics": {"eval/mean_reward": 1.9, ...}, "lineage": {...}}
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .redact import redact

log = logging.getLogger("perennial_trainer")

PROGRESS_PREFIX = "PERENNIAL_PROGRESS "
TERMINATION_LIMIT = 4096
#: Metrics kept (with every `eval/` one) when the result must be trimmed: what the operator's conditions read.
KEEP_METRICS = ("train/loss", "train/mean_reward", "train/frac_reward_zero_std", "train/frac_reward_zero_std_mean",
                "train/flat_steps_share", "train/no_reward_variance", "train/early_mean_reward", "train/late_mean_reward",
                "train/reward_collapsed")


def termination_log_path() -> str:
    return os.environ.get("PERENNIAL_TERMINATION_LOG", "/dev/termination-log")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = redact(json.dumps(obj, indent=1, sort_keys=True))  # these files leave the pod with the artifact
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _num(v: Any) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _redacted(result: dict[str, Any]) -> dict[str, Any]:
    """`result` with every secret value the process knows replaced (it is copied into the object's status)."""
    text = json.dumps(result, separators=(",", ":"), default=str)
    clean = redact(text)
    if clean == text:
        return dict(result)
    try:
        out = json.loads(clean)
    except ValueError:  # a secret spanning JSON syntax: keep only what cannot carry it
        out = None
    if not isinstance(out, dict):
        out = {k: result[k] for k in ("status", "reason") if isinstance(result.get(k), str) and redact(result[k]) == result[k]}
        out["message"] = "the result held a secret value and was withheld"
    return out


def write_termination(result: dict[str, Any], path: str | None = None) -> str:
    """Write `result` as compact JSON under 4 KB (trimming metrics, then lineage, then the message)."""
    path = path or termination_log_path()
    res = _redacted(result)

    def dump() -> str:
        return json.dumps(res, separators=(",", ":"), sort_keys=False)

    text = dump()
    if len(text.encode()) > TERMINATION_LIMIT and isinstance(res.get("metrics"), dict):
        keep = {k: v for k, v in res["metrics"].items() if k.startswith("eval/") or k in KEEP_METRICS}
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
