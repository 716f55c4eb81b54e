"""vLLM launcher: an engine spec (perennial.api.deployment.EngineSpec) + a model
path + adapters -> the vLLM command line, then exec it.

vLLM binds 127.0.0.1 only: the sidecar is the pod's front door.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from perennial.api.deployment import EngineSpec

# vLLM's LoRAConfig accepts only these `max_lora_rank` values
SUPPORTED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
RESERVED_FLAGS = ("--host", "--port", "--model", "--served-model-name", "--lora-modules", "--pipeline-parallel-size", "--distributed-executor-backend")
#: The Ray head's port on a LeaderWorkerSet leader (its workers `ray start --address=$(LWS_LEADER_ADDRESS):<port>`).
RAY_PORT = 6379


def lora_rank(r: int) -> int:
    """The smallest rank vLLM supports that is at least `r`."""
    for s in SUPPORTED_LORA_RANKS:
        if s >= r:
            return s
    raise ValueError(f"`maxLoraRank` must not exceed {SUPPORTED_LORA_RANKS[-1]}")


def build_vllm_command(
    engine: EngineSpec,
    model_path: str,
    adapters: Sequence[tuple[str, str]] = (),
    *,
    served_model_name: str | None = None,
    max_model_len: int | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    entrypoint: str = "serve",
    runtime_lora: bool = False,
    python: str = "python3",
) -> list[str]:
    """The argv that starts vLLM's OpenAI-compatible server for this spec.

    `entrypoint`: "serve" (`vllm serve <model>`) or "module"
    (`python -m vllm.entrypoints.openai.api_server --model <model>`).
    """
    if engine.type != "VLLM":
        raise ValueError(f"engine `type` must be 'VLLM' for the vLLM launcher, got {engine.type!r}")
    if not model_path:
        raise ValueError("a model path is required")
    names = [n for n, _ in adapters]
    if len(set(names)) != len(names):
        raise ValueError("adapter names must be unique")
    served = served_model_name or engine.served_model_name
    if served and served in names:
        raise ValueError(f"adapter name {served!r} must differ from the served model name")
    for n, p in adapters:
        if not n or "=" in n or " " in n or not p:
            raise ValueError(f"adapter {n!r} must have a name without '=' or spaces and a path")
    for a in engine.extra_args:
        flag = a.split("=", 1)[0]
        if flag in RESERVED_FLAGS:
            raise ValueError(f"`extraArgs` must not set `{flag}`: the launcher owns it")

    if entrypoint == "serve":
        cmd = ["vllm", "serve", model_path]
    elif entrypoint == "module":
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path]
    else:
        raise ValueError("`entrypoint` must be 'serve' or 'module'")
    if served:
        cmd += ["--served-model-name", served]
    cmd += ["--host", host, "--port", str(port)]
    if adapters or runtime_lora:
        cmd += ["--enable-lora", "--max-loras", str(engine.max_loras), "--max-lora-rank", str(lora_rank(engine.max_lora_rank))]
        if engine.max_cpu_loras is not None:
            cmd += ["--max-cpu-loras", str(max(engine.max_cpu_loras, engine.max_loras))]
        elif runtime_lora:
            # adapters loaded at runtime (the sidecar's routes): during a switch the old and the new
            # version of each adapter are both loaded; keep room for both in the CPU cache
            cmd += ["--max-cpu-loras", str(2 * engine.max_loras)]
        if adapters:
            cmd += ["--lora-modules", *[f"{n}={p}" for n, p in adapters]]
    mml = engine.max_model_len or max_model_len
    if mml:
        cmd += ["--max-model-len", str(mml)]
    cmd += ["--tensor-parallel-size", str(engine.tensor_parallel_size)]
    if engine.pipeline_parallel_size > 1:
        # one pipeline stage per pod of the group, joined by the Ray cluster the leader heads
        cmd += ["--pipeline-parallel-size", str(engine.pipeline_parallel_size), "--distributed-executor-backend", "ray"]
    if engine.gpu_memory_utilization is not None:
        g = float(engine.gpu_memory_utilization)
        if not 0 < g <= 1:
            raise ValueError("`gpuMemoryUtilization` must be within (0, 1]")
        cmd += ["--gpu-memory-utilization", engine.gpu_memory_utilization]
    cmd += list(engine.extra_args)
    return cmd


def build_vllm_env(runtime_lora: bool, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if runtime_lora:  # /v1/load_lora_adapter and /v1/unload_lora_adapter
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return env


def start_ray_head(port: int, nodes: int, *, run: Any = subprocess.run, count: Any = None, timeout_s: float = 900.0,
                   sleep: Any = time.sleep, clock: Any = time.monotonic) -> None:
    """On a LeaderWorkerSet leader: start the Ray head, then wait until `nodes` nodes (the leader and its workers)
    joined, so vLLM's placement finds every GPU of the group. Raises RuntimeError when they do not come in time
    (the container exits; the LeaderWorkerSet recreates the group)."""
    run(["ray", "start", "--head", f"--port={port}", "--disable-usage-stats"], check=True)
    count = count or _ray_nodes
    deadline = clock() + timeout_s
    while True:
        alive = count()
        if alive >= nodes:
            return
        if clock() >= deadline:
            raise RuntimeError(f"only {alive} of {nodes} Ray nodes joined within {timeout_s:.0f}s")
        sleep(2.0)


def _ray_nodes() -> int:
    """Alive nodes of the local Ray cluster (0 when it cannot be asked yet)."""
    code = "import ray; ray.init(address='auto', logging_level='ERROR'); print(sum(1 for n in ray.nodes() if n.get('Alive')))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    try:
        return int(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def _spec(text: str | None) -> EngineSpec:
    if not text:
        return EngineSpec()
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    return EngineSpec.model_validate(json.loads(text))


def add_vllm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory or id")
    p.add_argument("--engine-spec", default=os.environ.get("PERENNIAL_ENGINE_SPEC"), help="EngineSpec as JSON, or @file (env PERENNIAL_ENGINE_SPEC)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--lora-modules", nargs="*", default=[], help="adapters as name=path")
    p.add_argument("--max-model-len", type=int, default=None, help="used when the spec has none (the BaseModel's)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--entrypoint", choices=["serve", "module"], default="serve")
    p.add_argument("--runtime-lora", action="store_true", default=os.environ.get("PERENNIAL_RUNTIME_LORA", "").strip().lower() in ("1", "true", "yes", "on"),
                   help="allow loading adapters at runtime: the sidecar's --routes-file loads them (env PERENNIAL_RUNTIME_LORA)")
    p.add_argument("--ray-head", action="store_true", help=(
        "LeaderWorkerSet leader of a pipelineParallelSize > 1 spec: start the Ray head and wait for the workers first"))
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")


def main(args: argparse.Namespace) -> int:
    from .engine import parse_lora_modules

    cmd = build_vllm_command(
        _spec(args.engine_spec), args.model, parse_lora_modules(args.lora_modules), served_model_name=args.served_model_name,
        max_model_len=args.max_model_len, port=args.port, entrypoint=args.entrypoint, runtime_lora=args.runtime_lora, python=sys.executable,
    )
    if args.dry_run:
        print(json.dumps(cmd))
        return 0
    if args.ray_head:
        start_ray_head(RAY_PORT, _spec(args.engine_spec).pipeline_parallel_size)
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, build_vllm_env(args.runtime_lora))
    return 127  # not reached
