"""Request and response models of the sidecar's own API (`POST /v1/feedback`), as vLLM's
`entrypoints/openai/protocol.py`: the body is parsed once, into these models, straight from bytes.

Field names are snake_case (the documented spelling); camelCase aliases are accepted. Values are
strict: a number is a JSON number (`"0.5"` is not a score), a string a JSON string. Errors name the
field in the spelling the client sent (`param`), so a client can point at its own key."""

from __future__ import annotations

from typing import (
    Annotated,
    Any,
    Literal,
    NamedTuple,
    NotRequired,
    get_args,
    get_origin,
)

import pydantic
from perennial_records import FeedbackType
from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic_core import from_json
from typing_extensions import TypedDict  # typing.TypedDict: pydantic needs 3.12+

_ID = {"min_length": 1, "max_length": 128}


class FeedbackRequest(pydantic.BaseModel):
    """One rating of a response. `id` is the idempotency key: a retry with the same `id` is answered
    like the first request and stored once (within the sidecar's window, see idempotency.py)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True, frozen=True)

    id: str | None = Field(default=None, **_ID)
    response_id: str = Field(**_ID)
    type: FeedbackType | None = None
    score: float | None = Field(default=None, ge=-1e6, le=1e6, allow_inf_nan=False)
    thumbs: Literal["up", "down"] | None = None
    label: str | None = Field(default=None, min_length=1, max_length=256)
    correction: str | None = Field(default=None, min_length=1, max_length=65536)
    other_response_id: str | None = Field(default=None, **_ID)
    chosen: Literal["this", "other"] | None = None
    comment: str | None = Field(default=None, max_length=4096)
    user: str | None = Field(default=None, max_length=256)


def _fields_dict() -> Any:
    """FeedbackRequest's fields as a TypedDict: the same types, constraints, aliases and config,
    validated into a plain dict of the keys sent (about 40% less validation work than the model's
    instance, and nothing to copy out of it). Built from the model, so the two cannot drift apart."""
    fields: dict[str, Any] = {}
    for name, f in FeedbackRequest.model_fields.items():
        t = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        fields[name] = t if f.is_required() else NotRequired[t]
    td = TypedDict("FeedbackFields", fields)  # type: ignore[operator]
    td.__pydantic_config__ = FeedbackRequest.model_config  # type: ignore[attr-defined]
    return td


FeedbackFields = _fields_dict()
_FIELDS = pydantic.TypeAdapter(FeedbackFields)


def _fast_decoder() -> Any:
    """FeedbackRequest's fields as a msgspec Struct decoder for the documented (snake_case) spelling:
    the same types, bounds and strictness, unknown keys refused, absent fields UNSET (left out of the dict,
    as pydantic leaves out what was not sent). msgspec decodes and checks a feedback body in about a third of
    pydantic-core's time. Only a fast path: whatever it refuses (a camelCase key, any invalid body) goes
    through FeedbackFields, which decides and words the error; tests hold the two to the same verdicts and
    values. Built from the model, so it cannot drift from it. None without msgspec (the pydantic path only)."""
    try:
        import msgspec
    except ImportError:  # pragma: no cover -- msgspec is in the server extras
        return None
    fields: list[tuple[Any, ...]] = []
    for name, f in FeedbackRequest.model_fields.items():
        bounds = {k: v for m in f.metadata for k in ("min_length", "max_length", "ge", "le") if (v := getattr(m, k, None)) is not None}
        args = [a for a in get_args(f.annotation) or (f.annotation,) if a is not type(None)]
        if get_origin(f.annotation) is Literal:
            args = [f.annotation]
        if len(args) != 1:
            raise TypeError(f"FeedbackRequest.{name}: no msgspec type for {f.annotation}")
        t = Annotated[args[0], msgspec.Meta(**bounds)] if bounds else args[0]
        fields.append((name, t) if f.is_required() else (name, t | None | msgspec.UnsetType, msgspec.UNSET))
    struct = msgspec.defstruct("FeedbackFieldsFast", fields, kw_only=True, forbid_unknown_fields=True)
    dec = msgspec.json.Decoder(struct)
    to_builtins = msgspec.to_builtins

    def decode(raw: bytes) -> dict[str, Any]:
        return to_builtins(dec.decode(raw))

    decode.struct_decode = dec.decode  # type: ignore[attr-defined]
    decode.to_builtins = to_builtins  # type: ignore[attr-defined]
    return decode


_fast = _fast_decoder()
_fast_struct = getattr(_fast, "struct_decode", None)
_to_builtins = getattr(_fast, "to_builtins", None)


class FeedbackResponse(pydantic.BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    response_id: str
    type: FeedbackType
    status: Literal["recorded"] = "recorded"
    response_seen: bool


FEEDBACK_TYPES = ("score", "thumbs", "label", "correction", "preference")
_ALIASES = {name: f.alias or name for name, f in FeedbackRequest.model_fields.items()}
_NAMES = {**{a: n for n, a in _ALIASES.items()}, **{n: n for n in _ALIASES}}


class RequestError(NamedTuple):
    """A 4xx answer: `param` as the client spelled it (None: the body as a whole)."""

    status: int
    message: str
    code: str
    param: str | None = None


def spelled(field: str, sent: Any) -> str:
    """The key the client used for `field` (its snake_case name, or the camelCase alias); the
    snake_case name when it sent neither."""
    if isinstance(sent, dict):
        name = _NAMES.get(field, field)
        alias = _ALIASES.get(name, name)
        if alias in sent and name not in sent:
            return alias
        if name in sent:
            return name
        if field in sent:
            return field
    return _NAMES.get(field, field)


_NEEDS = {"score": ("score",), "thumbs": ("thumbs",), "label": ("label",), "correction": ("correction",), "preference": ("other_response_id", "chosen")}


def _type_of(req: dict[str, Any], sent: Any) -> FeedbackType | RequestError:
    """The feedback type: as given, or inferred from the one type field that is set; checked
    against the fields the type needs."""
    t = req.get("type")
    if t is None:
        present = [t for t in ("score", "thumbs", "label", "correction") if req.get(t) is not None]
        if req.get("other_response_id") is not None or req.get("chosen") is not None:
            present.append("preference")
        if len(present) != 1:
            return RequestError(400, "`type` must be one of 'score', 'thumbs', 'label', 'correction', 'preference' "
                                "(or set exactly one of `score`, `thumbs`, `label`, `correction`)", "missing_type", "type")
        t = present[0]
    for f in _NEEDS[t]:
        if req.get(f) is None:
            p = spelled(f, sent)
            return RequestError(400, f"`{p}` must be set for feedback of type `{t}`", "invalid_feedback", p)
    return t


def _validation_error(e: pydantic.ValidationError, sent: Any) -> RequestError:
    err = e.errors(include_url=False)[0]
    loc = err.get("loc", ())
    if err.get("type") == "json_invalid":
        return RequestError(400, "request body must be valid JSON: " + str(err.get("ctx", {}).get("error", "invalid"))[:200], "invalid_json")
    if not loc:
        return RequestError(400, "request body must be a JSON object (or an array of them)", "invalid_json")
    field = str(loc[0])
    if err.get("type") == "extra_forbidden":
        p = field[:64]
        return RequestError(400, f"`{p}` is not a feedback field", "unknown_field", p)
    p = spelled(field, sent)
    msg = str(err.get("msg", "is invalid")).removeprefix("Value error, ")
    return RequestError(400, f"`{p}`: {msg[0].lower() + msg[1:] if msg else msg}", "invalid_feedback", p)


class Feedback(NamedTuple):
    """A valid feedback object: its fields as sent (FeedbackFields: snake_case keys, only those
    sent) and its type."""

    req: dict[str, Any]
    type: FeedbackType


def _validated(data: Any, json: bool) -> dict[str, Any]:
    """FeedbackFields of a JSON text or a parsed object; a failure is raised as the model's own
    ValidationError (the messages and locations errors are built from)."""
    if json and _fast is not None:
        try:
            return _fast(data)
        except Exception:  # noqa: BLE001, S110 -- refused (or not understood) by the fast path: pydantic decides below
            pass
    try:
        return _FIELDS.validate_json(data) if json else _FIELDS.validate_python(data)
    except pydantic.ValidationError:
        m = FeedbackRequest.model_validate_json(data) if json else FeedbackRequest.model_validate(data)
        return m.model_dump(exclude_unset=True)  # unreachable unless the two disagree: the model decides


def parse_one(raw: bytes) -> tuple[dict[str, Any], FeedbackType] | None:
    """The usual body, one feedback object that the fast decoder takes and whose type is known and
    complete: (its fields, its type), as parse_feedback would give them. None for anything else:
    parse_feedback decides (and words the error)."""
    if _fast_struct is None or raw[:1] != b"{":
        return None
    try:
        req = _to_builtins(_fast_struct(raw))
    except Exception:  # noqa: BLE001 -- refused by the fast path: parse_feedback decides
        return None
    t = req.get("type")
    if t is not None:
        for f in _NEEDS[t]:
            if req.get(f) is None:
                return None
        return req, t
    t = _type_of(req, None)
    return None if isinstance(t, RequestError) else (req, t)


def parse_feedback(raw: bytes, batch_max: int) -> tuple[list[Feedback], bool] | RequestError:
    """(items, is it an array) from a request body, or the error to answer. Arrays are all or none."""
    start = raw[:1]
    if start != b"{" and start != b"[":
        start = raw.lstrip()[:1]
    if start == b"{":
        try:
            req = _validated(raw, True)
        except pydantic.ValidationError as e:
            return _validation_error(e, _keys(raw))
        t = _type_of(req, None)
        if isinstance(t, RequestError):
            return _respell(t, raw)  # error path only: look at the keys the client sent
        return [Feedback(req, t)], False
    try:
        body = from_json(raw)
    except ValueError as e:
        return RequestError(400, f"request body must be valid JSON: {e}"[:240], "invalid_json")
    if not isinstance(body, list) or not all(isinstance(x, dict) for x in body):
        return RequestError(400, "request body must be a JSON object (or an array of them)", "invalid_json")
    if not 1 <= len(body) <= batch_max:
        return RequestError(400, f"a feedback array must hold 1 to {batch_max} objects, not {len(body)}", "invalid_batch_size")
    out = []
    for i, item in enumerate(body):
        try:
            req = _validated(item, False)
            t = _type_of(req, item)
        except pydantic.ValidationError as e:
            t = _validation_error(e, item)
        if isinstance(t, RequestError):
            return t._replace(message=f"feedback[{i}]: {t.message}", param=f"[{i}]" + (f".{t.param}" if t.param else ""))
        out.append(Feedback(req, t))
    return out, True


def _keys(raw: bytes) -> Any:
    try:
        return from_json(raw)
    except ValueError:
        return None


def _respell(err: RequestError, raw: bytes) -> RequestError:
    """Re-spell a type error's `param` against the keys the client actually sent (error path only)."""
    if err.param is None or err.param == "type":
        return err
    p = spelled(err.param, _keys(raw))
    return err._replace(message=err.message.replace(f"`{err.param}`", f"`{p}`"), param=p)
