"""Feedback request parsing (protocol.py) and the record line the handler builds from it."""

from __future__ import annotations

import json
import tempfile
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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
    {"response_id": "r1", "thumbs": "down", "user": "jane@example.com", "label": None},
    {"id": "fb-x", "response_id": "r1", "type": "score", "score": -3},
])
def test_the_record_line_is_what_the_record_model_would_write(handler, body: dict) -> None:
    parsed = parse_feedback(json.dumps(body).encode(), 10)
    assert not isinstance(parsed, RequestError), parsed
    (item,), _ = parsed
    line = handler.record("fb-1", item, True)
    got = parse_record(line)
    assert isinstance(got, FeedbackRecord)
    fields = {k: v for k, v in item.req.items() if v is not None and k not in ("id", "type")}
    for t in ("label", "correction", "comment", "user"):
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


_KEYS = ["id", "response_id", "responseId", "type", "score", "thumbs", "label", "correction", "other_response_id", "otherResponseId",
         "chosen", "comment", "user", "bogus"]
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**7), max_value=10**7), st.floats(allow_nan=True),
                    st.sampled_from(["", "r1", "up", "down", "this", "other", "score", "thumbs", "label", "correction", "preference", "x" * 300]),
                    st.text(max_size=5), st.lists(st.integers(), max_size=2))


@settings(max_examples=1500, deadline=None)
@given(st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=6))
def test_the_fields_dict_accepts_and_rejects_exactly_what_the_model_does(body: dict) -> None:
    """protocol.FeedbackFields (what requests are validated with) and FeedbackRequest (the documented
    model, whose errors are answered) agree on every input: same verdict, same values."""
    import pydantic
    from perennial_server.protocol import _FIELDS, FeedbackRequest

    for raw in (json.dumps(body).encode(), None):
        try:
            want = FeedbackRequest.model_validate_json(raw) if raw else FeedbackRequest.model_validate(body)
        except pydantic.ValidationError:
            want = None
        try:
            got = _FIELDS.validate_json(raw) if raw else _FIELDS.validate_python(body)
        except pydantic.ValidationError:
            got = None
        assert (got is None) == (want is None), (body, got, want)
        if want is not None:
            assert got == want.model_dump(exclude_unset=True), body


_RAW_EDGES = [b'{"response_id":"a","score":1}', b'{"response_id":"a","thumbs":"up","thumbs":"down"}', b'{"response_id":"\\ud800"}',
              b'{"response_id":"a\xff"}', b'\xef\xbb\xbf{"response_id":"a"}', b'{"response_id":"a"} x', b'{"response_id":"a",}',
              b'{"response_id":"a","score":NaN}', b'{"response_id":"a","score":Infinity}', b'{"response_id":"a","score":1e400}',
              b'{"response_id":"a","score":-0.0}', b'{"response_id":"a","score":100000000000000000000000}', b'{"response_id":"a","id":null}',
              b'{"response_id":"a","responseId":"b"}', b'{"response_id":"\\u0000"}', b' {"response_id":"a"}\n', b'{"response_id":"a","score":5e-324}',
              b'{"response_id":"a","label":"\\ud83d\\ude00"}', b'{"response_id":"a","score":true}', b'{"response_id":"a","score":"0.5"}',
              b'{"response_id":"' + b"x" * 129 + b'"}', b'{"response_id":"a","label":""}', b'{"response_id":"a","thumbs":"UP"}', b'{}', b'[]']


def _fast_and_model(raw: bytes) -> tuple[Any, Any]:
    import pydantic
    from perennial_server.protocol import FeedbackRequest, _fast

    assert _fast is not None, "msgspec is installed with the server extras"
    try:
        got = _fast(raw)
    except Exception:  # noqa: BLE001 -- any refusal: the pydantic path decides
        got = None
    try:
        want = FeedbackRequest.model_validate_json(raw).model_dump(exclude_unset=True)
    except pydantic.ValidationError:
        want = None
    return got, want


@settings(max_examples=1500, deadline=None)
@given(st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=6))
def test_the_fast_decoder_accepts_only_what_the_model_accepts_with_the_same_values(body: dict) -> None:
    """protocol's msgspec fast path never accepts what FeedbackRequest refuses, and what it accepts has the
    model's values (what it refuses, a camelCase key included, goes to the pydantic path)."""
    got, want = _fast_and_model(json.dumps(body).encode())
    if got is not None:
        assert want is not None and got == want, (body, got, want)
    elif want is not None:  # refused by the fast path, accepted by the model: only for the camelCase spellings
        assert {"responseId", "otherResponseId"} & set(body), (body, want)


@pytest.mark.parametrize("raw", _RAW_EDGES)
def test_the_fast_decoder_agrees_with_the_model_on_json_edge_cases(raw: bytes) -> None:
    got, want = _fast_and_model(raw)
    if got is not None:
        assert got == want and [type(v) for v in got.values()] == [type(want[k]) for k in got], (raw, got, want)
    assert parse_feedback(raw, 10) == _parse_with_pydantic_only(raw), raw


def _parse_with_pydantic_only(raw: bytes) -> Any:
    from perennial_server import protocol

    fast, protocol._fast = protocol._fast, None
    try:
        return parse_feedback(raw, 10)
    finally:
        protocol._fast = fast


@settings(max_examples=800, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**53), max_value=2**53),
                                                      st.floats(allow_nan=False, allow_infinity=False), st.text())))
def test_records_are_encoded_to_the_json_values_pydantic_would_write(rec: dict) -> None:
    """serving_feedback encodes records and answers with msgspec: one line, the values pydantic-core's to_json writes."""
    from perennial_server.serving_feedback import encode
    from pydantic_core import from_json, to_json

    line = encode(rec)
    assert b"\n" not in line and from_json(line) == from_json(to_json(rec)) == rec


def _one_agrees_with_parse_feedback(raw: bytes) -> None:
    from perennial_server.protocol import parse_one

    got = parse_one(raw)
    if got is None:
        return  # parse_feedback decides
    want = parse_feedback(raw, 10)
    assert not isinstance(want, RequestError), (raw, got, want)
    (item,), batch = want
    assert not batch and got == (item.req, item.type), (raw, got, item)
    assert [type(v) for v in got[0].values()] == [type(v) for v in item.req.values()], raw


@settings(max_examples=1500, deadline=None)
@given(st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=6))
def test_the_one_object_fast_path_takes_only_what_parse_feedback_accepts_with_the_same_values(body: dict) -> None:
    """serving_feedback tries protocol.parse_one first: whatever it takes, parse_feedback takes too, as the
    same fields and type (a missing or incomplete type, arrays and anything refused go to parse_feedback)."""
    _one_agrees_with_parse_feedback(json.dumps(body).encode())


@pytest.mark.parametrize("raw", _RAW_EDGES)
def test_the_one_object_fast_path_agrees_on_json_edge_cases(raw: bytes) -> None:
    _one_agrees_with_parse_feedback(raw)
