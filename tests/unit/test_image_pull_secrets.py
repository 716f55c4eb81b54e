"""Image pull secrets of the pods the operator creates (PERENNIAL_IMAGE_PULL_SECRETS; chart value `images.pullSecrets`).

Trainer and server images often live in a private registry: every pod the operator builds (training Job, its
multi-node groups as an indexed Job, a JobSet or a TrainJob; RewardSpec validation Job; BaseModel download Job;
serving Deployment and LeaderWorkerSet) names the same Secrets, by reference only (a pull secret lives in the pod's
namespace: the platform team puts it in each namespace that runs Perennial objects; the operator never reads it).
"""

from __future__ import annotations

import pytest
from test_deployment_resources import SPEC, serving
from test_pod_security import RUN, download_job, owner, training_job, validation_job

from perennial.api.trainingrun import TrainingRunSpec
from perennial.config import OperatorConfig
from perennial.resources import basemodel, distributed, lws, rewardspec, trainingrun
from perennial.resources import deployment as d
from perennial.resources.podsecurity import PodSettings

SECRETS = ("registry-a", "mirror.example.com")
WANT = [{"name": "registry-a"}, {"name": "mirror.example.com"}]


def config(monkeypatch: pytest.MonkeyPatch, value: str = " registry-a, mirror.example.com ,") -> OperatorConfig:
    monkeypatch.setenv("PERENNIAL_IMAGE_PULL_SECRETS", value)
    return OperatorConfig()


def test_the_setting_is_a_list_of_secret_names(monkeypatch: pytest.MonkeyPatch):
    cfg = config(monkeypatch)
    assert cfg.image_pull_secrets == SECRETS
    assert cfg.pod_settings().image_pull_secrets == SECRETS
    assert cfg.serving_settings().image_pull_secrets == SECRETS
    monkeypatch.delenv("PERENNIAL_IMAGE_PULL_SECRETS")
    assert OperatorConfig().image_pull_secrets == () and OperatorConfig().pod_settings().image_pull_secrets == ()
    for bad in ("Registry", "a b", "-x", "x" * 254, "a/b"):
        with pytest.raises(ValueError, match="PERENNIAL_IMAGE_PULL_SECRETS"):
            config(monkeypatch, bad)


def job_pods(pods: PodSettings) -> dict[str, dict]:
    """Every Job-like pod spec the operator builds, with these settings."""
    run = owner("TrainingRun", "run")
    out = {"training": training_job(pods=pods)[0]["spec"]["template"]["spec"]}
    spec = TrainingRunSpec.model_validate({**RUN, "resources": {"gpus": 2, "nodes": 2}})
    config = trainingrun.run_config(run, spec, base_model_uri="pvc://base/m", output="pvc://artifacts/a/run", parent_adapter_uri=None,
                                    reward_spec=None, eval_reward_spec=None, feedback_store_uri=None)
    group_job = trainingrun.job(run, spec, config, image="trainer:1", credential_secrets=[], judge_keys=[], pods=pods)
    for engine in (distributed.INDEXED_JOB, distributed.JOBSET, distributed.TRAINJOB):
        for obj in distributed.group(run, spec, group_job, engine, network_policies=False):
            # (a TrainJob's trainer env is listed as a pod of its own: not a pod spec)
            out.update({f"{engine}:{obj['kind']}:{i}": p for i, p in enumerate(distributed.pod_specs(obj)) if set(p) != {"containers"}})
    import test_pod_security as t

    rs = rewardspec.validation_job(owner("RewardSpec", "rs"), t.RewardSpecSpec.model_validate(t.REWARD), "trainer:1", pods)
    out["validation"] = rs["spec"]["template"]["spec"]
    bm_spec = t.BaseModelSpec.model_validate({"source": {"uri": "hf://org/tiny"}, "cache": {"enabled": True, "size": "10Gi"}})
    out["download"] = basemodel.download_job(owner("BaseModel", "base"), bm_spec, "trainer:1", pods)["spec"]["template"]["spec"]
    return out


def serving_pods(settings: d.ServingSettings) -> dict[str, dict]:
    s = serving(settings=settings)
    group = serving({**SPEC, "engine": {**SPEC["engine"], "pipelineParallelSize": 2}}, settings=settings)
    lws_obj = lws.leader_worker_set(group, "blue", d.revision(group), 1)
    tpl = lws_obj["spec"]["leaderWorkerTemplate"]
    return {"serving": d.deployment(s, "blue", d.revision(s), 1)["spec"]["template"]["spec"],
            "lws-leader": tpl["leaderTemplate"]["spec"], "lws-worker": tpl["workerTemplate"]["spec"]}


def test_every_pod_the_operator_builds_names_the_pull_secrets(monkeypatch: pytest.MonkeyPatch):
    cfg = config(monkeypatch)
    pods = {**job_pods(cfg.pod_settings()), **serving_pods(cfg.serving_settings())}
    assert {"training", "validation", "download", "serving", "lws-leader", "lws-worker"} <= set(pods)
    assert any(k.startswith("JobSet:") for k in pods) and any(k.startswith("TrainJob:") for k in pods) and any(k.startswith("IndexedJob:") for k in pods)
    import kubernetes_validate

    for name, pod in pods.items():
        assert pod.get("imagePullSecrets") == WANT, name
        if not name.startswith("TrainJob:"):  # a TrainJob carries a patch of its runtime's pod, not a whole pod
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod}, "1.30.0", strict=True)


def test_without_the_setting_no_pod_names_any(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PERENNIAL_IMAGE_PULL_SECRETS", raising=False)
    cfg = OperatorConfig()
    for name, pod in {**job_pods(cfg.pod_settings()), **serving_pods(cfg.serving_settings())}.items():
        assert "imagePullSecrets" not in pod, name
    assert "imagePullSecrets" not in download_job()["spec"]["template"]["spec"]
    assert "imagePullSecrets" not in validation_job()["spec"]["template"]["spec"]
