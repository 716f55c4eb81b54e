"""The training memory estimate (`perennial.memory`) against the peak a real LoRA step allocates on a CUDA GPU.

    PYTHONPATH=operator python benchmarks/memory_estimate_gpu.py [--sizes 1b,3b] [--batch 4] [--seq 1024]

For each size a Llama-shaped model is built from its config with random weights (nothing is downloaded), in bf16
on the GPU; LoRA r=16 on every linear projection (PEFT), activation checkpointing, AdamW; three optimizer steps on
random tokens. Prints, per size, `torch.cuda.max_memory_allocated` and the estimate without its fixed 1 GiB
overhead and 10 % margin (what the allocator sees), and their ratio: the estimate is meant to err high (ratio > 1).
Needs only torch, transformers and peft (no TRL). On a machine without CUDA it runs the smallest size on CPU and
prints no peak (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import time

from perennial.memory import MARGIN, OVERHEAD_BYTES, GiB, estimate, shape_of

SIZES = {
    "tiny": {"hidden_size": 256, "num_hidden_layers": 2, "vocab_size": 1000, "intermediate_size": 512,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "vocab_size": 128256, "intermediate_size": 8192,
           "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True},
    "3b": {"hidden_size": 3072, "num_hidden_layers": 28, "vocab_size": 128256, "intermediate_size": 8192,
           "num_attention_heads": 24, "num_key_value_heads": 8, "tie_word_embeddings": True},
    "8b": {"hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 128256, "intermediate_size": 14336,
           "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False},
}


def measure(name: str, batch: int, seq: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = torch.cuda.is_available()
    cfg = dict(SIZES[name])
    config = LlamaConfig(**cfg)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA weights in fp32, as the trainer keeps them
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    n_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.monotonic()
    for _ in range(3):
        ids = torch.randint(0, config.vocab_size, (batch, seq), device=model.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.monotonic() - t) / 3
    est = estimate(shape_of(cfg, n_params), lora_rank=16, lora_targets=["all-linear"], batch=batch, seq=seq)
    core = est.per_gpu / MARGIN - OVERHEAD_BYTES
    line = (f"{name}: {n_params / 1e9:.2f}B params, batch {batch} x {seq}: estimate {est.per_gpu / GiB:.2f} GiB per GPU "
            f"({core / GiB:.2f} GiB without overhead and margin)")
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        line += f"; measured peak {peak / GiB:.2f} GiB; estimate/peak {core / peak:.2f} (with overhead and margin {est.per_gpu / peak:.2f})"
    print(line + f"; {dt:.2f} s/step", flush=True)
    del model, opt
    if cuda:
        torch.cuda.empty_cache()


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1b,3b,8b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    a = ap.parse_args()
    sizes = a.sizes.split(",") if torch.cuda.is_available() else ["tiny"]
    for name in sizes:
        measure(name, a.batch, a.seq)


if __name__ == "__main__":
    main()
