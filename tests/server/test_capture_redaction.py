"""PII anywhere in a captured request (not only in `messages`) never reaches the spool or the store.

Requests go through the real sidecar to a fake engine; the records are read back from the
store the sidecar shipped them to (stopping the sidecar flushes, closes and ships its spool)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from aiohttp import web

from srvutil import AppThread, read_store

EMAIL = "jane.doe@example.com"
PHONE = "+1 415 555 0134"
CARD = "4111 1111 1111 1111"
IPV4 = "10.0.12.7"
IBAN = "GB82 WEST 1234 5698 7654 32"
# what must not be left anywhere in what the sidecar wrote (phone and card by a distinctive piece)
NEEDLES = (EMAIL, "555 0134", "4111 1111", IPV4, "WEST 1234")


@pytest.fixture
def echo_upstream():
    """An OpenAI-like engine for both captured endpoints, JSON or SSE, whose answers hold no PII."""

    async def completion(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        chat = request.path.endswith("/chat/completions")
        rid = ("chatcmpl-" if chat else "cmpl-") + body["metadata"]["case"]
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for piece in ("all ", "done"):
                choice = {"index": 0, "finish_reason": None, **({"delta": {"content": piece}} if chat else {"text": piece})}
                await resp.write(b"data: " + json.dumps({"id": rid, "model": body.get("model"), "choices": [choice]}).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        choice = {"index": 0, "finish_reason": "stop", **({"message": {"role": "assistant", "content": "all done"}} if chat else {"text": "all done"})}
        return web.json_response({"id": rid, "object": "chat.completion" if chat else "text_completion", "model": body.get("model"), "choices": [choice]})

    def make() -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", completion)
        app.router.add_post("/v1/completions", completion)
        return app

    t = AppThread(make).start()
    yield t
    t.stop()


def _pii_params(case: str) -> dict:
    """Request fields other than `messages`/`prompt`, each carrying PII (in values and in a key)."""
    return {
        "user": EMAIL,
        "metadata": {"case": case, "customer": f"{EMAIL}, {PHONE}", "client_ip": IPV4, EMAIL: "vip"},
        "stop": [f"Regards, {EMAIL}"],
        "logit_bias": {"1234": 5},
        "tools": [{"type": "function", "function": {
            "name": "refund", "description": f"Refund to IBAN {IBAN} or card {CARD}",
            "parameters": {"type": "object", "properties": {"email": {"type": "string", "default": EMAIL}}}}}],
    }


def _chat(case: str, stream: bool) -> dict:
    return {
        "model": "tiny-base", "stream": stream, **_pii_params(case),
        "messages": [
            {"role": "user", "name": EMAIL, "content": "Please refund my last order."},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "refund", "arguments": json.dumps({"email": EMAIL, "card": CARD})}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": f"refunded; call {PHONE}"}]},
        ],
    }


def _completion(case: str, stream: bool, prompt: str | list[str]) -> dict:
    return {"model": "tiny-base", "stream": stream, "prompt": prompt, "suffix": f" -- sent from {IPV4}", **_pii_params(case)}


def test_pii_in_any_request_field_is_redacted_before_it_is_written(echo_upstream, sidecar_factory) -> None:
    t, _, cfg = sidecar_factory(echo_upstream.url, segment_max_age_s=3600)
    requests_sent = {
        "chat-json": ("/v1/chat/completions", _chat("chat-json", False)),
        "chat-sse": ("/v1/chat/completions", _chat("chat-sse", True)),
        "completion-json": ("/v1/completions", _completion("completion-json", False, f"Customer {EMAIL} ({PHONE}) asks:")),
        "completion-sse": ("/v1/completions", _completion("completion-sse", True, [f"Card {CARD} declined", "why?"])),
    }
    for case, (path, body) in requests_sent.items():
        r = requests.post(t.url + path, json=body, timeout=30)
        assert r.status_code == 200, r.text
        r.content  # the whole answer (the SSE stream to its end) before the next

    t.stop()  # flushes the capture queue and the spool, closes the segment and ships it
    store = Path(cfg.store_uri)
    written = b"".join(p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file())
    written += b"".join(p.read_bytes() for p in sorted(Path(cfg.spool_dir).rglob("*")) if p.is_file())
    leaked = [n for n in NEEDLES if n.encode() in written or json.dumps(n)[1:-1].encode() in written]
    assert not leaked, f"PII written to disk: {leaked}"

    recs = {r["id"]: r for r in read_store(store) if r["kind"] == "interaction"}
    assert set(recs) == {"chatcmpl-chat-json", "chatcmpl-chat-sse", "cmpl-completion-json", "cmpl-completion-sse"}
    for rid, rec in recs.items():
        p = rec["params"]
        # every field is kept, with the PII replaced where it was
        assert p["user"] == "[REDACTED:email]", rid
        assert p["metadata"]["customer"] == "[REDACTED:email], [REDACTED:phone]", rid
        assert p["metadata"]["client_ip"] == "[REDACTED:ipv4]" and p["metadata"]["case"] in rid, rid
        assert p["metadata"]["[REDACTED:email]"] == "vip", rid
        assert p["stop"] == ["Regards, [REDACTED:email]"] and p["logit_bias"] == {"1234": 5}, rid
        fn = p["tools"][0]["function"]
        assert fn["description"] == "Refund to IBAN [REDACTED:iban] or card [REDACTED:card]", rid
        assert fn["parameters"]["properties"]["email"]["default"] == "[REDACTED:email]", rid
        assert rec["response"] == "all done", rid
    for rid in ("chatcmpl-chat-json", "chatcmpl-chat-sse"):
        user, assistant, tool = recs[rid]["messages"]
        assert user["name"] == "[REDACTED:email]" and user["content"] == "Please refund my last order."
        assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"email": "[REDACTED:email]", "card": "[REDACTED:card]"}
        assert tool["content"] == [{"type": "text", "text": "refunded; call [REDACTED:phone]"}]
    assert recs["cmpl-completion-json"]["prompt"] == "Customer [REDACTED:email] ([REDACTED:phone]) asks:"
    assert json.loads(recs["cmpl-completion-sse"]["prompt"]) == ["Card [REDACTED:card] declined", "why?"]
    assert recs["cmpl-completion-json"]["params"]["suffix"] == " -- sent from [REDACTED:ipv4]"
