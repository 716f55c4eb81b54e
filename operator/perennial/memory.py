"""Will a LoRA training run fit its GPUs? A deliberately simple estimate, in bytes per GPU (pure functions).

How it is estimated (per GPU, every term rounded up rather than down):

- **Base weights**: parameters x bytes per parameter (2 for bf16/fp16, 4 for fp32; 4-bit QLoRA: 0.5 plus ~7 %
  for the quantisation constants and the layers left unquantised). DDP keeps a full copy on every GPU; FSDP2
  shards it over every GPU of every node.
- **LoRA**: rank x (in + out) parameters per adapted linear layer (`all-linear`: the 7 projections of every
  decoder layer), each with an fp32 weight, an fp32 gradient and Adam's two fp32 moments: 16 bytes.
- **Activations** (one micro-batch of `batch` sequences of `seq` tokens, bf16): with activation checkpointing
  (on GPUs) the input of every layer is kept (`batch*seq*hidden*layers*2`) plus one layer's working set
  recomputed at a time (~`batch*seq*(18*hidden + 2*intermediate)*2`); the logits in fp32 and their gradient
  (`batch*seq*vocab*8`) — often the largest term for big vocabularies.
- **Overhead**: 1 GiB per GPU (CUDA context, NCCL buffers, allocator fragmentation), then 10 % on the total.

The parameter count comes from the model's `config.json` (`count_parameters`, decoder-only Llama/Mistral/Qwen/
Gemma-style configs, mixture-of-experts included) or, in the trainer, from the model built on the meta device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GiB = 1024 ** 3
OVERHEAD_BYTES = 1 * GiB
MARGIN = 1.10
LORA_BYTES_PER_PARAM = 16  # fp32 weight + gradient + Adam's two moments
QLORA_BYTES_PER_PARAM = 0.5 * 1.07


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a decoder-only model's config."""

    params: int
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int


def shape_of(config: dict[str, Any], params: int | None = None) -> Shape:
    """The `Shape` of a Hugging Face `config.json` (`text_config` of multimodal configs)."""
    c = config.get("text_config") or config
    try:
        h = int(c["hidden_size"])
        layers = int(c["num_hidden_layers"])
        vocab = int(c["vocab_size"])
        heads = int(c["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"model config lacks {e} (hidden_size, num_hidden_layers, vocab_size, num_attention_heads)") from None
    inter = int(c.get("intermediate_size") or 4 * h)
    kv = int(c.get("num_key_value_heads") or heads)
    hd = int(c.get("head_dim") or h // heads)
    return Shape(params if params is not None else count_parameters(config), h, layers, vocab, inter, heads, kv, hd)


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of a decoder-only transformer from its config: embeddings, attention (grouped-query heads),
    gated MLP (or its experts), norms, and an untied output head."""
    c = config.get("text_config") or config
    h, layers, vocab = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["vocab_size"])
    heads = int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    hd = int(c.get("head_dim") or h // heads)
    inter = int(c.get("intermediate_size") or 4 * h)
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    experts = int(c.get("num_local_experts") or c.get("num_experts") or 0)
    if experts:
        per_expert = 3 * h * int(c.get("moe_intermediate_size") or inter)
        shared = 3 * h * int(c.get("shared_expert_intermediate_size") or 0)
        mlp = experts * per_expert + shared + h * experts  # + the router
    else:
        mlp = 3 * h * inter
    per_layer = attn + mlp + 2 * h
    tied = bool(config.get("tie_word_embeddings", c.get("tie_word_embeddings", False)))
    return vocab * h + layers * per_layer + h + (0 if tied else vocab * h)


def lora_parameters(shape: Shape, rank: int, targets: list[str]) -> int:
    """LoRA parameters: rank x (in + out) per adapted projection of every layer."""
    h, q, kv, i = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    names = list(dims) if targets == ["all-linear"] else [t for t in targets if t in dims]
    if not names:  # modules we cannot size (custom names): count them as all-linear, the upper bound
        names = list(dims)
    return shape.layers * sum(rank * (a + b) for a, b in (dims[n] for n in names))


@dataclass(frozen=True)
class Estimate:
    per_gpu: int
    weights: int
    lora: int
    activations: int
    overhead: int
    params: int
    gpus: int
    sharded: bool
    quantized: bool

    def describe(self) -> str:
        how = "4-bit" if self.quantized else "bf16"
        split = f", sharded (FSDP) over {self.gpus} GPUs" if self.sharded and self.gpus > 1 else ""
        return (f"estimated {self.per_gpu / GiB:.1f} GiB per GPU: base weights {self.weights / GiB:.1f} GiB "
                f"({self.params / 1e9:.2f}B parameters, {how}{split}), LoRA with gradients and Adam {self.lora / GiB:.2f} GiB, "
                f"activations {self.activations / GiB:.2f} GiB, overhead {self.overhead / GiB:.1f} GiB, +10 % margin")


def estimate(shape: Shape, *, lora_rank: int, lora_targets: list[str], batch: int, seq: int, gpus: int = 1,
             sharded: bool = False, quantized: bool = False, weight_bytes: int = 2, checkpointing: bool = True) -> Estimate:
    """Bytes one GPU needs to train a LoRA adapter on `shape` (see the module docstring)."""
    gpus = max(1, gpus)
    per_param = QLORA_BYTES_PER_PARAM if quantized else weight_bytes
    weights = int(shape.params * per_param)
    lora = lora_parameters(shape, lora_rank, lora_targets) * LORA_BYTES_PER_PARAM
    if sharded and gpus > 1:
        weights = math.ceil(weights / gpus)
        lora = math.ceil(lora / gpus)
    tokens = batch * seq
    layer_set = tokens * (18 * shape.hidden + 2 * shape.intermediate) * 2
    if checkpointing:
        acts = tokens * shape.hidden * shape.layers * 2 + layer_set
    else:
        acts = layer_set * shape.layers
    acts += tokens * shape.vocab * 8
    total = int((weights + lora + acts + OVERHEAD_BYTES) * MARGIN)
    return Estimate(total, weights, lora, acts, OVERHEAD_BYTES, shape.params, gpus, sharded, quantized)


def check_fits(shape: Shape, gpu_bytes: int, *, lora_rank: int, lora_targets: list[str], batch: int, seq: int,
               gpus: int = 1, sharded: bool = False, quantized: bool = False, weight_bytes: int = 2,
               checkpointing: bool = True) -> str | None:
    """None when the run fits; otherwise why not, with the estimate and what would fit (more GPUs sharded,
    4-bit weights, a smaller micro-batch)."""
    kw = dict(lora_rank=lora_rank, lora_targets=lora_targets, seq=seq, weight_bytes=weight_bytes, checkpointing=checkpointing)
    est = estimate(shape, batch=batch, gpus=gpus, sharded=sharded, quantized=quantized, **kw)
    if est.per_gpu <= gpu_bytes:
        return None
    hints = []
    for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        if n > gpus and estimate(shape, batch=batch, gpus=n, sharded=True, quantized=quantized, **kw).per_gpu <= gpu_bytes:
            hints.append(f"{n} GPUs of this size sharded with FSDP (resources.gpus x resources.nodes)")
            break
    if not quantized:
        q = estimate(shape, batch=batch, gpus=gpus, sharded=sharded, quantized=True, **kw)
        if q.per_gpu <= gpu_bytes:
            hints.append(f"4-bit QLoRA base weights ({q.per_gpu / GiB:.1f} GiB per GPU)")
    if batch > 1 and estimate(shape, batch=1, gpus=gpus, sharded=sharded, quantized=quantized, **kw).per_gpu <= gpu_bytes:
        hints.append("hyperparameters.batchSize 1 with gradientAccumulationSteps")
    return (f"the run does not fit its GPUs: {est.describe()}; each GPU has {gpu_bytes / GiB:.1f} GiB"
            + (f". It would fit with {' or '.join(hints)}" if hints else ". Nothing simple would fit: pick a smaller base model"))
