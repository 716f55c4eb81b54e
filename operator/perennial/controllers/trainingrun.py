"""TrainingRun controller: resolve references, run the trainer Job, report progress, create the Adapter.

observe (cache: references, the Job, its pods, the family's Adapters; the pod
log only while the trainer runs) → decide (pure: `decide()`, table-tested) →
act (apply the config and the Job, create the Adapter). Status is rebuilt from
the world on every pass; what is taken from the previous status is a terminal
outcome (it sticks, whatever happens to the Job later: its TTL deletes it) and
what was resolved when the Job was made (the parent adapter).
Wake-ups: the run's Job and pods (ownerReferences), the objects it references
(BaseModel, RewardSpecs, parent Adapter / TrainingRun / family), and, while
the trainer runs, every `progressSeconds` to read progress.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..api.rewardspec import RewardSpecSpec
from ..api.trainingrun import TrainingRunSpec, TrainingRunStatus
from ..kube import ApiError
from ..metrics import QUEUE_SECONDS, TRAINING_RUNS, TRAINING_SECONDS
from ..resources import conditions as cond
from . import verdicts
from ..resources import distributed as dist
from ..resources import trainingrun as build
from ..resources.networkpolicy import EgressSettings
from ..resources.podsecurity import PodSettings, scrub, secret_values
from .cached_specs import RUN_SPECS, RUBRIC_SPECS
from .base import API_VERSION, Context, Controller, Dependency, Note, Outcome, default_event_type, first_error, generation
from . import jobs
from .children import apply_all

KIND = "TrainingRun"
PROGRESS_PREFIX = "PERENNIAL_PROGRESS "
PARENT_ANNOTATION = "perennial.ai/parent-adapter"
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


def progress_status(line: dict[str, Any], previous: dict[str, Any] | None, now: str) -> dict[str, Any]:
    step = int(line.get("step") or 0)
    total = int(line.get("totalSteps") or 0)
    out: dict[str, Any] = {"step": step, "totalSteps": total, "percent": min(100, int(100 * step / total)) if total else 0}
    if isinstance(line.get("etaSeconds"), (int, float)):
        out["etaSeconds"] = max(0, int(line["etaSeconds"]))
    for key, src in (("loss", "loss"), ("meanReward", "meanReward"), ("fracRewardZeroStd", "fracRewardZeroStd")):
        if (v := _fmt(line.get(src))) is not None:
            out[key] = v
    same = previous and previous.get("step") == step and previous.get("updatedAt")
    out["updatedAt"] = previous["updatedAt"] if same else now
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
    #: values of the Secrets the Job's pod was given: never copied from the pod into status or Events
    secrets: list[str] = field(default_factory=list)

    def container(self) -> dict[str, Any]:
        statuses = ((self.pod or {}).get("status") or {}).get("containerStatuses") or []
        return statuses[0] if statuses else {}

    def terminated(self) -> dict[str, Any]:
        """The trainer's final state; its message (written by the pod, where user code ran) scrubbed of secrets."""
        c = self.container()
        term = (c.get("state") or {}).get("terminated") or (c.get("lastState") or {}).get("terminated") or {}
        if self.secrets and term.get("message"):
            term = {**term, "message": scrub(term["message"], self.secrets)}
        return term


def pod_secret_values(cache: Any, ns: str, job: dict[str, Any]) -> list[str]:
    """Values of every Secret key a Job's pod template is given (envFrom, env, secret and projected volumes)."""
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    out: list[str] = []

    def values(name: str | None, keys: list[str] | None = None) -> None:
        if name:
            out.extend(secret_values(cache.get("v1", "Secret", ns, name), keys))

    for c in pod.get("containers") or []:
        for src in c.get("envFrom") or []:
            values((src.get("secretRef") or {}).get("name"))
        for e in c.get("env") or []:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef") or {}
            values(ref.get("name"), [ref["key"]] if ref.get("key") else None)
    for v in pod.get("volumes") or []:
        if v.get("secret"):
            values(v["secret"].get("secretName"), [i["key"] for i in v["secret"].get("items") or []] or None)
        for src in (v.get("projected") or {}).get("sources") or []:
            if src.get("secret"):
                values(src["secret"].get("name"), [i["key"] for i in src["secret"].get("items") or []] or None)
    return out


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


@dataclass
class World(Observed):
    """Everything a TrainingRun's reconcile reads. All from the cache except `log` (the pod's log tail)."""

    log: str | None = None
    progress_wait: float | None = None  # seconds until the running trainer's progress is read again
    base: dict[str, Any] | None = None
    reward_specs: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    parent_adapter: dict[str, Any] | None = None
    parent_run: dict[str, Any] | None = None
    family: list[dict[str, Any]] = field(default_factory=list)  # adapters of the output family
    parent_family: list[dict[str, Any]] = field(default_factory=list)  # adapters of `parentAdapterFamily`
    deployments: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    #: keys of the Secrets the trainer takes whole (envFrom), by name: a TrainJob's trainer lists them one by one
    secret_keys: dict[str, list[str]] = field(default_factory=dict)
    #: the run config of a run whose group exists (its ConfigMap, from the cache): what its pods' NetworkPolicy names
    run_config: dict[str, Any] | None = None


def _ready_ref(obj: dict[str, Any] | None, kind: str, name: str, what: str) -> dict[str, Any]:
    if obj is None:
        raise Blocked(f"{kind}NotFound", f"{what} {kind} {name!r} does not exist yet; the run starts when it does")
    conds = (obj.get("status") or {}).get("conditions")
    ready = cond.get(conds, "Ready") or {}
    if ready.get("status") != "True" or ready.get("observedGeneration", generation(obj)) != generation(obj):
        raise Blocked(f"{kind}NotReady", f"{what} {kind} {name!r} is not Ready: {ready.get('reason', 'not reconciled yet')} {ready.get('message', '')}".strip())
    return obj


def _validated_rubric(obj: dict[str, Any] | None, name: str, what: str) -> RewardSpecSpec:
    """A RewardSpec is usable when it is Ready and its tests passed (`Validated`); failed tests fail the run."""
    rs = _ready_ref(obj, "RewardSpec", name, what)
    validated = cond.get((rs.get("status") or {}).get("conditions"), "Validated") or {}
    current = validated.get("observedGeneration", generation(rs)) == generation(rs)
    if validated.get("status") == "False" and validated.get("reason") == "TestsFailed" and current:
        raise Impossible("RewardSpecTestsFailed", f"{what} RewardSpec {name!r} failed its own tests: {validated.get('message', '')}".strip())
    if validated.get("status") != "True" or not current:
        raise Blocked("RewardSpecNotValidated", f"{what} RewardSpec {name!r} is not validated yet: {validated.get('reason', 'tests not run')} {validated.get('message', '')}".strip())
    spec, error = RUBRIC_SPECS.parse(rs)  # parsed once while its spec stays the same
    if error is not None:
        raise error
    assert spec is not None
    return spec


def _adapter_version(a: dict[str, Any]) -> int:
    v = (a.get("spec") or {}).get("version")
    return v if isinstance(v, int) else 0


def resolve_parent(spec: TrainingRunSpec, world: World) -> dict[str, Any] | None:
    """The parent Adapter named by `parentAdapterRef`, `parentTrainingRunRef` or `parentAdapterFamily`, or Blocked/Impossible."""
    run_ref = getattr(spec, "parent_training_run_ref", None)
    family = getattr(spec, "parent_adapter_family", None)
    if spec.parent_adapter_ref is not None:
        name = spec.parent_adapter_ref.name
        parent = world.parent_adapter
        if parent is None:
            raise Blocked("AdapterNotFound", f"parent Adapter {name!r} does not exist yet")
    elif run_ref is not None:
        run = world.parent_run
        if run is None:
            raise Blocked("ParentRunNotFound", f"parent TrainingRun {run_ref.name!r} does not exist yet; the run starts when it has made its Adapter")
        succeeded = cond.get((run.get("status") or {}).get("conditions"), "Succeeded") or {}
        if succeeded.get("status") == "False":
            raise Impossible("ParentRunFailed", f"parent TrainingRun {run_ref.name!r} failed: {succeeded.get('reason', '')} {succeeded.get('message', '')}".strip())
        name = ((run.get("status") or {}).get("adapterRef") or {}).get("name")
        if succeeded.get("status") != "True" or not name:
            raise Blocked("ParentRunNotFinished", f"parent TrainingRun {run_ref.name!r} has not produced its Adapter yet")
        parent = world.parent_adapter
        if parent is None:
            raise Blocked("AdapterNotFound", f"Adapter {name!r} of parent TrainingRun {run_ref.name!r} does not exist")
    elif family:
        ready = [a for a in world.parent_family if cond.is_true((a.get("status") or {}).get("conditions"), "Ready")]
        if not ready:
            raise Blocked("NoReadyAdapterInFamily", f"no Ready Adapter of family {family!r} yet")
        parent = max(ready, key=_adapter_version)
        name = parent["metadata"]["name"]
    else:
        return None
    parent_base = (parent.get("spec") or {}).get("baseModelRef", {}).get("name")
    if parent_base != spec.base_model_ref.name:
        raise Impossible("ParentAdapterMismatch", f"parent Adapter {name!r} is of BaseModel {parent_base!r}, not {spec.base_model_ref.name!r}")
    return _ready_ref(parent, "Adapter", name, "parent")


@dataclass
class Resolved:
    config: dict[str, Any]
    credentials: list[str]
    judge_keys: list[tuple[str, str]]
    parent: str | None


def resolve(obj: dict[str, Any], spec: TrainingRunSpec, world: World, *, artifact_uri: str, feedback_store_uri: str) -> Resolved:
    """The run config and the Secrets the trainer needs, from what was observed (pure), or Blocked / Impossible."""
    ns = obj["metadata"]["namespace"]
    if spec.method == "GRPO" and spec.reward_spec_ref is None:
        raise Impossible("RewardSpecRequired", "`rewardSpecRef` is required when `method` is 'GRPO'")
    base = _ready_ref(world.base, "BaseModel", spec.base_model_ref.name, "base model")
    reward_spec = eval_spec = None
    if spec.reward_spec_ref:
        reward_spec = _validated_rubric(world.reward_specs.get(spec.reward_spec_ref.name), spec.reward_spec_ref.name, "reward spec")
    if spec.evaluation.reward_spec_ref:
        eval_spec = _validated_rubric(world.reward_specs.get(spec.evaluation.reward_spec_ref.name), spec.evaluation.reward_spec_ref.name, "evaluation reward spec")
    parent = resolve_parent(spec, world)
    feedback_store = None
    for d in spec.datasets:
        if d.feedback and not d.feedback.store_uri:
            dep = world.deployments.get(d.feedback.deployment_ref.name)
            feedback_store = ((dep or {}).get("spec") or {}).get("feedback", {}).get("storeUri") or feedback_store_uri
    config = build.run_config(
        obj,
        spec,
        base_model_uri=(base.get("status") or {}).get("resolvedUri") or base["spec"]["source"]["uri"],
        output=build.output_uri(spec, artifact_uri, ns, obj["metadata"]["name"]),
        parent_adapter_uri=parent["spec"]["artifactUri"] if parent else None,
        reward_spec=reward_spec,
        eval_reward_spec=eval_spec,
        feedback_store_uri=feedback_store,
    )
    credentials = [base["spec"]["source"].get("credentialsSecretRef", {}).get("name")]
    credentials.append(spec.output.credentials_secret_ref.name if spec.output.credentials_secret_ref else None)
    return Resolved(config, [c for c in credentials if c], build.judge_secrets(reward_spec, eval_spec), parent["metadata"]["name"] if parent else None)


# ----------------------------------------------------------------------------- decide


@dataclass
class Decision:
    status: dict[str, Any]
    children: list[dict[str, Any]] = field(default_factory=list)
    adapter: dict[str, Any] | None = None  # an Adapter to create
    notes: list[Note] = field(default_factory=list)
    requeue_after: float | None = None
    #: metrics of transitions, recorded only once the status that shows them is written
    after_write: list[Callable[[], None]] = field(default_factory=list)


def _seconds_between(start: str | None, end: str | None) -> float | None:
    try:
        a = _dt.datetime.fromisoformat(str(start).replace("Z", "+00:00"))
        b = _dt.datetime.fromisoformat(str(end).replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, (b - a).total_seconds())


#: Logged GRPO steps in a row without reward variance before a running trainer is reported as not learning.
ZERO_STD_STREAK = 3


def learning_signal(spec: TrainingRunSpec, frac: str | None, conds: Any, gen: int | None, *, final: bool, streak: int | None = None) -> Any:
    """GRPO only: `LearningSignal` False when groups of completions got equal rewards (frac_reward_zero_std = 1).

    While training: False once `ZERO_STD_STREAK` logged steps in a row were flat (the trainer counts them),
    and it stays so until the end (no flapping from step to step). At the end: the run's mean decides.
    """
    if spec.method != "GRPO" or frac is None:
        return conds
    try:
        value = float(frac)
    except ValueError:
        return conds
    advice = ("check the graders (RewardSpec tests), raise `temperature` or `numGenerations`, or warm up with SFT first")
    if final:
        if value >= 1.0:
            return cond.set_condition(conds, "LearningSignal", False, "NoRewardVariance",
                                      f"every group of completions got the same reward over the run (frac_reward_zero_std = {frac}): GRPO had no signal to learn from; {advice}", gen)
        return cond.set_condition(conds, "LearningSignal", True, "RewardVaries", f"rewards varied within groups over the run (mean frac_reward_zero_std = {frac})", gen)
    flat = streak >= ZERO_STD_STREAK if streak is not None else value >= 1.0
    if flat:
        return cond.set_condition(conds, "LearningSignal", False, "NoRewardVariance",
                                  f"every group of completions got the same reward for {streak or 1} logged step(s) in a row: GRPO is not learning; {advice}", gen)
    if (cond.get(conds, "LearningSignal") or {}).get("status") == "False":
        return conds  # sticks while training; the run's mean decides at the end
    return cond.set_condition(conds, "LearningSignal", True, "RewardVaries", "rewards vary within groups of completions", gen)


def _has_parent(spec: TrainingRunSpec, parent: dict[str, Any] | None) -> bool:
    """Whether the run's evaluation baseline is a parent adapter (else the base model)."""
    return bool(parent or spec.parent_adapter_ref or spec.parent_training_run_ref or spec.parent_adapter_family)


def _final_zero_std(metrics: list[dict[str, str]]) -> str | None:
    by_name = {m["name"]: m["value"] for m in metrics}
    return by_name.get("train/frac_reward_zero_std_mean") or by_name.get("train/frac_reward_zero_std")


def decide(obj: dict[str, Any], world: World, *, now: str, image: str, artifact_uri: str, feedback_store_uri: str, progress_seconds: float,
           pods: PodSettings = PodSettings(), egress: EgressSettings | None = None, served: Collection[str] = (),
           unknown: Collection[str] = ()) -> Decision:
    """A TrainingRun's status and actions from what was observed (pure). `served`: the optional engines' resources
    the cluster serves (`resources.nodes` > 1 runs on one of them, else on an indexed Job); `unknown`: those it is
    not known yet whether it serves (a run whose engine depends on one waits)."""
    meta = obj["metadata"]
    ns, name = meta["namespace"], meta["name"]
    old = dict(obj.get("status") or {})
    gen = generation(obj)
    conds = old.get("conditions")
    status: dict[str, Any] = {"observedGeneration": gen}

    def done(**kw: Any) -> Decision:
        status["conditions"] = conds
        status["phase"] = phase_of(conds or [])
        if warnings := verdicts.warnings_text(conds):  # the `Warnings` column: NoRewardVariance, WorseThanParent, ...
            status["warnings"] = warnings
        else:
            status.pop("warnings", None)
        return Decision(status, **kw)

    spec, invalid = RUN_SPECS.parse(obj)  # parsed once while the spec stays the same
    if invalid is not None:
        conds = cond.set_condition(conds, "Succeeded", False, "InvalidSpec", first_error(invalid), gen)
        return done()

    succeeded = cond.get(conds, "Succeeded") or {}
    if succeeded.get("status") in ("True", "False"):
        # Terminal: the outcome sticks, whatever happens to the Job (its TTL deletes it).
        keep = {k: v for k, v in old.items() if k not in ("observedGeneration", "conditions", "phase")}
        status.update(keep)
        return done()

    job_name = build.job_name(name)
    status["jobName"] = job_name
    # The parent resolved when the Job was made is recorded on the Job itself (the status write after
    # creating it may fail); the status mirrors it.
    recorded = (((world.job or {}).get("metadata") or {}).get("annotations") or {}).get(PARENT_ANNOTATION)
    parent = {"name": recorded} if recorded else None
    children: list[dict[str, Any]] = []
    notes: list[Note] = []
    if world.job is None:
        try:
            resolved = resolve(obj, spec, world, artifact_uri=artifact_uri, feedback_store_uri=feedback_store_uri)
        except Blocked as blocked:
            conds = cond.set_condition(conds, "Waiting", True, blocked.reason, blocked.message, gen)
            conds = cond.set_condition(conds, "Succeeded", "Unknown", blocked.reason, blocked.message, gen)
            return done()
        except Impossible as impossible:
            conds = cond.set_condition(conds, "Waiting", False, impossible.reason, impossible.message, gen)
            conds = cond.set_condition(conds, "Succeeded", False, impossible.reason, impossible.message, gen)
            status["completionTime"] = now
            return done(after_write=[lambda: TRAINING_RUNS.labels("Failed").inc()])
        image = spec.run_policy.image or image
        job = build.job(obj, spec, resolved.config, image=image, credential_secrets=resolved.credentials, judge_keys=resolved.judge_keys, pods=pods)
        if resolved.parent:
            job["metadata"].setdefault("annotations", {})[PARENT_ANNOTATION] = resolved.parent
        try:
            engine = dist.choose_engine(spec, served, started=old.get("engine"), unknown=unknown)  # made again: on the same engine
        except dist.EngineUnknown as exc:
            conds = cond.set_condition(conds, "Waiting", True, "EngineDiscovery", str(exc), gen)
            conds = cond.set_condition(conds, "Succeeded", "Unknown", "EngineDiscovery", str(exc), gen)
            return done()
        except dist.EngineNotInstalled as exc:
            conds = cond.set_condition(conds, "Waiting", False, "EngineNotInstalled", str(exc), gen)
            conds = cond.set_condition(conds, "Succeeded", False, "EngineNotInstalled", str(exc), gen)
            status["completionTime"] = now
            return done(after_write=[lambda: TRAINING_RUNS.labels("Failed").inc()])
        missing = [c for c in resolved.credentials if engine == dist.TRAINJOB and c not in world.secret_keys]
        if missing:
            message = f"Secret {missing[0]!r} does not exist yet (a TrainJob's trainer takes its keys one by one)"
            conds = cond.set_condition(conds, "Waiting", True, "SecretNotFound", message, gen)
            conds = cond.set_condition(conds, "Succeeded", "Unknown", "SecretNotFound", message, gen)
            return done()
        if resolved.parent:
            parent = {"name": resolved.parent}
        status["engine"] = engine
        children = [build.config_map(obj, resolved.config),
                    *dist.group(obj, spec, job, engine, network_policies=egress is not None, secret_keys=world.secret_keys)]
        if egress is not None:
            # before the Job: its pods never run without their NetworkPolicy
            children.insert(0, build.network_policy(obj, resolved.config, egress))
    elif egress is not None and world.run_config is not None:
        # and with every pass while they run (watched: one deleted or edited meanwhile is restored; no write when it matches)
        children.append(build.network_policy(obj, world.run_config, egress))
    if parent:
        status["parentAdapterRef"] = parent
    if world.job is not None:
        status["engine"] = dist.engine_of(world.job)
    status["artifactUri"] = build.output_uri(spec, artifact_uri, ns, name)
    conds = cond.set_condition(conds, "Waiting", False, "ReferencesResolved", "base model and references are ready", gen)

    # a JobSet's or a TrainJob's status, read as a Job's
    job_status = dist.job_like_status(world.job) if world.job is not None else {}
    job_conds = job_status.get("conditions") or []
    container = world.container()
    after_write: list[Callable[[], None]] = []

    pod_phase = ((world.pod or {}).get("status") or {}).get("phase")
    if world.pod is not None and pod_phase in ("Running", "Succeeded", "Failed"):
        if not cond.is_true(conds, "Started") and (q := _seconds_between(meta.get("creationTimestamp"), job_status.get("startTime") or now)) is not None:
            after_write.append(lambda: QUEUE_SECONDS.observe(q))
        conds = cond.set_condition(conds, "Started", True, "TrainerStarted", f"trainer pod {world.pod['metadata']['name']} started", gen)
    if cond.is_true(conds, "Started") or cond.is_true(job_conds, "Complete") or cond.is_true(job_conds, "Failed"):
        # Shown from the trainer's start on, not while the Job waits for its pod: the Job controller's
        # own bookkeeping (active, startTime) alone is no reason for a status write. The pod's and the
        # Job's watch events arrive in either order: both say the same, so the order costs no write.
        pod_status = (world.pod or {}).get("status") or {}
        first_start = old.get("startTime") or ((container.get("state") or {}).get("running") or {}).get("startedAt") \
            or pod_status.get("startTime") or job_status.get("startTime")
        if first_start:
            status["startTime"] = first_start
        current = job_status.get("active") or job_status.get("succeeded") or pod_phase in ("Running", "Succeeded")
        status["attempts"] = int(job_status.get("failed") or 0) + (1 if current else 0)
    line = parse_progress(world.log) if world.log else None
    if line:
        status["progress"] = progress_status(line, old.get("progress"), now)
    elif "progress" in old:
        status["progress"] = old["progress"]
    if "progress" in status:
        status["progressText"] = f"{status['progress']['step']}/{status['progress']['totalSteps']}"
    if line:
        streak = line.get("zeroStdStreak")
        conds = learning_signal(spec, status["progress"].get("fracRewardZeroStd"), conds, gen, final=False,
                                streak=streak if isinstance(streak, int) and not isinstance(streak, bool) else None)
        live = line.get("warnings") if isinstance(line.get("warnings"), list) else []
        if spec.method == "GRPO" and "RewardCollapsed" in live and (cond.get(conds, "LearningSignal") or {}).get("status") != "False":
            conds = cond.set_condition(conds, "LearningSignal", False, "RewardCollapsed", "the training reward fell well below its level "
                                       "of the first logged steps: the policy is getting worse at the task (lower `learningRate`, raise `beta`)", gen)

    waiting = (container.get("state") or {}).get("waiting") or {}
    requeue = None
    if (cond.is_true(job_conds, "Complete") or cond.is_true(job_conds, "Failed")) and (hold := jobs.result_pending({"status": job_status}, [world.pod] if world.pod else [], now)):
        # the Job says it finished before the trainer's result (its pod's final state) reached us: the pod's event wakes us
        return done(children=children, notes=notes, requeue_after=hold, after_write=after_write)
    if cond.is_true(job_conds, "Complete"):
        result = parse_termination(world.terminated().get("message")) or {}
        status["completionTime"] = job_status.get("completionTime") or now
        status["metrics"] = metrics_list(result.get("metrics"))
        if result.get("artifactUri"):
            status["artifactUri"] = str(result["artifactUri"])
        if "progress" in status:
            status["progress"] = {**status["progress"], "percent": 100, "etaSeconds": 0}
        conds = learning_signal(spec, _final_zero_std(status["metrics"]), conds, gen, final=True)
        if spec.method == "GRPO" and (said := verdicts.trainer_warning(result.get("warnings"))):
            conds = cond.set_condition(conds, "LearningSignal", False, said[0], said[1], gen)  # the trainer saw every step
        conds = verdicts.improved(status["metrics"], conds, gen, has_parent=_has_parent(spec, parent or old.get("parentAdapterRef")))
        uid = meta.get("uid")
        mine = [a for a in world.family if ((a.get("spec") or {}).get("lineage") or {}).get("trainingRunUid") == uid]
        adapter = None
        if mine:  # made before a restart cut in: never a second one
            adapter_name = min(mine, key=_adapter_version)["metadata"]["name"]
        else:
            version = max([_adapter_version(a) for a in world.family] + [0]) + 1
            lineage = dict(result.get("lineage") or {})
            # Lineage names the parent as resolved when the Job was made.
            adapter = build.adapter({**obj, "status": {"parentAdapterRef": parent}} if parent else obj, spec, version=version, artifact_uri=status["artifactUri"], lineage=lineage)
            adapter_name = adapter["metadata"]["name"]
        status["adapterRef"] = {"name": adapter_name}
        conds = cond.set_condition(conds, "Succeeded", True, "AdapterCreated", f"training finished; Adapter {adapter_name} created", gen)
        d = _seconds_between(status.get("startTime"), status["completionTime"])
        after_write.append(lambda: TRAINING_RUNS.labels("Succeeded").inc())
        if d is not None:
            after_write.append(lambda: TRAINING_SECONDS.observe(d))
        return done(children=children, adapter=adapter, notes=notes, after_write=after_write)
    if cond.is_true(job_conds, "Failed"):
        reason, message = failure(world)
        status["completionTime"] = now
        measured = (parse_termination(world.terminated().get("message")) or {}).get("metrics")
        if isinstance(measured, dict) and measured:  # e.g. refused as worse than its parent: the numbers stay visible
            status["metrics"] = metrics_list(measured)
            conds = verdicts.improved(status["metrics"], conds, gen, has_parent=_has_parent(spec, parent or old.get("parentAdapterRef")))
        conds = cond.set_condition(conds, "Succeeded", False, reason, message, gen)
        after_write.append(lambda: TRAINING_RUNS.labels("Failed").inc())
        return done(children=children, notes=notes, after_write=after_write)
    if waiting.get("reason") in _POD_WAITING_PROBLEMS:
        conds = cond.set_condition(conds, "Succeeded", "Unknown", waiting["reason"], waiting.get("message") or waiting["reason"], gen)
    elif cond.is_true(conds, "Started"):
        restarts = int(container.get("restartCount") or 0)
        note = f" (resumed after {restarts} restart(s))" if restarts else ""
        conds = cond.set_condition(conds, "Succeeded", "Unknown", "Training", f"the trainer is running{note}", gen)
        # time is the trigger: the log says how far the trainer got
        requeue = world.progress_wait if world.progress_wait is not None else progress_seconds
    else:
        conds = cond.set_condition(conds, "Succeeded", "Unknown", "JobPending", f"waiting for training Job {job_name} to start", gen)
    return done(children=children, notes=notes, requeue_after=requeue, after_write=after_write)


# ----------------------------------------------------------------------------- observe / act


def _spec_or_none(obj: dict[str, Any]) -> TrainingRunSpec | None:
    return RUN_SPECS.get(obj)


def _terminal(obj: dict[str, Any]) -> bool:
    return (cond.get((obj.get("status") or {}).get("conditions"), "Succeeded") or {}).get("status") in ("True", "False")


def family_of(cache: Any, namespace: str, family: str) -> list[dict[str, Any]]:
    """Adapters of a family by their spec (what names and versions them), labelled or not."""
    return [a for a in cache.list(API_VERSION, "Adapter", namespace) if (a.get("spec") or {}).get("family") == family]


#: A run config the operator writes is a few KiB; a ConfigMap edited to hold more (up to the API's 1 MiB) is not
#: parsed on every pass nor kept in the parse cache: read as unreadable (its pods' policy is then left as it is).
RUN_CONFIG_MAX_CHARS = 256 * 1024


def _run_config(config_map: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run config a run's ConfigMap holds (None if gone, unreadable or oversized)."""
    text = ((config_map or {}).get("data") or {}).get("run.yaml")
    return _parse_run_yaml(text) if isinstance(text, str) and len(text) <= RUN_CONFIG_MAX_CHARS else None


@functools.lru_cache(maxsize=1024)
def _parse_run_yaml(text: str) -> dict[str, Any] | None:
    # parsed once per config text (the cache hands back the same str object each pass: its hash is kept); read only
    try:
        config = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return None
    return config if isinstance(config, dict) else None


async def observe(obj: dict[str, Any], ctx: Context) -> World:
    world = World(job=None, pod=None)
    spec = _spec_or_none(obj)
    if spec is None or _terminal(obj):
        ctx.progress.forget((obj["metadata"]["namespace"], obj["metadata"]["name"]))
        return world
    cache = ctx.cache
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    world.job = group_object(cache, ns, build.job_name(name))
    if world.job is not None:
        world.run_config = _run_config(cache.get("v1", "ConfigMap", ns, build.config_name(name)))
        world.secrets = [v for pod_spec in dist.pod_specs(world.job) for v in pod_secret_values(cache, ns, {"spec": {"template": {"spec": pod_spec}}})]
        job_conds = dist.job_like_status(world.job).get("conditions")
        pods = group_pods(cache, world.job)
        if dist.engine_of(world.job) == dist.JOB:
            if pods:
                world.pod = max(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))
        else:
            outcome = "Complete" if cond.is_true(job_conds, "Complete") else "Failed" if cond.is_true(job_conds, "Failed") else None
            world.pod = dist.representative_pod(pods, outcome)
        phase = ((world.pod or {}).get("status") or {}).get("phase")
        finished = cond.is_true(job_conds, "Complete") or cond.is_true(job_conds, "Failed")
        read = False
        if phase == "Running" and not finished:
            read, world.progress_wait = ctx.progress.poll((ns, name))  # spread and capped, not every pass
        else:
            ctx.progress.forget((ns, name))
            read = phase in ("Succeeded", "Failed")  # the last progress line, once, as the run ends
        if read and world.pod is not None:
            try:
                world.log = scrub(await ctx.kube.pod_log(ns, world.pod["metadata"]["name"], tail_lines=200), world.secrets)
            except ApiError as exc:
                if exc.status not in (400, 404):
                    raise
        if cond.is_true(job_conds, "Complete"):
            world.family = family_of(cache, ns, spec.output.adapter_family)
        return world
    world.base = cache.get(API_VERSION, "BaseModel", ns, spec.base_model_ref.name)
    for ref in (spec.reward_spec_ref, spec.evaluation.reward_spec_ref):
        if ref is not None:
            world.reward_specs[ref.name] = cache.get(API_VERSION, "RewardSpec", ns, ref.name)
    run_ref = getattr(spec, "parent_training_run_ref", None)
    if spec.parent_adapter_ref is not None:
        world.parent_adapter = cache.get(API_VERSION, "Adapter", ns, spec.parent_adapter_ref.name)
    elif run_ref is not None:
        world.parent_run = cache.get(API_VERSION, "TrainingRun", ns, run_ref.name)
        adapter = (((world.parent_run or {}).get("status") or {}).get("adapterRef") or {}).get("name")
        if adapter:
            world.parent_adapter = cache.get(API_VERSION, "Adapter", ns, adapter)
    elif family := getattr(spec, "parent_adapter_family", None):
        world.parent_family = family_of(cache, ns, family)
    for d in spec.datasets:
        if d.feedback and not d.feedback.store_uri:
            world.deployments[d.feedback.deployment_ref.name] = cache.get(API_VERSION, "Deployment", ns, d.feedback.deployment_ref.name)
    if spec.resources.nodes > 1:
        refs = [((world.base or {}).get("spec") or {}).get("source", {}).get("credentialsSecretRef", {}).get("name"),
                spec.output.credentials_secret_ref.name if spec.output.credentials_secret_ref else None]
        for secret in filter(None, refs):
            if (found := cache.get("v1", "Secret", ns, secret)) is not None:
                world.secret_keys[secret] = sorted({**(found.get("data") or {}), **(found.get("stringData") or {})})
    return world


def group_object(cache: Any, namespace: str, name: str) -> dict[str, Any] | None:
    """What runs the trainer, of whichever engine made it: a TrainJob, a JobSet, a Job (one pod, or an indexed
    group). The TrainJob first: the JobSet it makes has its name (and our labels)."""
    for _, api_version, kind in reversed(dist.GROUP_KINDS):
        if (found := cache.get(api_version, kind, namespace, name)) is not None:
            return found
    return None


def group_pods(cache: Any, group: dict[str, Any]) -> list[dict[str, Any]]:
    """The trainer pods of a group: a Job's; a JobSet's Jobs' ones; a TrainJob's JobSet's Jobs' ones."""
    uid = group["metadata"]["uid"]
    if group.get("kind") == "Job":
        return cache.owned_by("v1", "Pod", uid)
    jobsets = [group] if group.get("kind") == "JobSet" else cache.owned_by(dist.JOBSET_API, "JobSet", uid)
    job_list = [j for js in jobsets for j in cache.owned_by("batch/v1", "Job", js["metadata"]["uid"])]
    return [p for j in job_list for p in cache.owned_by("v1", "Pod", j["metadata"]["uid"])]


async def reconcile(obj: dict[str, Any], ctx: Context) -> Outcome:
    world = await observe(obj, ctx)
    decision = decide(
        obj, world, now=ctx.now(), image=ctx.config.trainer_image, artifact_uri=ctx.config.artifact_uri,
        feedback_store_uri=ctx.config.feedback_store_uri, progress_seconds=ctx.config.progress_seconds,
        pods=ctx.config.pod_settings(), egress=ctx.config.egress_settings(), served=ctx.served, unknown=ctx.unknown,
    )
    notes = decision.notes + await apply_all(ctx, decision.children, reasons={
        "Job": "JobCreated", "JobSet": "JobCreated", "TrainJob": "JobCreated", "ConfigMap": None, "NetworkPolicy": None, "Service": None})
    if decision.adapter is not None:
        # A 409 means another run claimed this version: the error requeues us, and the next pass
        # sees that Adapter in the cache and takes the next version.
        try:
            created = await ctx.kube.create(decision.adapter)
        except ApiError as exc:
            if exc.status != 409:
                raise
            # Ours, if an earlier create succeeded and only its answer was lost; else someone else's.
            created = await ctx.kube.get(API_VERSION, "Adapter", obj["metadata"]["namespace"], decision.adapter["metadata"]["name"])
            if created is None or ((created.get("spec") or {}).get("lineage") or {}).get("trainingRunUid") != obj["metadata"]["uid"]:
                if created is not None:
                    ctx.cache.put(created)
                raise
        ctx.cache.put(created)
    return Outcome(decision.status, notes, decision.requeue_after, decision.after_write)


def dependencies(obj: dict[str, Any]) -> list[Dependency]:
    """What a run waits for. A finished run depends on nothing: nothing can change its outcome."""
    if _terminal(obj):
        return []
    spec = _spec_or_none(obj)
    if spec is None:
        return []
    ns = obj["metadata"]["namespace"]
    deps: list[Dependency] = [(API_VERSION, "BaseModel", ns, spec.base_model_ref.name)]
    for ref in (spec.reward_spec_ref, spec.evaluation.reward_spec_ref):
        if ref is not None:
            deps.append((API_VERSION, "RewardSpec", ns, ref.name))
    if spec.parent_adapter_ref is not None:
        deps.append((API_VERSION, "Adapter", ns, spec.parent_adapter_ref.name))
    if (run_ref := getattr(spec, "parent_training_run_ref", None)) is not None:
        deps.append((API_VERSION, "TrainingRun", ns, run_ref.name))
        # the Adapter it makes (known by name only once it succeeds), e.g. when it becomes Ready
        deps.append((API_VERSION, "AdapterOfRun", ns, run_ref.name))
    if family := getattr(spec, "parent_adapter_family", None):
        deps.append((API_VERSION, "AdapterFamily", ns, family))
    # Adapters of the output family: another run's Adapter may take the version this one wants.
    deps.append((API_VERSION, "AdapterFamily", ns, spec.output.adapter_family))
    for d in spec.datasets:
        if d.feedback and not d.feedback.store_uri:
            deps.append((API_VERSION, "Deployment", ns, d.feedback.deployment_ref.name))
    return deps


def gone(ctx: Context, namespace: str, name: str) -> None:
    ctx.progress.forget((namespace, name))
    RUN_SPECS.forget(namespace, name)


#: Succeeded=Unknown reasons of a run that is on its way: the status shows them, no Event needed.
_ON_ITS_WAY = frozenset({"JobPending", "Training"})


def event_for(c: dict[str, Any]) -> str | None:
    """Events of a run: what the operator did (JobCreated, AdapterCreated), why it waits, outcomes and
    problems. A trainer starting, references resolving and the Job's own progress are status only: on a
    busy cluster each would be one more write per run for what `kubectl get tr` already shows."""
    if (c["type"], c["status"]) in (("Started", "True"), ("Waiting", "False"), ("Improved", "True")):
        return None
    if c["type"] == "Succeeded" and c["status"] == "Unknown":
        if c.get("reason") in _ON_ITS_WAY:
            return None
        if c.get("reason") in _POD_WAITING_PROBLEMS:
            return "Warning"
    return default_event_type(c)


CONTROLLER = Controller(KIND, "trainingruns", TrainingRunStatus, reconcile, dependencies, gone, event_for)
