"""Perennial's Argo CD resource customizations, replayed as Argo CD's own tests do, with a real Lua 5.1.

`argocd/resource_customizations/perennial.ai/<Kind>/health_test.yaml` lists testdata objects and the health
Argo CD must show for them; the testdata are objects the operator wrote in
tests/integration/test_argocd_health_live.py. `actions/action_test.yaml` does the same for the Deployment's
actions (discovery, then each action's output). The generated argocd-cm snippet must match its sources.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml
from argocd_lua import CUSTOMIZATIONS, GROUP, KINDS, ROOT, discover_actions, health, load_yaml, run_action, run_lua

from perennial.api import AdapterResource, BaseModelResource, DeploymentResource, RewardSpecResource, TrainingRunResource

MODELS = {"BaseModel": BaseModelResource, "RewardSpec": RewardSpecResource, "TrainingRun": TrainingRunResource,
          "Adapter": AdapterResource, "Deployment": DeploymentResource}
# Health Argo CD must be able to show for each kind, from the operator's real status.
REQUIRED = {kind: {"Healthy", "Progressing", "Degraded"} for kind in KINDS} | {"Deployment": {"Healthy", "Progressing", "Degraded", "Suspended"}}


def health_cases() -> list[tuple[str, dict]]:
    return [(kind, case) for kind in KINDS for case in load_yaml(CUSTOMIZATIONS / GROUP / kind / "health_test.yaml")["tests"]]


@pytest.mark.parametrize(("kind", "case"), health_cases(), ids=lambda v: v if isinstance(v, str) else v["inputPath"])
def test_health_of_operator_written_status(kind: str, case: dict):
    obj = load_yaml(CUSTOMIZATIONS / GROUP / kind / case["inputPath"])
    assert obj["kind"] == kind and obj["apiVersion"] == "perennial.ai/v1alpha1"
    assert health(kind, obj) == case["healthStatus"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_its_health_states_and_every_testdata_is_used(kind: str):
    folder = CUSTOMIZATIONS / GROUP / kind
    cases = load_yaml(folder / "health_test.yaml")["tests"]
    assert {c["healthStatus"]["status"] for c in cases} >= REQUIRED[kind]
    used = {c["inputPath"] for c in cases}
    assert used == {f"testdata/{p.name}" for p in (folder / "testdata").glob("*.yaml")}
    # The testdata are objects of the API as it is now (an API change that breaks them is seen here).
    for path in used:
        obj = load_yaml(folder / path)
        MODELS[kind].model_validate(obj)
        assert obj["metadata"]["generation"] >= 1


def test_testdata_status_has_the_fields_the_operator_writes():
    # A status written by hand would lack these bookkeeping fields the operator always writes.
    for kind in KINDS:
        for path in (CUSTOMIZATIONS / GROUP / kind / "testdata").glob("*.yaml"):
            status = load_yaml(path).get("status")
            if status is None:
                continue
            assert isinstance(status.get("observedGeneration"), int), path
            for c in status["conditions"]:
                assert c["lastTransitionTime"] and c["observedGeneration"] == status["observedGeneration"], (path, c)


def test_observed_generation_behind_is_progressing_whatever_the_conditions_say():
    for kind in KINDS:
        for case in load_yaml(CUSTOMIZATIONS / GROUP / kind / "health_test.yaml")["tests"]:
            obj = load_yaml(CUSTOMIZATIONS / GROUP / kind / case["inputPath"])
            if obj.get("status") is None:
                continue
            obj["metadata"]["generation"] = obj["status"]["observedGeneration"] + 1
            assert health(kind, obj) == {"status": "Progressing",
                                         "message": f"Waiting for the operator to observe generation {obj['metadata']['generation']}"}


def test_a_deployment_paused_in_its_spec_is_suspended_even_with_nothing_waiting():
    obj = load_yaml(CUSTOMIZATIONS / GROUP / "Deployment" / "testdata" / "healthy_serving.yaml")
    obj["spec"]["paused"] = True
    assert health("Deployment", obj)["status"] == "Suspended"


def action_tests() -> dict:
    return load_yaml(CUSTOMIZATIONS / GROUP / "Deployment" / "actions" / "action_test.yaml")


@pytest.mark.parametrize("case", action_tests()["discoveryTests"], ids=lambda c: c["inputPath"])
def test_deployment_action_discovery(case: dict):
    obj = load_yaml(CUSTOMIZATIONS / GROUP / "Deployment" / "actions" / case["inputPath"])
    found = discover_actions("Deployment", obj)
    assert found == {r["name"]: {"disabled": r["disabled"]} for r in case["result"]}


@pytest.mark.parametrize("case", action_tests()["actionTests"], ids=lambda c: f"{c['action']}:{c['inputPath']}")
def test_deployment_actions(case: dict):
    folder = CUSTOMIZATIONS / GROUP / "Deployment" / "actions"
    out = run_action("Deployment", case["action"], load_yaml(folder / case["inputPath"]))
    assert out == load_yaml(folder / case["expectedOutputPath"])


def test_every_action_is_discovered_and_tested():
    folder = CUSTOMIZATIONS / GROUP / "Deployment" / "actions"
    defined = {p.parent.name for p in folder.glob("*/action.lua")}
    assert defined == {"promote", "pause", "resume"}
    tests = action_tests()
    assert {t["action"] for t in tests["actionTests"]} == defined
    assert all({r["name"] for r in d["result"]} == defined for d in tests["discoveryTests"])


def test_promote_uses_the_annotation_the_controller_reads():
    from perennial.api.deployment import PROMOTE_ANNOTATION

    source = (CUSTOMIZATIONS / GROUP / "Deployment" / "actions" / "promote" / "action.lua").read_text()
    assert f'obj.metadata.annotations["{PROMOTE_ANNOTATION}"]' in source


def test_scripts_run_without_argo_cds_open_libraries(tmp_path: Path):
    """The sandbox is Argo CD's without useOpenLibs: a script using the string library fails here as it does there."""
    script = ROOT / "argocd" / "resource_customizations" / ".probe.lua"
    script.write_text('local s = "Ready"\nreturn {status = s:lower()}\n')
    try:
        with pytest.raises(Exception, match="attempt to index"):
            run_lua(script, {})
        script.write_text('return {status = string.lower("Ready")}\n')
        with pytest.raises(Exception, match="string"):
            run_lua(script, {})
    finally:
        script.unlink()


def _generator():
    spec = importlib.util.spec_from_file_location("argocd_generate", ROOT / "argocd" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["argocd_generate"] = module
    spec.loader.exec_module(module)
    return module


def test_argocd_cm_snippet_is_generated_from_the_customizations():
    gen = _generator()
    assert gen.main(["--check"]) == 0, "argocd/argocd-cm.yaml drifted: run python argocd/generate.py"
    cm = yaml.safe_load((ROOT / "argocd" / "argocd-cm.yaml").read_text())
    data = cm["data"]
    assert cm["metadata"]["name"] == "argocd-cm"
    for kind in KINDS:
        assert data[f"resource.customizations.health.perennial.ai_{kind}"] == (CUSTOMIZATIONS / GROUP / kind / "health.lua").read_text()
    actions = yaml.safe_load(data["resource.customizations.actions.perennial.ai_Deployment"])
    folder = CUSTOMIZATIONS / GROUP / "Deployment" / "actions"
    assert actions["discovery.lua"] == (folder / "discovery.lua").read_text()
    assert {d["name"]: d["action.lua"] for d in actions["definitions"]} == {
        p.parent.name: p.read_text() for p in folder.glob("*/action.lua")}
    # the chart's copy: the same keys, for its option that emits them
    assert yaml.safe_load((ROOT / "charts" / "perennial" / "files" / "argocd-cm-data.yaml").read_text()) == data


def test_the_charts_argocd_option_renders_the_same_keys():
    """The chart's option (argocd.resourceCustomizations.enabled) renders the generated data file through .Files.Get."""
    from helm_python import Chart

    rendered = Chart.load(str(ROOT / "charts" / "perennial")).render(
        {"argocd": {"resourceCustomizations": {"enabled": True}}}, name="perennial", namespace="perennial-system")
    cm = yaml.safe_load(rendered["perennial/templates/argocd-cm.yaml"])
    assert (cm["metadata"]["name"], cm["metadata"]["namespace"]) == ("argocd-cm", "argocd")
    assert cm["data"] == yaml.safe_load((ROOT / "argocd" / "argocd-cm.yaml").read_text())["data"]



def test_the_five_health_scripts_are_generated_from_one_prelude(tmp_path: Path):
    """Argo CD runs each health.lua alone (no shared module), so what the kinds share is written once
    (argocd/health/prelude.lua) and the five scripts are generated from it: a hand edit of a generated script, or a
    prelude change not generated, is drift that `generate.py --check` reports."""
    import shutil
    import subprocess

    prelude = (ROOT / "argocd" / "health" / "prelude.lua").read_text()
    assert prelude.count("\n") >= 25
    for kind in KINDS:
        script = (CUSTOMIZATIONS / GROUP / kind / "health.lua").read_text()
        assert script.count(prelude) == 1 and "GENERATED by argocd/generate.py" in script, kind
        assert "local function condition" not in (ROOT / "argocd" / "health" / f"{kind}.lua").read_text()
    shutil.copytree(ROOT / "argocd", tmp_path / "argocd")
    shutil.copytree(ROOT / "charts" / "perennial" / "files", tmp_path / "charts" / "perennial" / "files")

    def check() -> int:
        return subprocess.run([sys.executable, str(tmp_path / "argocd" / "generate.py"), "--check"], capture_output=True).returncode

    assert check() == 0
    generated = tmp_path / "argocd" / "resource_customizations" / GROUP / "Adapter" / "health.lua"
    original = generated.read_text()
    generated.write_text(original.replace('"Waiting for the Ready condition"', '"edited by hand"'))
    assert check() == 1
    generated.write_text(original)
    source = tmp_path / "argocd" / "health" / "prelude.lua"
    source.write_text(source.read_text().replace("Waiting for the operator to report a status", "Waiting"))
    assert check() == 1
