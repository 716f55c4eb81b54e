"""`perennial-trainer grade` validates a RewardSpec with the API server's rules and messages: the CRD's OpenAPI
schema AND its CEL rules (issue 11, item 3).

Before: the CLI ran only the pydantic model, so a `Code` grader with a `python:` block (refused by the CRD's
CEL rule) was accepted and silently scored failures, and errors were raw pydantic text.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from perennial.cli import install_crds
from perennial.kube import ApiError, connect
from perennial.local.apiserver import start_in_thread
from perennial_trainer.cli import load_reward_spec
from perennial_trainer.errors import TrainerError

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"apiVersion": "perennial.ai/v1alpha1", "kind": "RewardSpec", "metadata": {"name": "rubric"},
        "spec": {"graders": [{"name": "fmt", "type": "Regex", "regex": {"pattern": "^<a>"}}]}}


def spec(**changes) -> dict:
    doc = copy.deepcopy(GOOD)
    doc["spec"].update(changes)
    return doc


BAD = {
    # CEL: the sub-object must match the type (the reported case: silently scored failures before).
    "code-with-python-block": spec(graders=[{"name": "c", "type": "Code", "python": {"source": "def grade(s, i): return 1"}}]),
    "two-sub-objects": spec(graders=[{"name": "c", "type": "Code", "code": {}, "python": {"source": "x"}}]),
    "duplicate-names": spec(graders=[GOOD["spec"]["graders"][0], GOOD["spec"]["graders"][0]]),
    "test-names-no-grader": spec(tests=[{"name": "t", "completion": "a", "expect": {"min": "1"}, "grader": "nope"}]),
    "judge-min-not-below-max": spec(graders=[{"name": "j", "type": "LLMJudge", "llmJudge": {
        "endpoint": "http://j/v1", "model": "m", "rubric": "r", "minScore": 4, "maxScore": 4}}]),
    "infinite-weight": spec(graders=[{**GOOD["spec"]["graders"][0], "weight": "1e400"}]),
    "unit-partial-credit": spec(graders=[{"name": "j", "type": "JSONSchema", "jsonSchema": {"schema": {}, "partialCredit": "3"}}]),
    # OpenAPI schema: enum, type, pattern, required, bounds.
    "unknown-type": spec(graders=[{"name": "g", "type": "Magic"}]),
    "bad-name": spec(graders=[{"name": "Not_A_Name", "type": "Regex", "regex": {"pattern": "a"}}]),
    "no-graders": spec(graders=[]),
    "weight-not-a-number": spec(graders=[{**GOOD["spec"]["graders"][0], "weight": "heavy"}]),
    "timeout-too-long": spec(graders=[{"name": "c", "type": "Code", "code": {"limits": {"timeoutSeconds": 6000}}}]),
    "graders-not-a-list": spec(graders={"name": "x"}),
    "several-errors": spec(graders=[{"name": "c", "type": "Code", "weight": "x", "code": {"testPoints": "-3"}}]),
}


@pytest.fixture(scope="module")
def api():
    server = start_in_thread()
    kube = connect(server=server.url)
    install_crds(kube)
    yield kube
    server.stop()


def _server_message(kube, doc: dict) -> str:
    try:
        kube.create({**doc, "metadata": {**doc["metadata"], "namespace": "default"}})
    except ApiError as e:
        assert e.status == 422, e
        return e.message
    raise AssertionError(f"the API server accepted {doc}")


def _cli_message(tmp_path: Path, doc: dict) -> str:
    path = tmp_path / "rubric.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))  # in file order, as kubectl sends it
    with pytest.raises(TrainerError) as err:
        load_reward_spec(str(path))
    assert err.value.reason == "InvalidRewardSpec"
    return str(err.value)


@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_refuses_what_the_api_server_refuses_with_the_same_message(api, tmp_path, case):
    doc = BAD[case]
    server = _server_message(api, doc)
    cli = _cli_message(tmp_path, doc)
    assert server.startswith('RewardSpec.perennial.ai "rubric" is invalid: '), server
    assert cli == server


def test_the_reported_case_is_a_clear_kubernetes_style_error(tmp_path):
    cli = _cli_message(tmp_path, BAD["code-with-python-block"])
    assert cli.startswith('RewardSpec.perennial.ai "rubric" is invalid: [')
    assert "spec.graders[0]: Invalid value: \"object\": `code` must be set if and only if `type` is 'Code'" in cli
    assert "`python` must be set if and only if `type` is 'Python'" in cli
    assert "pydantic" not in cli and "validation error" not in cli


def test_a_bare_spec_is_named_after_its_file(tmp_path):
    path = tmp_path / "my-rubric.yaml"
    path.write_text(yaml.safe_dump(BAD["code-with-python-block"]["spec"]))
    with pytest.raises(TrainerError) as err:
        load_reward_spec(str(path))
    assert str(err.value).startswith('RewardSpec.perennial.ai "my-rubric" is invalid: ')


def test_unknown_fields_are_refused_as_kubectl_does_by_default(tmp_path):
    doc = spec(graders=[{**GOOD["spec"]["graders"][0], "wieght": "2"}])
    cli = _cli_message(tmp_path, doc)
    assert cli == ('RewardSpec in version "v1alpha1" cannot be handled as a RewardSpec: strict decoding error: '
                   'unknown field "spec.graders[0].wieght"')


def test_not_a_mapping_or_another_kind_is_refused(tmp_path):
    for text, expected in (("- a\n- b\n", "must be a YAML mapping"), ("a: [\n", "cannot read RewardSpec"),
                           (yaml.safe_dump({**GOOD, "kind": "TrainingRun"}), "expected apiVersion")):
        path = tmp_path / "x.yaml"
        path.write_text(text)
        with pytest.raises(TrainerError, match=expected):
            load_reward_spec(str(path))


def test_valid_specs_load_with_schema_defaults(tmp_path):
    path = tmp_path / "rubric.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    rs = load_reward_spec(str(path))
    assert rs.graders[0].weight == "1" and rs.graders[0].regex.mode == "Search"
    for example in ("02-rewardspec-code.yaml", "03-rewardspec-format.yaml"):
        assert load_reward_spec(str(ROOT / "examples" / example)).graders


def test_the_grade_command_exits_2_with_the_message(tmp_path):
    path = tmp_path / "rubric.yaml"
    path.write_text(yaml.safe_dump(BAD["code-with-python-block"]))
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"completion": "x"}) + "\n")
    out = subprocess.run([sys.executable, "-m", "perennial_trainer", "grade", "--reward-spec", str(path), "--samples", str(samples)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out
    assert "error: RewardSpec.perennial.ai \"rubric\" is invalid: [spec.graders[0]: Invalid value: \"object\"" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_validation_job_says_why_in_its_termination_message(tmp_path):
    path = tmp_path / "rubric.yaml"
    path.write_text(yaml.safe_dump(BAD["infinite-weight"], sort_keys=False))
    term = tmp_path / "termination-log"
    out = subprocess.run([sys.executable, "-m", "perennial_trainer", "grade", "--reward-spec", str(path), "--tests",
                          "--termination-log", str(term)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out
    result = json.loads(term.read_text())
    assert result["status"] == "Failed" and result["reason"] == "InvalidRewardSpec"
    assert result["message"] == ('RewardSpec.perennial.ai "rubric" is invalid: spec.graders[0].weight: Invalid value: '
                                 '"1e400": must be between -1000000 and 1000000')
