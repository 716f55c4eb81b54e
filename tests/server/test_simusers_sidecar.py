"""`perennial simulate-users` against the real feedback sidecar (in front of a stub engine that knows half of the
fruit colours): the sidecar accepts every rating it sends, and the feedback store ends up holding, for every
answered request, its interaction and the ratings the rule asks for, joined by response id."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web
from perennial.simusers import Settings, Simulation, demo_questions
from perennial_trainer.tinymodel import COLOURS, FRUITS
from srvutil import TOKEN, fake_engine, read_store
from waiting import wait_for

KNOWN = {"apple", "banana", "lime", "grape", "orange", "lemon"}  # the stub engine answers these right


async def chat(request: web.Request) -> web.Response:
    body = await request.json()
    text = body["messages"][-1]["content"]
    fruit = next(f for f in sorted(FRUITS, key=len, reverse=True) if re.search(rf"\b{f}\b", text))
    said = FRUITS[fruit] if fruit in KNOWN else next(c for c in COLOURS if c != FRUITS[fruit])
    return web.json_response({
        "id": f"chatcmpl-{uuid.uuid4().hex}",  # as vLLM: unique per request "object": "chat.completion", "created": 1, "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"<answer>{said}</answer>"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
    })


async def test_simulated_users_ratings_reach_the_store_through_the_real_sidecar(sidecar_factory, tmp_path: Path) -> None:
    engine = fake_engine(chat)
    try:
        t, _sc, cfg = sidecar_factory(engine.url)
        sim = Simulation(Settings(url=t.url, model="tiny-base", token=TOKEN, users=3, max_requests=40, think=0.0, window=60,
                                  duration=300, seed=7), demo_questions(), out=None)
        result = await sim.run()
    finally:
        engine.stop()
    assert not result.errors and not result.feedback_errors
    answered = [a for a in result.answers if a.approved is not None]
    assert len(answered) == 40 and all(a.feedback for a in answered)
    assert {a.approved for a in answered} == {True, False}  # both kinds of answer were rated

    def stored() -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]] | None:
        records = read_store(Path(cfg.store_uri))
        interactions = {r["id"]: r for r in records if r["kind"] == "interaction"}
        ratings: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            if r["kind"] == "feedback":
                ratings.setdefault(r["responseId"], []).append(r)
        n_ratings = sum(len(v) for v in ratings.values())
        want = sum(1 if a.approved else 2 for a in answered)
        return (interactions, ratings) if len(interactions) >= 40 and n_ratings >= want else None

    interactions, ratings = wait_for(stored, timeout=120, message="the interactions and ratings shipped to the store")
    for a in answered:
        assert a.response_id in interactions
        got = ratings[a.response_id]
        assert all(r["responseSeen"] for r in got)
        q_fruit = next(f for f in sorted(FRUITS, key=len, reverse=True) if f in interactions[a.response_id]["messages"][-1]["content"])
        if a.approved:
            assert [(r["type"], r.get("thumbs")) for r in got] == [("thumbs", "up")]
        else:
            assert sorted(r["type"] for r in got) == ["correction", "thumbs"]
            by_type = {r["type"]: r for r in got}
            assert by_type["thumbs"]["thumbs"] == "down"
            assert by_type["correction"]["correction"] == f"<answer>{FRUITS[q_fruit]}</answer>"
