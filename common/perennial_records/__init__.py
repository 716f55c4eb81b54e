"""Record schemas of the feedback store.

The feedback sidecar writes these as JSON lines into append-only segment files;
the operator counts them; the trainer turns them into SFT / DPO / GRPO data. One
schema, shared by all three. Records are data files, not Kubernetes objects, so
floats are fine here.

A segment file is JSON Lines; every line is one record, tagged by `kind`.
Segment names: `<deployment>/<yyyy>/<mm>/<dd>/<pod>-<seq:08d>.jsonl` under the
store URI (see `segment_name`).
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Annotated, Any, Literal, Union

import pydantic
from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

RECORD_SCHEMA_VERSION = 1


class _RandomHex:
    """128-bit random ids as 32 hex digits, as unguessable as uuid4's, from os.urandom read 4 KB
    at a time: uuid4() makes a getrandom() system call per id, a measurable part of a feedback
    request. An id is handed out by one `next()` on an iterator of the ids cut from one read (a C
    call, atomic under the GIL: no lock, and no id is ever handed out twice, even when two threads
    refill at once). A forked child starts from fresh bytes (never the parent's)."""

    def __init__(self) -> None:
        self._refill()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._refill)

    def _refill(self) -> None:
        h = os.urandom(4096).hex()
        self._ids = iter([h[i:i + 32] for i in range(0, len(h), 32)])

    def __call__(self) -> str:
        for fid in self._ids:  # the first id left, if any
            return fid
        self._refill()
        return self()


random_hex = _RandomHex()


class _Record(pydantic.BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    schema_version: int = Field(default=RECORD_SCHEMA_VERSION, description="Record schema version.")
    time: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(), description="When the record was made (RFC 3339).")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


class ChatMessage(pydantic.BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[Any] | None = None


class Usage(pydantic.BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)


class InteractionRecord(_Record):
    """One request/response pair seen by the sidecar (after PII redaction)."""

    kind: Literal["interaction"] = "interaction"
    id: str = Field(min_length=1, max_length=128, description="Response id the client rates later (also the response's `id` and `X-Request-Id`).")
    deployment: str = Field(default="", max_length=253, description="Name of the Perennial Deployment that served it.")
    namespace: str = Field(default="", max_length=63)
    revision: str = Field(default="", max_length=128, description="Deployment revision / color that served it.")
    region: str = Field(default="", max_length=63)
    model: str = Field(default="", max_length=256, description="Served model name the client asked for.")
    adapter: str | None = Field(default=None, max_length=256, description="Adapter that produced the response, if any.")
    endpoint: Literal["chat.completions", "completions"] = "chat.completions"
    messages: list[ChatMessage] | None = Field(default=None, description="Chat request messages (chat endpoint).")
    prompt: str | None = Field(default=None, description="Prompt (completions endpoint).")
    params: dict[str, Any] = Field(default_factory=dict, description="Sampling parameters of the request (temperature, max_tokens, ...).")
    response: str = Field(default="", description="Response text.")
    finish_reason: str | None = None
    usage: Usage | None = None
    latency_ms: float | None = Field(default=None, ge=0)
    stream: bool = False


FeedbackType = Literal["score", "thumbs", "label", "correction", "preference"]


class FeedbackRecord(_Record):
    """One rating of a response, from `POST /v1/feedback`."""

    kind: Literal["feedback"] = "feedback"
    id: str = Field(default_factory=lambda: "fb-" + random_hex(), max_length=128, description="Feedback id (idempotency key).")
    response_id: str = Field(min_length=1, max_length=128, description="Id of the rated response.")
    type: FeedbackType = Field(description="Kind of feedback.")
    score: float | None = Field(default=None, ge=-1e6, le=1e6, description="Numeric score (type `score`).")
    thumbs: Literal["up", "down"] | None = Field(default=None, description="Thumbs up/down (type `thumbs`).")
    label: str | None = Field(default=None, max_length=256, description="Free label (type `label`).")
    correction: str | None = Field(default=None, max_length=65536, description="What the response should have been (type `correction`).")
    other_response_id: str | None = Field(default=None, max_length=128, description="With type `preference`: the response compared with `response_id`.")
    chosen: Literal["this", "other"] | None = Field(default=None, description="With type `preference`: whether `response_id` (`this`) or `other_response_id` (`other`) is the better one.")
    comment: str | None = Field(default=None, max_length=4096)
    user: str | None = Field(default=None, max_length=256, description="Opaque user id (hashed by the client if needed).")
    deployment: str = Field(default="", max_length=253)
    namespace: str = Field(default="", max_length=63)
    response_seen: bool | None = Field(default=None, description=(
        "Whether the sidecar process that took this feedback had served `response_id` itself (within its memory of recent "
        "responses). False is normal with several replicas or workers (the response was served by another one); a "
        "consumer joins feedback to interactions by `response_id` over the whole store and drops what matches nothing."))

    @pydantic.model_validator(mode="after")
    def _check_type_fields(self) -> "FeedbackRecord":
        need = {
            "score": self.score is not None,
            "thumbs": self.thumbs is not None,
            "label": bool(self.label),
            "correction": bool(self.correction),
            "preference": bool(self.other_response_id) and self.chosen is not None,
        }
        if not need[self.type]:
            field = {"score": "score", "thumbs": "thumbs", "label": "label", "correction": "correction", "preference": "otherResponseId` and `chosen"}[self.type]
            raise ValueError(f"feedback of type `{self.type}` must set `{field}`")
        return self

    def reward(self) -> float | None:
        """A scalar in [0, 1] where one can be derived (score in [0,1] or thumbs)."""
        if self.type == "thumbs":
            return 1.0 if self.thumbs == "up" else 0.0
        if self.type == "score" and self.score is not None:
            return max(0.0, min(1.0, self.score))
        return None


Record = Annotated[Union[InteractionRecord, FeedbackRecord], Field(discriminator="kind")]
_record_adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(Record)


def parse_record(line: str | bytes) -> InteractionRecord | FeedbackRecord:
    """Parse one JSON line of a segment into its record type."""
    return _record_adapter.validate_json(line)


def segment_name(deployment: str, pod: str, seq: int, when: _dt.datetime | None = None) -> str:
    """Object name of a closed segment in the feedback store (idempotent: same inputs, same name)."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    return f"{deployment}/{when:%Y/%m/%d}/{pod}-{seq:08d}.jsonl"
