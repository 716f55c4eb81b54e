"""RewardSpec controller: static validation of the rubric, then its `tests` in a sandboxed Job.

observe (cache: the validation Job of this spec content and its pods) → decide
(pure: `Ready` from static checks, `Validated` from the Job) → act (apply the
Job and its ConfigMap).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

from ..api.rewardspec import Grader, RewardSpecSpec, RewardSpecStatus
from ..resources import conditions as cond
from ..resources import rewardspec as build
from ..resources.networkpolicy import EgressSettings
from ..resources.podsecurity import PodSettings, scrub, secret_values
from ..resources.trainingrun import judge_secrets
from .cached_specs import RUBRIC_SPECS
from .base import Context, Controller, Dependency, Outcome, first_error, generation
from . import jobs
from .children import apply_all
from .trainingrun import parse_termination

#: The label a Secret must carry to be used as an LLM-judge key (`llmJudge.apiKeySecretRef`).
JUDGE_KEY_LABEL = "perennial.ai/llm-judge-key"

KIND = "RewardSpec"


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
    if grader.format is not None and grader.format.content is not None:
        try:
            re.compile(grader.format.content)
        except re.error as exc:
            problems.append(f"grader {name!r}: `format.content` does not compile: {exc}")
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


@dataclass
class World:
    """The validation Job of the current spec content and its pods, from the cache."""

    job: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    #: values of the Secret keys the graders reference (judge API keys): never copied into status
    secrets: list[str] = field(default_factory=list)
    #: names of referenced Secrets that exist but do not opt in to being judge keys (`JUDGE_KEY_LABEL`)
    not_allowed: list[str] = field(default_factory=list)


@dataclass
class Decision:
    status: dict[str, Any]
    children: list[dict[str, Any]] = field(default_factory=list)
    requeue_after: float | None = None


def decide(obj: dict[str, Any], world: World, image: str, now: str = "", pods: PodSettings = PodSettings(),
           egress: EgressSettings | None = None) -> Decision:
    """Status and children of a RewardSpec (pure)."""
    gen = generation(obj)
    conds = (obj.get("status") or {}).get("conditions")
    status: dict[str, Any] = {"observedGeneration": gen}
    spec, invalid = RUBRIC_SPECS.parse(obj)  # parsed once while the spec stays the same
    if invalid is not None or spec is None:
        status["conditions"] = cond.set_condition(conds, "Ready", False, "InvalidSpec", first_error(invalid) if invalid else "invalid spec", gen)
        return Decision(status)
    status["graders"] = [{"name": g.name, "value": g.weight} for g in spec.graders]
    problems = spec_problems(spec)
    if problems:
        conds = cond.set_condition(conds, "Ready", False, "InvalidGrader", "; ".join(problems), gen)
        status["conditions"] = cond.set_condition(conds, "Validated", False, "InvalidGrader", "tests do not run while the graders are invalid", gen)
        return Decision(status)
    if world.not_allowed:
        # A RewardSpec names the endpoint its judge key is sent to: without the Secret's opt-in, anyone who may
        # create a RewardSpec could send any Secret of the namespace to an endpoint of their choosing.
        message = (f"Secret(s) {', '.join(repr(n) for n in world.not_allowed)} of `llmJudge.apiKeySecretRef` must be labelled "
                   f"`{JUDGE_KEY_LABEL}: \"true\"` to be sent to a judge endpoint")
        conds = cond.set_condition(conds, "Ready", False, "SecretNotAllowed", message, gen)
        status["conditions"] = cond.set_condition(conds, "Validated", False, "SecretNotAllowed", "tests do not run while a judge key is not allowed", gen)
        return Decision(status)
    conds = cond.set_condition(conds, "Ready", True, "Valid", f"{len(spec.graders)} grader(s) passed static validation", gen)
    if not spec.tests:
        status["conditions"] = cond.set_condition(conds, "Validated", True, "NoTests", "the RewardSpec has no `tests`; add some to check the rubric", gen)
        return Decision(status)
    old = obj.get("status") or {}
    before = cond.get(old.get("conditions"), "Validated") or {}
    if world.job is None and old.get("validatedGeneration") == gen and before.get("reason") in ("TestsPassed", "TestsFailed", "ValidationJobFailed"):
        # These tests ran for this generation and their Job is gone (TTL): the outcome sticks, no second run.
        status["validatedGeneration"] = gen
        if "testResults" in old:
            status["testResults"] = old["testResults"]
        status["conditions"] = cond.set_condition(conds, "Validated", before["status"], before["reason"], before.get("message", ""), gen)
        return Decision(status)
    children = [build.validation_config(obj, spec), build.validation_job(obj, spec, image, pods)]
    if egress is not None:
        # the pods' NetworkPolicy goes first, with the Job, and with every pass while the Job is there (watched: one
        # deleted or edited meanwhile is restored; no write when it matches)
        children.insert(0, build.validation_network_policy(obj, spec, egress))
    job_name = children[1]["metadata"]["name"]
    job_conds = ((world.job or {}).get("status") or {}).get("conditions") or []
    if not (cond.is_true(job_conds, "Complete") or cond.is_true(job_conds, "Failed")):
        status["conditions"] = cond.set_condition(conds, "Validated", "Unknown", "ValidationRunning", f"validation Job {job_name} is running the tests", gen)
        return Decision(status, children)
    if hold := jobs.result_pending(world.job, world.pods, now):
        # finished, but the results (its pod's final state) have not reached us yet: the pod's event wakes us
        status["conditions"] = cond.set_condition(conds, "Validated", "Unknown", "ValidationRunning", f"validation Job {job_name} finished; reading its results", gen)
        return Decision(status, children, requeue_after=hold)
    message = None
    for pod in sorted(world.pods, key=lambda p: p["metadata"].get("creationTimestamp") or ""):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            message = ((cs.get("state") or {}).get("terminated") or {}).get("message") or message
    # What the pod wrote is untrusted (user code ran there): bounded, and scrubbed of every referenced Secret value.
    message = scrub(message, world.secrets) if message else message
    result = parse_termination(message) or {}
    results = result.get("results")
    status["validatedGeneration"] = gen
    if isinstance(results, list):
        status["testResults"] = [
            {"name": scrub(str(r.get("name", "")), world.secrets)[:63], "passed": bool(r.get("passed")),
             "score": scrub(str(r.get("score", "")), world.secrets)[:64], "message": scrub(str(r.get("message", "")), world.secrets)[:1024]}
            for r in results[:64] if isinstance(r, dict)
        ]
        failed = [r["name"] for r in status["testResults"] if not r["passed"]]
        if not failed and cond.is_true(job_conds, "Complete"):
            status["conditions"] = cond.set_condition(conds, "Validated", True, "TestsPassed", f"{len(results)}/{len(results)} tests passed", gen)
        else:
            status["conditions"] = cond.set_condition(conds, "Validated", False, "TestsFailed", str(result.get("message") or f"failed: {', '.join(failed)}")[:1024], gen)
        return Decision(status, children)
    failed_cond = cond.get(job_conds, "Failed") or {}
    message = f"validation Job {job_name} failed without results: {failed_cond.get('reason', '')} {message or ''}".strip()[:1024]
    status["conditions"] = cond.set_condition(conds, "Validated", False, "ValidationJobFailed", message, gen)
    return Decision(status, children)


def observe(obj: dict[str, Any], ctx: Context) -> World:
    spec = RUBRIC_SPECS.get(obj)
    if spec is None:
        return World()
    ns = obj["metadata"]["namespace"]
    not_allowed = []
    for name, _key in judge_secrets(spec):
        secret = ctx.cache.get("v1", "Secret", ns, name)
        if secret is not None and ((secret.get("metadata") or {}).get("labels") or {}).get(JUDGE_KEY_LABEL) != "true":
            not_allowed.append(name)
    if not spec.tests:
        return World(not_allowed=not_allowed)
    _, job_name = build.validation_names(obj["metadata"]["name"], spec)
    job = ctx.cache.get("batch/v1", "Job", obj["metadata"]["namespace"], job_name)
    pods = ctx.cache.owned_by("v1", "Pod", job["metadata"]["uid"]) if job else []
    secrets = [v for name, key in judge_secrets(spec) for v in secret_values(ctx.cache.get("v1", "Secret", ns, name), [key])]
    return World(job, pods, secrets, not_allowed)


async def reconcile(obj: dict[str, Any], ctx: Context) -> Outcome:
    decision = decide(obj, observe(obj, ctx), ctx.config.trainer_image, ctx.now(), ctx.config.pod_settings(), ctx.config.egress_settings())
    notes = await apply_all(ctx, decision.children, reasons={"Job": "ValidationStarted", "ConfigMap": None, "NetworkPolicy": None})
    return Outcome(decision.status, notes, requeue_after=decision.requeue_after)


def dependencies(obj: dict[str, Any]) -> list[Dependency]:
    """The judge-key Secrets: labelling one (or removing its label) decides whether this RewardSpec is Ready."""
    ns = obj["metadata"]["namespace"]
    out: list[Dependency] = []
    for g in (obj.get("spec") or {}).get("graders") or []:
        ref = ((g or {}).get("llmJudge") or {}).get("apiKeySecretRef") or {}
        if ref.get("name"):
            out.append(("v1", "Secret", ns, ref["name"]))
    return out


def gone(ctx: Context, namespace: str, name: str) -> None:
    RUBRIC_SPECS.forget(namespace, name)


CONTROLLER = Controller(KIND, "rewardspecs", RewardSpecStatus, reconcile, dependencies, gone)
