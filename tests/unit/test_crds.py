"""CRD generation: up to date, structural, CEL rules behave, examples validate."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from perennial import crdgen
from perennial.api import KINDS, KIND_BY_NAME
from perennial.api.basemodel import BaseModelResource
from perennial.api.rewardspec import GRADER_FIELDS
from perennial.cli import main as cli_main
from perennial.local import validation

ROOT = Path(__file__).resolve().parents[2]


def schema_of(kind: str) -> dict:
    for crd in crdgen.all_crds():
        if crd["spec"]["names"]["kind"] == kind:
            return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    raise KeyError(kind)


def errors(kind: str, obj: dict, old: dict | None = None) -> list[str]:
    schema = schema_of(kind)
    value = validation.apply_defaults(schema, copy.deepcopy(obj))
    if old is not None:
        old = validation.apply_defaults(schema, copy.deepcopy(old))
        return [e.message for e in validation.validate(schema, value, old)]
    return [e.message for e in validation.validate(schema, value)]


def test_committed_crds_match_the_models():
    assert crdgen.check() == []
    assert cli_main(["crds", "check"]) == 0


def test_changing_a_model_without_regenerating_fails(tmp_path, monkeypatch, capsys):
    crdgen.write(tmp_path)
    assert crdgen.check(tmp_path) == []
    monkeypatch.setattr(BaseModelResource, "description", "changed without regenerating")
    problems = crdgen.check(tmp_path)
    assert problems and "changed without regenerating" in "".join(problems)
    monkeypatch.setattr(crdgen, "repo_root", lambda: tmp_path)
    assert cli_main(["crds", "check"]) == 1
    assert "perennial crds write" in capsys.readouterr().err


def test_stray_file_in_crds_is_reported(tmp_path):
    crdgen.write(tmp_path)
    (tmp_path / "crds" / "old.yaml").write_text("kind: CustomResourceDefinition\n")
    assert any("old.yaml" in p for p in crdgen.check(tmp_path))


@pytest.mark.parametrize("model", KINDS, ids=lambda m: m.__name__)
def test_crd_names_columns_and_status_subresource(model):
    crd = crdgen.crd(model)
    names = crd["spec"]["names"]
    assert names["categories"] == ["perennial"]
    assert names["shortNames"] and all(len(s) <= 8 for s in names["shortNames"])
    version = crd["spec"]["versions"][0]
    assert version["subresources"]["status"] == {}
    assert set(version["subresources"]) <= {"status", "scale"}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[-1] == "Age"
    assert {"Ready", "Phase"} & set(columns)


def test_deployment_has_a_scale_subresource_over_replicas_and_the_active_selector():
    """`kubectl scale pdeploy` and an autoscaler of the user's own drive `spec.replicas`; HPA reads the pods by selector."""
    version = crdgen.crd(KIND_BY_NAME["Deployment"])["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.readyReplicas", "labelSelectorPath": ".status.selector"}
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["readyReplicas"]["type"] == "integer" and status["selector"]["type"] == "string"
    # the other kinds have nothing to scale
    assert all("scale" not in crdgen.crd(m)["spec"]["versions"][0]["subresources"] for m in KINDS if m is not KIND_BY_NAME["Deployment"])


def test_deployment_columns_are_cheap_and_show_base_adapters_color_ready_phase():
    cols = crdgen.crd(KIND_BY_NAME["Deployment"])["spec"]["versions"][0]["additionalPrinterColumns"]
    default = [(c["name"], c["jsonPath"]) for c in cols if not c.get("priority")]
    assert default == [("Base", ".spec.baseModelRef.name"), ("Adapters", ".status.servedSummary"), ("Active", ".status.activeColor"),
                       ("Ready", ".status.readySummary"), ("Phase", ".status.phase"), ("Age", ".metadata.creationTimestamp")]
    # one plain field per column: no filters, no wildcards
    assert all("?" not in c["jsonPath"] and "*" not in c["jsonPath"] for c in cols)


def test_short_names_are_unique_and_pdeploy_is_ours():
    all_short = [s for crd in crdgen.all_crds() for s in crd["spec"]["names"]["shortNames"]]
    assert len(all_short) == len(set(all_short))
    assert "pdeploy" in crdgen.crd(KIND_BY_NAME["Deployment"])["spec"]["names"]["shortNames"]
    # Never the apps/v1 Deployment's short name.
    assert "deploy" not in all_short


# Short names of kubectl's built-in resources (Kubernetes 1.32 `kubectl api-resources`): kubectl resolves a
# short name to the built-in kind first, so a CRD short name equal to one of these is never reachable.
BUILTIN_SHORT_NAMES = {
    "cs", "cm", "ep", "ev", "limits", "ns", "no", "pvc", "pv", "po", "rc", "quota", "sa", "svc",  # v1
    "crd", "crds", "ds", "deploy", "rs", "sts", "hpa", "cj", "csr", "ing", "netpol", "pdb", "pc", "sc", "ip",
    "ingress", "ingresses",
}


def test_no_short_name_collides_with_a_builtin_kind():
    for crd in crdgen.all_crds():
        names = crd["spec"]["names"]
        assert not set(names["shortNames"]) & BUILTIN_SHORT_NAMES, (names["kind"], names["shortNames"])
    assert "rspec" in crdgen.crd(KIND_BY_NAME["RewardSpec"])["spec"]["names"]["shortNames"]


def test_wide_columns_show_the_grpo_learning_signal():
    from perennial.local.apiserver import jsonpath

    cols = {c["name"]: c for c in crdgen.crd(KIND_BY_NAME["TrainingRun"])["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert cols["Signal"]["priority"] == 1 and cols["ZeroStd"]["priority"] == 1
    run = {"status": {"progress": {"fracRewardZeroStd": "1"}, "conditions": [
        {"type": "Succeeded", "status": "True", "reason": "Trained"},
        {"type": "LearningSignal", "status": "False", "reason": "NoRewardVariance"}]}}
    # The embedded API server's printer-column JSONPath evaluates the condition filter.
    assert jsonpath(run, cols["Signal"]["jsonPath"]) == "NoRewardVariance"
    assert jsonpath(run, cols["ZeroStd"]["jsonPath"]) == "1"


def _walk(node, path=""):
    yield path, node
    for key, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("model", KINDS, ids=lambda m: m.__name__)
def test_schema_is_structural_bounded_and_described(model):
    schema = crdgen.openapi_schema(model)
    for path, node in _walk(schema):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, f"unbounded string {path}"
        if node.get("type") == "array":
            assert "maxItems" in node, f"unbounded list {path}"
        if path.startswith(".spec.") and path.count(".") >= 2 and not path.endswith("[]") and "{}" not in path:
            assert node.get("description"), f"no description for kubectl explain: {path}"


def test_every_cel_rule_compiles():
    for crd in crdgen.all_crds():
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert validation.check_cel_rules(schema) == []


# ---------------------------------------------------------------- CEL rules, one valid and one invalid object each

BM = {"apiVersion": "perennial.ai/v1alpha1", "kind": "BaseModel", "metadata": {"name": "m"}, "spec": {"source": {"uri": "hf://org/model"}}}
RUN = {
    "apiVersion": "perennial.ai/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "r"},
    "spec": {
        "method": "SFT",
        "baseModelRef": {"name": "m"},
        "datasets": [{"name": "d", "uri": "file:///data/train.jsonl"}],
        "output": {"adapterFamily": "fam"},
    },
}
RS = {
    "apiVersion": "perennial.ai/v1alpha1",
    "kind": "RewardSpec",
    "metadata": {"name": "rs"},
    "spec": {"graders": [{"name": "fmt", "type": "Regex", "regex": {"pattern": "^a"}}]},
}
AD = {
    "apiVersion": "perennial.ai/v1alpha1",
    "kind": "Adapter",
    "metadata": {"name": "a"},
    "spec": {"baseModelRef": {"name": "m"}, "family": "fam", "version": 1, "artifactUri": "file:///a", "lora": {"rank": 8}},
}
DEP = {
    "apiVersion": "perennial.ai/v1alpha1",
    "kind": "Deployment",
    "metadata": {"name": "d"},
    "spec": {"baseModelRef": {"name": "m"}, "adapters": [{"name": "x", "track": {"family": "fam"}}]},
}


def with_spec(obj: dict, **changes) -> dict:
    out = copy.deepcopy(obj)
    for dotted, value in changes.items():
        node = out["spec"]
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        if value is DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return out


DELETE = object()

CASES = [
    # (kind, object, old object or None, expected message fragment or None when valid)
    ("BaseModel", BM, None, None),
    ("BaseModel", with_spec(BM, source={"uri": "s3://b/m", "revision": "main"}), None, "`revision` may only be set for `hf://` sources"),
    ("TrainingRun", RUN, None, None),
    ("TrainingRun", with_spec(RUN, method="GRPO"), None, "`rewardSpecRef` is required when `method` is 'GRPO'"),
    ("TrainingRun", with_spec(RUN, method="GRPO", rewardSpecRef={"name": "rs"}), None, None),
    ("TrainingRun", with_spec(RUN, datasets=[{"name": "d", "uri": "file:///x", "feedback": {"deploymentRef": {"name": "p"}}}]), None, "exactly one of `uri`, `feedback` must be set"),
    ("TrainingRun", with_spec(RUN, datasets=[{"name": "d"}]), None, "exactly one of `uri`, `feedback` must be set"),
    ("TrainingRun", with_spec(RUN, datasets=[{"name": "d", "uri": "file:///x", "split": "Eval"}]), None, "at least one dataset must have `split` 'Train'"),
    ("TrainingRun", with_spec(RUN, datasets=[{"name": "d", "uri": "file:///x"}, {"name": "d", "uri": "file:///y"}]), None, "dataset names must be unique"),
    ("TrainingRun", with_spec(RUN, method="DPO"), RUN, "`spec` is immutable"),
    # GRPO groups: the batch counts completions, whole groups of `numGenerations` (8 when unset).
    ("TrainingRun", with_spec(RUN, method="GRPO", rewardSpecRef={"name": "rs"}, hyperparameters={"batchSize": 12, "numGenerations": 8}), None,
     "`hyperparameters.batchSize` must be a multiple of `hyperparameters.numGenerations` (8 when unset) when `method` is 'GRPO'"),
    ("TrainingRun", with_spec(RUN, method="GRPO", rewardSpecRef={"name": "rs"}, hyperparameters={"batchSize": 12}), None,
     "`hyperparameters.batchSize` must be a multiple of `hyperparameters.numGenerations`"),
    ("TrainingRun", with_spec(RUN, method="GRPO", rewardSpecRef={"name": "rs"}, hyperparameters={"batchSize": 12, "numGenerations": 4}), None, None),
    ("TrainingRun", with_spec(RUN, method="GRPO", rewardSpecRef={"name": "rs"}, hyperparameters={"numGenerations": 6}), None, None),
    ("TrainingRun", with_spec(RUN, method="SFT", hyperparameters={"batchSize": 12, "numGenerations": 8}), None, None),
    # Parents: by Adapter, by the TrainingRun that produces it, or the newest of a family; at most one.
    ("TrainingRun", with_spec(RUN, parentTrainingRunRef={"name": "sft"}), None, None),
    ("TrainingRun", with_spec(RUN, parentAdapterFamily="fam"), None, None),
    ("TrainingRun", with_spec(RUN, parentAdapterRef={"name": "fam-v1"}, parentTrainingRunRef={"name": "sft"}), None,
     "at most one of `parentAdapterRef`, `parentTrainingRunRef`, `parentAdapterFamily` may be set"),
    ("TrainingRun", with_spec(RUN, parentTrainingRunRef={"name": "sft"}, parentAdapterFamily="fam"), None, "at most one of"),
    ("TrainingRun", with_spec(RUN, parentTrainingRunRef={"name": "other"}), with_spec(RUN, parentTrainingRunRef={"name": "sft"}), "`spec` is immutable"),
    ("TrainingRun", RUN, RUN, None),
    ("RewardSpec", RS, None, None),
    ("RewardSpec", with_spec(RS, graders=[{"name": "fmt", "type": "Regex", "python": {"source": "def grade(s, i): return 1"}}]), None, "`regex` must be set if and only if `type` is 'Regex'"),
    ("RewardSpec", with_spec(RS, graders=[{"name": "fmt", "type": "Python", "python": {"source": "x"}, "regex": {"pattern": "a"}}]), None, "`regex` must be set if and only if `type` is 'Regex'"),
    ("RewardSpec", with_spec(RS, graders=[RS["spec"]["graders"][0], RS["spec"]["graders"][0]]), None, "grader names must be unique"),
    ("RewardSpec", with_spec(RS, tests=[{"name": "t", "completion": "a", "expect": {"min": "1"}, "grader": "nope"}]), None, "must name a grader of this RewardSpec"),
    ("RewardSpec", with_spec(RS, tests=[{"name": "t", "completion": "a", "expect": {"min": "1"}, "grader": "fmt"}]), None, None),
    # Bounded numbers (scores stay finite: float("1e400") is inf) and a judge range that is one.
    ("RewardSpec", with_spec(RS, graders=[{**RS["spec"]["graders"][0], "weight": "1e400"}]), None,
     'spec.graders[0].weight: Invalid value: "1e400": must be between -1000000 and 1000000'),
    ("RewardSpec", with_spec(RS, graders=[{**RS["spec"]["graders"][0], "failureScore": "-1000000.5"}]), None,
     "spec.graders[0].failureScore: Invalid value: \"-1000000.5\": must be between -1000000 and 1000000"),
    ("RewardSpec", with_spec(RS, graders=[{**RS["spec"]["graders"][0], "weight": "-1000000", "failureScore": "1e6"}]), None, None),
    ("RewardSpec", with_spec(RS, graders=[{"name": "c", "type": "Code", "code": {"testPoints": "-1"}}]), None,
     "spec.graders[0].code.testPoints: Invalid value: \"-1\": must be between 0 and 1000000"),
    ("RewardSpec", with_spec(RS, graders=[{"name": "j", "type": "JSONSchema", "jsonSchema": {"schema": {}, "partialCredit": "1.01"}}]), None,
     "spec.graders[0].jsonSchema.partialCredit: Invalid value: \"1.01\": must be between 0 and 1"),
    ("RewardSpec", with_spec(RS, graders=[{"name": "j", "type": "LLMJudge", "llmJudge": {"endpoint": "http://j/v1", "model": "m", "rubric": "r", "minScore": 3, "maxScore": 3}}]), None,
     "spec.graders[0].llmJudge.minScore: Invalid value: \"object\": `minScore` must be less than `maxScore`"),
    ("Adapter", AD, None, None),
    ("Adapter", with_spec(AD, version=2), AD, "`spec` is immutable: adapters are records"),
    ("Deployment", DEP, None, None),
    ("Deployment", with_spec(DEP, adapters=[{"name": "x", "track": {"family": "f"}, "adapterRef": {"name": "a"}}]), None, "exactly one of `adapterRef`, `track` must be set"),
    ("Deployment", with_spec(DEP, adapters=[{"name": "x", "track": {"family": "f"}}, {"name": "x", "adapterRef": {"name": "a"}}]), None, "served adapter names must be unique"),
    ("Deployment", with_spec(DEP, regions=[{"name": "eu"}, {"name": "eu"}]), None, "region names must be unique"),
    ("Deployment", with_spec(DEP, adapters=[{"name": "chat-preview", "adapterRef": {"name": "a"}}]), None,
     "served names ending in `-preview` are the operator's"),
    ("Deployment", with_spec(DEP, autoscaling={"enabled": True, "minReplicas": 5, "maxReplicas": 2}), None, "`minReplicas` must not exceed `maxReplicas`"),
    ("Deployment", with_spec(DEP, autoscaling={"minReplicas": 0, "maxReplicas": 2}), None, "`minReplicas` 0 needs `provider` 'KEDA'"),
    ("Deployment", with_spec(DEP, autoscaling={"minReplicas": 0, "maxReplicas": 2, "provider": "KEDA"}), None, None),
    ("Deployment", with_spec(DEP, autoscaling={"enabled": True, "minReplicas": 0, "maxReplicas": 2, "provider": "KEDA"}), None,
     "`minReplicas` 0 needs `wakeQuery`: the engine's metrics vanish with the last pod, so nothing would ever wake it"),
    ("Deployment", with_spec(DEP, autoscaling={"enabled": True, "minReplicas": 0, "maxReplicas": 2, "provider": "KEDA",
                                               "wakeQuery": "sum(rate(http_requests_total[1m]))"}), None, None),
    ("Deployment", with_spec(DEP, feedback={"enabled": False}, continuousLearning={"enabled": True, "adapterFamily": "f"}), None, "`continuousLearning` needs `feedback.enabled`"),
    ("Deployment", with_spec(DEP, continuousLearning={"enabled": True, "adapterFamily": "f", "template": {"method": "GRPO"}}), None, "`rewardSpecRef` is required when `method` is 'GRPO'"),
    ("Deployment", with_spec(DEP, continuousLearning={"enabled": True, "adapterFamily": "f", "template": {
        "method": "GRPO", "rewardSpecRef": {"name": "rs"}, "hyperparameters": {"batchSize": 6, "numGenerations": 4}}}), None,
     "`hyperparameters.batchSize` must be a multiple of `hyperparameters.numGenerations`"),
    ("Deployment", with_spec(DEP, strategy={"blueGreen": {"scaleDownDelaySeconds": 60, "postPromotionWindowSeconds": 120}}), None,
     "`postPromotionWindowSeconds` must not exceed `scaleDownDelaySeconds`"),
    ("Deployment", with_spec(DEP, strategy={"blueGreen": {"scaleDownDelaySeconds": 0}}), None, None),  # window unset: fine
    ("Deployment", with_spec(DEP, strategy={"blueGreen": {"scaleDownDelaySeconds": 60, "postPromotionWindowSeconds": 60,
                                                           "autoPromote": False, "abortScaleDownDelaySeconds": 0, "previewReplicas": 1}}), None, None),
    ("Deployment", with_spec(DEP, strategy={"adapterRollout": {"canarySteps": [{"weight": 10}, {"weight": 10, "pauseSeconds": 5}]}}), None,
     "`canarySteps` weights must be unique"),
    ("Deployment", with_spec(DEP, strategy={"adapterRollout": {"canarySteps": [{"weight": 50}, {"weight": 10}], "unloadDelaySeconds": 0}}), None, None),
    ("Deployment", with_spec(DEP, continuousLearning={"enabled": True, "adapterFamily": "f", "template": {
        "evalDatasets": [{"name": "golden", "uri": "file:///g.jsonl", "split": "Eval"}]}}), None, None),
    ("Deployment", with_spec(DEP, continuousLearning={"enabled": True, "adapterFamily": "f", "template": {
        "evalDatasets": [{"name": "golden", "uri": "file:///g.jsonl"}]}}), None,
     "`evalDatasets` must have `split` 'Eval' and a `uri`, and must not be named 'feedback'"),
    ("Deployment", with_spec(DEP, continuousLearning={"enabled": True, "adapterFamily": "f", "template": {
        "evalDatasets": [{"name": "g", "uri": "file:///a", "split": "Eval"}, {"name": "g", "uri": "file:///b", "split": "Eval"}]}}), None,
     "`evalDatasets` names must be unique"),
    # Across nodes: LeaderWorkerSet groups of vLLM pods; never switched to or from one pod per replica in place.
    ("Deployment", with_spec(DEP, engine={"pipelineParallelSize": 2, "tensorParallelSize": 8}), None, None),
    ("Deployment", with_spec(DEP, engine={"type": "Transformers", "pipelineParallelSize": 2}), None, "`pipelineParallelSize` above 1 needs `type` 'VLLM'"),
    ("Deployment", with_spec(DEP, engine={"pipelineParallelSize": 2}), DEP, "`pipelineParallelSize` must not change between 1 and more than 1"),
    ("Deployment", DEP, with_spec(DEP, engine={"pipelineParallelSize": 2}), "`pipelineParallelSize` must not change between 1 and more than 1"),
    ("Deployment", with_spec(DEP, engine={"pipelineParallelSize": 4}), with_spec(DEP, engine={"pipelineParallelSize": 2}), None),
]

# Every grader type without its sub-object.
CASES += [
    ("RewardSpec", with_spec(RS, graders=[{"name": "g", "type": t}]), None, f"`{f}` must be set if and only if `type` is '{t}'")
    for t, f in GRADER_FIELDS.items()
]


@pytest.mark.parametrize("kind,obj,old,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_cel_rule(kind, obj, old, expected):
    found = errors(kind, obj, old)
    if expected is None:
        assert found == []
    else:
        assert any(expected in m for m in found), found


def test_every_cel_rule_is_exercised_by_a_failing_case():
    messages = {e for kind, obj, old, e in CASES if e}
    rules = set()
    for crd in crdgen.all_crds():
        for _, node in _walk(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]):
            for r in node.get("x-kubernetes-validations") or []:
                rules.add(r["message"])
    untested = {r for r in rules if not any(m in r or r in m for m in messages)}
    assert untested == set()


def test_schema_rejects_wrong_enum_and_missing_required():
    found = errors("TrainingRun", with_spec(RUN, method="PPO"))
    assert any(m.startswith("spec.method: Unsupported value: \"PPO\"") for m in found), found
    found = errors("TrainingRun", with_spec(RUN, output=DELETE))
    assert any(m.startswith("spec.output: Required value") for m in found), found
    found = errors("TrainingRun", with_spec(RUN, hyperparameters={"learningRate": "fast"}))
    assert any("spec.hyperparameters.learningRate" in m for m in found), found


EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_examples_validate_against_the_generated_schemas(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        if doc["apiVersion"] != "perennial.ai/v1alpha1":
            continue
        assert errors(doc["kind"], doc) == []
        KIND_BY_NAME[doc["kind"]].model_validate(doc)


def test_examples_cover_every_kind_but_adapter():
    kinds = {d["kind"] for p in EXAMPLES for d in yaml.safe_load_all(p.read_text()) if d}
    assert kinds >= {"BaseModel", "RewardSpec", "TrainingRun", "Deployment"}
