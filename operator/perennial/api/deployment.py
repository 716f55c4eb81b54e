"""Deployment: serving a base model with adapters, blue-green, across regions, learning from feedback."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from .common import (
    CommonStatus,
    ComputeResources,
    Decimal,
    KindInfo,
    LocalObjectReference,
    Model,
    Name,
    PrinterColumn,
    Quantity,
    Resource,
    SecretKeySelector,
    age_column,
    cel,
    exactly_one_of,
    ready_column,
    validations,
)
from .trainingrun import Evaluation, Hyperparameters, LoRAConfig, Method, RunPolicy, grpo_batch_rule


class AdapterTrack(Model):
    """Follow the newest Adapter of a family that passed the promotion gate."""

    family: Name = Field(description="Adapter family to follow.")
    require_promotion: bool = Field(default=True, description="Only adapters that passed this Deployment's promotion gate.")


class ServedAdapter(Model):
    """One adapter served under a model name (as vLLM's `--lora-modules name=path`)."""

    name: Name = Field(description="Served model name clients ask for.")
    adapter_ref: LocalObjectReference | None = Field(default=None, description="Serve exactly this Adapter.")
    track: AdapterTrack | None = Field(default=None, description="Serve the latest promoted Adapter of a family.")

    model_config = Model.model_config | {"json_schema_extra": validations(exactly_one_of("adapterRef", "track"))}


class EngineSpec(Model):
    """The inference engine of each replica."""

    type: Literal["VLLM", "Transformers"] = Field(default="VLLM", description="`VLLM` on GPUs; `Transformers` is the CPU engine (laptops, CPU clusters).")
    image: str | None = Field(default=None, max_length=512, description="Server image; the operator's default if unset.")
    served_model_name: str | None = Field(default=None, max_length=256, description="Name the base model is served under; the BaseModel's name if unset.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=16, description="Tensor parallel size (GPUs per replica).")
    max_model_len: int | None = Field(default=None, ge=16, le=1048576, description="Max context length; the BaseModel's if unset.")
    max_loras: int = Field(default=4, ge=1, le=256, description="Adapters in one batch (`--max-loras`).")
    max_lora_rank: int = Field(default=64, ge=1, le=512, description="Largest LoRA rank served (`--max-lora-rank`).")
    max_cpu_loras: int | None = Field(default=None, ge=1, le=1024, description="Adapters cached in CPU memory (`--max-cpu-loras`).")
    gpu_memory_utilization: Decimal | None = Field(default=None, description="Fraction of GPU memory vLLM may use, e.g. `\"0.9\"`.")
    extra_args: list[Annotated[str, Field(max_length=1024)]] = Field(default_factory=list, max_length=64, description="Extra engine command-line arguments.")
    resources: ComputeResources | None = Field(default=None, description="Resources of one replica; the BaseModel's if unset.")


class SmokeTest(Model):
    """A request sent to the preview color before it receives traffic."""

    prompt: str = Field(default="Say hello.", max_length=4096, description="User message sent to each served model.")
    expect_regex: str | None = Field(default=None, max_length=1024, description="The response must match this pattern.")
    timeout_seconds: int = Field(default=60, ge=1, le=3600, description="Time limit of the smoke test.")


class BlueGreen(Model):
    """Blue-green rollout settings."""

    auto_promote: bool = Field(default=True, description="Switch traffic to the preview color when it is ready and the smoke test passes.")
    smoke_test: SmokeTest = Field(default_factory=SmokeTest, description="Check run on the preview color.")
    scale_down_delay_seconds: int = Field(default=300, ge=0, le=86400, description="Keep the old color this long after the switch, for instant rollback.")
    progress_deadline_seconds: int = Field(default=1800, ge=30, le=86400, description="Roll back when the preview color is not ready in this time.")
    preview_replicas: int | None = Field(default=None, ge=1, le=1000, description="Replicas of the preview color; the active color's count if unset.")


class RolloutStrategy(Model):
    type: Literal["BlueGreen"] = Field(default="BlueGreen", description="Rollout strategy.")
    blue_green: BlueGreen = Field(default_factory=BlueGreen, description="Blue-green settings.")
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

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel("self.minReplicas <= self.maxReplicas", "`minReplicas` must not exceed `maxReplicas`"),
            cel("self.minReplicas > 0 || self.provider == 'KEDA'", "`minReplicas` 0 needs `provider` 'KEDA'", field_path=".minReplicas"),
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
    evaluation: Evaluation = Field(default_factory=Evaluation, description="Evaluation settings.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Job policy.")
    continue_from_served: bool = Field(default=True, description="Use the currently served adapter of the family as parent.")

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel("self.method != 'GRPO' || has(self.rewardSpecRef)", "`rewardSpecRef` is required when `method` is 'GRPO'", field_path=".rewardSpecRef", reason="FieldValueRequired"),
            grpo_batch_rule(),
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
    replicas: int = Field(default=1, ge=0, le=1000, description="Replicas per region when autoscaling is off.")
    strategy: RolloutStrategy = Field(default_factory=RolloutStrategy, description="Rollout strategy.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Autoscaling.")
    regions: list[Region] = Field(default_factory=list, max_length=32, description="Regions; the operator's own cluster if empty.")
    feedback: FeedbackCapture = Field(default_factory=FeedbackCapture, description="Feedback capture.")
    continuous_learning: ContinuousLearning | None = Field(default=None, description="Continuous-learning policy.")
    paused: bool = Field(default=False, description="Stop rolling out changes.")

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel("self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))", "served adapter names must be unique", field_path=".adapters"),
            cel("self.regions.all(r, self.regions.exists_one(s, s.name == r.name))", "region names must be unique", field_path=".regions"),
            cel("!has(self.continuousLearning) || !self.continuousLearning.enabled || self.feedback.enabled", "`continuousLearning` needs `feedback.enabled`", field_path=".continuousLearning"),
        )
    }


class ServedAdapterStatus(Model):
    name: str = Field(max_length=63, description="Served model name.")
    adapter: str = Field(default="", max_length=253, description="Adapter served under it.")


class RegionStatus(Model):
    name: str = Field(max_length=63, description="Region name.")
    active_color: Literal["blue", "green"] | None = Field(default=None, description="Color receiving traffic.")
    ready_replicas: int = Field(default=0, ge=0, description="Ready replicas of the active color.")
    revision: str | None = Field(default=None, max_length=64, description="Hash of the served configuration.")
    message: str | None = Field(default=None, max_length=1024)


class DeploymentStatus(CommonStatus):
    active_color: Literal["blue", "green"] | None = Field(default=None, description="Color receiving traffic in the first region.")
    served_adapters: list[ServedAdapterStatus] | None = Field(default=None, max_length=64, description="What is served now.")
    regions: list[RegionStatus] | None = Field(default=None, max_length=32, description="Per-region state.")
    endpoint: str | None = Field(default=None, max_length=512, description="In-cluster URL of the active Service.")
    ready_replicas: int | None = Field(default=None, ge=0, description="Ready replicas, all regions.")
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
    printer_columns: ClassVar[list[PrinterColumn]] = [
        PrinterColumn(name="Base", type="string", json_path=".spec.baseModelRef.name"),
        PrinterColumn(name="Engine", type="string", json_path=".spec.engine.type"),
        PrinterColumn(name="Active", type="string", json_path=".status.activeColor"),
        PrinterColumn(name="Replicas", type="integer", json_path=".status.readyReplicas"),
        PrinterColumn(name="Feedback", type="integer", json_path=".status.newFeedbackRecords", priority=1),
        ready_column(),
        age_column(),
    ]
