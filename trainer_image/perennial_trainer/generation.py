"""How GRPO samples its completions: vLLM (TRL's `use_vllm`) when the trainer image can, else Transformers' `generate`.

`decide(facts, request)` is a pure function from what this process can see (`Facts`: CUDA, GPUs, the installed vLLM
and TRL, the model's shape and the training memory estimate) and what was asked (`Request`, from the environment
today) to the GRPOConfig keyword arguments and the choice with its reason (`Choice`), recorded in the run's metrics
(`train/generation_vllm`, ...) and its result. `choose(...)` gathers the facts and decides (what the trainer calls).

Engines (TRL 1.16's GRPO; `trl/generation/vllm_generation.py`):

- **Transformers** (`use_vllm=False`): the training model's own `generate`. Always available; the only engine on CPU
  and in tests. Slow: GRPO spends most of its time here.
- **vLLM colocate** (`use_vllm=True, vllm_mode="colocate"`): every trainer process starts its own vLLM engine on its
  own GPU (`distributed_executor_backend="external_launcher"`: vLLM joins the torchrun/Accelerate world, so it works
  with `--nproc-per-node N` and across nodes unchanged). The LoRA adapter is merged into the weights and pushed into
  vLLM after each optimizer step. `vllm_tensor_parallel_size` k splits each engine over k consecutive ranks (it must
  divide the number of processes; we keep it within one pod: a divisor of the processes per pod).
  `vllm_gpu_memory_utilization` is the share of each GPU vLLM takes for itself (weights + KV cache), at start-up,
  next to the training model: vLLM refuses to start when less is free, and training runs out of memory when vLLM
  took too much, so it is sized here from the estimate (below) instead of TRL's fixed 0.3.
- **vLLM server** (`vllm_mode="server"`): generation on a separate vLLM server the run names
  (`$PERENNIAL_VLLM_SERVER_URL`); rank 0 sends prompts over HTTP and pushes weights over NCCL (the server must be
  started with `VLLM_SERVER_DEV_MODE=1 vllm serve <base> --weight-transfer-config '{"backend": "nccl"}'
  --logprobs-mode processed_logprobs --max-logprobs -1`, serve the run's base model, and reach the trainer's pod on
  `vllm_group_port` 51216). The trainer still needs vllm installed (TRL's client uses its NCCL weight transfer) and
  a CUDA GPU.

Requirements for vLLM (else Transformers, with the reason): a CUDA GPU; `vllm` installed and importable (vLLM pins
its own torch: an image whose torch does not match fails to import it); a version inside the range TRL declares for
its `vllm` extra (TRL 1.16: 0.22.0 to 0.31.0; read from TRL's metadata, not hard-coded); a TRL whose GRPOConfig has
the `use_vllm`/`vllm_*` fields; for colocate, room on every GPU.

Memory for colocate, per GPU (every term rounded up; the training side is `perennial.memory.estimate`):
  vLLM weights = parameters x 2 bytes (bf16; 4-bit QLoRA base: x 0.535, vLLM loads it with bitsandbytes) / k
  KV cache per token = 2 (K, V) x layers x ceil(kv_heads / k) x head_dim x 2 bytes
  at least  = weights + KV of one sequence of `max_model_len` tokens + 1 GiB (vLLM will not start with less)
  wanted    = weights + KV of every sequence of a generation batch (`per_device_batch x k x steps_per_generation`,
              TRL's `max_num_seqs`) + 1 GiB
  free      = GPU memory - the training estimate (which already has its overhead and 10 % margin)
The smallest k whose `wanted` x 1.1 fits the free memory wins, else the smallest whose `at least` x 1.1 fits (fewer
sequences at once); utilization = min(wanted x 1.1, free) / GPU memory. None fits: Transformers ("GPU memory").
`max_model_len` is the longest training prompt plus `maxCompletionLength` when the caller measured the prompts
(`vllm_max_model_length`), else the model's `max_position_embeddings`.

Settings (environment of the trainer; an explicit setting that cannot be honoured fails the run with
`InvalidConfig` instead of falling back silently):
  PERENNIAL_GRPO_GENERATION=auto|transformers|vllm   (default auto: vLLM when the requirements hold)
  PERENNIAL_VLLM_SERVER_URL=http://host:port          (server mode; unset: colocate)
  PERENNIAL_VLLM_GPU_MEMORY_UTILIZATION=0.35          (colocate: overrides the sizing above)
  PERENNIAL_VLLM_TENSOR_PARALLEL_SIZE=2               (colocate: overrides the choice of k)
Every process of a run must decide the same (one on vLLM, one on Transformers would hang the collectives): the
facts are the pod's (same image, same GPU model, same settings), never a rank's own state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import TrainerError

ENGINE_ENV = "PERENNIAL_GRPO_GENERATION"
SERVER_ENV = "PERENNIAL_VLLM_SERVER_URL"
UTILIZATION_ENV = "PERENNIAL_VLLM_GPU_MEMORY_UTILIZATION"
TP_ENV = "PERENNIAL_VLLM_TENSOR_PARALLEL_SIZE"
ENGINES = ("auto", "transformers", "vllm")

GiB = 1024 ** 3
VLLM_OVERHEAD_BYTES = 1 * GiB  # CUDA graphs, the sampler's logits, activations of one 4096-token prefill batch
VLLM_MARGIN = 1.10
QLORA_BYTES_PER_PARAM = 0.5 * 1.07  # as perennial.memory: NF4 plus quantisation constants and unquantised layers
#: GRPOConfig fields the vLLM choice sets; a TRL without them has no vLLM generation we know how to drive
TRL_FIELDS = frozenset({"use_vllm", "vllm_mode", "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size",
                        "vllm_server_base_url", "vllm_max_model_length"})


@dataclass(frozen=True)
class ModelShape:
    """What the vLLM memory sizing needs of the base model's config.json."""

    params: int
    layers: int
    kv_heads: int
    head_dim: int
    max_position_embeddings: int | None = None


@dataclass(frozen=True)
class Facts:
    """What this process sees (the same in every process of the pod)."""

    cuda: bool
    trl_version: str
    grpo_fields: frozenset[str]
    trl_vllm_specifier: str | None = None  # TRL's declared range for its `vllm` extra, e.g. ">=0.22.0,<=0.31.0"
    vllm_version: str | None = None  # None: not installed
    vllm_import_error: str | None = None  # installed but `import vllm` failed (None when it imported or was not tried)
    world_size: int = 1
    local_world_size: int = 1  # processes in this pod
    gpu_bytes: int | None = None  # one GPU's total memory
    train_bytes: int | None = None  # the training estimate per GPU (perennial.memory), margin included
    shape: ModelShape | None = None
    quantized: bool = False  # QLoRA: vLLM loads the base in 4-bit too
    per_device_batch: int = 8  # GRPO's per-device batch, in completions
    steps_per_generation: int = 1
    max_prompt_tokens: int | None = None  # the longest training prompt, when measured
    max_completion_tokens: int = 256


@dataclass(frozen=True)
class Request:
    engine: str = "auto"
    server_url: str | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int | None = None
    source: str = "default"  # where `engine` came from, for the reason text


@dataclass(frozen=True)
class Choice:
    engine: str  # "vllm" | "transformers"
    mode: str | None  # "colocate" | "server" | None
    reason: str
    kwargs: dict[str, Any] = field(default_factory=dict)  # for GRPOConfig(**kwargs)
    vllm_version: str | None = None

    @property
    def metrics(self) -> dict[str, float]:
        """Numbers for metrics.json and the run's status (`train/` keys)."""
        m = {"train/generation_vllm": 1.0 if self.engine == "vllm" else 0.0}
        if self.engine == "vllm":
            m["train/generation_vllm_server"] = 1.0 if self.mode == "server" else 0.0
        if self.mode == "colocate":
            m["train/vllm_gpu_memory_utilization"] = float(self.kwargs["vllm_gpu_memory_utilization"])
            m["train/vllm_tensor_parallel_size"] = float(self.kwargs["vllm_tensor_parallel_size"])
        return m

    @property
    def record(self) -> dict[str, Any]:
        """The choice and its reason, for the result (termination message) and progress.json: short."""
        rec: dict[str, Any] = {"engine": self.engine, "reason": self.reason[:300]}
        if self.mode:
            rec["mode"] = self.mode
        if self.vllm_version:
            rec["vllm"] = self.vllm_version
        return rec

    def describe(self) -> str:
        how = "vLLM " + str(self.mode) if self.engine == "vllm" else "Transformers generate"
        return f"GRPO generation: {how} ({self.reason})"


# ------------------------------------------------------------------------------------ settings


def request_from_env(env: Mapping[str, str] | None = None) -> Request:
    """The request the trainer's environment makes; a malformed setting is an `InvalidConfig` error."""
    env = os.environ if env is None else env
    raw = (env.get(ENGINE_ENV) or "").strip().lower()
    engine = raw or "auto"
    if engine not in ENGINES:
        raise TrainerError(f"${ENGINE_ENV}={raw!r}: expected one of {', '.join(ENGINES)}", "InvalidConfig")
    url = (env.get(SERVER_ENV) or "").strip() or None
    if url is not None:
        url = _check_url(url)
    util = None
    if (v := (env.get(UTILIZATION_ENV) or "").strip()):
        try:
            util = float(v)
        except ValueError:
            util = math.nan
        if not 0 < util <= 0.95:
            raise TrainerError(f"${UTILIZATION_ENV}={v!r}: expected a fraction of GPU memory in (0, 0.95]", "InvalidConfig")
    tp = None
    if (v := (env.get(TP_ENV) or "").strip()):
        try:
            tp = int(v)
        except ValueError:
            tp = 0
        if tp < 1:
            raise TrainerError(f"${TP_ENV}={v!r}: expected a whole number >= 1", "InvalidConfig")
    return Request(engine=engine, server_url=url, gpu_memory_utilization=util, tensor_parallel_size=tp,
                   source=f"${ENGINE_ENV}={engine}" if raw else "default")


def _check_url(url: str) -> str:
    """An http(s) base URL without credentials, query or fragment (it is logged and recorded)."""
    try:
        u = urlsplit(url)
        _ = u.port  # a malformed port raises here
    except ValueError as e:
        raise TrainerError(f"${SERVER_ENV}: not a URL ({e})", "InvalidConfig") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise TrainerError(f"${SERVER_ENV}: expected http(s)://host[:port], got a URL with scheme {u.scheme!r}", "InvalidConfig")
    if u.username is not None or u.password is not None or u.query or u.fragment:
        raise TrainerError(f"${SERVER_ENV}: the vLLM server URL may not carry credentials, a query or a fragment", "InvalidConfig")
    return url.rstrip("/")


# ------------------------------------------------------------------------------------ the decision


def decide(facts: Facts, request: Request) -> Choice:
    """The generation engine for a GRPO run and the GRPOConfig kwargs that select it (pure)."""
    forced = request.engine == "vllm"

    def fallback(reason: str) -> Choice:
        if forced:
            raise TrainerError(f"{request.source} asks for vLLM generation, but {reason}", "InvalidConfig")
        return Choice("transformers", None, reason, {"use_vllm": False} if "use_vllm" in facts.grpo_fields else {})

    if request.engine == "transformers":
        return fallback(f"forced off by {request.source}")
    if not facts.cuda:
        return fallback("no CUDA GPU (vLLM runs on GPUs only)")
    if facts.vllm_version is None:
        return fallback("vllm is not installed in the trainer image")
    if facts.vllm_import_error:
        return fallback(f"vllm {facts.vllm_version} is installed but does not import: {facts.vllm_import_error[:200]}")
    missing = sorted(TRL_FIELDS - facts.grpo_fields)
    if missing:
        return fallback(f"TRL {facts.trl_version}'s GRPOConfig lacks {', '.join(missing)}")
    note = ""
    if not _in_range(facts.vllm_version, facts.trl_vllm_specifier):
        rng = f"TRL {facts.trl_version} supports vllm{facts.trl_vllm_specifier}"
        if not forced:
            return fallback(f"vllm {facts.vllm_version} is outside the range {rng}")
        note = f"; vllm {facts.vllm_version} is outside the range {rng}, used because it was asked for"
    base = {"use_vllm": True}
    if request.server_url:
        reason = f"vllm {facts.vllm_version}, CUDA, the server named by ${SERVER_ENV}" + note
        return Choice("vllm", "server", reason, {**base, "vllm_mode": "server", "vllm_server_base_url": request.server_url},
                      facts.vllm_version)

    tp, util, why = _size_colocate(facts, request)
    if tp is None:
        return fallback(why)
    kwargs = {**base, "vllm_mode": "colocate", "vllm_tensor_parallel_size": tp, "vllm_gpu_memory_utilization": util}
    if (max_len := _max_model_len(facts)) is not None:
        kwargs["vllm_max_model_length"] = max_len
    return Choice("vllm", "colocate", f"vllm {facts.vllm_version}, CUDA; {why}" + note, kwargs, facts.vllm_version)


def _in_range(version: str, specifier: str | None) -> bool:
    if not specifier:
        return True
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:  # the local part ("+cu129") aside, as TRL compares
        return Version(Version(version).base_version) in SpecifierSet(specifier)
    except (InvalidVersion, InvalidSpecifier):
        return False


def _max_model_len(f: Facts) -> int | None:
    if f.max_prompt_tokens is None:
        return None
    n = f.max_prompt_tokens + f.max_completion_tokens
    return min(n, f.shape.max_position_embeddings) if f.shape and f.shape.max_position_embeddings else n


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, max(1, n) + 1) if n % d == 0]


def vllm_bytes(f: Facts, tp: int, sequences: int) -> int:
    """vLLM's memory on one GPU with tensor parallel `tp` and KV cache for `sequences` full-length sequences."""
    s = f.shape
    assert s is not None
    weights = s.params * (QLORA_BYTES_PER_PARAM if f.quantized else 2) / tp
    kv_per_token = 2 * s.layers * math.ceil(s.kv_heads / tp) * s.head_dim * 2
    seq_len = _max_model_len(f) or s.max_position_embeddings or (f.max_completion_tokens + 2048)
    return math.ceil(weights + kv_per_token * seq_len * max(1, sequences) + VLLM_OVERHEAD_BYTES)


def _size_colocate(f: Facts, r: Request) -> tuple[int | None, float, str]:
    """(tensor parallel size, GPU memory utilization, why) for colocated vLLM, or (None, 0, why not)."""
    local = max(1, f.local_world_size)
    if r.tensor_parallel_size is not None:
        tp = r.tensor_parallel_size
        if local % tp or f.world_size % tp:
            raise TrainerError(f"${TP_ENV}={tp} must divide the trainer processes per pod ({local}) and in all "
                               f"({f.world_size}): vLLM's tensor-parallel groups are consecutive ranks of one pod", "InvalidConfig")
        candidates = [tp]
    else:
        candidates = [d for d in _divisors(local) if f.world_size % d == 0]
    if r.gpu_memory_utilization is not None:
        return candidates[0], r.gpu_memory_utilization, (
            f"tensor parallel {candidates[0]}, {r.gpu_memory_utilization:.2f} of each GPU as ${UTILIZATION_ENV} says")
    if f.shape is None or not f.gpu_bytes or f.train_bytes is None:
        return candidates[0], 0.3, f"tensor parallel {candidates[0]}, TRL's default 0.3 of each GPU (no memory estimate: no model config)"
    gpu = f.gpu_bytes
    free = gpu - f.train_bytes
    seqs_per_engine = f.per_device_batch * f.steps_per_generation
    for tp in candidates:  # every sequence of a generation batch at once
        want = vllm_bytes(f, tp, seqs_per_engine * tp) * VLLM_MARGIN
        if want <= free:
            util = max(0.01, math.floor(want / gpu * 100 + 1) / 100)  # rounded up, within `free`
            util = min(util, math.floor(free / gpu * 100) / 100)
            return tp, util, (f"tensor parallel {tp}, {util:.2f} of each GPU: vLLM ~{want / GiB:.1f} GiB next to "
                              f"training's estimated {f.train_bytes / GiB:.1f} GiB of {gpu / GiB:.1f} GiB")
    for tp in candidates:  # one full-length sequence at a time: what vLLM needs to start
        least = vllm_bytes(f, tp, 1) * VLLM_MARGIN
        if least <= free:
            util = math.floor(free / gpu * 100) / 100
            return tp, util, (f"tensor parallel {tp}, {util:.2f} of each GPU (all that training leaves: fewer sequences "
                              f"at once than a generation batch)")
    least = vllm_bytes(f, candidates[-1], 1) * VLLM_MARGIN
    return None, 0.0, (f"GPU memory: training's estimated {f.train_bytes / GiB:.1f} GiB leaves {max(0, free) / GiB:.1f} GiB "
                       f"of {gpu / GiB:.1f} GiB, and vLLM needs at least {least / GiB:.1f} GiB per GPU "
                       f"(tensor parallel {candidates[-1]})")


# ------------------------------------------------------------------------------------ the facts (impure)


def trl_facts() -> tuple[str, frozenset[str], str | None]:
    """(TRL version, GRPOConfig's fields, TRL's declared vllm range)."""
    import dataclasses
    import importlib.metadata as md

    import trl
    from packaging.requirements import InvalidRequirement, Requirement
    from trl import GRPOConfig

    spec = None
    for line in md.requires("trl") or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.name == "vllm" and req.marker is not None and req.marker.evaluate({"extra": "vllm"}):
            spec = str(req.specifier) or None
            break
    return trl.__version__, frozenset(f.name for f in dataclasses.fields(GRPOConfig)), spec


def vllm_facts(try_import: bool) -> tuple[str | None, str | None]:
    """(installed vllm version or None, the import error or None). Imports vllm only when `try_import` (on GPUs:
    TRL's GRPO imports it anyway when it is installed)."""
    import importlib.metadata as md
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return None, None
    try:
        version = md.version("vllm")
    except md.PackageNotFoundError:
        version = "unknown"
    if not try_import:
        return version, None
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - an ABI mismatch is an ImportError, a CUDA one anything
        return version, f"{e.__class__.__name__}: {e}"
    return version, None


def model_shape(config: Mapping[str, Any]) -> ModelShape | None:
    from perennial.memory import shape_of

    try:
        s = shape_of(dict(config))
    except (ValueError, KeyError, TypeError):
        return None
    c = config.get("text_config") or config
    mpe = c.get("max_position_embeddings")
    return ModelShape(s.params, s.layers, s.kv_heads, s.head_dim, int(mpe) if isinstance(mpe, int) and mpe > 0 else None)


def choose(cfg, base_path: str, dev: Mapping[str, Any], w, *, max_prompt_tokens: int | Callable[[], int] | None = None,
           env: Mapping[str, str] | None = None) -> Choice:
    """Gather the facts of this GRPO run and decide (the trainer's call). `dev` is the trainer's device setup after
    the FSDP/QLoRA decisions; `w` its `World`; `max_prompt_tokens` the longest training prompt in tokens, or a
    function measuring it (called only when colocated vLLM is possible: it tokenizes every prompt)."""
    import json
    from pathlib import Path

    request = request_from_env(env)
    trl_version, fields, spec = trl_facts()
    cuda = bool(dev.get("cuda"))
    version, error = vllm_facts(try_import=cuda and request.engine != "transformers")
    env = os.environ if env is None else env
    try:
        local = int(env.get("LOCAL_WORLD_SIZE") or 1)
    except ValueError:
        local = 1
    from .train import gpu_memory_bytes, memory_workload

    hp = cfg.spec.hyperparameters
    batch, seq = memory_workload(cfg, dict(dev))
    shape = train_bytes = gpu_bytes = None
    try:
        config = json.loads((Path(base_path) / "config.json").read_text())
        shape = model_shape(config)
    except (OSError, ValueError):
        config = None
    if cuda:
        gpu_bytes = gpu_memory_bytes(dev, w)  # as the trainer's memory check ($PERENNIAL_GPU_MEMORY too)
        if config is not None and shape is not None:
            from perennial.memory import estimate, shape_of

            weight_bytes = 2 if dev.get("bf16") else 4
            train_bytes = estimate(shape_of(config), lora_rank=cfg.spec.lora.rank, lora_targets=list(cfg.spec.lora.target_modules),
                                   batch=batch, seq=seq, gpus=w.size, sharded=bool(dev.get("fsdp")),
                                   quantized=bool(dev.get("quantize")), weight_bytes=weight_bytes).per_gpu
    if callable(max_prompt_tokens):
        vllm_possible = cuda and version is not None and error is None and request.engine != "transformers"
        max_prompt_tokens = max_prompt_tokens() if vllm_possible and not request.server_url else None
    facts = Facts(cuda=cuda, trl_version=trl_version, grpo_fields=fields, trl_vllm_specifier=spec, vllm_version=version,
                  vllm_import_error=error, world_size=w.size, local_world_size=max(1, local), gpu_bytes=gpu_bytes,
                  train_bytes=train_bytes, shape=shape, quantized=bool(dev.get("quantize")), per_device_batch=batch,
                  steps_per_generation=hp.gradient_accumulation_steps or 1, max_prompt_tokens=max_prompt_tokens,
                  max_completion_tokens=hp.max_completion_length or 256)
    return decide(facts, request)
