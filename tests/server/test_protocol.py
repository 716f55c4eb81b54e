"""Feedback request parsing (protocol.py) and the record line the handler builds from it."""

from __future__ import annotations

import json
import tempfile

import pytest
from perennial_records import FeedbackRecord, parse_record
from perennial_server.api_server import Sidecar
from perennial_server.config import SidecarConfig
from perennial_server.protocol import RequestError, parse_feedback


@pytest.fixture(scope="module")
def handler():
    sc = Sidecar(SidecarConfig(spool_dir=tempfile.mkdtemp(), upstream="http://127.0.0.1:1", deployment="demo", namespace="ns"))
    return sc.feedback.__self__


@pytest.mark.parametrize("body", [
    {"response_id": "r1", "thumbs": "up"},
    {"responseId": "r1", "score": 0.25, "user": "u", "comment": "fine"},
    {"response_id": "r1", "type": "preference", "otherResponseId": "r2", "chosen": "other"},
    {"response_id": "r1", "label": "rude"},
    {"response_id": "r1", "correction": "write to jane@example.com instead", "comment": "call 555-123-4567"},
    {"id": "fb-x", "response_id": "r1", "type": "score", "score": -3},
])
def test_the_record_line_is_what_the_record_model_would_write(handler, body: dict) -> None:
    parsed = parse_feedback(json.dumps(body).encode(), 10)
    assert not isinstance(parsed, RequestError), parsed
    (item,), _ = parsed
    line = handler.record("fb-1", item, True)
    got = parse_record(line)
    assert isinstance(got, FeedbackRecord)
    fields = {k: v for k, v in item.req.model_dump(exclude_none=True).items() if k not in ("id", "type")}
    for t in ("label", "correction", "comment"):
        if t in fields:
            fields[t] = handler.s.redactor.text(fields[t])
    want = FeedbackRecord(id="fb-1", type=item.type, response_seen=True, deployment="demo", namespace="ns", time=got.time, **fields)
    assert got == want
    assert json.loads(line) == json.loads(want.to_json())
    assert "jane@example.com" not in line.decode() and "555-123-4567" not in line.decode()


def test_a_batch_error_names_the_item_and_the_field_as_sent() -> None:
    err = parse_feedback(json.dumps([{"response_id": "a", "thumbs": "up"}, {"responseId": "b", "score": "1"}]).encode(), 10)
    assert isinstance(err, RequestError) and err.param == "[1].score" and err.message.startswith("feedback[1]: ")
    err = parse_feedback(json.dumps([{"response_id": "a", "thumbs": "up"}] * 11).encode(), 10)
    assert isinstance(err, RequestError) and err.code == "invalid_batch_size"
    for raw in (b"", b"3", b'"x"', b"[1]", b"[]", b"{", b"[" * 10000):
        err = parse_feedback(raw, 10)
        assert isinstance(err, RequestError) and err.status == 400 and err.code in ("invalid_json", "invalid_batch_size"), (raw[:10], err)
