"""Reading a Deployment's feedback store incrementally, and writing its dataset snapshots.

The sidecar ships closed segments (JSON Lines of `perennial_records` records) to
`<store>/<deployment>/<yyyy>/<mm>/<dd>/<pod>-<seq>.jsonl` (`perennial_records.segment_name`).
`FeedbackStore` (one per store URI, over fsspec: `pvc://` resolved under the operator's PVC root as
`perennial.storage` does, `file://`, plain paths, `memory://`, object stores) keeps, per Deployment:

**An index** of every segment it has read: size, ETag or mtime, sha256 and per part the counts
(interactions, ratings = feedback records, first/last record time, oldest rating, skipped lines by
reason). A tick (`scan`) lists the store and reads only segments that are new or whose
size/ETag/mtime changed since they were indexed, so it reads each record once, however long the
history. Listing is bounded too, by when segments can arrive. The sidecar names a segment by the UTC
day its pod *opened* it (`spool.py`: `<seq>-<yyyymmdd>.open`; `shipper.py` keeps that day in the
object name), not by its records' times nor by when it is shipped; it closes within its segment age
(60 s by default) and is shipped seconds later, retried with back-off up to a minute. So a day
directory receives segments until shortly after its day ends (`late_arrival_seconds` after midnight
UTC, default a day, covering clock skew and retries), except for segments held in a pod's spool
through a store outage, shipped whenever the store is back, into their old day's directory. Hence:

- a tick lists, by name (no listing of years or months), the days of its window (days whose end plus
  `late_arrival_seconds` is not past, through the day a pod's clock a few minutes ahead names), from
  where the last tick's window began (persisted: an operator down for days lists the days it missed);
- on a store that reports directory mtimes (local, PVC) it stats each older day held in memory and
  lists it when its mtime changed; on object stores those are left to the full rescan;
- an old day every part of which is in a snapshot is *sealed* (below): no tick looks at it again;
- every `full_rescan_seconds` (default 6 h; the time of the last one is persisted, so a restart does
  not start with one) every day directory is listed: what that finds where no tick looks is counted
  (`ScanResult.late_segments`, the `perennial_feedback_late_segments_total` metric) and logged.

An idle tick thus costs the snapshot listing, a listing per window day (and a stat per day held in
memory on local stores), however many days the store holds; a restarted operator reads the summary and
the index files of the days held in memory by name, and the snapshot documents that hold parts of those
days: the snapshots every part of which is in a sealed day (`sealed_sequence` in the summary) are loaded
only when something needs them (a late segment unsealing a day, a cursor before them, their documents or
parts asked for). Neither lists nor reads more as the history grows (the listing of the snapshot
documents, one call, lists one name per snapshot ever taken).

The index lives in the store itself, so it survives an operator restart:
`<deployment>/_perennial/index/<yyyy>-<mm>-<dd>.json`, one document per day directory of
segments (never one per tick: a tick rewrites, atomically, only the days it changed; the file count
is the number of day directories the store holds). The index is a cache: a lost or corrupt index
file only makes the next tick read that day's segments again, and what snapshots hold stays consumed.
In memory: the last `keep_days` days (default 1: what the late-arrival window lists anyway), and older
days only while some part of them is in no snapshot (~4 KB a segment). The old days every part of which
is in a snapshot are sealed: summarised in `<deployment>/_perennial/summary.json` (their counts and a
fingerprint of their listing, ~200 bytes a day), which also names the days held in memory, the last full
rescan and the last window: a restarted operator reads that and the index files of the days it names, no
segment and no listing of the index (without a summary, e.g. a store written by an older version, it
lists the index once); a full rescan reads the index file of a sealed day only when its listing changed
(a segment shipped late into it), which unseals it until it is consumed again.

**Snapshots**, the source of truth for exactly-once: `<deployment>/_perennial/snapshots/<name>.json`,
created once (create-only; the same parts written again return the existing document, different
parts under an existing name raise `SnapshotConflict`), named deterministically
(`snapshot_name(deployment, sequence)`), so a controller that crashed after writing one finds it
again (`latest_snapshot`, `take_snapshot(sequence=N)`) and creates the TrainingRun it owes. A part
(a byte range of a segment, see `snapshot.py`) is in at most one snapshot; a rating is trained on in
the snapshot that holds its record. What the next snapshot takes (`pending`) is every indexed part no
snapshot holds, oldest first -- including segments that arrived late with old names. Ratings that
arrive after their interaction's segment was snapshotted are in a later snapshot; that snapshot's
`joinSegments` names the earlier parts holding the interactions they rate (searched newest first
within `lookback_seconds` before the rating, at most `join_budget_bytes` read), so the trainer can
join them by response id.

**Live approval** (`approval`, for rolling back a promoted adapter users like less): thumbs per adapter
that served the rated response, joined by response id across segments, pods and ticks, over a window of
rating time; nothing is spent on it until it is first asked for.

Bad data never raises: a torn last line, invalid JSON, an unknown `kind` or a record that fails its
schema is counted by reason (`skipped`) and skipped; a segment over `max_segment_bytes` is not read
(`SegmentTooLarge`); symbolic links on a local store are never followed. A store that cannot be
listed or read, or that disappears (an unmounted volume, a deleted bucket), raises `StoreUnavailable`
(reason `FeedbackStoreUnavailable`), for a condition on the Deployment; the next tick after it is
back carries on where the last good one stopped.

Every method here blocks (fsspec I/O); from the operator's event loop call the `*_async`
wrappers (or `asyncio.to_thread`). Calls for one Deployment are serialised by a lock. Use
`shared_store(uri)` for the process's one object per store: a new object starts as after a restart.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import heapq
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pydantic
from fsspec.implementations.local import LocalFileSystem
from perennial_records import FeedbackRecord, InteractionRecord, parse_record
from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from perennial import storage

from .snapshot import (
    Cursor,
    SegmentPart,
    SegmentRef,
    Snapshot,
    SnapshotCounts,
    TimeWindow,
    snapshot_name,
)

log = logging.getLogger(__name__)

INDEX_VERSION = 1
META_DIR = "_perennial"
DEFAULT_LOOKBACK_SECONDS = 7 * 24 * 3600
JOIN_CLOCK_SKEW = _dt.timedelta(minutes=10)
DEFAULT_APPROVAL_WINDOW_SECONDS = 7 * 24 * 3600
#: A TrainingRun's `feedback.segments` holds at most this many names.
DEFAULT_MAX_SEGMENTS = 10000

_YEAR = re.compile(r"^\d{4}$")
_TWO = re.compile(r"^\d{2}$")
_SEQ = re.compile(r"-(\d{8})\.json$")


# ------------------------------------------------------------------------------------ errors



def utcnow() -> _dt.datetime:
    """The store's clock for "today" (which days are recent, which are old enough to leave memory): one function,
    so a test can hold it at one instant across midnight."""
    return _dt.datetime.now(_dt.UTC)

class FeedbackStoreError(Exception):
    """Base of this module's errors; `reason` is CamelCase, for a condition."""

    reason = "FeedbackStoreError"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason:
            self.reason = reason


class StoreUnavailable(FeedbackStoreError):
    """The store could not be listed, read or written (network, permissions, missing mount)."""

    reason = "FeedbackStoreUnavailable"


class SnapshotConflict(FeedbackStoreError):
    """A snapshot name already holds other parts, is not the next in sequence, or a part is already in another snapshot."""

    reason = "SnapshotConflict"


class SegmentChanged(FeedbackStoreError):
    """A part's bytes no longer match the index (the object changed since the last scan): scan again."""

    reason = "SegmentChanged"


class SnapshotCorrupt(FeedbackStoreError):
    """A snapshot document in the store cannot be read as one: what it consumed is unknown, so no new snapshot is taken."""

    reason = "SnapshotCorrupt"


# ------------------------------------------------------------------------------- index models


class _Doc(pydantic.BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SegmentEntry(_Doc):
    """What the index knows of one segment object."""

    name: str
    size: int = Field(ge=0)
    etag: str | None = None
    mtime: str | None = None
    sha256: str = Field(description="sha256 of the whole object as last read.")
    covered: int = Field(default=0, ge=0, description="End of the last part (bytes of whole lines indexed).")
    covered_sha256: str = Field(description="sha256 of bytes [0, covered).")
    torn_tail: int = Field(default=0, ge=0, description="Bytes after the last complete line (a torn line) at the last read.")
    too_large: bool = Field(default=False, description="Larger than the store's `max_segment_bytes`: not read.")
    parts: list[SegmentPart] = Field(default_factory=list)


class DaySummary(_Doc):
    """An old day held out of memory (every part of it in a snapshot): what it adds to the totals."""

    segments: int = Field(default=0, ge=0)
    skipped: dict[str, int] = Field(default_factory=dict)
    damaged_count: int = Field(default=0, ge=0)
    damaged_examples: list[str] = Field(default_factory=list)
    fingerprint: str = Field(description="sha256 of its segments' (name, size, ETag or mtime) when it was evicted.")
    dir_mtime: str | None = None


class IndexSummary(_Doc):
    """`<deployment>/_perennial/summary.json`: the sealed (evicted) days, so that a restart reads none of their index
    files; the days held in memory, so that a restart reads their index files by name instead of listing them all;
    when the last full rescan ran and where the last tick's window began, so that a restart lists no more than a
    tick does."""

    version: int = INDEX_VERSION
    deployment: str
    snapshot_sequence: int = Field(default=0, ge=0, description="The last snapshot when it was written: valid while snapshots 1..this exist.")
    sealed_sequence: int = Field(default=0, ge=0, description="Snapshots 1..this hold parts of sealed days only: a restart does not read them.")
    evicted: dict[str, DaySummary] = Field(default_factory=dict)
    live_days: list[str] | None = Field(default=None, description="Days held in memory (their index files are read on load); None: unknown, list the index.")
    last_full_rescan: float | None = Field(default=None, description="Wall-clock time (Unix seconds) of the last full rescan.")
    window_start: str | None = Field(default=None, description="First day (`yyyy/mm/dd`) the last tick listed as still receiving segments.")


class DayIndex(_Doc):
    version: int = INDEX_VERSION
    deployment: str
    day: str = Field(description="`yyyy/mm/dd`.")
    dir_mtime: str | None = None
    segments: list[SegmentEntry] = Field(default_factory=list)


# ------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Pending:
    """Rated records no snapshot holds yet (what the next snapshot would train on)."""

    ratings: int = 0
    interactions: int = 0
    parts: int = 0
    oldest_rating: _dt.datetime | None = None

    def age_seconds(self, now: _dt.datetime | None = None) -> float | None:
        """Age of the oldest pending rating (for `maxAgeSeconds`); None when none is pending or its time is unknown."""
        if self.oldest_rating is None:
            return None
        now = now or _dt.datetime.now(_dt.UTC)
        return max(0.0, (now - self.oldest_rating).total_seconds())


@dataclass
class ScanResult:
    deployment: str
    segments: int = 0  # segments in the index after the scan
    segments_in_memory: int = 0  # of which held in memory (the rest: old days every part of which is in a snapshot)
    new_segments: int = 0
    changed_segments: int = 0  # re-read: grown or rewritten
    removed_segments: int = 0  # gone from the store
    segments_read: int = 0
    bytes_read: int = 0
    records_read: int = 0  # lines parsed this tick (new parts only)
    days_listed: int = 0  # day directories listed this tick
    days_total: int = 0  # day directories known (held in memory or sealed)
    full_listing: bool = False  # this tick was a full rescan (every day directory of the store)
    late_segments: int = 0  # new segments a full rescan found where no tick looks (shipped later than the window)
    skipped: dict[str, int] = field(default_factory=dict)  # lines skipped over the whole index, by reason (SegmentTooLarge: segments)
    damaged_segments: int = 0  # segments with skipped lines or a torn last line
    damaged_examples: list[str] = field(default_factory=list)  # a few of their names (for a condition's message)
    pending: Pending = field(default_factory=Pending)
    cursor: Cursor = field(default_factory=Cursor)


# ------------------------------------------------------------------------------------ helpers


def _time(s: Any) -> str | None:
    """A record's time as a fixed-format UTC string (comparable as text), None when unreadable."""
    if not isinstance(s, str):
        return None
    try:
        t = _dt.datetime.fromisoformat(s)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    try:
        return t.astimezone(_dt.UTC).isoformat(timespec="microseconds")
    except (OverflowError, ValueError):
        return None


def _dt_of(s: str | None) -> _dt.datetime | None:
    return _dt.datetime.fromisoformat(s) if s else None


def _min(a: str | None, b: str | None) -> str | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: str | None, b: str | None) -> str | None:
    return b if a is None else a if b is None else max(a, b)


def _skip_reason(e: pydantic.ValidationError) -> str:
    kinds = {err.get("type") for err in e.errors()}
    if "json_invalid" in kinds:
        return "InvalidJSON"
    if kinds & {"union_tag_not_found", "union_tag_invalid"}:
        return "UnknownKind"
    return "InvalidRecord"


def _part_of(name: str, data: bytes, offset: int, end: int, collect: list[tuple[int, str, Any, str | None]] | None = None) -> tuple[SegmentPart, int]:
    """Index the whole lines of data[offset:end) as one part; returns it and the lines parsed. With `collect`, the
    join keys of live approval go there too: (0, interaction id, adapter or "", time), (1, rated id, thumbs up, time)."""
    chunk = data[offset:end]
    n_inter = n_rate = lines = 0
    first = last = oldest_rating = None
    skipped: Counter[str] = Counter()
    for line in chunk.split(b"\n"):
        if not line.strip():
            continue
        lines += 1
        try:
            rec = parse_record(line)
        except pydantic.ValidationError as e:
            skipped[_skip_reason(e)] += 1
            continue
        t = _time(rec.time)
        first, last = _min(first, t), _max(last, t)
        if isinstance(rec, FeedbackRecord):
            n_rate += 1
            oldest_rating = _min(oldest_rating, t)
            if collect is not None and rec.type == "thumbs":
                collect.append((1, rec.response_id, rec.thumbs == "up", t))
        else:
            n_inter += 1
            if collect is not None:
                collect.append((0, rec.id, rec.adapter or "", t))
    part = SegmentPart(name=name, offset=offset, length=len(chunk), sha256=hashlib.sha256(chunk).hexdigest(),
                       interactions=n_inter, ratings=n_rate, first_time=first, last_time=last,
                       oldest_rating_time=oldest_rating, skipped=dict(skipped))
    return part, lines


def _complete_end(data: bytes) -> int:
    """End of the last complete line. A final line without a newline counts as complete only when it is a valid record."""
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    if tail.strip():
        try:
            parse_record(tail)
            return len(data)
        except pydantic.ValidationError:
            return cut
    return len(data)


def _ident(info: dict[str, Any]) -> tuple[str | None, str | None]:
    """(etag, mtime) of an fsspec `info`/`ls(detail=True)` entry, whichever the filesystem reports."""
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("md5")
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated") or info.get("created")
    return (str(etag) if etag is not None else None, str(mtime) if mtime is not None else None)


def _dir_mtime(info: dict[str, Any]) -> str | None:
    m = info.get("mtime")
    return str(m) if m is not None else None


def _base(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


# ------------------------------------------------------------------------------------ live approval


@dataclass(frozen=True)
class Approval:
    """Thumbs given to the responses one adapter served (`""`: the base model)."""

    up: int = 0
    total: int = 0

    @property
    def rate(self) -> float:
        return self.up / self.total if self.total else 0.0


class _Approval:
    """Thumbs joined to the adapter that served the rated response, by response id, incrementally: each part is fed
    once; a rating read before its interaction waits for it. Tallied per adapter and hour of the rating. Holds at most
    `max_ids` interaction ids and as many waiting ratings (the oldest go first)."""

    def __init__(self, max_ids: int) -> None:
        self.max_ids = max_ids
        self.ids: OrderedDict[str, str] = OrderedDict()
        self.waiting: OrderedDict[str, list[tuple[str, bool]]] = OrderedDict()
        self.buckets: dict[tuple[str, str], list[int]] = {}
        self.fed: OrderedDict[tuple[str, int, str], None] = OrderedDict()  # parts fed (the newest max_ids)

    def _count(self, adapter: str, hour: str, up: bool) -> None:
        b = self.buckets.setdefault((adapter, hour), [0, 0])
        b[0] += up
        b[1] += 1

    def feed(self, key: tuple[str, int, str], items: Iterable[tuple[int, str, Any, str | None]]) -> None:
        if key in self.fed:
            return
        self.fed[key] = None
        if len(self.fed) > self.max_ids:
            self.fed.popitem(last=False)
        for kind, rid, val, t in items:
            hour = (t or "")[:13]
            if kind == 0:
                self.ids[rid] = val
                self.ids.move_to_end(rid)
                if len(self.ids) > self.max_ids:
                    self.ids.popitem(last=False)
                for h, up in self.waiting.pop(rid, ()):
                    self._count(val, h, up)
            elif (adapter := self.ids.get(rid)) is not None:
                self._count(adapter, hour, bool(val))
            else:
                self.waiting.setdefault(rid, []).append((hour, bool(val)))
                if len(self.waiting) > self.max_ids:
                    self.waiting.popitem(last=False)

    def tally(self, since_hour: str) -> dict[str, Approval]:
        out: dict[str, list[int]] = {}
        for (adapter, hour), (up, total) in self.buckets.items():
            if hour >= since_hour:
                o = out.setdefault(adapter, [0, 0])
                o[0] += up
                o[1] += total
        return {a: Approval(up, total) for a, (up, total) in sorted(out.items())}


# ------------------------------------------------------------------------------------ state


def _fingerprint(items: Iterable[tuple[str, int, str | None]]) -> str:
    """Of a day's segments as listed: (name, size, ETag or mtime) -- equal when the day holds what it held."""
    h = hashlib.sha256()
    for name, size, ident in sorted(items, key=lambda t: t[0]):
        h.update(f"{name}\t{size}\t{ident}\n".encode())
    return h.hexdigest()


def _entry_ident(e: SegmentEntry) -> tuple[str, int, str | None]:
    return (e.name, e.size, e.etag if e.etag is not None else e.mtime)


#: damaged segment names a summary keeps per evicted day (the count is exact)
DAMAGED_EXAMPLES = 20


class _State:
    """One Deployment's index and snapshots, in memory (loaded from the store on first use)."""

    def __init__(self, deployment: str) -> None:
        self.deployment = deployment
        self.lock = threading.Lock()
        self.loaded = False
        self.days: dict[str, dict[str, SegmentEntry]] = {}
        self.day_mtime: dict[str, str | None] = {}
        self.snapshots: dict[int, Snapshot] = {}  # loaded (snapshots of sealed days only are loaded when needed)
        self.listed: dict[int, str] = {}  # sequence -> path of every snapshot document in the store
        self.sealed_seq = 0  # snapshots 1..this hold parts of sealed days only (not loaded until needed)
        self.top = 0  # the highest snapshot sequence seen
        self.listed_once = False  # the snapshot documents were listed once (later looks read the next one by name)
        self.consumed: dict[tuple[str, int, str], int] = {}  # part key -> snapshot sequence
        self.snap_parts: dict[str, list[SegmentPart]] = {}  # segment name -> the parts snapshots hold
        self.unconsumed: dict[tuple[str, int, str], SegmentPart] = {}
        # running totals of `unconsumed` (a tick's pending() never walks the history)
        self.pending_ratings = 0
        self.pending_interactions = 0
        self._oldest: list[tuple[str, tuple[str, int, str]]] = []  # heap of (oldest rating time, key), lazily pruned
        self.skipped: Counter[str] = Counter()
        self.damaged: set[str] = set()  # segments with skipped lines or a torn tail
        self.last_full: float | None = None  # wall-clock time of the last full rescan (persisted in the summary)
        self.window_start: str | None = None  # first day of the last tick's late-arrival window (persisted too)
        self.saved_sig: tuple[Any, ...] | None = None  # what the summary in the store says of the three above
        # days dropped from memory (old, every part in a snapshot): what they add to the totals above
        self.evicted: dict[str, DaySummary] = {}
        self.evicted_version = 0  # bumped on every change of `evicted` (see `_sealed_totals`)
        self._sealed_cache: tuple[Any, ...] | None = None
        self.summary_dirty = False
        self.approval: _Approval | None = None  # live approval, once asked for

    # bookkeeping of entries, so that pending() and skipped totals never walk the whole index
    def add(self, day: str, entry: SegmentEntry) -> None:
        old = self.days.setdefault(day, {}).get(entry.name)
        if old is not None:
            self.remove(day, entry.name)
        self.days[day][entry.name] = entry
        for p in entry.parts:
            self.skipped.update(p.skipped)
            if p.key not in self.consumed:
                self._pend(p)
        if entry.torn_tail:
            self.skipped["TornLine"] += 1
        if entry.too_large:
            self.skipped["SegmentTooLarge"] += 1
        if entry.torn_tail or entry.too_large or any(p.skipped for p in entry.parts):
            self.damaged.add(entry.name)

    def remove(self, day: str, name: str) -> None:
        entry = self.days.get(day, {}).pop(name, None)
        if entry is None:
            return
        for p in entry.parts:
            self.skipped.subtract(p.skipped)
            self._unpend(p.key)
        if entry.torn_tail:
            self.skipped["TornLine"] -= 1
        if entry.too_large:
            self.skipped["SegmentTooLarge"] -= 1
        self.damaged.discard(name)

    def evict(self, day: str) -> None:
        """Drop a day's entries from memory (its index file in the store is current); its counts stay in the totals."""
        entries = self.days.pop(day, {})
        skipped: Counter[str] = Counter()
        damaged = []
        for e in entries.values():
            for p in e.parts:
                skipped.update(p.skipped)
            skipped["TornLine"] += bool(e.torn_tail)
            skipped["SegmentTooLarge"] += bool(e.too_large)
            if e.name in self.damaged:
                damaged.append(e.name)
                self.damaged.discard(e.name)
        self.evicted_version += 1
        self.evicted[day] = DaySummary(segments=len(entries), skipped={k: v for k, v in skipped.items() if v},
                                       damaged_count=len(damaged), damaged_examples=sorted(damaged)[:DAMAGED_EXAMPLES],
                                       fingerprint=_fingerprint(_entry_ident(e) for e in entries.values()),
                                       dir_mtime=self.day_mtime.get(day))
        self.summary_dirty = True

    def restore(self, day: str, doc: DayIndex | None) -> None:
        """An evicted day back in memory from its index file (without one, a lost file: its segments are read
        again; the snapshots keep what they consumed consumed)."""
        summary = self.evicted.pop(day, None)
        self.evicted_version += 1
        if summary is None:
            return
        self.summary_dirty = True
        self.skipped.subtract(summary.skipped)  # the entries bring their own counts back
        self.days.setdefault(day, {})
        for e in doc.segments if doc is not None else ():
            self.add(day, e)

    def _sealed_totals(self) -> tuple[int, int, list[str]]:
        """(segments, damaged segments, damaged examples) of the sealed days, recomputed only when they changed:
        a tick costs nothing per sealed day."""
        key = (self.evicted_version, len(self.evicted))
        if self._sealed_cache is None or self._sealed_cache[0] != key:
            names: set[str] = set()
            for v in self.evicted.values():
                names.update(v.damaged_examples)
            self._sealed_cache = (key, sum(v.segments for v in self.evicted.values()),
                                  sum(v.damaged_count for v in self.evicted.values()), sorted(names)[:DAMAGED_EXAMPLES])
        return self._sealed_cache[1:]

    def sealed_segments(self) -> int:
        return self._sealed_totals()[0]

    def damaged_count(self) -> int:
        return len(self.damaged) + self._sealed_totals()[1]

    def damaged_examples(self, n: int) -> list[str]:
        return sorted(set(self.damaged) | set(self._sealed_totals()[2]))[:n]

    def evictable(self, day: str) -> bool:
        return all(p.key in self.consumed for e in self.days.get(day, {}).values() for p in e.parts)

    def add_snapshot(self, snap: Snapshot) -> None:
        self.snapshots[snap.sequence] = snap
        self.top = max(self.top, snap.sequence)
        for p in snap.segments:
            self.consumed[p.key] = snap.sequence
            self.snap_parts.setdefault(p.name, []).append(p)
            self._unpend(p.key)

    def _pend(self, p: SegmentPart) -> None:
        if p.key in self.unconsumed:
            return
        self.unconsumed[p.key] = p
        self.pending_ratings += p.ratings
        self.pending_interactions += p.interactions
        if p.ratings and p.oldest_rating_time:
            heapq.heappush(self._oldest, (p.oldest_rating_time, p.key))

    def _unpend(self, key: tuple[str, int, str]) -> None:
        p = self.unconsumed.pop(key, None)
        if p is not None:
            self.pending_ratings -= p.ratings
            self.pending_interactions -= p.interactions

    def oldest_pending_rating(self) -> str | None:
        while self._oldest and self._oldest[0][1] not in self.unconsumed:
            heapq.heappop(self._oldest)
        return self._oldest[0][0] if self._oldest else None

    def next_sequence(self) -> int:
        return self.top + 1

    def note(self, seq: int, path: str) -> None:
        """A snapshot document seen in the store."""
        self.listed[seq] = path
        self.top = max(self.top, seq)

    def cursor(self) -> Cursor:
        seq = self.next_sequence()
        return Cursor(sequence=seq, after=snapshot_name(self.deployment, seq - 1) if seq > 1 else None)

    def lazy(self) -> bool:
        """Some snapshot in the store is not loaded (its parts, all in sealed days, are not in `consumed`)."""
        return any(seq not in self.snapshots for seq in self.listed)

    def find_part(self, key: tuple[str, int, str]) -> SegmentPart | None:
        if key in self.unconsumed:
            return self.unconsumed[key]
        for entries in self.days.values():
            e = entries.get(key[0])
            if e is not None:
                for p in e.parts:
                    if p.key == key:
                        return p
        return None

    def entry(self, name: str) -> SegmentEntry | None:
        for entries in self.days.values():
            if name in entries:
                return entries[name]
        return None


# ------------------------------------------------------------------------------------ the store


class FeedbackStore:
    """A feedback store (fsspec URI) as the operator reads it; see the module docstring."""

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        pvc_root: str | None = None,
        late_arrival_seconds: float = 86400.0,
        full_rescan_seconds: float = 6 * 3600.0,
        max_segment_bytes: int = 256 * 1024 * 1024,
        join_budget_bytes: int = 512 * 1024 * 1024,
        keep_days: int = 1,
        approval_max_ids: int = 500_000,
    ) -> None:
        if late_arrival_seconds < 0:
            raise ValueError("late_arrival_seconds must not be negative")
        if full_rescan_seconds < 0:
            raise ValueError("full_rescan_seconds must not be negative")
        self.uri = uri.rstrip("/") or uri
        self.pvc_root = pvc_root or os.environ.get("PERENNIAL_PVC_ROOT") or "/mnt/pvc"
        #: how long after its UTC day ends a day directory still receives segments in normal operation (a segment is
        #: named by the day its pod opened it, closed within the sidecar's segment age and shipped seconds later)
        self.late_arrival_seconds = late_arrival_seconds
        #: how often every day directory is listed (segments shipped later than the window: after a store outage)
        self.full_rescan_seconds = full_rescan_seconds
        self.max_segment_bytes = max_segment_bytes
        #: bytes a snapshot may read looking for the interactions its late ratings rate
        self.join_budget_bytes = join_budget_bytes
        #: days before today held in memory whatever they hold (older ones only while some part of them is in no
        #: snapshot, or while in the late-arrival window): what a restart loads; the sealed ones cost an index file read
        #: when a snapshot's join search or live approval's first look reaches back to them
        self.keep_days = keep_days
        #: interaction ids (and waiting ratings) live approval holds at most (~100 bytes each)
        self.approval_max_ids = approval_max_ids
        url = storage.fsspec_url(self.uri, self.pvc_root)
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as e:
            raise StoreUnavailable(f"feedback store {uri!r} cannot be opened: {e}") from e
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self._states: dict[str, _State] = {}
        self._states_lock = threading.Lock()

    # ------------------------------------------------------------------ paths
    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.root else rel

    def _meta(self, deployment: str, *parts: str) -> str:
        return self._path("/".join((deployment, META_DIR) + parts))

    def snapshot_path(self, deployment: str, name: str) -> str:
        """The snapshot document's object name relative to the store URI."""
        return f"{deployment}/{META_DIR}/snapshots/{name}.json"

    def snapshot_uri(self, deployment: str, name: str) -> str:
        """The snapshot document's URI (the store URI as given, `pvc://` included)."""
        return f"{self.uri}/{self.snapshot_path(deployment, name)}"

    # ------------------------------------------------------------------ fs calls (errors typed)
    def _call(self, what: str, fn: Any, *args: Any, missing_ok: bool = False, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise StoreUnavailable(f"feedback store {self.uri}: {what}: not found") from None
        except (FeedbackStoreError, FileExistsError):  # FileExistsError: a create-only write lost (the caller decides)
            raise
        except Exception as e:
            raise StoreUnavailable(f"feedback store {self.uri}: {what} failed: {type(e).__name__}: {e}") from e

    def _ls(self, path: str) -> list[dict[str, Any]]:
        # s3fs, gcsfs, ... answer ls from a listings cache that never expires by default: a tick must see new objects
        self._call(f"listing {path}", self.fs.invalidate_cache, path)
        out = self._call(f"listing {path}", self.fs.ls, path, detail=True, missing_ok=True)
        return list(out or [])

    def _root_exists(self) -> bool:
        self._call("checking the store root", self.fs.invalidate_cache, self.root or "/")
        return bool(self._call("checking the store root", self.fs.exists, self.root or "/"))

    def _check_root(self) -> None:
        if self.local and not os.path.isdir(self.root or "/"):
            raise StoreUnavailable(f"feedback store {self.uri}: {self.root} is not a directory (is the volume mounted?)")

    def _write(self, path: str, data: bytes, *, create_only: bool = False) -> None:
        """Atomic write (local: temp file, fsync, rename or link; object stores: one PUT).
        create_only raises FileExistsError when the object exists."""
        if self.local:
            d = os.path.dirname(path)
            os.makedirs(d, exist_ok=True)
            tmp = os.path.join(d, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                if create_only:
                    os.link(tmp, path)  # atomic create-only
                else:
                    os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        if create_only:
            try:
                with self.fs.open(path, "xb") as f:  # memory, s3fs (If-None-Match), ... refuse an existing object
                    f.write(data)
                return
            except (ValueError, NotImplementedError, TypeError):
                if self.fs.exists(path):
                    raise FileExistsError(path) from None
        self.fs.pipe_file(path, data)

    # ------------------------------------------------------------------ state
    def _state(self, deployment: str) -> _State:
        if not deployment or "/" in deployment or deployment.startswith("."):
            raise ValueError(f"invalid deployment name {deployment!r}")
        with self._states_lock:
            st = self._states.get(deployment)
            if st is None:
                st = self._states[deployment] = _State(deployment)
            return st

    def _load(self, st: _State) -> None:
        """First use: the index and the snapshots from the store (no segment is read)."""
        if st.loaded:
            return
        self._check_root()
        self._refresh_snapshots(st, load=False)
        summary = self._read_summary(st)
        if summary is not None:
            st.sealed_seq = summary.sealed_sequence
        self._load_unsealed(st)  # the snapshots after the sealed ones
        if summary is not None:
            for day, d in summary.evicted.items():
                st.evicted[day] = d
                st.evicted_version += 1
                st.day_mtime[day] = d.dir_mtime
                st.skipped.update(d.skipped)
            st.last_full, st.window_start = summary.last_full_rescan, summary.window_start
        paths: list[str] = []
        if summary is not None and summary.live_days is not None:
            # the days held in memory, and the days this tick's window will list (an index file written just
            # before a crash that kept the summary from naming its day), by name: no listing of the index
            live = set(summary.live_days) | set(self._window(st)[0])
            for day in sorted(live - set(st.evicted)):
                st.days.setdefault(day, {})  # without a readable index file: listed again (known to be there)
                paths.append(self._meta(st.deployment, "index", day.replace("/", "-") + ".json"))
        else:  # no summary (or one from before it named them): every index file there is
            for info in self._ls(self._meta(st.deployment, "index")):
                name = _base(info["name"])
                if info.get("type") != "file" or not name.endswith(".json") or name.startswith("."):
                    continue
                if name[:-len(".json")].replace("-", "/") in st.evicted:  # held out of memory: not read
                    continue
                paths.append(info["name"])
        for path in paths:
            raw = self._call(f"reading {path}", self.fs.cat_file, path, missing_ok=True)
            if raw is None:
                continue
            try:
                doc = DayIndex.model_validate_json(raw)
            except pydantic.ValidationError as e:
                log.warning("Ignored unreadable index file path=%s error=%s", path, e.errors()[:1])
                continue
            if doc.version != INDEX_VERSION or doc.deployment != st.deployment or doc.day in st.evicted:
                continue
            st.day_mtime[doc.day] = doc.dir_mtime
            for entry in doc.segments:
                st.add(doc.day, entry)
            if doc.day < self._keep_after() and st.evictable(doc.day):
                st.evict(doc.day)
        for day in [d for d, entries in st.days.items() if not entries and d not in st.day_mtime]:
            if day not in (summary.live_days if summary is not None and summary.live_days else ()):
                del st.days[day]  # a window day with no index file: nothing known of it
        st.saved_sig = self._summary_sig(st) if summary is not None and summary.live_days is not None else None
        st.loaded = True

    def _window(self, st: _State) -> tuple[list[str], str]:
        """The days a tick lists whatever their directories say: those still receiving segments in normal operation
        (a day ends at midnight UTC; its segments arrive within `late_arrival_seconds` after it), from where the last
        tick's window began (an operator down for days lists the days it missed), through the day a pod's clock a
        little ahead already names. Returns (days, the first day of this tick's own window)."""
        now = utcnow()
        first = (now - _dt.timedelta(seconds=self.late_arrival_seconds)).date()
        start = first
        if st.window_start is not None:
            try:
                start = min(start, _dt.date(*map(int, st.window_start.split("/"))))
            except ValueError:
                pass
        last = (now + JOIN_CLOCK_SKEW).date()
        days = []
        d = start
        while d <= last:
            days.append(f"{d:%Y/%m/%d}")
            d += _dt.timedelta(days=1)
        return days, f"{first:%Y/%m/%d}"

    @staticmethod
    def _summary_sig(st: _State) -> tuple[Any, ...]:
        return (tuple(sorted(st.days)), st.last_full, st.window_start)

    def _summary_path(self, st: _State) -> str:
        return self._meta(st.deployment, "summary.json")

    def _read_summary(self, st: _State) -> IndexSummary | None:
        raw = self._call("reading the index summary", self.fs.cat_file, self._summary_path(st), missing_ok=True)
        if raw is None:
            return None
        try:
            doc = IndexSummary.model_validate_json(raw)
        except pydantic.ValidationError as e:
            log.warning("Ignored unreadable index summary deployment=%s error=%s", st.deployment, e.errors()[:1])
            return None
        if doc.version != INDEX_VERSION or doc.deployment != st.deployment:
            return None
        if doc.sealed_sequence > doc.snapshot_sequence or any(seq not in st.listed for seq in range(1, doc.snapshot_sequence + 1)):
            # a snapshot it counted on is gone: what it calls consumed may not be; read every day's index
            log.warning("Ignored the index summary: snapshots are missing deployment=%s", st.deployment)
            return None
        return doc

    def _save_summary(self, st: _State) -> None:
        sig = self._summary_sig(st)
        # snapshots holding parts of sealed days only need not be loaded by a restart (those before `sealed_seq`
        # are not loaded now, and still hold only sealed days: unsealing a day loads every snapshot and resets it)
        seq = st.sealed_seq + 1
        while seq in st.snapshots and all(_day_of(p.name) in st.evicted for p in st.snapshots[seq].segments):
            st.sealed_seq, seq = seq, seq + 1
        doc = IndexSummary(deployment=st.deployment, snapshot_sequence=st.next_sequence() - 1, sealed_sequence=st.sealed_seq,
                           evicted=st.evicted,
                           live_days=list(sig[0]), last_full_rescan=st.last_full, window_start=st.window_start)
        path = self._summary_path(st)
        self._call(f"writing {path}", self._write, path, doc.model_dump_json(by_alias=True, exclude_none=True).encode())
        st.summary_dirty = False
        st.saved_sig = sig

    def _keep_after(self) -> str:
        """Days before this one whose every part is in a snapshot are not held in memory."""
        return f"{utcnow().date() - _dt.timedelta(days=self.keep_days):%Y/%m/%d}"

    def _day_doc(self, st: _State, day: str) -> DayIndex | None:
        path = self._meta(st.deployment, "index", day.replace("/", "-") + ".json")
        raw = self._call(f"reading {path}", self.fs.cat_file, path, missing_ok=True)
        if raw is None:
            return None
        try:
            doc = DayIndex.model_validate_json(raw)
        except pydantic.ValidationError:
            return None
        return doc if doc.version == INDEX_VERSION and doc.deployment == st.deployment and doc.day == day else None

    def _refresh_snapshots(self, st: _State, load: bool = True) -> None:
        """Find the snapshot documents written since the last look and load them. The first look lists them (names
        only); later ones read the next sequence number's document by name until one is missing (snapshots are
        written in sequence, create-only: a look costs one read however many there are). The sealed ones are not
        loaded (see `_ensure_snapshots`)."""
        if st.listed_once:
            seq = st.next_sequence()
            while True:
                path = self._meta(st.deployment, "snapshots", f"{snapshot_name(st.deployment, seq)}.json")
                raw = self._call(f"reading {path}", self.fs.cat_file, path, missing_ok=True)
                if raw is None:
                    return
                st.note(seq, path)
                self._load_snapshot(st, seq, raw)
                seq += 1
        prefix = f"{st.deployment}-"
        path = self._meta(st.deployment, "snapshots")
        if self.local:  # names only: fsspec's local ls costs ~40 us an entry, os.listdir well under 1
            names = self._call(f"listing {path}", os.listdir, path, missing_ok=True) or ()
        else:
            self._call(f"listing {path}", self.fs.invalidate_cache, path)
            names = self._call(f"listing {path}", self.fs.ls, path, detail=False, missing_ok=True) or ()
        for name in names:
            base = _base(name if isinstance(name, str) else name["name"])
            m = _SEQ.search(base)
            if not base.startswith(prefix) or not m or base.startswith("."):
                continue
            st.note(int(m.group(1)), f"{path}/{base}")
        st.listed_once = load
        if load:
            self._load_unsealed(st)

    def _load_unsealed(self, st: _State) -> None:
        """Load the listed snapshots after the sealed ones (see `_ensure_snapshots`)."""
        st.listed_once = True
        for seq in sorted(st.listed):
            if seq > st.sealed_seq and seq not in st.snapshots:
                self._load_snapshot(st, seq)

    def _load_snapshot(self, st: _State, seq: int, raw: bytes | None = None) -> None:
        path = st.listed[seq]
        if raw is None:
            raw = self._call(f"reading {path}", self.fs.cat_file, path)
        try:
            snap = Snapshot.model_validate_json(raw)
        except pydantic.ValidationError as e:
            raise SnapshotCorrupt(f"feedback snapshot {path} is not a valid snapshot document: {e.errors()[:1]}") from None
        if snap.sequence != seq or snap.deployment != st.deployment:
            raise SnapshotCorrupt(f"feedback snapshot {path} names sequence {snap.sequence} of {snap.deployment!r}")
        st.add_snapshot(snap)

    def _ensure_snapshots(self, st: _State, seqs: Iterable[int] | None = None) -> None:
        """Load the snapshots not loaded yet (all, or `seqs`): what needs the parts of sealed days (a sealed day
        unsealed by a late segment, a cursor before them, their documents asked for, a part of them named)."""
        for seq in sorted(st.listed if seqs is None else seqs):
            if seq in st.listed and seq not in st.snapshots:
                self._load_snapshot(st, seq)
        if seqs is None:
            st.sealed_seq = 0  # recomputed from the first when the summary is written next

    # ------------------------------------------------------------------ scanning
    def _days(self, st: _State) -> list[tuple[str, str, str | None]]:
        """(day `yyyy/mm/dd`, path, dir mtime) of every day directory of segments."""
        out = []
        base = self._path(st.deployment)
        for y in self._ls(base):
            yn = _base(y["name"])
            if y.get("type") != "directory" or y.get("islink") or not _YEAR.match(yn):
                continue
            for m in self._ls(y["name"]):
                mn = _base(m["name"])
                if m.get("type") != "directory" or m.get("islink") or not _TWO.match(mn):
                    continue
                for d in self._ls(m["name"]):
                    dn = _base(d["name"])
                    if d.get("type") != "directory" or d.get("islink") or not _TWO.match(dn):
                        continue
                    out.append((f"{yn}/{mn}/{dn}", d["name"], _dir_mtime(d)))
        return sorted(out)

    def scan(self, deployment: str) -> ScanResult:
        """One tick: read the segments not indexed yet (or changed), persist the index, count what is pending."""
        st = self._state(deployment)
        with st.lock:
            self._load(st)
            self._check_root()  # every tick: an unmounted volume is not an empty store
            self._refresh_snapshots(st)
            res = ScanResult(deployment=deployment)
            now = time.time()
            full = st.last_full is None or not (0 <= now - st.last_full < self.full_rescan_seconds)
            window, window_start = self._window(st)
            cutoff = window[0]
            if full:
                days = self._days(st)
                if not days and (any(st.days.values()) or st.evicted) and not self._root_exists():
                    # a bucket (or prefix) gone under us: unavailable, not "everything deleted"
                    raise StoreUnavailable(f"feedback store {self.uri}: {self.root or '/'} does not exist any more")
            else:
                days = self._tick_days(st, window)
            res.full_listing = full
            dirty: set[str] = set()
            present_days = set()
            for day, path, mtime in days:
                present_days.add(day)
                known = day in st.day_mtime
                same_mtime = mtime is not None and known and st.day_mtime.get(day) == mtime
                if day < cutoff and known and (same_mtime or (mtime is None and not full)):
                    continue
                listing = self._list_segments(st, day, path)
                if listing is None:  # gone between the listing of its month (or its stat) and now
                    continue
                res.days_listed += 1
                # a segment a tick could not have found: in a sealed day, or an old day an object store gives no mtime of
                late = full and st.last_full is not None and day < cutoff and (day in st.evicted or mtime is None or day not in st.days)
                before = res.new_segments
                ev = st.evicted.get(day)
                if ev is not None:
                    if _fingerprint((n, size, etag if etag is not None else mt) for n, _, size, etag, mt in listing) == ev.fingerprint:
                        if ev.dir_mtime != mtime:  # nothing of ours changed (the directory did)
                            ev.dir_mtime = st.day_mtime[day] = mtime
                            st.summary_dirty = True
                        continue
                    self._ensure_snapshots(st)  # its parts' snapshots, before its entries count as pending or not
                    st.restore(day, self._day_doc(st, day))
                elif day < cutoff and day not in st.days and st.lazy():
                    # an old day neither in memory nor sealed (a sealed day's directory gone from a full rescan, then
                    # back): its parts may be in snapshots not loaded; without them its records would be pending again
                    self._ensure_snapshots(st)
                self._scan_day(st, day, listing, res, dirty)
                if late and res.new_segments > before:
                    res.late_segments += res.new_segments - before
                    log.warning("Found segments shipped late by a full rescan deployment=%s day=%s segments=%d",
                                deployment, day, res.new_segments - before)
                if st.day_mtime.get(day) != mtime or not known:
                    st.day_mtime[day] = mtime
                    dirty.add(day)
            if not full and not res.days_listed and (any(st.days.values()) or st.evicted) and not self._root_exists():
                raise StoreUnavailable(f"feedback store {self.uri}: {self.root or '/'} does not exist any more")
            if full:
                for day in [d for d in list(st.days) + list(st.evicted) if d not in present_days]:  # a whole day directory deleted
                    gone = st.evicted.pop(day, None)
                    st.evicted_version += 1
                    if gone is not None:
                        st.skipped.subtract(gone.skipped)
                        res.removed_segments += gone.segments
                        st.summary_dirty = True
                    for name in list(st.days.get(day, {})):
                        st.remove(day, name)
                        res.removed_segments += 1
                    st.days.pop(day, None)
                    st.day_mtime.pop(day, None)
                    dirty.discard(day)
                    self._drop_day(st, day)
                st.last_full = now
            st.window_start = window_start
            for day in sorted(dirty):
                self._save_day(st, day)
            keep_after = self._keep_after()
            for day in [d for d in st.days if d < keep_after and d < cutoff and st.evictable(d)]:
                st.evict(day)  # sealed: no tick lists it again, only a full rescan
            if st.summary_dirty or st.saved_sig != self._summary_sig(st):
                self._save_summary(st)
            res.segments_in_memory = sum(len(v) for v in st.days.values())
            res.segments = res.segments_in_memory + st.sealed_segments()
            res.days_total = len(st.days) + len(st.evicted)  # disjoint
            res.skipped = {k: v for k, v in st.skipped.items() if v > 0}
            res.damaged_segments = st.damaged_count()
            res.damaged_examples = st.damaged_examples(5)
            res.pending = self._pending(st, None)
            res.cursor = st.cursor()
            return res

    def _tick_days(self, st: _State, window: list[str]) -> list[tuple[str, str, str | None]]:
        """(day, path, dir mtime) of the days a tick that is not a full rescan looks at, found by name (no listing of
        years or months): the window's days that exist, and the old days held in memory on a store that reports a
        directory's mtime (listed only when it changed). Sealed days are never looked at."""
        out = []
        base = self._path(st.deployment)
        wanted = set(window)
        if self.local:
            wanted |= set(st.days)
        for day in sorted(wanted):
            path = f"{base}/{day}"
            mtime = None
            if self.local:
                info = self._call(f"checking {path}", self.fs.info, path, missing_ok=True)
                if info is None or info.get("type") != "directory" or info.get("islink"):
                    continue
                mtime = _dir_mtime(info)
            out.append((day, path, mtime))
        return out

    def _list_segments(self, st: _State, day: str, path: str) -> list[tuple[str, str, int, str | None, str | None]] | None:
        """(name, path, size, etag, mtime) of the day's segment objects; None when the directory is not there."""
        out = []
        self._call(f"listing {path}", self.fs.invalidate_cache, path)
        infos = self._call(f"listing {path}", self.fs.ls, path, detail=True, missing_ok=True)
        if infos is None:
            return None
        for info in infos:
            base = _base(info["name"])
            if info.get("type") != "file" or not base.endswith(".jsonl") or base.startswith("."):
                continue
            name = f"{st.deployment}/{day}/{base}"
            if info.get("islink"):  # a link on a local store could point at any file the operator can read
                log.warning("Ignored symbolic link in the feedback store name=%s", name)
                continue
            out.append((name, info["name"], int(info.get("size") or 0), *_ident(info)))
        return out

    def _scan_day(self, st: _State, day: str, listing: list[tuple[str, str, int, str | None, str | None]],
                  res: ScanResult, dirty: set[str]) -> None:
        entries = st.days.setdefault(day, {})
        seen = set()
        for name, path, size, etag, mtime in listing:
            seen.add(name)
            old = entries.get(name)
            if old is not None and old.size == size and ((etag is not None and old.etag == etag) or (etag is None and old.mtime == mtime)):
                continue
            if size > self.max_segment_bytes:  # never read into memory; counted, not retried until it changes
                res.changed_segments += old is not None
                res.new_segments += old is None
                st.add(day, SegmentEntry(name=name, size=size, etag=etag, mtime=mtime, sha256="", covered=0,
                                         covered_sha256=hashlib.sha256(b"").hexdigest(), too_large=True))
                dirty.add(day)
                continue
            data = self._call(f"reading {path}", self.fs.cat_file, path, missing_ok=True)
            if data is None:  # deleted between the listing and the read
                continue
            res.segments_read += 1
            res.bytes_read += len(data)
            collect: list[tuple[int, str, Any, str | None]] | None = [] if st.approval is not None else None
            entry, lines = self._index(name, data, old, etag, mtime, st.snap_parts.get(name, ()), collect)
            if st.approval is not None and collect is not None and entry.parts:
                st.approval.feed(entry.parts[-1].key, collect)
            res.records_read += lines
            if old is None:
                res.new_segments += 1
            else:
                res.changed_segments += 1
            st.add(day, entry)
            dirty.add(day)
        for name in [n for n in entries if n not in seen]:
            st.remove(day, name)
            res.removed_segments += 1
            dirty.add(day)

    @staticmethod
    def _index(name: str, data: bytes, old: SegmentEntry | None, etag: str | None, mtime: str | None,
               snapshotted: Iterable[SegmentPart] = (), collect: list[tuple[int, str, Any, str | None]] | None = None) -> tuple[SegmentEntry, int]:
        """Index one segment's bytes; a grown segment (old bytes still its prefix) keeps its old parts and gains one.
        Without a usable old entry (a lost index), the parts snapshots hold that are still this object's bytes are
        its first parts again: a snapshotted byte is never pending twice."""
        end = _complete_end(data)
        parts: list[SegmentPart] = []
        start = 0
        if old is not None and old.covered <= end and hashlib.sha256(data[:old.covered]).hexdigest() == old.covered_sha256:
            parts, start = list(old.parts), old.covered
        else:
            if old is not None:
                log.warning("Re-indexed rewritten feedback segment name=%s old_size=%d size=%d", name, old.size, len(data))
            for sp in sorted(snapshotted, key=lambda p: p.offset):
                if sp.offset != start or sp.end > end or hashlib.sha256(data[sp.offset:sp.end]).hexdigest() != sp.sha256:
                    break
                parts.append(sp)
                start = sp.end
        lines = 0
        if end > start:
            part, lines = _part_of(name, data, start, end, collect)
            parts.append(part)
        entry = SegmentEntry(name=name, size=len(data), etag=etag, mtime=mtime, sha256=hashlib.sha256(data).hexdigest(),
                             covered=end, covered_sha256=hashlib.sha256(data[:end]).hexdigest(), torn_tail=len(data) - end, parts=parts)
        return entry, lines

    def _drop_day(self, st: _State, day: str) -> None:
        path = self._meta(st.deployment, "index", day.replace("/", "-") + ".json")
        self._call(f"deleting {path}", self.fs.rm_file, path, missing_ok=True)

    def _save_day(self, st: _State, day: str) -> None:
        assert day not in st.evicted, "an evicted day's index file is never rewritten from memory"
        doc = DayIndex(deployment=st.deployment, day=day, dir_mtime=st.day_mtime.get(day),
                       segments=sorted(st.days.get(day, {}).values(), key=lambda e: e.name))
        path = self._meta(st.deployment, "index", day.replace("/", "-") + ".json")
        self._call(f"writing {path}", self._write, path, doc.model_dump_json(by_alias=True, exclude_none=True).encode())

    # ------------------------------------------------------------------ pending
    def _pending(self, st: _State, cursor: Cursor | None) -> Pending:
        if cursor is None or cursor.sequence >= st.next_sequence():  # the usual case: running totals
            return Pending(ratings=st.pending_ratings, interactions=st.pending_interactions, parts=len(st.unconsumed),
                           oldest_rating=_dt_of(st.oldest_pending_rating()))
        self._ensure_snapshots(st, range(cursor.sequence, st.next_sequence()))
        extra = [p for seq, snap in st.snapshots.items() if seq >= cursor.sequence for p in snap.segments]
        parts: Iterable[SegmentPart] = list(st.unconsumed.values()) + extra
        ratings = inter = n = 0
        oldest = None
        for p in parts:
            n += 1
            ratings += p.ratings
            inter += p.interactions
            if p.ratings:
                oldest = _min(oldest, p.oldest_rating_time)
        return Pending(ratings=ratings, interactions=inter, parts=n, oldest_rating=_dt_of(oldest))

    def pending(self, deployment: str, cursor: Cursor | None = None) -> Pending:
        """Ratings in indexed parts no snapshot before `cursor` holds (default: the latest cursor), and the
        oldest one's time. Reads the index and snapshots on first use, never a segment: call `scan` first."""
        st = self._state(deployment)
        with st.lock:
            self._load(st)
            return self._pending(st, cursor)

    # ------------------------------------------------------------------ snapshots
    def snapshots(self, deployment: str) -> list[Snapshot]:
        """Every snapshot of the Deployment, by sequence (re-lists the store)."""
        st = self._state(deployment)
        with st.lock:
            self._load(st)
            self._refresh_snapshots(st)
            self._ensure_snapshots(st)
            return [st.snapshots[k] for k in sorted(st.snapshots)]

    def latest_snapshot(self, deployment: str) -> Snapshot | None:
        snaps = self.snapshots(deployment)
        return snaps[-1] if snaps else None

    def cursor(self, deployment: str) -> Cursor:
        st = self._state(deployment)
        with st.lock:
            self._load(st)
            self._refresh_snapshots(st)
            return st.cursor()

    def plan_snapshot(self, deployment: str, *, max_segments: int = DEFAULT_MAX_SEGMENTS) -> tuple[str, list[SegmentPart]] | None:
        """The next snapshot's deterministic name and the pending parts it takes (oldest first, at most
        `max_segments` distinct segments); None when nothing is pending. Writes nothing."""
        st = self._state(deployment)
        with st.lock:
            self._load(st)
            self._refresh_snapshots(st)
            return self._plan(st, max_segments)

    def _plan(self, st: _State, max_segments: int) -> tuple[str, list[SegmentPart]] | None:
        parts = sorted(st.unconsumed.values(), key=lambda p: (p.first_time or "", p.name, p.offset))
        chosen: list[SegmentPart] = []
        names: set[str] = set()
        for p in parts:
            if p.name not in names and len(names) >= max_segments:
                continue
            names.add(p.name)
            chosen.append(p)
        if not chosen:
            return None
        return snapshot_name(st.deployment, st.next_sequence()), chosen

    def get_snapshot(self, deployment: str, sequence: int) -> Snapshot | None:
        """Snapshot number `sequence` of the Deployment, if written (re-lists the store)."""
        st = self._state(deployment)
        with st.lock:
            self._load(st)
            self._refresh_snapshots(st)
            self._ensure_snapshots(st, [sequence])
            return st.snapshots.get(sequence)

    def take_snapshot(self, deployment: str, *, sequence: int | None = None, max_segments: int = DEFAULT_MAX_SEGMENTS,
                      lookback_seconds: float = DEFAULT_LOOKBACK_SECONDS) -> Snapshot | None:
        """Plan and write the next snapshot of everything pending (None when nothing is).

        With `sequence`: an existing snapshot of that number is returned as it is (a retry after a crash);
        otherwise it must be the next number (`SnapshotConflict` if not)."""
        st = self._state(deployment)
        with st.lock:
            self._load(st)
            self._refresh_snapshots(st)
            if sequence is not None:
                self._ensure_snapshots(st, [sequence])
                if sequence in st.snapshots:
                    return st.snapshots[sequence]
                if sequence != st.next_sequence():
                    raise SnapshotConflict(f"snapshot {snapshot_name(deployment, sequence)} is out of sequence; "
                                           f"the next snapshot is {snapshot_name(deployment, st.next_sequence())}")
            plan = self._plan(st, max_segments)
            if plan is None:
                return None
            return self._write_snapshot(st, plan[0], plan[1], lookback_seconds)

    def write_snapshot(self, deployment: str, name: str, segments: Sequence[SegmentPart | str], *,
                       lookback_seconds: float = DEFAULT_LOOKBACK_SECONDS) -> Snapshot:
        """Write snapshot `name` of exactly `segments` (parts from `plan_snapshot`, or segment names: their
        pending parts). Create-only: the same parts under an existing name return the existing document;
        other parts raise `SnapshotConflict`, as do a name that is not the next in sequence and a part
        already in another snapshot. Each part's bytes are read back and checked against its sha256
        (`SegmentChanged` when they differ: scan again)."""
        st = self._state(deployment)
        with st.lock:
            self._load(st)
            self._refresh_snapshots(st)
            parts: list[SegmentPart] = []
            for s in segments:
                if isinstance(s, str):
                    entry = st.entry(s)
                    if entry is None:  # in a sealed day, if anywhere: what snapshots hold of it
                        self._ensure_snapshots(st)
                    mine = [p for p in st.snap_parts.get(s, []) if st.consumed.get(p.key) == _seq_of(name)]
                    if entry is None and not mine:
                        raise SnapshotConflict(f"segment {s} is not in the index of {deployment!r} (scan first)")
                    got = [p for p in entry.parts if p.key not in st.consumed] if entry is not None else []
                    parts.extend(got or mine)
                else:
                    parts.append(s)
            return self._write_snapshot(st, name, parts, lookback_seconds)

    def _write_snapshot(self, st: _State, name: str, parts: list[SegmentPart], lookback_seconds: float) -> Snapshot:
        dep = st.deployment
        seq = _seq_of(name)
        if seq is None or name != snapshot_name(dep, seq):
            raise ValueError(f"snapshot name {name!r} is not {snapshot_name(dep, 1)!r} with another sequence number")
        if not parts:
            raise ValueError("a snapshot needs at least one segment")
        keys = [p.key for p in parts]
        if len(set(keys)) != len(keys):
            raise ValueError("a snapshot lists a segment part twice")
        self._ensure_snapshots(st, [seq])
        existing = st.snapshots.get(seq)
        if existing is not None:
            want = (dep, name, seq, tuple(p.key + (p.length,) for p in parts))
            if existing.identity() == want:
                return existing
            raise SnapshotConflict(f"snapshot {name} exists with other segments; the next snapshot is {snapshot_name(dep, st.next_sequence())}")
        if seq != st.next_sequence():
            raise SnapshotConflict(f"snapshot {name} is out of sequence; the next snapshot is {snapshot_name(dep, st.next_sequence())}")
        indexed = []
        for p in parts:
            if p.key in st.consumed:
                raise SnapshotConflict(f"segment {p.name} (bytes {p.offset}-{p.end}) is already in snapshot {snapshot_name(dep, st.consumed[p.key])}")
            known = st.find_part(p.key)
            if known is None and st.lazy():  # not in memory: a part of a sealed day? then it is in a snapshot
                self._ensure_snapshots(st)
                if p.key in st.consumed:
                    raise SnapshotConflict(f"segment {p.name} (bytes {p.offset}-{p.end}) is already in snapshot {snapshot_name(dep, st.consumed[p.key])}")
            if known is None or known.length != p.length:
                raise SegmentChanged(f"segment {p.name} (bytes {p.offset}-{p.end}, sha256 {p.sha256[:12]}) is not in the index (scan first)")
            indexed.append(known)  # the index's counts, whatever the caller's copy says
        parts = indexed
        # read every part back: its bytes must still be what was indexed; collect the join keys
        inter_ids: set[str] = set()
        rated: dict[str, str | None] = {}  # response id -> rating time
        for p in parts:
            data = self._read_range(p)
            for rec in _records(data):
                if isinstance(rec, InteractionRecord):
                    inter_ids.add(rec.id)
                else:
                    for rid in (rec.response_id, rec.other_response_id):
                        if rid:
                            rated[rid] = _min(rated.get(rid), _time(rec.time))
        dangling = {rid: t for rid, t in rated.items() if rid not in inter_ids}
        joins, found = self._find_joins(st, parts, dangling, lookback_seconds) if dangling else ([], set())
        counts = SnapshotCounts(segments=len({p.name for p in parts}), interactions=sum(p.interactions for p in parts),
                                ratings=sum(p.ratings for p in parts), unmatched_ratings=len(dangling) - len(found))
        sk: Counter[str] = Counter()
        for p in parts:
            sk.update(p.skipped)
        counts.skipped = dict(sk)
        window = TimeWindow(start=min((p.first_time for p in parts if p.first_time), default=None),
                            end=max((p.last_time for p in parts if p.last_time), default=None))
        snap = Snapshot(deployment=dep, name=name, sequence=seq, previous=snapshot_name(dep, seq - 1) if seq > 1 else None, segments=parts,
                        join_segments=joins, window=window, counts=counts, cursor=Cursor(sequence=seq + 1, after=name))
        path = self._path(self.snapshot_path(dep, name))
        try:
            self._call(f"writing {path}", self._write, path, snap.to_json().encode(), create_only=True)
        except FileExistsError:
            # another writer (or our own earlier attempt) got there first: same parts = the same snapshot
            self._refresh_snapshots(st)
            other = st.snapshots.get(seq)
            if other is not None and other.identity() == snap.identity():
                return other
            raise SnapshotConflict(f"snapshot {name} was written meanwhile with other segments") from None
        st.add_snapshot(snap)
        log.info("Wrote feedback snapshot name=%s segments=%d ratings=%d join_segments=%d", name, counts.segments, counts.ratings, len(joins))
        return snap

    def _read_range(self, p: SegmentPart | SegmentRef) -> bytes:
        path = self._path(p.name)
        try:
            data = self.fs.cat_file(path, start=p.offset, end=p.offset + p.length)
        except FileNotFoundError:
            raise SegmentChanged(f"segment {p.name} is gone from the store") from None
        except Exception as e:
            raise StoreUnavailable(f"feedback store {self.uri}: reading {path} failed: {type(e).__name__}: {e}") from e
        if hashlib.sha256(data).hexdigest() != p.sha256:
            raise SegmentChanged(f"segment {p.name} (bytes {p.offset}-{p.offset + p.length}) changed since it was indexed (scan again)")
        return data

    def _find_joins(self, st: _State, parts: list[SegmentPart], dangling: dict[str, str | None],
                    lookback_seconds: float) -> tuple[list[SegmentRef], set[str]]:
        """Earlier parts (newest first, within `lookback_seconds` before the oldest dangling rating) that hold the
        interactions rated in this snapshot but not found in it; and the response ids found."""
        found: set[str] = set()
        own = {p.key for p in parts}
        times = [t for t in dangling.values() if t]
        oldest, newest = (_dt_of(min(times)), _dt_of(max(times))) if times else (None, None)
        since = (oldest - _dt.timedelta(seconds=lookback_seconds)).isoformat(timespec="microseconds") if oldest else None
        # an interaction comes before its rating (give pods' clocks JOIN_CLOCK_SKEW of slack)
        until = (newest + JOIN_CLOCK_SKEW).isoformat(timespec="microseconds") if newest else None
        candidates = []
        since_day = since[:10].replace("-", "/") if since else ""
        days = list(st.days.values())
        if st.lazy() and any(day >= since_day for day in st.evicted):
            self._ensure_snapshots(st)  # which snapshot holds a part found there (`SegmentRef.snapshot`)
        for day in sorted(st.evicted):  # old days not in memory: their index files, for this search only
            if day >= since_day and (doc := self._day_doc(st, day)) is not None:
                days.append({e.name: e for e in doc.segments})
        for entries in days:
            for e in entries.values():
                for p in e.parts:
                    if p.key in own or not p.interactions:
                        continue
                    if since is not None and p.last_time is not None and p.last_time < since:
                        continue
                    if until is not None and p.first_time is not None and p.first_time > until:
                        continue
                    candidates.append(p)
        candidates.sort(key=lambda p: (p.last_time or "", p.name, p.offset), reverse=True)
        want = set(dangling)
        out = []
        spent = 0
        for p in candidates:
            if not want:
                break
            if spent + p.length > self.join_budget_bytes:  # ratings of responses that never existed cost no more
                log.warning("Stopped looking for rated interactions deployment=%s unmatched=%d read_bytes=%d", st.deployment, len(want), spent)
                break
            spent += p.length
            try:
                data = self._read_range(p)
            except SegmentChanged:
                continue
            hit = {rec.id for rec in _records(data) if isinstance(rec, InteractionRecord)} & want
            if hit:
                want -= hit
                found |= hit
                seq = st.consumed.get(p.key)
                out.append(SegmentRef(name=p.name, offset=p.offset, length=p.length, sha256=p.sha256,
                                      snapshot=snapshot_name(st.deployment, seq) if seq else None))
        return sorted(out, key=lambda r: (r.name, r.offset)), found

    # ------------------------------------------------------------------ live approval
    def approval(self, deployment: str, window_seconds: float = DEFAULT_APPROVAL_WINDOW_SECONDS) -> dict[str, Approval]:
        """Thumbs up / thumbs given per adapter that served the rated response (`""`: the base model), counting ratings
        made in the last `window_seconds` (whole hours), joined by response id across segments, pods and ticks.

        Costs nothing until first asked: the first call reads the parts of the last `window_seconds` once (the first
        call's window bounds what is known before it; after a restart too), then every `scan` feeds the parts it
        reads. Ratings whose interaction is not found yet are not counted (they are once it is)."""
        st = self._state(deployment)
        with st.lock:
            self._load(st)
            now = utcnow()
            since = (now - _dt.timedelta(seconds=window_seconds)).isoformat(timespec="microseconds")
            if st.approval is None:
                st.approval = _Approval(self.approval_max_ids)
                self._approval_backfill(st, since)
            return st.approval.tally(since[:13])

    def _approval_backfill(self, st: _State, since: str) -> None:
        assert st.approval is not None
        since_day = since[:10].replace("-", "/")
        days = list(st.days.values())
        for day in sorted(st.evicted):
            if day >= since_day and (doc := self._day_doc(st, day)) is not None:
                days.append({e.name: e for e in doc.segments})
        parts = [p for entries in days for e in entries.values() for p in e.parts
                 if p.last_time is None or p.last_time >= since]
        for p in sorted(parts, key=lambda p: (p.first_time or "", p.name, p.offset)):
            try:
                data = self._read_range(p)
            except SegmentChanged:  # rewritten since the last scan: the next scan feeds its new part
                continue
            collect: list[tuple[int, str, Any, str | None]] = []
            _part_of(p.name, data, 0, len(data), collect)
            st.approval.feed(p.key, collect)

    # ------------------------------------------------------------------ async wrappers
    async def scan_async(self, deployment: str) -> ScanResult:
        return await asyncio.to_thread(self.scan, deployment)

    async def pending_async(self, deployment: str, cursor: Cursor | None = None) -> Pending:
        return await asyncio.to_thread(self.pending, deployment, cursor)

    async def take_snapshot_async(self, deployment: str, **kw: Any) -> Snapshot | None:
        return await asyncio.to_thread(lambda: self.take_snapshot(deployment, **kw))

    async def approval_async(self, deployment: str, window_seconds: float = DEFAULT_APPROVAL_WINDOW_SECONDS) -> dict[str, Approval]:
        return await asyncio.to_thread(self.approval, deployment, window_seconds)

    async def latest_snapshot_async(self, deployment: str) -> Snapshot | None:
        return await asyncio.to_thread(self.latest_snapshot, deployment)


_shared: dict[tuple[str, str, str, str], FeedbackStore] = {}
_shared_lock = threading.Lock()


def shared_store(uri: str, storage_options: dict[str, Any] | None = None, *, pvc_root: str | None = None,
                 **settings: Any) -> FeedbackStore:
    """The process's one FeedbackStore for this URI, options and settings (`late_arrival_seconds`, ...): its in-memory
    index is what keeps a tick incremental (a new object loads the index from the store first, as after a restart)."""
    key = (uri.rstrip("/"), json.dumps(storage_options or {}, sort_keys=True, default=str), pvc_root or "",
           json.dumps(settings, sort_keys=True, default=str))
    with _shared_lock:
        st = _shared.get(key)
        if st is None:
            st = _shared[key] = FeedbackStore(uri, storage_options, pvc_root=pvc_root, **settings)
        return st


def _day_of(name: str) -> str:
    """`yyyy/mm/dd` of a segment object name `<deployment>/<yyyy>/<mm>/<dd>/<file>`."""
    return "/".join(name.split("/")[1:4])


def _seq_of(name: str) -> int | None:
    m = re.search(r"-(\d{8})$", name)
    return int(m.group(1)) if m else None


def _records(data: bytes) -> Iterable[InteractionRecord | FeedbackRecord]:
    for line in data.split(b"\n"):
        if line.strip():
            try:
                yield parse_record(line)
            except pydantic.ValidationError:
                continue
