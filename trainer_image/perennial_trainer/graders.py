"""Graders: one implementation per RewardSpec grader type, usable standalone and as TRL reward functions.

Standalone::

    from perennial_trainer.graders import grade
    grade(grader, "<answer>red</answer>", {"answer": "red"})   # GradeResult(score=1.0, reason=...)

For GRPO, `reward_functions(spec)` returns one function per grader (named after it, so TRL
logs ``rewards/<name>/mean``) plus their weights (TRL's ``reward_weights``); `total` /
`score_all` give the weighted sum. Completions may be strings or chat lists
(``[{"role": "assistant", "content": ...}]``); every dataset column arrives as `item`.

A grader that fails (exception, timeout, memory or CPU limit, unparsable judge answer, a result
that is not a finite number within the grader's declared range, `score_range`) scores its
`failureScore` and the reason is logged; it never raises into the trainer.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
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


def _format(g: Grader, sample: dict, item: dict) -> GradeResult:
    """One `<tag>...</tag>` block (semantics: `FormatGrader` in the API). Credit can be earned once: a second
    opening or closing tag anywhere zeroes it, so repeating tags or blocks never pays."""
    c = g.config()
    text = sample["output_text"].strip()
    open_t, close_t = f"<{c.tag}>", f"</{c.tag}>"
    n_open, n_close = text.count(open_t), text.count(close_t)
    if n_open == 0 and n_close == 0:
        return GradeResult(0.0, f"no {open_t} block")
    if n_open != 1 or n_close != 1:
        return GradeResult(0.0, f"{n_open} {open_t} and {n_close} {close_t}: exactly one block earns credit")
    start, end = text.index(open_t), text.index(close_t)
    if end < start:
        return GradeResult(0.0, f"{close_t} before {open_t}")
    content = text[start + len(open_t):end]
    ok = c.content is None or re.fullmatch(c.content, content) is not None
    block = len(text[start:end + len(close_t)])
    score = 1.0 if block == len(text) else float(c.partial_credit) * block / len(text)
    why = "one block" if block == len(text) else f"one block, {len(text) - block} characters of other text"
    if not ok:
        score, why = score / 2, why + f"; content does not match {c.content!r}"
    return GradeResult(score, why)


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
    sim = min(1.0, max(0.0, float(sim)))  # BLEU/100 of identical texts is 1.0000000000000002
    if c.threshold is not None:
        ok = sim >= float(c.threshold)
        return GradeResult(1.0 if ok else 0.0, f"{c.metric}={sim:.3f} {'>=' if ok else '<'} {c.threshold}")
    return GradeResult(float(sim), f"{c.metric}={sim:.3f}")


def _human_feedback(g: Grader, sample: dict, item: dict) -> GradeResult:
    """A rating is a number in [0, 1] or a thumb ("up" = 1, "down" = 0); anything else (a numeric string,
    a bool, a number outside [0, 1], NaN) is no rating: `missingScore`."""
    c = g.config()
    v = _lookup(item, c.field)
    if v is None:
        return GradeResult(_f(c.missing_score), "no rating")
    if isinstance(v, str) and v.strip().lower() in ("up", "down"):
        return GradeResult(1.0 if v.strip().lower() == "up" else 0.0, f"human rating {v.strip().lower()}")
    if _is_number(v) and 0.0 <= float(v) <= 1.0:
        return GradeResult(float(v), "human rating")
    return GradeResult(_f(c.missing_score), f"unreadable rating {_short(v)}: a rating is a number in [0, 1], \"up\" or \"down\"")


# --------------------------------------------------------------------- batched (sandbox, judge)


def _io_cases(v: Any) -> tuple[list[tuple[str, str]], str]:
    """I/O cases from an item field: a list of {"input", "output"} objects (strings, or lists of lines),
    or {"inputs": [...], "outputs": [...]} (APPS style). ([], why) when the value is not one of those."""

    def text(x: Any) -> str | None:
        if isinstance(x, str):
            return x
        if isinstance(x, list) and all(isinstance(y, str) for y in x):
            return "\n".join(x) + "\n"
        return None

    if v is None:
        return [], ""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return [], "is a string but not JSON"
    if isinstance(v, dict) and isinstance(v.get("inputs"), list) and isinstance(v.get("outputs"), list):
        v = [{"input": a, "output": b} for a, b in zip(v["inputs"], v["outputs"])]
    if not isinstance(v, list):
        return [], "must be a list of {input, output} objects"
    cases = []
    for case in v:
        inp = text(case.get("input", "")) if isinstance(case, dict) else None
        out = text(case.get("output")) if isinstance(case, dict) else None
        if inp is None or out is None:
            return [], "must be a list of {input, output} objects with string (or list of lines) values"
        cases.append((inp, out))
    return cases, ""


def _code_batch(g: Grader, samples: list[dict], items: list[dict]) -> list[GradeResult]:
    """The Code rubric (semantics: `CodeGrader` in the API). Every sample's code is compiled and tested
    in the sandbox, one fresh process per sample and per I/O case; the verdict is decided here."""
    c = g.config()
    fp, cp, tp = _f(c.format_points), _f(c.compile_points), _f(c.test_points)
    lim = sandbox.Limits.from_api(c.limits)
    results: list[GradeResult | None] = [None] * len(samples)
    jobs: list[sandbox.Job] = []
    owners: list[tuple[int, str, str]] = []  # (sample index, "compile" | "asserts" | "io", expected output)
    no_tests: dict[int, str] = {}
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
        asserts = _lookup(it, c.tests_field)
        if isinstance(asserts, list):
            asserts = "\n".join(map(str, asserts))
        asserts = asserts if isinstance(asserts, str) and asserts.strip() else ""
        cases, bad = _io_cases(_lookup(it, c.io_tests_field))
        if not asserts and not cases:
            no_tests[i] = (f"the item's `{c.io_tests_field}` {bad}" if bad else
                           f"the item has no tests (no `{c.tests_field}` or `{c.io_tests_field}` field)")
            jobs.append(sandbox.Job("compile", code))
            owners.append((i, "compile", ""))
            continue
        if asserts:
            jobs.append(sandbox.Job("asserts", code, tests=asserts))
            owners.append((i, "asserts", ""))
        for inp, out in cases:
            jobs.append(sandbox.Job("io", code, stdin=inp, expected=out))  # compared in the trainer
            owners.append((i, "io", out))
    outs = sandbox.run(jobs, lim) if jobs else []
    per: dict[int, list[tuple[str, str, sandbox.Outcome]]] = {}
    for (i, role, expected), o in zip(owners, outs):
        per.setdefault(i, []).append((role, expected, o))
    for i, runs in per.items():
        refused = next((o for _, _, o in runs if o.refused), None)
        if refused:
            results[i] = _failure(g, refused.why())
            continue
        not_compiling = next((o for _, _, o in runs if o.compiled is False), None)
        if not_compiling:
            results[i] = GradeResult(fp, f"formatted; does not compile: {not_compiling.compile_error}"[:300])
            continue
        unknown = next((o for _, _, o in runs if o.compiled is None), None)
        if unknown:  # the sandbox could not even compile it (limits while compiling, supervisor failure)
            results[i] = _failure(g, f"could not compile in the sandbox: {unknown.error or unknown.why(lim.timeout_s)}")
            continue
        if i in no_tests:
            log.warning("grader %r: %s; test points not awarded", g.name, no_tests[i])
            results[i] = GradeResult(fp + cp, f"compiles; {no_tests[i]}: a data error, test points not awarded")
            continue
        crash, failure, n_io, n_io_ok = "", "", 0, 0
        for role, expected, o in runs:
            if role == "asserts":
                if o.passed:
                    continue
                if o.failed == "assertion" and not o.limit and o.signal is None:
                    failure = failure or f"assert failed: {o.error}"
                else:
                    crash = crash or (o.error if o.failed == "error" and o.error and not o.limit else o.why(lim.timeout_s))
            else:
                n_io += 1
                if o.crashed:
                    crash = crash or o.why(lim.timeout_s)
                elif o.matched:
                    n_io_ok += 1
                else:
                    failure = failure or f"I/O case {n_io}: wrong output"
        if crash:
            results[i] = _failure(g, f"tested code crashed or timed out: {crash}")
        elif failure:
            results[i] = GradeResult(fp + cp, f"compiles; tests fail: {failure}" + (f" ({n_io_ok}/{n_io} I/O cases pass)" if n_io else ""))
        else:
            results[i] = GradeResult(fp + cp + tp, "formatted, compiles, tests pass")
    return [r for r in results if r is not None]


def _python_batch(g: Grader, samples: list[dict], items: list[dict]) -> list[GradeResult]:
    """`grade(sample, item)` of the spec's source, one fresh sandboxed process per sample."""
    c = g.config()
    lim = sandbox.Limits.from_api(c.limits)
    jobs = [sandbox.Job("grade", c.source, sample=_jsonable(s), item=_jsonable(it)) for s, it in zip(samples, items)]
    res = []
    for o in sandbox.run(jobs, lim):
        v = o.value
        if not o.refused and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and not o.limit:
            res.append(GradeResult(float(v), "grade()"))
        else:
            res.append(_failure(g, o.refused and o.why() or o.error or (o.why(lim.timeout_s) if o.crashed else f"grade() returned {v!r}, a {type(v).__name__}, not a number")))
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
    "Regex": _regex, "Format": _format, "JSONSchema": _json_schema, "StringCheck": _string_check,
    "Similarity": _similarity, "HumanFeedback": _human_feedback,
}
_BATCH = {"Code": _code_batch, "Python": _python_batch, "LLMJudge": _judge_batch}


def _failure(g: Grader, why: str) -> GradeResult:
    log.warning("grader %r failed, scoring its failureScore %s: %s", g.name, g.failure_score, why)
    score = _f(g.failure_score)
    if not math.isfinite(score):  # the schema bounds it; a spec built without validation must not get inf through
        raise ValueError(f"grader {g.name!r}: `failureScore` {g.failure_score!r} is not a finite number")
    return GradeResult(score, f"grader failed: {why}"[:500], failed=True)


def _is_number(v: Any) -> bool:
    """A real number: int or float (numpy scalars included), never a bool, a string or NaN/inf."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def score_range(g: Grader) -> tuple[float, float]:
    """The declared range of a grader's scores (README "Graders"): [0, 1] for every type but `Code`, whose
    range is [0, formatPoints + compilePoints + testPoints]. `failureScore` may lie outside (a penalty)."""
    if g.type == "Code":
        c = g.config()
        return 0.0, _f(c.format_points) + _f(c.compile_points) + _f(c.test_points)
    return 0.0, 1.0


def _checked(g: Grader, r: Any, lo: float, hi: float) -> GradeResult:
    """Accept `r` only as a GradeResult whose score is a finite number within [lo, hi]; anything else
    scores the grader's failureScore (whatever the implementation, or code it ran, returned)."""
    if not isinstance(r, GradeResult):
        return _failure(g, f"grader returned {type(r).__name__}, not a result")
    if r.failed:
        return r
    v = r.score
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return _failure(g, f"score {_short(v)} is not a number (a {type(v).__name__})")
    v = float(v)
    if not math.isfinite(v):
        return _failure(g, f"score {v} is not finite")
    if not lo <= v <= hi:
        return _failure(g, f"score {v:g} is outside the grader's range [{lo:g}, {hi:g}]")
    return GradeResult(v, r.reason, False)


# ------------------------------------------------------------------------- public API


def grade_batch(g: Grader, samples: Sequence[Any], items: Sequence[dict] | None = None, prompts: Sequence[Any] | None = None) -> list[GradeResult]:
    """Grade several samples with one grader (sandboxed graders: one fresh process per sample)."""
    items = [dict(i) if i else {} for i in (items or [{}] * len(samples))]
    prompts = prompts or [None] * len(samples)
    ss = [as_sample(s, p) for s, p in zip(samples, prompts)]
    try:
        lo, hi = score_range(g)
        if g.type in _BATCH:
            out = list(_BATCH[g.type](g, ss, items))
            if len(out) != len(ss):
                return [_failure(g, f"the grader returned {len(out)} results for {len(ss)} samples") for _ in ss]
        else:
            out = []
            for s, it in zip(ss, items):
                try:
                    out.append(_SINGLE[g.type](g, s, it))
                except Exception as e:  # noqa: BLE001
                    out.append(_failure(g, f"{e.__class__.__name__}: {e}"))
        return [_checked(g, r, lo, hi) for r in out]
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
    """Every grader on every sample; `total` is the weighted sum (finite: the schema bounds weights, points and
    failure scores; a spec that escaped validation raises ValueError rather than return inf or NaN)."""
    items = list(items or [{}] * len(samples))
    per = {g.name: grade_batch(g, samples, items, prompts) for g in spec.graders}
    out = []
    for i in range(len(samples)):
        scores = {n: r[i].score for n, r in per.items()}
        try:
            total = math.fsum(float(g.weight) * scores[g.name] for g in spec.graders)
        except OverflowError:
            total = math.inf
        if not math.isfinite(total):
            raise ValueError(f"the weighted total of {scores} is not finite: weights and scores must be bounded")
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
        elif g.type == "Format" and c.content is not None:
            try:
                re.compile(c.content)
            except re.error as e:
                raise TrainerError(f"{where}: `format.content` must be a valid regular expression: {e}", "InvalidRewardSpec") from None
        elif g.type == "Python":
            try:
                tree = ast.parse(c.source)
            except SyntaxError as e:
                raise TrainerError(f"{where}: `python.source` must be valid Python: {e.msg} (line {e.lineno})", "InvalidRewardSpec") from None
            if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "grade" for n in tree.body):
                raise TrainerError(f"{where}: `python.source` must define `def grade(sample, item)`", "InvalidRewardSpec")
        if g.type in ("Code", "Python") and c.limits.require_landlock and not sandbox.layers().get("landlock"):
            raise TrainerError(f"{where}: `limits.requireLandlock` is set but this kernel does not provide Landlock "
                               "(Linux >= 5.13 with `landlock` in the LSM list); refusing to run untrusted code without it", "InvalidRewardSpec")
        if g.type == "JSONSchema":
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
