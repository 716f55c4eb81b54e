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
from typing import TYPE_CHECKING

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
from .protocol import Feedback, RequestError, parse_feedback

if TYPE_CHECKING:
    from .api_server import Sidecar

TEXT_FIELDS = ("label", "correction", "comment")
_REPLAYED = {"Idempotent-Replayed": "true"}
_ALIAS = {name: f.alias or name for name, f in FeedbackRecord.model_fields.items()}


class FeedbackHandler:
    def __init__(self, sidecar: Sidecar) -> None:
        self.s = sidecar

    async def create_feedback(self, request: web.Request) -> web.StreamResponse:
        """The route's handler."""
        resp = await self.handle(request)
        self.s.metrics.count("/v1/feedback", resp.status)
        return resp

    async def handle(self, request: web.Request) -> web.StreamResponse:
        s = self.s
        if not s.token.check(request.headers.get("Authorization")):
            return json_error(401, "a valid bearer token is required (`Authorization: Bearer <token>`)", "invalid_api_key",
                              headers={"WWW-Authenticate": 'Bearer realm="perennial-feedback"'})
        ok, retry = s.limiter.allow(request.remote or "?")
        if not ok:
            return json_error(429, "too many feedback requests; slow down", "rate_limit_exceeded", headers={"Retry-After": str(max(1, math.ceil(retry)))})
        ctype = request.content_type
        if ctype != "application/json" and "Content-Type" in request.headers:  # no Content-Type at all: taken as JSON
            return json_error(415, f"`Content-Type` must be `application/json`, not `{ctype[:100]}`", "unsupported_media_type")
        cfg = s.cfg
        try:
            raw = await read_body(request, cfg.max_body_bytes, cfg.client_body_timeout_s)
        except BodyTooLarge as e:
            return body_error(e, cfg.max_body_bytes, cfg.client_body_timeout_s)
        except BodyTimeout as e:
            return await send_and_close(request, body_error(e, cfg.max_body_bytes, cfg.client_body_timeout_s))
        parsed = parse_feedback(raw, cfg.feedback_batch_max)
        if isinstance(parsed, RequestError):
            return json_error(parsed.status, parsed.message, parsed.code, param=parsed.param)
        items, batch = parsed
        try:
            out, replayed = await self.store(items)
        except pydantic.ValidationError as e:  # a redacted text grew past its bound
            err = e.errors(include_url=False)[0]
            return json_error(400, f"invalid feedback: {err.get('msg')}"[:300], "invalid_feedback")
        except (OSError, RuntimeError) as e:
            return json_error(503, f"feedback could not be stored: {e}"[:300], "storage_unavailable")
        resp = web.Response(body=to_json({"object": "list", "data": out} if batch else out[0]), content_type="application/json",
                            headers=_REPLAYED if replayed else None)
        return resp

    async def store(self, items: list[Feedback]) -> tuple[list[dict], bool]:
        """Store the items not stored before, durably; (answers in order, every item a replay)."""
        s = self.s
        ids = s.feedback_ids
        if len(items) == 1:
            return await self.store_one(items[0])
        fids = [it.req.id or "fb-" + random_hex() for it in items]
        # another request is storing one of these ids right now: wait for its outcome first
        while waits := [ids.inflight[f] for f in set(fids) if f in ids.inflight]:
            await asyncio.gather(*waits, return_exceptions=True)
        new: dict[str, int] = {}
        for i, f in enumerate(fids):
            if f not in ids and f not in new:
                new[f] = i
        seen = s.seen_responses
        answers = [{"id": f, "object": "feedback", "response_id": it.req.response_id, "type": it.type, "status": "recorded",
                    "response_seen": it.req.response_id in seen} for f, it in zip(fids, items)]
        if not new:
            return answers, True
        lines = [self.record(fids[i], items[i], answers[i]["response_seen"]) for i in new.values()]
        loop = asyncio.get_running_loop()
        futs = {f: loop.create_future() for f in new}
        ids.inflight.update(futs)
        try:
            for line in lines:  # no await in between: one write and one fsync carry the whole request
                s.spool.append_nowait(line)
            await s.spool.sync()
            for f in new:
                ids.add(f)
        finally:
            for f, fut in futs.items():
                ids.inflight.pop(f, None)
                fut.set_result(None)
        m = s.metrics
        for i in new.values():
            m.feedback_of(items[i].type).inc()
        m.captured_feedback.inc(len(new))
        return answers, False

    async def store_one(self, it: Feedback) -> tuple[list[dict], bool]:
        """store() of one item (the common request), with less bookkeeping."""
        s = self.s
        ids = s.feedback_ids
        inflight = ids.inflight
        req = it.req
        f = req.id or "fb-" + random_hex()
        while (other := inflight.get(f)) is not None:
            await other  # the same id is being stored by another request: its outcome first
        seen = req.response_id in s.seen_responses
        answer = {"id": f, "object": "feedback", "response_id": req.response_id, "type": it.type, "status": "recorded", "response_seen": seen}
        if f in ids:
            return [answer], True
        line = self.record(f, it, seen)
        fut = asyncio.get_running_loop().create_future()
        inflight[f] = fut
        try:
            s.spool.append_nowait(line)
            await s.spool.sync()
            ids.add(f)
        finally:
            del inflight[f]
            fut.set_result(None)
        s.metrics.feedback_of(it.type).inc()
        s.metrics.captured_feedback.inc()
        return [answer], False

    def record(self, fid: str, it: Feedback, seen: bool) -> bytes:
        """The record's JSON line. The request model has already checked every field against the
        record schema's bounds, so the line is built directly (the record model's own aliases, one
        pydantic-core encode): validating a second model per record would double the parse cost.
        A text that redaction changed is re-validated through `FeedbackRecord` (it may have grown)."""
        s = self.s
        req = it.req
        rec: dict = {"schemaVersion": RECORD_SCHEMA_VERSION, "time": _dt.datetime.now(_dt.UTC).isoformat(),
                     "kind": "feedback", "id": fid, "type": it.type}
        red = s.redactor
        changed = False
        for name, v in req:
            if v is None or name in ("id", "type"):
                continue
            if name in TEXT_FIELDS:
                r = red.text(v)
                changed = changed or r is not v
                v = r
            rec[_ALIAS[name]] = v
        rec["deployment"] = s.cfg.deployment
        rec["namespace"] = s.cfg.namespace
        rec["responseSeen"] = seen
        if changed:
            return FeedbackRecord.model_validate(rec).to_json().encode()
        return to_json(rec)
