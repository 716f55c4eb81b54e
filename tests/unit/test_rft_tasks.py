"""The RFT benchmark's task family (`perennial_trainer.tasks`, issue 16): right answers, held-out instances that are
new, and RewardSpecs (through the real graders) that score right, wrong and gamed answers as intended.
Not a test of training gains (that is `benchmarks/rft_efficacy.py`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from perennial.api import RewardSpecSpec
from perennial_trainer.graders import check_reward_spec, run_tests, score_all
from perennial_trainer.tasks import (
    DIGIT_WORDS,
    TASKS,
    reward_spec,
    reward_spec_resource,
    splits,
    write_task_data,
)


def expected(task: str, question: str) -> str:
    """The answer, recomputed independently of the task's own code from the question text."""
    s = re.search(r"in ([a-z0-9]+)[ .?,]", question).group(1)
    digits, letters = [c for c in s if c.isdigit()], [c for c in s if c.isalpha()]
    if task == "upper":
        assert len(letters) == 1 and len(digits) >= 3
        return letters[0].upper()
    assert len(digits) == 1 and len(letters) >= 3
    d = int(digits[0])
    if task == "parity":
        return "even" if d % 2 == 0 else "odd"
    if task == "plus-one":
        return str((d + 1) % 10)
    if task == "digit-word":
        return DIGIT_WORDS[d]
    raise AssertionError(task)


@pytest.mark.parametrize("name", list(TASKS))
def test_every_row_carries_the_right_answer(name):
    data = splits(TASKS[name], seed=3)
    for part in ("sft", "grpo", "eval", "warmup"):
        for r in data[part]:
            q = r["prompt"][0]["content"]
            assert r["answer"] == expected(name, q), (part, q)
    for r in data["sft"]:  # the labelled budget is labelled right
        assert r["completion"] == [{"role": "assistant", "content": f"<answer>{r['answer']}</answer>"}]


@pytest.mark.parametrize("name", list(TASKS))
def test_held_out_prompts_are_new_instances_and_budgets_are_as_declared(name):
    task = TASKS[name]
    data = splits(task, seed=1)
    assert len(data["sft"]) == task.labelled and 16 <= task.labelled <= 64
    assert len(data["grpo"]) == 512 and len(data["eval"]) == 64
    held = {r["key"] for r in data["eval"]}
    train = {r["key"] for part in ("sft", "grpo", "warmup") for r in data[part]}
    assert len(held) == 64 and not held & train  # new numbers / strings, not new phrasings of trained ones
    assert {r["key"] for r in data["warmup"]} <= {r["key"] for r in data["grpo"]}
    # every answer class the held-out set asks for also occurs in the unlabelled prompts (a learnable rule)
    assert {r["answer"] for r in data["eval"]} <= {r["answer"] for r in data["grpo"]}


def test_seeds_draw_different_instances_and_a_seed_is_reproducible():
    t = TASKS["plus-one"]
    assert splits(t, seed=0) == splits(t, seed=0)
    assert {r["key"] for r in splits(t, seed=0)["sft"]} != {r["key"] for r in splits(t, seed=1)["sft"]}


@pytest.mark.parametrize("name", list(TASKS))
def test_the_warm_up_teaches_the_format_but_no_labels(name):
    task = TASKS[name]
    rows = splits(task, seed=0)["warmup"]
    answers = [re.fullmatch(r"<answer>(.*)</answer>", r["completion"][0]["content"]).group(1) for r in rows]
    assert all(a in task.answers for a in answers)
    right = sum(a == r["answer"] for a, r in zip(answers, rows))
    assert right < len(rows) * 0.75  # random answers: about 1/len(answers) right, far from all
    assert len(set(answers)) > 1


@pytest.mark.parametrize("name", list(TASKS))
def test_reward_spec_scores_right_wrong_and_gamed_answers(name):
    task = TASKS[name]
    spec = RewardSpecSpec.model_validate(reward_spec(task))
    check_reward_spec(spec)
    results = run_tests(spec)
    assert results and all(r["passed"] for r in results), results
    row = splits(task, seed=0)["eval"][0]
    right = row["answer"]
    wrong = next(a for a in task.answers if a != right)
    samples = {
        "right": f"<answer>{right}</answer>",
        "right, spaced": f"  <answer>{right}</answer>\n",
        "wrong": f"<answer>{wrong}</answer>",
        "bare": right,
        "chatty": f"The answer is <answer>{right}</answer>, I am sure.",
        "repeated closing tags": f"<answer>{right}</answer>" + "</answer>" * 8,
        "repeated blocks": f"<answer>{right}</answer>" * 3,
        "every answer": "".join(f"<answer>{a}</answer>" for a in task.answers),
        "off pattern": f"<answer>{right} {right}</answer>",
        "empty": "",
    }
    got = {k: s.total for k, s in zip(samples, score_all(spec, list(samples.values()), [row] * len(samples)))}
    assert got["right"] == got["right, spaced"] == 2.0
    assert got["wrong"] == 1.0
    assert got["bare"] == got["empty"] == 0.0
    assert 0 < got["chatty"] < 1.0  # one block in other text: partial format credit, not the exact answer
    for gamed in ("repeated closing tags", "repeated blocks", "every answer"):
        assert got[gamed] == 0.0, (gamed, got)  # no more than no answer at all
    assert got["off pattern"] < got["wrong"]


def test_reward_spec_resource_is_a_valid_manifest(tmp_path):
    res = reward_spec_resource(TASKS["parity"])
    assert res["kind"] == "RewardSpec" and res["metadata"]["name"] == "task-parity"
    RewardSpecSpec.model_validate(res["spec"])
    paths = write_task_data(TASKS["parity"], tmp_path, seed=0)
    assert set(paths) == {"sft", "grpo", "eval", "warmup"}
    rows = [json.loads(line) for line in Path(paths["eval"]).read_text().splitlines()]
    assert len(rows) == 64 and rows[0]["prompt"][0]["role"] == "user"
