"""`perennial simulate-users` against a real local HTTP server playing the feedback sidecar (aiohttp): chat
completions answered right or wrong by a switchable "adapter", `POST /v1/feedback` recording ratings behind a
bearer token, injected 500s and 429s. The adapter switch is seen through a Perennial Deployment's
`status.servedAdapters` on the embedded control plane, as against a real cluster."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from perennial.cli import install_crds, main
from perennial.kube import connect
from perennial.local.apiserver import new_token, start_in_thread
from perennial.local.tls import self_signed
from perennial.simusers import (
    Answer,
    Change,
    Settings,
    Simulation,
    adapter_changes,
    demo_questions,
    load_questions,
    question,
    stretches,
    windows,
)
from perennial_trainer.tinymodel import COLOURS, FRUITS
from PIL import Image

TOKEN = "s3cret-feedback-token"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FakeSidecar:
    """The sidecar's client-facing API, in its own thread and loop: chat completions (id + X-Request-Id, `model`
    = the served name) answered by the current adapter (`good`: the right colour, `bad`: a wrong one), and
    POST /v1/feedback checking the bearer token and recording what it stores."""

    def __init__(self, *, fail_every: int = 0, throttle_every: int = 0, feedback_429_first: int = 0,
                 switch_after: int | None = None, on_switch: Any = None, pause_after_switch: float = 0.0) -> None:
        self.adapter = "bad"
        self.fail_every, self.throttle_every = fail_every, throttle_every
        self.feedback_429_left = feedback_429_first
        self.switch_after, self.on_switch, self.pause_after_switch = switch_after, on_switch, pause_after_switch
        self.chat_requests = 0
        self.served: dict[str, dict[str, Any]] = {}  # response id -> {right, answer, correct answer, adapter}
        self.injected: dict[str, int] = {"500": 0, "429": 0}
        self.feedback_posts: list[dict[str, Any]] = []  # every POST: status and body
        self.stored: dict[str, dict[str, Any]] = {}  # feedback id -> record (idempotent, as the sidecar)
        self.switched = asyncio.Event()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/feedback", self.feedback)
        self.runner = web.AppRunner(app)
        self._loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.chat_requests += 1
        n = self.chat_requests
        if self.switch_after is not None and n == self.switch_after + 1 and not self.switched.is_set():
            if self.on_switch is not None:
                await asyncio.to_thread(self.on_switch)  # the Deployment's status names the new adapter first
            self.adapter = "good"
            self.switched.set()
            await asyncio.sleep(self.pause_after_switch)  # a moment for the users' poll to see it
        if self.fail_every and n % self.fail_every == 0:
            self.injected["500"] += 1
            return web.json_response({"error": {"message": "engine died", "type": "server_error", "code": None, "param": None}}, status=500)
        if self.throttle_every and n % self.throttle_every == 0:
            self.injected["429"] += 1
            return web.json_response({"error": {"message": "slow down", "type": "rate_limit_exceeded", "code": None, "param": None}},
                                     status=429, headers={"Retry-After": "0"})
        text = body["messages"][-1]["content"]
        fruit = next(f for f in sorted(FRUITS, key=len, reverse=True) if re.search(rf"\b{f}\b", text))
        right = FRUITS[fruit]
        said = right if self.adapter == "good" else next(c for c in COLOURS if c != right)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        self.served[rid] = {"right": said == right, "correct": right, "adapter": self.adapter}
        return web.json_response({
            "id": rid, "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"<answer>{said}</answer>"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
        }, headers={"X-Request-Id": rid})

    async def feedback(self, request: web.Request) -> web.Response:
        body = await request.json()
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.feedback_posts.append({"status": 401, "body": body})
            return web.json_response({"error": {"message": "bad token", "type": "invalid_request_error", "code": "unauthorized", "param": None}},
                                     status=401)
        if self.feedback_429_left > 0:
            self.feedback_429_left -= 1
            self.feedback_posts.append({"status": 429, "body": body})
            return web.json_response({"error": {"message": "slow down", "type": "rate_limit_exceeded", "code": None, "param": None}},
                                     status=429, headers={"Retry-After": "0"})
        self.feedback_posts.append({"status": 200, "body": body})
        for item in body:
            self.stored.setdefault(item["id"], item)
        return web.json_response([{"id": i["id"], "object": "feedback", "response_id": i["response_id"], "status": "recorded",
                                   "response_seen": True} for i in body])


@pytest.fixture
def sidecar_factory():
    made: list[FakeSidecar] = []

    def make(**kwargs: Any) -> FakeSidecar:
        s = FakeSidecar(**kwargs)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def ratings_by_response(stored: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for item in stored.values():
        out.setdefault(item["response_id"], []).append(item)
    return out


def assert_ratings_follow_the_rule(sidecar: FakeSidecar) -> int:
    """Every stored rating is a thumbs-up of a right answer, or a thumbs-down plus the right answer as the
    correction of a wrong one; returns how many answers were rated."""
    by_rid = ratings_by_response(sidecar.stored)
    for rid, items in by_rid.items():
        served = sidecar.served[rid]
        kinds = sorted(next(k for k in ("thumbs", "correction") if k in i) for i in items)
        if served["right"]:
            assert kinds == ["thumbs"] and items[0]["thumbs"] == "up", (rid, items)
        else:
            assert kinds == ["correction", "thumbs"], (rid, items)
            by_kind = {k: i for i in items for k in ("thumbs", "correction") if k in i}
            assert by_kind["thumbs"]["thumbs"] == "down"
            assert by_kind["correction"]["correction"] == f"<answer>{served['correct']}</answer>"
    return len(by_rid)


def test_cli_against_a_deployment_rates_by_the_rule_counts_errors_and_charts_the_adapter_switch(sidecar_factory, tmp_path: Path) -> None:
    server = start_in_thread(token=new_token(), tls=self_signed())
    try:
        kube = connect(server=server.url, token=server.token, ca_file=server.ca_file)
        install_crds(kube)
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")

        def serve(adapter: str, ago: float = 0.0) -> None:
            kube.patch_status("perennial.ai/v1alpha1", "Deployment", "default", "fruit-chat",
                              {"endpoint": sidecar.url, "servedAdapters": [{"name": "fruit", "adapter": adapter}]})
            now = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
            for reason in ("AdapterServed", "ScaledDown"):  # the operator's Events: one marked, one not
                kube.create({"apiVersion": "v1", "kind": "Event", "metadata": {"name": f"fruit-chat.{uuid.uuid4().hex[:10]}", "namespace": "default"},
                             "involvedObject": {"apiVersion": "perennial.ai/v1alpha1", "kind": "Deployment", "name": "fruit-chat", "namespace": "default"},
                             "reason": reason, "message": f"now {adapter}", "type": "Normal", "firstTimestamp": now, "lastTimestamp": now,
                             "source": {"component": "perennial-operator"}})

        sidecar = sidecar_factory(fail_every=7, throttle_every=11, feedback_429_first=2, switch_after=60,
                                  on_switch=lambda: serve("fruit-v2"), pause_after_switch=1.0)
        kube.create({"apiVersion": "perennial.ai/v1alpha1", "kind": "Deployment", "metadata": {"name": "fruit-chat", "namespace": "default"},
                     "spec": {"baseModelRef": {"name": "tiny"}, "adapters": [{"name": "fruit", "track": {"family": "fruit"}}],
                              "feedback": {"enabled": True, "storeUri": "pvc://feedback/fruit-chat"}}})
        kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fruit-chat-feedback-token", "namespace": "default"},
                     "stringData": {"token": TOKEN}})
        serve("fruit-v1", ago=60)  # its Events stamped a minute before the run: not marked

        out = tmp_path / "run" / "users"
        rc = main(["simulate-users", "--deployment", "fruit-chat", "--kubeconfig", str(kubeconfig), "--model", "fruit",
                   "--users", "4", "--requests", "160", "--duration", "300", "--think", "0.02", "--window", "0.5",
                   "--poll", "0.05", "--seed", "1", "--out", str(out)])
    finally:
        server.stop()
    assert rc == 0
    assert sidecar.chat_requests == 160

    doc = json.loads(out.with_name("users.json").read_text())
    totals = doc["totals"]
    # every injected failure is counted (the client does not retry completions), none ended the run
    assert totals["errors"] == {k: v for k, v in sidecar.injected.items() if v}
    assert sidecar.injected["500"] > 0 and sidecar.injected["429"] > 0
    assert totals["answered"] == 160 - sum(sidecar.injected.values())
    # the rule, checked against what the server really answered; every answer rated (rate 1), stored once
    rated = assert_ratings_follow_the_rule(sidecar)
    assert rated == totals["answered"] == totals["feedbackSent"]
    assert totals["thumbsUp"] == sum(1 for rid in ratings_by_response(sidecar.stored) if sidecar.served[rid]["right"])
    # the two throttled ratings were retried with the same ids: counted, stored once
    assert [p["status"] for p in sidecar.feedback_posts[:2]] == [429, 429]
    assert totals["rateLimited"] == sidecar.injected["429"] + 2 and not totals["feedbackErrors"]

    # the adapter switch: seen through the Deployment's status, marked, and approval moves from ~0 to ~1
    assert [c["label"] for c in doc["changes"]] == ["fruit-v1 -> fruit-v2"]
    # the Deployment's Events during the run (the switch's, not the first serve's before it) are marked on the chart,
    # splitting nothing; the ScaledDown ones are not marked
    assert [m["label"] for m in doc["markers"]] == ["AdapterServed"]
    assert doc["markers"][0]["t_s"] <= doc["changes"][0]["t_s"] + 1  # Event times are cut to the second
    before, after = doc["stretches"]
    assert before["adapters"] == ["fruit-v1"] and after["adapters"] == ["fruit-v2"]
    assert before["n"] > 20 and after["n"] > 20
    assert before["approval"] < 0.2 and after["approval"] > 0.8
    (cmp,) = doc["comparisons"]
    assert cmp["verdict"] == "higher" and cmp["before"]["n"] == before["n"] and cmp["after"]["n"] == after["n"]
    rates = [w["approval"] for w in doc["windows"] if w["approval"] is not None]
    assert min(rates) < 0.2 and max(rates) > 0.8

    csv_text = out.with_name("users.csv").read_text()
    assert csv_text.splitlines()[0].startswith("window,start_s,end_s,adapter,requests")
    assert len(csv_text.splitlines()) == len(doc["windows"]) + 1
    png = out.with_name("users.png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.size == (1000, 500)


def test_cli_with_url_and_token_file_wrong_token_and_unreachable_server_never_crash(sidecar_factory, tmp_path: Path,
                                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    sidecar = sidecar_factory()
    bad = tmp_path / "bad-token"
    bad.write_text("not-the-token\n")
    rc = main(["simulate-users", "--url", sidecar.url + "/v1", "--token-file", str(bad), "--users", "2", "--requests", "10",
               "--think", "0", "--retries", "3", "--out", str(tmp_path / "a")])
    assert rc == 0
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["totals"]["feedbackErrors"] == {"401": 10} and doc["totals"]["feedbackSent"] == 0
    assert len(sidecar.feedback_posts) == 10  # a refused token is not retried
    assert not sidecar.stored
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_SIGNATURE

    # nothing listens: every request is a counted connection error, the outputs are still written
    rc = main(["simulate-users", "--url", "http://127.0.0.1:9", "--feedback-rate", "0", "--users", "2", "--requests", "6",
               "--think", "0", "--timeout", "5", "--out", str(tmp_path / "b")])
    assert rc == 0
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["totals"]["errors"] == {"connection": 6} and doc["totals"]["answered"] == 0
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "approval - n=0" in capsys.readouterr().out


def test_cli_refuses_to_rate_without_a_token(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("PERENNIAL_FEEDBACK_TOKEN", raising=False)
    assert main(["simulate-users", "--url", "http://127.0.0.1:9"]) == 2
    assert "feedback token" in capsys.readouterr().err
    assert main(["simulate-users", "--url", "ftp://x", "--feedback-rate", "0"]) == 2
    assert main(["simulate-users", "--url", "http://127.0.0.1:9", "--feedback-rate", "1.5", "--token-file", "/dev/null"]) == 2
    capsys.readouterr()
    assert main(["simulate-users", "--deployment", "fruit-chat", "--kubeconfig", "/nonexistent/kubeconfig"]) == 2
    assert capsys.readouterr().err.startswith("simulate-users: ")


def test_questions_file_checker_rate_and_events(sidecar_factory, tmp_path: Path) -> None:
    sidecar = sidecar_factory()
    sidecar.adapter = "good"
    qs = tmp_path / "q.jsonl"
    qs.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "What colour is a banana?", "answer": "<answer>yellow</answer>", "correction": "<answer>yellow</answer>"},
        {"prompt": [{"role": "user", "content": "What colour is a lime?"}], "answer": "<answer>green</answer>"},
    ]) + "\n")
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps({"time": "2020-01-01T00:00:00Z", "label": "promoted fruit-v9"}) + "\n")
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    rc = main(["simulate-users", "--url", sidecar.url, "--token-file", str(token), "--questions", str(qs),
               "--checker", "exact", "--feedback-rate", "0.5", "--users", "3", "--requests", "60", "--think", "0",
               "--seed", "3", "--events", str(events), "--out", str(tmp_path / "c")])
    assert rc == 0
    doc = json.loads((tmp_path / "c.json").read_text())
    t = doc["totals"]
    assert t["answered"] == 60 and t["thumbsUp"] == t["feedbackSent"] and 0 < t["feedbackSent"] < 60
    assert assert_ratings_follow_the_rule(sidecar) == t["feedbackSent"]
    # an event in the past splits nothing; the run's answers are all after it
    assert [c["label"] for c in doc["changes"]] == ["promoted fruit-v9"]
    assert doc["approval"]["rate"] == 1.0


def test_load_questions_errors_name_the_line(tmp_path: Path) -> None:
    p = tmp_path / "q.jsonl"
    p.write_text('{"prompt": "hi", "answer": "x"}\n{"prompt": "", "answer": "x"}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: `prompt`"):
        load_questions(p)
    p.write_text('{"prompt": "hi", "answer": "("}\n')
    with pytest.raises(ValueError, match="regular expression"):
        load_questions(p, "regex")
    p.write_text('{"prompt": "hi", "answer": "a+"}\n')
    with pytest.raises(ValueError, match="needs a `correction`"):
        load_questions(p, "regex")
    p.write_text("[1]\n")
    with pytest.raises(ValueError, match="JSON object"):
        load_questions(p)


def test_demo_questions_and_the_answer_tag_checker() -> None:
    qs = demo_questions()
    assert len(qs) == len(FRUITS) * 4
    banana = next(q for q in qs if "banana" in q.text)
    assert banana.correction == "<answer>yellow</answer>"
    from perennial.simusers import CHECKERS

    check = CHECKERS["answer-tag"][0]
    assert check(" <answer>yellow</answer>\n", banana)
    assert not check("<answer>red</answer>", banana) and not check("yellow", banana)
    assert CHECKERS["regex"][0]("colour: YELLOW", question("q", r"colour: (?i:yellow)", "regex", "colour: yellow"))


def a(t: float, adapter: str | None, approved: bool | None) -> Answer:
    return Answer(t, 0, adapter, approved, error=None if approved is not None else "500")


def test_windows_changes_and_stretches() -> None:
    answers = [a(0.1, "v1", False), a(0.5, "v1", True), a(1.2, None, None), a(1.4, "v1", False),
               a(2.1, "v2", True), a(2.6, "v2", True), a(3.0, "v2", True)]
    ws = windows(answers, 1.0, 3.0)
    assert [(w.requests, w.answered, w.approved, w.errors, w.adapter_label) for w in ws] == [
        (2, 2, 1, 0, "v1"), (2, 1, 0, 1, "v1"), (3, 3, 3, 0, "v2")]
    ch = adapter_changes(answers)
    assert ch == [Change(2.1, "v1 -> v2", "adapter")]
    parts = stretches(answers, ch, 3.0)
    assert [(s.adapters, s.approval.k, s.approval.n) for s in parts] == [(("v1",), 1, 3), (("v2",), 3, 3)]
    with pytest.raises(ValueError):
        windows(answers, 0, 3.0)
    # the requests in flight at the end (0.3 s past the last full window) join it; half a window or more is its own
    tail = [*answers, a(3.2, "v2", False)]
    assert [(w.start, w.end, w.answered) for w in windows(tail, 1.0, 3.3)][-1] == (2.0, 3.3, 4)
    assert [(w.start, w.end, w.answered) for w in windows(tail, 1.0, 3.6)][-2:] == [(2.0, 3.0, 2), (3.0, 3.6, 2)]


async def test_a_probe_that_fails_is_counted_and_the_run_goes_on(sidecar_factory) -> None:
    sidecar = sidecar_factory()
    calls = 0

    async def probe() -> str | None:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise ConnectionError("API server down")
        return "fruit-v1"

    out = io.StringIO()
    sim = Simulation(Settings(url=sidecar.url, model="fruit", token=TOKEN, users=2, max_requests=20, think=0.01, poll=0.01,
                              window=0.2, duration=120), demo_questions(), adapter_probe=probe, out=out)
    result = await sim.run()
    assert len(result.answers) == 20
    assert result.probe_errors["ConnectionError"] >= 1 and not result.errors
    assert result.to_dict()["totals"]["probeErrors"]["ConnectionError"] >= 1
    assert "approval" in out.getvalue()


def test_background_users_run_beside_the_caller_and_stop_on_demand(sidecar_factory) -> None:
    from perennial.simusers import BackgroundUsers
    from waiting import wait_for

    sidecar = sidecar_factory()
    users = BackgroundUsers(Settings(url=sidecar.url, model="fruit", token=TOKEN, users=2, think=0.01, window=60, duration=600),
                            demo_questions(), out=None).start()
    wait_for(lambda: users.approval_since().n >= 10, timeout=60, message="answers of the bad adapter")
    assert users.approval_since().k == 0
    sidecar.adapter = "good"
    wait_for(lambda: sum(v["adapter"] == "good" for v in sidecar.served.values()) >= 10, timeout=60,
             message="answers of the good adapter")
    result = users.stop()
    served = sidecar.served
    assert all(a.approved == (served[a.response_id]["adapter"] == "good") for a in result.answers)
    assert users.approval_since() == result.approval and 0 < result.approval.k < result.approval.n
    assert len(result.answers) >= 20 and result.duration < 600
    assert assert_ratings_follow_the_rule(sidecar) == len(result.answers)
