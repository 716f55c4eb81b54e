"""A benchmark family of toy tasks with cheap, verifiable rewards where labels are scarce (issue 16).

Each task makes instances from a seed: a question and the one right answer, which a rule computes from the
question (the reward is a verifier, no human label is needed). For every task there are

* a small **labelled budget** (`Task.labelled`, 16-32 rows) for SFT: prompt + the right completion;
* many **unlabelled prompts** for GRPO: the prompt and the `answer` field the RewardSpec's `correct` grader
  checks against (computed by the rule, as a verifier would; the model never sees it);
* **held-out prompts that are new instances** (new strings, never in either training set);
* a **format warm-up** (the task's prompts answered in the right format with random answers: no labels) for
  GRPO without labelled data.

The reward is expressed with Perennial's graders only (`reward_spec`, a RewardSpec a user can apply with
kubectl): `format` (a `Format` grader: one `<answer>` block whose content matches the task's answer pattern;
repetition cannot game it) and `correct` (`StringCheck` Equals `<answer>{{item.answer}}</answer>`): reward 2 for
a right answer, 1 for a wrong one in the right format, 0 otherwise. Exact accuracy is the `correct` grader's mean.

    from perennial_trainer.tasks import TASKS, splits, reward_spec
    data = splits(TASKS["parity"], seed=0)      # {"sft", "grpo", "eval", "warmup"}: lists of rows
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "arithmetic", "string" or "format"
    description: str
    make: Callable[[random.Random], tuple[str, str, str]]  # rng -> (instance key, question, answer)
    answers: tuple[str, ...]  # every possible right answer (the warm-up draws its random answers from these)
    content: str  # the regex the `format` grader requires of the <answer> block's content
    labelled: int  # the labelled budget for SFT
    completion_tokens: int  # the tiny model's tokens for `<answer>...</answer>` and the end of turn, plus 2


# What the answer depends on is ONE character that stands out by its kind (the only digit among letters, the only
# letter among digits), anywhere in a random string: the tiny model, whose weights are random and frozen (LoRA
# trains), learns to find a token by what it is far sooner than by where it is. (Questions about a number's last
# digit, where every other character is a digit too, stayed at chance: issue 16's notes.) Held-out instances are
# new strings; every answer class also occurs among the training prompts.


def _letters(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(string.ascii_lowercase) for _ in range(n)]


def _with_digit(rng: random.Random) -> tuple[str, int]:
    chars = _letters(rng, rng.randint(3, 5))
    d = rng.randrange(10)
    chars.insert(rng.randint(0, len(chars)), str(d))
    return "".join(chars), d


def _parity(rng: random.Random) -> tuple[str, str, str]:
    s, d = _with_digit(rng)
    return s, f"Is the digit in {s} even or odd?", "even" if d % 2 == 0 else "odd"


def _plus_one(rng: random.Random) -> tuple[str, str, str]:
    s, d = _with_digit(rng)
    return s, f"The digit in {s} plus one, mod 10?", str((d + 1) % 10)


def _upper(rng: random.Random) -> tuple[str, str, str]:
    chars = [str(rng.randrange(10)) for _ in range(rng.randint(3, 5))]
    c = rng.choice(string.ascii_lowercase)
    chars.insert(rng.randint(0, len(chars)), c)
    s = "".join(chars)
    return s, f"Capitalise the letter in {s}.", c.upper()


def _digit_word(rng: random.Random) -> tuple[str, str, str]:
    s, d = _with_digit(rng)
    return s, f"Spell the digit in {s}.", DIGIT_WORDS[d]


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("parity", "arithmetic", "Is the one digit in a random string even or odd? <answer>even</answer> or <answer>odd</answer>.",
         _parity, ("even", "odd"), "even|odd", 16, 12),
    Task("plus-one", "arithmetic", "The one digit in a random string plus one, mod 10: <answer>d</answer>.",
         _plus_one, tuple("0123456789"), "[0-9]", 16, 10),
    Task("upper", "string", "The one letter in a random string of digits, upper-cased: <answer>X</answer>.",
         _upper, tuple(string.ascii_uppercase), "[A-Z]", 32, 10),
    Task("digit-word", "format", "The one digit in a random string, spelled as a lowercase word: <answer>seven</answer>.",
         _digit_word, tuple(DIGIT_WORDS), "[a-z]+", 32, 14),
]}


def _prompt(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def _answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": f"<answer>{text}</answer>"}]


def splits(task: Task, seed: int = 0, labelled: int | None = None, unlabelled: int = 512, held_out: int = 64,
           warmup: int = 64) -> dict[str, list[dict[str, Any]]]:
    """The task's datasets for one seed: `sft` (the labelled budget), `grpo` (unlabelled prompts), `eval`
    (held-out prompts: instances in neither training set) and `warmup` (format only, random answers).
    Rows are conversational; `key` names the instance (the number or string asked about)."""
    labelled = task.labelled if labelled is None else labelled
    rng = random.Random(f"{task.name}/{seed}")
    seen: set[str] = set()
    pool: list[tuple[str, str, str]] = []
    need = held_out + labelled + unlabelled
    tries = 0
    while len(pool) < need:
        tries += 1
        if tries > need * 50:
            raise ValueError(f"task {task.name}: cannot draw {need} distinct instances")
        key, q, a = task.make(rng)
        if key not in seen:
            seen.add(key)
            pool.append((key, q, a))
    ev, lab, unl = pool[:held_out], pool[held_out:held_out + labelled], pool[held_out + labelled:]

    def row(k: str, q: str, a: str) -> dict[str, Any]:
        return {"prompt": _prompt(q), "answer": a, "key": k}

    wrng = random.Random(f"{task.name}/{seed}/warmup")
    return {
        "sft": [{**row(*x), "completion": _answer(x[2])} for x in lab],
        "grpo": [row(*x) for x in unl],
        "eval": [row(*x) for x in ev],
        # The format warm-up asks training prompts (never held-out ones) and answers them at random: no labels.
        "warmup": [{**row(k, q, a), "completion": _answer(wrng.choice(task.answers))}
                   for k, q, a in (unl * (warmup // max(1, len(unl)) + 1))[:warmup]],
    }


def reward_spec(task: Task) -> dict[str, Any]:
    """The task's RewardSpec spec (camelCase, as in a manifest): `format` + `correct`, max 2, with tests."""
    right = task.answers[0]
    wrong = task.answers[1]
    block = f"<answer>{right}</answer>"
    return {
        "description": f"{task.description} Reward: 1 for the format, 1 more for the right answer.",
        "graders": [
            {"name": "format", "type": "Format", "format": {"tag": "answer", "content": task.content}},
            {"name": "correct", "type": "StringCheck", "stringCheck": {"operation": "Equals", "reference": "<answer>{{item.answer}}</answer>"}},
        ],
        "tests": [
            {"name": "right", "completion": block, "item": {"answer": right}, "expect": {"min": "2", "max": "2"}},
            {"name": "wrong", "completion": f"<answer>{wrong}</answer>", "item": {"answer": right}, "expect": {"min": "1", "max": "1"}},
            {"name": "unformatted", "completion": right, "item": {"answer": right}, "expect": {"max": "0"}},
            {"name": "repeated-tags", "completion": block + "</answer>" * 6, "item": {"answer": right}, "expect": {"max": "0"}},
            {"name": "repeated-blocks", "completion": block * 3, "item": {"answer": right}, "expect": {"max": "0"}},
            {"name": "off-pattern", "completion": "<answer>I think so</answer>", "item": {"answer": right}, "expect": {"max": "0.5"}},
        ],
    }


def reward_spec_resource(task: Task, name: str | None = None) -> dict[str, Any]:
    """The RewardSpec as a resource for `kubectl apply` (`perennial-trainer grade --tests` reads it too)."""
    return {"apiVersion": "perennial.ai/v1alpha1", "kind": "RewardSpec", "metadata": {"name": name or f"task-{task.name}"},
            "spec": reward_spec(task)}


def write_task_data(task: Task, directory: str | Path, seed: int = 0, **kw: Any) -> dict[str, str]:
    """Write the task's datasets as `<directory>/{sft,grpo,eval,warmup}.jsonl`; returns their paths."""
    from .tinymodel import write_jsonl

    d = Path(directory)
    return {name: write_jsonl(d / f"{name}.jsonl", rows) for name, rows in splits(task, seed, **kw).items()}
