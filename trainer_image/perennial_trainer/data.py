"""Datasets: JSONL / Parquet files behind URIs, and feedback-store snapshots, turned into
the rows TRL expects per method (SFT: `messages` or `prompt`/`completion`; DPO:
`prompt`/`chosen`/`rejected`; GRPO: `prompt` + item columns)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from perennial.api import FeedbackRecord, InteractionRecord

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
    #: feedback datasets: counts of segments, records, rows and dropped records by reason
    stats: dict[str, Any] = field(default_factory=dict)


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


def feedback_to_rows(records: list[InteractionRecord | FeedbackRecord], method: str, min_rating: float | None = None) -> list[dict[str, Any]]:
    """Training rows for `method` from feedback-store records (the rules: `perennial_trainer.feedback`)."""
    from .feedback import Segment, build_rows

    data = "\n".join(r.to_json() for r in records).encode()
    return build_rows([Segment("records", data)], method, min_rating).rows


def load_feedback_dataset(name: str, store_uri: str, segments: list[str], method: str, min_rating: float | None, split: str = "Train",
                          *, snapshot: str | None = None, min_examples: int | None = None, deployment: str | None = None) -> LoadedDataset:
    """A feedback dataset: a snapshot document, listed segments, or every segment of `deployment` (`perennial_trainer.feedback`)."""
    from .feedback import load_feedback

    return load_feedback(name, store_uri, method, segments=segments, snapshot=snapshot, min_rating=min_rating,
                         min_examples=min_examples, deployment=deployment, split=split)


def split_held_out(rows: list[dict[str, Any]], percent: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held out): about `percent` of the rows held out, deterministically, whole prompts at a time: rows
    with the same `prompt` (feedback: many users asking one question, several pairs of one prompt) are never on
    both sides, so evaluation does not grade prompts the adapter was trained on. Rows without a `prompt`, and
    data with a single prompt, are split row by row."""
    if percent <= 0 or len(rows) < 2:
        return rows, []
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        key = json.dumps(r["prompt"], sort_keys=True, default=str) if "prompt" in r else f"#row{i}"
        groups.setdefault(key, []).append(i)
    members = list(groups.values()) if len(groups) > 1 else [[i] for i in range(len(rows))]
    order = list(range(len(members)))
    random.Random(seed).shuffle(order)
    n = max(1, round(len(rows) * percent / 100))
    n = min(n, len(rows) - 1)
    held: set[int] = set()
    for g in order:
        if len(held) >= n:
            break
        after = len(held) + len(members[g])
        if after > len(rows) - 1 or (held and after - n > n - len(held)):
            continue  # it would overshoot more than it fills: a smaller group may fit better
        held.update(members[g])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
