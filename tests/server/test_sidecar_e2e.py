"""The official openai client, through the sidecar, in front of the CPU engine
serving a tiny model with two adapters; then ratings through /v1/feedback."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import requests

from perennial.api.records import FeedbackRecord, InteractionRecord, parse_record

from srvutil import TOKEN

EMAIL = "jane.doe@example.com"
PHONE = "+1 415 555 0134"
PROMPT = f"My e-mail is {EMAIL} and my phone is {PHONE}. What colour is a kiwi?"


def test_openai_client_through_sidecar_then_feedback(engine, sidecar_factory, tmp_path: Path) -> None:
    t, sc, cfg = sidecar_factory(engine.url)
    client = openai.OpenAI(base_url=t.url + "/v1", api_key="unused", max_retries=0)

    assert {m.id for m in client.models.list().data} == {"tiny-base", "fruit-a", "fruit-b"}

    ids: dict[str, dict[str, str]] = {}
    texts: dict[str, str] = {}
    for model in ("fruit-a", "fruit-b"):
        got = ids.setdefault(model, {})
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0, seed=1)
        chat = raw.parse()
        assert chat.id and raw.headers["x-request-id"] == chat.id
        assert chat.usage.completion_tokens > 0 and chat.model == model
        got["chat"] = chat.id
        texts[model] = chat.choices[0].message.content

        chunks = list(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0, seed=1, stream=True))
        assert len({c.id for c in chunks}) == 1, "every SSE chunk carries the same id"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == texts[model], "greedy streaming and non-streaming agree"
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        got["chat_stream"] = chunks[0].id

        comp = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
        assert comp.id and comp.choices[0].finish_reason in ("stop", "length")
        got["completion"] = comp.id

        with client.completions.with_streaming_response.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, stream=True) as resp:
            rid = resp.headers["x-request-id"]
            cchunks = list(resp.parse())
        assert {c.id for c in cchunks} == {rid}
        got["completion_stream"] = rid

    # the two adapters really are different models
    assert texts["fruit-a"] != texts["fruit-b"]

    # ratings of every response
    sent = []
    url = t.url + "/v1/feedback"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    a, b = ids["fruit-a"], ids["fruit-b"]
    bodies = [
        {"response_id": a["chat"], "type": "thumbs", "thumbs": "up"},
        {"response_id": b["chat"], "type": "score", "score": 0.25},
        {"responseId": a["chat_stream"], "type": "label", "label": "helpful"},
        {"response_id": b["chat_stream"], "type": "correction", "correction": f"Green. Write to {EMAIL}."},
        {"response_id": a["completion"], "other_response_id": b["completion"], "chosen": "other", "type": "preference"},
        {"response_id": a["completion_stream"], "thumbs": "down"},  # type inferred
        {"response_id": b["completion_stream"], "score": 1},
    ]
    for body in bodies:
        r = requests.post(url, json=body, headers=auth, timeout=10)
        assert r.status_code == 200, r.text
        sent.append(r.json()["id"])

    assert requests.get(t.url + "/healthz").status_code == 200
    assert requests.get(t.url + "/readyz").status_code == 200
    metrics = requests.get(t.admin_url + "/metrics").text
    assert 'perennial_sidecar_feedback_total{type="thumbs"} 2.0' in metrics
    assert 'route="/v1/chat/completions"' in metrics

    t.stop()  # drains, closes the open segment, ships it
    store = Path(cfg.store_uri)
    files = list(store.rglob("*.jsonl"))
    assert files and all(f.relative_to(store).parts[0] == "demo" for f in files)
    assert not list(Path(cfg.spool_dir).glob("*.jsonl")), "shipped segments are deleted locally"
    raw_bytes = b"".join(f.read_bytes() for f in files)
    assert EMAIL.encode() not in raw_bytes and b"555 0134" not in raw_bytes

    records = [parse_record(line) for f in files for line in f.read_text().splitlines()]
    inter = {r.id: r for r in records if isinstance(r, InteractionRecord)}
    fb = {r.id: r for r in records if isinstance(r, FeedbackRecord)}
    every_id = {i for m in ids.values() for i in m.values()}
    assert every_id <= set(inter)
    assert set(sent) <= set(fb)
    rec = inter[a["chat"]]
    assert rec.adapter == "fruit-a" and rec.deployment == "demo" and rec.revision == "blue" and rec.namespace == "ns"
    assert rec.endpoint == "chat.completions" and rec.stream is False and rec.usage and rec.usage.completion_tokens > 0
    assert rec.response == texts["fruit-a"]
    content = rec.messages[0].content
    assert "[REDACTED:email]" in content and "[REDACTED:phone]" in content and "kiwi" in content
    srec = inter[b["chat_stream"]]
    assert srec.stream is True and srec.response == texts["fruit-b"] and srec.finish_reason in ("stop", "length")
    crec = inter[a["completion"]]
    assert crec.endpoint == "completions" and "[REDACTED:email]" in crec.prompt and crec.params["max_tokens"] == 6
    corr = [r for r in fb.values() if r.type == "correction"][0]
    assert "[REDACTED:email]" in corr.correction
    pref = [r for r in fb.values() if r.type == "preference"][0]
    assert pref.chosen == "other" and pref.other_response_id == b["completion"]


def test_load_and_unload_adapter_through_sidecar(engine, sidecar_factory, tiny_model) -> None:
    t, _, _ = sidecar_factory(engine.url)
    r = requests.post(t.url + "/v1/load_lora_adapter", json={"lora_name": "fruit-c", "lora_path": tiny_model["adapters"]["fruit-a"]})
    assert r.status_code == 200, r.text
    client = openai.OpenAI(base_url=t.url + "/v1", api_key="unused", max_retries=0)
    assert "fruit-c" in {m.id for m in client.models.list().data}
    c = client.chat.completions.create(model="fruit-c", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    a = client.chat.completions.create(model="fruit-a", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert c.choices[0].message.content == a.choices[0].message.content
    assert requests.post(t.url + "/v1/unload_lora_adapter", json={"lora_name": "fruit-c"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="fruit-c", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    r = requests.post(t.url + "/v1/unload_lora_adapter", json={"lora_name": "fruit-c"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
