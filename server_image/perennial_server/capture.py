"""Interaction capture: what the proxy kept of a completion (request bytes, the engine's answer)
becomes a redacted `InteractionRecord` in the spool, built off the response path in batches.

Durability of interactions (by design weaker than feedback's): a response is never held back for its
capture. Records wait up to `Capture.batch_wait_s` (20 ms) to be built, then up to the spool's
coalescing window (50 ms) to be written, and are fsync'd at most a second later. kill -9 keeps
the page cache, so it loses only what was still in memory: the interactions answered within about
the last 70 ms (plus any the queue dropped when full, counted in `perennial_sidecar_capture_dropped`);
a power loss loses up to about a second more. tests/server/test_crash.py measures it."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import pydantic
from perennial_records import InteractionRecord
from pydantic_core import from_json

if TYPE_CHECKING:
    from .api_server import Sidecar

log = logging.getLogger("perennial_server.capture")


class SeenResponses:
    """Ids of the responses this process served recently (bounded; oldest forgotten first): feedback
    for one of them is flagged `response_seen`."""

    def __init__(self, max_ids: int = 100000) -> None:
        self.max_ids = max_ids
        # OrderedDict: dropping the oldest is O(1); `del d[next(iter(d))]` on a plain dict rescans the
        # deleted slots at its front on every call (~30 µs per add once it is full)
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()

    def add(self, rid: str) -> None:
        ids = self._ids
        ids[rid] = None
        if len(ids) > self.max_ids:
            ids.popitem(last=False)

    def __contains__(self, rid: str) -> bool:
        return rid in self._ids


def sse_data(line: bytes) -> tuple[bool, Any]:
    """(is it a `data:` line, its JSON value; None when it is not JSON, e.g. `[DONE]`)."""
    if not line.startswith(b"data:"):
        return False, None
    try:
        return True, from_json(line[5:].strip())
    except ValueError:
        return True, None


def _sse_events(raw: bytes) -> list[dict]:
    """The JSON objects of an SSE stream's `data:` lines, in order.

    All payloads are parsed in one call (a JSON array of them); a stream with a line that is
    not exactly one JSON value falls back to line by line, skipping what does not parse."""
    payloads = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            p = line[5:].strip()
            if p and p != b"[DONE]":
                payloads.append(p)
    if not payloads:
        return []
    try:
        events = from_json(b"[" + b",".join(payloads) + b"]")
    except ValueError:
        events = None
    if events is None or len(events) != len(payloads):
        events = []
        for p in payloads:
            try:
                events.append(from_json(p))
            except ValueError:
                pass
    return [e for e in events if isinstance(e, dict)]


def assemble_stream(raw: bytes, endpoint: str) -> dict:
    """Response text, finish reason, usage and model from an SSE stream (choice 0)."""
    parts: list[str] = []
    finish = usage = model = None
    for ev in _sse_events(raw):
        model = ev.get("model") or model
        if isinstance(ev.get("usage"), dict):
            usage = ev["usage"]
        for ch in ev.get("choices") or []:
            if not isinstance(ch, dict) or ch.get("index", 0) != 0:
                continue
            if endpoint == "chat.completions":
                delta = ch.get("delta") or {}
                if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                    parts.append(delta["content"])
            elif isinstance(ch.get("text"), str):
                parts.append(ch["text"])
            if ch.get("finish_reason"):
                finish = ch["finish_reason"]
    return {"response": "".join(parts), "finish_reason": finish, "usage": usage, "model": model}


def assemble_json(body: dict, endpoint: str) -> dict:
    text = ""
    finish = None
    choices = body.get("choices") or []
    if choices and isinstance(choices[0], dict):
        ch = choices[0]
        if endpoint == "chat.completions":
            msg = ch.get("message") or {}
            text = msg.get("content") or "" if isinstance(msg, dict) else ""
        else:
            text = ch.get("text") or ""
        finish = ch.get("finish_reason")
    return {"response": text if isinstance(text, str) else str(text), "finish_reason": finish, "usage": body.get("usage"), "model": body.get("model")}


class Capture:
    """Builds, redacts and spools interaction records off the response path."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.s = sidecar
        self.q: collections.deque[dict] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batch_wait_s = 0.02

    def submit(self, item: dict) -> None:
        if len(self.q) >= self.s.cfg.capture_queue_max:
            self.s.metrics.capture_dropped.labels("queue_full").inc()
            return
        self.q.append(item)
        self._wake.set()

    def build(self, it: dict) -> InteractionRecord:
        """Parse what the response path kept as bytes, redact, validate. ValueError: not capturable."""
        cfg, red = self.s.cfg, self.s.redactor
        req = from_json(it["request"])
        if not isinstance(req, dict):
            raise ValueError("the request body is not a JSON object")
        model = req.get("model") if isinstance(req.get("model"), str) else ""
        params = {k: v for k, v in req.items() if k not in ("messages", "prompt", "model")}
        messages = prompt = None
        if it["endpoint"] == "chat.completions":
            messages = red.value(req.get("messages"))
        else:
            p = req.get("prompt")
            prompt = red.text(p) if isinstance(p, str) else red.text(json.dumps(p))
        out = it["out"] if it.get("out") is not None else assemble_stream(it["raw"], it["endpoint"])
        usage = out.get("usage") if isinstance(out.get("usage"), dict) else None
        return InteractionRecord(
            id=it["id"], deployment=cfg.deployment, namespace=cfg.namespace, revision=cfg.revision, region=cfg.region,
            model=model or "",
            # the adapter that answered: the route's choice when the sidecar routes (`--routes-file`), else the model asked for
            adapter=it.get("adapter", model if model and model != cfg.base_model_name else None),
            endpoint=it["endpoint"], messages=messages, prompt=prompt, params=red.value(params),
            response=red.text(out.get("response") or ""), finish_reason=it.get("finish_reason") or out.get("finish_reason"),
            usage=usage, latency_ms=round(it["latency_s"] * 1000.0, 3), stream=it["stream"],
        )

    def drain_some(self, n: int = 64, budget_s: float = 0.0005) -> None:
        """Build up to `n` records, stopping after `budget_s`: responses wait at most about that long."""
        deadline = time.perf_counter() + budget_s
        for _ in range(min(n, len(self.q))):
            if time.perf_counter() > deadline:
                break
            it = self.q.popleft()
            try:
                line = self.build(it).to_json()
            except (pydantic.ValidationError, ValueError, TypeError) as e:
                log.debug("Dropped uncapturable interaction id=%s error=%s", it.get("id"), e)
                self.s.metrics.capture_dropped.labels("invalid").inc()
                continue
            self.s.spool.append_nowait(line)
            self.s.metrics.captured_interaction.inc()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            # let interactions gather for a moment: one wake-up then builds many (the records are
            # written every 50 ms anyway), instead of a task switch per response
            await asyncio.sleep(self.batch_wait_s)
            self._wake.clear()
            while self.q:
                self.drain_some()
                await asyncio.sleep(0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="capture")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        while self.q:
            self.drain_some(len(self.q), budget_s=math.inf)

