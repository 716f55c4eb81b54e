"""Two trainer processes (torchrun, gloo on CPU) against one, with the same global batch: the curves, side by side.

    python benchmarks/distributed_curves.py [--sft-steps 20] [--grpo-steps 16]

Through the real entrypoint (`python -m perennial_trainer train --config run.yaml --nproc-per-node N`):

* SFT on the fruit format data: 1 process x batch 16 against 2 processes x batch 8. DDP averages the two halves'
  gradients, so the curves should agree to float rounding.
* GRPO continued from a short SFT format warm-up (FACTS.md's recipe, so rewards vary): 1 process x 16 completions
  against 2 processes x 8 (8 generations per prompt: 2 prompts per step either way). Sampling differs between the
  runs (each process draws its own completions), so the GRPO curves agree only within noise: compare the means.

Prints every step's loss (and GRPO's mean reward) for both, the largest difference, and the means. No assertion:
`tests/e2e/test_trainer_distributed.py` asserts the SFT equality on a shorter run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tinymodel import tiny_model_path
from trainer_support import (
    FRUIT_REWARD_SPEC,
    REPO,
    progress_lines,
    run_config,
    trainer_env,
    write_config,
    write_fruit_data,
)


def train(tmp: Path, name: str, cfg: dict, nproc: int) -> tuple[list[dict], float]:
    path = write_config(tmp / f"{name}.yaml", cfg)
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "perennial_trainer", "train", "--config", path, "--nproc-per-node", str(nproc)],
                       cwd=REPO, env=trainer_env(tmp / name), capture_output=True, text=True, timeout=1800)
    if p.returncode:
        sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
    return [l for l in progress_lines(p.stdout) if l["phase"] == "Training" and l["step"] > 0], time.monotonic() - t


def show(title: str, key: str, a: list[dict], b: list[dict]) -> None:
    xa, xb = [l[key] for l in a], [l[key] for l in b]
    print(f"\n{title}: {key} per step")
    print(f"  1 process : {' '.join(f'{x:7.4f}' for x in xa)}")
    print(f"  2 processes: {' '.join(f'{x:7.4f}' for x in xb)}")
    diff = max(abs(x - y) for x, y in zip(xa, xb, strict=True))
    print(f"  max |diff| {diff:.2e}; mean 1 process {sum(xa) / len(xa):.4f}, 2 processes {sum(xb) / len(xb):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft-steps", type=int, default=20)
    ap.add_argument("--grpo-steps", type=int, default=16)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="perennial-ddp-curves-"))
    for d in ("p1", "p2", "s1", "s2", "warm", "g1", "g2"):
        (tmp / d).mkdir()
    base = tiny_model_path()
    data = write_fruit_data(tmp / "data")

    def sft(name: str, batch: int, steps: int, lr: str = "1e-3") -> dict:
        return run_config(name=name, method="SFT", base=base, output=str(tmp / "out" / name), checkpoint_dir=str(tmp / "ck" / name),
                          datasets=[{"name": "format", "uri": data["sft"]}], checkpoint_every=10000,
                          hp={"learningRate": lr, "maxSteps": steps, "batchSize": batch, "seed": 7})

    s1, t1 = train(tmp, "s1", sft("s1", 16, a.sft_steps), 1)
    s2, t2 = train(tmp, "s2", sft("s2", 8, a.sft_steps), 2)
    show(f"SFT, global batch 16 ({a.sft_steps} steps; wall {t1:.0f} s vs {t2:.0f} s)", "loss", s1, s2)

    train(tmp, "warm", sft("warm", 16, 30, "3e-3"), 1)  # the format warm-up GRPO continues from

    def grpo(name: str, batch: int) -> dict:
        return run_config(name=name, method="GRPO", base=base, output=str(tmp / "out" / name), checkpoint_dir=str(tmp / "ck" / name),
                          parent=str(tmp / "out" / "warm"), datasets=[{"name": "prompts", "uri": data["grpo"]}],
                          reward_spec=FRUIT_REWARD_SPEC, checkpoint_every=10000,
                          hp={"learningRate": "3e-4", "maxSteps": a.grpo_steps, "batchSize": batch, "numGenerations": 8,
                              "maxCompletionLength": 12, "entropyCoef": "0.05", "temperature": "1.0", "seed": 7})

    g1, t1 = train(tmp, "g1", grpo("g1", 16), 1)
    g2, t2 = train(tmp, "g2", grpo("g2", 8), 2)
    title = f"GRPO, 16 completions (2 prompts x 8) per step ({a.grpo_steps} steps; wall {t1:.0f} s vs {t2:.0f} s)"
    show(title, "loss", g1, g2)
    show(title, "meanReward", g1, g2)
    print(json.dumps({"tmp": str(tmp)}))


if __name__ == "__main__":
    main()
