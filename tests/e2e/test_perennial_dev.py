"""The README's first command: `perennial dev --demo --apply examples/local` trains for real on a laptop CPU."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from harness import wait_for
from devproc import stop_dev

from perennial.kube import connect

ROOT = Path(__file__).resolve().parents[2]
API = "perennial.ai/v1alpha1"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_perennial_dev_demo_trains_an_adapter(tmp_path: Path):
    port, metrics, health = free_port(), free_port(), free_port()
    log = open(tmp_path / "dev.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "perennial.cli", "dev", "--demo", "--apply", str(ROOT / "examples" / "local"),
         "--state-dir", str(tmp_path / "state"), "--port", str(port), "--metrics-port", str(metrics), "--health-port", str(health)],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        kubeconfig = tmp_path / "state" / "kubeconfig"
        wait_for(lambda: "Perennial dev is running" in (tmp_path / "dev.log").read_text() or proc.poll() is not None, timeout=120, interval=0.5)
        assert proc.poll() is None, (tmp_path / "dev.log").read_text()
        assert kubeconfig.exists()
        kube = connect(kubeconfig=str(kubeconfig))  # the control plane requires the kubeconfig's token

        def sft_done():
            run = kube.get(API, "TrainingRun", "default", "fruit-sft") or {}
            return (run.get("status") or {}).get("phase") in ("Succeeded", "Failed") and run

        run = wait_for(sft_done, timeout=400, interval=1, message="the demo's SFT run")
        assert run["status"]["phase"] == "Succeeded", (run["status"], (tmp_path / "dev.log").read_text()[-3000:])
        adapter = kube.get(API, "Adapter", "default", "fruit-v1")
        assert adapter and adapter["spec"]["lineage"]["trainingRunRef"]["name"] == "fruit-sft"
        # The GRPO run was waiting for fruit-v1 and now starts by itself.
        wait_for(lambda: kube.get("batch/v1", "Job", "default", "fruit-grpo-train"), timeout=60, message="the GRPO Job")
        if shutil.which("kubectl"):
            out = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", "get", "perennial"], capture_output=True, text=True, timeout=60).stdout
            assert "fruit-v1" in out and "fruit-grpo" in out
    finally:
        stop_dev(proc, log)
    assert proc.returncode == 0, (tmp_path / "dev.log").read_text()[-2000:]
