"""The training Job builder: permanent trainer failures end the Job at once, disruptions are not counted,
retries are new pods that find their checkpoints; the Adapter's lineage names the resolved parent."""

from __future__ import annotations


import pytest

from perennial.api import TrainingRunSpec
from perennial.api.exitcodes import PERMANENT_EXIT_CODES, TrainerExit, exit_code_for
from perennial.resources import trainingrun as tr

BODY = {"apiVersion": "perennial.ai/v1alpha1", "kind": "TrainingRun",
        "metadata": {"name": "run1", "namespace": "team", "uid": "u-1"}}
SPEC = TrainingRunSpec.model_validate({
    "method": "SFT", "baseModelRef": {"name": "m"}, "datasets": [{"name": "d", "uri": "pvc://data/train.jsonl"}],
    "output": {"adapterFamily": "fam"},
})


def build(output: str) -> dict:
    config = tr.run_config(BODY, SPEC, base_model_uri="/models/m", output=output, parent_adapter_uri=None,
                           reward_spec=None, eval_reward_spec=None, feedback_store_uri=None)
    return tr.job(BODY, SPEC, config, image="trainer:1", credential_secrets=[], judge_keys=[])


def test_permanent_exit_codes_fail_the_job_and_disruptions_are_ignored():
    job = build("pvc://artifacts/out")
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # Kubernetes rejects podFailurePolicy otherwise
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                              "values": list(PERMANENT_EXIT_CODES)}}
    assert spec["template"]["spec"]["containers"][0]["name"] == "trainer"
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert TrainerExit.FAILED not in PERMANENT_EXIT_CODES and 137 not in PERMANENT_EXIT_CODES
    assert spec["backoffLimit"] == SPEC.run_policy.backoff_limit


@pytest.mark.parametrize("reason,code", [
    ("InvalidConfig", 10), ("ConfigNotFound", 10), ("DatasetNotFound", 11), ("MissingColumn", 11), ("EmptyDataset", 11),
    ("DatasetHashMismatch", 11), ("InvalidRewardSpec", 12), ("BaseModelUnavailable", 13), ("ParentAdapterInvalid", 13),
    ("TrainerCrashed", 1), ("SomethingNew", 1),
])
def test_exit_code_of_each_reason(reason, code):
    assert exit_code_for(reason) == code


def test_object_store_outputs_mirror_checkpoints_local_ones_keep_them_on_the_volume():
    # Object stores: the trainer checkpoints into the emptyDir and mirrors to the store (a retry is a new pod).
    remote = build("s3://bucket/out")
    config = tr.run_config(BODY, SPEC, base_model_uri="/m", output="s3://bucket/out", parent_adapter_uri=None,
                           reward_spec=None, eval_reward_spec=None, feedback_store_uri=None)
    assert config["checkpointDir"] == tr.CHECKPOINT_DIR
    assert {"name": "checkpoints", "mountPath": tr.CHECKPOINT_DIR} in remote["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    # Local outputs: no checkpointDir, so the trainer keeps them under the output, on the PVC a new pod mounts again.
    config = tr.run_config(BODY, SPEC, base_model_uri="/m", output="pvc://artifacts/out", parent_adapter_uri=None,
                           reward_spec=None, eval_reward_spec=None, feedback_store_uri=None)
    assert "checkpointDir" not in config


def test_job_is_a_valid_batch_v1_job():
    import kubernetes_validate  # a dev dependency: its Kubernetes schemas, strict (unknown fields are errors)

    kubernetes_validate.validate(build("pvc://artifacts/out"), "1.30.0", strict=True)


def test_adapter_lineage_names_the_resolved_parent():
    spec = TrainingRunSpec.model_validate({**SPEC.to_dict(), "parentTrainingRunRef": {"name": "sft"}})
    body = {**BODY, "status": {"parentAdapterRef": {"name": "fam-v3"}}}
    ad = tr.adapter(body, spec, version=4, artifact_uri="pvc://a/x", lineage=None)
    assert ad["spec"]["lineage"]["parentAdapterRef"] == {"name": "fam-v3"}
    spec = TrainingRunSpec.model_validate({**SPEC.to_dict(), "parentAdapterRef": {"name": "fam-v1"}})
    assert tr.adapter(BODY, spec, version=2, artifact_uri="pvc://a/x", lineage=None)["spec"]["lineage"]["parentAdapterRef"] == {"name": "fam-v1"}
    assert "parentAdapterRef" not in tr.adapter(BODY, SPEC, version=1, artifact_uri="pvc://a/x", lineage=None)["spec"]["lineage"]
