"""Documents the feedback store keeps about itself (`<deployment>/_perennial/` in the store).

Pure pydantic, no fsspec: the trainer reads a snapshot with `Snapshot.model_validate_json`.

A **part** is a byte range of one segment object: `[offset, offset + length)`, whole lines only,
with the sha256 of exactly those bytes. A segment normally has one part (offset 0, its whole
size). When an object grows after it was indexed (same name, the old bytes still its prefix),
the new bytes become a second part; when it is rewritten (the old bytes are not its prefix), its
old parts are dropped and its new content is one new part. Parts are the unit of exactly-once:
each part is listed in at most one snapshot, and a part's identity is `(name, offset, sha256)`.

A **snapshot** (`<deployment>/_perennial/snapshots/<name>.json`, written once, never changed)
lists the parts whose ratings a TrainingRun trains on (`segments`), oldest first, plus
`joinSegments`: parts of earlier snapshots (or not yet snapshotted) that hold the interactions
rated in `segments` but not found there (ratings that arrived after their interaction's
segment was snapshotted). A consumer trains on the feedback records of `segments` only and uses
the interactions of `segments` + `joinSegments` to join them by response id (`responseId` of a
feedback record = `id` of an interaction); an interaction's own earlier ratings were trained on
in the snapshot that holds them. `cursor` says where the next snapshot starts.
"""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

SNAPSHOT_API_VERSION = "perennial.ai/v1alpha1"
#: Skip reasons counted per part (CamelCase, as a condition's reason).
SKIP_REASONS = ("InvalidJSON", "UnknownKind", "InvalidRecord", "TornLine")


class _Doc(pydantic.BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


class SegmentPart(_Doc):
    """A byte range of one segment object, whole lines only, and what it holds."""

    name: str = Field(min_length=1, max_length=1024, description="Object name relative to the store URI.")
    offset: int = Field(default=0, ge=0)
    length: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[a-f0-9]{64}$", description="sha256 of the bytes [offset, offset+length).")
    interactions: int = Field(default=0, ge=0)
    ratings: int = Field(default=0, ge=0, description="Feedback records (any type).")
    first_time: str | None = Field(default=None, description="Earliest record time in the part (RFC 3339, UTC).")
    last_time: str | None = Field(default=None, description="Latest record time in the part.")
    oldest_rating_time: str | None = Field(default=None, description="Earliest feedback record time in the part.")
    skipped: dict[str, int] = Field(default_factory=dict, description="Lines skipped, by reason.")

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.name, self.offset, self.sha256)

    @property
    def end(self) -> int:
        return self.offset + self.length


class SegmentRef(_Doc):
    """A part referenced only for joining (its ratings are not trained on here)."""

    name: str = Field(min_length=1, max_length=1024)
    offset: int = Field(default=0, ge=0)
    length: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[a-f0-9]{64}$")
    snapshot: str | None = Field(default=None, description="The snapshot that trained on this part's ratings, if any yet.")


class Cursor(_Doc):
    """Where the next snapshot of a Deployment starts: its sequence number; every part listed by the
    snapshots before it (`sequence` 1 .. `sequence`-1) is consumed."""

    sequence: int = Field(default=1, ge=1, description="Sequence number of the next snapshot.")
    after: str | None = Field(default=None, description="Name of the last snapshot (sequence - 1), if any.")


class TimeWindow(_Doc):
    start: str | None = None
    end: str | None = None


class SnapshotCounts(_Doc):
    segments: int = 0
    interactions: int = 0
    ratings: int = 0
    skipped: dict[str, int] = Field(default_factory=dict)
    unmatched_ratings: int = Field(default=0, description="Ratings whose interaction was found neither in `segments` nor in `joinSegments` (within the look-back).")


class Snapshot(_Doc):
    """An immutable dataset snapshot of a Deployment's feedback."""

    api_version: Literal["perennial.ai/v1alpha1"] = SNAPSHOT_API_VERSION
    kind: Literal["FeedbackSnapshot"] = "FeedbackSnapshot"
    deployment: str = Field(min_length=1, max_length=253)
    name: str = Field(min_length=1, max_length=300)
    sequence: int = Field(ge=1)
    previous: str | None = Field(default=None, description="The snapshot before this one (sequence - 1).")
    segments: list[SegmentPart] = Field(description="Parts whose ratings are trained on, oldest first.")
    join_segments: list[SegmentRef] = Field(default_factory=list, description="Earlier parts holding interactions rated in `segments`.")
    window: TimeWindow = Field(default_factory=TimeWindow, description="Earliest and latest record time in `segments`.")
    counts: SnapshotCounts = Field(default_factory=SnapshotCounts)
    cursor: Cursor = Field(description="Where the next snapshot starts.")

    def segment_names(self) -> list[str]:
        """Distinct object names of `segments`, in order (a part-unaware reader's list)."""
        return list(dict.fromkeys(p.name for p in self.segments))

    def identity(self) -> tuple:
        """What makes two writes of one snapshot the same: deployment, name, sequence and exactly these parts."""
        return (self.deployment, self.name, self.sequence, tuple(p.key + (p.length,) for p in self.segments))


def snapshot_name(deployment: str, sequence: int) -> str:
    """Deterministic snapshot name: a retry after a crash finds the same one."""
    return f"{deployment}-{sequence:08d}"
