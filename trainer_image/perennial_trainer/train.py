"""One training run: data -> TRL (SFT / DPO / GRPO) + PEFT LoRA -> evaluation -> artifact."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from perennial.api.trainingrun import EVAL_DEFAULT_MAX_COMPLETION_LENGTH, GRPO_DEFAULT_NUM_GENERATIONS

from . import checkpoints
from .config import RunConfig
from .data import LoadedDataset, check_columns, load_feedback_dataset, load_uri_dataset, split_held_out
from .errors import TrainerError
from .callbacks import ProgressCallback
from .feedback import DEFAULT_MIN_EXAMPLES, drop_too_long, with_reference_fields
from .feedback import report as feedback_report
from .curves import CurvePlotter
from .distributed import World, fsdp_wanted, world
from .progress import atomic_write_json
from .signals import eval_signals, train_signals
from .storage import is_local, localize, resolve_uri, upload_dir

log = logging.getLogger("perennial_trainer")

DEFAULT_LR = {"SFT": 2e-4, "DPO": 5e-5, "GRPO": 1e-5}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _f(v: str | None) -> float | None:
    return None if v is None else float(v)


# ------------------------------------------------------------------------------------ data


def load_datasets(cfg: RunConfig) -> tuple[list[LoadedDataset], list[dict], list[dict]]:
    """(datasets, train rows, eval rows)."""
    spec = cfg.spec
    loaded: list[LoadedDataset] = []
    for d in spec.datasets:
        if d.uri:
            ds = load_uri_dataset(d.name, d.uri, d.format, d.split, d.sha256)
        else:
            fb = d.feedback
            store = fb.store_uri or cfg.feedback_store_uri
            if not store:
                raise TrainerError(f"dataset {d.name!r}: feedback snapshot without a store URI (set feedback.storeUri or feedbackStoreUri)", "InvalidConfig")
            ds = load_feedback_dataset(d.name, store, fb.segments, spec.method, _f(fb.min_rating), d.split, snapshot=fb.snapshot,
                                       min_examples=fb.min_examples, deployment=fb.deployment_ref.name)
        if d.split == "Train":
            check_columns(ds, spec.method)
        loaded.append(ds)
    train = [r for ds in loaded if ds.split == "Train" for r in ds.rows]
    evals = [r for ds in loaded if ds.split == "Eval" for r in ds.rows]
    if spec.evaluation.enabled and not evals:
        train, evals = split_held_out(train, spec.evaluation.held_out_percent, spec.hyperparameters.seed)
    elif spec.evaluation.enabled and any(d.feedback for d in spec.datasets if d.split == "Train"):
        # Feedback (continuous learning's snapshots) keeps its held-out share next to the Eval sets: the promotion gate
        # compares the adapter with its parent on live data too, not only on fixed sets.
        feedback = [r for ds, d in zip(loaded, spec.datasets, strict=True) if ds.split == "Train" and d.feedback for r in ds.rows]
        files = [r for ds, d in zip(loaded, spec.datasets, strict=True) if ds.split == "Train" and not d.feedback for r in ds.rows]
        kept, held = split_held_out(feedback, spec.evaluation.held_out_percent, spec.hyperparameters.seed)
        train, evals = files + kept, held + evals
    # a held-out feedback row's reference (its correction, an approved answer) in the field the graders read
    return loaded, train, with_reference_fields(evals[: spec.evaluation.max_samples], cfg.grading_spec())


def normalise_rows(rows: list[dict], method: str) -> list[dict]:
    """Make column types uniform for `datasets` (TRL reads prompt/completion/messages/chosen/rejected)."""
    if method == "SFT":
        out = []
        for r in rows:
            if "messages" in r or "text" in r:
                out.append(r)
            else:
                p, c = r["prompt"], r["completion"]
                if isinstance(p, list) and isinstance(c, str):
                    c = [{"role": "assistant", "content": c}]
                out.append({**r, "prompt": p, "completion": c})
        return out
    if method == "DPO":
        out = []
        for r in rows:
            p = r["prompt"]
            ch, rj = r["chosen"], r["rejected"]
            if isinstance(p, list):
                ch = [{"role": "assistant", "content": ch}] if isinstance(ch, str) else ch
                rj = [{"role": "assistant", "content": rj}] if isinstance(rj, str) else rj
            out.append({**r, "chosen": ch, "rejected": rj})
        return out
    return rows


def eval_prompt(row: dict) -> Any:
    """The prompt of a row (chat messages without the final assistant turn, or a string)."""
    if "prompt" in row:
        return row["prompt"]
    if "messages" in row:
        msgs = list(row["messages"])
        while msgs and msgs[-1].get("role") == "assistant":
            msgs.pop()
        return msgs
    return row.get("text", "")


def row_tokens(tok, row: dict, method: str) -> int:
    """Tokens of a feedback row as the trainer sees it (chat template applied): SFT prompt + completion, DPO
    prompt + the longer answer, GRPO the prompt."""

    def count(prompt: Any, completion: Any = None) -> int:
        if isinstance(prompt, list):
            msgs = list(prompt)
            if completion is not None:
                msgs += completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            try:
                text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=completion is None)
            except Exception:  # noqa: BLE001 - no chat template: the contents alone
                text = "\n".join(str(m.get("content") or "") for m in msgs)
        else:
            tail = completion if isinstance(completion, str) else "".join(str(m.get("content") or "") for m in completion or [])
            text = str(prompt) + tail
        return len(tok(text, add_special_tokens=False)["input_ids"])

    if method == "SFT":
        return count(row["prompt"], row["completion"])
    if method == "DPO":
        return max(count(row["prompt"], row["chosen"]), count(row["prompt"], row["rejected"]))
    return count(row["prompt"])


# ------------------------------------------------------------------------------------ model


def device_setup() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    w = world()
    if cuda and w.distributed:
        torch.cuda.set_device(w.local_rank)  # one GPU per process: "cuda" below means this process's own
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    return {"cuda": cuda, "use_cpu": not cuda, "bf16": bf16, "gradient_checkpointing": cuda,
            "dtype": torch.bfloat16 if bf16 else torch.float32, "fsdp": False}


def load_base(path: str, dev: dict[str, Any]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra: dict[str, Any] = {}
    if dev.get("quantize"):  # QLoRA: frozen base weights in 4-bit NF4, computed in bf16
        import torch
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if dev["bf16"] else torch.float16)
        extra["device_map"] = {"": torch.cuda.current_device()}
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dev["dtype"], **extra)
    except (OSError, ValueError) as e:
        raise TrainerError(f"cannot load base model from {path}: {e}", "BaseModelUnavailable") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if dev["cuda"] and not dev.get("quantize"):
        model = model.to("cuda")
    return tok, model


def check_quantization(cfg: RunConfig, dev: dict[str, Any]) -> dict[str, Any]:
    """`dev` with `quantize` set for `lora.quantization: 4bit` (QLoRA), which needs a CUDA GPU and bitsandbytes."""
    if cfg.spec.lora.quantization != "4bit":
        return dict(dev, quantize=False)
    if not dev["cuda"]:
        raise TrainerError("`lora.quantization: 4bit` (QLoRA) needs CUDA GPUs (bitsandbytes' 4-bit kernels); this run has "
                           "no GPU: set `resources.gpus`, or leave `lora.quantization` unset", "InvalidConfig")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TrainerError("`lora.quantization: 4bit` (QLoRA) needs the bitsandbytes package in the trainer image", "InvalidConfig") from None
    return dict(dev, quantize=True)


def cpu_threads(model, dev: dict[str, Any]) -> None:
    """Small model on CPU: one intra-op thread. Tiny matmuls gain nothing from threads, and on a busy
    machine every parallel region waits for a descheduled peer (10x slower). Explicit
    OMP_NUM_THREADS / PERENNIAL_TORCH_THREADS settings win."""
    import torch

    if dev["cuda"]:
        return
    explicit = os.environ.get("PERENNIAL_TORCH_THREADS")
    if explicit:
        torch.set_num_threads(max(1, int(explicit)))
    elif "OMP_NUM_THREADS" not in os.environ and sum(p.numel() for p in model.parameters()) < 50_000_000:
        torch.set_num_threads(1)


def lora_config(cfg: RunConfig):
    from peft import LoraConfig

    lo = cfg.spec.lora
    targets = lo.target_modules
    return LoraConfig(
        r=lo.rank, lora_alpha=lo.alpha, lora_dropout=float(lo.dropout), task_type="CAUSAL_LM",
        target_modules="all-linear" if targets == ["all-linear"] else targets,
    )


def grpo_group(cfg: RunConfig, dev: dict[str, Any] | None = None, prompts: int | None = None) -> tuple[int, int]:
    """GRPO's (numGenerations, per-device batch size in completions); an unset batch size is the base model's default
    number of prompts per step (`grpo_defaults`, resolved into `dev["grpo_defaults"]`; one prompt before that), at most
    the `prompts` each process has (a batch larger than the data makes an empty epoch)."""
    hp = cfg.spec.hyperparameters
    ng = hp.num_generations or GRPO_DEFAULT_NUM_GENERATIONS
    if hp.batch_size:
        return ng, hp.batch_size
    defaults = (dev or {}).get("grpo_defaults")
    per_step = defaults.prompts_per_step if defaults else 1
    if prompts is not None:
        per_step = max(1, min(per_step, prompts))
    return ng, ng * per_step


def check_hyperparameters(cfg: RunConfig) -> None:
    """What the CRD's CEL rules also check at admission, checked again before any work (a run config can
    come from elsewhere): a permanent `InvalidConfig`."""
    if cfg.spec.method == "GRPO":
        ng, bs = grpo_group(cfg)
        if bs % ng:
            raise TrainerError(f"`hyperparameters.batchSize` ({bs}) must be a multiple of `hyperparameters.numGenerations` ({ng}) "
                               "when `method` is 'GRPO'", "InvalidConfig")


def trl_config(cfg: RunConfig, checkpoint_dir: str, dev: dict[str, Any], n_train: int, weights: list[float] | None):
    from trl import DPOConfig, GRPOConfig, SFTConfig

    spec, hp = cfg.spec, cfg.spec.hyperparameters
    method = spec.method
    grpo_defaults = dev.get("grpo_defaults") if method == "GRPO" else None  # by the base model's size
    common: dict[str, Any] = dict(
        output_dir=checkpoint_dir,
        learning_rate=_f(hp.learning_rate) or (grpo_defaults.learning_rate if grpo_defaults else DEFAULT_LR[method]),
        num_train_epochs=hp.epochs or (1 if method == "GRPO" else 3),
        max_steps=hp.max_steps or -1,
        gradient_accumulation_steps=hp.gradient_accumulation_steps or 1,
        warmup_steps=_f(hp.warmup_ratio) or 0,  # transformers 5: a float < 1 is a ratio
        seed=hp.seed, data_seed=hp.seed,
        logging_steps=1, logging_first_step=True,
        save_strategy="steps", save_steps=spec.run_policy.checkpoint_every_steps, save_total_limit=2,
        report_to="none", disable_tqdm=True,
        use_cpu=dev["use_cpu"], bf16=dev["bf16"], fp16=False,
        dataloader_num_workers=0,
        lr_scheduler_type="constant_with_warmup" if method == "GRPO" else "linear",
    )
    # TRL turns activation (gradient) checkpointing on by default: worth its recomputation on a GPU
    # short of memory, pure cost on CPU (about 10% of a GRPO step on the tiny model). Always explicit.
    common["activation_checkpointing"] = bool(dev["gradient_checkpointing"])
    if world().distributed:
        # Every LoRA parameter takes part in every step: no search for unused ones (DDP's costly default).
        common["ddp_find_unused_parameters"] = False
        if dev["fsdp"]:  # FSDP2 (Accelerate's `fsdp_version: 2`): the frozen base weights are sharded over the processes
            common["fsdp"] = True
            common["fsdp_config"] = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
                                     "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": False,
                                     "activation_checkpointing": bool(dev["gradient_checkpointing"])}
            common["activation_checkpointing"] = False  # FSDP's own (above) instead of the model's
    if method == "SFT":
        return SFTConfig(per_device_train_batch_size=hp.batch_size or 8, max_length=hp.max_length or 1024, **common)
    if method == "DPO":
        return DPOConfig(per_device_train_batch_size=hp.batch_size or 8, max_length=hp.max_length or 1024,
                         beta=_f(hp.beta) if hp.beta is not None else 0.1, **common)
    check_hyperparameters(cfg)
    ng, bs = grpo_group(cfg, dev, prompts=n_train // world().size)
    extra: dict[str, Any] = {}
    if hp.entropy_coef is not None:
        extra["entropy_coef"] = float(hp.entropy_coef)
    elif grpo_defaults and grpo_defaults.entropy_coef is not None:
        extra["entropy_coef"] = grpo_defaults.entropy_coef
    return GRPOConfig(
        per_device_train_batch_size=bs, num_generations=ng,
        max_completion_length=hp.max_completion_length or 256,
        temperature=_f(hp.temperature) if hp.temperature is not None else 1.0,
        beta=_f(hp.beta) if hp.beta is not None else 0.0,
        reward_weights=weights, log_completions=False,
        **extra, **dev.get("grpo_generation", {}), **common,
    )


# ------------------------------------------------------------------------------------ eval


def generate(model, tok, prompts: list[Any], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    import torch

    texts = []
    for p in prompts:
        if isinstance(p, list):
            texts.append(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True))
        else:
            texts.append(p)
    out: list[str] = []
    model.eval()
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for row in gen[:, enc["input_ids"].shape[1]:]:
            out.append(tok.decode(row, skip_special_tokens=True))
    return out


def eval_max_completion_length(cfg: RunConfig) -> int:
    """Tokens generated per evaluation prompt, for every method: `evaluation.maxCompletionLength`, else
    `hyperparameters.maxCompletionLength` (what existing manifests set), else the default."""
    spec = cfg.spec
    return spec.evaluation.max_completion_length or spec.hyperparameters.max_completion_length or EVAL_DEFAULT_MAX_COMPLETION_LENGTH


def evaluate(cfg: RunConfig, base_path: str, adapter_dir: str, parent_dir: str | None, eval_rows: list[dict], dev) -> dict[str, float]:
    """Greedy-generate with the new adapter and its baseline (parent or base) and grade both."""
    from peft import PeftModel

    from .graders import completion_text, score_all

    spec = cfg.grading_spec()
    if spec is None or not eval_rows:
        return {}
    tok, base = load_base(base_path, dev)
    model = PeftModel.from_pretrained(base, adapter_dir, adapter_name="new")
    if parent_dir:
        model.load_adapter(parent_dir, adapter_name="parent")
    prompts = [eval_prompt(r) for r in eval_rows]
    max_new = eval_max_completion_length(cfg)
    model.set_adapter("new")
    new_out = generate(model, tok, prompts, max_new)
    if parent_dir:
        model.set_adapter("parent")
        base_out = generate(model, tok, prompts, max_new)
    else:
        with model.disable_adapter():
            base_out = generate(model, tok, prompts, max_new)
    items = [dict(r) for r in eval_rows]
    new_sc = score_all(spec, [{"output_text": o, "prompt": p} for o, p in zip(new_out, prompts)], items)
    base_sc = score_all(spec, [{"output_text": o, "prompt": p} for o, p in zip(base_out, prompts)], items)
    n = len(eval_rows)
    m: dict[str, float] = {
        "eval/samples": float(n),
        "eval/mean_reward": sum(s.total for s in new_sc) / n,
        "eval/baseline_mean_reward": sum(s.total for s in base_sc) / n,
    }
    m["eval/improvement"] = m["eval/mean_reward"] - m["eval/baseline_mean_reward"]
    for g in spec.graders:
        a = sum(s.scores[g.name] for s in new_sc) / n
        b = sum(s.scores[g.name] for s in base_sc) / n
        m[f"eval/rewards/{g.name}"] = a
        m[f"eval/baseline_rewards/{g.name}"] = b
        m[f"eval/improvement/{g.name}"] = a - b
    log.info("eval: mean reward %.3f (baseline %.3f) on %d prompts; e.g. %r", m["eval/mean_reward"], m["eval/baseline_mean_reward"], n, completion_text(new_out[0])[:80])
    return m


# ------------------------------------------------------------------------------------ run


def default_checkpoint_dir(cfg: RunConfig) -> str:
    if cfg.checkpoint_dir:
        return resolve_uri(cfg.checkpoint_dir)
    if is_local(cfg.output_uri):
        return os.path.join(resolve_uri(cfg.output_uri), "checkpoints")
    return os.path.join(tempfile.gettempdir(), "perennial-checkpoints", cfg.namespace, cfg.run_name)


def last_complete_checkpoint(ckpt_dir: str, clean: bool = True) -> str | None:
    """The newest `checkpoint-N` that was completely written (a kill mid-save leaves a partial one, removed when
    `clean`: only one process of a pod removes)."""
    if not os.path.isdir(ckpt_dir):
        return None
    found = []
    for d in Path(ckpt_dir).glob("checkpoint-*"):
        suffix = d.name.split("-", 1)[1]
        if suffix.isdigit() and (d / "trainer_state.json").is_file():
            try:
                json.loads((d / "trainer_state.json").read_text())
            except ValueError:
                continue
            if any(d.glob("*.safetensors")) or any(d.glob("*.bin")):
                found.append((int(suffix), str(d)))
    if not found:
        return None
    partial = [d for d in Path(ckpt_dir).glob("checkpoint-*") if str(d) != max(found)[1] and d.name.split("-", 1)[1].isdigit() and int(d.name.split("-", 1)[1]) > max(found)[0]]
    for d in partial if clean else []:
        log.warning("ignoring incomplete checkpoint %s", d)
        shutil.rmtree(d, ignore_errors=True)
    return max(found)[1]


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train, evaluate and write the artifact; returns the result (termination message content)."""
    from transformers import set_seed

    t_start = time.monotonic()
    spec = cfg.spec
    method = spec.method
    set_seed(spec.hyperparameters.seed)
    dev = device_setup()
    if method == "GRPO" and cfg.reward_spec is None:
        raise TrainerError("method GRPO needs a rewardSpec", "InvalidConfig")
    check_hyperparameters(cfg)
    check_quantization(cfg, dev)  # a QLoRA run without a GPU fails before reading any data
    if cfg.reward_spec is not None or cfg.eval_reward_spec is not None:
        from .graders import check_reward_spec

        if cfg.reward_spec is not None:
            check_reward_spec(cfg.reward_spec, "rewardSpec")
        if cfg.eval_reward_spec is not None:
            check_reward_spec(cfg.eval_reward_spec, "evalRewardSpec")

    datasets_, train_rows, eval_rows = load_datasets(cfg)
    if not train_rows:
        raise TrainerError("no training rows left after the held-out split", "EmptyDataset")
    _, data_note = feedback_report(datasets_)
    if data_note:
        log.info("%s", data_note)
    log.info("%s run %s/%s: %d train rows, %d eval rows, device %s", method, cfg.namespace, cfg.run_name, len(train_rows), len(eval_rows), "cuda" if dev["cuda"] else "cpu")

    work = Path(tempfile.mkdtemp(prefix="perennial-run-"))
    staging = work / "artifact"
    staging.mkdir()
    # imports matplotlib on another core meanwhile; only rank 0 draws (it alone writes the artifact)
    plotter = CurvePlotter(str(staging / "curves.png")) if world().main else _NoPlot()
    try:
        return _run(cfg, dev, datasets_, train_rows, eval_rows, work, staging, plotter, t_start)
    finally:
        plotter.cancel()
        shutil.rmtree(work, ignore_errors=True)


class _NoPlot:
    def send(self, history) -> None:
        pass

    def wait(self) -> None:
        pass

    def cancel(self) -> None:
        pass


def _barrier(w: World, dev: dict[str, Any]):
    """A function waiting for every process (nothing to wait for in a single-process run). The process group is
    Accelerate's, the one the Trainer uses next (gloo on CPU, NCCL on GPU)."""
    if not w.distributed:
        return lambda: None
    from accelerate import PartialState

    state = PartialState(cpu=dev["use_cpu"])
    return state.wait_for_everyone


GPU_MEMORY_ENV = "PERENNIAL_GPU_MEMORY"  # bytes per GPU as a quantity ("24Gi"): what the estimate checks against when set


def memory_workload(cfg: RunConfig, dev: dict[str, Any] | None = None) -> tuple[int, int]:
    """The per-device batch and sequence length the memory estimates assume (`check_memory`, and the room the GRPO
    generation engine leaves in `generation.choose`)."""
    spec, hp = cfg.spec, cfg.spec.hyperparameters
    if spec.method == "GRPO":
        _, batch = grpo_group(cfg, dev)
        return batch, (hp.max_length or 512) + (hp.max_completion_length or 256)
    return (hp.batch_size or 8) * (2 if spec.method == "DPO" else 1), hp.max_length or 1024  # DPO: chosen and rejected


def gpu_memory_bytes(dev: dict[str, Any], w: World) -> int | None:
    """Each GPU's memory: `$PERENNIAL_GPU_MEMORY` if set, else what CUDA reports; None on CPU."""
    from perennial.resources.podsecurity import quantity_bytes

    override = os.environ.get(GPU_MEMORY_ENV)
    if override:
        try:
            return quantity_bytes(override)
        except ValueError as e:
            raise TrainerError(f"${GPU_MEMORY_ENV}: {e}", "InvalidConfig") from None
    if dev["cuda"]:
        import torch

        return torch.cuda.get_device_properties(w.local_rank).total_memory
    return None


def check_memory(cfg: RunConfig, base_path: str, dev: dict[str, Any], w: World) -> None:
    """Fail at once, with the estimate, when the run cannot fit its GPUs (`perennial.memory`): read from the base
    model's config.json, against each GPU's memory (or `$PERENNIAL_GPU_MEMORY`). CPU runs are not checked."""
    from perennial.memory import check_fits, shape_of

    gpu_bytes = gpu_memory_bytes(dev, w)
    if gpu_bytes is None:
        return
    try:
        shape = shape_of(json.loads((Path(base_path) / "config.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        log.warning("no memory estimate for %s: %s", base_path, e)
        return
    spec = cfg.spec
    batch, seq = memory_workload(cfg, dev)
    weight_bytes = 4 if dev["cuda"] and not dev["bf16"] else 2
    quantized = spec.lora.quantization == "4bit"
    sharded = fsdp_wanted(shape.params, weight_bytes, gpu_bytes, w) and not quantized
    why = check_fits(shape, gpu_bytes, lora_rank=spec.lora.rank, lora_targets=list(spec.lora.target_modules), batch=batch, seq=seq,
                     gpus=w.size, sharded=sharded, quantized=quantized, weight_bytes=weight_bytes, checkpointing=True)
    if why:
        raise TrainerError(why, "InsufficientGPUMemory")


def _run(cfg: RunConfig, dev: dict[str, Any], datasets_: list[LoadedDataset], train_rows: list[dict], eval_rows: list[dict],
         work: Path, staging: Path, plotter: CurvePlotter | _NoPlot, t_start: float) -> dict[str, Any]:
    spec = cfg.spec
    method = spec.method
    w = world()
    barrier = _barrier(w, dev)
    base_path = localize(cfg.base_model_uri, work)
    parent_path = None
    if cfg.parent_adapter_uri:
        (work / "parent").mkdir()
        parent_path = localize(cfg.parent_adapter_uri, work / "parent")
        if not (Path(parent_path) / "adapter_config.json").exists():
            raise TrainerError(f"parent adapter {cfg.parent_adapter_uri} has no adapter_config.json", "ParentAdapterInvalid")

    ckpt_dir = default_checkpoint_dir(cfg)
    mirror = checkpoints.mirror_uri(cfg.output_uri)
    if w.local_main:  # one process per pod prepares the checkpoints every process resumes from
        os.makedirs(ckpt_dir, exist_ok=True)
        if mirror and last_complete_checkpoint(ckpt_dir) is None:
            checkpoints.restore_checkpoint(mirror, ckpt_dir)  # a new pod: the local checkpoint dir is empty
    barrier()
    progress_paths = [str(staging / "progress.json")]
    if is_local(cfg.output_uri):
        progress_paths.append(os.path.join(resolve_uri(cfg.output_uri), "progress.json"))

    grpo_defaults = None
    if method == "GRPO":  # defaults for unset hyperparameters by the base model's size, and why (perennial_trainer.grpo_defaults)
        from .grpo_defaults import resolve

        grpo_defaults = resolve(base_path)
        dev = dict(dev, grpo_defaults=grpo_defaults)
        if w.main:
            log.info("%s", grpo_defaults.describe())
    check_memory(cfg, base_path, dev, w)  # before any weight is loaded: a run that cannot fit fails in seconds
    dev = check_quantization(cfg, dev)
    tok, model = load_base(base_path, dev)
    cpu_threads(model, dev)
    if w.distributed:
        import torch

        n_params = sum(p.numel() for p in model.parameters())
        gpu_bytes = torch.cuda.get_device_properties(w.local_rank).total_memory if dev["cuda"] else None
        fsdp = fsdp_wanted(n_params, model.dtype.itemsize, gpu_bytes, w) and not dev["quantize"]  # QLoRA: DDP
        if fsdp and not dev["cuda"]:
            # Accelerate (1.15) builds FSDP only on accelerators: asked for on CPU it would silently be DDP anyway
            log.warning("FSDP needs GPUs (Accelerate ignores it on CPU): training with DDP")
            fsdp = False
        dev = dict(dev, fsdp=fsdp)
    minimums = {d.name: d.feedback.min_examples or DEFAULT_MIN_EXAMPLES[method] for d in spec.datasets if d.feedback}
    if minimums:  # feedback rows that would be truncated are dropped (counted), not trained on cut
        max_len = spec.hyperparameters.max_length or 1024
        train_rows, eval_rows = drop_too_long(datasets_, [train_rows, eval_rows], lambda r: row_tokens(tok, r, method) > max_len, minimums)
        if not train_rows:
            raise TrainerError("no training rows fit in `hyperparameters.maxLength`", "EmptyDataset")
    peft_config = None
    if parent_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, parent_path, is_trainable=True)
    else:
        peft_config = lora_config(cfg)

    from datasets import Dataset

    rows = normalise_rows(train_rows, method)
    try:
        train_ds = Dataset.from_list(rows)
    except Exception as e:  # noqa: BLE001 - mixed column types
        raise TrainerError(f"training rows have inconsistent columns/types: {e}", "InvalidDataset") from None

    reward_names: list[str] = []
    weights = None
    reward_funcs = None
    if method == "GRPO":
        from .graders import reward_functions

        reward_funcs, weights = reward_functions(cfg.reward_spec)
        reward_names = [g.name for g in cfg.reward_spec.graders]
    generation = None
    if method == "GRPO":  # vLLM or Transformers generation, and why (perennial_trainer.generation)
        from .generation import choose

        generation = choose(cfg, base_path, dev, w, max_prompt_tokens=lambda: max(row_tokens(tok, r, method) for r in rows))
        dev = dict(dev, grpo_generation=generation.kwargs)
        if w.main:
            log.info("%s", generation.describe())
    args = trl_config(cfg, ckpt_dir, dev, len(rows), weights)
    if grpo_defaults is not None and not spec.hyperparameters.batch_size:  # record the prompts per step it got
        grpo_defaults = grpo_defaults.applied(args.per_device_train_batch_size // args.num_generations)
    progress = ProgressCallback(progress_paths, reward_names, remote_uri=None if is_local(cfg.output_uri) else cfg.output_uri)
    callbacks = [progress] + ([checkpoints.mirror_callback(mirror)] if mirror else []) if w.main else []
    common = dict(model=model, args=args, train_dataset=train_ds, processing_class=tok, callbacks=callbacks, peft_config=peft_config)
    if method == "SFT":
        from trl import SFTTrainer

        trainer = SFTTrainer(**common)
    elif method == "DPO":
        from trl import DPOTrainer

        trainer = DPOTrainer(**common)
    else:
        from trl import GRPOTrainer

        trainer = GRPOTrainer(reward_funcs=reward_funcs, **common)

    if w.distributed and w.main:
        log.info("%d processes (%s), %s", w.size, "nccl" if dev["cuda"] else "gloo",
                 "FSDP2: base weights sharded" if trainer.is_fsdp_enabled else "DDP: a full copy per process")
    last = last_complete_checkpoint(ckpt_dir, clean=w.local_main)
    if last and w.main:
        log.info("resuming from checkpoint %s", last)
        print(f"PERENNIAL_RESUME {json.dumps({'checkpoint': last})}", flush=True)
    train_out = trainer.train(resume_from_checkpoint=last)
    plotter.send(progress.history)  # drawn while the adapter is saved and evaluated
    if trainer.is_fsdp_enabled:  # the sharded adapter is gathered by every process; rank 0 writes it
        trainer.save_model(str(staging))
        (staging / "training_args.bin").unlink(missing_ok=True)
    elif w.main:
        trainer.model.save_pretrained(str(staging))
    if not w.main:  # rank 0 alone evaluates and writes the artifact, metrics and the result
        return {"status": "Succeeded", "reason": "Trained", "message": f"rank {w.rank} of {w.size} done"}
    tok.save_pretrained(str(staging))
    train_seconds = time.monotonic() - t_start

    metrics: dict[str, float] = {f"train/{k}": float(v) for k, v in train_out.metrics.items() if isinstance(v, (int, float))}
    losses = [h["loss"] for h in progress.history if "loss" in h]
    rewards = [h["reward"] for h in progress.history if "reward" in h]
    if losses:
        metrics["train/loss"] = float(losses[-1])
    if rewards:
        metrics["train/mean_reward"] = float(rewards[-1])
        metrics["train/first_mean_reward"] = float(rewards[0])
    fz = [h["frac_reward_zero_std"] for h in progress.history if "frac_reward_zero_std" in h]
    if fz:
        metrics["train/frac_reward_zero_std"] = float(fz[-1])
        # Over the whole run: 1.0 means no group of completions ever had differing rewards (no signal at all).
        metrics["train/frac_reward_zero_std_mean"] = float(sum(fz) / len(fz))
    metrics["train/steps"] = float(trainer.state.global_step)
    metrics["train/resumed_from_step"] = float(progress.start_step)
    metrics["train/processes"] = float(w.size)
    metrics["train/fsdp"] = 1.0 if trainer.is_fsdp_enabled else 0.0
    if generation is not None:
        metrics.update(generation.metrics)
    if grpo_defaults is not None:
        metrics.update(grpo_defaults.metrics)
    metrics["train/seconds"] = train_seconds

    data_metrics, data_note = feedback_report(datasets_)
    metrics.update(data_metrics)
    signal_metrics, warnings = train_signals(progress.history)
    metrics.update(signal_metrics)

    del trainer
    if spec.evaluation.enabled:
        metrics.update(evaluate(cfg, base_path, str(staging), parent_path, eval_rows, dev))
        warnings += eval_signals(metrics, has_parent=parent_path is not None)
    for w in warnings:
        log.warning("%s: %s", w["reason"], w["message"])

    lineage = {
        "trainingRun": cfg.run_name, "namespace": cfg.namespace, "trainingRunUid": cfg.run_uid,
        "method": method, "baseModel": {"ref": spec.base_model_ref.name, "uri": cfg.base_model_uri},
        # The operator resolves parentTrainingRunRef / parentAdapterFamily to parentAdapterUri (the name is in the run's status).
        "parentAdapter": {"ref": spec.parent_adapter_ref.name if spec.parent_adapter_ref else None, "uri": cfg.parent_adapter_uri}
        if spec.parent_adapter_ref or cfg.parent_adapter_uri else None,
        "datasets": [{"name": d.name, "uri": d.uri, "sha256": d.sha256, "rows": len(d.rows), "split": d.split,
                      **({"feedback": d.stats} if d.stats else {})} for d in datasets_],
        "configHash": cfg.config_hash(),
    }
    if lineage["parentAdapter"] and spec.parent_adapter_ref is None:
        lineage["parentAdapter"]["ref"] = None
    lo = spec.lora
    lora_shape = {"rank": lo.rank, "alpha": lo.alpha, "targetModules": lo.target_modules}
    try:  # a continued parent keeps its own shape: report what was saved
        saved = json.loads((staging / "adapter_config.json").read_text())
        tm = saved.get("target_modules")
        lora_shape = {"rank": saved["r"], "alpha": saved.get("lora_alpha"),
                      "targetModules": sorted(tm) if isinstance(tm, (list, set)) else [tm] if tm else lo.target_modules}
    except (OSError, KeyError, ValueError):
        pass
    files = {}
    for f in sorted(staging.iterdir()):
        if f.is_file() and f.name != "progress.json" and not f.name.startswith("curves."):  # the plot is being drawn
            files[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    manifest = {
        "apiVersion": "perennial.ai/v1alpha1", "kind": "AdapterArtifact",
        "adapterFamily": spec.output.adapter_family, "lineage": lineage,
        "lora": lora_shape,
        "files": files,
    }
    atomic_write_json(staging / "metrics.json", metrics)
    atomic_write_json(staging / "manifest.json", manifest)
    plotter.wait()
    upload_dir(staging, cfg.output_uri)
    if os.path.isdir(ckpt_dir) and not cfg.checkpoint_dir and is_local(cfg.output_uri):
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the default checkpoints live inside the artifact dir
    if mirror:
        checkpoints.remove_mirror(mirror)
    message = f"{method} trained {int(metrics['train/steps'])} steps"
    if "eval/mean_reward" in metrics:
        message += f"; eval mean reward {metrics['eval/mean_reward']:.3f} vs baseline {metrics['eval/baseline_mean_reward']:.3f}"
    if data_note:
        message += f"; {data_note}"
    worse = next((w for w in warnings if w["reason"] in ("WorseThanParent", "WorseThanBase")), None)
    if worse and spec.evaluation.fail_if_worse_than_parent:
        raise TrainerError(f"{worse['message']}; `evaluation.failIfWorseThanParent` is set, so the run fails and no Adapter is "
                           f"made (the artifact stays at {cfg.output_uri} for inspection)", worse["reason"], metrics=metrics)
    if warnings:
        message += "; WARNING " + ", ".join(w["reason"] for w in warnings) + " (see `warnings`)"
    return {"status": "Succeeded", "reason": "Trained", "message": message, "artifactUri": cfg.output_uri,
            "warnings": warnings, "metrics": {k: round(v, 6) for k, v in metrics.items()}, "lineage": lineage,
            **({"generation": generation.record} if generation is not None else {}),
            **({"grpoDefaults": grpo_defaults.record} if grpo_defaults is not None else {})}
