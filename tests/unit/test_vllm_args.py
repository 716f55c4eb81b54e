"""The vLLM command line built from an EngineSpec."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from perennial.api.deployment import EngineSpec
from perennial_server.vllm import build_vllm_command, build_vllm_env, lora_rank


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_full_spec_maps_to_vllm_flags() -> None:
    spec = EngineSpec.model_validate({
        "type": "VLLM", "servedModelName": "support-bot", "tensorParallelSize": 2, "maxModelLen": 8192,
        "maxLoras": 8, "maxLoraRank": 16, "maxCpuLoras": 32, "gpuMemoryUtilization": "0.85",
        "extraArgs": ["--enable-prefix-caching", "--dtype=bfloat16"],
    })
    cmd = build_vllm_command(spec, "/models/base", [("tone", "/adapters/tone"), ("sql", "/adapters/sql")], port=8001)
    assert cmd[:3] == ["vllm", "serve", "/models/base"]
    assert _flag(cmd, "--served-model-name") == "support-bot"
    assert _flag(cmd, "--host") == "127.0.0.1" and _flag(cmd, "--port") == "8001"
    assert "--enable-lora" in cmd
    i = cmd.index("--lora-modules")
    assert cmd[i + 1:i + 3] == ["tone=/adapters/tone", "sql=/adapters/sql"]
    assert _flag(cmd, "--max-loras") == "8" and _flag(cmd, "--max-lora-rank") == "16" and _flag(cmd, "--max-cpu-loras") == "32"
    assert _flag(cmd, "--max-model-len") == "8192" and _flag(cmd, "--tensor-parallel-size") == "2"
    assert _flag(cmd, "--gpu-memory-utilization") == "0.85"
    assert cmd[-2:] == ["--enable-prefix-caching", "--dtype=bfloat16"]


def test_defaults_without_adapters_and_module_entrypoint() -> None:
    cmd = build_vllm_command(EngineSpec(), "/m", [], max_model_len=4096, entrypoint="module", python="/usr/bin/python3")
    assert cmd[:5] == ["/usr/bin/python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m"]
    for absent in ("--enable-lora", "--lora-modules", "--served-model-name", "--gpu-memory-utilization", "--max-cpu-loras"):
        assert absent not in cmd
    assert _flag(cmd, "--max-model-len") == "4096"  # the BaseModel's, as the spec has none
    assert _flag(cmd, "--tensor-parallel-size") == "1"


def test_runtime_lora_enables_lora_without_modules() -> None:
    cmd = build_vllm_command(EngineSpec(maxLoraRank=20), "/m", [], runtime_lora=True)
    assert "--enable-lora" in cmd and "--lora-modules" not in cmd
    assert _flag(cmd, "--max-lora-rank") == "32"  # rounded up to a rank vLLM supports
    assert build_vllm_env(True, {})["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in build_vllm_env(False, {})


@pytest.mark.parametrize("r,expect", [(1, 1), (2, 8), (8, 8), (9, 16), (64, 64), (300, 320), (512, 512)])
def test_lora_rank_rounding(r: int, expect: int) -> None:
    assert lora_rank(r) == expect


@pytest.mark.parametrize("kwargs,adapters,msg", [
    ({"spec": {"type": "Transformers"}}, [], "must be 'VLLM'"),
    ({"spec": {"extraArgs": ["--host=0.0.0.0"]}}, [], "must not set `--host`"),
    ({"spec": {"extraArgs": ["--port", "9"]}}, [], "must not set `--port`"),
    ({"spec": {}}, [("a", "/x"), ("a", "/y")], "unique"),
    ({"spec": {}}, [("a=b", "/x")], "without '='"),
    ({"spec": {"servedModelName": "a"}}, [("a", "/x")], "must differ"),
    ({"spec": {"gpuMemoryUtilization": "1.5"}}, [], "within (0, 1]"),
])
def test_rejects_bad_specs(kwargs: dict, adapters: list, msg: str) -> None:
    with pytest.raises(ValueError) as e:
        build_vllm_command(EngineSpec.model_validate(kwargs["spec"]), "/m", adapters)
    assert msg in str(e.value)


def test_cli_dry_run_prints_the_command() -> None:
    spec = json.dumps({"maxLoras": 2, "maxModelLen": 2048})
    out = subprocess.run(
        [sys.executable, "-m", "perennial_server.cli", "vllm", "--model", "/m", "--engine-spec", spec, "--served-model-name", "base",
         "--lora-modules", "a=/ad/a", "b=/ad/b", "--port", "8002", "--dry-run"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    cmd = json.loads(out)
    assert cmd[:3] == ["vllm", "serve", "/m"] and "a=/ad/a" in cmd and _flag(cmd, "--port") == "8002" and _flag(cmd, "--max-loras") == "2"
