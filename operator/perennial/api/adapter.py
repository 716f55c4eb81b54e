"""Adapter: one immutable LoRA artifact and its lineage."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from .common import (
    ARTIFACT_URI,
    CommonStatus,
    Condition,
    KindInfo,
    LocalObjectReference,
    Metric,
    Model,
    Name,
    PrinterColumn,
    Resource,
    age_column,
    cel,
    ready_column,
    validations,
)
from .trainingrun import Method


class DatasetLineage(Model):
    name: str = Field(max_length=63, description="Dataset name in the run.")
    uri: str = Field(default="", max_length=2048, description="Dataset URI, or the feedback store for feedback snapshots.")
    sha256: str = Field(default="", max_length=64, description="Content hash of the data the run read.")
    rows: int | None = Field(default=None, ge=0, description="Rows used.")


class Lineage(Model):
    """Where the adapter came from."""

    training_run_ref: LocalObjectReference | None = Field(default=None, description="The TrainingRun that produced it (may be deleted since).")
    training_run_uid: str | None = Field(default=None, max_length=64, description="UID of that TrainingRun.")
    parent_adapter_ref: LocalObjectReference | None = Field(default=None, description="The adapter it continued from.")
    method: Method | None = Field(default=None, description="Training method.")
    datasets: list[DatasetLineage] = Field(default_factory=list, max_length=16, description="Datasets and their content hashes.")
    config_hash: str | None = Field(default=None, max_length=64, description="Hash of the resolved run config.")


class AdapterLoRA(Model):
    rank: int = Field(ge=1, le=512, description="LoRA rank.")
    alpha: int | None = Field(default=None, ge=1, le=4096, description="LoRA alpha.")
    target_modules: list[Annotated[str, Field(max_length=128)]] = Field(default_factory=list, max_length=64, description="Adapted modules.")


class AdapterSpec(Model):
    """An immutable record of a LoRA artifact."""

    base_model_ref: LocalObjectReference = Field(description="The BaseModel this adapter applies to.")
    family: Name = Field(description="Adapter family (a series of versions a Deployment can track).")
    version: int = Field(ge=1, le=1000000, description="Version within the family.")
    artifact_uri: str = Field(min_length=2, max_length=2048, pattern=ARTIFACT_URI, description="Where the PEFT artifact (`adapter_config.json`, `adapter_model.safetensors`) lives.")
    lora: AdapterLoRA = Field(description="LoRA shape (serving needs `maxLoraRank` >= rank).")
    lineage: Lineage = Field(default_factory=Lineage, description="Lineage.")

    model_config = Model.model_config | {"json_schema_extra": validations(cel("self == oldSelf", "`spec` is immutable: adapters are records"))}


class AdapterStatus(CommonStatus):
    conditions: list[Condition] | None = Field(
        default=None, max_length=16,
        description="`Ready`, `ArtifactAvailable`, `LineageConsistent`; `Improved` (False `WorseThanParent` / `WorseThanBase`: its "
        "held-out mean reward is below its baseline's, the numbers in the message) and `LearningSignal` (False `NoRewardVariance` / "
        "`RewardCollapsed`, from its run's metrics). On an Adapter made by a Deployment's continuous learning, "
        "`Promoted` (the Deployment's promotion gate, the numbers in the message): True `GatePassed`, `PromotedWithoutEvaluation`; "
        "False `BelowMinImprovement`, `BelowMinMeanReward`, `NoEvaluation`, or `RolledBack` (its live approval dropped below "
        "its parent's: for good, a `track` falls back to the adapter before it).",
    )
    metrics: list[Metric] | None = Field(default=None, max_length=64, description="Evaluation metrics (held-out mean reward of the adapter and its baseline, improvement, loss).")
    mean_reward: str | None = Field(default=None, max_length=32, description="Held-out mean reward.")
    improvement: str | None = Field(default=None, max_length=32, description="Mean reward minus the baseline's.")
    warnings: str | None = Field(default=None, max_length=256, description=(
        "The reasons of the `Improved` and `LearningSignal` conditions that are False, comma-separated (e.g. `WorseThanParent`)."))


class AdapterResource(Resource, KindInfo):
    kind: Literal["Adapter"] = "Adapter"
    spec: AdapterSpec
    status: AdapterStatus | None = None

    plural: ClassVar[str] = "adapters"
    singular: ClassVar[str] = "adapter"
    short_names: ClassVar[list[str]] = ["ad", "pad"]
    description: ClassVar[str] = "One immutable LoRA artifact: base model, artifact URI, LoRA shape, lineage and evaluation metrics."
    printer_columns: ClassVar[list[PrinterColumn]] = [
        PrinterColumn(name="Base", type="string", json_path=".spec.baseModelRef.name"),
        PrinterColumn(name="Family", type="string", json_path=".spec.family"),
        PrinterColumn(name="Version", type="integer", json_path=".spec.version"),
        PrinterColumn(name="Reward", type="string", json_path=".status.meanReward"),
        PrinterColumn(name="Improvement", type="string", json_path=".status.improvement", priority=1),
        PrinterColumn(name="Warnings", type="string", json_path=".status.warnings",
                      description="WorseThanParent, WorseThanBase, NoRewardVariance, RewardCollapsed."),
        ready_column(),
        age_column(),
    ]
