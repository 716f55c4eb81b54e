"""Grading semantics made exact (issue 11, item 3): every score a finite number within its grader's declared
range, weighted sums finite, and the numbers of a RewardSpec bounded so that they stay so.

Before: a Python grader's `True` or `'0.9'` counted as a score, `1e308` x weight summed to `inf`, a
weight of "1e400" was accepted (float("1e400") is inf), a judge with minScore == maxScore divided by a
made-up span, and a numeric-string rating ("0.9") was read as a human rating.
"""

from __future__ import annotations

import math

import pydantic
import pytest

from perennial.api import Grader, RewardSpecSpec
from perennial_trainer import graders
from perennial_trainer.graders import GradeResult, grade, grade_batch, score_all, score_range

FENCED = "```python\ndef add(a, b):\n    return a + b\n```"


def G(**kw) -> Grader:
    kw.setdefault("name", "g")
    return Grader.model_validate(kw)


def py(body: str, **kw) -> Grader:
    return G(type="Python", python={"source": f"def grade(sample, item):\n    return {body}\n"}, **kw)


# ----------------------------------------------------------------------------- declared ranges


@pytest.mark.parametrize("grader, expected", [
    (G(type="Regex", regex={"pattern": "x"}), (0.0, 1.0)),
    (G(type="StringCheck", stringCheck={"operation": "Equals", "reference": "x"}), (0.0, 1.0)),
    (G(type="Similarity", similarity={"reference": "x"}), (0.0, 1.0)),
    (G(type="JSONSchema", jsonSchema={"schema": {}, "partialCredit": "0.25"}), (0.0, 1.0)),
    (G(type="HumanFeedback", humanFeedback={}), (0.0, 1.0)),
    (G(type="LLMJudge", llmJudge={"endpoint": "http://j/v1", "model": "m", "rubric": "r", "minScore": -5, "maxScore": 5}), (0.0, 1.0)),
    (G(type="Python", python={"source": "def grade(s, i): return 1"}), (0.0, 1.0)),
    (G(type="Code", code={}), (0.0, 35.0)),
    (G(type="Code", code={"formatPoints": "1", "compilePoints": "2", "testPoints": "3"}), (0.0, 6.0)),
])
def test_every_grader_type_declares_its_range(grader, expected):
    assert score_range(grader) == expected


# ----------------------------------------------------------------------------- what is not a score


@pytest.mark.parametrize("value, why", [
    ("True", "bool"),
    ("False", "bool"),
    ("'0.9'", "str"),
    ("None", "NoneType"),
    ("[1]", "list"),
    ("float('nan')", "nan"),
    ("float('inf')", "inf"),
    ("1e308", "outside"),
    ("1.5", "outside"),
    ("-0.001", "outside"),
])
def test_a_python_grader_value_that_is_not_a_score_in_range_scores_failure_score(value, why):
    r = grade(py(value, failureScore="-1"), "x")
    assert r.failed and r.score == -1, r
    assert why in r.reason, r.reason


def test_a_python_grader_in_range_scores_what_it_returns():
    assert grade(py("0.25"), "x").score == 0.25
    assert grade(py("1"), "x").score == 1  # an int is a number
    assert grade(py("0"), "x").score == 0


def test_the_shared_check_covers_every_grader_path(monkeypatch):
    """The range check is applied in `grade_batch` to whatever a grader implementation returns."""
    g = G(type="Regex", failureScore="0.5", regex={"pattern": "x"})
    for bad in (True, "0.9", math.inf, -math.inf, math.nan, 2.0, -0.5, None):
        monkeypatch.setitem(graders._SINGLE, "Regex", lambda g, s, it, bad=bad: GradeResult(bad, "forged"))
        r = grade(g, "x")
        assert r.failed and r.score == 0.5 and "forged" not in r.reason, (bad, r)
        assert isinstance(r.score, float)
    monkeypatch.setitem(graders._SINGLE, "Regex", lambda g, s, it: GradeResult(1, "int"))
    r = grade(g, "x")
    assert r.score == 1.0 and type(r.score) is float and not r.failed


def test_a_batch_grader_returning_the_wrong_number_of_results_fails_every_sample(monkeypatch):
    g = G(type="Python", failureScore="0", python={"source": "def grade(s, i): return 1"})
    monkeypatch.setitem(graders._BATCH, "Python", lambda g, ss, its: [GradeResult(1.0, "one")])
    out = grade_batch(g, ["a", "b", "c"])
    assert [r.failed for r in out] == [True, True, True] and [r.score for r in out] == [0, 0, 0]


def test_code_grader_scores_stay_within_its_points():
    g = G(type="Code", code={"formatPoints": "5", "compilePoints": "10", "testPoints": "20"})
    honest = [
        ("def add(a, b): return a + b", 0),                     # no fenced block: no format points
        ("```python\ndef add(a, b)\n    return a + b\n```", 5),  # formatted, does not compile
        ("```python\ndef add(a, b):\n    return a - b\n```", 15),  # compiles, tests fail
        (FENCED, 35),                                            # tests pass
    ]
    for text, expected in honest:
        r = grade(g, text, {"tests": "assert add(2, 3) == 5"})
        assert r.score == expected, (text, r)


# ----------------------------------------------------------------------------- human ratings


@pytest.mark.parametrize("rating, score, failed", [
    (1, 1.0, False), (0.25, 0.25, False), ("up", 1.0, False), ("Down", 0.0, False), (0, 0.0, False),
    ("0.9", 0.5, True), (True, 0.5, True), (float("nan"), 0.5, True), (7, 0.5, True), (-1, 0.5, True),
    ("excellent", 0.5, True), ([1], 0.5, True),
])
def test_human_feedback_reads_numbers_and_thumbs_only(rating, score, failed):
    r = grade(G(type="HumanFeedback", humanFeedback={"missingScore": "0.5"}), "x", {"feedback_score": rating})
    assert r.score == score, (rating, r)
    assert ("unreadable rating" in r.reason) == failed, r.reason


def test_a_missing_rating_scores_missing_score():
    r = grade(G(type="HumanFeedback", humanFeedback={"missingScore": "0.5"}), "x", {})
    assert r.score == 0.5 and r.reason == "no rating"


# ----------------------------------------------------------------------------- bounded numbers, finite sums


@pytest.mark.parametrize("field, value", [
    ("weight", "1e400"), ("weight", "1e308"), ("weight", "1000001"), ("weight", "-1e7"),
    ("failureScore", "1e400"), ("failureScore", "-1e308"),
])
def test_weights_and_failure_scores_are_bounded(field, value):
    with pytest.raises(pydantic.ValidationError) as err:
        G(type="Regex", regex={"pattern": "x"}, **{field: value})
    assert "must be between -1000000 and 1000000" in str(err.value)


@pytest.mark.parametrize("kw, message", [
    ({"type": "Code", "code": {"testPoints": "1e400"}}, "must be between 0 and 1000000"),
    ({"type": "Code", "code": {"formatPoints": "-5"}}, "must be between 0 and 1000000"),
    ({"type": "JSONSchema", "jsonSchema": {"schema": {}, "partialCredit": "2"}}, "must be between 0 and 1"),
    ({"type": "HumanFeedback", "humanFeedback": {"missingScore": "-0.5"}}, "must be between 0 and 1"),
    ({"type": "Similarity", "similarity": {"reference": "x", "threshold": "1.5"}}, "must be between 0 and 1"),
])
def test_points_and_unit_values_are_bounded(kw, message):
    with pytest.raises(pydantic.ValidationError) as err:
        G(**kw)
    assert message in str(err.value)


def test_weighted_sums_stay_finite_at_the_bounds():
    spec = RewardSpecSpec.model_validate({"graders": [
        {"name": f"c{i}", "type": "Code", "weight": "1000000", "failureScore": "-1000000",
         "code": {"formatPoints": "1000000", "compilePoints": "1000000", "testPoints": "1000000"}}
        for i in range(32)]})
    sc = score_all(spec, [FENCED], [{"tests": "assert add(1, 1) == 2"}])[0]
    assert math.isfinite(sc.total) and sc.total == 32 * 1e6 * 3e6


def test_the_weighted_total_never_leaves_the_finite_numbers():
    """Even a spec built without validation (model_construct) cannot make score_all return inf or nan."""
    g = Grader.model_construct(name="big", type="Python", weight="1e308", failure_score="1e308",
                               python=G(type="Python", python={"source": "def grade(s, i): return 1"}).python)
    spec = RewardSpecSpec.model_construct(graders=[g, g.model_copy(update={"name": "big2"})], tests=[])
    with pytest.raises(ValueError, match="finite"):
        score_all(spec, ["x"])


def test_llm_judge_needs_min_below_max():
    with pytest.raises(pydantic.ValidationError) as err:
        G(type="LLMJudge", llmJudge={"endpoint": "http://j/v1", "model": "m", "rubric": "r", "minScore": 3, "maxScore": 3})
    assert "`minScore` must be less than `maxScore`" in str(err.value)
