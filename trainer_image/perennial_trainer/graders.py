"""Graders: one implementation per RewardSpec grader type, usable standalone and as TRL reward functions.

Standalone::

    from perennial_trainer.graders import grade
    grade(grader, "<answer>red</answer>", {"answer": "red"})   # GradeResult(score=1.0, reason=...)

For GRPO, `reward_functions(spec)` returns one function per grader (named after it, so TRL
logs ``rewards/<name>/mean``) plus their weights (TRL's ``reward_weights``); `total` /
`score_all` give the weighted sum. Completions may be strings or chat lists
(``[{"role": "assistant", "content": ...}]``); every dataset column arrives as `item`.

A grader that fails (exception, timeout, memory or CPU limit, unparsable judge answer)
scores its `failureScore` and the reason is logged; it never raises into the trainer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from perennial.api import Grader, RewardSpecSpec

from . import sandbox

log = logging.getLogger("perennial_trainer.graders")

_TEMPLATE = re.compile(r"\{\{\s*(item|sample)\.([A-Za-z0-9_.\-]+)\s*\}\}")
_FENCE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.S)
_JSON_FENCE = re.compile(r"```json[ \t]*\n(.*?)```", re.S)


@dataclass
class GradeResult:
    score: float
    reason: str = ""
    failed: bool = False  # the grader itself failed; `score` is its failureScore


# ------------------------------------------------------------------------- helpers


def completion_text(completion: Any) -> str:
    """Text of a completion: a string, a chat message list, or a message dict."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        if "output_text" in completion:
            return completion_text(completion["output_text"])
        c = completion.get("content", "")
        if isinstance(c, list):  # content parts
            return "".join(p.get("text", "") for p in c if isinstance(p, dict))
        return c or ""
    if isinstance(completion, (list, tuple)):
        msgs = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in msgs if m.get("role") == "assistant"] or msgs
        return "".join(completion_text(m) for m in assistant)
    return str(completion)


def as_sample(sample: Any, prompt: Any = None) -> dict[str, Any]:
    if isinstance(sample, dict) and "output_text" in sample:
        out = dict(sample)
        out["output_text"] = completion_text(sample["output_text"])
        return out
    return {"output_text": completion_text(sample), "prompt": _jsonable(prompt)}


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(obj, dict):
            obj = obj.get(part)
        elif isinstance(obj, (list, tuple)) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return None
    return obj


def render(template: str, item: dict[str, Any], sample: dict[str, Any]) -> str:
    """Substitute `{{item.field}}` / `{{sample.output_text}}` (missing fields render empty)."""

    def sub(m: re.Match) -> str:
        v = _lookup(item if m.group(1) == "item" else sample, m.group(2))
        if v is None:
            return ""
        return v if isinstance(v, str) else json.dumps(v)

    return _TEMPLATE.sub(sub, template)


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        if isinstance(v, dict):
            return {str(k): _jsonable(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [_jsonable(x) for x in v]
        if hasattr(v, "item"):
            try:
                return v.item()
            except Exception:  # noqa: BLE001
                pass
        return str(v)


def _f(d: str | None, default: float = 0.0) -> float:
    return default if d is None else float(d)


# ------------------------------------------------------------------------- per type (one sample)


def _regex(g: Grader, sample: dict, item: dict) -> GradeResult:
    c = g.config()
    flags = (re.I if c.ignore_case else 0) | ((re.M | re.S) if c.multiline else 0)
    fn = {"Search": re.search, "Match": re.match, "FullMatch": re.fullmatch}[c.mode]
    ok = fn(render(c.pattern, item, sample) if "{{" in c.pattern else c.pattern, sample["output_text"], flags) is not None
    return GradeResult(1.0 if ok else 0.0, "matches" if ok else "no match")


def _first_json(text: str) -> Any:
    dec = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                return dec.raw_decode(text, i)[0]
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON value found")


def _json_schema(g: Grader, sample: dict, item: dict) -> GradeResult:
    import jsonschema

    c = g.config()
    text = sample["output_text"]
    try:
        if c.extract == "Whole":
            value = json.loads(text)
        elif c.extract == "FencedBlock":
            m = _JSON_FENCE.search(text)
            if not m:
                return GradeResult(0.0, "no ```json block")
            value = json.loads(m.group(1))
        else:
            value = _first_json(text)
    except ValueError as e:
        return GradeResult(0.0, f"no valid JSON: {e}")
    errors = sorted(jsonschema.Draft202012Validator(c.schema_).iter_errors(value), key=lambda e: list(e.path))
    if errors:
        return GradeResult(_f(c.partial_credit), f"schema violation: {errors[0].message[:200]}")
    return GradeResult(1.0, "valid")


def _string_check(g: Grader, sample: dict, item: dict) -> GradeResult:
    c = g.config()
    out, ref = sample["output_text"], render(c.reference, item, sample)
    if c.strip:
        out, ref = out.strip(), ref.strip()
    if not c.case_sensitive:
        out, ref = out.lower(), ref.lower()
    ok = {
        "Equals": out == ref, "NotEquals": out != ref, "Contains": ref in out, "NotContains": ref not in out,
        "StartsWith": out.startswith(ref), "EndsWith": out.endswith(ref),
    }[c.operation]
    return GradeResult(1.0 if ok else 0.0, f"{c.operation} {ref[:60]!r}: {ok}")


def _similarity(g: Grader, sample: dict, item: dict) -> GradeResult:
    c = g.config()
    out, ref = sample["output_text"], render(c.reference, item, sample)
    if c.metric in ("FuzzyRatio", "TokenSetRatio"):
        from rapidfuzz import fuzz

        sim = (fuzz.ratio if c.metric == "FuzzyRatio" else fuzz.token_set_ratio)(out, ref) / 100.0
    elif c.metric == "RougeL":
        from rouge_score import rouge_scorer

        sim = rouge_scorer.RougeScorer(["rougeL"]).score(ref, out)["rougeL"].fmeasure
    else:
        import sacrebleu

        sim = sacrebleu.sentence_bleu(out, [ref]).score / 100.0
    if c.threshold is not None:
        ok = sim >= float(c.threshold)
        return GradeResult(1.0 if ok else 0.0, f"{c.metric}={sim:.3f} {'>=' if ok else '<'} {c.threshold}")
    return GradeResult(float(sim), f"{c.metric}={sim:.3f}")


def _human_feedback(g: Grader, sample: dict, item: dict) -> GradeResult:
    c = g.config()
    v = _lookup(item, c.field)
    if v is None:
        return GradeResult(_f(c.missing_score), "no rating")
    if isinstance(v, str):
        v = {"up": 1.0, "down": 0.0}.get(v.lower(), v)
    try:
        v = max(0.0, min(1.0, float(v)))
    except (TypeError, ValueError):
        return GradeResult(_f(c.missing_score), f"unreadable rating {v!r}")
    return GradeResult(v, "human rating")


# --------------------------------------------------------------------- batched (sandbox, judge)


def _code_batch(g: Grader, samples: list[dict], items: list[dict]) -> list[GradeResult]:
    c = g.config()
    fp, cp, tp = _f(c.format_points), _f(c.compile_points), _f(c.test_points)
    results: list[GradeResult | None] = [None] * len(samples)
    to_run, idx = [], []
    for i, (s, it) in enumerate(zip(samples, items)):
        text = s["output_text"]
        if c.extract == "FencedBlock":
            m = _FENCE.search(text)
            if not m:
                results[i] = GradeResult(0.0, "no ```python block")
                continue
            code = m.group(1)
        else:
            code = text
            if not code.strip():
                results[i] = GradeResult(0.0, "empty completion")
                continue
        try:
            compile(code, "<completion>", "exec")
        except (SyntaxError, ValueError) as e:
            results[i] = GradeResult(fp, f"formatted; does not compile: {e.__class__.__name__}: {e}"[:300])
            continue
        tests = _lookup(it, c.tests_field) or ""
        if isinstance(tests, list):
            tests = "\n".join(map(str, tests))
        to_run.append({"code": code, "tests": tests})
        idx.append(i)
    if to_run:
        lim = c.limits
        outs = sandbox.run_batch("code", to_run, timeout_s=lim.timeout_seconds, memory_mib=lim.memory_mi_b, cpu_s=lim.cpu_seconds)
        for i, r in zip(idx, outs):
            if r.ok and isinstance(r.value, dict):
                if r.value.get("passed"):
                    results[i] = GradeResult(fp + cp + tp, "formatted, compiles, tests pass")
                elif not r.value.get("compiles"):
                    results[i] = GradeResult(fp, f"formatted; does not compile: {r.value.get('error')}")
                else:
                    results[i] = GradeResult(fp + cp, f"compiles; tests fail: {r.value.get('error')}")
            else:  # the code under test hung, crashed or blew its limits: its tests did not pass
                results[i] = GradeResult(fp + cp, f"compiles; tests did not complete: {r.error}")
    return [r for r in results if r is not None]


def _python_batch(g: Grader, samples: list[dict], items: list[dict]) -> list[GradeResult]:
    c = g.config()
    lim = c.limits
    payload = [{"sample": _jsonable(s), "item": _jsonable(it)} for s, it in zip(samples, items)]
    outs = sandbox.run_batch("grade", payload, source=c.source, timeout_s=lim.timeout_seconds, memory_mib=lim.memory_mi_b, cpu_s=lim.cpu_seconds)
    res = []
    for r in outs:
        if r.ok and isinstance(r.value, (int, float)) and math.isfinite(r.value):
            res.append(GradeResult(float(r.value), "grade()"))
        else:
            res.append(_failure(g, r.error or f"grade() returned {r.value!r}"))
    return res


_SCORE_PATTERNS = [
    re.compile(r"score\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?))?", re.I),
    re.compile(r"(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)"),
    re.compile(r"(-?\d+(?:\.\d+)?)"),
]


def parse_judge_score(text: str, lo: float, hi: float) -> float | None:
    """A score in [lo, hi] from a judge's answer: JSON {"score": x}, 'Score: 7/10', '7/10', or a lone number."""
    text = text.strip()
    try:
        obj = _first_json(text)
        if isinstance(obj, dict):
            for k in ("score", "Score", "rating", "grade"):
                if isinstance(obj.get(k), (int, float)):
                    v = float(obj[k])
                    return v if lo <= v <= hi else None
    except ValueError:
        pass
    for pat in _SCORE_PATTERNS:
        for m in pat.finditer(text):
            v = float(m.group(1))
            denom = m.group(2) if m.lastindex and m.lastindex >= 2 else None
            if denom and float(denom) > 0 and float(denom) != hi:
                v = lo + (v / float(denom)) * (hi - lo)
            if lo <= v <= hi:
                return v
    return None


def _secret_value(ref) -> str | None:
    if ref is None:
        return None
    env_name = re.sub(r"[^A-Za-z0-9]", "_", f"{ref.name}_{ref.key}").upper()
    if os.environ.get(env_name):
        return os.environ[env_name]
    base = Path(os.environ.get("PERENNIAL_SECRETS_DIR", "/var/run/secrets/perennial"))
    for p in (base / ref.name / ref.key, base / ref.key):
        if p.is_file():
            return p.read_text().strip()
    log.warning("API key secret %s/%s not found (env %s or file under %s)", ref.name, ref.key, env_name, base)
    return None


JUDGE_SYSTEM = (
    "You are a strict grader. Score the response against the rubric. "
    "Answer with a JSON object {{\"score\": <number from {lo} to {hi}>, \"reason\": \"...\"}}."
)


def _judge_one(g: Grader, sample: dict, item: dict) -> GradeResult:
    c = g.config()
    url = c.endpoint.rstrip("/") + "/chat/completions"
    rubric = render(c.rubric, item, sample)
    prompt = sample.get("prompt")
    user = f"Rubric:\n{rubric}\n\n"
    if prompt:
        if isinstance(prompt, list):
            prompt = "\n".join(f"{m.get('role', 'user')}: {completion_text(m)}" for m in prompt if isinstance(m, dict))
        user += f"Prompt:\n{prompt}\n\n"
    user += f"Response:\n{sample['output_text']}\n"
    body = json.dumps({
        "model": c.model, "temperature": float(c.temperature), "max_tokens": 256,
        "messages": [{"role": "system", "content": JUDGE_SYSTEM.format(lo=c.min_score, hi=c.max_score)}, {"role": "user", "content": user}],
    }).encode()
    headers = {"Content-Type": "application/json"}
    key = _secret_value(c.api_key_secret_ref)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    last = ""
    for attempt in range(c.max_retries + 1):
        if attempt:
            time.sleep(min(4.0, 0.25 * 2 ** (attempt - 1)))
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=c.timeout_seconds) as resp:
                answer = json.loads(resp.read())["choices"][0]["message"]["content"] or ""
        except urllib.error.HTTPError as e:
            last = f"judge HTTP {e.code}"
            if 400 <= e.code < 500 and e.code not in (408, 429):
                break
            continue
        except Exception as e:  # noqa: BLE001 - timeouts, connection errors, bad JSON
            last = f"judge request failed: {e.__class__.__name__}: {e}"
            continue
        v = parse_judge_score(answer, c.min_score, c.max_score)
        if v is None:
            last = f"unparsable judge answer: {answer[:120]!r}"
            continue
        span = (c.max_score - c.min_score) or 1
        return GradeResult((v - c.min_score) / span, f"judge: {v:g} in [{c.min_score}, {c.max_score}]")
    return _failure(g, last)


def _judge_batch(g: Grader, samples: list[dict], items: list[dict]) -> list[GradeResult]:
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(samples)))) as ex:
        return list(ex.map(lambda a: _judge_one(g, *a), zip(samples, items)))


_SINGLE: dict[str, Callable[[Grader, dict, dict], GradeResult]] = {
    "Regex": _regex, "JSONSchema": _json_schema, "StringCheck": _string_check,
    "Similarity": _similarity, "HumanFeedback": _human_feedback,
}
_BATCH = {"Code": _code_batch, "Python": _python_batch, "LLMJudge": _judge_batch}


def _failure(g: Grader, why: str) -> GradeResult:
    log.warning("grader %r failed, scoring its failureScore %s: %s", g.name, g.failure_score, why)
    return GradeResult(_f(g.failure_score), f"grader failed: {why}"[:500], failed=True)


# ------------------------------------------------------------------------- public API


def grade_batch(g: Grader, samples: Sequence[Any], items: Sequence[dict] | None = None, prompts: Sequence[Any] | None = None) -> list[GradeResult]:
    """Grade several samples with one grader (sandboxed graders share a process)."""
    items = [dict(i) if i else {} for i in (items or [{}] * len(samples))]
    prompts = prompts or [None] * len(samples)
    ss = [as_sample(s, p) for s, p in zip(samples, prompts)]
    try:
        if g.type in _BATCH:
            return _BATCH[g.type](g, ss, items)
        out = []
        for s, it in zip(ss, items):
            try:
                out.append(_SINGLE[g.type](g, s, it))
            except Exception as e:  # noqa: BLE001
                out.append(_failure(g, f"{e.__class__.__name__}: {e}"))
        return out
    except Exception as e:  # noqa: BLE001 - a grader never kills the trainer
        return [_failure(g, f"{e.__class__.__name__}: {e}") for _ in ss]


def grade(g: Grader, sample: Any, item: dict | None = None) -> GradeResult:
    """Grade one sample (a string, chat messages, or {"output_text", "prompt"}) against a dataset item."""
    return grade_batch(g, [sample], [item or {}])[0]


@dataclass
class Scored:
    total: float
    scores: dict[str, float]
    reasons: dict[str, str]


def score_all(spec: RewardSpecSpec, samples: Sequence[Any], items: Sequence[dict] | None = None, prompts: Sequence[Any] | None = None) -> list[Scored]:
    """Every grader on every sample; `total` is the weighted sum."""
    items = list(items or [{}] * len(samples))
    per = {g.name: grade_batch(g, samples, items, prompts) for g in spec.graders}
    out = []
    for i in range(len(samples)):
        scores = {n: r[i].score for n, r in per.items()}
        total = sum(float(g.weight) * scores[g.name] for g in spec.graders)
        out.append(Scored(total, scores, {n: r[i].reason for n, r in per.items()}))
    return out


_ITEM_SKIP = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}


def _items_from_kwargs(n: int, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    cols = {k: v for k, v in kwargs.items() if k not in _ITEM_SKIP and isinstance(v, (list, tuple)) and len(v) == n}
    return [{k: v[i] for k, v in cols.items()} for i in range(n)]


def make_reward_function(g: Grader, on_result: Callable[[str, list[GradeResult]], None] | None = None) -> Callable[..., list[float]]:
    """A TRL reward function for one grader: ``f(prompts=, completions=, **columns) -> list[float]``."""

    def reward(prompts=None, completions=None, **kwargs) -> list[float]:
        completions = list(completions or [])
        items = _items_from_kwargs(len(completions), kwargs)
        results = grade_batch(g, completions, items, list(prompts) if prompts is not None else None)
        if on_result:
            on_result(g.name, results)
        return [r.score for r in results]

    reward.__name__ = g.name
    reward.__qualname__ = g.name
    return reward


def check_reward_spec(spec: RewardSpecSpec, what: str = "rewardSpec") -> None:
    """Fail fast (`InvalidRewardSpec`, a permanent error) on graders that could never score anything:
    a regex that does not compile, Python source that does not compile or defines no `grade`, a JSON
    Schema that is not one."""
    import ast

    from .errors import TrainerError

    for g in spec.graders:
        c = g.config()
        where = f"{what}: grader {g.name!r}"
        if g.type == "Regex" and "{{" not in c.pattern:
            try:
                re.compile(c.pattern)
            except re.error as e:
                raise TrainerError(f"{where}: `regex.pattern` must be a valid regular expression: {e}", "InvalidRewardSpec") from None
        elif g.type == "Python":
            try:
                tree = ast.parse(c.source)
            except SyntaxError as e:
                raise TrainerError(f"{where}: `python.source` must be valid Python: {e.msg} (line {e.lineno})", "InvalidRewardSpec") from None
            if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "grade" for n in tree.body):
                raise TrainerError(f"{where}: `python.source` must define `def grade(sample, item)`", "InvalidRewardSpec")
        elif g.type == "JSONSchema":
            import jsonschema

            try:
                jsonschema.Draft202012Validator.check_schema(c.schema_)
            except jsonschema.SchemaError as e:
                raise TrainerError(f"{where}: `jsonSchema.schema` must be a valid JSON Schema: {e.message}", "InvalidRewardSpec") from None


def reward_functions(spec: RewardSpecSpec, on_result=None) -> tuple[list[Callable[..., list[float]]], list[float]]:
    """(one reward function per grader, their weights) for ``GRPOTrainer(reward_funcs=..., args=GRPOConfig(reward_weights=...))``."""
    return [make_reward_function(g, on_result) for g in spec.graders], [float(g.weight) for g in spec.graders]


def combined_reward_function(spec: RewardSpecSpec) -> Callable[..., list[float]]:
    """One TRL reward function returning the weighted total of every grader."""
    funcs, weights = reward_functions(spec)

    def reward(prompts=None, completions=None, **kwargs) -> list[float]:
        cols = [f(prompts=prompts, completions=completions, **kwargs) for f in funcs]
        return [sum(w * c[i] for w, c in zip(weights, cols)) for i in range(len(completions or []))]

    reward.__name__ = "total"
    return reward


# ------------------------------------------------------------------------- RewardSpec tests


def run_tests(spec: RewardSpecSpec) -> list[dict[str, Any]]:
    """Run the spec's own tests; one result dict (name, passed, score, message) per test."""
    out = []
    for t in spec.tests:
        sample = {"output_text": t.completion, "prompt": t.prompt}
        sc = score_all(spec, [sample], [t.item])[0]
        score = sc.scores[t.grader] if t.grader else sc.total
        lo = float(t.expect.min) if t.expect.min is not None else -math.inf
        hi = float(t.expect.max) if t.expect.max is not None else math.inf
        passed = lo <= score <= hi
        msg = "" if passed else f"score {score:g} outside [{t.expect.min if t.expect.min is not None else '-inf'}, {t.expect.max if t.expect.max is not None else 'inf'}]; " + "; ".join(f"{k}: {v}" for k, v in sc.reasons.items())
        out.append({"name": t.name, "passed": passed, "score": f"{score:g}", "message": msg[:1024], "scores": sc.scores})
    return out
