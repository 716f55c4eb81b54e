"""Perennial trainer image: LoRA SFT / DPO / GRPO with TRL + PEFT, graders, evaluation, artifacts.

Nothing runs at import time; see `perennial_trainer.cli` for the entry point and
`perennial_trainer.config` for the run config contract.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
