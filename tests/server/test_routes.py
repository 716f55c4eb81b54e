"""The sidecar owns served name -> adapter routing (`--routes-file`, issue 12): the routes document
as the operator's ConfigMap mounts it (kubelet's atomic `..data` symlink swap), adapters loaded into
the engine through `/v1/load_lora_adapter` (fetched with fsspec when remote), requests rewritten
by served name (weighted canaries), unknown names refused, unloads only after in-flight requests."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import fsspec
import openai
import pytest
import requests
from routesutil import BASE, FakeEngine, KubeletDir, applied, doc, make_adapter_dir, routes_state, wait_until
from srvutil import TOKEN, AppThread, read_store


def chat(t: AppThread, model: str, **kw: Any) -> requests.Response:
    return requests.post(t.url + "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}, timeout=60)


# ---------------------------------------------------------------- routing
def test_requests_are_routed_by_served_name(fake: FakeEngine, routed, tmp_path: Path) -> None:
    a1, a2 = make_adapter_dir(tmp_path, "a1"), make_adapter_dir(tmp_path, "a2")
    t, sc, _ = routed(doc("r1", {"a1": a1, "a2": a2}, {"support": [("a1", 100)], "sales": [("a2", 100)]}))
    st = applied(t, "r1")
    assert st["loaded"] == ["a1", "a2"] and st["errors"] == {}
    assert fake.loaded == {"a1": a1, "a2": a2}

    r = chat(t, "support")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "answer of a1"
    assert r.json()["model"] == "support"  # the name the client asked for, not the adapter
    support_id = r.json()["id"]
    assert chat(t, "sales").json()["choices"][0]["message"]["content"] == "answer of a2"
    assert chat(t, BASE).json()["choices"][0]["message"]["content"] == f"answer of {BASE}"
    assert fake.chats == ["a1", "a2", BASE]

    # streamed: every event says the served name, even when the engine splits one mid-`"model"`
    client = openai.OpenAI(base_url=t.url + "/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(model="sales", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "answer of a2"
    assert {c.model for c in chunks} == {"sales"}

    # the interaction records say both: the served name asked for and the adapter that answered
    def interactions() -> list[dict] | None:
        recs = [x for x in read_store(Path(sc.cfg.store_uri)) if x["kind"] == "interaction"]
        return recs if len(recs) == 4 else None  # support, sales, base, streamed sales

    recs = wait_until(interactions, what="4 interactions")
    by_id = {x["id"]: x for x in recs}
    assert by_id[support_id]["model"] == "support" and by_id[support_id]["adapter"] == "a1"
    assert sorted((x["model"], x.get("adapter"), x["stream"]) for x in recs) == sorted(
        [("support", "a1", False), ("sales", "a2", False), (BASE, None, False), ("sales", "a2", True)])


def test_models_lists_served_names_and_base(fake: FakeEngine, routed, tmp_path: Path) -> None:
    a1 = make_adapter_dir(tmp_path, "a1")
    t, _, _ = routed(doc("r1", {"a1": a1}, {"support": [("a1", 100)], "support-preview": [("a1", 100)]}))
    applied(t, "r1")
    client = openai.OpenAI(base_url=t.url + "/v1", api_key=TOKEN, max_retries=0)  # the operator's token: previews too
    models = client.models.list().data
    assert [m.id for m in models] == [BASE, "support", "support-preview"]  # never the internal adapter names
    assert all(m.object == "model" and m.owned_by for m in models)
    assert client.models.retrieve("support-preview").id == "support-preview"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("a1")


def test_unknown_model_is_404_without_the_engine(fake: FakeEngine, routed, tmp_path: Path) -> None:
    a1 = make_adapter_dir(tmp_path, "a1")
    t, _, _ = routed(doc("r1", {"a1": a1}, {"support": [("a1", 100)]}))
    applied(t, "r1")
    for model in ("nope", "a1", "Support"):  # an adapter's own name is not a served name
        r = chat(t, model)
        assert r.status_code == 404, r.text
        e = r.json()["error"]
        assert e["code"] == "model_not_found" and e["type"] == "not_found_error" and model in e["message"]
    r = requests.post(t.url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert fake.chats == []
    # the routes file owns the adapters: clients cannot load or unload any through the sidecar
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        r = requests.post(t.url + path, json={"lora_name": "x", "lora_path": "/etc"}, timeout=30)
        assert r.status_code == 403, r.text
    assert [c for c in fake.calls if c[1] == "x"] == []


def test_canary_weights_are_respected(fake: FakeEngine, routed, tmp_path: Path) -> None:
    from perennial_server.routes import Route

    # the choice itself: 90/10 over many seeded draws
    r = Route([("old", 90), ("new", 10)])
    rng = random.Random(7)
    n = 20000
    new = sum(r.pick(rng) == "new" for _ in range(n))
    assert 0.08 * n < new < 0.12 * n
    assert all(Route([("a", 0), ("b", 5)]).pick(rng) == "b" for _ in range(200))  # weight 0: never chosen

    # through the sidecar, seeded
    a1, a2 = make_adapter_dir(tmp_path, "a1"), make_adapter_dir(tmp_path, "a2")
    t, sc, _ = routed(doc("r1", {"a1": a1, "a2": a2}, {"svc": [("a1", 75), ("a2", 25)]}))
    applied(t, "r1")
    sc.routes.rng = random.Random(11)
    got = [chat(t, "svc").json()["choices"][0]["message"]["content"] for _ in range(200)]
    n2 = got.count("answer of a2")
    assert got.count("answer of a1") + n2 == 200
    assert 25 <= n2 <= 75  # expectation 50, sd ~6


# ---------------------------------------------------------------- hot reload
def test_hot_reload_by_symlink_swap_keeps_serving(fake: FakeEngine, routed, tmp_path: Path) -> None:
    a1, a2 = make_adapter_dir(tmp_path, "a1"), make_adapter_dir(tmp_path, "a2")
    t, _, kd = routed(doc("r1", {"a1": a1}, {"svc": [("a1", 100)]}))
    applied(t, "r1")
    assert requests.get(t.url + "/readyz", timeout=30).status_code == 200

    fake.hold_loads = threading.Event()  # a2 takes its time loading
    kd.write(doc("r2", {"a2": a2}, {"svc": [("a2", 100)]}))
    wait_until(lambda: ("load", "a2") in fake.calls, what="a2 loading")
    st = routes_state(t)
    assert st["revision"] == "r1" and st["pending"] == "r2"
    # while r2 loads, r1 serves and the pod stays ready
    assert requests.get(t.url + "/readyz", timeout=30).status_code == 200
    assert chat(t, "svc").json()["choices"][0]["message"]["content"] == "answer of a1"
    fake.hold_loads.set()
    st = applied(t, "r2")
    assert st["pending"] is None
    assert chat(t, "svc").json()["choices"][0]["message"]["content"] == "answer of a2"
    wait_until(lambda: ("unload", "a1") in fake.calls, what="a1 unloaded")
    assert fake.loaded == {"a2": a2}
    assert routes_state(t)["loaded"] == ["a2"]


def test_not_ready_until_the_first_routes_are_applied(fake: FakeEngine, routed, tmp_path: Path) -> None:
    a1 = make_adapter_dir(tmp_path, "a1")
    t, _, kd = routed(None)
    r = requests.get(t.url + "/readyz", timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "routes_not_applied"
    st = routes_state(t)
    assert st["revision"] is None and st["errors"]
    assert chat(t, "svc").status_code == 404
    kd.write("{not json")
    wait_until(lambda: "JSON" in routes_state(t)["errors"].get("(document)", "") or "json" in routes_state(t)["errors"].get("(document)", ""), what="parse error")
    assert requests.get(t.url + "/readyz", timeout=30).status_code == 503
    kd.write(doc("r1", {"a1": a1}, {"svc": [("a1", 100)]}))
    applied(t, "r1")
    assert requests.get(t.url + "/readyz", timeout=30).status_code == 200
    assert routes_state(t)["errors"] == {}


def test_load_failure_keeps_the_previous_routes(fake: FakeEngine, routed, tmp_path: Path) -> None:
    a1, a3 = make_adapter_dir(tmp_path, "a1"), make_adapter_dir(tmp_path, "a3")
    t, _, kd = routed(doc("r1", {"a1": a1}, {"svc": [("a1", 100)]}))
    applied(t, "r1")
    fake.fail["a3"] = "LoRA rank 128 is greater than max_lora_rank 64"
    kd.write(doc("r2", {"a3": a3}, {"svc": [("a3", 100)]}))
    st = wait_until(lambda: (s := routes_state(t))["errors"].get("a3") and s, what="a3 error")
    assert "max_lora_rank" in st["errors"]["a3"]
    assert st["revision"] == "r1" and st["pending"] == "r2" and st["loaded"] == ["a1"]
    assert chat(t, "svc").json()["choices"][0]["message"]["content"] == "answer of a1"
    assert requests.get(t.url + "/readyz", timeout=30).status_code == 200
    assert ("unload", "a1") not in fake.calls  # the old routes still need it
    # a document whose route names an adapter missing from `adapters` is refused as a whole
    kd.write({"revision": "r3", "base": {"name": BASE}, "adapters": {"a1": {"uri": a1}}, "routes": {"svc": [{"adapter": "ghost", "weight": 1}]}})
    st = wait_until(lambda: (s := routes_state(t))["errors"].get("(document)") and s, what="document error")
    assert "ghost" in st["errors"]["(document)"] and st["revision"] == "r1"
    # the failure is retried: once the engine accepts a3, r4 applies
    fake.fail.clear()
    kd.write(doc("r4", {"a3": a3}, {"svc": [("a3", 100)]}))
    st = applied(t, "r4")
    assert st["errors"] == {} and chat(t, "svc").json()["choices"][0]["message"]["content"] == "answer of a3"


def test_unload_waits_for_in_flight_requests(fake: FakeEngine, routed, tmp_path: Path) -> None:
    a1, a2 = make_adapter_dir(tmp_path, "a1"), make_adapter_dir(tmp_path, "a2")
    t, _, kd = routed(doc("r1", {"a1": a1}, {"svc": [("a1", 100)]}))
    applied(t, "r1")
    result: dict = {}
    th = threading.Thread(target=lambda: result.update(r=chat(t, "svc", hold=True)))
    th.start()
    assert fake.chat_started.wait(60)
    kd.write(doc("r2", {"a2": a2}, {"svc": [("a2", 100)]}))
    wait_until(lambda: (s := routes_state(t))["revision"] == "r2" and s["draining"] == ["a1"], what="a1 draining")
    assert ("unload", "a1") not in fake.calls and "a1" in fake.loaded
    assert chat(t, "svc").json()["choices"][0]["message"]["content"] == "answer of a2"  # new requests: the new adapter
    fake.release_chat()
    th.join(60)
    assert result["r"].json()["choices"][0]["message"]["content"] == "answer of a1"
    wait_until(lambda: ("unload", "a1") in fake.calls, what="a1 unloaded")
    wait_until(lambda: routes_state(t)["draining"] == [], what="nothing draining")
    assert fake.loaded == {"a2": a2}


# ---------------------------------------------------------------- adapters from storage
def test_adapter_names_cannot_escape_the_adapters_dir(fake: FakeEngine, routed, tmp_path: Path) -> None:
    from perennial_server.routes import fetch_adapter

    mem = fsspec.filesystem("memory")
    mem.pipe("/evil/adapter_config.json", b"{}")
    a1 = make_adapter_dir(tmp_path, "a1")
    t, _, kd = routed(doc("r1", {"a1": a1}, {"svc": [("a1", 100)]}))
    applied(t, "r1")
    for bad in ("../escaped", "..", "a/b", "/abs", ".hidden", "A1"):
        kd.write(doc(f"bad-{bad}", {bad: "memory://evil"}, {"svc": [(bad, 100)]}))
        st = wait_until(lambda b=bad: (s := routes_state(t))["pending"] == f"bad-{b}" and s["errors"].get("(document)") and s, what=bad)
        assert "must" in st["errors"]["(document)"] and st["revision"] == "r1"
        with pytest.raises(ValueError):
            fetch_adapter(bad, "memory://evil", tmp_path / "adapters", max_bytes=1 << 20)
    assert not (tmp_path / "escaped").exists() and [c for c in fake.calls if c[0] == "load"] == [("load", "a1")]
    # a remote listing whose files climb out of the adapter's folder is refused too
    with pytest.raises(ValueError, match="outside"):
        from perennial_server.routes import _relative

        _relative("/bucket/a", "/bucket/a/../../etc/passwd")


@pytest.mark.parametrize("scheme", ["memory"])  # file:// is refused (test_routes_attacks.py): the operator writes paths
def test_remote_adapters_are_fetched_with_fsspec(fake: FakeEngine, routed, tmp_path: Path, scheme: str) -> None:
    files = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": os.urandom(1000), "sub/tokenizer.json": b"{}"}
    if scheme == "memory":
        mem = fsspec.filesystem("memory")
        for k, v in files.items():
            mem.pipe(f"/store-{tmp_path.name}/tone-v2/{k}", v)
        uri = f"memory://store-{tmp_path.name}/tone-v2"
    else:
        src = tmp_path / "bucket" / "tone-v2"
        for k, v in files.items():
            (src / k).parent.mkdir(parents=True, exist_ok=True)
            (src / k).write_bytes(v)
        uri = src.as_uri()
    t, _, kd = routed(doc("r1", {"tone-v2": uri}, {"tone": [("tone-v2", 100)]}))
    applied(t, "r1")
    dest = tmp_path / "adapters" / "tone-v2"
    assert fake.loaded == {"tone-v2": str(dest)}
    for k, v in files.items():
        assert (dest / k).read_bytes() == v
    assert [p.name for p in (tmp_path / "adapters").iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    assert chat(t, "tone").json()["choices"][0]["message"]["content"] == "answer of tone-v2"
    # dropped from the routes: unloaded and its files removed
    a1 = make_adapter_dir(tmp_path, "a1")
    kd.write(doc("r2", {"a1": a1}, {"tone": [("a1", 100)]}))
    applied(t, "r2")
    wait_until(lambda: ("unload", "tone-v2") in fake.calls, what="unload")
    wait_until(lambda: not dest.exists(), what="files removed")


def test_adapter_size_is_bounded(fake: FakeEngine, routed, tmp_path: Path) -> None:
    mem = fsspec.filesystem("memory")
    mem.pipe(f"/big-{tmp_path.name}/adapter_config.json", b"{}")
    mem.pipe(f"/big-{tmp_path.name}/adapter_model.safetensors", b"x" * 5000)
    t, _, _ = routed(doc("r1", {"big": f"memory://big-{tmp_path.name}"}, {"svc": [("big", 100)]}), adapter_max_bytes=4096)
    st = wait_until(lambda: (s := routes_state(t))["errors"].get("big") and s, what="size error")
    assert "4096" in st["errors"]["big"] and st["revision"] is None
    assert not (tmp_path / "adapters" / "big").exists() and fake.calls == []


# ---------------------------------------------------------------- the real CPU engine
def test_routes_with_the_cpu_engine(engine, sidecar_factory, tiny_model, tmp_path: Path) -> None:
    """The session's CPU engine already serves fruit-a and fruit-b: they stay listed (and loaded);
    fruit-copy (fruit-a's files fetched with fsspec from a store) is loaded for real, routed, then unloaded."""
    ad = tiny_model["adapters"]
    mem = fsspec.filesystem("memory")
    for f in Path(ad["fruit-a"]).rglob("*"):
        if f.is_file():
            mem.pipe(f"/fruit-{tmp_path.name}/{f.relative_to(ad['fruit-a'])}", f.read_bytes())
    kd = KubeletDir(tmp_path / "cm")
    kd.write({"revision": "r1", "base": {"name": BASE},
              "adapters": {"fruit-a": {"uri": ad["fruit-a"]}, "fruit-b": {"uri": ad["fruit-b"]}, "fruit-copy": {"uri": f"memory://fruit-{tmp_path.name}"}},
              "routes": {"fruit": [{"adapter": "fruit-copy", "weight": 100}], "other": [{"adapter": "fruit-b", "weight": 100}]}})
    t, _, _ = sidecar_factory(engine.url, routes_file=str(kd.path), adapters_dir=str(tmp_path / "adapters"),
                              adapter_roots=str(Path(ad["fruit-a"]).parent))
    applied(t, "r1")
    client = openai.OpenAI(base_url=t.url + "/v1", api_key="unused", max_retries=0)

    def ask(model: str) -> str:
        c = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "which colour is a kiwi?"}], max_tokens=6, temperature=0)
        assert c.model == model
        return c.choices[0].message.content or ""

    direct = openai.OpenAI(base_url=engine.url + "/v1", api_key="unused", max_retries=0)
    want_a = direct.chat.completions.create(model="fruit-a", messages=[{"role": "user", "content": "which colour is a kiwi?"}], max_tokens=6, temperature=0).choices[0].message.content
    want_b = direct.chat.completions.create(model="fruit-b", messages=[{"role": "user", "content": "which colour is a kiwi?"}], max_tokens=6, temperature=0).choices[0].message.content
    assert want_a != want_b
    assert "fruit-copy" in {m.id for m in direct.models.list().data}
    assert ask("fruit") == want_a and ask("other") == want_b
    kd.write({"revision": "r2", "base": {"name": BASE}, "adapters": {"fruit-a": {"uri": ad["fruit-a"]}, "fruit-b": {"uri": ad["fruit-b"]}},
              "routes": {"fruit": [{"adapter": "fruit-b", "weight": 100}]}})
    applied(t, "r2")
    assert ask("fruit") == want_b
    wait_until(lambda: "fruit-copy" not in {m.id for m in direct.models.list().data}, what="fruit-copy unloaded")
    assert {"fruit-a", "fruit-b"} <= {m.id for m in direct.models.list().data}


# ---------------------------------------------------------------- engine restarts, workers
def test_adapters_lost_by_an_engine_restart_are_reloaded(fake: FakeEngine, routed, tmp_path: Path) -> None:
    a1 = make_adapter_dir(tmp_path, "a1")
    t, sc, _ = routed(doc("r1", {"a1": a1}, {"svc": [("a1", 100)]}))
    applied(t, "r1")
    sc.routes.resync_s = 3600.0  # only the engine's 404 for a routed adapter makes it look again
    sc.routes._resync_at = time.monotonic() + 3600.0
    fake.loaded.clear()  # the engine container restarted
    assert chat(t, "svc").status_code == 404
    wait_until(lambda: "a1" in fake.loaded, what="a1 reloaded")
    assert chat(t, "svc").json()["choices"][0]["message"]["content"] == "answer of a1"
    assert [c for c in fake.calls if c == ("load", "a1")] == [("load", "a1")] * 2


def test_workers_unload_only_when_every_worker_is_done(fake: FakeEngine, sidecar_factory, tmp_path: Path) -> None:
    """Two worker processes of one sidecar (here: two Sidecars with worker indexes 0 and 1 on one spool
    root): worker 0 loads and unloads; worker 1 follows the engine; an adapter a request on worker 1
    still uses is not unloaded."""
    a1, a2 = make_adapter_dir(tmp_path, "a1"), make_adapter_dir(tmp_path, "a2")
    kd = KubeletDir(tmp_path / "cm")
    kd.write(doc("r1", {"a1": a1}, {"svc": [("a1", 100)]}))
    common = {"routes_file": str(kd.path), "adapters_dir": str(tmp_path / "adapters"), "workers": 2, "spool_dir": str(tmp_path / "spool"),
              "adapter_roots": str(tmp_path / "artifacts")}
    w0, _, _ = sidecar_factory(fake.url, worker_index=0, **common)
    w1, _, _ = sidecar_factory(fake.url, worker_index=1, **common)
    applied(w0, "r1")
    applied(w1, "r1")
    assert [c for c in fake.calls if c[0] == "load"] == [("load", "a1")]  # worker 1 never loads

    result: dict = {}
    th = threading.Thread(target=lambda: result.update(r=chat(w1, "svc", hold=True)))
    th.start()
    assert fake.chat_started.wait(60)
    kd.write(doc("r2", {"a2": a2}, {"svc": [("a2", 100)]}))
    applied(w1, "r2")
    wait_until(lambda: routes_state(w0)["draining"] == ["a1"], what="a1 draining on worker 0")
    assert "a1" in fake.loaded and ("unload", "a1") not in fake.calls
    assert chat(w0, "svc").json()["choices"][0]["message"]["content"] == "answer of a2"
    fake.release_chat()
    th.join(60)
    assert result["r"].json()["choices"][0]["message"]["content"] == "answer of a1"
    wait_until(lambda: ("unload", "a1") in fake.calls, what="a1 unloaded")
    assert fake.loaded == {"a2": a2}


# ---------------------------------------------------------------- the byte-level rewrites
@pytest.mark.parametrize("sep", [b":", b": "])
def test_the_answer_is_renamed_wherever_the_engine_cuts_it(sep: bytes) -> None:
    from perennial_server.routes import Renamer

    ev = b'data: {"id":"c1","model"' + sep + b'"tone-v2","choices":[{"delta":{"content":"\\"model\\": \\"tone-v2\\""}}]}\n\n'
    want = ev.replace(b'"model"' + sep + b'"tone-v2"', b'"model"' + sep + b'"tone"', 1)
    assert want != ev and want.count(b"tone-v2") == 1  # the quoted text in the content is left alone
    for cut in range(len(ev) + 1):
        for cut2 in (cut, min(len(ev), cut + 3)):
            rn = Renamer("tone-v2", "tone")
            assert rn.feed(ev[:cut]) + rn.feed(ev[cut:cut2]) + rn.feed(ev[cut2:]) + rn.flush() == want, (cut, cut2)
    # an SSE event's end is never held back (the client gets every event as it comes)
    rn = Renamer("tone-v2", "tone")
    assert rn.feed(ev) == want and rn.flush() == b""


def test_the_request_model_is_rewritten_only_at_the_top_level() -> None:
    from perennial_server.routes import _with_model
    from pydantic_core import from_json

    def rewrite(raw: bytes) -> dict:
        out = _with_model(raw, from_json(raw), "svc", "svc-v2")
        return from_json(out)

    assert rewrite(b'{"model": "svc", "messages": []}') == {"model": "svc-v2", "messages": []}
    # the served name elsewhere too: parsed and re-serialized, the rest unchanged
    got = rewrite(b'{"messages": [{"role": "user", "content": "svc"}], "model":"svc", "user": "svc"}')
    assert got == {"messages": [{"role": "user", "content": "svc"}], "model": "svc-v2", "user": "svc"}
    # a model value written with escapes, and the name quoted inside a string
    got = rewrite(b'{"x": "say \\"svc", "model": "\\u0073vc"}')
    assert got == {"x": 'say "svc', "model": "svc-v2"}
    assert rewrite(b'{"tools": [{"model": "svc"}], "model": "\\u0073vc"}') == {"tools": [{"model": "svc"}], "model": "svc-v2"}
    # a duplicate key: the engine reads the last one, as the sidecar did
    assert rewrite(b'{"model": "a1", "model": "svc"}') == {"model": "svc-v2"}


def test_sidecar_flags() -> None:
    from perennial_server.cli import build_parser
    from perennial_server.config import sidecar_config_from_args

    cfg = sidecar_config_from_args(build_parser().parse_args(["sidecar", "--routes-file", "/etc/perennial/routes/routes.json"]))
    assert cfg.routes_file == "/etc/perennial/routes/routes.json" and cfg.adapters_dir == "/var/lib/perennial/adapters"
    with pytest.raises(ValueError, match="absolute"):
        sidecar_config_from_args(build_parser().parse_args(["sidecar", "--routes-file", "/r.json", "--adapters-dir", "rel/dir"]))
    assert sidecar_config_from_args(build_parser().parse_args(["sidecar"])).routes_file == ""  # default: today's behaviour


def test_a_vanished_routes_file_keeps_the_applied_routes(fake: FakeEngine, routed, tmp_path: Path) -> None:
    a1 = make_adapter_dir(tmp_path, "a1")
    first = doc("r1", {"a1": a1}, {"svc": [("a1", 100)]})
    t, _, kd = routed(first)
    applied(t, "r1")
    os.unlink(kd.root / "..data")  # the ConfigMap volume lost its data
    st = wait_until(lambda: (s := routes_state(t))["errors"].get("(document)") and s, what="read error")
    assert "cannot read" in st["errors"]["(document)"] and st["revision"] == "r1" and st["loaded"] == ["a1"]
    assert chat(t, "svc").json()["choices"][0]["message"]["content"] == "answer of a1"
    assert requests.get(t.url + "/readyz", timeout=30).status_code == 200
    assert ("unload", "a1") not in fake.calls
    kd.write(first)  # the same document comes back
    wait_until(lambda: routes_state(t)["errors"] == {}, what="error cleared")
    assert routes_state(t)["revision"] == "r1"


def test_an_adapter_artifact_must_not_change_under_its_name(fake: FakeEngine, sidecar_factory, tmp_path: Path) -> None:
    """A restarted sidecar finds the engine still holding `tone` fetched from v1; a document giving
    `tone` another uri is refused (the engine would keep serving the old weights under that name)."""
    mem = fsspec.filesystem("memory")
    for v in ("v1", "v2"):
        mem.pipe(f"/art-{tmp_path.name}/{v}/adapter_config.json", v.encode())
    kd = KubeletDir(tmp_path / "cm")
    kd.write(doc("r1", {"tone": f"memory://art-{tmp_path.name}/v1"}, {"svc": [("tone", 100)]}))
    common = {"routes_file": str(kd.path), "adapters_dir": str(tmp_path / "adapters")}
    first, _, _ = sidecar_factory(fake.url, **common)
    applied(first, "r1")
    first.stop()
    kd.write(doc("r2", {"tone": f"memory://art-{tmp_path.name}/v2"}, {"svc": [("tone", 100)]}))
    second, _, _ = sidecar_factory(fake.url, **common)
    st = wait_until(lambda: (s := routes_state(second))["errors"].get("tone") and s, what="tone refused")
    assert "another uri" in st["errors"]["tone"] and st["revision"] is None
    assert (tmp_path / "adapters" / "tone" / "adapter_config.json").read_bytes() == b"v1"
    assert [c for c in fake.calls if c[0] == "load"] == [("load", "tone")]


def test_routes_with_worker_processes(fake: FakeEngine, tmp_path: Path) -> None:
    """`perennial-server sidecar --workers 2 --routes-file …`: the supervisor passes the routes flags
    on; worker 0 loads and unloads, both workers apply every revision (their state files say so)."""
    import signal
    import subprocess
    import sys

    from srvutil import TOKEN, free_port

    a1, a2 = make_adapter_dir(tmp_path, "a1"), make_adapter_dir(tmp_path, "a2")
    kd = KubeletDir(tmp_path / "cm")
    kd.write(doc("r1", {"a1": a1}, {"svc": [("a1", 100)]}))
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "token").write_text(TOKEN + "\n")
    fake.load_delay = 1.5  # a worker that loaded too would find the adapter still missing and load it again
    port = free_port()
    spool = tmp_path / "spool"
    args = [sys.executable, "-m", "perennial_server.cli", "--log-level", "INFO", "sidecar", "--upstream", fake.url,
            "--host", "127.0.0.1", "--port", str(port), "--admin-port", "0", "--spool-dir", str(spool), "--token-file", str(tmp_path / "secret" / "token"),
            "--base-model-name", BASE, "--workers", "2", "--routes-file", str(kd.path), "--adapters-dir", str(tmp_path / "adapters"),
            "--adapter-roots", str(tmp_path / "artifacts")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERENNIAL_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    with open(tmp_path / "sidecar.log", "w") as log:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def worker_states() -> list[dict | None]:
        out = []
        for p in (spool / "routes-state.json", spool / "w1" / "routes-state.json"):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                out.append(None)
        return out

    def ready() -> bool:
        try:
            return requests.get(url + "/readyz", headers={"Connection": "close"}, timeout=5).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(lambda: all(s and s["revision"] == "r1" for s in worker_states()), what="both workers on r1")
        wait_until(ready, what="ready")
        for _ in range(10):  # fresh connections: both workers answer
            r = requests.post(url + "/v1/chat/completions", json={"model": "svc", "messages": [{"role": "user", "content": "hi"}]},
                              headers={"Connection": "close"}, timeout=30)
            assert r.json()["choices"][0]["message"]["content"] == "answer of a1" and r.json()["model"] == "svc"
        kd.write(doc("r2", {"a2": a2}, {"svc": [("a2", 100)]}))
        wait_until(lambda: all(s and s["revision"] == "r2" for s in worker_states()), what="both workers on r2")
        wait_until(lambda: ("unload", "a1") in fake.calls, what="a1 unloaded")
        for _ in range(10):
            r = requests.post(url + "/v1/chat/completions", json={"model": "svc", "messages": [{"role": "user", "content": "hi"}]},
                              headers={"Connection": "close"}, timeout=30)
            assert r.json()["choices"][0]["message"]["content"] == "answer of a2"
        assert [c for c in fake.calls if c[0] == "load"] == [("load", "a1"), ("load", "a2")]  # only worker 0 loads
        assert fake.calls.count(("unload", "a1")) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
