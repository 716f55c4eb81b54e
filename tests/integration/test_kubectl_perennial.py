"""A newcomer's kubectl session against `perennial dev`'s control plane and operator."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from harness import API, Cluster, wait_for

from perennial.local.apiserver import write_kubeconfig

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.kubectl,
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="the kubectl binary is not on PATH"),
]


@pytest.fixture
def kubectl(cluster: Cluster, tmp_path: Path):
    config = write_kubeconfig(tmp_path / "kubeconfig", cluster.server.url)

    def run(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(["kubectl", f"--kubeconfig={config}", *args], capture_output=True, text=True, timeout=60, input=stdin)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc

    return run


def test_apply_examples_get_describe_explain(cluster: Cluster, kubectl):
    out = kubectl("apply", "-f", str(ROOT / "examples")).stdout
    assert "basemodel.perennial.ai/qwen-0-5b created" in out
    assert "trainingrun.perennial.ai/fruit-grpo-1 created" in out
    cluster.wait_condition("BaseModel", "qwen-0-5b", "Ready", "True", timeout=60)
    cluster.wait_condition("RewardSpec", "fruit-colours", "Ready", "True", timeout=60)

    listing = kubectl("get", "perennial").stdout
    for name in ("basemodel.perennial.ai/qwen-0-5b", "rewardspec.perennial.ai/python-functions", "trainingrun.perennial.ai/fruit-grpo-1", "deployment.perennial.ai/fruit-assistant"):
        assert name in listing, listing
    runs = kubectl("get", "trainingruns").stdout
    assert "METHOD" in runs and "PROGRESS" in runs and "GRPO" in runs
    assert "fruit-assistant" in kubectl("get", "pdeploy").stdout
    wait_for(lambda: "True" in kubectl("get", "bm", "qwen-0-5b").stdout, timeout=60)

    described = kubectl("describe", "rewardspec", "python-functions").stdout
    assert "Valid" in described and "Events:" in described

    explained = kubectl("explain", "trainingrun.spec").stdout
    assert "method" in explained and "rewardSpecRef" in explained and "SFT" in explained
    explained = kubectl("explain", "deployment.spec.continuousLearning", "--api-version=perennial.ai/v1alpha1").stdout
    assert "minNewRecords" in explained

    # Re-applying is a no-op.
    assert "unchanged" in kubectl("apply", "-f", str(ROOT / "examples" / "01-basemodel.yaml")).stdout
    kubectl("delete", "-f", str(ROOT / "examples"), "--wait=false")

    def leftovers():
        return [
            (kind, o["metadata"]["name"], o["metadata"].get("finalizers"), o["metadata"].get("annotations"))
            for kind in ("BaseModel", "RewardSpec", "TrainingRun", "Deployment")
            for o in cluster.kube.list(API, kind, "default")
        ]

    wait_for(lambda: not leftovers(), timeout=90, message="every example deleted")
    assert "No resources found" in kubectl("get", "perennial").stderr


BAD = {
    "wrong enum": (
        "method: PPO",
        'spec.method: Unsupported value: "PPO": supported values: "SFT", "DPO", "GRPO"',
    ),
    "missing required": (
        "method: SFT",
        "spec.output: Required value",
    ),
    "CEL rule": (
        "method: GRPO",
        "`rewardSpecRef` is required when `method` is 'GRPO'",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_invalid_manifest_is_rejected_naming_the_field(cluster: Cluster, kubectl, case):
    method, expected = BAD[case]
    output = "" if case == "missing required" else "  output: {adapterFamily: f}\n"
    manifest = f"""apiVersion: perennial.ai/v1alpha1
kind: TrainingRun
metadata: {{name: bad}}
spec:
  {method}
  baseModelRef: {{name: m}}
  datasets: [{{name: d, uri: "file:///data.jsonl"}}]
{output}"""
    proc = kubectl("apply", "-f", "-", stdin=manifest, check=False)
    assert proc.returncode != 0
    assert 'TrainingRun "bad" is invalid' in proc.stderr, proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert cluster.get("TrainingRun", "bad") is None
