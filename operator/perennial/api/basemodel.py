"""BaseModel: an open model to specialize."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .common import (
    MODEL_URI,
    CommonStatus,
    ComputeResources,
    KindInfo,
    LocalObjectReference,
    Model,
    PrinterColumn,
    Quantity,
    Resource,
    age_column,
    cel,
    ready_column,
    validations,
)


class ModelSource(Model):
    """Where the weights live."""

    uri: str = Field(
        min_length=8,
        max_length=2048,
        pattern=MODEL_URI,
        description="Weights location: `hf://<org>/<name>`, `s3://bucket/prefix`, `gs://bucket/prefix`, `pvc://<claim>/<path>` or `file:///abs/path`.",
    )
    revision: str | None = Field(default=None, max_length=256, description="Revision (git ref or commit) for `hf://` sources.")
    credentials_secret_ref: LocalObjectReference | None = Field(
        default=None,
        description="Secret with the credentials to read the source (`HF_TOKEN` for hf://; `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` for s3://; `GOOGLE_APPLICATION_CREDENTIALS_JSON` for gs://). Mounted by reference only.",
    )

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel("!has(self.revision) || self.uri.startsWith('hf://')", "`revision` may only be set for `hf://` sources", field_path=".revision"),
        )
    }


class ModelCache(Model):
    """A PVC the weights are downloaded into once, shared by training and serving pods."""

    enabled: bool = Field(default=False, description="Download the weights into a PVC before use.")
    size: Quantity = Field(default="50Gi", description="Size of the cache PVC.")
    storage_class_name: str | None = Field(default=None, max_length=253, description="StorageClass of the cache PVC; the cluster default if unset.")
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany"] = Field(default="ReadWriteMany", description="Access mode of the cache PVC; several readers need `ReadWriteMany`.")
    downloader_image: str | None = Field(default=None, max_length=512, description="Image of the download Job; the operator's trainer image if unset.")


class BaseModelSpec(Model):
    """An open model and what one replica of it needs."""

    source: ModelSource = Field(description="Where the weights live.")
    display_name: str | None = Field(default=None, max_length=256, description="Human-readable name.")
    max_model_len: int = Field(default=4096, ge=16, le=1048576, description="Maximum context length (tokens) to serve and train with.")
    resources: ComputeResources = Field(default_factory=ComputeResources, description="What one serving replica needs (GPUs, memory).")
    cache: ModelCache = Field(default_factory=ModelCache, description="Optional weight cache.")


class BaseModelStatus(CommonStatus):
    resolved_uri: str | None = Field(default=None, max_length=2048, description="Where consumers read the weights: the cache path when cached, else the source URI.")
    cache_claim_name: str | None = Field(default=None, max_length=253, description="Name of the cache PVC.")
    download_job_name: str | None = Field(default=None, max_length=253, description="Name of the download Job.")


class BaseModelResource(Resource, KindInfo):
    kind: Literal["BaseModel"] = "BaseModel"
    spec: BaseModelSpec
    status: BaseModelStatus | None = None

    plural: ClassVar[str] = "basemodels"
    singular: ClassVar[str] = "basemodel"
    short_names: ClassVar[list[str]] = ["bm", "pbm"]
    description: ClassVar[str] = "An open model to specialize: where its weights live, its revision, credentials by reference, and what one replica needs."
    printer_columns: ClassVar[list[PrinterColumn]] = [
        PrinterColumn(name="Source", type="string", json_path=".spec.source.uri"),
        PrinterColumn(name="GPUs", type="integer", json_path=".spec.resources.gpus", priority=1),
        ready_column(),
        PrinterColumn(name="Reason", type="string", json_path='.status.conditions[?(@.type=="Ready")].reason', priority=1),
        age_column(),
    ]
