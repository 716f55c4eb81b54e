#!/usr/bin/env python3
"""GPU check of the trainer: SFT, DPO and GRPO through the real entrypoint on CUDA.

Run on a machine with a CUDA GPU, from the repository root:

    PYTHONPATH=operator:trainer_image:server_image:common:. python3 scripts/gpu_check.py [--out gpu_check.json]

(the script puts those folders on its own `sys.path` and its children's PYTHONPATH as well, so a
plain `python3 scripts/gpu_check.py` works too once torch, transformers, peft, trl, datasets and
pydantic are importable.)

What it does, offline:

1. builds the tests' tiny Llama model + tokenizer (`perennial_trainer.tinymodel`, re-exported by
   `tests/tinymodel.py`) and the fruit→colour datasets (`write_fruit_data`, as the trainer tests do);
2. runs `perennial-trainer --config run.yaml` -- `perennial_trainer.cli.main`, what
   `python -m perennial_trainer` and the operator's Job run -- once per method, each in its own
   process like a Job's pod: SFT (format warm-up), GRPO continuing the SFT adapter against the
   fruit RewardSpec, DPO; a few dozen steps each, with the trainer's own held-out evaluation;
3. checks what only a GPU shows. The child process only *observes* the trainer: it wraps
   `perennial_trainer.train.trl_config` (the TRL args the trainer built), `transformers.Trainer.train`
   (model placement, dtypes, mixed precision, activation checkpointing, steps/s, peak GPU memory)
   and `transformers.modeling_utils.checkpoint` (counts checkpointed layer calls, i.e. activation
   checkpointing really ran). Then it checks the termination message says Succeeded, the adapter,
   metrics.json and manifest.json were written, the LoRA B matrices moved away from zero, and that
   every adapter reloads (one PeftModel, three adapters) and generates on the GPU;
4. then the modes beyond one plain process (`--modes`, `mode_plan`), each through the same entrypoint, SFT unless
   said: `ddp1` (`--nproc-per-node 1`), `ddp` (every GPU, NCCL; 2 gloo processes on CPU), `fsdp` (PERENNIAL_FSDP=1
   over every GPU: parameters must be FSDP2 shards on every rank; on CPU the trainer must fall back to DDP and say
   so), `qlora` (`lora.quantization: 4bit`: base weights stored in 4 bits; on CPU refused with InvalidConfig), and
   `grpo-vllm` (GRPO from the SFT adapter with PERENNIAL_GRPO_GENERATION=vllm: TRL's use_vllm colocate and the
   result's `generation` record; on CPU refused with InvalidConfig). A mode the machine cannot run is skipped with
   the reason ("skipped: 1 GPU", "bitsandbytes not importable (...)", "vllm not importable (...)"). With several
   processes the trainer's own launcher starts them (torchrun in-process) and every worker runs under the probe:
   one set of progress lines, each rank on its own GPU, steps/s of rank 0, peak memory of every rank;
5. prints a summary (one table: steps/s and peak GPU memory of every run and mode) and writes it as JSON to `--out`
   (default ./gpu_check.json);
6. exits 2 when CUDA is absent unless `--allow-cpu` (then the same run checks the trainer's CPU
   policy: fp32, no bf16, no activation checkpointing), 1 when a check fails, 0 when all pass.

`--rehearse-gpu-flags` (CPU only, with `--allow-cpu`) makes the trainer's `device_setup()` return
bf16 + activation checkpointing on the CPU, so the flag-dependent code paths can be rehearsed
without a GPU. It changes the trainer's behaviour; never use it for the real check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SRC_DIRS = [REPO / "operator", REPO / "trainer_image", REPO / "server_image", REPO / "common", REPO / "tests", REPO]

for _p in reversed(SRC_DIRS):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

CHILD_FLAG = "--_child-probe"
REHEARSE_ENV = "PERENNIAL_GPU_CHECK_REHEARSE"


# ============================================================================ child: one trainer run


def _param_summary(model) -> dict[str, Any]:
    devices: dict[str, int] = {}
    trainable: dict[str, int] = {}
    frozen: dict[str, int] = {}
    local = full = dtensors = 0
    for p in model.parameters():
        devices[str(p.device)] = devices.get(str(p.device), 0) + p.numel()
        d = trainable if p.requires_grad else frozen
        d[str(p.dtype).replace("torch.", "")] = d.get(str(p.dtype).replace("torch.", ""), 0) + p.numel()
        full += p.numel()
        if hasattr(p, "to_local"):  # an FSDP2 shard (DTensor): this rank holds only its part
            dtensors += 1
            local += p.to_local().numel()
        else:
            local += p.numel()
    return {"devices": devices, "trainable_dtypes": trainable, "frozen_dtypes": frozen,
            "model_class": type(model).__name__, "numel": full, "local_numel": local, "dtensor_params": dtensors}


def _is_ckpt(model) -> bool | None:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        try:
            return bool(getattr(model, name))
        except Exception:  # noqa: BLE001 - attribute missing on this wrapper/version
            continue
    return None


def child_main(probe_path: str, trainer_argv: list[str]) -> int:
    """Run `perennial_trainer.cli.main(trainer_argv)` with observation-only hooks; dump them to `probe_path`."""
    import torch

    probe: dict[str, Any] = {"trl_args": [], "train": [], "steps": {}, "ckpt_calls": 0, "errors": []}
    cuda = torch.cuda.is_available()
    if "LOCAL_RANK" in os.environ:  # a worker of the trainer's launcher (torchrun): one probe file per rank
        probe["rank"] = int(os.environ.get("RANK", "0"))
        probe["local_rank"] = int(os.environ["LOCAL_RANK"])
        probe_path = f"{probe_path}.rank{probe['rank']}"
    else:
        # The trainer's own launcher (`--nproc-per-node N`: perennial_trainer.distributed.launch, torchrun in-process)
        # starts `-m perennial_trainer`; run this probe in its place, with the same arguments, so every worker is observed.
        import torch.distributed.run as torchrun

        orig_run = torchrun.run

        def probed_run(args):
            if args.module and args.training_script == "perennial_trainer":
                args.module = False
                args.training_script = str(Path(__file__).resolve())
                args.training_script_args = [CHILD_FLAG, probe_path, "--", *args.training_script_args]
                probe["launched_workers"] = args.nproc_per_node
            return orig_run(args)

        torchrun.run = probed_run

    if os.environ.get(REHEARSE_ENV) == "1":
        if cuda:
            raise SystemExit("--rehearse-gpu-flags is for CPU-only machines")
        import perennial_trainer.train as T

        def rehearsal_device_setup() -> dict[str, Any]:
            return {"cuda": False, "use_cpu": True, "bf16": True, "gradient_checkpointing": True, "dtype": torch.bfloat16}

        T.device_setup = rehearsal_device_setup
        probe["rehearsal"] = True

    # --- activation checkpointing: count calls of the checkpoint function transformers binds at enable time
    import transformers.modeling_utils as MU

    orig_ckpt = MU.checkpoint

    def counting_checkpoint(*a, **kw):
        probe["ckpt_calls"] += 1
        return orig_ckpt(*a, **kw)

    MU.checkpoint = counting_checkpoint

    # --- the TRL config the trainer built
    import perennial_trainer.train as T

    orig_trl_config = T.trl_config

    def observed_trl_config(*a, **kw):
        args = orig_trl_config(*a, **kw)
        rec = {"class": type(args).__name__}
        for k in ("bf16", "fp16", "activation_checkpointing", "gradient_checkpointing", "gradient_checkpointing_kwargs",
                  "activation_checkpointing_kwargs", "use_cpu", "per_device_train_batch_size", "max_steps",
                  "learning_rate", "num_generations", "max_completion_length", "fsdp_config", "use_vllm", "vllm_mode",
                  "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size"):
            if hasattr(args, k):
                v = getattr(args, k)
                rec[k] = v if isinstance(v, (bool, int, float, str, type(None), dict, list)) else repr(v)
        probe["trl_args"].append(rec)
        return args

    T.trl_config = observed_trl_config

    # --- Trainer.train: placement, precision, checkpointing, speed, peak memory
    from transformers import Trainer, TrainerCallback

    class StepProbe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 1 or (state.global_step and state.global_step == state.max_steps):
                key = "first" if state.global_step == 1 else "last"
                rec = {"step": state.global_step, "ckpt_calls_so_far": probe["ckpt_calls"],
                       "model_is_activation_checkpointing": _is_ckpt(model) if model is not None else None}
                if model is not None:
                    ps = _param_summary(model)
                    rec["param_devices"] = ps["devices"]
                    rec["numel"], rec["local_numel"], rec["dtensor_params"] = ps["numel"], ps["local_numel"], ps["dtensor_params"]
                    rec["frozen_dtypes"] = ps["frozen_dtypes"]
                if cuda:
                    rec["max_memory_allocated"] = torch.cuda.max_memory_allocated()
                probe["steps"][key] = rec

    orig_train = Trainer.train

    def observed_train(self, *a, **kw):
        rec: dict[str, Any] = {"trainer_class": type(self).__name__}
        try:
            rec["before"] = _param_summary(self.model)
            rec["args_device"] = str(self.args.device)
            rec["mixed_precision"] = str(getattr(self.accelerator, "mixed_precision", None))
            rec["args_bf16"] = bool(self.args.bf16)
            rec["args_activation_checkpointing"] = bool(getattr(self.args, "activation_checkpointing", getattr(self.args, "gradient_checkpointing", False)))
            rec["is_fsdp_enabled"] = bool(getattr(self, "is_fsdp_enabled", False))
            rec["num_processes"] = int(getattr(self.accelerator, "num_processes", 1))
            self.add_callback(StepProbe())
        except Exception as e:  # noqa: BLE001 - never let the probe break the run
            probe["errors"].append(f"before train: {e!r}")
        calls0 = probe["ckpt_calls"]
        step0 = self.state.global_step
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            return orig_train(self, *a, **kw)
        finally:
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            try:
                steps = self.state.global_step - step0
                rec.update(seconds=dt, steps=steps, steps_per_s=steps / dt if dt > 0 else None,
                           ckpt_calls=probe["ckpt_calls"] - calls0,
                           model_is_activation_checkpointing=_is_ckpt(self.model),
                           after=_param_summary(self.model))
                if cuda:
                    rec["max_memory_allocated"] = torch.cuda.max_memory_allocated()
                    rec["max_memory_reserved"] = torch.cuda.max_memory_reserved()
            except Exception as e:  # noqa: BLE001
                probe["errors"].append(f"after train: {e!r}")
            probe["train"].append(rec)

    Trainer.train = observed_train

    from perennial_trainer.cli import main as trainer_main

    rc = 1
    try:
        rc = trainer_main(trainer_argv)
    finally:
        probe["rc"] = rc
        probe["cuda"] = cuda
        if cuda:
            probe["device_name"] = torch.cuda.get_device_name(0)
            probe["process_max_memory_allocated"] = torch.cuda.max_memory_allocated()
        Path(probe_path).write_text(json.dumps(probe, indent=1, default=repr))
    return rc


# ============================================================================ parent: the check


class Checks:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, name: str, ok: bool, detail: Any = "", hard: bool = True) -> bool:
        self.items.append({"name": name, "ok": bool(ok), "hard": hard, "detail": detail})
        mark = "ok  " if ok else ("FAIL" if hard else "warn")
        print(f"  [{mark}] {name}" + (f": {detail}" if detail not in ("", None) else ""), flush=True)
        return bool(ok)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.items if c["hard"] and not c["ok"]]


def _child_env(work: Path, rehearse: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    pp = [str(p) for p in SRC_DIRS]
    if env.get("PYTHONPATH"):
        pp.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(pp)
    env["PYTHONUNBUFFERED"] = "1"
    env["PERENNIAL_TERMINATION_LOG"] = str(work / "termination-log")
    env.pop("OMP_NUM_THREADS", None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for k in ("PERENNIAL_FSDP", "PERENNIAL_GRPO_GENERATION", "PERENNIAL_NPROC_PER_NODE"):
        env.pop(k, None)  # each run says what it wants (below)
    if rehearse:
        env[REHEARSE_ENV] = "1"
    env.update(extra or {})
    return env


def run_method(name: str, cfg: dict, work: Path, timeout: float, rehearse: bool, extra_args: list[str] | None = None,
               extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """One `perennial-trainer --config` run in a child process; returns termination message, probe(s), log tail.
    `extra_args` (e.g. `--nproc-per-node 2`) go to the trainer's command line; with several processes the trainer's
    own launcher starts them and each worker writes its probe (`rank_probes`)."""
    from trainer_support import write_config

    cfg_path = write_config(work / f"{name}.yaml", cfg)
    term = work / f"{name}.termination"
    probe_path = work / f"{name}.probe.json"
    log_path = work / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, str(probe_path), "--",
           "train", "--config", cfg_path, "--termination-log", str(term), *(extra_args or [])]
    how = " ".join([*(extra_args or []), *(f"{k}={v}" for k, v in (extra_env or {}).items())])
    print(f"\n== {name}: {cfg['spec']['method']} ({cfg['spec']['hyperparameters']}){' ' + how if how else ''}", flush=True)
    t0 = time.perf_counter()
    timed_out = False
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=_child_env(work, rehearse, extra_env), stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc, timed_out = -9, True
    wall = time.perf_counter() - t0
    lines = log_path.read_text(errors="replace").splitlines()
    progress = [json.loads(l.split(" ", 1)[1]) for l in lines if l.startswith("PERENNIAL_PROGRESS ")]
    out: dict[str, Any] = {"rc": rc, "timed_out": timed_out, "wall_seconds": round(wall, 2), "log": str(log_path)}
    out["termination"] = json.loads(term.read_text()) if term.is_file() else None
    out["probe"] = json.loads(probe_path.read_text()) if probe_path.is_file() else None
    out["rank_probes"] = {int(f.name.rsplit(".rank", 1)[1]): json.loads(f.read_text())
                          for f in sorted(work.glob(f"{probe_path.name}.rank*")) if f.name.rsplit(".rank", 1)[1].isdigit()}
    out["progress_steps"] = [p.get("step") for p in progress]
    out["log_text"] = "\n".join(lines)
    out["progress_first"] = progress[1] if len(progress) > 1 else (progress[0] if progress else None)
    out["progress_last"] = progress[-1] if progress else None
    if rc != 0:
        out["log_tail"] = lines[-60:]
        print(f"  trainer exited {rc}{' (timed out)' if timed_out else ''}; last lines of {log_path}:", flush=True)
        for l in lines[-60:]:
            print("    | " + l, flush=True)
    return out


def check_run(name: str, res: dict[str, Any], expect: dict[str, Any], checks: Checks) -> dict[str, Any]:
    """Assertions on one run; returns its summary row."""
    term = res.get("termination") or {}
    probe = res.get("probe") or {}
    row: dict[str, Any] = {"method": name, "rc": res["rc"], "status": term.get("status"), "reason": term.get("reason"),
                           "message": term.get("message"), "wall_seconds": res["wall_seconds"],
                           "generation": (term.get("generation") or {}).get("engine")}
    if term.get("generation"):
        row["generation_reason"] = term["generation"].get("reason")
    checks.add(f"{name}: trainer exit 0 and termination status Succeeded", res["rc"] == 0 and term.get("status") == "Succeeded",
               f"rc={res['rc']} status={term.get('status')} reason={term.get('reason')} message={str(term.get('message'))[:300]}")
    if probe.get("errors"):
        checks.add(f"{name}: probe hooks ran cleanly", False, probe["errors"], hard=False)
    trl_args = (probe.get("trl_args") or [{}])[-1]
    trains = probe.get("train") or []
    tr = trains[-1] if trains else {}
    row["trl_args"] = trl_args
    if not tr:
        checks.add(f"{name}: Trainer.train was reached", False, "no training observed")
        return row

    # placement
    dev_before = tr.get("before", {}).get("devices", {})
    want_dev = "cuda" if expect["cuda"] else "cpu"
    on_dev = bool(dev_before) and all(d.startswith(want_dev) for d in dev_before)
    row["param_devices"] = dev_before
    row["args_device"] = tr.get("args_device")
    checks.add(f"{name}: model parameters on {want_dev} when training starts", on_dev, dev_before)
    checks.add(f"{name}: TrainingArguments.device is {want_dev}", str(tr.get("args_device", "")).startswith(want_dev), tr.get("args_device"))
    step1 = (probe.get("steps") or {}).get("first") or {}
    if step1.get("param_devices"):
        checks.add(f"{name}: model on {want_dev} at step 1", all(d.startswith(want_dev) for d in step1["param_devices"]), step1["param_devices"])

    # precision
    bf16 = bool(trl_args.get("bf16"))
    row["bf16"] = bf16
    row["mixed_precision"] = tr.get("mixed_precision")
    row["frozen_dtypes"] = tr.get("before", {}).get("frozen_dtypes")
    row["trainable_dtypes"] = tr.get("before", {}).get("trainable_dtypes")
    checks.add(f"{name}: TRL args bf16={expect['bf16']} fp16=False", bf16 == expect["bf16"] and not trl_args.get("fp16"),
               {k: trl_args.get(k) for k in ("class", "bf16", "fp16", "use_cpu")})
    want_mp = "bf16" if expect["bf16"] else "no"
    checks.add(f"{name}: accelerate mixed_precision is {want_mp!r}", tr.get("mixed_precision") == want_mp, tr.get("mixed_precision"))
    frozen = tr.get("before", {}).get("frozen_dtypes", {})
    want_dtype = "bfloat16" if expect["bf16"] else "float32"
    checks.add(f"{name}: base weights loaded as {want_dtype}", bool(frozen) and set(frozen) == {want_dtype}, frozen)

    # activation checkpointing
    ac_arg = trl_args.get("activation_checkpointing", trl_args.get("gradient_checkpointing"))
    row["activation_checkpointing_arg"] = ac_arg
    row["activation_checkpointing_model"] = tr.get("model_is_activation_checkpointing")
    row["checkpointed_layer_calls"] = tr.get("ckpt_calls")
    row["gradient_checkpointing_kwargs"] = trl_args.get("gradient_checkpointing_kwargs")
    checks.add(f"{name}: TRL args activation_checkpointing={expect['ckpt']}", bool(ac_arg) == expect["ckpt"],
               {k: trl_args.get(k) for k in ("activation_checkpointing", "gradient_checkpointing", "gradient_checkpointing_kwargs")})
    checks.add(f"{name}: model.is_activation_checkpointing={expect['ckpt']} after training",
               tr.get("model_is_activation_checkpointing") == expect["ckpt"], tr.get("model_is_activation_checkpointing"))
    if expect["ckpt"]:
        checks.add(f"{name}: checkpointed layers actually ran", (tr.get("ckpt_calls") or 0) > 0, f"{tr.get('ckpt_calls')} checkpoint() calls")
    else:
        checks.add(f"{name}: no checkpointed layer calls", (tr.get("ckpt_calls") or 0) == 0, f"{tr.get('ckpt_calls')} checkpoint() calls")

    # speed and memory
    row["steps"] = tr.get("steps")
    row["train_seconds"] = round(tr.get("seconds") or 0.0, 3)
    row["steps_per_s"] = round(tr["steps_per_s"], 3) if tr.get("steps_per_s") else None
    row["peak_gpu_mem_train_mib"] = round(tr["max_memory_allocated"] / 2**20, 1) if tr.get("max_memory_allocated") is not None else None
    row["peak_gpu_mem_reserved_train_mib"] = round(tr["max_memory_reserved"] / 2**20, 1) if tr.get("max_memory_reserved") is not None else None
    row["peak_gpu_mem_process_mib"] = round(probe["process_max_memory_allocated"] / 2**20, 1) if probe.get("process_max_memory_allocated") is not None else None
    checks.add(f"{name}: trained the requested steps", tr.get("steps") == expect["steps"], f"{tr.get('steps')} of {expect['steps']}")
    if expect["cuda"]:
        checks.add(f"{name}: GPU memory was used", (tr.get("max_memory_allocated") or 0) > 0, f"{row['peak_gpu_mem_train_mib']} MiB")

    # artifact
    d = Path(term.get("artifactUri") or expect["output"])
    missing = [f for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "metrics.json", "manifest.json", "progress.json") if not (d / f).is_file()]
    checks.add(f"{name}: adapter, metrics.json and manifest written", not missing, f"missing {missing}" if missing else str(d))
    metrics: dict[str, Any] = {}
    if (d / "metrics.json").is_file():
        metrics = json.loads((d / "metrics.json").read_text())
        row["trainer_steps_per_s"] = metrics.get("train/train_steps_per_second")
        row["train_loss"] = metrics.get("train/loss")
        row["eval"] = {k: round(v, 4) for k, v in metrics.items() if k.startswith("eval/")}
        if "train/mean_reward" in metrics:
            row["train_mean_reward"] = {"first": metrics.get("train/first_mean_reward"), "last": metrics.get("train/mean_reward"),
                                        "frac_reward_zero_std": metrics.get("train/frac_reward_zero_std")}
        checks.add(f"{name}: metrics.json says {expect['steps']} steps", metrics.get("train/steps") == expect["steps"], metrics.get("train/steps"))
        import math

        loss = metrics.get("train/loss")
        checks.add(f"{name}: final loss is finite", loss is not None and math.isfinite(loss), loss)
    if (d / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        sd = load_file(str(d / "adapter_model.safetensors"))
        b = [v.float().abs().max().item() for k, v in sd.items() if "lora_B" in k]
        row["lora_B_max_abs"] = max(b) if b else None
        row["adapter_dtypes"] = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
        checks.add(f"{name}: LoRA B weights trained (non-zero)", bool(b) and max(b) > 0, f"max |B| = {max(b) if b else None}")
    return row


def reload_and_generate(base: str, outputs: dict[str, str], expect: dict[str, Any], checks: Checks) -> dict[str, Any]:
    """One PeftModel with every adapter, on the trainer's device and dtype; greedy generation with each."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if expect["cuda"] else "cpu"
    dtype = torch.bfloat16 if expect["bf16"] else torch.float32
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    prompts = ["What colour is a banana?", "A cherry is what colour?", "A lime is what colour?"]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    peft_model = None
    out: dict[str, Any] = {}
    for name, path in outputs.items():
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, path, adapter_name=name)
            else:
                peft_model.load_adapter(path, adapter_name=name)
        except Exception as e:  # noqa: BLE001
            checks.add(f"reload: {name} adapter loads onto the {device} base", False, f"{e.__class__.__name__}: {e}")
            continue
        peft_model.set_adapter(name)
        peft_model.eval()
        lora_devs = {str(p.device) for n, p in peft_model.named_parameters() if "lora_" in n and f".{name}." in n}
        if expect["cuda"]:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            gen = peft_model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        if expect["cuda"]:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        new = gen[:, enc["input_ids"].shape[1]:]
        decoded = [tok.decode(r, skip_special_tokens=True) for r in new]
        out[name] = {"outputs": decoded, "output_device": str(gen.device), "lora_param_devices": sorted(lora_devs),
                     "generate_seconds": round(dt, 3)}
        checks.add(f"reload: {name} LoRA weights on {device}", bool(lora_devs) and all(d.startswith(device) for d in lora_devs), sorted(lora_devs))
        checks.add(f"reload: {name} generates on {device}", str(gen.device).startswith(device) and new.shape[1] > 0 and any(decoded),
                   f"{decoded} on {gen.device}")
        if name in ("sft", "grpo"):
            fmt = all(d.startswith("<answer>") and d.endswith("</answer>") for d in decoded)
            checks.add(f"reload: {name} answers in <answer>…</answer> form", fmt, decoded, hard=False)
    if peft_model is not None and len(out) > 1:
        a, b = list(out)[:2]
        checks.add(f"reload: adapters differ ({a} vs {b} outputs)", out[a]["outputs"] != out[b]["outputs"], "", hard=False)
    return out


# ============================================================================ multi-process, QLoRA and vLLM modes

MODES = ("ddp1", "ddp", "fsdp", "qlora", "grpo-vllm")


def _importable(mod: str) -> str | None:
    """None when `mod` imports, else why not (one line)."""
    try:
        __import__(mod)
    except Exception as e:  # noqa: BLE001 - a CUDA/ABI mismatch is not always an ImportError
        return f"{e.__class__.__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return None


def mode_plan(cuda: bool, gpus: int, bnb_error: str | None, vllm_error: str | None) -> list[dict[str, Any]]:
    """The runs beyond one plain process, and what each must show. On GPUs: `ddp1` (`--nproc-per-node 1`), `ddp`
    (every GPU, NCCL), `fsdp` (PERENNIAL_FSDP=1 over every GPU), `qlora` (`lora.quantization: 4bit`), `grpo-vllm`
    (GRPO with PERENNIAL_GRPO_GENERATION=vllm); skipped with the reason when the machine cannot. On CPU (the rehearsal)
    the same plumbing with what a CPU can show: 2 gloo processes, FSDP asked for and refused (DDP, a warning), QLoRA
    and vLLM asked for and failed at once with `InvalidConfig`."""
    n = max(2, gpus) if not cuda else gpus
    ok = {"outcome": "Succeeded"}
    plan = [
        {"name": "ddp1", "method": "SFT", "nproc": 1, "env": {}, **ok,
         "note": "--nproc-per-node 1: the launcher runs the one process in place"},
        {"name": "ddp", "method": "SFT", "nproc": n, "env": {"PERENNIAL_FSDP": "0"}, **ok, "fsdp": False,
         "skip": None if n >= 2 else "skipped: 1 GPU", "note": f"{n} processes, DDP over {'NCCL' if cuda else 'gloo'}"},
        {"name": "fsdp", "method": "SFT", "nproc": n, "env": {"PERENNIAL_FSDP": "1"}, **ok, "fsdp": cuda,
         "skip": None if n >= 2 else "skipped: 1 GPU",
         "note": f"FSDP2 over {n} GPUs" if cuda else "FSDP asked for on CPU: the trainer trains with DDP and warns",
         "log_has": None if cuda else "FSDP needs GPUs"},
    ]
    if cuda:
        plan.append({"name": "qlora", "method": "SFT", "nproc": 1, "env": {}, "lora": {"quantization": "4bit"}, **ok,
                     "skip": f"skipped: bitsandbytes not importable ({bnb_error})" if bnb_error else None,
                     "note": "4-bit NF4 base weights (bitsandbytes), bf16 LoRA"})
        plan.append({"name": "grpo-vllm", "method": "GRPO", "nproc": 1, "env": {"PERENNIAL_GRPO_GENERATION": "vllm"}, **ok,
                     "vllm": True, "skip": f"skipped: vllm not importable ({vllm_error})" if vllm_error else None,
                     "note": "GRPO generating with vLLM colocated on the training GPU"})
    else:
        plan.append({"name": "qlora", "method": "SFT", "nproc": 1, "env": {}, "lora": {"quantization": "4bit"},
                     "outcome": "Failed", "reason": "InvalidConfig", "message_has": "(QLoRA) needs CUDA GPUs",
                     "note": "QLoRA on CPU: refused before any data is read"})
        plan.append({"name": "grpo-vllm", "method": "GRPO", "nproc": 1, "env": {"PERENNIAL_GRPO_GENERATION": "vllm"},
                     "outcome": "Failed", "reason": "InvalidConfig", "message_has": "asks for vLLM generation, but no CUDA GPU",
                     "note": "vLLM asked for on CPU: refused with the reason", "needs_wiring": True})
    return plan


def mode_config(m: dict[str, Any], base: str, data: dict[str, str], work: Path, steps: int, parent: str | None) -> dict:
    from trainer_support import FRUIT_REWARD_SPEC, run_config

    out = str(work / "out" / m["name"])
    lora = {"rank": 8, "alpha": 16, "dropout": "0", **(m.get("lora") or {})}
    if m["method"] == "GRPO":
        return run_config(name=f"gpu-{m['name']}", method="GRPO", base=base, output=out, parent=parent, lora=lora,
                          datasets=[{"name": "prompts", "uri": data["grpo"]}],
                          hp={"learningRate": "3e-4", "maxSteps": steps, "batchSize": 16, "numGenerations": 8,
                              "maxCompletionLength": 12, "entropyCoef": "0.05", "temperature": "1.0", "seed": 42},
                          reward_spec=FRUIT_REWARD_SPEC, checkpoint_every=max(1, steps // 2))
    return run_config(name=f"gpu-{m['name']}", method="SFT", base=base, output=out, lora=lora,
                      datasets=[{"name": "format", "uri": "file://" + data["sft"]}],
                      hp={"learningRate": "3e-3", "maxSteps": steps, "batchSize": 8, "seed": 42, "maxCompletionLength": 12},
                      reward_spec=FRUIT_REWARD_SPEC, checkpoint_every=max(1, steps // 2))


def check_mode(m: dict[str, Any], res: dict[str, Any], expect: dict[str, Any], steps: int, checks: Checks) -> dict[str, Any]:
    """What a mode must show; returns its summary row (steps/s from rank 0, peak memory the largest of any rank)."""
    name, nproc = m["name"], m["nproc"]
    term = res.get("termination") or {}
    row: dict[str, Any] = {"mode": name, "procs": nproc, "rc": res["rc"], "status": term.get("status"), "reason": term.get("reason"),
                           "note": m.get("note"), "generation": (term.get("generation") or {}).get("engine")}
    if m["outcome"] == "Failed":
        msg = str(term.get("message") or "")
        ok = res["rc"] != 0 and term.get("status") == "Failed" and term.get("reason") == m["reason"] and m["message_has"] in msg
        if not ok and m.get("needs_wiring") and term.get("status") == "Succeeded" and "generation" not in term:
            checks.add(f"{name}: train.py wires perennial_trainer.generation", False,
                       "not yet: the run ignored PERENNIAL_GRPO_GENERATION (see the generation wiring snippet)", hard=False)
            row["note"] = "not wired: PERENNIAL_GRPO_GENERATION ignored"
            return row
        checks.add(f"{name}: fails at once with {m['reason']} ({m['message_has']!r})", ok,
                   f"rc={res['rc']} status={term.get('status')} reason={term.get('reason')} message={msg[:200]}")
        checks.add(f"{name}: no adapter written", not (Path(expect["output"]) / "adapter_model.safetensors").exists())
        return row

    checks.add(f"{name}: trainer exit 0 and termination status Succeeded", res["rc"] == 0 and term.get("status") == "Succeeded",
               f"rc={res['rc']} status={term.get('status')} reason={term.get('reason')} message={str(term.get('message'))[:300]}")
    probes = res.get("rank_probes") or {}
    if nproc > 1:
        checks.add(f"{name}: {nproc} worker processes observed", sorted(probes) == list(range(nproc)), sorted(probes))
    else:
        probes = {0: res.get("probe") or {}}
    trains = {r: (p.get("train") or [{}])[-1] for r, p in probes.items()}
    t0 = trains.get(0) or {}
    row["steps"] = t0.get("steps")
    row["steps_per_s"] = round(t0["steps_per_s"], 3) if t0.get("steps_per_s") else None
    peaks = [t.get("max_memory_allocated") for t in trains.values() if t.get("max_memory_allocated") is not None]
    row["peak_gpu_mem_mib"] = round(max(peaks) / 2**20, 1) if peaks else None
    row["peak_gpu_mem_mib_per_rank"] = {r: round(t["max_memory_allocated"] / 2**20, 1) for r, t in trains.items()
                                        if t.get("max_memory_allocated") is not None}
    checks.add(f"{name}: trained the requested steps", t0.get("steps") == steps, f"{t0.get('steps')} of {steps}")
    want = "cuda" if expect["cuda"] else "cpu"
    devs = {r: sorted((p.get("steps") or {}).get("first", {}).get("param_devices") or {}) for r, p in probes.items()}
    if expect["cuda"]:
        good = all(d == [f"cuda:{r}"] for r, d in devs.items()) if nproc > 1 else all(d and all(x.startswith("cuda") for x in d) for d in devs.values())
    else:
        good = all(d == ["cpu"] for d in devs.values())
    checks.add(f"{name}: each process's parameters on its own {want} device at step 1", good, devs)
    steps_seen = res.get("progress_steps") or []
    # rank 0 alone prints: each step once (the last twice: its log and the end of training)
    repeated = sorted({x for x in steps_seen if steps_seen.count(x) > (2 if x == max(steps_seen) else 1)}) if steps_seen else None
    checks.add(f"{name}: one set of progress lines (rank 0's)", repeated == [],
               f"{len(steps_seen)} lines, steps {steps_seen[:8]}{'…' if len(steps_seen) > 8 else ''}; repeated: {repeated}")
    d = Path(term.get("artifactUri") or expect["output"])
    metrics = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else {}
    row["train_loss"] = metrics.get("train/loss")
    checks.add(f"{name}: metrics.json says {nproc} processes, {steps} steps",
               metrics.get("train/processes") == nproc and metrics.get("train/steps") == steps,
               {k: metrics.get(k) for k in ("train/processes", "train/steps", "train/fsdp")})
    if "fsdp" in m:
        row["fsdp"] = metrics.get("train/fsdp") == 1.0
        checks.add(f"{name}: FSDP2 {'on' if m['fsdp'] else 'off'} (metrics.json train/fsdp)", metrics.get("train/fsdp") == (1.0 if m["fsdp"] else 0.0),
                   metrics.get("train/fsdp"))
        if m["fsdp"]:
            firsts = {r: (p.get("steps") or {}).get("first") or {} for r, p in probes.items()}
            sharded = {r: (f.get("dtensor_params"), f.get("local_numel"), f.get("numel")) for r, f in firsts.items()}
            checks.add(f"{name}: parameters are FSDP2 shards on every rank (DTensors, local < full)",
                       all(dt and loc < full for dt, loc, full in sharded.values()), sharded)
    if m.get("log_has"):
        checks.add(f"{name}: the log says {m['log_has']!r}", m["log_has"] in res.get("log_text", ""))
    if m.get("lora", {}).get("quantization") == "4bit":
        frozen = ((probes.get(0) or {}).get("train") or [{}])[-1].get("before", {}).get("frozen_dtypes", {})
        row["frozen_dtypes"] = frozen
        checks.add(f"{name}: base weights stored in 4 bits (uint8-packed Params4bit)", "uint8" in frozen, frozen)
    if m.get("vllm"):
        args = ((probes.get(0) or {}).get("trl_args") or [{}])[-1]
        gen = term.get("generation") or {}
        checks.add(f"{name}: TRL args use_vllm=True, vllm_mode colocate", args.get("use_vllm") is True and args.get("vllm_mode") == "colocate",
                   {k: args.get(k) for k in ("use_vllm", "vllm_mode", "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size")})
        checks.add(f"{name}: the result records vLLM generation", gen.get("engine") == "vllm" and metrics.get("train/generation_vllm") == 1.0, gen)
    if (d / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        sd = load_file(str(d / "adapter_model.safetensors"))
        b = [v.float().abs().max().item() for k, v in sd.items() if "lora_B" in k]
        checks.add(f"{name}: adapter written, LoRA B weights trained (non-zero)", bool(b) and max(b) > 0, f"max |B| = {max(b) if b else None}")
    else:
        checks.add(f"{name}: adapter written", False, f"no adapter_model.safetensors in {d}")
    return row


def run_modes(modes: list[str], base: str, data: dict[str, str], work: Path, steps: int, parent: str | None, a, expect: dict[str, Any],
              gpus: int, checks: Checks) -> list[dict[str, Any]]:
    cuda = expect["cuda"]
    bnb_error = _importable("bitsandbytes") if cuda else "no CUDA"
    vllm_error = _importable("vllm") if cuda else "no CUDA"
    rows = []
    for m in mode_plan(cuda, gpus, bnb_error, vllm_error):
        if m["name"] not in modes:
            continue
        if m.get("skip"):
            print(f"\n== {m['name']}: {m['skip']}", flush=True)
            rows.append({"mode": m["name"], "procs": m["nproc"], "status": m["skip"], "note": m.get("note")})
            continue
        if m["method"] == "GRPO" and not parent:
            rows.append({"mode": m["name"], "procs": m["nproc"], "status": "skipped: needs the sft run's adapter", "note": m.get("note")})
            continue
        cfg = mode_config(m, base, data, work, steps, parent if m["method"] == "GRPO" else None)
        extra = ["--nproc-per-node", str(m["nproc"])]
        res = run_method(m["name"], cfg, work, a.timeout, a.rehearse_gpu_flags, extra, m["env"])
        row = check_mode(m, res, {**expect, "output": cfg["outputUri"]}, steps, checks)
        row["output"] = cfg["outputUri"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == CHILD_FLAG:
        probe_path = argv[1]
        rest = argv[2:]
        if rest and rest[0] == "--":
            rest = rest[1:]
        return child_main(probe_path, rest)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", default="gpu_check.json", help="JSON summary path (default ./gpu_check.json)")
    ap.add_argument("--allow-cpu", action="store_true", help="run without CUDA (checks the trainer's CPU policy instead)")
    ap.add_argument("--rehearse-gpu-flags", action="store_true", help="CPU only: force bf16 + activation checkpointing in the trainer (see above)")
    ap.add_argument("--steps", type=int, default=40, help="training steps per method (default 40)")
    ap.add_argument("--workdir", default=None, help="where model, data and artifacts go (default a temp dir, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per trainer run (default 420)")
    ap.add_argument("--methods", default="sft,grpo,dpo", help="comma-separated subset of sft,grpo,dpo (grpo continues sft)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated subset of {','.join(MODES)}, or 'none': several processes, FSDP2, QLoRA, vLLM (see mode_plan)")
    ap.add_argument("--mode-steps", type=int, default=20, help="training steps per mode (default 20)")
    a = ap.parse_args(argv)

    t_all = time.perf_counter()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not a.allow_cpu:
        print("gpu_check: ERROR: CUDA is not available (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, built for CUDA {torch.version.cuda}). Run this on a machine with an NVIDIA GPU "
              "and a CUDA build of torch, or pass --allow-cpu for a CPU dry run.", file=sys.stderr)
        return 2
    if a.rehearse_gpu_flags and cuda:
        print("gpu_check: ERROR: --rehearse-gpu-flags is only for CPU-only machines", file=sys.stderr)
        return 2
    bf16_ok = bool(cuda and torch.cuda.is_bf16_supported())
    expect = {"cuda": cuda, "bf16": bf16_ok or a.rehearse_gpu_flags, "ckpt": cuda or a.rehearse_gpu_flags, "steps": a.steps}

    import peft
    import transformers

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                "transformers": transformers.__version__, "peft": peft.__version__}
    for mod in ("trl", "datasets", "pydantic", "accelerate"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            versions[mod] = f"import failed: {e.__class__.__name__}: {e}"
    device = {"cuda": cuda, "name": torch.cuda.get_device_name(0) if cuda else "cpu", "bf16_supported": bf16_ok,
              "count": torch.cuda.device_count() if cuda else 0,
              "total_memory_mib": round(torch.cuda.get_device_properties(0).total_memory / 2**20) if cuda else None}
    print(f"gpu_check: device {device['name']} (cuda={cuda}, bf16 supported={bf16_ok}); " +
          ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    if a.rehearse_gpu_flags:
        print("gpu_check: REHEARSAL: trainer forced to bf16 + activation checkpointing on CPU; not a GPU check", flush=True)

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="perennial-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    checks = Checks()
    summary: dict[str, Any] = {"device": device, "versions": versions, "expect": expect, "workdir": str(work),
                               "rehearsal": a.rehearse_gpu_flags, "runs": {}, "reload": {}}
    methods = [m.strip().lower() for m in a.methods.split(",") if m.strip()]
    try:
        from tinymodel import build_tiny_model
        from trainer_support import FRUIT_REWARD_SPEC, run_config, write_fruit_data

        t0 = time.perf_counter()
        base = build_tiny_model(work / "tiny")
        data = write_fruit_data(work / "data")
        print(f"gpu_check: tiny model + data in {time.perf_counter() - t0:.1f}s under {work}", flush=True)

        n = a.steps
        # The trainer tests' recipe (tests/e2e/test_trainer.py), with --steps steps each.
        configs = {
            "sft": run_config(name="gpu-sft", method="SFT", base=base, output=str(work / "out" / "sft"),
                              datasets=[{"name": "format", "uri": "file://" + data["sft"]},
                                        {"name": "heldout", "uri": data["eval"], "split": "Eval"}],
                              hp={"learningRate": "3e-3", "maxSteps": n, "batchSize": 16, "seed": 42, "maxCompletionLength": 12},
                              reward_spec=FRUIT_REWARD_SPEC, evaluation={"enabled": True}, checkpoint_every=max(1, n // 2)),
            "grpo": run_config(name="gpu-grpo", method="GRPO", base=base, output=str(work / "out" / "grpo"),
                               parent=str(work / "out" / "sft") if "sft" in methods else None,
                               datasets=[{"name": "prompts", "uri": data["grpo"]}, {"name": "heldout", "uri": data["eval"], "split": "Eval"}],
                               hp={"learningRate": "3e-4", "maxSteps": n, "batchSize": 32, "numGenerations": 16,
                                   "maxCompletionLength": 12, "entropyCoef": "0.05", "temperature": "1.0", "seed": 42},
                               reward_spec=FRUIT_REWARD_SPEC, evaluation={"enabled": True}, checkpoint_every=max(1, n // 2)),
            "dpo": run_config(name="gpu-dpo", method="DPO", base=base, output=str(work / "out" / "dpo"),
                              datasets=[{"name": "pairs", "uri": data["dpo"]}],
                              hp={"learningRate": "3e-3", "maxSteps": n, "batchSize": 8, "beta": "0.1", "seed": 42, "maxCompletionLength": 12},
                              reward_spec=FRUIT_REWARD_SPEC, evaluation={"enabled": True, "heldOutPercent": 25}, checkpoint_every=max(1, n // 2)),
        }
        rows = []
        for m in methods:
            res = run_method(m, configs[m], work, a.timeout, a.rehearse_gpu_flags)
            row = check_run(m, res, {**expect, "output": configs[m]["outputUri"]}, checks)
            if res.get("log_tail"):
                row["log_tail"] = res["log_tail"]
            row["probe"] = res.get("probe")
            summary["runs"][m] = row
            rows.append(row)
            if m == "sft" and res["rc"] != 0 and "grpo" in methods:
                print("gpu_check: SFT failed; GRPO continues its adapter and is skipped", flush=True)
                methods = [x for x in methods if x != "grpo"]

        modes = [] if a.modes.strip().lower() == "none" else [x.strip().lower() for x in a.modes.split(",") if x.strip()]
        unknown = sorted(set(modes) - set(MODES))
        if unknown:
            raise SystemExit(f"gpu_check: unknown --modes {unknown}; known: {', '.join(MODES)}")
        if modes:
            parent = configs["sft"]["outputUri"] if (Path(configs["sft"]["outputUri"]) / "adapter_model.safetensors").is_file() else None
            summary["modes"] = run_modes(modes, base, data, work, a.mode_steps, parent, a, expect, device["count"], checks)

        outputs = {m: configs[m]["outputUri"] for m in summary["runs"]
                   if (Path(configs[m]["outputUri"]) / "adapter_model.safetensors").is_file()}
        outputs.update({r["mode"]: r["output"] for r in summary.get("modes", [])
                        if r.get("output") and (Path(r["output"]) / "adapter_model.safetensors").is_file()})
        print("\n== reload every adapter into one PeftModel and generate", flush=True)
        if outputs:
            summary["reload"] = reload_and_generate(base, outputs, expect, checks)
        else:
            checks.add("reload: at least one adapter to reload", False, "no adapter was written")
    except Exception as e:  # noqa: BLE001 - report it as a failed check with its traceback
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        checks.add("gpu_check itself ran to the end", False, f"{e.__class__.__name__}: {e}")
        summary["error"] = tb

    summary["checks"] = checks.items
    summary["failed"] = [c["name"] for c in checks.failed]
    summary["warnings"] = [c["name"] for c in checks.items if not c["hard"] and not c["ok"]]
    summary["ok"] = not checks.failed
    summary["total_seconds"] = round(time.perf_counter() - t_all, 1)

    # ------------------------------------------------------------------ summary
    print("\n" + "=" * 100)
    print(f"gpu_check summary: {device['name']}  torch {versions['torch']} (cuda {versions['torch_cuda']})  "
          f"transformers {versions['transformers']}  trl {versions.get('trl')}  peft {versions['peft']}")
    hdr = f"{'method':6} {'status':10} {'steps':>5} {'steps/s':>8} {'trl st/s':>8} {'peak MiB':>9} {'proc MiB':>9} {'bf16':>5} {'mp':>5} {'ckpt':>5} {'ckpt calls':>10} {'loss':>8}  eval reward (baseline)"
    print(hdr)
    for m, r in summary["runs"].items():
        ev = r.get("eval") or {}
        evs = f"{ev['eval/mean_reward']:.3f} ({ev['eval/baseline_mean_reward']:.3f})" if "eval/mean_reward" in ev else "-"

        def f(v, spec):
            return format(v, spec) if isinstance(v, (int, float)) else "-"

        print(f"{m:6} {str(r.get('status')):10} {f(r.get('steps'), '5d'):>5} {f(r.get('steps_per_s'), '8.2f'):>8} "
              f"{f(r.get('trainer_steps_per_s'), '8.2f'):>8} {f(r.get('peak_gpu_mem_train_mib'), '9.1f'):>9} "
              f"{f(r.get('peak_gpu_mem_process_mib'), '9.1f'):>9} {str(r.get('bf16')):>5} {str(r.get('mixed_precision')):>5} "
              f"{str(r.get('activation_checkpointing_model')):>5} {f(r.get('checkpointed_layer_calls'), '10d'):>10} "
              f"{f(r.get('train_loss'), '8.4f'):>8}  {evs}")
    # one table: steps/s and peak GPU memory of every run (the methods are one process each)
    print(f"\n{'run':10} {'procs':>5} {'status':34} {'steps':>5} {'steps/s':>8} {'peak MiB':>9} {'gen':>12}  note")
    table = [{"mode": m, "procs": 1, "status": r.get("status"), "steps": r.get("steps"), "steps_per_s": r.get("steps_per_s"),
              "peak_gpu_mem_mib": r.get("peak_gpu_mem_train_mib"), "generation": r.get("generation"), "note": "one process"}
             for m, r in summary["runs"].items()] + summary.get("modes", [])
    for r in table:
        def g(v, spec):
            return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"

        note = r.get("note") or ""
        if r.get("peak_gpu_mem_mib_per_rank") and len(r["peak_gpu_mem_mib_per_rank"]) > 1:
            note += f"; peak MiB per rank {r['peak_gpu_mem_mib_per_rank']}"
        if r.get("reason") and r.get("status") == "Failed":
            note = f"{r['reason']} (expected); " + note
        print(f"{r['mode']:10} {r.get('procs', 1):>5} {str(r.get('status'))[:34]:34} {g(r.get('steps'), 'd'):>5} "
              f"{g(r.get('steps_per_s'), '.2f'):>8} {g(r.get('peak_gpu_mem_mib'), '.1f'):>9} {str(r.get('generation') or '-'):>12}  {note}")
    for m, r in summary["reload"].items():
        print(f"reload {m:5} on {r['output_device']}: {r['outputs']}")
    if summary["warnings"]:
        print("warnings: " + "; ".join(summary["warnings"]))
    verdict = "PASS" if summary["ok"] else f"FAIL ({len(summary['failed'])} checks): " + "; ".join(summary["failed"])
    print(f"gpu_check: {verdict}  [{sum(c['ok'] for c in checks.items)}/{len(checks.items)} checks ok, {summary['total_seconds']}s]")

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=repr))
    print(f"gpu_check: JSON summary written to {out}")
    if not a.keep and not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
