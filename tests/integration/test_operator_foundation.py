"""The real kopf operator against the embedded control plane: BaseModel, RewardSpec, Adapter."""

from __future__ import annotations

import base64
import time

from harness import API, Cluster, wait_for



def operator_requests(cluster: Cluster) -> int:
    """Requests the operator (its own client and kopf's) made, watches aside."""
    return sum(cluster.server.count(client=c) - cluster.server.count(client=c, verb="watch") for c in ("perennial-operator", "kopf"))


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_basemodel_ready_without_cache_and_stable(cluster: Cluster):
    cluster.create("BaseModel", "m1", {"source": {"uri": "hf://org/model"}})
    c = cluster.wait_condition("BaseModel", "m1", "Ready", "True", "SourceAvailable")
    obj = cluster.get("BaseModel", "m1")
    assert obj["status"]["observedGeneration"] == 1
    assert obj["status"]["resolvedUri"] == "hf://org/model"
    # Nothing outside the cluster to clean up: no finalizer, and nothing of kopf's on the object.
    assert "finalizers" not in obj["metadata"] and "annotations" not in obj["metadata"]
    assert c["lastTransitionTime"]
    # Stable: several resync periods pass without a single request of the operator, counted at the server.
    wait_for(lambda: any(e["reason"] == "SourceAvailable" for e in cluster.events("m1")), message="Event")
    before = operator_requests(cluster)
    time.sleep(3.5)
    assert operator_requests(cluster) == before
    assert cluster.get("BaseModel", "m1")["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]


def test_basemodel_secret_problems_then_fixed(cluster: Cluster):
    spec = {"source": {"uri": "s3://bucket/llama", "credentialsSecretRef": {"name": "s3-creds"}}}
    cluster.create("BaseModel", "m2", spec)
    c = cluster.wait_condition("BaseModel", "m2", "Ready", "False", "SecretNotFound")
    assert "s3-creds" in c["message"]
    warnings = wait_for(lambda: [e for e in cluster.events("m2") if e["type"] == "Warning"])
    assert warnings[0]["reason"] == "SecretNotFound"
    cluster.kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": "default"}, "data": {"AWS_ACCESS_KEY_ID": b64("k")}})
    c = cluster.wait_condition("BaseModel", "m2", "Ready", "False", "SecretKeyMissing")
    assert "AWS_SECRET_ACCESS_KEY" in c["message"]
    cluster.kube.patch("v1", "Secret", "default", "s3-creds", {"data": {"AWS_SECRET_ACCESS_KEY": b64("s")}})
    cluster.wait_condition("BaseModel", "m2", "Ready", "True", "SourceAvailable")


def _job_status(cluster: Cluster, name: str, ctype: str) -> None:
    cluster.kube.patch(
        "batch/v1", "Job", "default", name,
        {"status": {"conditions": [{"type": ctype, "status": "True", "reason": "Done" if ctype == "Complete" else "BackoffLimitExceeded", "message": "m"}]}},
        subresource="status",
    )


def test_basemodel_cache_children_status_update_and_delete(cluster: Cluster):
    cluster.create("BaseModel", "m3", {"source": {"uri": "hf://org/model", "revision": "v1"}, "cache": {"enabled": True, "size": "10Gi"}})
    c = cluster.wait_condition("BaseModel", "m3", "Ready", "False", "Downloading")
    obj = cluster.get("BaseModel", "m3")
    job_name = obj["status"]["downloadJobName"]
    job = cluster.kube.get("batch/v1", "Job", "default", job_name)
    pvc = cluster.kube.get("v1", "PersistentVolumeClaim", "default", obj["status"]["cacheClaimName"])
    assert job and pvc
    assert job["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    assert job["metadata"]["labels"]["perennial.ai/basemodel"] == "m3"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "perennial-trainer:test"

    _job_status(cluster, job_name, "Complete")
    cluster.wait_condition("BaseModel", "m3", "Ready", "True", "Cached")
    assert cluster.get("BaseModel", "m3")["status"]["resolvedUri"] == f"pvc://{pvc['metadata']['name']}/model"

    # A new revision downloads again with a new Job; the generation is observed.
    cluster.kube.patch(API, "BaseModel", "default", "m3", {"spec": {"source": {"revision": "v2"}}})
    wait_for(lambda: cluster.get("BaseModel", "m3")["status"].get("observedGeneration") == 2)
    new_job = cluster.get("BaseModel", "m3")["status"]["downloadJobName"]
    assert new_job != job_name
    cluster.wait_condition("BaseModel", "m3", "Ready", "False", "Downloading")
    _job_status(cluster, new_job, "Failed")
    c = cluster.wait_condition("BaseModel", "m3", "Ready", "False", "DownloadFailed")
    assert "BackoffLimitExceeded" in c["message"]

    # Delete: the object goes at once (no finalizer), its children with it.
    cluster.kube.delete(API, "BaseModel", "default", "m3")
    wait_for(lambda: cluster.get("BaseModel", "m3") is None, message="BaseModel deleted")
    wait_for(lambda: not cluster.kube.list("batch/v1", "Job", "default", "perennial.ai/basemodel=m3"), message="Jobs collected")
    wait_for(lambda: not cluster.kube.list("v1", "PersistentVolumeClaim", "default", "perennial.ai/basemodel=m3"), message="PVC collected")


def test_operator_restart_mid_way_converges_without_duplicates(cluster: Cluster):
    for i in range(3):
        cluster.create("BaseModel", f"r{i}", {"source": {"uri": "hf://org/model"}, "cache": {"enabled": True}})
        if i == 1:
            cluster.restart_operator()
    cluster.stop_operator()
    cluster.create("BaseModel", "r3", {"source": {"uri": "hf://org/model"}, "cache": {"enabled": True}})
    cluster.start_operator()
    for i in range(4):
        cluster.wait_condition("BaseModel", f"r{i}", "Ready", "False", "Downloading")
    cluster.restart_operator()
    time.sleep(2.5)
    for i in range(4):
        assert len(cluster.kube.list("batch/v1", "Job", "default", f"perennial.ai/basemodel=r{i}")) == 1
        assert len(cluster.kube.list("v1", "PersistentVolumeClaim", "default", f"perennial.ai/basemodel=r{i}")) == 1


def test_rewardspec_invalid_then_fixed(cluster: Cluster):
    bad = {"graders": [{"name": "py", "type": "Python", "python": {"source": "def score(x):\n  return 1"}}, {"name": "re", "type": "Regex", "regex": {"pattern": "(unclosed"}}]}
    cluster.create("RewardSpec", "rs1", bad)
    c = cluster.wait_condition("RewardSpec", "rs1", "Ready", "False", "InvalidGrader")
    assert "must define `def grade(sample, item)`" in c["message"] and "does not compile" in c["message"]
    assert wait_for(lambda: [e for e in cluster.events("rs1") if e["type"] == "Warning" and e["reason"] == "InvalidGrader"])
    good = {"graders": [{"name": "py", "type": "Python", "python": {"source": "def grade(sample, item):\n  return 1.0"}}], "tests": []}
    cluster.kube.request("PATCH", f"/apis/{API}/namespaces/default/rewardspecs/rs1", body=[{"op": "replace", "path": "/spec", "value": good}], content_type="application/json-patch+json")
    c = cluster.wait_condition("RewardSpec", "rs1", "Ready", "True", "Valid")
    obj = cluster.get("RewardSpec", "rs1")
    assert obj["status"]["observedGeneration"] == 2 and c["observedGeneration"] == 2
    assert obj["status"]["graders"] == [{"name": "py", "value": "1"}]
    cluster.kube.delete(API, "RewardSpec", "default", "rs1")
    wait_for(lambda: cluster.get("RewardSpec", "rs1") is None)


def test_adapter_ready_reflects_artifact_and_lineage(cluster: Cluster, tmp_path):
    artifact = tmp_path / "artifacts" / "fam-v1"
    spec = {"baseModelRef": {"name": "base"}, "family": "fam", "version": 1, "artifactUri": f"file://{artifact}", "lora": {"rank": 8}}
    cluster.create("Adapter", "fam-v1", spec)
    c = cluster.wait_condition("Adapter", "fam-v1", "Ready", "False", "LineageBroken")
    assert "BaseModel 'base' does not exist" in c["message"]
    cluster.create("BaseModel", "base", {"source": {"uri": "hf://org/model"}})
    c = cluster.wait_condition("Adapter", "fam-v1", "Ready", "False", "ArtifactNotFound")
    artifact.mkdir(parents=True)
    (artifact / "adapter_config.json").write_text("{}")
    cluster.wait_condition("Adapter", "fam-v1", "Ready", "True", "Available")
    assert cluster.condition("Adapter", "fam-v1", "ArtifactAvailable")["status"] == "True"

    child = dict(spec, version=2, artifactUri=f"file://{artifact}", lineage={"parentAdapterRef": {"name": "fam-v1"}})
    cluster.create("Adapter", "fam-v2", child)
    cluster.wait_condition("Adapter", "fam-v2", "Ready", "True", "Available")
    other = dict(child, baseModelRef={"name": "base"}, lineage={"parentAdapterRef": {"name": "missing"}})
    cluster.create("Adapter", "fam-v3", dict(other, version=3))
    c = cluster.wait_condition("Adapter", "fam-v3", "Ready", "False", "LineageBroken")
    assert "parent Adapter 'missing' does not exist" in c["message"]

    # Records outlive: deleting the base model does not delete adapters; it breaks lineage instead.
    cluster.kube.delete(API, "BaseModel", "default", "base")
    cluster.wait_condition("Adapter", "fam-v1", "Ready", "False", "LineageBroken")
    assert cluster.get("Adapter", "fam-v1") is not None

    # Deleting an Adapter: its child adapters report the broken lineage.
    assert "finalizers" not in cluster.get("Adapter", "fam-v1")["metadata"]
    cluster.kube.delete(API, "Adapter", "default", "fam-v1")
    wait_for(lambda: cluster.get("Adapter", "fam-v1") is None, message="Adapter deleted")
    wait_for(lambda: "parent Adapter 'fam-v1' does not exist" in (cluster.condition("Adapter", "fam-v2") or {}).get("message", ""), message="fam-v2 lineage")


def test_adapter_spec_is_immutable(cluster: Cluster):
    from perennial.kube import ApiError

    cluster.create("Adapter", "imm", {"baseModelRef": {"name": "b"}, "family": "f", "version": 1, "artifactUri": "file:///x", "lora": {"rank": 4}})
    try:
        cluster.kube.patch(API, "Adapter", "default", "imm", {"spec": {"version": 2}})
    except ApiError as exc:
        assert exc.status == 422 and "`spec` is immutable" in exc.message
    else:
        raise AssertionError("patching an Adapter's spec must be rejected")
