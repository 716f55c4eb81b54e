"""Feedback-store records -> SFT / DPO / GRPO rows (the trainer's side of continuous learning).

Input: segments of a feedback store (JSON Lines of `InteractionRecord` and `FeedbackRecord`, see
`perennial_records`), named by a TrainingRun's `feedback` dataset in one of three ways:

* ``snapshot: <name or URI>``: a snapshot document written by the operator (below); the run trains on
  exactly its segments, each verified against its sha256 first (a changed or missing segment fails
  the run: ``DatasetHashMismatch`` / ``DatasetNotFound``, permanent);
* ``segments: [names]``: these segment objects, relative to the store;
* neither: every ``.jsonl`` under ``<store>/<deployment>/`` (the Deployment's own segments).

Snapshot document (JSON; unknown keys are ignored), as `perennial.feedback.store.FeedbackStore`
writes it to ``<deployment>/_perennial/snapshots/<name>.json`` (`perennial.feedback.snapshot`)::

    {"apiVersion": "perennial.ai/v1alpha1", "kind": "FeedbackSnapshot", "deployment": "chat", ...,
     "segments": [{"name": "chat/2026/11/29/pod-a-00000007.jsonl",   # relative to the store
                   "offset": 0, "length": 5120,                       # a byte range (a "part"); optional:
                   "sha256": "<64 hex of those bytes>", ...}],        #   no length = the whole object
     "joinSegments": [{"name": ..., "offset": ..., "length": ..., "sha256": ...}],   # optional
     "window": {"start": "...", "end": "..."}}                        # optional, logged

A part's name may also be given as ``object``, ``key`` or ``path``; an entry of ``segments`` with
``"joinOnly": true`` (or ``"role": "join"``) is a join part, as are the entries of
``joinOnlySegments``/``contextSegments``. Names are relative to the store: absolute names, URIs
and ``..`` are refused (``InvalidDataset``), as is a part without a sha256. Only the bytes of a
part are read and hashed: a segment that grew after the snapshot (new bytes after the range) is
still the same part; bytes changed inside the range fail the run.

How records become rows
-----------------------

* **Join** by response id over every segment read, whatever their order, pod, region or time: a
  rating shipped before its interaction (another pod's segment closed first) joins all the same.
* **The feedback of the snapshot's own segments is what is trained on.** Join parts (earlier
  parts holding the interactions that this snapshot's late ratings rate) give interactions only;
  their feedback records are another snapshot's and are ignored. A training example is made from
  a unit (an interaction with its rating or correction; a preference with its two responses; two
  differently rated responses) that holds feedback of the snapshot's segments (for GRPO: a prompt
  of the snapshot's interactions, or rated by its feedback). Snapshots hold disjoint parts, so
  each rating is trained on once.
* **Duplicates**: an interaction id or a feedback id seen again (a retried request stored by two
  pods, a segment shipped twice) counts once; for feedback the earliest copy is kept (the id is the
  idempotency key: the first write wins).
* **The latest rating of a response wins** (by record `time`, which the sidecar sets; ties by
  feedback id): a user who turned a thumbs-up into a thumbs-down meant the latter. Earlier ratings
  (and earlier corrections) of the response are dropped as ``superseded``. Ratings are not averaged.
* A rating is a thumb (up = 1, down = 0) or a score in [0, 1]; a score outside [0, 1] (a forged
  1e6) is dropped as ``scoreOutOfRange``, never clamped into a top rating.
* **SFT**: a correction (the corrected text is the completion; it supersedes the response's rating),
  or the response when its rating is at least ``minRating`` (default 0.5).
* **DPO**: correction over the original; explicit preferences (both responses to the same prompt);
  differently rated responses to the same prompt, paired best with worst, second best with second
  worst, ... (each response in at most one pair, so one popular or flooded prompt gives as many
  pairs as it has responses / 2, not their square).
* **GRPO**: each distinct prompt, with the latest rating of its responses as ``feedback_score`` (for
  a ``HumanFeedback`` grader; its ``missingScore`` when None) and the latest correction as
  ``reference`` (None when there is none: every row has both columns).
* Chat prompts stay chats (every turn, system and earlier assistant turns included); text parts of
  multi-part message contents are joined, any other part (an image) drops the interaction.

Every record of the snapshot's segments is either used or dropped with one reason, counted:
``unparsable``, ``duplicate``, ``otherDeployment``, ``interactionMissing`` (a rating of a response
that no segment holds), ``scoreOutOfRange``, ``unusableType`` (a label), ``notForMethod`` (a
preference for SFT or GRPO), ``superseded``, ``unrated`` (an interaction without usable feedback in
the snapshot; a later snapshot's rating can still use it), ``belowThreshold``, ``empty`` (an empty or
redacted-to-nothing prompt or response), ``unsupportedContent``, ``identical`` (chosen = rejected),
``promptMismatch`` (a preference between answers to different prompts), ``unpaired`` (DPO: no
differently rated answer to the same prompt).

Too little data: a Train dataset with fewer usable examples than ``minExamples`` (default
`DEFAULT_MIN_EXAMPLES` per method) fails the run with ``InsufficientData`` (permanent, exit 11) and
the counts, instead of training a worse adapter on a handful of rows.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import posixpath
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from perennial.api import FeedbackRecord, InteractionRecord, parse_record

from .errors import TrainerError
from .storage import filesystem

log = logging.getLogger("perennial_trainer.feedback")

DEFAULT_MIN_RATING = 0.5
#: Usable examples a Train feedback dataset needs at least, per method (`feedback.minExamples` overrides).
DEFAULT_MIN_EXAMPLES = {"SFT": 16, "DPO": 16, "GRPO": 8}
RATING_TYPES = ("thumbs", "score")
_OLDEST = _dt.datetime.min.replace(tzinfo=_dt.UTC)

Key = tuple[str, str]  # ("i", interaction id) or ("f", feedback id)


@dataclass
class Segment:
    """One segment's bytes. `join_only`: read only to complete joins (see the module doc)."""

    name: str
    data: bytes
    join_only: bool = False


@dataclass
class FeedbackData:
    rows: list[dict[str, Any]]
    dropped: dict[str, int]
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        c = self.counts
        text = (f"{len(self.rows)} rows from {c.get('interactions', 0)} interactions and {c.get('feedback', 0)} feedback records "
                f"in {c.get('segments', 0)} segments")
        if c.get("joinSegments"):
            text += f" (+{c['joinSegments']} earlier segments for joins, {c.get('joinedFromEarlier', 0)} of their records used)"
        if self.dropped:
            text += "; dropped: " + ", ".join(f"{r} {n}" for r, n in sorted(self.dropped.items(), key=lambda x: (-x[1], x[0])))
        return text


def _when(t: str) -> _dt.datetime:
    try:
        d = _dt.datetime.fromisoformat(t)
    except (TypeError, ValueError):
        return _OLDEST  # the sidecar writes RFC 3339; anything else never wins "latest"
    return d if d.tzinfo else d.replace(tzinfo=_dt.UTC)


_REDACTED = re.compile(r"\[REDACTED:[^\]]*\]")
_ALNUM = re.compile(r"[^\W_]")  # a letter or digit, in any script


def _blank(text: str) -> bool:
    """Nothing to learn from: empty, or only the sidecar's `[REDACTED:<name>]` placeholders and punctuation."""
    if "[REDACTED:" in text:
        text = _REDACTED.sub("", text)
    return _ALNUM.search(text) is None


def _text_content(content: Any) -> str | None:
    """A message content as text; None when it holds something other than text."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for p in content:
        if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
            parts.append(p["text"])
        elif isinstance(p, str):
            parts.append(p)
        else:
            return None
    return "".join(parts)


def _prompt(inter: InteractionRecord) -> tuple[Any, str | None]:
    """(prompt, problem): a chat (list of messages) or a string; problem a drop reason or None."""
    if inter.messages:
        msgs = []
        for m in inter.messages:
            d = m.model_dump(exclude_none=True)
            text = _text_content(m.content)
            if text is None:
                return None, "unsupportedContent"
            d["content"] = text
            msgs.append(d)
        if all(_blank(m["content"]) for m in msgs if m["role"] != "assistant"):
            return None, "empty"
        return msgs, None
    if _blank(inter.prompt or ""):
        return None, "empty"
    return inter.prompt, None


def _completion(prompt: Any, text: str) -> Any:
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _approves(f: FeedbackRecord | None) -> bool:
    """A thumbs-up (or a top score): the user says the answer is right, so it is a reference for the prompt."""
    return f is not None and _reward(f) == 1.0


def _reward(f: FeedbackRecord) -> float | None:
    if f.type == "thumbs":
        return 1.0 if f.thumbs == "up" else 0.0
    if f.type == "score" and f.score is not None and math.isfinite(f.score) and 0.0 <= f.score <= 1.0:
        return float(f.score)
    return None


def build_rows(segments: list[Segment], method: str, min_rating: float | None = None, deployment: str | None = None) -> FeedbackData:
    """Rows for `method` from the records of `segments` (see the module doc for every rule)."""
    threshold = DEFAULT_MIN_RATING if min_rating is None else float(min_rating)
    dropped: Counter[str] = Counter()
    inters: dict[str, InteractionRecord] = {}
    new_keys: set[Key] = set()
    raw_fbs: list[tuple[_dt.datetime, int, FeedbackRecord, bool]] = []
    new_inters: set[str] = set()  # interactions of the snapshot's own segments

    def drop(new: bool, reason: str) -> None:
        if new:
            dropped[reason] += 1

    seq = 0
    # join segments first: a record also in an earlier segment is that segment's (its copy here is a duplicate)
    for seg in sorted(segments, key=lambda s: not s.join_only):
        new = not seg.join_only
        for line in seg.data.splitlines():
            if not line.strip():
                continue
            try:
                rec = parse_record(line)
            except Exception:  # noqa: BLE001 - not JSON, not a record, out of the schema's bounds
                drop(new, "unparsable")
                continue
            if deployment and rec.deployment and rec.deployment != deployment:
                drop(new, "otherDeployment")
                continue
            if isinstance(rec, InteractionRecord):
                if rec.id in inters:
                    drop(new, "duplicate")
                    continue
                inters[rec.id] = rec
                if new:
                    new_keys.add(("i", rec.id))
                    new_inters.add(rec.id)
            elif new:  # feedback of a join segment is another snapshot's to train on
                seq += 1
                raw_fbs.append((_when(rec.time), seq, rec, new))

    fbs: dict[str, FeedbackRecord] = {}
    for _, _, f, new in sorted(raw_fbs, key=lambda x: (x[0], x[1])):
        if f.id in fbs:
            drop(new, "duplicate")
            continue
        fbs[f.id] = f
        if new:
            new_keys.add(("f", f.id))

    reasons: dict[Key, str] = {}
    used: set[Key] = set()
    rows: list[dict[str, Any]] = []

    def reason(key: Key, why: str) -> None:
        reasons.setdefault(key, why)

    def emit(keys: list[Key], row: dict[str, Any] | None, prompt_only: bool = False) -> None:
        """A unit of records becomes a row when it holds feedback of the snapshot's own segments (the rated
        record is what is trained on once), or for GRPO (`prompt_only`) an interaction of them."""
        if any(k in new_keys and (prompt_only or k[0] == "f") for k in keys):
            if row is not None:
                rows.append(row)
            used.update(keys)

    # usable feedback, by response
    ratings: dict[str, list[FeedbackRecord]] = defaultdict(list)
    corrections: dict[str, list[FeedbackRecord]] = defaultdict(list)
    prefs: list[FeedbackRecord] = []
    touched: dict[str, list[Key]] = defaultdict(list)  # response id -> keys of its usable feedback
    for f in fbs.values():
        k = ("f", f.id)
        if f.type == "label":
            reason(k, "unusableType")
        elif f.type == "score" and _reward(f) is None:
            reason(k, "scoreOutOfRange")
        elif f.response_id not in inters or (f.type == "preference" and f.other_response_id not in inters):
            reason(k, "interactionMissing")
        elif f.type == "preference":
            if f.other_response_id == f.response_id:
                reason(k, "identical")
            else:
                prefs.append(f)
                touched[f.response_id].append(k)
                touched[f.other_response_id].append(k)
        elif f.type in RATING_TYPES:
            ratings[f.response_id].append(f)
            touched[f.response_id].append(k)
        elif f.type == "correction":
            corrections[f.response_id].append(f)
            touched[f.response_id].append(k)

    def latest(items: list[FeedbackRecord]) -> FeedbackRecord:
        items.sort(key=lambda f: (_when(f.time), f.id))
        for f in items[:-1]:
            reason(("f", f.id), "superseded")
        return items[-1]

    rating = {rid: latest(v) for rid, v in ratings.items()}
    correction = {rid: latest(v) for rid, v in corrections.items()}

    prompts: dict[str, tuple[Any, str]] = {}  # rid -> (prompt, key)
    for rid, it in inters.items():
        p, problem = _prompt(it)
        if problem:
            reason(("i", rid), problem)
            for k in touched.get(rid, []):
                reason(k, problem)
        else:
            prompts[rid] = (p, json.dumps(p, sort_keys=True))

    def fk(f: FeedbackRecord) -> Key:
        return ("f", f.id)

    if method == "SFT":
        for rid, (p, _) in prompts.items():
            ik = ("i", rid)
            corr, rate = correction.get(rid), rating.get(rid)
            if corr is not None:
                if rate is not None:
                    reason(fk(rate), "superseded")  # the correction says what the answer should have been
                if _blank(corr.correction):
                    reason(ik, "empty"), reason(fk(corr), "empty")
                else:
                    emit([ik, fk(corr)], {"prompt": p, "completion": _completion(p, corr.correction), "reference": corr.correction})
            elif rate is not None:
                if _reward(rate) < threshold:
                    reason(ik, "belowThreshold"), reason(fk(rate), "belowThreshold")
                elif _blank(inters[rid].response):
                    reason(ik, "empty"), reason(fk(rate), "empty")
                else:
                    emit([ik, fk(rate)], {"prompt": p, "completion": _completion(p, inters[rid].response),
                                          "reference": inters[rid].response if _approves(rate) else None})
            reason(ik, "notForMethod" if touched.get(rid) else "unrated")
        for f in prefs:
            reason(fk(f), "notForMethod")
    elif method == "DPO":
        seen: set[tuple[str, str, str]] = set()

        def pair(keys: list[Key], p: Any, pkey: str, chosen: str, rejected: str, reference: str | None = None) -> None:
            if _blank(chosen) or _blank(rejected):
                for k in keys:
                    reason(k, "empty")
            elif chosen.strip() == rejected.strip():
                for k in keys:
                    reason(k, "identical")
            elif (pkey, chosen, rejected) in seen:
                emit(keys, None)  # the same pair again (another user): one row
            else:
                before = len(rows)
                emit(keys, {"prompt": p, "chosen": _completion(p, chosen), "rejected": _completion(p, rejected), "reference": reference})
                if len(rows) > before:
                    seen.add((pkey, chosen, rejected))

        for rid, corr in correction.items():
            if rid in prompts:
                p, pkey = prompts[rid]
                pair([("i", rid), fk(corr)], p, pkey, corr.correction, inters[rid].response, corr.correction)
        for f in prefs:
            better, worse = (f.response_id, f.other_response_id) if f.chosen == "this" else (f.other_response_id, f.response_id)
            keys = [fk(f), ("i", better), ("i", worse)]
            if better not in prompts or worse not in prompts:
                continue  # the reason (empty prompt, ...) is set already
            if prompts[better][1] != prompts[worse][1]:
                for k in keys:
                    reason(k, "promptMismatch")
                continue
            p, pkey = prompts[better]
            pair(keys, p, pkey, inters[better].response, inters[worse].response)
        groups: dict[str, list[str]] = defaultdict(list)
        for rid, rate in rating.items():
            if rid in prompts:
                groups[prompts[rid][1]].append(rid)
        for ids in groups.values():
            ids.sort(key=lambda r: (-_reward(rating[r]), _when(rating[r].time), r))
            for i in range(len(ids) // 2):
                a, b = ids[i], ids[len(ids) - 1 - i]
                if _reward(rating[a]) > _reward(rating[b]):
                    p, pkey = prompts[a]
                    pair([("i", a), fk(rating[a]), ("i", b), fk(rating[b])], p, pkey, inters[a].response, inters[b].response,
                         inters[a].response if _approves(rating[a]) else None)
            for r in ids:
                reason(("i", r), "unpaired"), reason(fk(rating[r]), "unpaired")
        for rid in prompts:
            reason(("i", rid), "unrated")
    else:  # GRPO: the prompts
        by_prompt: dict[str, dict[str, Any]] = {}
        for rid, (p, pkey) in prompts.items():
            g = by_prompt.setdefault(pkey, {"prompt": p, "keys": [], "rating": None, "reference": None, "approved": None})
            g["keys"].append(("i", rid))
            for which, f in (("rating", rating.get(rid)), ("reference", correction.get(rid))):
                if f is not None:
                    g["keys"].append(fk(f))
                    if g[which] is None or (_when(f.time), f.id) > (_when(g[which].time), g[which].id):
                        g[which] = f
            f = rating.get(rid)
            if _approves(f) and (g["approved"] is None or (_when(f.time), f.id) > (_when(g["approved"][0].time), g["approved"][0].id)):
                g["approved"] = (f, inters[rid].response)
        for g in by_prompt.values():
            # every row has both columns (None when unknown): `datasets` takes the columns of the first row only
            row: dict[str, Any] = {"prompt": g["prompt"],
                                   "feedback_score": None if g["rating"] is None else _reward(g["rating"]),
                                   "reference": g["reference"].correction if g["reference"] is not None
                                   else g["approved"][1] if g["approved"] is not None else None}
            emit(g["keys"], row, prompt_only=True)
        for f in prefs:
            reason(fk(f), "notForMethod")

    joined = 0
    for k in used:
        if k not in new_keys:
            joined += 1
    for k in new_keys - used:
        dropped[reasons.get(k, "unrated" if k[0] == "i" else "notForMethod")] += 1
    counts = {
        "segments": sum(not s.join_only for s in segments), "joinSegments": sum(s.join_only for s in segments),
        "interactions": sum(k[0] == "i" for k in new_keys), "feedback": sum(k[0] == "f" for k in new_keys),
        "rows": len(rows), "joinedFromEarlier": joined,
    }
    return FeedbackData(rows, dict(dropped), counts)


# ------------------------------------------------------------------------------- references for the graders

_ITEM_FIELD = re.compile(r"\{\{\s*item\.([A-Za-z0-9_\-]+)\s*\}\}")
_ANY_PLACEHOLDER = re.compile(r"\{\{.*?\}\}")


def _inverse(template: str, reference: str, *, strip: bool, case_sensitive: bool) -> tuple[str, str] | None:
    """(field, value) such that rendering `template` (one `{{item.<field>}}` between literal text) with it gives
    `reference` (compared as the grader compares: stripped, case-insensitively when it says so); None otherwise."""
    if len(_ANY_PLACEHOLDER.findall(template)) != 1 or (m := _ITEM_FIELD.search(template)) is None:
        return None
    prefix, suffix = template[:m.start()], template[m.end():]
    text = reference
    if strip:
        text, prefix, suffix = text.strip(), prefix.lstrip(), suffix.rstrip()
    fold = (lambda x: x) if case_sensitive else str.lower
    if len(text) <= len(prefix) + len(suffix) or not fold(text).startswith(fold(prefix)) or not fold(text).endswith(fold(suffix)):
        return None
    value = text[len(prefix):len(text) - len(suffix)]
    return (m.group(1), value) if value.strip() else None


def with_reference_fields(rows: list[dict[str, Any]], spec: Any) -> list[dict[str, Any]]:
    """Feedback rows as the RewardSpec's graders read them: a row's `reference` (a correction, or an answer the
    user approved) is the right completion for its prompt, so a grader comparing the output with a reference
    template -- StringCheck or Similarity, e.g. `<answer>{{item.answer}}</answer>` -- gets the item field that
    renders it (`answer: green` from the correction `<answer>green</answer>`). Without it the field renders
    empty and a held-out feedback row grades format only. Fields a row has already are never overwritten; rows
    without a reference, and references the template does not produce, are left as they are. New dicts; `spec`
    None (no graders) returns the rows."""
    if spec is None:
        return rows
    templates = []
    for g in getattr(spec, "graders", None) or []:
        if g.type in ("StringCheck", "Similarity"):
            c = g.config()
            templates.append((c.reference, bool(getattr(c, "strip", False)), bool(getattr(c, "case_sensitive", True))))
    if not templates:
        return rows
    out = []
    for r in rows:
        ref = r.get("reference")
        if isinstance(ref, list):  # a chat completion
            ref = "".join(m.get("content") or "" for m in ref if isinstance(m, dict))
        row = dict(r)
        if isinstance(ref, str) and ref:
            for template, strip, case_sensitive in templates:
                found = _inverse(template, ref, strip=strip, case_sensitive=case_sensitive)
                if found is not None and row.get(found[0]) is None:
                    row[found[0]] = found[1]
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------- the store


def check_segment_name(name: Any, where: str) -> str:
    """A segment object name relative to the store: no URI, no absolute path, no `..`."""
    if not isinstance(name, str) or not name.strip():
        raise TrainerError(f"{where}: a segment name must be a non-empty string, got {name!r}", "InvalidDataset")
    norm = posixpath.normpath(name)
    if "://" in name or name.startswith(("/", "\\")) or norm == ".." or norm.startswith("../") or "\\" in name or "\x00" in name:
        raise TrainerError(f"{where}: segment {name!r} is not a name inside the feedback store (no URIs, absolute paths or '..')", "InvalidDataset")
    return norm


@dataclass(frozen=True)
class PartRef:
    """A byte range `[offset, offset + length)` of one segment object and the sha256 of those bytes
    (`length` None: to the end of the object; `perennial.feedback.snapshot.SegmentPart`)."""

    name: str
    sha256: str
    offset: int = 0
    length: int | None = None

    def label(self) -> str:
        if self.offset == 0 and self.length is None:
            return self.name
        return f"{self.name}[{self.offset}:{'' if self.length is None else self.offset + self.length}]"


@dataclass
class SnapshotDoc:
    uri: str
    data: bytes
    segments: list[PartRef]       # the parts whose feedback is trained on
    join_segments: list[PartRef]  # parts read only for the interactions that feedback rates
    window: Any = None


_NAME_KEYS = ("name", "object", "key", "path")
_JOIN_LISTS = ("joinSegments", "joinOnlySegments", "contextSegments")


def parse_snapshot(data: bytes, where: str) -> tuple[list[PartRef], list[PartRef], Any]:
    """(segments, join segments, window) of a snapshot document; `InvalidDataset` when it is not one."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise TrainerError(f"{where} is not a JSON snapshot document: {e}", "InvalidDataset") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("segments"), list):
        raise TrainerError(f"{where} is not a snapshot document: expected a JSON object with a `segments` list", "InvalidDataset")

    def entries(items: Any, key: str, join: bool) -> tuple[list[PartRef], list[PartRef]]:
        main: list[PartRef] = []
        joins: list[PartRef] = []
        if items is None:
            return main, joins
        if not isinstance(items, list):
            raise TrainerError(f"{where}: `{key}` must be a list", "InvalidDataset")
        for i, e in enumerate(items):
            if not isinstance(e, dict):
                raise TrainerError(f"{where}: `{key}[{i}]` must be an object with `name` and `sha256` (got {e!r:.80})", "InvalidDataset")
            name = check_segment_name(next((e[k] for k in _NAME_KEYS if k in e), None), f"{where} `{key}[{i}]`")
            sha = e.get("sha256")
            if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha):
                raise TrainerError(f"{where}: segment {name!r} has no valid sha256: a snapshot's segments are verified before use", "InvalidDataset")
            offset, length = e.get("offset", 0), e.get("length")
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or (
                    length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 0)):
                raise TrainerError(f"{where}: segment {name!r} has an invalid byte range (offset {offset!r}, length {length!r})", "InvalidDataset")
            part = PartRef(name, sha.lower(), offset, length)
            is_join = join or e.get("joinOnly") is True or e.get("role") == "join"
            (joins if is_join else main).append(part)
        return main, joins

    segs, joins = entries(doc["segments"], "segments", False)
    for key in _JOIN_LISTS:
        _, more = entries(doc.get(key), key, True)
        joins += more
    segs = _unique(segs, where)
    own = {(p.name, p.offset) for p in segs}
    return segs, [j for j in _unique(joins, where) if (j.name, j.offset) not in own], doc.get("window")


def _unique(items: list[PartRef], where: str) -> list[PartRef]:
    out: dict[tuple[str, int], PartRef] = {}
    for p in items:
        if out.get((p.name, p.offset), p) != p:
            raise TrainerError(f"{where} lists {p.label()} twice with different hashes or lengths", "InvalidDataset")
        out[(p.name, p.offset)] = p
    return list(out.values())


def read_snapshot(store_uri: str, snapshot: str) -> SnapshotDoc:
    """The snapshot document `snapshot`: an object name in the store, or a URI / absolute path."""
    if "://" in snapshot or snapshot.startswith("/"):
        uri = snapshot
        fs, path = filesystem(snapshot)
    else:
        name = check_segment_name(snapshot, "feedback snapshot")
        uri = f"{store_uri.rstrip('/')}/{name}"
        fs, root = filesystem(store_uri)
        path = f"{root.rstrip('/')}/{name}"
    if not fs.exists(path):
        raise TrainerError(f"feedback snapshot {uri} not found", "DatasetNotFound")
    with fs.open(path, "rb") as fh:
        data = fh.read()
    segs, joins, window = parse_snapshot(data, f"feedback snapshot {uri}")
    return SnapshotDoc(uri, data, segs, joins, window)


def _read(fs: Any, root: str, part: PartRef, store_uri: str, verify: bool) -> bytes:
    path = f"{root}/{part.name}"
    if not fs.exists(path):
        raise TrainerError(f"feedback segment {part.name} not found in store {store_uri}", "DatasetNotFound")
    if part.offset == 0 and part.length is None:
        with fs.open(path, "rb") as fh:
            data = fh.read()
    else:
        end = None if part.length is None else part.offset + part.length
        data = fs.cat_file(path, start=part.offset, end=end)
        if part.length is not None and len(data) != part.length:
            raise TrainerError(f"feedback segment {part.label()} is shorter than the snapshot says ({len(data)} bytes, not "
                               f"{part.length}): it changed after the snapshot", "DatasetHashMismatch")
    if verify:
        got = hashlib.sha256(data).hexdigest()
        if got != part.sha256:
            raise TrainerError(
                f"feedback segment {part.label()} changed after the snapshot (sha256 {got}, the snapshot says {part.sha256}): "
                "the run trains only on exactly what was snapshotted", "DatasetHashMismatch")
    return data


def _hidden(rel: str) -> bool:
    """The store's own documents (`<deployment>/_perennial/...`) and temp files are not segments."""
    return any(c.startswith(("_", ".")) for c in rel.split("/"))


def load_feedback(name: str, store_uri: str, method: str, *, segments: list[str] | None = None, snapshot: str | None = None,
                  min_rating: float | None = None, min_examples: int | None = None, deployment: str | None = None,
                  split: str = "Train"):
    """A `LoadedDataset` of `method` rows from a feedback store (see the module doc); `stats` holds the counts."""
    from .data import LoadedDataset

    fs, root = filesystem(store_uri)
    root = root.rstrip("/")
    window = None
    listed = list(dict.fromkeys(check_segment_name(s, f"dataset {name!r}") for s in segments or []))
    if snapshot:
        doc = read_snapshot(store_uri, snapshot)
        names = list(dict.fromkeys(p.name for p in doc.segments))
        if listed and set(listed) != set(names):
            raise TrainerError(f"dataset {name!r}: `feedback.segments` ({len(listed)}) are not the segments of snapshot {doc.uri} "
                               f"({len(names)}); list none, or exactly those", "InvalidDataset")
        segs = [Segment(p.label(), _read(fs, root, p, store_uri, True)) for p in doc.segments]
        segs += [Segment(p.label(), _read(fs, root, p, store_uri, True), join_only=True) for p in doc.join_segments]
        digest, uri, window = hashlib.sha256(doc.data).hexdigest(), doc.uri, doc.window
    else:
        if listed:
            names = listed
        else:
            base = f"{root}/{check_segment_name(deployment, 'deploymentRef')}" if deployment else root
            found = sorted(p for p in fs.find(base) if p.endswith(".jsonl")) if fs.exists(base) else []
            names = [r for r in (p[len(root) + 1:] if p.startswith(root + "/") else p for p in found) if not _hidden(r)]
        segs = [Segment(n, _read(fs, root, PartRef(n, ""), store_uri, False)) for n in names]
        h = hashlib.sha256()
        for s in segs:
            h.update(s.data)
        digest, uri = h.hexdigest(), store_uri
    out = build_rows(segs, method, min_rating, deployment)
    log.info("dataset %r (%s%s): %s", name, uri, f", window {json.dumps(window)}" if window else "", out.summary())
    stats = {**out.counts, "dropped": out.dropped}
    if split == "Train":
        minimum = min_examples or DEFAULT_MIN_EXAMPLES[method]
        if len(out.rows) < minimum:
            raise TrainerError(
                f"dataset {name!r}: only {len(out.rows)} usable {method} examples from feedback, the minimum is {minimum} "
                f"(`feedback.minExamples`); not training on too little data ({out.summary()})", "InsufficientData")
    elif not out.rows:
        raise TrainerError(f"dataset {name!r}: the feedback in {uri} yields no {method} rows ({out.summary()})", "EmptyDataset")
    return LoadedDataset(name, uri, split, out.rows, digest, [s.name for s in segs], stats=stats)


def report(datasets: list[Any]) -> tuple[dict[str, float], str]:
    """What a run says about its feedback datasets (`LoadedDataset`s with `stats`): metrics for the
    termination message (`data/feedback_rows`, `data/feedback_records`, `data/dropped/<reason>`, summed over
    the feedback datasets; they become the TrainingRun's `status.metrics`) and a sentence for its message."""
    metrics: dict[str, float] = {}
    parts = []
    dropped: Counter[str] = Counter()
    for ds in datasets:
        st = getattr(ds, "stats", None)
        if not st:
            continue
        metrics["data/feedback_rows"] = metrics.get("data/feedback_rows", 0.0) + len(ds.rows)
        metrics["data/feedback_records"] = metrics.get("data/feedback_records", 0.0) + st.get("interactions", 0) + st.get("feedback", 0)
        dropped.update(st.get("dropped", {}))
        text = f"feedback {ds.name!r}: {len(ds.rows)} rows from {st.get('interactions', 0)} interactions and {st.get('feedback', 0)} feedback records"
        if st.get("dropped"):
            text += " (dropped " + ", ".join(f"{r} {n}" for r, n in sorted(st["dropped"].items(), key=lambda x: (-x[1], x[0]))) + ")"
        parts.append(text)
    for r, n in dropped.items():
        metrics[f"data/dropped/{r}"] = float(n)
    return metrics, "; ".join(parts)


def drop_too_long(datasets: list[Any], splits: list[list[dict[str, Any]]], too_long: Any, minimums: dict[str, int]) -> list[list[dict[str, Any]]]:
    """`splits` (lists of rows: train, eval) without the rows of feedback datasets for which `too_long(row)` is
    true (longer than the run's `maxLength` in tokens: truncated, an SFT completion or a DPO answer would be cut
    away), counted per dataset as `tooLong` (rows, not records) in its `stats`. A Train feedback dataset left with
    fewer rows than `minimums[name]` fails the run (`InsufficientData`). Rows of file datasets are kept as they are."""
    owner = {id(r): ds for ds in datasets if getattr(ds, "stats", None) for r in ds.rows}
    if not owner:
        return splits
    gone: set[int] = set()
    out = []
    for rows in splits:
        keep = []
        for r in rows:
            if id(r) in owner and too_long(r):
                gone.add(id(r))
            else:
                keep.append(r)
        out.append(keep)
    for ds in datasets:
        if not getattr(ds, "stats", None):
            continue
        n = sum(id(r) in gone for r in ds.rows)
        if n:
            ds.stats["dropped"]["tooLong"] = ds.stats["dropped"].get("tooLong", 0) + n
            ds.rows = [r for r in ds.rows if id(r) not in gone]
            log.info("dataset %r: %d rows longer than maxLength dropped, %d left", ds.name, n, len(ds.rows))
        minimum = minimums.get(ds.name, 1)
        if ds.split == "Train" and len(ds.rows) < minimum:
            raise TrainerError(
                f"dataset {ds.name!r}: only {len(ds.rows)} usable examples from feedback fit in `hyperparameters.maxLength` "
                f"({n} longer dropped), the minimum is {minimum} (`feedback.minExamples`); not training on too little data",
                "InsufficientData")
    return out
