"""Feedback ids already stored: `id` is an idempotency key.

A client that did not get an answer (timeout, connection cut, the sidecar killed) retries with the
same `id`; the retry is answered 200 with `Idempotent-Replayed: true` and nothing is stored again.

Where the index lives, and its window (per worker process; a retry that reaches another worker or
replica is not recognised -- consumers that need exactly-once drop repeated ids when they read the store):

* memory: the ids of the last `max_ids` records acknowledged (insertion order, oldest dropped first);
* disk, with nothing added to the acknowledgement path: a record is durable in a spool segment
  before it is acknowledged, and a segment leaves the spool only through the shipper, which first
  appends the segment's feedback ids (as the handlers handed them to the spool with each record, or
  read from the segment's bytes where the spool does not hold them) to a journal in the spool dir
  (`feedback-ids.0|1`, one JSON string per line, fsync'd) and only then deletes the segment. On
  start the index is rebuilt from the journal and from every segment still in the spool, so it
  survives restarts and kill -9. The journal keeps two generations of `max_ids / 2` ids each:
  after a restart at least the last `max_ids / 2` shipped ids and every unshipped one are known.

Concurrent requests with one id: the second waits for the first's outcome (stored: replayed; failed:
it tries itself)."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import re
import threading
from pathlib import Path

from pydantic_core import from_json

log = logging.getLogger(__name__)

JOURNAL = ("feedback-ids.0", "feedback-ids.1")


class FeedbackIds:
    def __init__(self, spool_dir: str | os.PathLike[str], max_ids: int = 200000) -> None:
        self.dir = Path(spool_dir)
        self.max_ids = max_ids
        # an OrderedDict, not a dict: evicting the oldest of a full plain dict (`del d[next(iter(d))]`)
        # scans every slot deleted before it until the next resize, ~30 us per add at 200k ids
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.inflight: dict[str, asyncio.Future[None]] = {}
        self._lock = threading.Lock()  # the journal is written from the shipper's thread
        self._gen = 0
        self._gen_count = 0

    # ------------------------------------------------------------ memory
    def __contains__(self, fid: str) -> bool:
        return fid in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, fid: str) -> None:
        if self.max_ids <= 0:
            return
        ids = self._ids
        ids[fid] = None
        if len(ids) > self.max_ids:
            ids.popitem(last=False)

    # ------------------------------------------------------------ disk
    def load(self) -> int:
        """Rebuild from the journal (older generation first) and the segments still in the spool.
        Runs before the shipper starts."""
        if self.max_ids <= 0:
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        gens = []
        for i, name in enumerate(JOURNAL):
            p = self.dir / name
            if p.exists():
                gens.append((p.stat().st_mtime_ns, i, p))
        for _, i, p in sorted(gens):
            n = 0
            for line in p.read_bytes().splitlines():
                try:
                    fid = from_json(line)
                except ValueError:
                    continue  # a torn last line
                if isinstance(fid, str):
                    self.add(fid)
                    n += 1
            self._gen, self._gen_count = i, n  # the newest generation is appended to next
        for p in sorted(self.dir.iterdir()):
            if p.suffix in (".open", ".jsonl") and p.is_file():
                for fid in feedback_ids(p.read_bytes()):
                    self.add(fid)
        return len(self._ids)

    def journal(self, ids: list[str]) -> None:
        """Append shipped ids to the journal, durably (called before their segment is deleted)."""
        self._journal([json.dumps(i).encode() for i in ids])

    def _journal(self, ids: list[bytes]) -> None:
        """Append ids, each a JSON string, one per line, to the journal, durably."""
        if self.max_ids <= 0 or not ids:
            return
        with self._lock:
            half = max(1, self.max_ids // 2)
            if self._gen_count >= half:
                self._gen = 1 - self._gen
                self._gen_count = 0
                mode = "wb"  # the older generation is dropped
            else:
                mode = "ab"
            p = self.dir / JOURNAL[self._gen]
            with open(p, mode) as f:
                f.write(b"\n".join(ids) + b"\n")
                f.flush()
                os.fsync(f.fileno())
            self._gen_count += len(ids)
            if mode == "wb":
                fd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def journal_segment(self, data: bytes, ids: list[bytes] | None = None) -> None:
        """Journal the feedback ids of a segment about to leave the spool (the shipper's thread): `ids`, each
        a JSON string, where the spool knows them (`Spool.take_keys`: the ids the handlers wrote to it); else
        read from the segment's bytes (a predecessor's segment, or more held than the spool keeps)."""
        if self.max_ids > 0:
            self._journal(_raw_feedback_ids(data) if ids is None else ids)


# A feedback record as the sidecar writes it (serving_feedback.record, FeedbackRecord.to_json: compact
# JSON, `kind` then `id`) at the start of a line; group 1: the id as the JSON string it is stored as.
_FEEDBACK_ID = re.compile(rb'\n\{"schemaVersion":\d+,"time":"[^"\\\n]*","kind":"feedback","id":("[^"\\\n]*(?:\\.[^"\\\n]*)*")')


def _raw_feedback_ids(data: bytes) -> list[bytes]:
    """The ids of the feedback records in a segment's complete lines, as JSON strings: one regex pass
    over the segment (~0.7 us per record; a JSON parse of every line, then a json.dumps of every id
    for the journal, cost ~2 us per record in the shipper's thread, on the sidecar's core).
    A segment holding a feedback record in any other layout is parsed line by line instead."""
    data = data[:data.rfind(b"\n") + 1]  # complete lines only (a torn last line is skipped)
    raw = _FEEDBACK_ID.findall(b"\n" + data)
    if len(raw) == data.count(b'"kind":"feedback"'):
        return raw
    return [json.dumps(i).encode() for i in _parsed_feedback_ids(data)]


def feedback_ids(data: bytes) -> list[str]:
    """Ids of the feedback records in a segment's bytes (a torn last line is skipped)."""
    return [r[1:-1].decode() if b"\\" not in r else from_json(r) for r in _raw_feedback_ids(data)]


def _parsed_feedback_ids(data: bytes) -> list[str]:
    out = []
    for line in data.splitlines():
        if b'"kind":"feedback"' not in line:
            continue
        try:
            rec = from_json(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "feedback" and isinstance(rec.get("id"), str):
            out.append(rec["id"])
    return out
