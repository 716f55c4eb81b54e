"""TrainingRun: one fine-tuning job (SFT, DPO or GRPO) producing one Adapter."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from .common import (
    ARTIFACT_URI,
    DNS_SUBDOMAIN,
    CommonStatus,
    ComputeResources,
    Decimal,
    KindInfo,
    LocalObjectReference,
    Metric,
    Model,
    Name,
    PrinterColumn,
    Resource,
    age_column,
    at_most_one_of,
    cel,
    exactly_one_of,
    validations,
)

Method = Literal["SFT", "DPO", "GRPO"]

#: GRPO completions per prompt when `hyperparameters.numGenerations` is unset (the trainer's default too).
GRPO_DEFAULT_NUM_GENERATIONS = 8
#: Evaluation's generation length when neither `evaluation.maxCompletionLength` nor
#: `hyperparameters.maxCompletionLength` is set.
EVAL_DEFAULT_MAX_COMPLETION_LENGTH = 128


def grpo_batch_rule() -> dict[str, str]:
    """GRPO: the per-device batch counts completions, so it must hold whole groups of `numGenerations`."""
    return cel(
        "self.method != 'GRPO' || !has(self.hyperparameters.batchSize) || "
        f"self.hyperparameters.batchSize % (has(self.hyperparameters.numGenerations) ? self.hyperparameters.numGenerations : {GRPO_DEFAULT_NUM_GENERATIONS}) == 0",
        f"`hyperparameters.batchSize` must be a multiple of `hyperparameters.numGenerations` ({GRPO_DEFAULT_NUM_GENERATIONS} when unset) when `method` is 'GRPO'",
        field_path=".hyperparameters.batchSize",
        reason="FieldValueInvalid",
    )


class FeedbackSnapshot(Model):
    """Exactly these segments of a Deployment's feedback store (written by the operator)."""

    deployment_ref: LocalObjectReference = Field(description="The Deployment whose feedback is used.")
    store_uri: str | None = Field(default=None, max_length=2048, description="The feedback store (fsspec URI); the Deployment's if unset.")
    segments: list[Annotated[str, Field(max_length=512)]] = Field(default_factory=list, max_length=10000, description=(
        "Segment object names, relative to `storeUri`. Empty (and no `snapshot`) means every segment of the Deployment "
        "(`<deployment>/` in the store) present when the run starts. With `snapshot`: empty, or exactly its segments."))
    snapshot: str | None = Field(default=None, max_length=2048, description=(
        "A dataset snapshot document written by continuous learning (relative to `storeUri`, or a URI): the run trains on "
        "exactly the segment byte ranges it lists, each verified against its sha256 first (a changed or missing segment "
        "fails the run), and reads its join segments only for the interactions its ratings rate."))
    min_rating: Decimal | None = Field(default=None, description="Only responses rated at least this (in [0, 1]) become SFT rows.")
    min_examples: int | None = Field(default=None, ge=1, le=10000000, description=(
        "Fail the run (reason `InsufficientData`) instead of training when the feedback yields fewer usable examples than "
        "this (rows after dropping unusable records). Default: SFT 16, DPO 16 pairs, GRPO 8 prompts."))


class DatasetSource(Model):
    """A dataset: a file (or directory) URI, or a snapshot of a Deployment's feedback."""

    name: Name = Field(description="Dataset name (lineage and metrics refer to it).")
    uri: str | None = Field(default=None, max_length=2048, description=(
        "`file://`, `s3://`, `gs://`, `pvc://<claim>/<path>` or an absolute path to a JSONL file (one JSON object per line) "
        "or a Parquet file, or to a directory: every `.jsonl`, `.json` and `.parquet` file under it, in name order. "
        "The row format depends on `method` (see `datasets`)."))
    feedback: FeedbackSnapshot | None = Field(default=None, description=(
        "Build the data from collected feedback instead. SFT: responses rated at least `minRating` (default 0.5; thumbs up is 1) "
        "and corrections; DPO: a correction over the original response, explicit preferences, and differently rated responses "
        "to the same prompt; GRPO: each distinct prompt, with its rating as `feedback_score` and its correction as `reference`."))
    format: Literal["Auto", "JSONL", "Parquet"] = Field(default="Auto", description="File format; `Auto` goes by the extension.")
    split: Literal["Train", "Eval"] = Field(default="Train", description="`Eval` datasets are used only for evaluation.")
    sha256: str | None = Field(default=None, max_length=64, pattern=r"^[a-f0-9]{64}$", description="Expected content hash; the run fails if the data differs.")

    model_config = Model.model_config | {"json_schema_extra": validations(exactly_one_of("uri", "feedback"))}


class Hyperparameters(Model):
    """Training hyperparameters; unset fields take the method's defaults."""

    learning_rate: Decimal | None = Field(default=None, description=(
        "Learning rate, e.g. `\"2e-4\"`. Default: SFT 2e-4, DPO 5e-5, GRPO 1e-5, or 1e-3 for a base model under 50M parameters "
        "(a toy: 1e-5 taught it nothing in the rft_efficacy benchmark; the set applied is in the run's result, `grpoDefaults`)."))
    epochs: int | None = Field(default=None, ge=1, le=1000, description="Epochs over the training data.")
    max_steps: int | None = Field(default=None, ge=1, le=10000000, description="Stop after this many optimizer steps (overrides `epochs`).")
    batch_size: int | None = Field(default=None, ge=1, le=4096, description=(
        "Per-device batch size (for GRPO: completions per step, a multiple of `numGenerations`; when unset one prompt's "
        "`numGenerations`, or 8 prompts' for a base model under 50M parameters). Default for SFT and DPO: 8."))
    gradient_accumulation_steps: int | None = Field(default=None, ge=1, le=1024, description="Gradient accumulation steps.")
    max_length: int | None = Field(default=None, ge=16, le=1048576, description="Maximum sequence length in tokens.")
    warmup_ratio: Decimal | None = Field(default=None, description="Fraction of steps for learning-rate warm-up.")
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Random seed.")
    beta: Decimal | None = Field(default=None, description="DPO beta / GRPO KL coefficient.")
    num_generations: int | None = Field(default=None, ge=2, le=256, description=f"GRPO: completions sampled per prompt (default {GRPO_DEFAULT_NUM_GENERATIONS}).")
    max_completion_length: int | None = Field(default=None, ge=1, le=65536, description=(
        "Maximum length in tokens of generated completions: GRPO's sampled completions (default 256), and, for every method, "
        "evaluation's generations unless `evaluation.maxCompletionLength` is set."))
    temperature: Decimal | None = Field(default=None, description="GRPO: sampling temperature.")
    entropy_coef: Decimal | None = Field(default=None, description="GRPO: entropy bonus coefficient (default 0, or 0.05 for a base model under 50M parameters).")


class LoRAConfig(Model):
    """Shape of the LoRA adapter."""

    rank: int = Field(default=16, ge=1, le=512, description="LoRA rank `r`.")
    alpha: int = Field(default=32, ge=1, le=4096, description="LoRA alpha.")
    dropout: Decimal = Field(default="0.05", description="LoRA dropout.")
    target_modules: list[Annotated[str, Field(max_length=128)]] = Field(default_factory=lambda: ["all-linear"], min_length=1, max_length=64, description="Modules to adapt (`all-linear` or module names).")
    quantization: Literal["None", "4bit"] = Field(default="None", description=(
        "`4bit`: QLoRA. The frozen base weights are loaded in 4-bit NF4 (bitsandbytes, double quantization, bf16 compute), "
        "about a quarter of their bf16 memory, so a base model about 3x larger fits the same GPUs; the adapter itself is an "
        "ordinary LoRA adapter. Needs CUDA GPUs and bitsandbytes in the trainer image (a CPU run fails with `InvalidConfig`); "
        "several processes train it with DDP (no FSDP)."))


class Evaluation(Model):
    """Held-out evaluation against the parent adapter (or the base model)."""

    enabled: bool = Field(default=True, description="Evaluate the new adapter and its baseline after training.")
    held_out_percent: int = Field(default=10, ge=0, le=50, description="Percent of the training data held out when no `Eval` dataset is given.")
    max_samples: int = Field(default=256, ge=1, le=100000, description="At most this many evaluation prompts.")
    reward_spec_ref: LocalObjectReference | None = Field(default=None, description="Graders for evaluation; the run's `rewardSpecRef` if unset.")
    max_completion_length: int | None = Field(default=None, ge=1, le=65536, description=(
        "Maximum length in tokens of the completions generated for evaluation (greedy), for every method; "
        f"`hyperparameters.maxCompletionLength` if unset, else {EVAL_DEFAULT_MAX_COMPLETION_LENGTH}."))
    fail_if_worse_than_parent: bool = Field(default=False, description=(
        "Fail the run (reason `WorseThanParent`, or `WorseThanBase` without a parent; no Adapter is made) when the new "
        "adapter's held-out mean reward is below its baseline's. Unset, such a run succeeds with the `Improved` condition "
        "False, a Warning Event and the `Warnings` column."))


class Output(Model):
    """Where the adapter goes and what it is called."""

    adapter_family: Name = Field(description="Adapter family; the Adapter is named `<family>-v<N>` (a Deployment can track a family).")
    artifact_uri: str | None = Field(default=None, max_length=2048, pattern=ARTIFACT_URI, description="Prefix under which the artifact is written (`<prefix>/<namespace>/<run>`); the operator's default store if unset.")
    credentials_secret_ref: LocalObjectReference | None = Field(default=None, description="Secret with credentials for the artifact store, mounted by reference.")


class RunPolicy(Model):
    """How the Job runs."""

    backoff_limit: int = Field(default=2, ge=0, le=20, description=(
        "Failed pods retried before the run fails; a retry resumes from the last checkpoint. Permanent trainer errors "
        "(invalid config, dataset, reward spec or model) fail the run at once; evicted or preempted pods are not counted."))
    active_deadline_seconds: int | None = Field(default=None, ge=60, le=30 * 86400, description="Fail the run after this long.")
    ttl_seconds_after_finished: int = Field(default=86400, ge=0, le=30 * 86400, description="Delete the finished Job after this long (the TrainingRun keeps its status).")
    checkpoint_every_steps: int = Field(default=50, ge=1, le=1000000, description="Checkpoint interval in optimizer steps.")
    image: str | None = Field(default=None, max_length=512, description="Trainer image; the operator's default if unset.")
    service_account_name: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN, description="ServiceAccount of the training pod (e.g. for workload identity to the artifact store).")


#: The engines a multi-node run (`resources.nodes` > 1) can run on; `Auto` picks the first the cluster serves.
DistributedEngine = Literal["Auto", "TrainJob", "JobSet", "IndexedJob"]


class EnvVar(Model):
    """One environment variable (a plain value)."""

    name: str = Field(max_length=128, pattern=r"^(NCCL|TORCH_NCCL|GLOO)_[A-Z0-9_]+$", description="`NCCL_*`, `TORCH_NCCL_*` or `GLOO_*`.")
    value: str = Field(max_length=1024, description="The value.")


class Distributed(Model):
    """How the pods of a multi-node run (`nodes` > 1) run as one group."""

    engine: DistributedEngine = Field(default="Auto", description=(
        "`Auto`: Kubeflow Trainer's `TrainJob` when the cluster serves it (`trainjobs.trainer.kubeflow.org`), else a `JobSet` "
        "(`jobsets.jobset.x-k8s.io`), else an indexed `batch/v1` Job with a headless Service; torchrun's c10d rendezvous "
        "joins the pods. Naming an engine the cluster does not serve fails the run (`EngineNotInstalled`). Which CRDs are "
        "served is read when the operator starts."))
    training_runtime: Name = Field(default="torch-distributed", description=(
        "TrainJob only: the ClusterTrainingRuntime (torch) the TrainJob runs on; its failure policy decides whether a failed "
        "pod restarts the group."))
    rendezvous_port: int = Field(default=29400, ge=1024, le=65535, description="Port of torchrun's c10d rendezvous on the first pod (IndexedJob, JobSet).")
    env: list[EnvVar] = Field(default_factory=list, max_length=32, description=(
        "NCCL / Gloo settings for every process (e.g. `NCCL_SOCKET_IFNAME`, `NCCL_IB_DISABLE`, `NCCL_DEBUG`)."))


class TrainingResources(ComputeResources):
    """What each training pod needs, and how many pods (nodes) train together."""

    nodes: int = Field(default=1, ge=1, le=128, description=(
        "Pods (nodes) training together, each with `gpus` GPUs and one trainer process per GPU (one on CPU). 1 runs a plain Job; "
        "more run one group on `distributed.engine`: one failed pod fails or restarts the whole group, never part of it."))
    distributed: Distributed = Field(default_factory=Distributed, description="Multi-node settings (used when `nodes` > 1).")


DATASETS_HELP = (
    "Training (and optional evaluation) data. Each row is a JSON object; its fields depend on `method`. "
    "SFT: `messages` (a chat: a list of `{role, content}`), or `prompt` and `completion` (strings, or `prompt` a chat and "
    "`completion` the assistant's reply as a string or a list of messages), or `text`. "
    "DPO: `prompt`, `chosen` and `rejected` (strings; with a chat `prompt`, the replies as strings or lists of messages). "
    "GRPO: `prompt` (a string or a chat; graders see it as `sample.prompt`); the row's other fields are the graders' `item` "
    "(e.g. `answer` for `{{item.answer}}`, `tests` for a Code grader, `feedback_score` for a HumanFeedback grader). "
    "Evaluation generates from the same `prompt` (or `messages` without its final assistant turns, or `text`) and grades "
    "with the row as `item`. A row missing its method's fields fails the run with reason `MissingColumn`."
)


class TrainingRunSpec(Model):
    """One fine-tuning job. Immutable once created."""

    method: Method = Field(description="`SFT`, `DPO` or `GRPO` (reinforcement fine-tuning against a RewardSpec).")
    base_model_ref: LocalObjectReference = Field(description="The BaseModel to adapt.")
    parent_adapter_ref: LocalObjectReference | None = Field(default=None, description=(
        "Continue training this Adapter (it must be of the same base model). At most one of `parentAdapterRef`, "
        "`parentTrainingRunRef` and `parentAdapterFamily` may be set; none trains a new adapter from the base model."))
    parent_training_run_ref: LocalObjectReference | None = Field(default=None, description=(
        "Continue training the Adapter that this TrainingRun produces: the run waits until that run has succeeded, "
        "so both runs can be applied at once. The resolved Adapter is recorded in `status.parentAdapterRef`."))
    parent_adapter_family: Name | None = Field(default=None, description=(
        "Continue training the newest Ready Adapter of this family, chosen when the run starts and recorded in "
        "`status.parentAdapterRef` (later Adapters of the family do not change it)."))
    reward_spec_ref: LocalObjectReference | None = Field(default=None, description="Graders: required for `GRPO`, used for evaluation otherwise.")
    datasets: list[DatasetSource] = Field(min_length=1, max_length=16, description=DATASETS_HELP)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Hyperparameters.")
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="LoRA shape.")
    resources: TrainingResources = Field(default_factory=lambda: TrainingResources(gpus=1), description="What each training pod needs, and how many pods train together (`nodes`).")
    evaluation: Evaluation = Field(default_factory=Evaluation, description="Evaluation settings.")
    output: Output = Field(description="Where the adapter goes.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Job policy.")

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel("self == oldSelf", "`spec` is immutable; create a new TrainingRun instead"),
            cel("self.method != 'GRPO' || has(self.rewardSpecRef)", "`rewardSpecRef` is required when `method` is 'GRPO'", field_path=".rewardSpecRef", reason="FieldValueRequired"),
            cel("self.datasets.exists(d, d.split == 'Train')", "at least one dataset must have `split` 'Train'", field_path=".datasets"),
            cel("self.datasets.all(d, self.datasets.exists_one(e, e.name == d.name))", "dataset names must be unique", field_path=".datasets"),
            at_most_one_of("parentAdapterRef", "parentTrainingRunRef", "parentAdapterFamily"),
            grpo_batch_rule(),
        )
    }


class Progress(Model):
    """Live training progress, read from the trainer's progress lines."""

    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, ge=0, description="Optimizer steps planned.")
    percent: int = Field(default=0, ge=0, le=100, description="Percent done.")
    eta_seconds: int | None = Field(default=None, ge=0, description="Estimated seconds left.")
    loss: str | None = Field(default=None, max_length=32, description="Last training loss.")
    mean_reward: str | None = Field(default=None, max_length=32, description="Last mean reward (GRPO).")
    frac_reward_zero_std: str | None = Field(default=None, max_length=32, description="GRPO: fraction of prompts whose completions all got the same reward (1.0 = no learning signal).")
    updated_at: str | None = Field(default=None, max_length=64, description="When progress was last read.")


class TrainingRunStatus(CommonStatus):
    phase: Literal["Pending", "Waiting", "Running", "Succeeded", "Failed"] | None = Field(default=None, description="Derived from conditions, for humans.")
    job_name: str | None = Field(default=None, max_length=253, description="Name of the training Job.")
    engine: Literal["Job", "IndexedJob", "JobSet", "TrainJob"] | None = Field(default=None, description=(
        "What runs the trainer: a `Job` (one pod), or for `resources.nodes` > 1 an `IndexedJob` (with a headless Service), a "
        "`JobSet` or a Kubeflow `TrainJob`, all named `jobName`."))
    start_time: str | None = Field(default=None, max_length=64, description="When the trainer started.")
    completion_time: str | None = Field(default=None, max_length=64, description="When the run finished.")
    progress: Progress | None = None
    progress_text: str | None = Field(default=None, max_length=32, description="`step/total` for display.")
    adapter_ref: LocalObjectReference | None = Field(default=None, description="The Adapter this run produced.")
    parent_adapter_ref: LocalObjectReference | None = Field(default=None, description=(
        "The parent Adapter this run continues, resolved from `spec.parentAdapterRef`, `spec.parentTrainingRunRef` "
        "or `spec.parentAdapterFamily`."))
    artifact_uri: str | None = Field(default=None, max_length=2048, description="Where the artifact was written.")
    metrics: list[Metric] | None = Field(default=None, max_length=64, description="Final metrics from the trainer.")
    warnings: str | None = Field(default=None, max_length=256, description=(
        "Why the run may not have helped, comma-separated: the reasons of the `LearningSignal` (`NoRewardVariance`, "
        "`RewardCollapsed`) and `Improved` (`WorseThanParent`, `WorseThanBase`) conditions that are False."))
    attempts: int | None = Field(default=None, ge=0, description="Pod attempts so far.")


class TrainingRunResource(Resource, KindInfo):
    kind: Literal["TrainingRun"] = "TrainingRun"
    spec: TrainingRunSpec
    status: TrainingRunStatus | None = None

    plural: ClassVar[str] = "trainingruns"
    singular: ClassVar[str] = "trainingrun"
    short_names: ClassVar[list[str]] = ["tr", "ptr"]
    description: ClassVar[str] = "One fine-tuning job (SFT, DPO or GRPO reinforcement fine-tuning) that trains a LoRA adapter on a GPU Job and produces an Adapter."
    printer_columns: ClassVar[list[PrinterColumn]] = [
        PrinterColumn(name="Method", type="string", json_path=".spec.method"),
        PrinterColumn(name="Base", type="string", json_path=".spec.baseModelRef.name"),
        PrinterColumn(name="Phase", type="string", json_path=".status.phase"),
        PrinterColumn(name="Progress", type="string", json_path=".status.progressText"),
        PrinterColumn(name="Loss", type="string", json_path=".status.progress.loss", priority=1),
        PrinterColumn(name="Reward", type="string", json_path=".status.progress.meanReward"),
        PrinterColumn(name="ETA", type="integer", json_path=".status.progress.etaSeconds", priority=1),
        PrinterColumn(name="Adapter", type="string", json_path=".status.adapterRef.name"),
        PrinterColumn(name="Warnings", type="string", json_path=".status.warnings",
                      description="Why the run may not have helped: NoRewardVariance, RewardCollapsed, WorseThanParent, WorseThanBase."),
        PrinterColumn(name="Succeeded", type="string", json_path='.status.conditions[?(@.type=="Succeeded")].status', priority=1),
        PrinterColumn(name="Signal", type="string", json_path='.status.conditions[?(@.type=="LearningSignal")].reason', priority=1,
                      description="GRPO: whether the rewards varied within groups (the `LearningSignal` condition's reason)."),
        PrinterColumn(name="ZeroStd", type="string", json_path=".status.progress.fracRewardZeroStd", priority=1,
                      description="GRPO: fraction of prompts whose completions all got the same reward (1 = no learning signal)."),
        age_column(),
    ]
