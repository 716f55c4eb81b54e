"""The `Format` grader: partial credit for the answer format that repetition and padding cannot game.

Early GRPO experiments gamed a partial-credit format reward with `</answer></answer>…` (credit per tag found).
These tests run the real grader code path (RewardSpec -> score_all / run_tests / TRL reward functions).
"""

from __future__ import annotations

import pydantic
import pytest
from perennial.api import RewardSpecSpec
from perennial_trainer.errors import TrainerError
from perennial_trainer.graders import (
    check_reward_spec,
    grade,
    reward_functions,
    run_tests,
    score_all,
)

SPEC = RewardSpecSpec.model_validate({
    "graders": [
        {"name": "format", "type": "Format", "format": {"tag": "answer", "content": "[a-z]+", "partialCredit": "0.5"}},
        {"name": "correct", "type": "StringCheck", "stringCheck": {"operation": "Equals", "reference": "<answer>{{item.answer}}</answer>"}},
    ],
})
ITEM = {"answer": "red"}

HONEST = "<answer>red</answer>"
NO_ANSWER = "red"
GAMED = [
    "<answer>red</answer></answer></answer></answer>",
    "</answer></answer></answer></answer></answer>",
    "<answer>red</answer><answer>red</answer><answer>red</answer>",
    "<answer><answer><answer>red</answer>",
    "<answer>red</answer>" + "</answer>" * 50,
    "<answer>red<answer>red</answer></answer>",
    "<answer>red</answer><answer>blue</answer><answer>green</answer>",
]


def total(text: str, item: dict | None = None) -> float:
    return score_all(SPEC, [text], [item or ITEM])[0].total


def fmt(text: str) -> float:
    return score_all(SPEC, [text], [ITEM])[0].scores["format"]


@pytest.mark.parametrize("gamed", GAMED)
def test_repeated_tags_pay_less_than_honest_and_no_more_than_no_answer(gamed):
    assert total(gamed) < total(HONEST)
    assert total(gamed) <= total(NO_ANSWER)
    assert fmt(gamed) <= fmt(NO_ANSWER) == 0.0


def test_partial_credit_for_one_block_shrinks_with_padding():
    assert fmt(HONEST) == 1.0
    assert fmt("  <answer>red</answer>\n") == 1.0  # surrounding whitespace is not text
    short = fmt("It is <answer>red</answer>")
    padded = fmt("It is " + "very " * 40 + "clearly <answer>red</answer>")
    assert 0 < padded < short < 0.5  # one well-formed block in other text: partial, less the more text around it
    wrong_content = fmt("<answer>Red!</answer>")
    assert 0 < wrong_content < fmt(HONEST)  # the block is right, its content is not what the pattern asks
    assert fmt("<answer>red") == fmt("red</answer>") == fmt("") == 0.0


def test_trl_reward_function_and_spec_tests_agree():
    funcs, _ = reward_functions(SPEC)
    rewards = funcs[0](prompts=["q"] * 3, completions=[[{"role": "assistant", "content": c}] for c in (HONEST, GAMED[0], NO_ANSWER)])
    assert rewards == [1.0, 0.0, 0.0]
    spec = RewardSpecSpec.model_validate({
        **SPEC.model_dump(by_alias=True, exclude_none=True),
        "tests": [
            {"name": "honest", "completion": HONEST, "item": ITEM, "expect": {"min": "2", "max": "2"}},
            {"name": "repeated-closing-tags", "completion": GAMED[0], "item": ITEM, "expect": {"max": "0"}},
            {"name": "repeated-blocks", "completion": GAMED[2], "item": ITEM, "expect": {"max": "0"}},
        ],
    })
    assert [r["passed"] for r in run_tests(spec)] == [True, True, True]


def test_tag_and_content_are_checked():
    with pytest.raises(pydantic.ValidationError, match="tag"):
        RewardSpecSpec.model_validate({"graders": [{"name": "f", "type": "Format", "format": {"tag": "an swer"}}]})
    bad = RewardSpecSpec.model_validate({"graders": [{"name": "f", "type": "Format", "format": {"tag": "answer", "content": "[a-"}}]})
    with pytest.raises(TrainerError, match="content"):
        check_reward_spec(bad)
    any_content = RewardSpecSpec.model_validate({"graders": [{"name": "f", "type": "Format", "format": {"tag": "json"}}]}).graders[0]
    assert grade(any_content, "<json>{\"a\": 1}</json>").score == 1.0
