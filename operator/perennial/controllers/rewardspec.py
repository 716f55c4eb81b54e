"""RewardSpec controller: static validation of the rubric (the test Job comes with the TrainingRun controller)."""

from __future__ import annotations

import ast
import logging
import re
from typing import Any

import kopf
import pydantic

from ..api.rewardspec import Grader, RewardSpecSpec
from ..resources import conditions as cond
from ..resources import rewardspec as build
from .base import (
    RESYNC_SECONDS,
    Context,
    first_error,
    generation,
    register,
    write_status,
)
from .trainingrun import parse_termination

KIND = "RewardSpec"
PLURAL = "rewardspecs"


def _python_problems(name: str, source: str) -> list[str]:
    try:
        tree = ast.parse(source, filename=f"<grader {name}>")
    except SyntaxError as exc:
        return [f"grader {name!r}: Python source does not parse: {exc.msg} (line {exc.lineno})"]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "grade":
            params = node.args.posonlyargs + node.args.args
            if len(params) < 2 and node.args.vararg is None:
                return [f"grader {name!r}: `grade` must accept two arguments, `(sample, item)`"]
            if isinstance(node, ast.AsyncFunctionDef):
                return [f"grader {name!r}: `grade` must be a plain function, not `async def`"]
            return []
    return [f"grader {name!r}: Python source must define `def grade(sample, item)`"]


def grader_problems(grader: Grader) -> list[str]:
    """Static checks of one grader (pure)."""
    problems: list[str] = []
    name = grader.name
    if grader.regex is not None:
        flags = (re.IGNORECASE if grader.regex.ignore_case else 0) | (re.MULTILINE | re.DOTALL if grader.regex.multiline else 0)
        try:
            re.compile(grader.regex.pattern, flags)
        except re.error as exc:
            problems.append(f"grader {name!r}: `regex.pattern` does not compile: {exc}")
    if grader.json_schema is not None:
        try:
            import jsonschema

            jsonschema.validators.validator_for(grader.json_schema.schema_).check_schema(grader.json_schema.schema_)
        except jsonschema.SchemaError as exc:
            problems.append(f"grader {name!r}: `jsonSchema.schema` is not a valid JSON Schema: {exc.message}")
    if grader.python is not None:
        problems += _python_problems(name, grader.python.source)
    if grader.llm_judge is not None and grader.llm_judge.min_score >= grader.llm_judge.max_score:
        problems.append(f"grader {name!r}: `llmJudge.minScore` must be less than `maxScore`")
    if grader.code is not None and float(grader.code.format_points) + float(grader.code.compile_points) + float(grader.code.test_points) <= 0:
        problems.append(f"grader {name!r}: the points of `code` must add up to more than 0")
    return problems


def spec_problems(spec: RewardSpecSpec) -> list[str]:
    """Everything statically wrong with a RewardSpec (pure)."""
    problems: list[str] = []
    for grader in spec.graders:
        problems += grader_problems(grader)
    weights = [float(g.weight) for g in spec.graders]
    if all(w == 0 for w in weights):
        problems.append("`graders[].weight` must not all be 0")
    for test in spec.tests:
        lo, hi = test.expect.min, test.expect.max
        if lo is None and hi is None:
            problems.append(f"test {test.name!r}: `expect` must set `min` or `max`")
        elif lo is not None and hi is not None and float(lo) > float(hi):
            problems.append(f"test {test.name!r}: `expect.min` must not exceed `expect.max`")
    return problems


async def reconcile(body: Any, ctx: Context, logger: logging.Logger) -> None:
    status = dict(body.get("status") or {})
    gen = generation(body)
    status["observedGeneration"] = gen
    try:
        spec = RewardSpecSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError as exc:
        status["conditions"] = cond.set_condition(status.get("conditions"), "Ready", False, "InvalidSpec", first_error(exc), gen)
        await write_status(ctx, body, status, logger)
        return
    problems = spec_problems(spec)
    status["graders"] = [{"name": g.name, "value": g.weight} for g in spec.graders]
    conds = status.get("conditions")
    if problems:
        conds = cond.set_condition(conds, "Ready", False, "InvalidGrader", "; ".join(problems), gen)
        conds = cond.set_condition(conds, "Validated", False, "InvalidGrader", "tests do not run while the graders are invalid", gen)
    else:
        conds = cond.set_condition(conds, "Ready", True, "Valid", f"{len(spec.graders)} grader(s) passed static validation", gen)
        conds = await validate_tests(body, spec, ctx, status, conds, gen, logger)
    status["conditions"] = conds
    await write_status(ctx, body, status, logger)


async def validate_tests(body: Any, spec: RewardSpecSpec, ctx: Context, status: dict[str, Any], conds: Any, gen: int | None, logger: logging.Logger) -> Any:
    """Run the spec's tests in a sandboxed Job (once per spec content) and report `Validated`."""
    if not spec.tests:
        status.pop("testResults", None)
        status.pop("validatedGeneration", None)
        return cond.set_condition(conds, "Validated", True, "NoTests", "the RewardSpec has no `tests`; add some to check the rubric", gen)
    ns = body["metadata"]["namespace"]
    cm = build.validation_config(body, spec)
    job = build.validation_job(body, spec, ctx.config.trainer_image)
    await ctx.kube.aapply(cm)
    job_obj, action = await ctx.kube.aapply(job)
    job_name = job["metadata"]["name"]
    if action == "created":
        logger.info("Created Job, name=%s, namespace=%s", job_name, ns)
        kopf.event(body, type="Normal", reason="ValidationStarted", message=f"Created validation Job {job_name} for {len(spec.tests)} test(s)")
    job_conds = (job_obj.get("status") or {}).get("conditions") or []
    if not (cond.is_true(job_conds, "Complete") or cond.is_true(job_conds, "Failed")):
        return cond.set_condition(conds, "Validated", "Unknown", "ValidationRunning", f"validation Job {job_name} is running the tests", gen)
    pods = await ctx.kube.alist("v1", "Pod", ns, f"job-name={job_name}")
    message = None
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or ""):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            message = ((cs.get("state") or {}).get("terminated") or {}).get("message") or message
    result = parse_termination(message) or {}
    results = result.get("results")
    status["validatedGeneration"] = gen
    if isinstance(results, list):
        status["testResults"] = [
            {"name": str(r.get("name", ""))[:63], "passed": bool(r.get("passed")), "score": str(r.get("score", ""))[:64], "message": str(r.get("message", ""))[:1024]}
            for r in results[:64]
        ]
        failed = [r["name"] for r in status["testResults"] if not r["passed"]]
        if not failed and cond.is_true(job_conds, "Complete"):
            return cond.set_condition(conds, "Validated", True, "TestsPassed", f"{len(results)}/{len(results)} tests passed", gen)
        return cond.set_condition(conds, "Validated", False, "TestsFailed", str(result.get("message") or f"failed: {', '.join(failed)}")[:1024], gen)
    failed_cond = cond.get(job_conds, "Failed") or {}
    return cond.set_condition(conds, "Validated", False, "ValidationJobFailed", f"validation Job {job_name} failed without results: {failed_cond.get('reason', '')} {message or ''}".strip()[:1024], gen)


register(KIND, PLURAL, reconcile, interval=RESYNC_SECONDS)
