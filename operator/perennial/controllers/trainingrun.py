"""TrainingRun controller: resolve references, run the trainer Job, report progress, create the Adapter.

Status is rebuilt from the world on every pass (Job, Pod, pod log, Adapters);
the only thing taken from the previous status is a terminal outcome, as a Job
keeps its own once finished (the Job itself is deleted by its TTL later).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import kopf
import pydantic

from ..api.common import now_rfc3339
from ..api.rewardspec import RewardSpecSpec
from ..api.trainingrun import TrainingRunSpec
from ..config import OperatorConfig
from ..kube import ApiError
from ..metrics import QUEUE_SECONDS, TRAINING_RUNS, TRAINING_SECONDS
from ..resources import conditions as cond
from ..resources import trainingrun as build
from .base import API_VERSION, Context, first_error, generation, register, write_status

KIND = "TrainingRun"
PLURAL = "trainingruns"
PROGRESS_PREFIX = "PERENNIAL_PROGRESS "
PROGRESS_SECONDS = OperatorConfig().progress_seconds
_CAMEL = re.compile(r"^[A-Z][A-Za-z0-9]*$")
_POD_WAITING_PROBLEMS = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError", "CrashLoopBackOff"}


class Blocked(Exception):
    """A reference is missing or not ready: wait (Succeeded=Unknown) and retry."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class Impossible(Exception):
    """The spec cannot work: fail fast (Succeeded=False)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


# ----------------------------------------------------------------------------- pure helpers


def parse_progress(log_text: str) -> dict[str, Any] | None:
    """The last trainer progress line of a log, as a dict."""
    for line in reversed(log_text.splitlines()):
        idx = line.find(PROGRESS_PREFIX)
        if idx < 0:
            continue
        try:
            value = json.loads(line[idx + len(PROGRESS_PREFIX):])
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _fmt(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return f"{value:.4g}"


def progress_status(line: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    step = int(line.get("step") or 0)
    total = int(line.get("totalSteps") or 0)
    out: dict[str, Any] = {"step": step, "totalSteps": total, "percent": min(100, int(100 * step / total)) if total else 0}
    if isinstance(line.get("etaSeconds"), (int, float)):
        out["etaSeconds"] = max(0, int(line["etaSeconds"]))
    for key, src in (("loss", "loss"), ("meanReward", "meanReward"), ("fracRewardZeroStd", "fracRewardZeroStd")):
        if (v := _fmt(line.get(src))) is not None:
            out[key] = v
    same = previous and previous.get("step") == step and previous.get("updatedAt")
    out["updatedAt"] = previous["updatedAt"] if same else now_rfc3339()
    return out


def parse_termination(message: str | None) -> dict[str, Any] | None:
    if not message:
        return None
    try:
        value = json.loads(message)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def metrics_list(metrics: dict[str, Any] | None) -> list[dict[str, str]]:
    out = []
    for name, value in sorted((metrics or {}).items()):
        if (v := _fmt(value)) is not None:
            out.append({"name": str(name)[:128], "value": v})
    return out[:64]


@dataclass
class Observed:
    job: dict[str, Any] | None
    pod: dict[str, Any] | None

    def container(self) -> dict[str, Any]:
        statuses = ((self.pod or {}).get("status") or {}).get("containerStatuses") or []
        return statuses[0] if statuses else {}

    def terminated(self) -> dict[str, Any]:
        c = self.container()
        return (c.get("state") or {}).get("terminated") or (c.get("lastState") or {}).get("terminated") or {}


def failure(observed: Observed) -> tuple[str, str]:
    """Why a failed Job failed: the trainer's own word first, then the kubelet's, then the Job's."""
    term = observed.terminated()
    result = parse_termination(term.get("message"))
    job_cond = cond.get(((observed.job or {}).get("status") or {}).get("conditions"), "Failed") or {}
    if result and result.get("status") == "Failed":
        reason = str(result.get("reason") or "TrainerFailed")
        return (reason if _CAMEL.match(reason) else "TrainerFailed"), str(result.get("message") or "the trainer failed")
    if term.get("reason") == "OOMKilled":
        return "OOMKilled", "the trainer was killed for exceeding its memory limit (raise `resources.memory` or lower the batch size)"
    if job_cond.get("reason") == "DeadlineExceeded":
        return "DeadlineExceeded", f"the run exceeded `runPolicy.activeDeadlineSeconds`: {job_cond.get('message', '')}".strip()
    if job_cond.get("reason") == "BackoffLimitExceeded":
        detail = f"; last exit code {term['exitCode']}" if "exitCode" in term else ""
        tail = (term.get("message") or "").strip().splitlines()[-1:] if term.get("message") else []
        return "BackoffLimitExceeded", f"the trainer failed more than `runPolicy.backoffLimit` times{detail}{': ' + tail[0] if tail else ''}"
    return str(job_cond.get("reason") or "JobFailed"), str(job_cond.get("message") or "the training Job failed")


def phase_of(conditions: list[dict[str, Any]]) -> str:
    succeeded = cond.get(conditions, "Succeeded") or {}
    if succeeded.get("status") == "True":
        return "Succeeded"
    if succeeded.get("status") == "False":
        return "Failed"
    if cond.is_true(conditions, "Waiting"):
        return "Waiting"
    if cond.is_true(conditions, "Started"):
        return "Running"
    return "Pending"


# ----------------------------------------------------------------------------- references


async def _ready_ref(ctx: Context, ns: str, kind: str, name: str, what: str) -> dict[str, Any]:
    obj = await ctx.kube.aget(API_VERSION, kind, ns, name)
    if obj is None:
        raise Blocked(f"{kind}NotFound", f"{what} {kind} {name!r} does not exist yet; the run starts when it does")
    if not cond.is_true((obj.get("status") or {}).get("conditions"), "Ready"):
        ready = cond.get((obj.get("status") or {}).get("conditions"), "Ready") or {}
        raise Blocked(f"{kind}NotReady", f"{what} {kind} {name!r} is not Ready: {ready.get('reason', 'not reconciled yet')} {ready.get('message', '')}".strip())
    return obj


async def resolve(ctx: Context, body: dict[str, Any], spec: TrainingRunSpec) -> tuple[dict[str, Any], list[str]]:
    """The run config and the credential Secrets the trainer needs, or Blocked / Impossible."""
    ns = body["metadata"]["namespace"]
    base = await _ready_ref(ctx, ns, "BaseModel", spec.base_model_ref.name, "base model")
    reward_spec = eval_spec = None
    if spec.method == "GRPO" and spec.reward_spec_ref is None:
        raise Impossible("RewardSpecRequired", "`rewardSpecRef` is required when `method` is 'GRPO'")
    if spec.reward_spec_ref:
        rs = await _ready_ref(ctx, ns, "RewardSpec", spec.reward_spec_ref.name, "reward spec")
        reward_spec = RewardSpecSpec.model_validate(rs["spec"])
    if spec.evaluation.reward_spec_ref:
        rs = await _ready_ref(ctx, ns, "RewardSpec", spec.evaluation.reward_spec_ref.name, "evaluation reward spec")
        eval_spec = RewardSpecSpec.model_validate(rs["spec"])
    parent_uri = None
    if spec.parent_adapter_ref:
        parent = await ctx.kube.aget(API_VERSION, "Adapter", ns, spec.parent_adapter_ref.name)
        if parent is None:
            raise Blocked("AdapterNotFound", f"parent Adapter {spec.parent_adapter_ref.name!r} does not exist yet")
        parent_base = parent["spec"]["baseModelRef"]["name"]
        if parent_base != spec.base_model_ref.name:
            raise Impossible(
                "ParentAdapterMismatch",
                f"parent Adapter {spec.parent_adapter_ref.name!r} is of BaseModel {parent_base!r}, not {spec.base_model_ref.name!r}",
            )
        parent_uri = parent["spec"]["artifactUri"]
    feedback_store = None
    for d in spec.datasets:
        if d.feedback and not d.feedback.store_uri:
            dep = await ctx.kube.aget(API_VERSION, "Deployment", ns, d.feedback.deployment_ref.name)
            feedback_store = ((dep or {}).get("spec") or {}).get("feedback", {}).get("storeUri") or ctx.config.feedback_store_uri
    config = build.run_config(
        body,
        spec,
        base_model_uri=(base.get("status") or {}).get("resolvedUri") or base["spec"]["source"]["uri"],
        output=build.output_uri(spec, ctx.config.artifact_uri, ns, body["metadata"]["name"]),
        parent_adapter_uri=parent_uri,
        reward_spec=reward_spec,
        eval_reward_spec=eval_spec,
        feedback_store_uri=feedback_store,
    )
    credentials = [base["spec"]["source"].get("credentialsSecretRef", {}).get("name")]
    credentials.append(spec.output.credentials_secret_ref.name if spec.output.credentials_secret_ref else None)
    return config, [c for c in credentials if c]


# ----------------------------------------------------------------------------- the Adapter


async def ensure_adapter(ctx: Context, body: dict[str, Any], spec: TrainingRunSpec, result: dict[str, Any], logger: logging.Logger, known: str | None = None) -> str:
    """Create (once) the Adapter of a successful run; returns its name. `known`: the name status already links."""
    meta = body["metadata"]
    ns = meta["namespace"]
    if known:  # the common case on every later pass: one GET, no list of the family
        linked = await ctx.kube.aget(API_VERSION, "Adapter", ns, known)
        if linked is not None and (linked["spec"].get("lineage") or {}).get("trainingRunUid") == meta["uid"]:
            await _adapter_metrics(ctx, linked, result)
            return known
    family = spec.output.adapter_family
    existing = await ctx.kube.alist(API_VERSION, "Adapter", ns, f"perennial.ai/adapter-family={family}")
    for a in existing:
        if (a["spec"].get("lineage") or {}).get("trainingRunUid") == meta["uid"]:
            await _adapter_metrics(ctx, a, result)
            return a["metadata"]["name"]
    version = max([a["spec"].get("version", 0) for a in existing] + [0]) + 1
    artifact = str(result.get("artifactUri") or build.output_uri(spec, ctx.config.artifact_uri, ns, meta["name"]))
    for _ in range(10):
        manifest = build.adapter(body, spec, version=version, artifact_uri=artifact, lineage=result.get("lineage"))
        try:
            created = await ctx.kube.acreate(manifest)
        except ApiError as exc:
            if exc.status == 409:  # another run took this version: take the next one
                version += 1
                continue
            raise
        logger.info("Created Adapter, name=%s, namespace=%s", manifest["metadata"]["name"], ns)
        kopf.event(body, type="Normal", reason="AdapterCreated", message=f"Created Adapter {manifest['metadata']['name']}")
        await _adapter_metrics(ctx, created, result)
        return manifest["metadata"]["name"]
    raise kopf.TemporaryError("could not claim an adapter version", delay=5)


async def _adapter_metrics(ctx: Context, adapter: dict[str, Any], result: dict[str, Any]) -> None:
    metrics = result.get("metrics") or {}
    status: dict[str, Any] = {"metrics": metrics_list(metrics)}
    if (v := _fmt(metrics.get("eval/mean_reward"))) is not None:
        status["meanReward"] = v
    if (v := _fmt(metrics.get("eval/improvement"))) is not None:
        status["improvement"] = v
    current = adapter.get("status") or {}
    if any(current.get(k) != v for k, v in status.items()):
        await ctx.kube.apatch_status(API_VERSION, "Adapter", adapter["metadata"]["namespace"], adapter["metadata"]["name"], status)


# ----------------------------------------------------------------------------- reconcile


async def observe(ctx: Context, ns: str, job_name: str) -> Observed:
    job = await ctx.kube.aget("batch/v1", "Job", ns, job_name)
    pod = None
    if job is not None:
        pods = await ctx.kube.alist("v1", "Pod", ns, f"job-name={job_name}")
        if pods:
            pod = max(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))
    return Observed(job, pod)


def _seconds_between(start: str | None, end: str | None) -> float | None:
    try:
        a = _dt.datetime.fromisoformat(str(start).replace("Z", "+00:00"))
        b = _dt.datetime.fromisoformat(str(end).replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, (b - a).total_seconds())


async def reconcile(body: Any, ctx: Context, logger: logging.Logger) -> None:
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    old = dict(body.get("status") or {})
    gen = generation(body)
    status: dict[str, Any] = {"observedGeneration": gen}
    conds = old.get("conditions")

    def done() -> Any:
        status["conditions"] = conds
        status["phase"] = phase_of(conds or [])
        return write_status(ctx, body, status, logger)

    try:
        spec = TrainingRunSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError as exc:
        conds = cond.set_condition(conds, "Succeeded", False, "InvalidSpec", first_error(exc), gen)
        await done()
        return

    succeeded = cond.get(conds, "Succeeded") or {}
    if succeeded.get("status") == "True":
        # Terminal: only make sure the Adapter exists (an operator restart may have cut in).
        for key in ("jobName", "startTime", "completionTime", "progress", "progressText", "artifactUri", "metrics", "adapterRef"):
            if key in old:
                status[key] = old[key]
        result = {"metrics": {m["name"]: float(m["value"]) for m in old.get("metrics") or []}, "artifactUri": old.get("artifactUri")}
        known = (old.get("adapterRef") or {}).get("name")
        status["adapterRef"] = {"name": await ensure_adapter(ctx, body, spec, result, logger, known=known)}
        await done()
        return
    if succeeded.get("status") == "False":
        return  # failed runs stay failed; create a new TrainingRun to retry

    job_name = build.job_name(name)
    status["jobName"] = job_name
    observed = await observe(ctx, ns, job_name)
    if observed.job is None:
        try:
            config, credentials = await resolve(ctx, body, spec)
        except Blocked as blocked:
            conds = cond.set_condition(conds, "Waiting", True, blocked.reason, blocked.message, gen)
            conds = cond.set_condition(conds, "Succeeded", "Unknown", blocked.reason, blocked.message, gen)
            await done()
            return
        except Impossible as impossible:
            conds = cond.set_condition(conds, "Waiting", False, impossible.reason, impossible.message, gen)
            conds = cond.set_condition(conds, "Succeeded", False, impossible.reason, impossible.message, gen)
            TRAINING_RUNS.labels("Failed").inc()
            await done()
            return
        judge_keys = build.judge_secrets(
            *(RewardSpecSpec.model_validate(config[k]) if k in config else None for k in ("rewardSpec", "evalRewardSpec"))
        )
        image = spec.run_policy.image or ctx.config.trainer_image
        cm = build.config_map(body, config)
        _, cm_action = await ctx.kube.aapply(cm)
        job = build.job(body, spec, config, image=image, credential_secrets=credentials, judge_keys=judge_keys)
        created, action = await ctx.kube.aapply(job)
        if action == "created":
            logger.info("Created Job, name=%s, namespace=%s", job_name, ns)
            kopf.event(body, type="Normal", reason="JobCreated", message=f"Created training Job {job_name}")
        observed = Observed(created, None)
    status["artifactUri"] = build.output_uri(spec, ctx.config.artifact_uri, ns, name)
    conds = cond.set_condition(conds, "Waiting", False, "ReferencesResolved", "base model and references are ready", gen)

    job_status = (observed.job or {}).get("status") or {}
    job_conds = job_status.get("conditions") or []
    if job_status.get("startTime"):
        status["startTime"] = job_status["startTime"]
    container = observed.container()
    status["attempts"] = int(job_status.get("failed") or 0) + (1 if job_status.get("active") or job_status.get("succeeded") else 0)

    if observed.pod is not None and (observed.pod.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed"):
        conds = cond.set_condition(conds, "Started", True, "TrainerStarted", f"trainer pod {observed.pod['metadata']['name']} started", gen)
        if cond.get(old.get("conditions"), "Started") is None or not cond.is_true(old.get("conditions"), "Started"):
            if (q := _seconds_between(meta.get("creationTimestamp"), status.get("startTime") or now_rfc3339())) is not None:
                QUEUE_SECONDS.observe(q)
        try:
            log_text = await ctx.kube.apod_log(ns, observed.pod["metadata"]["name"], tail_lines=200)
        except ApiError:
            log_text = ""
        if line := parse_progress(log_text):
            status["progress"] = progress_status(line, old.get("progress"))
            status["progressText"] = f"{status['progress']['step']}/{status['progress']['totalSteps']}"
    elif "progress" in old:
        status["progress"], status["progressText"] = old["progress"], old.get("progressText")

    waiting = (container.get("state") or {}).get("waiting") or {}
    if cond.is_true(job_conds, "Complete"):
        result = parse_termination(observed.terminated().get("message")) or {}
        status["completionTime"] = job_status.get("completionTime") or now_rfc3339()
        status["metrics"] = metrics_list(result.get("metrics"))
        if result.get("artifactUri"):
            status["artifactUri"] = str(result["artifactUri"])
        if "progress" in status:
            status["progress"] = {**status["progress"], "percent": 100, "etaSeconds": 0}
        adapter_name = await ensure_adapter(ctx, body, spec, result, logger)
        status["adapterRef"] = {"name": adapter_name}
        conds = cond.set_condition(conds, "Succeeded", True, "AdapterCreated", f"training finished; Adapter {adapter_name} created", gen)
        TRAINING_RUNS.labels("Succeeded").inc()
        if (d := _seconds_between(status.get("startTime"), status["completionTime"])) is not None:
            TRAINING_SECONDS.observe(d)
    elif cond.is_true(job_conds, "Failed"):
        reason, message = failure(observed)
        status["completionTime"] = now_rfc3339()
        conds = cond.set_condition(conds, "Succeeded", False, reason, message, gen)
        TRAINING_RUNS.labels("Failed").inc()
    elif waiting.get("reason") in _POD_WAITING_PROBLEMS:
        conds = cond.set_condition(conds, "Succeeded", "Unknown", waiting["reason"], waiting.get("message") or waiting["reason"], gen)
    elif cond.is_true(conds, "Started"):
        restarts = int(container.get("restartCount") or 0)
        note = f" (resumed after {restarts} restart(s))" if restarts else ""
        conds = cond.set_condition(conds, "Succeeded", "Unknown", "Training", f"the trainer is running{note}", gen)
    else:
        conds = cond.set_condition(conds, "Succeeded", "Unknown", "JobPending", f"waiting for training Job {job_name} to start", gen)
    await done()


register(KIND, PLURAL, reconcile, interval=PROGRESS_SECONDS, on_update=False)
