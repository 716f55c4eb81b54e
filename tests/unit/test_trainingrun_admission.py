"""TrainingRun admission through the embedded API server: the CRD's CEL rules reject, with a 422 naming the
field, what could never train (and `kubectl get tr -o wide` shows the GRPO learning-signal columns)."""

from __future__ import annotations

import copy

import pytest
import requests

from perennial import crdgen
from perennial.local.apiserver import start_in_thread

RUNS = "/apis/perennial.ai/v1alpha1/namespaces/adm/trainingruns"
RUN = {
    "apiVersion": "perennial.ai/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "r"},
    "spec": {
        "method": "GRPO",
        "baseModelRef": {"name": "m"},
        "rewardSpecRef": {"name": "rubric"},
        "datasets": [{"name": "d", "uri": "file:///data/train.jsonl"}],
        "output": {"adapterFamily": "fam"},
    },
}


@pytest.fixture(scope="module")
def url():
    server = start_in_thread()
    for crd in crdgen.all_crds():
        server.apply_crd(crd)
    requests.post(server.url + "/api/v1/namespaces", json={"metadata": {"name": "adm"}}).raise_for_status()
    yield server.url
    server.stop()


def run(name: str, **spec) -> dict:
    out = copy.deepcopy(RUN)
    out["metadata"]["name"] = name
    out["spec"].update(spec)
    return out


def rejected(r: requests.Response) -> tuple[str, list[dict]]:
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["reason"] == "Invalid"
    return body["message"], body["details"]["causes"]


def test_grpo_batch_not_divisible_by_num_generations_is_rejected_naming_the_field(url):
    r = requests.post(url + RUNS, json=run("uneven", hyperparameters={"batchSize": 12, "numGenerations": 8}))
    message, causes = rejected(r)
    assert "`hyperparameters.batchSize` must be a multiple of `hyperparameters.numGenerations`" in message
    assert any(c.get("field") == "spec.hyperparameters.batchSize" for c in causes), causes
    assert requests.get(url + RUNS + "/uneven").status_code == 404
    ok = requests.post(url + RUNS, json=run("even", hyperparameters={"batchSize": 16, "numGenerations": 8}))
    assert ok.status_code == 201, ok.text


def test_grpo_without_reward_spec_is_rejected_naming_the_field(url):
    body = run("norubric")
    del body["spec"]["rewardSpecRef"]
    message, causes = rejected(requests.post(url + RUNS, json=body))
    assert "`rewardSpecRef` is required when `method` is 'GRPO'" in message
    assert any(c.get("field") == "spec.rewardSpecRef" and c.get("reason") == "FieldValueRequired" for c in causes), causes


def test_one_parent_at_most_and_it_cannot_change(url):
    message, _ = rejected(requests.post(url + RUNS, json=run("twoparents", parentAdapterRef={"name": "fam-v1"},
                                                               parentAdapterFamily="fam")))
    assert "at most one of `parentAdapterRef`, `parentTrainingRunRef`, `parentAdapterFamily` may be set" in message
    created = requests.post(url + RUNS, json=run("child", parentTrainingRunRef={"name": "sft"}))
    assert created.status_code == 201, created.text
    obj = created.json()
    assert obj["spec"]["parentTrainingRunRef"] == {"name": "sft"}
    obj["spec"]["parentTrainingRunRef"] = {"name": "other"}
    message, _ = rejected(requests.put(url + RUNS + "/child", json=obj))
    assert "`spec` is immutable" in message


def test_wide_table_shows_learning_signal_and_zero_std(url):
    created = requests.post(url + RUNS, json=run("signal"))
    assert created.status_code == 201, created.text
    status = {"status": {"progress": {"fracRewardZeroStd": "1"}, "conditions": [
        {"type": "Succeeded", "status": "True", "reason": "Trained", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"},
        {"type": "LearningSignal", "status": "False", "reason": "NoRewardVariance", "message": "",
         "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}
    r = requests.patch(url + RUNS + "/signal/status", json=status, headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200, r.text
    table = requests.get(url + RUNS + "/signal", headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}).json()
    names = [c["name"] for c in table["columnDefinitions"]]
    row = dict(zip(names, table["rows"][0]["cells"]))
    assert row["Signal"] == "NoRewardVariance" and row["ZeroStd"] == "1"
    assert {c["name"]: c["priority"] for c in table["columnDefinitions"]}["Signal"] == 1
