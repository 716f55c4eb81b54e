"""A newcomer's kubectl session against `perennial dev`'s control plane and operator.

What kubectl prints comes from the API server: printer columns from its Table output, short
names and categories from discovery. Those are checked through the API on every machine; the
sessions with the real kubectl binary skip where it is not installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import requests
import yaml
from harness import API, Cluster, wait_for

from perennial.crdgen import all_crds

ROOT = Path(__file__).resolve().parents[2]
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="the kubectl binary is not on PATH")
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"


def apply_examples(cluster: Cluster) -> None:
    """`kubectl apply -f examples/`, through the API."""
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj:
                obj["metadata"].setdefault("namespace", "default")
                cluster.kube.apply(obj)


def table(cluster: Cluster, plural: str) -> dict:
    r = requests.get(f"{cluster.server.url}/apis/perennial.ai/v1alpha1/namespaces/default/{plural}", timeout=30,
                     headers={"Accept": TABLE, "Authorization": f"Bearer {cluster.server.token}"}, verify=cluster.server.ca_file)
    assert r.status_code == 200, r.text
    t = r.json()
    assert t["kind"] == "Table" and t["apiVersion"] == "meta.k8s.io/v1", t
    return t


def cells(t: dict, name: str) -> dict:
    """Column name -> cell of the row named `name`."""
    rows = [row for row in t["rows"] if row["cells"][0] == name]
    assert len(rows) == 1, (name, t["rows"])
    return dict(zip([c["name"] for c in t["columnDefinitions"]], rows[0]["cells"]))


def test_printer_columns_short_names_and_categories_without_kubectl(cluster: Cluster):
    """What `kubectl get` shows for every kind, read from the API server (the Table kubectl renders)."""
    apply_examples(cluster)
    cluster.wait_condition("BaseModel", "qwen-0-5b", "Ready", "True", timeout=60)
    crds = {c["spec"]["names"]["plural"]: c for c in all_crds()}
    # the columns a newcomer reads, by kind: (shown by `kubectl get`, shown only with `-o wide`)
    must = {
        "trainingruns": ({"Method", "Base", "Phase", "Progress", "Adapter", "Age"}, {"Loss", "ETA"}),
        "basemodels": ({"Source", "Ready", "Age"}, set()),
        "rewardspecs": ({"Ready", "Age"}, set()),
        "deployments": ({"Base", "Ready", "Age"}, set()),
        "adapters": ({"Base", "Family", "Version", "Ready", "Age"}, set()),
    }
    for plural, (default_cols, wide_cols) in must.items():
        t = table(cluster, plural)
        printer = crds[plural]["spec"]["versions"][0]["additionalPrinterColumns"]
        got = [(c["name"], c["type"], c["priority"]) for c in t["columnDefinitions"]]
        assert got == [("Name", "string", 0)] + [(c["name"], c["type"], c.get("priority", 0)) for c in printer], plural
        assert default_cols <= {n for n, _, p in got if p == 0}, (plural, got)
        assert wide_cols <= {n for n, _, p in got if p > 0}, (plural, got)
        assert all(len(row["cells"]) == len(got) for row in t["rows"]), plural

    run = cells(table(cluster, "trainingruns"), "fruit-grpo-1")
    assert run["Method"] == "GRPO" and run["Base"] == "qwen-0-5b", run
    # `kubectl get bm` shows Ready as soon as the condition is True (the cell is read through a jsonPath filter)
    wait_for(lambda: cells(table(cluster, "basemodels"), "qwen-0-5b")["Ready"] == "True", timeout=60, message="Ready column True")
    assert cells(table(cluster, "basemodels"), "qwen-0-5b")["Source"] == "hf://Qwen/Qwen2.5-0.5B-Instruct"
    assert {"python-functions", "fruit-colours"} <= {row["cells"][0] for row in table(cluster, "rewardspecs")["rows"]}
    assert cells(table(cluster, "deployments"), "fruit-assistant")["Base"] == "qwen-0-5b"

    # discovery: what `kubectl get perennial`, `kubectl get tr` and friends resolve
    resources = {r["name"]: r for r in requests.get(f"{cluster.server.url}/apis/perennial.ai/v1alpha1", timeout=30, verify=cluster.server.ca_file,
                                                          headers={"Authorization": f"Bearer {cluster.server.token}"}).json()["resources"]}
    for plural, crd in crds.items():
        names = crd["spec"]["names"]
        assert resources[plural]["kind"] == names["kind"]
        assert sorted(resources[plural].get("shortNames") or []) == sorted(names.get("shortNames") or []), plural
        assert "perennial" in (resources[plural].get("categories") or []), plural


@pytest.fixture
def kubectl(cluster: Cluster, tmp_path: Path):
    config = cluster.server.write_kubeconfig(tmp_path / "kubeconfig")

    def run(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(["kubectl", f"--kubeconfig={config}", *args], capture_output=True, text=True, timeout=60, input=stdin)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc

    return run


@pytest.mark.kubectl
@needs_kubectl
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


@pytest.mark.kubectl
@needs_kubectl
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


@pytest.mark.kubectl
@needs_kubectl
def test_kubectl_scale_pdeploy_writes_spec_replicas_through_the_scale_subresource(cluster: Cluster, kubectl):
    """The Perennial Deployment's `/scale` subresource: what `kubectl scale` and an autoscaler of the user's own use."""
    kubectl("apply", "-f", str(ROOT / "examples" / "05-deployment.yaml"))
    assert "scaled" in kubectl("scale", "pdeploy", "fruit-assistant", "--replicas=3").stdout
    obj = cluster.kube.get(API, "Deployment", "default", "fruit-assistant")
    assert obj["spec"]["replicas"] == 3
    r = requests.get(f"{cluster.server.url}/apis/perennial.ai/v1alpha1/namespaces/default/deployments/fruit-assistant/scale", timeout=30,
                     headers={"Authorization": f"Bearer {cluster.server.token}"}, verify=cluster.server.ca_file)
    assert r.status_code == 200, r.text
    scale = r.json()
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3
    kubectl("delete", "-f", str(ROOT / "examples" / "05-deployment.yaml"), "--wait=false")
