"""The vLLM launcher when the sidecar's routes load adapters at runtime: what `perennial-server vllm`
execs (argv and environment), captured at `os.execvpe`. vLLM itself cannot run here (CUDA wheels)."""

from __future__ import annotations

import json
import os

import pytest
from perennial_server.cli import build_parser
from perennial_server.vllm import main


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch):
    """launch(argv) -> (argv exec'd, its environment)."""
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    got: dict = {}

    def fake_exec(file: str, args: list[str], env: dict[str, str]) -> None:
        got.update(file=file, args=list(args), env=dict(env))

    monkeypatch.setattr(os, "execvpe", fake_exec)

    def launch(argv: list[str]) -> tuple[list[str], dict[str, str]]:
        got.clear()
        main(build_parser().parse_args(["vllm", *argv]))
        assert got["file"] == got["args"][0]
        return got["args"], got["env"]

    return launch


def test_runtime_lora_enables_adapter_loading(launched) -> None:
    spec = json.dumps({"maxLoras": 3, "maxLoraRank": 16})
    cmd, env = launched(["--model", "/m", "--served-model-name", "base", "--engine-spec", spec, "--runtime-lora"])
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"  # /v1/load_lora_adapter answers only with it
    assert "--enable-lora" in cmd and "--lora-modules" not in cmd
    assert _flag(cmd, "--max-loras") == "3" and _flag(cmd, "--max-lora-rank") == "16"
    # the old and the new version of every adapter fit in the CPU cache during a switch
    assert _flag(cmd, "--max-cpu-loras") == "6"
    assert _flag(cmd, "--host") == "127.0.0.1" and _flag(cmd, "--served-model-name") == "base"


def test_runtime_lora_from_the_environment(launched, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERENNIAL_RUNTIME_LORA", "true")
    cmd, env = launched(["--model", "/m"])
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and "--enable-lora" in cmd and "--max-cpu-loras" in cmd


def test_spec_max_cpu_loras_wins_but_never_below_max_loras(launched) -> None:
    cmd, _ = launched(["--model", "/m", "--engine-spec", json.dumps({"maxLoras": 8, "maxCpuLoras": 32}), "--runtime-lora"])
    assert _flag(cmd, "--max-cpu-loras") == "32"
    cmd, _ = launched(["--model", "/m", "--engine-spec", json.dumps({"maxLoras": 8, "maxCpuLoras": 2}), "--runtime-lora"])
    assert _flag(cmd, "--max-cpu-loras") == "8"


def test_without_routes_nothing_is_loaded_at_runtime(launched, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PERENNIAL_RUNTIME_LORA", raising=False)
    cmd, env = launched(["--model", "/m"])
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env
    for absent in ("--enable-lora", "--max-loras", "--max-cpu-loras"):
        assert absent not in cmd
    # static adapters still enable LoRA, but not runtime updating
    cmd, env = launched(["--model", "/m", "--lora-modules", "a=/ad/a"])
    assert "--enable-lora" in cmd and "a=/ad/a" in cmd and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env
