"""Data for the laptop demo (`perennial dev --demo`, `examples/local/`): a tiny offline model and the fruit-colour toy.

Everything is built here, offline: no model hub, no downloads.
"""

from __future__ import annotations

import random
from pathlib import Path

from .tinymodel import COLOURS, QUESTION_TEMPLATES, build_tiny_model, fruit_rows, write_jsonl


def write_fruit_data(directory: str | Path, seed: int = 0) -> dict[str, str]:
    """SFT format warm-up rows (random colours, so no answer leaks), GRPO prompts (three phrasings),
    held-out prompts (the fourth phrasing), DPO pairs."""
    d = Path(directory)
    rnd = random.Random(seed)
    train_t, eval_t = QUESTION_TEMPLATES[:3], QUESTION_TEMPLATES[3:]
    sft = [
        {"prompt": r["prompt"], "completion": [{"role": "assistant", "content": f"<answer>{rnd.choice(COLOURS)}</answer>"}]}
        for r in fruit_rows(QUESTION_TEMPLATES)
    ]
    dpo = [
        {
            "prompt": r["prompt"],
            "chosen": [{"role": "assistant", "content": f"<answer>{r['answer']}</answer>"}],
            "rejected": [{"role": "assistant", "content": "I do not know"}],
        }
        for r in fruit_rows(train_t)
    ]
    return {
        "sft": write_jsonl(d / "sft.jsonl", sft),
        "dpo": write_jsonl(d / "dpo.jsonl", dpo),
        "grpo": write_jsonl(d / "grpo.jsonl", fruit_rows(train_t)),
        "eval": write_jsonl(d / "eval.jsonl", fruit_rows(eval_t)),
    }


def prepare(pvc_root: str | Path) -> None:
    """Lay out the demo's volumes under `pvc_root`: `models/tiny` and `data/*.jsonl` (idempotent)."""
    root = Path(pvc_root)
    model = root / "models" / "tiny"
    if not (model / "config.json").exists():
        build_tiny_model(model)
    write_fruit_data(root / "data")
