"""The operator's image pull secrets (PERENNIAL_IMAGE_PULL_SECRETS) reach every pod its controllers create: the
BaseModel's download Job, the RewardSpec's validation Job, the TrainingRun's Job and the Deployment's serving pods
(the builders are tested one by one in tests/unit/test_image_pull_secrets.py; this is the controllers' wiring)."""

from __future__ import annotations

from pathlib import Path

from harness import running_cluster, wait_for

NS = "default"
WANT = [{"name": "regcred"}, {"name": "mirror"}]


def test_every_controller_gives_its_pods_the_pull_secrets(tmp_path: Path):
    with running_cluster(tmp_path, image_pull_secrets=("regcred", "mirror")) as c:
        artifact = tmp_path / "artifacts" / "support-v1"
        artifact.mkdir(parents=True)
        (artifact / "adapter_config.json").write_text("{}")
        c.create("BaseModel", "base", {"source": {"uri": "hf://org/model"}})
        c.create("BaseModel", "cached", {"source": {"uri": "hf://org/model"}, "cache": {"enabled": True, "size": "10Gi"}})
        c.create("RewardSpec", "rs", {"graders": [{"name": "fmt", "type": "Regex", "regex": {"pattern": "^<a>"}}],
                                      "tests": [{"name": "good", "completion": "<a>x", "expect": {"min": "1"}}]})
        c.create("Adapter", "support-v1", {"baseModelRef": {"name": "base"}, "family": "support", "version": 1,
                                           "artifactUri": f"file://{artifact}", "lora": {"rank": 8}})
        c.wait_condition("BaseModel", "base", "Ready", "True")
        c.wait_condition("Adapter", "support-v1", "Ready", "True")
        c.create("TrainingRun", "run", {"method": "SFT", "baseModelRef": {"name": "base"}, "output": {"adapterFamily": "run"},
                                        "datasets": [{"name": "d", "uri": "pvc://data/train.jsonl"}]})
        c.create("Deployment", "chat", {"baseModelRef": {"name": "base"}, "adapters": [{"name": "support", "adapterRef": {"name": "support-v1"}}],
                                        "replicas": 1})

        def pod_spec(api: str, kind: str, label: str) -> dict | None:
            found = c.kube.list(api, kind, NS, label)
            return found[0]["spec"]["template"]["spec"] if found else None

        for api, kind, label in (("batch/v1", "Job", "perennial.ai/basemodel=cached"), ("batch/v1", "Job", "perennial.ai/rewardspec=rs"),
                                 ("batch/v1", "Job", "perennial.ai/trainingrun=run"), ("apps/v1", "Deployment", "perennial.ai/deployment=chat")):
            pod = wait_for(lambda api=api, kind=kind, label=label: pod_spec(api, kind, label), timeout=60, message=f"{kind} {label}")
            assert pod.get("imagePullSecrets") == WANT, (kind, label)
