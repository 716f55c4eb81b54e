"""Deployment: serving a base model with adapters, blue-green, across regions, learning from feedback."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field

from .common import (
    CommonStatus,
    ComputeResources,
    Condition,
    Decimal,
    KindInfo,
    LocalObjectReference,
    Model,
    Name,
    PrinterColumn,
    Quantity,
    Resource,
    ScaleSubresource,
    SecretKeySelector,
    age_column,
    cel,
    exactly_one_of,
    validations,
)
from .trainingrun import (
    DatasetSource,
    Evaluation,
    Hyperparameters,
    LoRAConfig,
    Method,
    RunPolicy,
    grpo_batch_rule,
)

Color = Literal["blue", "green"]

# Annotations of the rollout (the state of a rollout lives in the children, Argo Rollouts style; the
# Perennial Deployment's spec is never edited by the operator).
#: On the Perennial Deployment, set by the user (`perennial promote`, or `kubectl annotate pdeploy <name>
#: perennial.ai/promote=<value> --overwrite`): promote the rollout waiting for it. The value is the pod
#: revision (or, for an adapter change, the Adapter object name) shown in `status.regions[].pendingPromotion`;
#: a value left from an earlier promotion never promotes a rollout of another revision.
PROMOTE_ANNOTATION = "perennial.ai/promote"
#: On the stable Service: when it last switched color (RFC 3339).
SWITCHED_AT_ANNOTATION = "perennial.ai/switched-at"
#: On an apps/v1 Deployment of a color: when it is to be scaled to zero (RFC 3339).
SCALE_DOWN_AT_ANNOTATION = "perennial.ai/scale-down-at"
#: On the preview color's apps/v1 Deployment: when the current preview step started (RFC 3339).
PREVIEW_STARTED_AT_ANNOTATION = "perennial.ai/preview-started-at"
#: On the preview color's apps/v1 Deployment: `<revision>=passed` or `<revision>=failed:<message>`.
SMOKE_ANNOTATION = "perennial.ai/smoke"
#: On a color's apps/v1 Deployment: the revision whose rollout was aborted (never retried while the
#: spec still asks for it), and why (`<Reason>: <message>`).
ABORTED_REVISION_ANNOTATION = "perennial.ai/aborted-revision"
ABORT_REASON_ANNOTATION = "perennial.ai/abort-reason"
#: On the routes ConfigMap: the per-served-name progress of adapter rollouts (JSON).
ADAPTER_ROLLOUTS_ANNOTATION = "perennial.ai/adapter-rollouts"

#: What a region (and, summarised, the whole Deployment) is doing, derived from the children (for humans
#: and the `Phase` column; the conditions carry the same facts for machines).
Phase = Literal["Pending", "Progressing", "Promoting", "ScalingDown", "Stable", "Paused", "Aborted", "Degraded", "Unreachable"]

# Condition types and reasons of the Deployment.
CONDITION_READY = "Ready"  # True while every region serves (its active color has ready replicas).
CONDITION_PROGRESSING = "Progressing"  # True while a rollout or a scale is under way.
CONDITION_DEGRADED = "Degraded"  # True when a rollout was aborted or rolled back, or a region is lost.


class AdapterTrack(Model):
    """Follow the newest Adapter of a family that passed the promotion gate."""

    family: Name = Field(description="Adapter family to follow.")
    require_promotion: bool = Field(default=True, description="Only adapters that passed this Deployment's promotion gate.")


class ServedAdapter(Model):
    """One adapter served under a model name (as vLLM's `--lora-modules name=path`)."""

    name: Name = Field(description="Served model name clients ask for.")
    adapter_ref: LocalObjectReference | None = Field(default=None, description="Serve exactly this Adapter.")
    track: AdapterTrack | None = Field(default=None, description="Serve the latest promoted Adapter of a family.")

    model_config = Model.model_config | {"json_schema_extra": validations(
        exactly_one_of("adapterRef", "track"),
        cel("!self.name.endsWith('-preview')", "served names ending in `-preview` are the operator's (the next adapter is "
            "smoke-tested under `<name>-preview`, callable with the operator's token only)", field_path=".name"),
    )}


class EngineSpec(Model):
    """The inference engine of each replica."""

    type: Literal["VLLM", "Transformers"] = Field(default="VLLM", description="`VLLM` on GPUs; `Transformers` is the CPU engine (laptops, CPU clusters).")
    image: str | None = Field(default=None, max_length=512, description="Server image; the operator's default if unset.")
    served_model_name: str | None = Field(default=None, max_length=256, description="Name the base model is served under; the BaseModel's name if unset.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=16, description="Tensor parallel size (GPUs per replica).")
    pipeline_parallel_size: int = Field(default=1, ge=1, le=16, description=(
        "Pipeline parallel size: pods per replica, each with `tensorParallelSize` GPUs (vLLM `--pipeline-parallel-size` over "
        "Ray), for a model that does not fit one node. More than 1 needs vLLM and LeaderWorkerSet "
        "(`leaderworkersets.leaderworkerset.x-k8s.io`): one leader (engine and sidecar) and workers per replica, "
        "restarted and counted ready as a group; each color is a LeaderWorkerSet (the autoscaler scales its groups). "
        "Without the LeaderWorkerSet CRD the Deployment is blocked (`LeaderWorkerSetNotInstalled`); regions in other clusters "
        "(`clusterSecretRef`) are not supported yet."))
    max_model_len: int | None = Field(default=None, ge=16, le=1048576, description="Max context length; the BaseModel's if unset.")
    max_loras: int = Field(default=4, ge=1, le=256, description="Adapters in one batch (`--max-loras`).")
    max_lora_rank: int = Field(default=64, ge=1, le=512, description="Largest LoRA rank served (`--max-lora-rank`).")
    max_cpu_loras: int | None = Field(default=None, ge=1, le=1024, description="Adapters cached in CPU memory (`--max-cpu-loras`).")
    gpu_memory_utilization: Decimal | None = Field(default=None, description="Fraction of GPU memory vLLM may use, e.g. `\"0.9\"`.")
    extra_args: list[Annotated[str, Field(max_length=1024)]] = Field(default_factory=list, max_length=64, description="Extra engine command-line arguments.")
    resources: ComputeResources | None = Field(default=None, description="Resources of one replica; the BaseModel's if unset.")

    model_config = Model.model_config | {"json_schema_extra": validations(
        cel("!has(self.pipelineParallelSize) || self.pipelineParallelSize == 1 || !has(self.type) || self.type == 'VLLM'", "`pipelineParallelSize` above 1 needs `type` 'VLLM'",
            field_path=".pipelineParallelSize"),
        cel("(!has(oldSelf.pipelineParallelSize) || oldSelf.pipelineParallelSize == 1) == (!has(self.pipelineParallelSize) || self.pipelineParallelSize == 1)",
            "`pipelineParallelSize` must not change between 1 and more than 1 (one pod per replica vs LeaderWorkerSet groups): "
            "create a new Deployment instead", field_path=".pipelineParallelSize"),
    )}


def _compiles(pattern: str | None) -> str | None:
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"`expectRegex` must be a valid Python regular expression: {exc}") from None
    return pattern


class SmokeTest(Model):
    """A request sent through the preview Service (pod rollouts) or under the preview name (adapter rollouts)
    before any client traffic reaches the new revision."""

    enabled: bool = Field(default=True, description="Run the smoke test; when false a ready preview counts as passed.")
    prompt: str = Field(default="Say hello.", max_length=4096, description="User message sent to each served model name (the base and every adapter).")
    expect_regex: Annotated[str | None, AfterValidator(_compiles)] = Field(default=None, max_length=1024, description="Every response must match this pattern (Python `re.search`); any non-empty answer passes if unset.")
    max_tokens: int = Field(default=16, ge=1, le=4096, description="`max_tokens` of each smoke request.")
    timeout_seconds: int = Field(default=60, ge=1, le=3600, description="Time limit of the smoke test.")


class BlueGreen(Model):
    """Blue-green rollout of the serving pods (Argo Rollouts' vocabulary; defaults fit GPUs).

    Steps per region: bring up the other color with the new revision at `previewReplicas`, wait until every
    preview pod is ready, run the smoke test through the preview Service, wait for a promotion when
    `autoPromote` is false, scale the preview to the full count, switch the stable Service, keep the old color
    for `scaleDownDelaySeconds` (rolling back automatically within `postPromotionWindowSeconds`), scale it to
    zero. A failed smoke test or an exceeded deadline aborts: the stable Service never leaves the active color.
    """

    auto_promote: bool = Field(
        default=True,
        description="Switch traffic to the preview color as soon as it is ready and the smoke test passed. When false, the rollout waits "
        "(phase `Paused`) for the annotation `perennial.ai/promote: <revision>` on this Deployment (set by `perennial promote <name>` or "
        "`kubectl annotate pdeploy <name> perennial.ai/promote=<revision> --overwrite`); the revision waiting is shown in "
        "`status.regions[].pendingPromotion`; for an adapter change the value is the new Adapter's name. The first rollout "
        "of a region needs no promotion.",
    )
    smoke_test: SmokeTest = Field(default_factory=SmokeTest, description="Check run on the preview before it gets traffic.")
    scale_down_delay_seconds: int = Field(
        default=300, ge=0, le=86400,
        description="Keep the old color this long after the switch, for instant rollback (switching back needs no model load). "
        "Argo Rollouts' default is 30; ours is 300 because a replacement for a lost GPU replica takes minutes to load a model, "
        "so rolling back to a color already up is the only fast rollback.",
    )
    abort_scale_down_delay_seconds: int = Field(
        default=30, ge=0, le=86400,
        description="After an abort, keep the preview color this long before scaling it to zero (Argo Rollouts' default, 30), "
        "e.g. to read its pods' logs; its GPUs are held meanwhile.",
    )
    progress_deadline_seconds: int = Field(
        default=1800, ge=30, le=86400,
        description="Abort when a preview step (coming up, or scaling to the full count) has not finished in this time. "
        "Argo Rollouts' default is 600; ours is 1800 because pulling a serving image and loading a large model on a new node "
        "often takes longer than 10 minutes. Waiting for a manual promotion, or `paused`, does not count. Adapter changes get "
        "the same time to be loaded by every ready pod.",
    )
    preview_replicas: int | None = Field(
        default=None, ge=1, le=1000,
        description="Replicas of the preview color while it is tested; it is scaled to the full count (at least the active "
        "color's ready count) before the switch. The full count from the start if unset.",
    )
    post_promotion_window_seconds: int | None = Field(
        default=None, ge=0, le=86400,
        description="After a switch, switch back automatically (reason `RolledBack`) when the new color's ready replicas drop "
        "below what the old color served (or below 1) within this many seconds, while the old color still has ready "
        "replicas. The whole `scaleDownDelaySeconds` if unset; 0 turns automatic rollback off.",
    )

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel(
                "!has(self.postPromotionWindowSeconds) || self.postPromotionWindowSeconds <= self.scaleDownDelaySeconds",
                "`postPromotionWindowSeconds` must not exceed `scaleDownDelaySeconds` (rolling back needs the old color)",
                field_path=".postPromotionWindowSeconds",
            ),
        )
    }


class CanaryStep(Model):
    """One step of an adapter canary: send `weight` percent of a served name's requests to the new adapter, then wait."""

    weight: int = Field(ge=1, le=99, description="Percent of the served name's requests sent to the new adapter.")
    pause_seconds: int = Field(default=60, ge=0, le=86400, description="Time at this weight before the next step.")


class AdapterRollout(Model):
    """How a served name moves to another Adapter without new pods (the adapter is loaded next to the old one in the
    running engines, smoke-tested under `<served name>-preview`, then the name moves)."""

    canary_steps: list[CanaryStep] = Field(
        default_factory=list, max_length=16,
        description="Weighted steps before the name moves entirely (e.g. 10 then 50), taken in increasing weight; moved at once if empty.",
    )
    unload_delay_seconds: int | None = Field(
        default=None, ge=0, le=86400,
        description="Keep the old adapter loaded this long after the move (switching back is then instant); "
        "`blueGreen.scaleDownDelaySeconds` if unset.",
    )

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.canarySteps.all(s, self.canarySteps.exists_one(t, t.weight == s.weight))",
                "`canarySteps` weights must be unique",
                field_path=".canarySteps",
            ),
        )
    }


class RolloutStrategy(Model):
    type: Literal["BlueGreen"] = Field(default="BlueGreen", description="Rollout strategy.")
    blue_green: BlueGreen = Field(default_factory=BlueGreen, description="Blue-green settings.")
    adapter_rollout: AdapterRollout = Field(default_factory=AdapterRollout, description="How adapter changes roll out (no new pods).")
    region_order: Literal["Sequential", "Parallel"] = Field(default="Sequential", description="Roll out region by region, or all at once.")


class Autoscaling(Model):
    """Replica autoscaling through an HPA or a KEDA ScaledObject."""

    enabled: bool = Field(default=False, description="Autoscale replicas.")
    provider: Literal["HPA", "KEDA"] = Field(default="HPA", description="`HPA` (custom metrics) or `KEDA`.")
    min_replicas: int = Field(default=1, ge=0, le=1000, description="Minimum replicas (0 only with KEDA).")
    max_replicas: int = Field(default=4, ge=1, le=1000, description="Maximum replicas.")
    metric: Literal["RequestsInFlight", "QueueLength", "GPUCacheUsage", "CPU"] = Field(default="RequestsInFlight", description="Metric scaled on.")
    target: Decimal = Field(default="8", description="Target value of the metric per replica.")
    prometheus_address: str | None = Field(default=None, max_length=2048, description="KEDA: Prometheus server address.")
    wake_query: str | None = Field(
        default=None, min_length=1, max_length=4096,
        description="KEDA with `minReplicas` 0: a PromQL query of demand that exists while no pod runs (e.g. your ingress "
        "controller's or gateway's request rate for this Deployment's host); a value above 0 wakes the active color from zero. "
        "Required then: vLLM's metrics vanish with the last pod, so nothing else could ever scale it up again. It only wakes: "
        "beyond one replica the `metric` decides.",
    )

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel("self.minReplicas <= self.maxReplicas", "`minReplicas` must not exceed `maxReplicas`"),
            cel("self.minReplicas > 0 || self.provider == 'KEDA'", "`minReplicas` 0 needs `provider` 'KEDA'", field_path=".minReplicas"),
            cel("self.minReplicas > 0 || !self.enabled || has(self.wakeQuery)",
                "`minReplicas` 0 needs `wakeQuery`: the engine's metrics vanish with the last pod, so nothing would ever wake it",
                field_path=".wakeQuery"),
        )
    }


class Region(Model):
    """A region: another cluster (kubeconfig Secret) or a node pool of this one."""

    name: Name = Field(description="Region name.")
    cluster_secret_ref: LocalObjectReference | None = Field(default=None, description="Secret with a `kubeconfig` key for a remote cluster; this cluster if unset.")
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(default=None, max_length=16, description="Node labels of this region in a stretched cluster.")
    replicas: int | None = Field(default=None, ge=0, le=1000, description="Replicas here; `spec.replicas` if unset.")


class Redaction(Model):
    class Pattern(Model):
        name: Name = Field(description="Pattern name (used in the `[REDACTED:<name>]` marker).")
        regex: str = Field(min_length=1, max_length=1024, description="Python regular expression.")

    enabled: bool = Field(default=True, description="Redact e-mails, phone, card and IBAN numbers and IP addresses before anything touches disk.")
    extra_patterns: list[Pattern] = Field(default_factory=list, max_length=32, description="More patterns to redact.")


class FeedbackCapture(Model):
    """The feedback sidecar in every serving pod."""

    enabled: bool = Field(default=True, description="Run the feedback sidecar.")
    store_uri: str | None = Field(default=None, max_length=2048, description="Feedback store (fsspec URI: `pvc://<claim>/<path>`, `s3://…`); the operator's default if unset.")
    store_credentials_secret_ref: LocalObjectReference | None = Field(default=None, description="Secret with credentials for the store.")
    sample_percent: int = Field(default=100, ge=0, le=100, description="Percent of interactions recorded.")
    token_secret_ref: SecretKeySelector | None = Field(default=None, description="Bearer token clients present to `POST /v1/feedback`; generated into a Secret if unset.")
    redaction: Redaction = Field(default_factory=Redaction, description="PII redaction.")
    spool_size: Quantity = Field(default="1Gi", description="Size of the local spool volume.")
    max_body_bytes: int = Field(default=1048576, ge=1024, le=67108864, description="Largest request body accepted.")
    rate_limit_per_second: int = Field(default=50, ge=1, le=100000, description="Feedback requests per second per client (enforced by each sidecar worker).")
    workers: int = Field(default=1, ge=1, le=64, description="Sidecar worker processes sharing the port; one proxies on about one CPU, so give the sidecar container as many CPUs.")


class PromotionGate(Model):
    """When a new Adapter may replace the served one."""

    min_improvement: Decimal = Field(default="0", description="The adapter's held-out mean reward must exceed its baseline's by at least this.")
    min_mean_reward: Decimal | None = Field(default=None, description="And reach at least this mean reward.")
    require_evaluation: bool = Field(default=True, description="Adapters without evaluation metrics are never promoted.")


class TrainingRunTemplate(Model):
    """What the operator puts into each TrainingRun it creates."""

    method: Method = Field(default="SFT", description="Method of the created runs.")
    reward_spec_ref: LocalObjectReference | None = Field(default=None, description="RewardSpec (required for GRPO).")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Hyperparameters.")
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="LoRA shape.")
    resources: ComputeResources = Field(default_factory=lambda: ComputeResources(gpus=1), description="Training pod resources.")
    evaluation: Evaluation = Field(default_factory=Evaluation, description=(
        "Evaluation settings. Each run is evaluated, against its parent, on `heldOutPercent` of its feedback snapshot "
        "(whole prompts, never trained on) plus `evalDatasets`."))
    eval_datasets: list[DatasetSource] = Field(default_factory=list, max_length=8, description=(
        "Fixed evaluation sets (`split` 'Eval', a `uri`) added to every created run, next to the held-out share of its feedback."))
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Job policy.")
    continue_from_served: bool = Field(default=True, description="Use the currently served adapter of the family as parent.")

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel("self.method != 'GRPO' || has(self.rewardSpecRef)", "`rewardSpecRef` is required when `method` is 'GRPO'", field_path=".rewardSpecRef", reason="FieldValueRequired"),
            grpo_batch_rule(),
            cel("self.evalDatasets.all(d, d.split == 'Eval' && has(d.uri) && d.name != 'feedback')",
                "`evalDatasets` must have `split` 'Eval' and a `uri`, and must not be named 'feedback'", field_path=".evalDatasets"),
            cel("self.evalDatasets.all(d, self.evalDatasets.exists_one(e, e.name == d.name))", "`evalDatasets` names must be unique",
                field_path=".evalDatasets"),
        )
    }


class ContinuousLearning(Model):
    """Train the next adapter from this Deployment's own feedback."""

    enabled: bool = Field(default=False, description="Create TrainingRuns from collected feedback.")
    adapter_family: Name = Field(description="Family of the adapters trained and promoted.")
    min_new_records: int = Field(default=1000, ge=1, le=100000000, description="Train when at least this many new rated records exist...")
    max_age_seconds: int | None = Field(default=None, ge=60, le=365 * 86400, description="...or when the oldest untrained rated record is this old (and at least one exists).")
    schedule: str | None = Field(default=None, max_length=128, pattern=r"^(@(hourly|daily|weekly|monthly)|(\S+\s+){4}\S+)$", description="...or on this cron schedule (and at least one new record exists).")
    min_interval_seconds: int = Field(default=3600, ge=0, le=30 * 86400, description="At least this long between two created runs.")
    max_concurrent_runs: int = Field(default=1, ge=1, le=16, description="Runs of this Deployment in flight at once.")
    template: TrainingRunTemplate = Field(default_factory=TrainingRunTemplate, description="TrainingRun template.")
    promotion: PromotionGate = Field(default_factory=PromotionGate, description="Promotion gate.")


class DeploymentSpec(Model):
    """Serving a base model and adapters."""

    base_model_ref: LocalObjectReference = Field(description="The BaseModel served.")
    adapters: list[ServedAdapter] = Field(default_factory=list, max_length=64, description="Adapters served next to the base model.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="Inference engine.")
    replicas: int = Field(
        default=1, ge=0, le=1000,
        description="Replicas per region (a region's own `replicas` wins) when autoscaling is off. The `/scale` subresource writes "
        "this field, so an autoscaler of your own (`kubectl scale pdeploy`, an HPA, KEDA) can drive it; with GitOps, tell Argo CD "
        "to ignore it then. A change of replicas alone scales the active color in place.",
    )
    strategy: RolloutStrategy = Field(default_factory=RolloutStrategy, description="Rollout strategy.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Autoscaling.")
    regions: list[Region] = Field(default_factory=list, max_length=32, description="Regions; the operator's own cluster if empty.")
    feedback: FeedbackCapture = Field(default_factory=FeedbackCapture, description="Feedback capture.")
    continuous_learning: ContinuousLearning | None = Field(default=None, description="Continuous-learning policy.")
    paused: bool = Field(
        default=False,
        description="Stop every rollout where it stands: no preview is started or advanced, no switch, no adapter moved. "
        "Safety still acts (an automatic rollback within the post-promotion window, a switch away from a color without ready "
        "replicas) and old colors are still scaled down when their delay is over; replica changes still scale the active color.",
    )

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel("self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))", "served adapter names must be unique", field_path=".adapters"),
            cel("self.regions.all(r, self.regions.exists_one(s, s.name == r.name))", "region names must be unique", field_path=".regions"),
            cel("!has(self.continuousLearning) || !self.continuousLearning.enabled || self.feedback.enabled", "`continuousLearning` needs `feedback.enabled`", field_path=".continuousLearning"),
        )
    }


class ServedAdapterStatus(Model):
    name: str = Field(max_length=63, description="Served model name.")
    adapter: str = Field(default="", max_length=253, description="Adapter served under it (the one with most of the traffic).")
    canary_adapter: str | None = Field(default=None, max_length=253, description="Adapter taking part of the traffic during a canary.")
    canary_weight: int | None = Field(default=None, ge=0, le=100, description="Percent of the requests sent to `canaryAdapter`.")


class RegionStatus(Model):
    name: str = Field(max_length=63, description="Region name.")
    phase: Phase | None = Field(default=None, description="What the region is doing.")
    active_color: Color | None = Field(default=None, description="Color receiving traffic (the stable Service's selector).")
    revision: str | None = Field(default=None, max_length=64, description="Pod revision of the active color.")
    preview_color: Color | None = Field(default=None, description="Color being rolled out, if any.")
    preview_revision: str | None = Field(default=None, max_length=64, description="Pod revision of the preview color.")
    pending_promotion: str | None = Field(default=None, max_length=253, description="Value of the `perennial.ai/promote` annotation that promotes the rollout waiting for it.")
    routes_revision: str | None = Field(default=None, max_length=64, description="Revision of the adapter routes every ready pod applied.")
    ready_replicas: int = Field(default=0, ge=0, description="Ready replicas of the active color.")
    desired_replicas: int = Field(default=0, ge=0, description="Replicas the active color should have.")
    endpoint: str | None = Field(default=None, max_length=512, description="URL of this region's stable Service (in its cluster).")
    message: str | None = Field(default=None, max_length=1024, description="Human-readable detail of the phase.")
    cluster: str | None = Field(default=None, max_length=253, description="The cluster Secret (`clusterSecretRef`) this region's children live behind; "
                                "kept while a region taken out of the spec is cleaned up there.")


class DeploymentStatus(CommonStatus):
    conditions: list[Condition] | None = Field(
        default=None, max_length=16,
        description="`Ready`: every region serves (reasons `Serving`, `ScaledToZero`; False: `NoReadyReplicas`, "
        "`FirstRolloutInProgress`, `RolloutAborted`, `RegionUnreachable`, `RegionUnsupported`, `ClusterSecretNotFound`, `ClusterSecretInvalid`, "
        "`ClusterAuthUnsupported` (a region's cluster Secret gives no client); and, while nothing served yet, `InvalidSpec`, "
        "`BaseModelNotFound`, `BaseModelNotReady`). `Progressing`: a rollout or a scale is under way "
        "(`FirstRollout`, `PreviewProgressing`, `SmokeTesting`, `PreviewScalingUp`, `Switched`, `ScalingDown`, `Scaling`, "
        "`AdapterRollout`, `UnloadDelay`, `FailedOver`, `RecreatingActiveColor`; Unknown: `RolloutPaused`, `WaitingForPromotion`, "
        "`WaitingForRegion` (regionOrder Sequential), `InvalidSpec`, `BaseModelNotFound`, `BaseModelNotReady`; False: "
        "`RolloutComplete`, `RolloutAborted`). `Degraded`: `RolloutAborted` (the cause and the revision in the message; the "
        "revision is not retried until the spec asks for another), `RolledBack`, `FailedOver`, `NoReadyReplicas`, "
        "`RegionUnreachable`, `RegionUnsupported`, `ClusterSecretNotFound`, `ClusterSecretInvalid`, `ClusterAuthUnsupported`, "
        "`ChildConflict` (a child's name is taken by an object that is not Perennial's: rename or delete it), "
        "`FeedbackTokenInvalid` (the `tokenSecretRef` value cannot be copied to a region in another cluster), "
        "`AdapterRankTooHigh`, `BaseModelMismatch`, `TooManyAdapters`, `AdapterNotReady`, `AdapterLoadFailed` (a served adapter the "
        "pods could not load: they keep their last routes), "
        "`KEDANotInstalled`, `InvalidSpec`, `BaseModelNotFound`, `BaseModelNotReady` (nothing moves; what serves keeps serving); "
        "False: `AsExpected`. "
        "With several regions, a message names the region. "
        "`Learning` (only with `continuousLearning.enabled`): True `Collecting`, `TrainingRunCreated`, `WaitingForRun`, "
        "`MinIntervalNotElapsed`; False `StoreUnreachable`, `InvalidSchedule`, `SnapshotFailed` (serving is not affected; "
        "the message says why, and counts records skipped in damaged segments).",
    )
    phase: Phase | None = Field(default=None, description="Summary of the regions' phases, derived from the conditions, for humans.")
    active_color: Color | None = Field(default=None, description="Color receiving traffic in the first region.")
    revision: str | None = Field(default=None, max_length=64, description="Pod revision served in the first region.")
    served_adapters: list[ServedAdapterStatus] | None = Field(default=None, max_length=64, description="Served name -> Adapter, now (first region).")
    served_summary: str | None = Field(default=None, max_length=256, description="`name=adapter,…` (the `Adapters` column; cut at 256 characters).")
    regions: list[RegionStatus] | None = Field(default=None, max_length=32, description="Per-region state (what global traffic steering, e.g. DNS/GSLB, reads).")
    endpoint: str | None = Field(default=None, max_length=512, description="URL of the active Service of the first region.")
    ready_replicas: int | None = Field(default=None, ge=0, description="Ready replicas of the active colors, all regions (the `/scale` subresource's status).")
    desired_replicas: int | None = Field(default=None, ge=0, description="Replicas the active colors should have, all regions.")
    ready_summary: str | None = Field(default=None, max_length=32, description="`<ready>/<desired>` replicas, all regions (the `Ready` column).")
    selector: str | None = Field(default=None, max_length=1024, description="Label selector of the active color's pods in this cluster (the `/scale` subresource's selector).")
    new_feedback_records: int | None = Field(default=None, ge=0, description="Rated records not yet trained on.")
    last_training_run: str | None = Field(default=None, max_length=253, description="Latest TrainingRun created from feedback.")
    last_training_time: str | None = Field(default=None, max_length=64, description="When it was created.")


class DeploymentResource(Resource, KindInfo):
    kind: Literal["Deployment"] = "Deployment"
    spec: DeploymentSpec
    status: DeploymentStatus | None = None

    plural: ClassVar[str] = "deployments"
    singular: ClassVar[str] = "deployment"
    short_names: ClassVar[list[str]] = ["pdeploy", "pdep"]
    description: ClassVar[str] = "Serving a base model with LoRA adapters on vLLM (or the CPU engine): blue-green across regions, autoscaling, feedback capture and continuous learning."
    # Every column reads one precomputed field (cheap for the API server's table printer).
    printer_columns: ClassVar[list[PrinterColumn]] = [
        PrinterColumn(name="Base", type="string", json_path=".spec.baseModelRef.name"),
        PrinterColumn(name="Adapters", type="string", json_path=".status.servedSummary", description="Served name=Adapter."),
        PrinterColumn(name="Active", type="string", json_path=".status.activeColor", description="Color receiving traffic."),
        PrinterColumn(name="Ready", type="string", json_path=".status.readySummary", description="Ready/desired replicas, all regions."),
        PrinterColumn(name="Phase", type="string", json_path=".status.phase"),
        PrinterColumn(name="Engine", type="string", json_path=".spec.engine.type", priority=1),
        PrinterColumn(name="Revision", type="string", json_path=".status.revision", priority=1),
        PrinterColumn(name="Endpoint", type="string", json_path=".status.endpoint", priority=1),
        PrinterColumn(name="Feedback", type="integer", json_path=".status.newFeedbackRecords", priority=1),
        age_column(),
    ]
    scale: ClassVar[ScaleSubresource | None] = ScaleSubresource(
        spec_replicas_path=".spec.replicas", status_replicas_path=".status.readyReplicas", label_selector_path=".status.selector"
    )
