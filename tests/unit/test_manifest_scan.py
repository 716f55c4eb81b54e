"""checkov (Bridgecrew/Prisma's Kubernetes policy scanner, offline) over every manifest the operator builds.

Each builder's output for representative specs is rendered to YAML and scanned in ONE checkov run
(checkov starts in ~3 s; one process for all manifests keeps this test at a few seconds). No finding
may be left except the accepted ones below, each justified in a line; an accepted finding that no
longer occurs fails the test too, so the list never goes stale.

checkov is not installed in the project's venv: its own pins (networkx 2.x, packaging 23.x, ...)
would downgrade what torch and the trainer use. It lives in its own venv (see the `scan` extra in
pyproject.toml)::

    python -m venv .venv-checkov && .venv-checkov/bin/pip install 'checkov>=3.2,<4'

found as `$PERENNIAL_CHECKOV`, `checkov` on PATH, or `.venv-checkov/bin/checkov`. Without it the
test FAILS with that instruction (a security scan that silently does not run is no scan).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from perennial.api.basemodel import BaseModelSpec
from perennial.api.rewardspec import RewardSpecSpec
from perennial.api.trainingrun import TrainingRunSpec
from perennial.resources import basemodel, distributed, rewardspec, trainingrun
from perennial.resources.networkpolicy import EgressSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_deployment_resources as serving  # noqa: E402  (the serving builders' representative specs)
import test_pod_security as t  # noqa: E402  (the representative specs of the builders)

REPO = Path(__file__).resolve().parents[2]

#: (check id, manifest file stem) -> why the finding is accepted. One line each.
ACCEPTED: dict[tuple[str, str], str] = {
    # uid 1000 is the images' own `perennial` user (trainer_image/Dockerfile); runAsNonRoot, no capabilities,
    # no privilege escalation and a read-only root filesystem hold whatever the uid.
    ("CKV_K8S_40", "training-job"): "uid 1000 is the trainer image's user",
    ("CKV_K8S_40", "training-job-no-resources"): "uid 1000 is the trainer image's user",
    ("CKV_K8S_40", "training-group-job"): "uid 1000 is the trainer image's user",
    ("CKV_K8S_40", "validation-job"): "uid 1000 is the trainer image's user",
    ("CKV_K8S_40", "download-job"): "uid 1000 is the trainer image's user",
    # Object-store / Hub credentials reach the trainer as env (envFrom) on purpose: the trainer is non-dumpable
    # and every child (sandbox, curve helper) gets an empty/minimal environment, while a file would be readable
    # by every uid-1000 process of the pod. Judge keys, which graders need, are files (0440).
    ("CKV_K8S_35", "training-job"): "credentials as env of the non-dumpable trainer only; children get none",
    ("CKV_K8S_35", "training-job-no-resources"): "credentials as env of the non-dumpable trainer only; children get none",
    ("CKV_K8S_35", "training-group-job"): "credentials as env of the non-dumpable trainer only; children get none",
    ("CKV_K8S_35", "download-job"): "Hub/object-store token as env of the download process, which starts no child",
    # CPU limits throttle training (CFS quota) for no isolation gain: CPU is requested, not limited.
    ("CKV_K8S_11", "training-job"): "CPU is requested; a CPU limit would only throttle training",
    ("CKV_K8S_11", "training-job-no-resources"): "CPU is requested; a CPU limit would only throttle training",
    ("CKV_K8S_11", "training-group-job"): "CPU is requested; a CPU limit would only throttle training",
    # A run that names no `resources.memory` has no memory limit (a default would OOM-kill real models); the
    # namespace's LimitRange is the platform's tool for that; with `resources.memory` the limit is set.
    ("CKV_K8S_13", "training-job-no-resources"): "no `resources.memory` in the run: the namespace's LimitRange decides",
    # Serving pods (perennial.resources.deployment). The engine listens on 127.0.0.1 only and has no readiness probe of
    # its own: the pod's readiness is the sidecar's /readyz, which asks the engine's /health (and the routes applied).
    ("CKV_K8S_9", "serving-deployment"): "readiness is the sidecar's /readyz, which checks the localhost-only engine",
    ("CKV_K8S_9", "serving-deployment-autoscaled"): "readiness is the sidecar's /readyz, which checks the localhost-only engine",
    ("CKV_K8S_9", "serving-deployment-cpu"): "readiness is the sidecar's /readyz, which checks the localhost-only engine",
    ("CKV_K8S_9", "serving-deployment-hub"): "readiness is the sidecar's /readyz, which checks the localhost-only engine",
    ("CKV_K8S_9", "serving-deployment-remote"): "readiness is the sidecar's /readyz, which checks the localhost-only engine",
    # CPU is requested (the engine's resources, the sidecar's one CPU per worker); a CFS quota would only stall
    # token generation and the proxy's hot path under load.
    ("CKV_K8S_11", "serving-deployment"): "CPU is requested; a CPU limit would throttle generation and proxying",
    ("CKV_K8S_11", "serving-deployment-autoscaled"): "CPU is requested; a CPU limit would throttle generation and proxying",
    ("CKV_K8S_11", "serving-deployment-cpu"): "CPU is requested; a CPU limit would throttle generation and proxying",
    ("CKV_K8S_11", "serving-deployment-hub"): "CPU is requested; a CPU limit would throttle generation and proxying",
    ("CKV_K8S_11", "serving-deployment-remote"): "CPU is requested; a CPU limit would throttle generation and proxying",
    # An uncached hf:// model: the BaseModel's credentials Secret reaches the engine by reference (envFrom: HF_TOKEN is
    # what the Hub client reads), the object-store credentials the sidecar; the feedback token is a file.
    ("CKV_K8S_35", "serving-deployment-hub"): "Hub/store credentials by reference (envFrom) to the one process that uses each",
}


def checkov_binary() -> str:
    for candidate in (os.environ.get("PERENNIAL_CHECKOV"), shutil.which("checkov"), str(REPO / ".venv-checkov" / "bin" / "checkov")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("checkov is not installed: python -m venv .venv-checkov && .venv-checkov/bin/pip install 'checkov>=3.2,<4' "
                "(or set PERENNIAL_CHECKOV); see the docstring of tests/unit/test_manifest_scan.py")


def manifests() -> dict[str, dict]:
    """Every kind of manifest the operator's builders make, for representative specs (digest-pinned images)."""
    run = t.owner("TrainingRun", "run")
    job, config = t.training_job()
    bare_spec = TrainingRunSpec.model_validate({**t.RUN, "method": "SFT", "rewardSpecRef": None, "datasets": [{"name": "d", "uri": "pvc://data/x.jsonl"}]})
    bare_cfg = trainingrun.run_config(run, bare_spec, base_model_uri="hf://org/tiny", output="s3://bucket/a/team/run", parent_adapter_uri=None,
                                      reward_spec=None, eval_reward_spec=None, feedback_store_uri=None)
    bare = trainingrun.job(run, bare_spec, bare_cfg, image=t.DIGEST, credential_secrets=["store-creds"], judge_keys=[])
    sized_spec = TrainingRunSpec.model_validate({**t.RUN, "resources": {"cpu": "4", "memory": "32Gi", "gpus": 1}})
    sized = trainingrun.job(run, sized_spec, config, image=t.DIGEST, credential_secrets=["store-creds"],
                            judge_keys=trainingrun.judge_secrets(RewardSpecSpec.model_validate(t.REWARD)))
    rs_body = t.owner("RewardSpec", "rs")
    rs_spec = RewardSpecSpec.model_validate(t.REWARD)
    bm_body = t.owner("BaseModel", "base")
    bm_spec = BaseModelSpec.model_validate({"source": {"uri": "hf://org/tiny", "credentialsSecretRef": {"name": "hf"}}, "cache": {"enabled": True, "size": "10Gi"}})
    out = {
        "training-config": trainingrun.config_map(run, config),
        "training-job-no-resources": bare,
        "training-job": sized,
        "training-network-policy": trainingrun.network_policy(run, config, EgressSettings()),
        "training-network-policy-cidrs": trainingrun.network_policy(run, config, EgressSettings(egress_cidrs=("10.20.0.0/16",))),
        "validation-config": rewardspec.validation_config(rs_body, rs_spec),
        "validation-job": rewardspec.validation_job(rs_body, rs_spec, t.DIGEST),
        "validation-network-policy": rewardspec.validation_network_policy(rs_body, rs_spec, EgressSettings()),
        "download-job": basemodel.download_job(bm_body, bm_spec, t.DIGEST),
        "download-network-policy": basemodel.download_network_policy(bm_body, bm_spec, EgressSettings()),
        "weight-cache-claim": basemodel.cache_pvc(bm_body, bm_spec),
        **serving.every_manifest(),
    }
    # a multi-node group without JobSet or Kubeflow Trainer: the indexed Job, its headless Service, the peers' policy
    group_spec = TrainingRunSpec.model_validate({**t.RUN, "resources": {"cpu": "4", "memory": "32Gi", "gpus": 2, "nodes": 2}})
    group_job = trainingrun.job(run, group_spec, config, image=t.DIGEST, credential_secrets=["store-creds"], judge_keys=[])
    peers, service, indexed = distributed.group(run, group_spec, group_job, distributed.INDEXED_JOB, network_policies=True)
    out |= {"training-group-job": indexed, "training-group-service": service, "training-group-peers": peers}
    assert job["kind"] == "Job"
    return out


def test_checkov_finds_nothing_but_the_accepted(tmp_path: Path):
    binary = checkov_binary()
    docs = manifests()
    for stem, doc in docs.items():
        (tmp_path / f"{stem}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = subprocess.run([binary, "--directory", str(tmp_path), "--framework", "kubernetes", "--output", "json", "--compact",
                           "--skip-download"], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip(), f"checkov printed nothing (rc {proc.returncode}): {proc.stderr[-2000:]}"
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    failed: set[tuple[str, str]] = set()
    passed = 0
    for r in reports:
        results = r.get("results") or {}
        passed += len(results.get("passed_checks") or [])
        for check in results.get("failed_checks") or []:
            failed.add((check["check_id"], Path(check["file_path"]).stem))
    assert passed > 50, f"checkov ran too few checks ({passed}): {proc.stderr[-2000:]}"
    scanned = {Path(c["file_path"]).stem for r in reports for c in (r.get("results") or {}).get("passed_checks") or []}
    # checkov has checks for workloads and ConfigMaps; NetworkPolicies take part in its graph check CKV2_K8S_6
    # (every pod has a NetworkPolicy selecting it), PersistentVolumeClaims in none
    workloads = {stem for stem, doc in docs.items() if doc["kind"] in ("Job", "ConfigMap") or (doc["apiVersion"], doc["kind"]) == ("apps/v1", "Deployment")}
    assert workloads <= scanned, f"not every manifest was scanned: {workloads - scanned}"
    checks = {c["check_id"] for r in reports for c in (r.get("results") or {}).get("passed_checks") or []}
    assert "CKV2_K8S_6" in checks, "the NetworkPolicy graph check did not run"
    unexpected = sorted(failed - set(ACCEPTED))
    assert not unexpected, "checkov findings neither fixed nor accepted: " + ", ".join(f"{c} in {m}" for c, m in unexpected)
    stale = sorted(set(ACCEPTED) - failed)
    assert not stale, "accepted findings that no longer occur (remove them): " + ", ".join(f"{c} in {m}" for c, m in stale)
