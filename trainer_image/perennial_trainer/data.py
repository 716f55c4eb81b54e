"""Datasets: JSONL / Parquet files behind URIs, and feedback-store snapshots, turned into
the rows TRL expects per method (SFT: `messages` or `prompt`/`completion`; DPO:
`prompt`/`chosen`/`rejected`; GRPO: `prompt` + item columns)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from perennial.api import FeedbackRecord, InteractionRecord, parse_record

from .errors import TrainerError
from .storage import filesystem, resolve_uri

log = logging.getLogger("perennial_trainer.data")

REQUIRED_COLUMNS = {
    "SFT": [("messages",), ("prompt", "completion"), ("text",)],
    "DPO": [("prompt", "chosen", "rejected")],
    "GRPO": [("prompt",)],
}


@dataclass
class LoadedDataset:
    name: str
    uri: str
    split: str
    rows: list[dict[str, Any]]
    sha256: str
    files: list[str] = field(default_factory=list)


def _list_files(uri: str) -> tuple[Any, list[str]]:
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise TrainerError(f"dataset file {uri} does not exist (resolved to {resolve_uri(uri)})", "DatasetNotFound")
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith((".jsonl", ".json", ".parquet")))
        if not files:
            raise TrainerError(f"dataset directory {uri} holds no .jsonl or .parquet files", "DatasetNotFound")
        return fs, files
    return fs, [path]


def _parse_file(name: str, fname: str, blob: bytes, fmt: str) -> list[dict[str, Any]]:
    if fmt == "Parquet" or (fmt == "Auto" and fname.endswith(".parquet")):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(io.BytesIO(blob)).to_pylist()
        except Exception as e:  # noqa: BLE001
            raise TrainerError(f"dataset {name!r}: file {fname} is not valid Parquet: {e}", "InvalidDataset") from None
    rows = []
    for i, line in enumerate(blob.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainerError(f"dataset {name!r}: file {fname} line {i} is not valid JSON: {e}", "InvalidDataset") from None
        if not isinstance(row, dict):
            raise TrainerError(f"dataset {name!r}: file {fname} line {i} is not a JSON object", "InvalidDataset")
        rows.append(row)
    return rows


def load_uri_dataset(name: str, uri: str, fmt: str = "Auto", split: str = "Train", expected_sha256: str | None = None) -> LoadedDataset:
    fs, files = _list_files(uri)
    h = hashlib.sha256()
    rows: list[dict[str, Any]] = []
    for f in files:
        with fs.open(f, "rb") as fh:
            blob = fh.read()
        h.update(blob)
        rows.extend(_parse_file(name, f, blob, fmt))
    digest = h.hexdigest()
    if expected_sha256 and expected_sha256 != digest:
        raise TrainerError(f"dataset {name!r} ({uri}): content sha256 {digest} differs from the expected {expected_sha256}", "DatasetHashMismatch")
    if not rows:
        raise TrainerError(f"dataset {name!r} ({uri}) is empty", "InvalidDataset")
    return LoadedDataset(name, uri, split, rows, digest, files)


def check_columns(ds: LoadedDataset, method: str) -> None:
    """Every row must carry one of the method's column sets; the error names dataset, file and column."""
    options = REQUIRED_COLUMNS[method]
    for i, row in enumerate(ds.rows):
        if any(all(c in row for c in opt) for opt in options):
            continue
        best = max(options, key=lambda o: sum(c in row for c in o))
        if any(c in row for c in best):
            missing = ", ".join(repr(c) for c in best if c not in row)
        else:
            missing = " or ".join("+".join(repr(c) for c in o) for o in options)
        where = ds.files[0] if len(ds.files) == 1 else f"one of {ds.files}"
        raise TrainerError(
            f"dataset {ds.name!r} (file {where}) row {i}: missing column {missing} "
            f"required by {method} (expected one of: {' | '.join('+'.join(o) for o in options)}; row has {sorted(row)})",
            "MissingColumn",
        )


# ---------------------------------------------------------------------------- feedback


def _prompt_of(inter: InteractionRecord) -> Any:
    if inter.messages:
        return [m.model_dump(exclude_none=True) for m in inter.messages]
    return inter.prompt or ""


def _completion(prompt: Any, text: str) -> Any:
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def feedback_to_rows(records: list[InteractionRecord | FeedbackRecord], method: str, min_rating: float | None = None) -> list[dict[str, Any]]:
    """Turn feedback-store records into training rows for `method`.

    SFT: responses rated >= `min_rating` (default 0.5; thumbs up = 1) and corrections.
    DPO: correction vs original; explicit preferences; differently-rated responses to one prompt.
    GRPO: the distinct prompts (with `feedback_score` when rated, for HumanFeedback graders).
    """
    inters = {r.id: r for r in records if isinstance(r, InteractionRecord)}
    fbs = [r for r in records if isinstance(r, FeedbackRecord)]
    threshold = 0.5 if min_rating is None else min_rating
    rating: dict[str, float] = {}
    corrections: dict[str, str] = {}
    prefs: list[tuple[str, str]] = []  # (better id, worse id)
    for fb in fbs:
        if fb.response_id not in inters:
            continue
        r = fb.reward()
        if r is not None:
            rating[fb.response_id] = r  # the last rating wins
        if fb.type == "correction" and fb.correction:
            corrections[fb.response_id] = fb.correction
        if fb.type == "preference" and fb.other_response_id in inters:
            a, b = fb.response_id, fb.other_response_id
            prefs.append((a, b) if fb.chosen == "this" else (b, a))
    rows: list[dict[str, Any]] = []
    if method == "SFT":
        for rid, inter in inters.items():
            p = _prompt_of(inter)
            if rid in corrections:
                rows.append({"prompt": p, "completion": _completion(p, corrections[rid])})
            elif rid in rating and rating[rid] >= threshold:
                rows.append({"prompt": p, "completion": _completion(p, inter.response)})
    elif method == "DPO":
        seen = set()

        def add(p, chosen, rejected):
            key = (json.dumps(p, sort_keys=True), chosen, rejected)
            if chosen != rejected and key not in seen:
                seen.add(key)
                rows.append({"prompt": p, "chosen": _completion(p, chosen), "rejected": _completion(p, rejected)})

        for rid, corr in corrections.items():
            add(_prompt_of(inters[rid]), corr, inters[rid].response)
        for better, worse in prefs:
            add(_prompt_of(inters[better]), inters[better].response, inters[worse].response)
        by_prompt: dict[str, list[str]] = defaultdict(list)
        for rid in rating:
            by_prompt[json.dumps(_prompt_of(inters[rid]), sort_keys=True)].append(rid)
        for ids in by_prompt.values():
            for a in ids:
                for b in ids:
                    if rating[a] > rating[b]:
                        add(_prompt_of(inters[a]), inters[a].response, inters[b].response)
    else:
        seen_p: dict[str, dict[str, Any]] = {}
        for rid, inter in inters.items():
            p = _prompt_of(inter)
            key = json.dumps(p, sort_keys=True)
            row = seen_p.setdefault(key, {"prompt": p})
            if rid in rating:
                row["feedback_score"] = rating[rid]
            if rid in corrections:
                row["reference"] = corrections[rid]
        rows = list(seen_p.values())
    return rows


def load_feedback_dataset(name: str, store_uri: str, segments: list[str], method: str, min_rating: float | None, split: str = "Train") -> LoadedDataset:
    fs, root = filesystem(store_uri)
    root = root.rstrip("/")
    if segments:
        files = [f"{root}/{s}" for s in segments]
    else:
        files = sorted(p for p in fs.find(root) if p.endswith(".jsonl")) if fs.exists(root) else []
    h = hashlib.sha256()
    records = []
    for f in files:
        if not fs.exists(f):
            raise TrainerError(f"dataset {name!r}: feedback segment {f} not found in store {store_uri}", "DatasetNotFound")
        with fs.open(f, "rb") as fh:
            blob = fh.read()
        h.update(blob)
        for i, line in enumerate(blob.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(parse_record(line))
            except Exception as e:  # noqa: BLE001 - a bad record is skipped, not fatal
                log.warning("dataset %r: skipping invalid record %s:%d: %s", name, f, i, e)
    rows = feedback_to_rows(records, method, min_rating)
    if not rows:
        raise TrainerError(f"dataset {name!r}: the feedback snapshot of {store_uri} ({len(files)} segments, {len(records)} records) yields no {method} rows", "EmptyDataset")
    return LoadedDataset(name, store_uri, split, rows, h.hexdigest(), files)


def split_held_out(rows: list[dict[str, Any]], percent: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if percent <= 0 or len(rows) < 2:
        return rows, []
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n = max(1, round(len(rows) * percent / 100))
    n = min(n, len(rows) - 1)
    held = set(idx[:n])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
