"""The README's first command: `perennial dev --demo --apply examples/local` trains for real on a laptop CPU, then serves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from devproc import free_port, stop_dev
from harness import wait_for
from perennial.kube import connect

ROOT = Path(__file__).resolve().parents[2]
API = "perennial.ai/v1alpha1"
pytestmark = pytest.mark.slow



def test_perennial_dev_demo_trains_adapters_and_serves_them(tmp_path: Path):
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

        # The demo ends serving its adapters: the Deployment fruit-chat moves `fruit` to fruit-v2 once GRPO made it
        # (in the running pod), and perennial dev printed where it serves.
        def served() -> dict | None:
            st = (kube.get(API, "Deployment", "default", "fruit-chat") or {}).get("status") or {}
            names = {r["name"]: r.get("adapter") for r in st.get("servedAdapters") or []}
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions") or [])
            local = str(st.get("endpoint")).startswith("http://127.0.0.1:")  # the local relay's URL (the cluster DNS name before)
            return st if ready and local and names == {"fruit": "fruit-v2", "fruit-sft": "fruit-v1"} else None

        st = wait_for(served, timeout=600, interval=1, message="the demo's adapters served")
        url = st["endpoint"]
        log_text = wait_for(lambda: "now serves fruit -> fruit-v2" in (t := (tmp_path / "dev.log").read_text()) and t, timeout=30, interval=0.5,
                            message="perennial dev printing the move to fruit-v2")
        assert f"is serving (OpenAI API) at {url}" in log_text
        req = urllib.request.Request(f"{url}/v1/chat/completions", headers={"Content-Type": "application/json"}, data=json.dumps(
            {"model": "fruit", "messages": [{"role": "user", "content": "What colour is a banana?"}], "max_tokens": 8}).encode())
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        assert answer["model"] == "fruit" and answer["choices"][0]["message"]["content"]
    finally:
        stop_dev(proc, log)
    assert proc.returncode == 0, (tmp_path / "dev.log").read_text()[-2000:]
