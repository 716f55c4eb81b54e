"""Shared building blocks of the Perennial API types.

Pure pydantic: this module imports neither kopf nor the kubernetes client, so the
trainer and the server images can use it too.
"""

from __future__ import annotations

import datetime as _dt
from typing import Annotated, Any, ClassVar, Literal

import pydantic
from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "perennial.ai"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "perennial"

# Patterns used in several kinds.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DECIMAL = r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$"
QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
MODEL_URI = r"^(hf|s3|gs|pvc|file)://.+$"
ARTIFACT_URI = r"^((s3|gs|pvc|file)://.+|/.+)$"


def cel(rule: str, message: str, *, field_path: str | None = None, reason: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry."""
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    if reason:
        out["reason"] = reason
    return out


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


def exactly_one_of(*fields: str) -> dict[str, str]:
    terms = " + ".join(f"(has(self.{f}) ? 1 : 0)" for f in fields)
    names = ", ".join(f"`{f}`" for f in fields)
    return cel(f"{terms} == 1", f"exactly one of {names} must be set")


def at_most_one_of(*fields: str) -> dict[str, str]:
    terms = " + ".join(f"(has(self.{f}) ? 1 : 0)" for f in fields)
    names = ", ".join(f"`{f}`" for f in fields)
    return cel(f"{terms} <= 1", f"at most one of {names} may be set")


class Model(pydantic.BaseModel):
    """Base of every API type: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=False,
        use_enum_values=True,
    )

    def to_dict(self) -> dict[str, Any]:
        """The wire form: camelCase, unset optional fields omitted."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


Name = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
Decimal = Annotated[str, Field(max_length=32, pattern=DECIMAL)]
Quantity = Annotated[str, Field(max_length=32, pattern=QUANTITY)]
ShortText = Annotated[str, Field(max_length=256)]


class LocalObjectReference(Model):
    """A reference to an object of a known kind in the same namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Name of the referenced object, in the same namespace.")


class SecretKeySelector(Model):
    """A key of a Secret in the same namespace. Secrets are only ever referenced, never inlined."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Name of the Secret.")
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key within the Secret.")


class Toleration(Model):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: str | None = Field(default=None, max_length=317, description="Taint key the toleration applies to; empty matches all keys.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="`Exists` or `Equal` (default `Equal`).")
    value: str | None = Field(default=None, max_length=63, description="Taint value the toleration matches.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(default=None, description="Taint effect to match; empty matches all effects.")
    toleration_seconds: int | None = Field(default=None, description="For `NoExecute`: how long the pod stays bound after the taint appears.")


class ComputeResources(Model):
    """What one pod (a training Job's pod, or one serving replica) needs."""

    gpus: int = Field(default=0, ge=0, le=16, description="Number of GPUs (`nvidia.com/gpu`) per pod. 0 runs on CPU.")
    gpu_resource_name: str = Field(default="nvidia.com/gpu", max_length=63, description="Extended resource name of the GPU.")
    cpu: Quantity | None = Field(default=None, description="CPU request and limit, e.g. `\"8\"`.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit, e.g. `\"64Gi\"`.")
    shared_memory: Quantity | None = Field(default=None, description="Size of the /dev/shm tmpfs PyTorch needs, e.g. `\"16Gi\"`.")
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, max_length=16, description="Node labels the pod must be scheduled on, e.g. a GPU product label."
    )
    tolerations: list[Toleration] | None = Field(default=None, max_length=16, description="Tolerations, e.g. for tainted GPU nodes.")
    affinity: dict[str, Any] | None = Field(default=None, description="A core/v1 Affinity, passed to the pod unchanged.", json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    priority_class_name: str | None = Field(default=None, max_length=253, description="PriorityClass of the pod.")


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(Model):
    """A Kubernetes API convention condition."""

    type: str = Field(max_length=316, pattern=r"^[A-Z][A-Za-z0-9]*$", description="PascalCase state, e.g. `Ready`, `Succeeded`.")
    status: ConditionStatus = Field(description="`True`, `False` or `Unknown`.")
    reason: str = Field(default="", max_length=1024, description="CamelCase machine-readable reason for the last transition.")
    message: str = Field(default="", max_length=32768, description="Human-readable detail.")
    last_transition_time: str | None = Field(default=None, max_length=64, description="When `status` last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, ge=0, description="`metadata.generation` this condition was computed from.")


class Metric(Model):
    """One named number, as a decimal string (no floats in the API)."""

    name: str = Field(max_length=128, description="Metric name, e.g. `eval/mean_reward`.")
    value: str = Field(max_length=64, description="Value as a decimal string.")


class CommonStatus(Model):
    """Fields every kind's status has."""

    observed_generation: int | None = Field(default=None, ge=0, description="The `metadata.generation` the status was last computed from.")
    conditions: list[Condition] | None = Field(default=None, max_length=16, description="Current state, per the Kubernetes API conventions.")

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", use_enum_values=True)


def now_rfc3339() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class PrinterColumn(Model):
    name: str
    type: Literal["string", "integer", "number", "boolean", "date"]
    json_path: str
    description: str | None = None
    priority: int | None = None


class ScaleSubresource(Model):
    """The CRD's `/scale` subresource (what `kubectl scale` and autoscalers use)."""

    spec_replicas_path: str
    status_replicas_path: str
    label_selector_path: str | None = None


class KindInfo:
    """CRD-level metadata every resource model declares."""

    kind: ClassVar[str]
    plural: ClassVar[str]
    singular: ClassVar[str]
    short_names: ClassVar[list[str]]
    printer_columns: ClassVar[list[PrinterColumn]]
    description: ClassVar[str]
    #: A `/scale` subresource next to `/status`, when the kind has one.
    scale: ClassVar[ScaleSubresource | None] = None


class ObjectMeta(pydantic.BaseModel):
    """The part of metadata the controllers read; everything else passes through."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None


class Resource(Model):
    """A whole custom object: apiVersion, kind, metadata, spec, status."""

    api_version: str = API_VERSION
    kind: str
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", use_enum_values=True)


def ready_column() -> PrinterColumn:
    return PrinterColumn(name="Ready", type="string", json_path='.status.conditions[?(@.type=="Ready")].status')


def age_column() -> PrinterColumn:
    return PrinterColumn(name="Age", type="date", json_path=".metadata.creationTimestamp")
