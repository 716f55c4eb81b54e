"""Graders: every type standalone, the code rubric, sandbox containment, TRL reward functions, the grade CLI."""

from __future__ import annotations

import http.server
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from perennial.api import Grader, RewardSpecSpec
from perennial_trainer import graders
from perennial_trainer.graders import grade, parse_judge_score, reward_functions, run_tests, score_all

REPO = Path(__file__).resolve().parents[2]


def G(**kw) -> Grader:
    kw.setdefault("name", "g")
    return Grader.model_validate(kw)


# ----------------------------------------------------------------------------- simple types


def test_regex_modes_and_chat_completions():
    g = G(type="Regex", regex={"pattern": "<answer>[a-z]+</answer>", "mode": "FullMatch"})
    assert grade(g, "<answer>red</answer>").score == 1
    assert grade(g, "<answer>red</answer></answer>").score == 0
    assert grade(g, [{"role": "assistant", "content": "<answer>red</answer>"}]).score == 1
    assert grade(G(type="Regex", regex={"pattern": "RED", "ignoreCase": True}), "it is red").score == 1


def test_json_schema_extracts_and_partial_credit():
    schema = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    g = G(type="JSONSchema", jsonSchema={"schema": schema, "partialCredit": "0.25"})
    assert grade(g, 'Sure: {"name": "x"} done').score == 1
    assert grade(g, '{"nome": 1}').score == 0.25
    assert grade(g, "no json here").score == 0
    fenced = G(type="JSONSchema", jsonSchema={"schema": schema, "extract": "FencedBlock"})
    assert grade(fenced, 'x\n```json\n{"name": "y"}\n```').score == 1


def test_string_check_templates():
    g = G(type="StringCheck", stringCheck={"operation": "Equals", "reference": "<answer>{{item.answer}}</answer>"})
    assert grade(g, " <answer>red</answer>\n", {"answer": "red"}).score == 1
    assert grade(g, "<answer>blue</answer>", {"answer": "red"}).score == 0
    c = G(type="StringCheck", stringCheck={"operation": "Contains", "reference": "{{item.meta.city}}", "caseSensitive": False})
    assert grade(c, "I live in PARIS", {"meta": {"city": "Paris"}}).score == 1


@pytest.mark.parametrize("metric", ["FuzzyRatio", "TokenSetRatio", "RougeL", "BLEU"])
def test_similarity_metrics(metric):
    g = G(type="Similarity", similarity={"metric": metric, "reference": "{{item.ref}}"})
    item = {"ref": "the quick brown fox jumps over the lazy dog"}
    same = grade(g, item["ref"], item).score
    other = grade(g, "completely unrelated words here", item).score
    assert same == pytest.approx(1.0, abs=1e-6) and 0 <= other < 0.5
    th = G(type="Similarity", similarity={"metric": metric, "reference": "{{item.ref}}", "threshold": "0.9"})
    assert grade(th, item["ref"], item).score == 1 and grade(th, "nope", item).score == 0


def test_human_feedback():
    g = G(type="HumanFeedback", humanFeedback={})
    assert grade(g, "x", {"feedback_score": 0.8}).score == 0.8
    assert grade(g, "x", {"feedback_score": "up"}).score == 1
    assert grade(g, "x", {}).score == 0.5


# ----------------------------------------------------------------------------- code rubric

CODE = G(type="Code", code={"formatPoints": "5", "compilePoints": "10", "testPoints": "20"})
TESTS = {"tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0"}


def test_code_rubric_0_5_15_35():
    unformatted = "def add(a, b):\n    return a + b"
    not_compiling = "```python\ndef add(a, b)\n    return a + b\n```"
    failing = "```python\ndef add(a, b):\n    return a - b\n```"
    passing = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```"
    scores = [grade(CODE, s, TESTS).score for s in (unformatted, not_compiling, failing, passing)]
    assert scores == [0, 5, 15, 35]


def test_code_crash_and_hang_score_failure_score():
    """Tested code that crashes, exits before its tests finish, or hangs scores the grader's
    `failureScore` (the API's documented semantics), not the compile points."""
    raising = "```python\nraise SystemExit(0)\n```"
    hang = "```python\ndef add(a, b):\n    while True: pass\n```"
    fast = G(type="Code", failureScore="-1", code={"limits": {"timeoutSeconds": 1, "cpuSeconds": 1}})
    assert grade(CODE, raising, TESTS).score == 0  # failureScore defaults to 0
    r = grade(fast, hang, TESTS)
    assert r.score == -1 and r.failed and "crashed or timed out" in r.reason, r


def test_code_item_without_tests_gets_no_test_points():
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    for item in ({}, {"tests": ""}, {"tests": []}, {"io_tests": []}):
        r = grade(CODE, wrong, item)
        assert r.score == 15, (item, r)
        assert "no tests" in r.reason and "test points not awarded" in r.reason
    r = grade(CODE, wrong, {"io_tests": "not json"})
    assert r.score == 15 and "`io_tests`" in r.reason


def test_code_io_tests_compared_by_the_trainer():
    g = G(type="Code", code={"formatPoints": "5", "compilePoints": "10", "testPoints": "20"})
    item = {"io_tests": [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4", "output": ["6"]}]}
    right = "```python\na, b = map(int, input().split())\nprint(a + b)   \n```"
    wrong = "```python\na, b = map(int, input().split())\nprint(a * b)\n```"
    crash = "```python\nprint(1 / 0)\n```"
    assert grade(g, right, item).score == 35
    r = grade(g, wrong, item)
    assert r.score == 15 and "wrong output" in r.reason and "(0/2" in r.reason
    assert grade(g, crash, item).score == 0 and grade(g, crash, item).failed
    apps = {"io_tests": {"inputs": ["1 1\n"], "outputs": ["2\n"]}}
    assert grade(g, right, apps).score == 35


# ----------------------------------------------------------------------------- Python grader sandbox


def test_python_grader_scores():
    g = G(type="Python", python={"source": "def grade(sample, item):\n    return float(sample['output_text'] == item['answer'])"})
    assert grade(g, "red", {"answer": "red"}).score == 1
    assert grade(g, "blue", {"answer": "red"}).score == 0


# Each case has one limit that can fire. The CPU-bound case has a wall-clock limit far beyond its CPU
# limit: on a busy 2-core machine the grader gets a fraction of a core, so with equal limits the wall
# clock would fire first (CPU seconds pass slower than wall seconds); sleeping uses no CPU, so the
# wall-clock case cannot hit the CPU limit instead.
QUICK = {"timeoutSeconds": 2, "cpuSeconds": 2, "memoryMiB": 256}


@pytest.mark.parametrize("body,limits,why", [
    ("while True:\n        pass", {"timeoutSeconds": 120, "cpuSeconds": 1, "memoryMiB": 256}, "exceeded its CPU time limit (SIGXCPU)"),
    ("import time\n    time.sleep(60)", QUICK, "timed out after 2s (wall clock)"),
    ("x = bytearray(10 * 1024 ** 3)\n    return 1.0", QUICK, "MemoryError"),
    ("import os\n    os._exit(9)", QUICK, "exited with 9"),
    ("raise ValueError('boom')", QUICK, "boom"),
    ("return 'not a number'", QUICK, "a str, not a number"),
])
def test_misbehaving_grader_is_contained(body, limits, why, caplog):
    src = f"def grade(sample, item):\n    {body}\n"
    g = G(type="Python", failureScore="-1", python={"source": src, "limits": limits})
    with caplog.at_level(logging.WARNING, logger="perennial_trainer.graders"):
        r = grade(g, "x", {})
    assert r.score == -1 and r.failed
    assert why in r.reason
    assert any("failed" in m and "failureScore" in m for m in caplog.messages)


def test_grader_cannot_see_trainer_secrets(monkeypatch):
    monkeypatch.setenv("PERENNIAL_FAKE_SECRET", "hunter2-s3cr3t")
    src = (
        "import os, glob\n"
        "def grade(sample, item):\n"
        "    seen = repr(dict(os.environ))\n"
        "    for p in [f'/proc/{os.getppid()}/environ'] + glob.glob('/proc/[0-9]*/environ'):\n"
        "        try:\n"
        "            seen += open(p, 'rb').read().decode('latin-1')\n"
        "        except Exception:\n"
        "            pass\n"
        "    if 'hunter2' in seen: return 100.0\n"
        "    return float(sorted(os.environ) != ['HOME', 'LANG', 'PATH', 'TMPDIR'])\n"
    )
    g = G(type="Python", python={"source": src})
    r = grade(g, "x", {})
    assert not r.failed, r.reason
    assert r.score == 0.0  # a minimal environment, and no other process's environment readable


def test_grader_runs_in_scratch_dir(tmp_path, monkeypatch):
    """Each sample's cwd (and HOME, TMPDIR) is a fresh scratch directory of its own, not the caller's,
    wherever the checkout and the caller's cwd are; removed once the sample is graded."""
    from perennial_trainer import sandbox

    caller = tmp_path / "caller"
    caller.mkdir()
    monkeypatch.chdir(caller)
    code = ("import os, json\nopen('scratch.txt', 'w').write('x')\n"
            "print(json.dumps([os.getcwd(), os.environ['HOME'], os.environ['TMPDIR'], os.listdir('.')]))")
    a, b = sandbox.run([sandbox.Job("io", code), sandbox.Job("io", code)], sandbox.Limits())
    (cwd_a, home, tmp, listing), (cwd_b, *_) = json.loads(a.stdout), json.loads(b.stdout)
    assert cwd_a == home == tmp and listing == ["scratch.txt"]
    assert cwd_a != cwd_b and os.path.basename(cwd_a).startswith("perennial-sample-")
    assert not os.path.exists(cwd_a) and not os.path.exists(cwd_b), "the scratch directories are removed"
    assert not list(caller.iterdir()), "nothing written to the caller's cwd"


def test_broken_grader_source():
    r = grade(G(type="Python", failureScore="0.5", python={"source": "def grade(:"}), "x")
    assert r.score == 0.5 and "SyntaxError" in r.reason


# ----------------------------------------------------------------------------- LLM judge


@pytest.mark.parametrize("text,expected", [
    ("Score: 7/10", 7), ('{"score": 3, "reason": "meh"}', 3), ("I'd say 8.", 8), ("4/5", 8),
    ("Score: **9**", 9), ("eleven", None), ("42", None),
])
def test_parse_judge_score(text, expected):
    assert parse_judge_score(text, 0, 10) == expected


class _Judge(http.server.BaseHTTPRequestHandler):
    answers: list = []
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Judge.seen.append((self.headers.get("Authorization"), body))
        ans = _Judge.answers.pop(0) if _Judge.answers else "Score: 5/10"
        if ans == 500:
            self.send_response(500)
            self.end_headers()
            return
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": ans}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def judge():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _Judge.answers, _Judge.seen = [], []
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_llm_judge_retries_parses_and_authenticates(judge, monkeypatch, tmp_path):
    (tmp_path / "judge-key").mkdir()
    (tmp_path / "judge-key" / "token").write_text("sk-test\n")
    monkeypatch.setenv("PERENNIAL_SECRETS_DIR", str(tmp_path))
    g = G(type="LLMJudge", llmJudge={"endpoint": judge, "model": "judge", "rubric": "Is {{item.answer}} right?",
                                     "apiKeySecretRef": {"name": "judge-key", "key": "token"}, "maxRetries": 2})
    _Judge.answers = [500, "no idea", "Score: 7/10"]
    r = graders.grade_batch(g, ["red"], [{"answer": "red"}], [[{"role": "user", "content": "colour of a cherry?"}]])[0]
    assert r.score == pytest.approx(0.7) and not r.failed
    assert len(_Judge.seen) == 3
    auth, body = _Judge.seen[-1]
    assert auth == "Bearer sk-test" and "Is red right?" in body["messages"][1]["content"]
    assert "user: colour of a cherry?" in body["messages"][1]["content"] and "Response:\nred" in body["messages"][1]["content"]


def test_llm_judge_failure_score(judge):
    g = G(type="LLMJudge", failureScore="0.1", llmJudge={"endpoint": judge, "model": "j", "rubric": "r", "maxRetries": 1})
    _Judge.answers = ["gibberish", "more gibberish"]
    r = grade(g, "x")
    assert r.failed and r.score == 0.1 and "unparsable" in r.reason
    dead = G(type="LLMJudge", failureScore="0.2", llmJudge={"endpoint": "http://127.0.0.1:9/v1", "model": "j", "rubric": "r", "maxRetries": 0, "timeoutSeconds": 1})
    assert grade(dead, "x").score == 0.2


# ----------------------------------------------------------------------------- combination, TRL, CLI

SPEC = {
    "graders": [
        {"name": "format", "type": "Regex", "weight": "1", "regex": {"pattern": "<answer>[a-z]+</answer>", "mode": "FullMatch"}},
        {"name": "correct", "type": "StringCheck", "weight": "2", "stringCheck": {"operation": "Equals", "reference": "<answer>{{item.answer}}</answer>"}},
    ],
    "tests": [
        {"name": "right", "completion": "<answer>red</answer>", "item": {"answer": "red"}, "expect": {"min": "3", "max": "3"}},
        {"name": "format-only", "grader": "format", "completion": "<answer>blue</answer>", "item": {"answer": "red"}, "expect": {"min": "1"}},
    ],
}


def test_reward_functions_for_trl():
    spec = RewardSpecSpec.model_validate(SPEC)
    funcs, weights = reward_functions(spec)
    assert [f.__name__ for f in funcs] == ["format", "correct"] and weights == [1.0, 2.0]
    completions = [[{"role": "assistant", "content": "<answer>red</answer>"}], [{"role": "assistant", "content": "<answer>blue</answer>"}], [{"role": "assistant", "content": "red"}]]
    kw = dict(prompts=[[{"role": "user", "content": "q"}]] * 3, completions=completions, completion_ids=[[1]] * 3,
              answer=["red", "red", "red"], trainer_state=None)
    assert funcs[0](**kw) == [1, 1, 0]
    assert funcs[1](**kw) == [1, 0, 0]
    assert [s.total for s in score_all(spec, completions, [{"answer": "red"}] * 3)] == [3, 1, 0]


def test_run_tests_results():
    spec = RewardSpecSpec.model_validate(SPEC)
    assert [r["passed"] for r in run_tests(spec)] == [True, True]
    bad = dict(SPEC, tests=[dict(SPEC["tests"][0], expect={"max": "1"})])
    r = run_tests(RewardSpecSpec.model_validate(bad))[0]
    assert not r["passed"] and "outside" in r["message"]


def _cli(args, tmp_path):
    env = dict(os.environ, PERENNIAL_TERMINATION_LOG=str(tmp_path / "term"))
    return subprocess.run([sys.executable, "-m", "perennial_trainer", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_cli_grade_table_json_and_tests(tmp_path):
    rs = tmp_path / "rs.yaml"
    rs.write_text(yaml.safe_dump({"apiVersion": "perennial.ai/v1alpha1", "kind": "RewardSpec", "metadata": {"name": "x"}, "spec": SPEC}))
    samples = tmp_path / "s.jsonl"
    samples.write_text("\n".join(json.dumps(s) for s in [
        {"completion": "<answer>red</answer>", "item": {"answer": "red"}},
        {"completion": "nope", "answer": "red"},
    ]))
    table = _cli(["grade", "--reward-spec", str(rs), "--samples", str(samples)], tmp_path)
    assert table.returncode == 0, table.stderr
    assert "format" in table.stdout and "3.000" in table.stdout and "mean" in table.stdout
    js = _cli(["grade", "--reward-spec", str(rs), "--samples", str(samples), "--json"], tmp_path)
    lines = [json.loads(l) for l in js.stdout.splitlines()]
    assert [l["total"] for l in lines] == [3, 0] and lines[0]["scores"] == {"format": 1, "correct": 1}

    ok = _cli(["grade", "--reward-spec", str(rs), "--tests"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert [json.loads(l)["passed"] for l in ok.stdout.splitlines()] == [True, True]
    term = json.loads((tmp_path / "term").read_text())
    assert term["status"] == "Succeeded" and len(term["results"]) == 2

    failing = dict(SPEC, tests=SPEC["tests"] + [{"name": "wrong", "completion": "x", "expect": {"min": "1"}}])
    rs.write_text(yaml.safe_dump(failing))
    bad = _cli(["grade", "--reward-spec", str(rs), "--tests"], tmp_path)
    assert bad.returncode == 1
    results = [json.loads(l) for l in bad.stdout.splitlines()]
    assert [r["passed"] for r in results] == [True, True, False]
    term = json.loads((tmp_path / "term").read_text())
    assert term["status"] == "Failed" and term["reason"] == "TestsFailed" and len((tmp_path / "term").read_bytes()) < 4096
