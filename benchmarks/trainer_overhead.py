"""Overhead of perennial_trainer over a bare TRL script on the same GRPO task.

    python benchmarks/trainer_overhead.py [--steps 120] [--repeats 3] [--threads 1]

Builds the tiny offline model, trains a short SFT format warm-up (not timed), then runs
the same GRPO job (fruit→colour toy, format + correct graders, 16 generations, batch 32,
LoRA continued from the warm-up adapter, same seed) end to end as a fresh process:

* `python -m perennial_trainer --config run.yaml` (evaluation off: the bare script has none;
  progress lines, progress.json, graders through the RewardSpec, artifact + manifest + curves);
* `python benchmarks/bare_trl_grpo.py` (plain TRL GRPOTrainer with two inline reward functions).

Runs alternate (A B B A ...). Reported: the ratio of minimum wall times, the median ratio of
adjacent (perennial, bare) pairs, and the ratio of CPU times (user+sys of the child process, far
less sensitive to other load on a shared machine than wall time). Target ratio <= 1.05.
Both produce identical training trajectories (same loss), so the ratio is pure overhead.

The overhead is also split into its two parts: the training loop itself (ratio of TRL's own
`train_runtime`: progress callback, graders through the RewardSpec) and the fixed cost per run
(wall minus `train_runtime`: config validation, the curve plot, manifest with content hashes).
The fixed part does not grow with the run, so the end-to-end ratio depends on the run's length:
the default (120 steps, about half a minute per run on 2 cores) is still a short job.

Both processes get the same number of torch threads (`--threads`, default 1: what
perennial_trainer picks for a tiny model on CPU), so thread choice is not counted as overhead.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tinymodel import build_tiny_model  # noqa: E402
from trainer_support import FRUIT_REWARD_SPEC, run_config, trainer_env, write_config, write_fruit_data  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint-every", type=int, default=50, help="perennial's checkpoint cadence (the bare script saves none); 1000000 = off")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads for both (0: each picks its own)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="perennial-bench-"))
    base = build_tiny_model(tmp / "model")
    data = write_fruit_data(tmp / "data")
    env = trainer_env(tmp)
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    sft = write_config(tmp / "sft.yaml", run_config(name="warmup", method="SFT", base=base, output=str(tmp / "sft"),
                       datasets=[{"name": "format", "uri": data["sft"]}], hp={"learningRate": "3e-3", "maxSteps": 30, "batchSize": 16}))
    subprocess.run([sys.executable, "-m", "perennial_trainer", "--config", sft], cwd=REPO, env=env, check=True, capture_output=True)

    def perennial(i: int) -> list[str]:
        cfg = write_config(tmp / f"grpo{i}.yaml", run_config(
            name=f"bench{i}", method="GRPO", base=base, output=str(tmp / f"out-p{i}"), parent=str(tmp / "sft"),
            datasets=[{"name": "prompts", "uri": data["grpo"]}], reward_spec=FRUIT_REWARD_SPEC, checkpoint_every=a.checkpoint_every,
            hp={"learningRate": "3e-4", "maxSteps": a.steps, "batchSize": 32, "numGenerations": 16,
                "maxCompletionLength": 12, "entropyCoef": "0.05", "temperature": "1.0", "seed": 42}))
        return [sys.executable, "-m", "perennial_trainer", "--config", cfg]

    def bare(i: int) -> list[str]:
        return [sys.executable, str(REPO / "benchmarks" / "bare_trl_grpo.py"), base, str(tmp / "sft"), data["grpo"], str(tmp / f"out-b{i}"), str(a.steps)]

    times: dict[str, list[float]] = {"perennial": [], "bare_trl": []}
    cpu: dict[str, list[float]] = {"perennial": [], "bare_trl": []}
    loop: dict[str, list[float]] = {"perennial": [], "bare_trl": []}
    order = []
    for r in range(a.repeats):
        order += [("perennial", perennial), ("bare_trl", bare)] if r % 2 == 0 else [("bare_trl", bare), ("perennial", perennial)]
    for i, (name, make) in enumerate(order):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.monotonic()
        p = subprocess.run(make(i), cwd=REPO, env=env, capture_output=True, text=True)
        dt = time.monotonic() - t
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu[name].append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
        if p.returncode != 0:
            print(p.stderr[-3000:], file=sys.stderr)
            return 1
        times[name].append(dt)
        loss = [l for l in p.stdout.splitlines() if "'train_loss'" in l]
        rt = [l for l in p.stdout.splitlines() if "'train_runtime'" in l]
        loop[name].append(float(rt[-1].split("'train_runtime': '")[1].split("'")[0]) if rt else float("nan"))
        print(f"{name:9s} run {i}: wall {dt:6.2f} s  cpu {cpu[name][-1]:6.2f} s  {loss[-1][:60] if loss else ''}", flush=True)
    best = {k: min(v) for k, v in times.items()}
    ratio = best["perennial"] / best["bare_trl"]
    pairs = [p / b for p, b in zip(times["perennial"], times["bare_trl"])]
    cpu_ratio = min(cpu["perennial"]) / min(cpu["bare_trl"])
    loop_ratio = min(loop["perennial"]) / min(loop["bare_trl"])
    fixed = {k: min(t - r for t, r in zip(times[k], loop[k])) for k in times}
    print(json.dumps({"steps": a.steps, "perennial_seconds": [round(x, 2) for x in times["perennial"]],
                      "bare_trl_seconds": [round(x, 2) for x in times["bare_trl"]],
                      "perennial_cpu_seconds": [round(x, 2) for x in cpu["perennial"]],
                      "bare_trl_cpu_seconds": [round(x, 2) for x in cpu["bare_trl"]],
                      "min_perennial": round(best["perennial"], 2), "min_bare_trl": round(best["bare_trl"], 2),
                      "ratio": round(ratio, 3), "median_pair_ratio": round(statistics.median(pairs), 3),
                      "cpu_ratio": round(cpu_ratio, 3), "target": 1.05,
                      "train_loop_seconds": {k: [round(x, 2) for x in v] for k, v in loop.items()},
                      "train_loop_ratio": round(loop_ratio, 3),
                      "fixed_seconds": {k: round(v, 2) for k, v in fixed.items()},
                      "fixed_overhead_seconds": round(fixed["perennial"] - fixed["bare_trl"], 2)}))
    print(f"wall-time ratio perennial/bare {ratio:.3f} (median pair {statistics.median(pairs):.3f}, CPU {cpu_ratio:.3f}); target <= 1.05"
          f" | training loop {loop_ratio:.3f}x | fixed cost per run +{fixed['perennial'] - fixed['bare_trl']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
