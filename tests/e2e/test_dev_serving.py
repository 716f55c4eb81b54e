"""End to end on one machine: `perennial dev` serves a Perennial Deployment of two tiny-model adapters.

`perennial dev` runs as a process (as a user starts it); the test applies, at its start, the tiny model, two
LoRA adapters made with PEFT (random, non-zero B: each answers differently) and a Deployment serving them by
served name on the CPU engine. Then, with the real `openai` client: chat completions by served name, streaming
and not; a rating through `POST /v1/feedback` (the bearer token from the generated Secret) that lands in the
pod's spool; and the served adapter switched (the Deployment's `adapterRef` edited) while a client loop runs:
no request fails and the answers change to the other adapter's. `perennial dev` printed the URL it serves at.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from devproc import free_port, stop_dev
from harness import wait_for
from perennial.kube import connect

API = "perennial.ai/v1alpha1"
NS = "default"
PROMPT = "What colour is a banana?"
pytestmark = pytest.mark.slow



def make_adapter(base: Path, out: Path, seed: int) -> None:
    """A LoRA adapter of the tiny model with random, non-zero A and B (so it changes the answers), saved by PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.5)
    model.save_pretrained(out)


def manifests(adapters: dict[str, Path]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "models"},
         "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}},
        {"apiVersion": API, "kind": "BaseModel", "metadata": {"name": "tiny"},
         "spec": {"source": {"uri": "pvc://models/tiny"}, "maxModelLen": 256, "resources": {"gpus": 0}}},
    ]
    for version, (name, path) in enumerate(sorted(adapters.items()), start=1):
        docs.append({"apiVersion": API, "kind": "Adapter", "metadata": {"name": name},
                     "spec": {"baseModelRef": {"name": "tiny"}, "family": "chat", "version": version,
                              "artifactUri": f"file://{path}", "lora": {"rank": 4, "alpha": 16}}})
    docs.append({"apiVersion": API, "kind": "Deployment", "metadata": {"name": "chat"}, "spec": {
        "baseModelRef": {"name": "tiny"},
        # `assistant` is switched from chat-a to chat-b; `other` serves chat-b throughout (its answer is what
        # `assistant` must answer after the switch)
        "adapters": [{"name": "assistant", "adapterRef": {"name": "chat-a"}}, {"name": "other", "adapterRef": {"name": "chat-b"}}],
        "engine": {"type": "Transformers", "maxLoraRank": 16, "resources": {"cpu": "1", "memory": "1Gi"}},
        "replicas": 1,
        "strategy": {"blueGreen": {"scaleDownDelaySeconds": 5, "smokeTest": {"prompt": PROMPT, "maxTokens": 4, "timeoutSeconds": 120}},
                     "adapterRollout": {"unloadDelaySeconds": 3}},
        "feedback": {"enabled": True, "samplePercent": 100},
    }})
    return docs


def test_perennial_dev_serves_adapters_to_the_openai_client_rates_and_switches_with_no_failed_request(tmp_path: Path):
    from openai import OpenAI
    from tinymodel import build_tiny_model

    state = tmp_path / "state"
    base = Path(build_tiny_model(state / "pvc" / "models" / "tiny"))
    # on the PVC root, as `perennial dev` keeps its artifacts: a serving pod's sidecar loads local adapter paths
    # from its claims only
    adapters = {name: state / "pvc" / "adapters" / name for name in ("chat-a", "chat-b")}
    for seed, path in enumerate(adapters.values(), start=1):
        make_adapter(base, path, seed)
    (tmp_path / "apply").mkdir()
    (tmp_path / "apply" / "serving.yaml").write_text(yaml.safe_dump_all(manifests(adapters)))

    port, metrics, health = free_port(), free_port(), free_port()
    log_path = tmp_path / "dev.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed by stop_dev
    proc = subprocess.Popen(
        [sys.executable, "-m", "perennial.cli", "dev", "--apply", str(tmp_path / "apply"), "--state-dir", str(state),
         "--port", str(port), "--metrics-port", str(metrics), "--health-port", str(health)],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_for(lambda: "Perennial dev is running" in log_path.read_text() or proc.poll() is not None, timeout=120, interval=0.5)
        assert proc.poll() is None, log_path.read_text()
        kube = connect(kubeconfig=str(state / "kubeconfig"))

        def status() -> dict[str, Any]:
            return (kube.get(API, "Deployment", NS, "chat") or {}).get("status") or {}

        def serving(want: dict[str, str]) -> dict[str, Any] | None:
            st = status()
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions") or [])
            served = {r["name"]: r.get("adapter") for r in st.get("servedAdapters") or []}
            # the endpoint: the local relay's URL once it annotated the stable Service (the cluster DNS name before)
            return st if ready and served == want and str(st.get("endpoint")).startswith("http://127.0.0.1:") else None

        st = wait_for(lambda: serving({"assistant": "chat-a", "other": "chat-b"}), timeout=300, interval=1,
                      message=f"the Deployment serving both adapters; dev.log: {log_path.read_text()[-3000:]}")
        url = st["endpoint"]
        # perennial dev printed where it serves, and how to call it
        printed = wait_for(lambda: f"is serving (OpenAI API) at {url}" in (t := log_path.read_text()) and t, timeout=30, interval=0.5,
                           message="perennial dev's serving block")
        assert f'OpenAI(base_url="{url}/v1"' in printed and "get secret chat-feedback-token" in printed

        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)  # no retries: every failure counts
        assert {"tiny", "assistant", "other"} <= {m.id for m in client.models.list().data}

        def ask(model: str) -> tuple[str, str]:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0)
            return r.choices[0].message.content or "", r.id

        def ask_streaming(model: str) -> str:
            parts = []
            models = set()
            with client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0,
                                                stream=True) as stream:
                for chunk in stream:
                    models.add(chunk.model)
                    parts += [c.delta.content or "" for c in chunk.choices]
            assert models == {model}, models  # answers say the served name, never the adapter's
            return "".join(parts)

        first, response_id = ask("assistant")
        after = ask("other")[0]  # chat-b's answer: what `assistant` answers once switched
        assert first and after and first != after, (first, after)  # the two adapters answer differently (greedy)
        assert ask_streaming("assistant") == first and ask_streaming("other") == after

        # Rate the first answer through the sidecar, with the generated token; the record is fsync'd in the pod's spool.
        import urllib.error
        import urllib.request

        secret = kube.get("v1", "Secret", NS, "chat-feedback-token")
        assert secret is not None
        token = base64.b64decode(secret["data"]["token"]).decode()
        rating = json.dumps({"id": "fb-e2e-1", "response_id": response_id, "thumbs": "up"}).encode()

        def rate(headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
            req = urllib.request.Request(f"{url}/v1/feedback", data=rating, headers={"Content-Type": "application/json", **headers})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        assert rate({})[0] == 401
        code, answer = rate({"Authorization": f"Bearer {token}"})
        assert code == 200 and answer["status"] == "recorded" and answer["response_seen"] is True, answer
        pods = [p["metadata"]["name"] for p in kube.list("v1", "Pod", NS, "perennial.ai/deployment=chat")]
        spooled = "".join(f.read_text(errors="replace") for p in pods for f in (state / "pods" / NS / p / "volumes" / "spool").rglob("*")
                          if f.is_file())
        assert '"fb-e2e-1"' in spooled and response_id in spooled

        # Switch `assistant` to chat-b while a client loop runs (both kinds of requests): no request fails.
        answers: list[str] = []
        errors: list[str] = []
        stop = threading.Event()

        def loop() -> None:
            i = 0
            while not stop.is_set():
                try:
                    answers.append(ask_streaming("assistant") if i % 2 else ask("assistant")[0])
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    errors.append(repr(exc))
                i += 1
                time.sleep(0.05)

        client_thread = threading.Thread(target=loop, daemon=True)
        client_thread.start()
        try:
            wait_for(lambda: len(answers) >= 3, timeout=120, interval=0.2, message="the client loop running")
            kube.patch(API, "Deployment", NS, "chat", {"spec": {"adapters": [
                {"name": "assistant", "adapterRef": {"name": "chat-b"}}, {"name": "other", "adapterRef": {"name": "chat-b"}}]}})
            wait_for(lambda: serving({"assistant": "chat-b", "other": "chat-b"}), timeout=180, interval=1,
                     message=f"assistant moved to chat-b; status: {status()}")
            seen = len(answers)
            wait_for(lambda: len(answers) >= seen + 4, timeout=120, interval=0.2, message="answers after the switch")
        finally:
            stop.set()
            client_thread.join(120)
        assert not errors, errors[:5]
        assert answers[0] == first and answers[-4:] == [after] * 4, (answers[:3], answers[-6:])
        assert set(answers) <= {first, after}, set(answers)  # one adapter or the other, nothing in between
        # no new pods: the adapter moved inside the running engine
        assert [p["metadata"]["name"] for p in kube.list("v1", "Pod", NS, "perennial.ai/deployment=chat")] == pods
        wait_for(lambda: "now serves assistant -> chat-b" in log_path.read_text(), timeout=30, interval=0.5, message="perennial dev printed the move")
    finally:
        stop_dev(proc, log)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
