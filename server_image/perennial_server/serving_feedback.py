"""`POST /v1/feedback`: authenticate, rate-limit, parse (protocol.py), de-duplicate by `id`
(idempotency.py), redact, store durably (one group-committed fsync for the whole request), count.

Answered 200 only once every record of the request is fsync'd; a retry of an id already stored is
answered 200 again, with `Idempotent-Replayed: true`, and stores nothing. A `response_id` this
process never served is accepted and flagged (`response_seen: false` in the answer and the record):
with several replicas (or worker processes) behind one Service, feedback usually reaches a
different process than the one that served the response, so rejecting unknown ids would drop
most real feedback; the store's consumers join on `response_id` and drop what matches nothing."""

from __future__ import annotations

import asyncio
import datetime as _dt
import math
import time
from typing import TYPE_CHECKING

import msgspec
import pydantic
from aiohttp import web
from perennial_records import RECORD_SCHEMA_VERSION, FeedbackRecord, random_hex
from pydantic_core import to_json

from .errors import json_error
from .middleware import (  # ClientGone: answered by the error middleware
    BodyTimeout,
    BodyTooLarge,
    body_error,
    read_body,
    send_and_close,
)
from .protocol import (
    FEEDBACK_TYPES,
    Feedback,
    FeedbackRequest,
    RequestError,
    parse_feedback,
    parse_one,
)

if TYPE_CHECKING:
    from .api_server import Sidecar

TEXT_FIELDS = frozenset(("label", "correction", "comment", "user"))  # free text: redacted before it is stored
_REPLAYED = {"Idempotent-Replayed": "true"}
_ALIAS = {name: f.alias or name for name, f in FeedbackRecord.model_fields.items()}
# the request fields a record copies (`id` and `type` are set from the request's outcome)
# request field -> (record key, is it free text to redact); `id` and `type` are set from the request's outcome
_COPIED = {name: (_ALIAS[name], name in TEXT_FIELDS) for name in FeedbackRequest.model_fields if name not in ("id", "type")}
_PLAIN = {name: alias for name, (alias, text) in _COPIED.items() if not text}  # copied as sent
# Content-Type values taken as JSON without parsing the header (anything else goes through aiohttp's parser)
_JSON_TYPES = frozenset(("application/json", "application/json; charset=utf-8", "application/json;charset=utf-8"))


# records and answers encoded by msgspec: a third of pydantic-core's to_json time for these small dicts and strings
# (same JSON values; tests/server/test_feedback_api.py holds the two encoders to the same output values)
encode = msgspec.json.Encoder().encode
_TYPE_PART = {t: b',"type":"' + t.encode() + b'","status":"recorded","response_seen":' for t in FEEDBACK_TYPES}
_SEEN_PART = {True: b"true}", False: b"false}"}


class _Clock:
    """`datetime.now(UTC).isoformat(timespec="microseconds")`, with the date and time of day formatted
    once a second (a third of the cost per record)."""

    def __init__(self) -> None:
        self._sec = -1
        self._prefix = ""

    def now(self) -> str:
        t = time.time()  # a float: microseconds exact to within one (no big-int arithmetic per record)
        sec = int(t)
        if sec != self._sec:
            self._prefix = _dt.datetime.fromtimestamp(sec, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.")
            self._sec = sec
        return f"{self._prefix}{int((t - sec) * 1e6):06d}+00:00"


_clock = _Clock()


class FeedbackHandler:
    """The one-record request (the usual one) runs as a single coroutine, `create_feedback`: no
    nested coroutines, one future (the spool's group commit) per stored record, and its metrics
    counted once per group commit (`durable`, called by the spool after the fsync and before any
    of the group's requests is answered). Arrays, replays and errors take the helpers below."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.s = sidecar
        m = sidecar.metrics
        self._ok = m.requests.labels("/v1/feedback", "200")  # requests{route, code} of a stored one-record request
        self._captured = m.captured_feedback
        self._by_type = {t: m.feedback_of(t) for t in FEEDBACK_TYPES}
        sidecar.spool.on_durable = self.durable

    def durable(self, types: list[str]) -> None:
        """A group commit of one-record requests is durable: count them (one counter update per
        type and group, not per request)."""
        n = len(types)
        if types.count(types[0]) == n:
            self._by_type[types[0]].inc(n)
        else:
            for t in set(types):
                self._by_type[t].inc(types.count(t))
        self._captured.inc(n)
        self._ok.inc(n)

    def _answer(self, resp: web.StreamResponse) -> web.StreamResponse:
        self.s.metrics.count("/v1/feedback", resp.status)
        return resp

    async def create_feedback(self, request: web.Request) -> web.StreamResponse:
        """The route's handler."""
        s = self.s
        headers = request.headers
        if not s.token.check(headers.get("Authorization")):
            return self._answer(json_error(401, "a valid bearer token is required (`Authorization: Bearer <token>`)", "invalid_api_key",
                                           headers={"WWW-Authenticate": 'Bearer realm="perennial-feedback"'}))
        retry = s.limiter.wait(request.remote or "?")
        if retry:
            return self._answer(json_error(429, "too many feedback requests; slow down", "rate_limit_exceeded",
                                           headers={"Retry-After": str(max(1, math.ceil(retry)))}))
        raw_type = headers.get("Content-Type")
        if raw_type is not None and raw_type not in _JSON_TYPES:  # no Content-Type at all: taken as JSON
            ctype = request.content_type
            if ctype != "application/json":
                return self._answer(json_error(415, f"`Content-Type` must be `application/json`, not `{ctype[:100]}`", "unsupported_media_type"))
        cfg = s.cfg
        content = request.content
        cl = request.content_length
        if cl is not None and 0 < cl <= cfg.max_body_bytes and content.is_eof():
            raw = content.read_nowait(-1)  # the usual small body: it arrived with the head
        else:
            try:
                raw = await read_body(request, cfg.max_body_bytes, cfg.client_body_timeout_s)
            except BodyTooLarge as e:
                return self._answer(body_error(e, cfg.max_body_bytes, cfg.client_body_timeout_s))
            except BodyTimeout as e:
                return self._answer(await send_and_close(request, body_error(e, cfg.max_body_bytes, cfg.client_body_timeout_s)))
        one = parse_one(raw)  # the usual body: one object, decided without building the general answer
        if one is None:
            parsed = parse_feedback(raw, cfg.feedback_batch_max)
            if isinstance(parsed, RequestError):
                return self._answer(json_error(parsed.status, parsed.message, parsed.code, param=parsed.param))
            items, batch = parsed
            if batch or len(items) != 1:
                return self._answer(await self.store_many(items, batch))
            req, ftype = items[0]
        else:
            req, ftype = one
        # one record
        f = req.get("id")
        rid = req["response_id"]
        seen = rid in s.seen_responses
        ids = s.feedback_ids
        if f is not None and (f in ids or f in ids.inflight):
            return self._answer(await self.store_again(Feedback(req, ftype), seen))  # a retry
        try:
            if f is None:
                f = "fb-" + random_hex()  # a fresh random id: no other request can hold it, and it is not stored yet
                fj = encode(f)  # the id as JSON: the answer's, and the spool's key for the id journal (idempotency.py)
                await s.spool.durable(self._record(f, req, ftype, seen), ftype, fj)
            else:
                fj = encode(f)
                # the spool's loop is this one (asyncio.get_running_loop() costs a getpid() system call on Python 3.11)
                fut = s.spool.loop.create_future()
                ids.inflight[f] = fut  # a retry arriving meanwhile waits for this outcome (store_again)
                try:
                    await s.spool.durable(self._record(f, req, ftype, seen), ftype, fj)
                finally:
                    del ids.inflight[f]
                    if not fut.done():
                        fut.set_result(None)
        except pydantic.ValidationError as e:  # a redacted text grew past its bound
            return self._answer(self._invalid(e))
        except (OSError, RuntimeError) as e:
            return self._answer(json_error(503, f"feedback could not be stored: {e}"[:300], "storage_unavailable"))
        ids.add(f)  # counted by durable()
        # the answer's JSON from constant pieces: only the client's strings are encoded
        return web.Response(body=b"".join((b'{"id":', fj, b',"object":"feedback","response_id":', encode(rid), _TYPE_PART[ftype],
                                           _SEEN_PART[seen])), content_type="application/json")

    @staticmethod
    def _invalid(e: pydantic.ValidationError) -> web.Response:
        err = e.errors(include_url=False)[0]
        return json_error(400, f"invalid feedback: {err.get('msg')}"[:300], "invalid_feedback")

    async def store_again(self, it: Feedback, seen: bool) -> web.Response:
        """One record whose id is stored or being stored: wait for the other request's outcome;
        a replay if stored, else store it here."""
        try:
            answer, replayed = await self.store_one(it, seen)
        except pydantic.ValidationError as e:
            return self._invalid(e)
        except (OSError, RuntimeError) as e:
            return json_error(503, f"feedback could not be stored: {e}"[:300], "storage_unavailable")
        resp = web.Response(body=to_json(answer), content_type="application/json", headers=_REPLAYED if replayed else None)
        if not replayed:
            self.s.metrics.captured_feedback.inc()
            self.s.metrics.feedback_of(it.type).inc()
        return resp

    async def store_many(self, items: list[Feedback], batch: bool) -> web.Response:
        try:
            out, replayed = await self.store(items)
        except pydantic.ValidationError as e:
            return self._invalid(e)
        except (OSError, RuntimeError) as e:
            return json_error(503, f"feedback could not be stored: {e}"[:300], "storage_unavailable")
        body = to_json({"object": "list", "data": out} if batch else out[0])
        return web.Response(body=body, content_type="application/json", headers=_REPLAYED if replayed else None)

    async def store(self, items: list[Feedback]) -> tuple[list[dict], bool]:
        """Store the items not stored before, durably; (answers in order, every item a replay)."""
        s = self.s
        ids = s.feedback_ids
        if len(items) == 1:
            it = items[0]
            answer, replayed = await self.store_one(it, it.req["response_id"] in s.seen_responses)
            if not replayed:
                s.metrics.feedback_of(it.type).inc()
                s.metrics.captured_feedback.inc()
            return [answer], replayed
        fids = [it.req.get("id") or "fb-" + random_hex() for it in items]
        # another request is storing one of these ids right now: wait for its outcome first
        while waits := [ids.inflight[f] for f in set(fids) if f in ids.inflight]:
            await asyncio.gather(*map(asyncio.shield, waits), return_exceptions=True)  # never cancel another request's marker
        new: dict[str, int] = {}
        for i, f in enumerate(fids):
            if f not in ids and f not in new:
                new[f] = i
        seen = s.seen_responses
        answers = [{"id": f, "object": "feedback", "response_id": it.req["response_id"], "type": it.type, "status": "recorded",
                    "response_seen": it.req["response_id"] in seen} for f, it in zip(fids, items)]
        if not new:
            return answers, True
        lines = [self.record(fids[i], items[i], answers[i]["response_seen"]) for i in new.values()]
        loop = asyncio.get_running_loop()
        futs = {f: loop.create_future() for f in new}
        ids.inflight.update(futs)
        try:
            for line, f in zip(lines, new):  # no await in between: one write and one fsync carry the whole request
                s.spool.append_nowait(line, encode(f))  # the id: the journal's key (idempotency.py)
            await s.spool.sync()
            for f in new:
                ids.add(f)
        finally:
            for f, fut in futs.items():
                ids.inflight.pop(f, None)
                if not fut.done():
                    fut.set_result(None)
        m = s.metrics
        for i in new.values():
            m.feedback_of(items[i].type).inc()
        m.captured_feedback.inc(len(new))
        return answers, False

    async def store_one(self, it: Feedback, seen: bool) -> tuple[dict, bool]:
        """Store one item unless its id is stored (or, once another request's outcome is known,
        turns out stored): (its answer, a replay). Metrics: the caller's."""
        s = self.s
        ids = s.feedback_ids
        req = it.req
        f = req.get("id") or "fb-" + random_hex()
        inflight = ids.inflight
        while (other := inflight.get(f)) is not None:
            await asyncio.shield(other)  # the same id is being stored by another request: its outcome first (never cancel it)
        answer = {"id": f, "object": "feedback", "response_id": req["response_id"], "type": it.type, "status": "recorded", "response_seen": seen}
        if f in ids:
            return answer, True
        line = self.record(f, it, seen)
        fut = asyncio.get_running_loop().create_future()
        inflight[f] = fut
        try:
            await s.spool.durable(line, key=encode(f))  # the id: the journal's key (idempotency.py)
            ids.add(f)
        finally:
            del inflight[f]
            if not fut.done():
                fut.set_result(None)
        return answer, False

    def record(self, fid: str, it: Feedback, seen: bool) -> bytes:
        """The record's JSON line. The request fields have already been checked against the
        record schema's bounds, so the line is built directly (the record model's own aliases, one
        msgspec encode): validating a second model per record would double the parse cost.
        A text that redaction changed is re-validated through `FeedbackRecord` (it may have grown)."""
        return self._record(fid, it.req, it.type, seen)

    def _record(self, fid: str, req: dict, ftype: str, seen: bool) -> bytes:
        rec: dict = {"schemaVersion": RECORD_SCHEMA_VERSION, "time": _clock.now(), "kind": "feedback", "id": fid, "type": ftype}
        changed = False
        for name, v in req.items():  # the fields sent, validated (protocol.FeedbackFields)
            alias = _PLAIN.get(name)
            if alias is not None:
                if v is not None:
                    rec[alias] = v
            elif name in TEXT_FIELDS and v is not None:
                r = self.s.redactor.text(v)
                changed = changed or r is not v
                rec[_ALIAS[name]] = r
        cfg = self.s.cfg
        rec["deployment"] = cfg.deployment
        rec["namespace"] = cfg.namespace
        rec["responseSeen"] = seen
        if changed:
            return FeedbackRecord.model_validate(rec).to_json().encode()
        return encode(rec)
