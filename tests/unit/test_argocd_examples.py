"""The example Argo CD Applications (examples/argocd/): the chart's, and a namespace of Perennial objects.

Argo CD cannot run here; these check what would break a sync: the chart path and its values (validated by the
chart's values.schema.json and rendered by the Helm SDK), the workloads being valid Perennial objects, their sync
waves (what is referenced before what references it), and `ignoreDifferences` covering the fields another writer
owns.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from perennial.api import BaseModelResource, DeploymentResource, RewardSpecResource, TrainingRunResource

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "argocd"
MODELS = {"BaseModel": BaseModelResource, "RewardSpec": RewardSpecResource, "TrainingRun": TrainingRunResource, "Deployment": DeploymentResource}
WAVE = "argocd.argoproj.io/sync-wave"
# Fields of an Application spec the examples may use (argoproj.io/v1alpha1 Application).
APPLICATION_SPEC = {"project", "source", "destination", "syncPolicy", "ignoreDifferences"}
SYNC_OPTIONS = {"CreateNamespace=true", "ServerSideApply=true", "SkipDryRunOnMissingResource=true", "ApplyOutOfSyncOnly=true",
                "PruneLast=true", "Validate=false", "RespectIgnoreDifferences=true"}


def load(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def workloads() -> list[dict]:
    docs = []
    for path in sorted((EXAMPLES / "workloads").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.parametrize("name", ["perennial-operator.yaml", "perennial-workloads.yaml"])
def test_applications_are_well_formed(name: str):
    app = load(name)
    assert app["apiVersion"] == "argoproj.io/v1alpha1" and app["kind"] == "Application"
    assert app["metadata"]["namespace"] == "argocd"
    assert set(app["spec"]) <= APPLICATION_SPEC and {"project", "source", "destination", "syncPolicy"} <= set(app["spec"])
    assert (ROOT / app["spec"]["source"]["path"]).is_dir()
    assert set(app["spec"]["syncPolicy"]["syncOptions"]) <= SYNC_OPTIONS
    assert app["spec"]["destination"]["server"] == "https://kubernetes.default.svc"


def chart_values(app: dict) -> dict:
    defaults = yaml.safe_load((ROOT / "charts" / "perennial" / "values.yaml").read_text())

    def merge(a: dict, b: dict) -> dict:
        return {**a, **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v for k, v in b.items()}}

    return merge(defaults, app["spec"]["source"]["helm"]["valuesObject"])


def test_the_chart_application_uses_real_chart_values_and_renders():
    app = load("perennial-operator.yaml")
    source = app["spec"]["source"]
    assert source["path"] == "charts/perennial" and (ROOT / source["path"] / "Chart.yaml").exists()
    values = chart_values(app)
    schema = ROOT / "charts" / "perennial" / "values.schema.json"
    jsonschema.validate(values, json.loads(schema.read_text()))
    # every key the Application sets is a key of the chart's values (a typo would be silently ignored by Helm)
    defaults = yaml.safe_load((ROOT / "charts" / "perennial" / "values.yaml").read_text())

    def known(override: dict, base: dict, at: str = "") -> None:
        for k, v in override.items():
            assert k in base, f"values key {at}{k} is not in charts/perennial/values.yaml"
            if isinstance(v, dict) and base[k]:
                known(v, base[k], f"{at}{k}.")

    known(source["helm"]["valuesObject"], defaults)
    # CRDs are large: client-side apply's last-applied annotation cannot hold them
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    from helm_python import Chart

    rendered = Chart.load(str(ROOT / "charts" / "perennial")).render(values, name=source["helm"]["releaseName"], namespace=app["spec"]["destination"]["namespace"])
    text = rendered if isinstance(rendered, str) else json.dumps(rendered, default=str)
    assert "CustomResourceDefinition" in text
    # the workloads' namespace is one the operator watches
    workloads_app = load("perennial-workloads.yaml")
    assert workloads_app["spec"]["destination"]["namespace"] in values["watch"]["namespaces"]


def test_workloads_are_valid_objects_in_waves_after_what_they_reference():
    docs = workloads()
    kinds = {d["kind"] for d in docs}
    assert kinds == set(MODELS)
    waves: dict[str, set[int]] = {}
    for d in docs:
        MODELS[d["kind"]].model_validate(d)
        assert "namespace" not in d["metadata"], "the Application's destination sets the namespace"
        waves.setdefault(d["kind"], set()).add(int(d["metadata"]["annotations"][WAVE]))
    first = waves["BaseModel"] | waves["RewardSpec"]
    later = waves["TrainingRun"] | waves["Deployment"]
    assert max(first) < min(later), waves
    # every reference points at an object of an earlier wave
    by_name = {(d["kind"], d["metadata"]["name"]): int(d["metadata"]["annotations"][WAVE]) for d in docs}
    for d in docs:
        spec, wave = d["spec"], int(d["metadata"]["annotations"][WAVE])
        for kind, ref in (("BaseModel", spec.get("baseModelRef")), ("RewardSpec", spec.get("rewardSpecRef"))):
            if ref:
                assert by_name[(kind, ref["name"])] < wave, (d["metadata"]["name"], kind, ref)


def test_workloads_application_ignores_what_autoscalers_and_actions_write():
    app = load("perennial-workloads.yaml")
    ignored = {(i["group"], i["kind"], p) for i in app["spec"]["ignoreDifferences"] for p in i.get("jsonPointers", [])}
    scale = DeploymentResource.scale
    assert scale is not None and scale.spec_replicas_path == ".spec.replicas"
    assert ("perennial.ai", "Deployment", "/spec/replicas") in ignored  # the /scale subresource writes it
    from perennial.api.deployment import PROMOTE_ANNOTATION

    assert ("perennial.ai", "Deployment", "/metadata/annotations/" + PROMOTE_ANNOTATION.replace("~", "~0").replace("/", "~1")) in ignored
    options = app["spec"]["syncPolicy"]["syncOptions"]
    assert "SkipDryRunOnMissingResource=true" in options  # the CRDs may come from the other Application
    assert int(app["metadata"]["annotations"][WAVE]) > int(load("perennial-operator.yaml")["metadata"]["annotations"][WAVE])
