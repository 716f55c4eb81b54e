"""GRPO's defaults for unset hyperparameters, by the base model's size (issue 16).

Measured with `benchmarks/rft_efficacy.py` (README, "GRPO defaults"): on the 133k-parameter tiny base the
real-model defaults (learning rate 1e-5, one prompt of `numGenerations` completions a step) teach nothing in a run
(held-out reward after GRPO = its SFT parent's), while 8 prompts a step at 1e-3 with an entropy bonus of 0.05 does.
Real models keep the real-model defaults (1e-5, as Predibase's and TRL's GRPO recipes use 1e-6..1e-5): nothing was
measured on them that says otherwise. A base model under `TOY_MAX_PARAMETERS` (estimated from its config.json, as
the memory check does: `perennial.memory.count_parameters`) gets the toy set; the choice and its reason are recorded
in the run's metrics (`train/grpo_defaults_toy`) and result (`grpoDefaults`). Set hyperparameters always win.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("perennial_trainer")

#: Base models with fewer parameters than this get the toy defaults (no released chat LLM is this small;
#: the trainer's CPU-thread rule uses the same line).
TOY_MAX_PARAMETERS = 50_000_000


@dataclass(frozen=True)
class GrpoDefaults:
    name: str  # "toy" | "model"
    learning_rate: float
    prompts_per_step: int  # the default batchSize is this many groups of numGenerations completions
    entropy_coef: float | None  # None: TRL's (0)
    reason: str
    parameters: int | None = None

    @property
    def metrics(self) -> dict[str, float]:
        m = {"train/grpo_defaults_toy": 1.0 if self.name == "toy" else 0.0}
        if self.parameters is not None:
            m["train/base_parameters"] = float(self.parameters)
        return m

    @property
    def record(self) -> dict[str, Any]:
        """For the result (termination message): which set applied, its values and why."""
        rec: dict[str, Any] = {"set": self.name, "learningRate": self.learning_rate, "promptsPerStep": self.prompts_per_step,
                               "reason": self.reason[:300]}
        if self.entropy_coef is not None:
            rec["entropyCoef"] = self.entropy_coef
        return rec

    def applied(self, prompts_per_step: int) -> GrpoDefaults:
        """This set as applied: fewer prompts per step when the training set has fewer prompts (per process)."""
        if prompts_per_step == self.prompts_per_step:
            return self
        return replace(self, prompts_per_step=prompts_per_step,
                       reason=f"{self.reason}; {prompts_per_step} prompt(s) per step: all the training set has per process")

    def describe(self) -> str:
        ent = f", entropyCoef {self.entropy_coef}" if self.entropy_coef is not None else ""
        return (f"GRPO defaults for unset hyperparameters: {self.name} (learningRate {self.learning_rate:g}, "
                f"{self.prompts_per_step} prompt(s) per step{ent}): {self.reason}")


def model_defaults(reason: str, parameters: int | None = None) -> GrpoDefaults:
    return GrpoDefaults("model", 1e-5, 1, None, reason, parameters)


def toy_defaults(reason: str, parameters: int | None = None) -> GrpoDefaults:
    return GrpoDefaults("toy", 1e-3, 8, 0.05, reason, parameters)


def for_parameters(parameters: int | None) -> GrpoDefaults:
    """The default set for a base model of this many parameters (None: unknown -> the real-model set)."""
    if parameters is None:
        return model_defaults("parameter count unknown: real-model defaults")
    if parameters < TOY_MAX_PARAMETERS:
        return toy_defaults(f"base model has {parameters:,} parameters (< {TOY_MAX_PARAMETERS:,}): toy defaults", parameters)
    return model_defaults(f"base model has {parameters:,} parameters (>= {TOY_MAX_PARAMETERS:,}): real-model defaults", parameters)


def resolve(base_path: str) -> GrpoDefaults:
    """The defaults for the base model at `base_path` (a local directory with config.json)."""
    from perennial.memory import count_parameters

    try:
        n = count_parameters(json.loads((Path(base_path) / "config.json").read_text()))
    except (OSError, ValueError, TypeError, KeyError) as e:
        log.warning("no parameter count for %s (%s): GRPO real-model defaults", base_path, e)
        return for_parameters(None)
    return for_parameters(n)
