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
import math
from typing import TYPE_CHECKING

import pydantic
from aiohttp import web

from perennial_records import FeedbackRecord, random_hex

from .errors import json_error
from .middleware import BodyTimeout, BodyTooLarge, body_error, read_body, send_and_close  # ClientGone: answered by the error middleware
from .protocol import Feedback, RequestError, parse_feedback

if TYPE_CHECKING:
    from .api_server import Sidecar

TEXT_FIELDS = ("label", "correction", "comment")
_REPLAYED = {"Idempotent-Replayed": "true"}


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
        headers = _REPLAYED if replayed else None
        return web.json_response({"object": "list", "data": out} if batch else out[0], headers=headers)

    async def store(self, items: list[Feedback]) -> tuple[list[dict], bool]:
        """Store the items not stored before, durably; (answers in order, every item a replay)."""
        s = self.s
        ids = s.feedback_ids
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
            m.feedback.labels(items[i].type).inc()
        m.captured_feedback.inc(len(new))
        return answers, False

    def record(self, fid: str, it: Feedback, seen: bool) -> str:
        """The record's JSON line: redacted texts, validated against the record schema."""
        s = self.s
        req = it.req
        fields = req.model_dump(exclude_none=True, exclude={"id", "type"})
        red = s.redactor
        for t in TEXT_FIELDS:
            v = fields.get(t)
            if v is not None:
                fields[t] = red.text(v)
        return FeedbackRecord(id=fid, type=it.type, response_seen=seen, deployment=s.cfg.deployment, namespace=s.cfg.namespace, **fields).to_json()

