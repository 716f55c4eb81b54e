"""Attacks on the sidecar's routes (`--routes-file`, issue 12): every HTTP client and the routes document
itself (a ConfigMap anyone with edit rights in the namespace can change) are hostile.

- A client must never reach an adapter by its own name (only served names are addressable): a body the
  sidecar cannot parse but the engine can (vLLM parses with `json.loads`, which accepts UTF-16/32, a BOM,
  lone surrogates and deeper nesting than pydantic-core) must not be forwarded as it is.
- An adapter `uri` in the routes document must not make the sidecar read its own files (the feedback token,
  the spool) into the folder the engine reads, nor reach the network or code through fsspec protocols the
  operator never writes (http to the metadata service, chained `simplecache::`, `reference://`, ...).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests
from routesutil import BASE, FakeEngine, applied, doc, make_adapter_dir, routes_state, wait_until


# ---------------------------------------------------------------- parser differentials
def _deep(n: int) -> str:
    return "[" * n + "]" * n


# bodies that Python's json.loads (vLLM's FastAPI) reads as {"model": "a1", ...} but pydantic-core cannot parse
HOSTILE_BODIES = {
    "utf-16": json.dumps({"model": "a1", "messages": [{"role": "user", "content": "hi"}]}).encode("utf-16"),
    "utf-32": json.dumps({"model": "a1", "messages": [{"role": "user", "content": "hi"}]}).encode("utf-32"),
    "bom": json.dumps({"model": "a1", "messages": [{"role": "user", "content": "hi"}]}).encode("utf-8-sig"),
    "lone-surrogate": b'{"model": "a1", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
    "deep": b'{"model": "a1", "messages": [{"role": "user", "content": "hi"}], "x": ' + _deep(400).encode() + b"}",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_BODIES))
def test_a_body_the_sidecar_cannot_parse_never_reaches_the_engine(fake: FakeEngine, routed, tmp_path: Path, kind: str) -> None:
    raw = HOSTILE_BODIES[kind]
    assert json.loads(raw)["model"] == "a1"  # what a json.loads engine (vLLM) would serve: the adapter by its own name
    a1 = make_adapter_dir(tmp_path, "a1")
    t, _, _ = routed(doc("r1", {"a1": a1}, {"support": [("a1", 100)]}))
    applied(t, "r1")
    r = requests.post(t.url + "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert fake.chats == []
    # the same request with a served name still works
    ok = requests.post(t.url + "/v1/chat/completions", json={"model": "support", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "answer of a1"


DUPLICATE_MODEL_BODIES = {
    "adapter-last": f'{{"model": "{BASE}", "model": "a1", "messages": []}}',
    "adapter-first": f'{{"model": "a1", "model": "{BASE}", "messages": []}}',
    "served-last": '{"model": "a1", "model": "support", "messages": []}',
    "non-string-last": '{"model": "a1", "messages": [], "model": 5}',
    "escaped-key": f'{{"model": "a1", "messages": [], "mo\\u0064el": "{BASE}"}}',
    "escaped-both": f'{{"\\u006dodel": "a1", "messages": [], "mode\\u006C": "{BASE}"}}',
    "spaced": f'{{"model" : "a1",\n"model"\t:"{BASE}", "messages": []}}',
}


@pytest.mark.parametrize("kind", sorted(DUPLICATE_MODEL_BODIES))
def test_a_body_repeating_the_model_key_is_refused(fake: FakeEngine, routed, tmp_path: Path, kind: str) -> None:
    """Which of two `model` keys a parser keeps is its own choice (Python's json.loads and pydantic-core keep the
    last, others the first): a body that repeats `model` at its top level is refused, never routed by one and
    served by the other."""
    raw = DUPLICATE_MODEL_BODIES[kind]
    pairs = json.loads(raw, object_pairs_hook=lambda p: p)
    assert [k for k, _ in pairs].count("model") == 2, pairs  # the body really repeats it
    a1 = make_adapter_dir(tmp_path, "a1")
    t, _, _ = routed(doc("r1", {"a1": a1}, {"support": [("a1", 100)]}))
    applied(t, "r1")
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = requests.post(t.url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400, (path, r.status_code, r.text)
        e = r.json()["error"]
        assert e["code"] == "duplicate_model" and e["param"] == "model" and e["type"] == "invalid_request_error", e
    assert fake.chats == []
    # `model` once at the top level and again deeper down (a tool's field) is not a duplicate
    body = {"model": "support", "messages": [{"role": "user", "content": 'say "model": "a1"'}], "tools": [{"model": "a1"}]}
    ok = requests.post(t.url + "/v1/chat/completions", data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "answer of a1"
    # nor are \\u escapes of other text (json.dumps writes non-ASCII so), even a key spelled with one once
    for raw in (rb'{"model": "support", "messages": [{"role": "user", "content": "gr\u00fcn \u006dodel"}], "tools": [{"model": "a1"}]}',
                rb'{"mod\u0065l": "support", "messages": []}'):
        assert json.loads(raw)["model"] == "support"
        ok = requests.post(t.url + "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}, timeout=30)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "answer of a1", ok.text


@pytest.mark.parametrize("model", [5, None, ["support"], {"model": "a1"}, True, "x" * 100_000, "a1\u0000", "ａ1", "support\u200b"])
def test_odd_model_values_never_name_an_adapter(fake: FakeEngine, routed, tmp_path: Path, model: Any) -> None:
    a1 = make_adapter_dir(tmp_path, "a1")
    t, _, _ = routed(doc("r1", {"a1": a1}, {"support": [("a1", 100)]}))
    applied(t, "r1")
    r = requests.post(t.url + "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert "a1" not in fake.chats and "support" not in fake.chats, (r.status_code, fake.chats)


# ---------------------------------------------------------------- preview names
def test_preview_names_answer_only_with_the_operators_token(fake: FakeEngine, routed, tmp_path: Path) -> None:
    """`<served>-preview` names an adapter the operator is smoke-testing before it moves a served name to it: only
    the operator (the feedback token, the same file as /v1/feedback) may call it, never an anonymous client of
    the Service. The token goes no further than the sidecar."""
    import openai
    from srvutil import TOKEN

    a1, a2 = make_adapter_dir(tmp_path, "a1"), make_adapter_dir(tmp_path, "a2")
    t, _, _ = routed(doc("r1", {"a1": a1, "a2": a2}, {"support": [("a1", 100)], "support-preview": [("a2", 100)]}))
    applied(t, "r1")
    chat_body = {"model": "support-preview", "messages": [{"role": "user", "content": "hi"}]}
    for auth in (None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer ", TOKEN):
        headers = {"Authorization": auth} if auth is not None else {}
        for path, body in (("/v1/chat/completions", chat_body), ("/v1/chat/completions", {**chat_body, "stream": True}),
                           ("/v1/completions", {"model": "support-preview", "prompt": "hi"})):
            r = requests.post(t.url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (auth, path, r.status_code, r.text)
            e = r.json()["error"]
            assert e["code"] == "preview_unauthorized" and e["type"] == "authentication_error" and e["param"] == "model"
            assert "preview names need the operator's token" in e["message"], e
    assert fake.chats == []
    # anonymous clients do not see the preview name at all
    anon = openai.OpenAI(base_url=t.url + "/v1", api_key="client-key", max_retries=0)
    assert [m.id for m in anon.models.list().data] == [BASE, "support"]
    with pytest.raises(openai.AuthenticationError):
        anon.models.retrieve("support-preview")
    assert anon.chat.completions.create(model="support", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content == "answer of a1"
    # the operator's smoke test: the token, through the same port; the engine never sees the token
    op = openai.OpenAI(base_url=t.url + "/v1", api_key=TOKEN, max_retries=0)
    assert [m.id for m in op.models.list().data] == [BASE, "support", "support-preview"]
    c = op.chat.completions.create(model="support-preview", messages=[{"role": "user", "content": "hi"}])
    assert c.choices[0].message.content == "answer of a2" and c.model == "support-preview"
    chunks = list(op.chat.completions.create(model="support-preview", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(x.choices[0].delta.content or "" for x in chunks) == "answer of a2"
    assert fake.chats == ["a1", "a2", "a2"]
    assert fake.authorizations[1:] == [None, None], fake.authorizations  # stripped before the engine
    assert fake.authorizations[0] == "Bearer client-key"  # other requests go on as they came
    # through another cluster's API server proxy, which consumes Authorization itself: the token in X-Perennial-Token
    for value in ("wrong-token", "", f"Bearer {TOKEN}"):
        r = requests.post(t.url + "/v1/chat/completions", json=chat_body, headers={"X-Perennial-Token": value}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "preview_unauthorized", (value, r.text)
    r = requests.post(t.url + "/v1/chat/completions", json=chat_body, headers={"X-Perennial-Token": TOKEN}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "answer of a2"
    r = requests.get(t.url + "/v1/models", headers={"X-Perennial-Token": TOKEN}, timeout=30)
    assert [m["id"] for m in r.json()["data"]] == [BASE, "support", "support-preview"]
    requests.post(t.url + "/v1/chat/completions", json={**chat_body, "model": "support"}, headers={"X-Perennial-Token": TOKEN}, timeout=30)
    assert fake.engine_saw_token_header == 0  # the sidecar's header never reaches the engine, whatever the model


# ---------------------------------------------------------------- hostile routes documents
class _Recorder(BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        body = b'<a href="adapter_config.json">adapter_config.json</a>'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *a: Any) -> None:
        pass


@pytest.fixture
def http_server():
    _Recorder.hits = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"127.0.0.1:{srv.server_address[1]}", _Recorder.hits
    srv.shutdown()
    srv.server_close()


def test_adapter_uris_outside_the_artifact_stores_are_refused(fake: FakeEngine, routed, tmp_path: Path, http_server) -> None:
    """The operator writes s3://, gs:// or an absolute path (pvc:// and file:// resolved to the mount): any
    other fsspec protocol is refused before anything is read, listed or connected to."""
    from perennial_server.routes import fetch_adapter

    hostport, hits = http_server
    secret = tmp_path / "secrets"
    secret.mkdir()
    (secret / "token").write_text("s3cr3t-feedback-token")
    a1 = make_adapter_dir(tmp_path, "a1")
    t, _, kd = routed(doc("r1", {"a1": a1}, {"svc": [("a1", 100)]}))
    applied(t, "r1")
    bad_uris = [
        secret.as_uri(),  # the sidecar's own files copied where the engine reads them
        f"file://{tmp_path}/spool0",
        f"http://{hostport}/latest/meta-data/",  # SSRF (the cloud metadata service)
        f"https://{hostport}/x",
        f"simplecache::http://{hostport}/x",
        f"simplecache::{secret.as_uri()}",
        f"zip://x::{secret.as_uri()}/a.zip",
        "reference://",
        "dask://127.0.0.1:1/x",
        "ssh://127.0.0.1/etc",
        "ftp://127.0.0.1/x",
        f"s3://bucket/x::{secret.as_uri()}",
        "S3://bucket/x",
    ]
    for i, uri in enumerate(bad_uris):
        kd.write(doc(f"bad-{i}", {"evil": uri}, {"svc": [("evil", 100)]}))
        st = wait_until(lambda i=i: (s := routes_state(t))["pending"] == f"bad-{i}" and (s["errors"].get("(document)") or s["errors"].get("evil")) and s,
                        what=uri)
        msg = st["errors"].get("(document)") or st["errors"]["evil"]
        assert "protocol" in msg, (uri, msg)
        assert st["revision"] == "r1"
        with pytest.raises(ValueError, match="protocol"):
            fetch_adapter("evil", uri, tmp_path / "adapters", max_bytes=1 << 20)
    assert hits == []
    assert not (tmp_path / "adapters" / "evil").exists()
    assert not any("s3cr3t" in p.read_text(errors="replace") for p in (tmp_path / "adapters").rglob("*") if p.is_file())
    assert [c for c in fake.calls if c[1] == "evil"] == []


def test_local_adapter_paths_must_lie_under_the_pods_adapter_roots(fake: FakeEngine, routed, tmp_path: Path) -> None:
    """A local adapter path in the routes document reaches the engine's `/v1/load_lora_adapter` (the engine reads it
    and may echo what it found in its error): only folders under the adapters dir, the pod's claims (--pvc-root) and
    --adapter-roots may be named; never by `..`, never through a symlink leading out, never the system's folders or
    the sidecar's own (its token, its spool) even under a root."""
    import os

    from srvutil import TOKEN

    artifacts = tmp_path / "artifacts"
    secret = tmp_path / "secret"  # the token's own folder, as the pod mounts it
    secret.mkdir()
    (secret / "token").write_text(TOKEN)
    good = make_adapter_dir(tmp_path, "good")
    (artifacts / "to-etc").symlink_to("/etc")  # a folder under the root that is /etc
    leaky = Path(make_adapter_dir(tmp_path, "leaky"))  # an adapter folder whose config is the feedback token
    (leaky / "adapter_config.json").unlink()
    (leaky / "adapter_config.json").symlink_to(secret / "token")
    pvc = tmp_path / "pvc" / "claim" / "adapters" / "on-claim"
    pvc.mkdir(parents=True)
    (pvc / "adapter_config.json").write_text("{}")
    t, sc, kd = routed(doc("r1", {"good": good, "on-claim": str(pvc)}, {"svc": [("good", 100)], "claim": [("on-claim", 100)]}),
                       pvc_root=str(tmp_path / "pvc"), token_file=str(secret / "token"))
    applied(t, "r1")
    assert set(fake.loaded) == {"good", "on-claim"}
    token_dir = str(secret)
    bad = {
        "etc": "/etc",
        "proc": "/proc/self",
        "root": "/",
        "dotdot": f"{artifacts}/../../../../etc",
        "dotdot-inside": f"{artifacts}/good/../good",
        "symlink-out": str(artifacts / "to-etc"),
        "symlink-in-folder": str(leaky),
        "unlisted": str(tmp_path / "elsewhere"),
        "token-dir": token_dir,
        "spool": sc.cfg.spool_dir,
        "sibling-prefix": str(artifacts) + "-evil",  # /x/artifacts-evil is not under /x/artifacts
    }
    os.makedirs(tmp_path / "elsewhere", exist_ok=True)
    os.makedirs(str(artifacts) + "-evil", exist_ok=True)
    loads = len([c for c in fake.calls if c[0] == "load"])
    for i, (kind, path) in enumerate(sorted(bad.items())):
        kd.write(doc(f"bad-{i}", {"good": good, "evil": path}, {"svc": [("good", 100)], "x": [("evil", 100)]}))
        st = wait_until(lambda i=i: (s := routes_state(t))["pending"] == f"bad-{i}" and s["errors"].get("evil") and s, what=kind)
        assert "adapter `evil`" in st["errors"]["evil"] and "must" in st["errors"]["evil"], (kind, st["errors"])
        assert st["revision"] == "r1", kind
    assert len([c for c in fake.calls if c[0] == "load"]) == loads  # the engine was never asked
    # roots that include the sidecar's own folders still never reach them
    t2, sc2, kd2 = routed(None, adapter_roots=f"{tmp_path},/", pvc_root=str(tmp_path / "pvc"), token_file=str(secret / "token"))
    for i, path in enumerate([str(secret / "token"), sc2.cfg.spool_dir, "/etc/ssl", "/proc/1", str(leaky)]):
        kd2.write(doc(f"own-{i}", {"evil": path}, {"x": [("evil", 100)]}))
        st = wait_until(lambda i=i: (s := routes_state(t2))["pending"] == f"own-{i}" and s["errors"].get("evil") and s, what=path)
        assert "must" in st["errors"]["evil"], (path, st["errors"])
    assert len([c for c in fake.calls if c[0] == "load"]) == loads


def test_adapter_roots_flag() -> None:
    from perennial_server.cli import build_parser
    from perennial_server.config import sidecar_config_from_args

    def cfg(*argv: str):
        return sidecar_config_from_args(build_parser().parse_args(["sidecar", "--routes-file", "/r.json", *argv]))

    assert cfg().pvc_root == "/mnt/pvc" and cfg().adapter_roots == ""
    assert cfg("--adapter-roots", "/a,/b/c").local_adapter_roots() == ["/var/lib/perennial/adapters", "/mnt/pvc", "/a", "/b/c"]
    with pytest.raises(ValueError, match="absolute"):
        cfg("--adapter-roots", "/a,rel")


def test_a_compressed_request_is_routed_and_forwarded_decoded(fake: FakeEngine, routed, tmp_path: Path) -> None:
    """aiohttp decodes a `Content-Encoding: gzip` request body before the sidecar routes it; the decoded (and
    rewritten) body went on with the header still saying gzip: an engine that decodes request bodies (the CPU
    engine) failed on it, one that does not read a body other than the one routed only by chance."""
    import gzip

    a1 = make_adapter_dir(tmp_path, "a1")
    t, _, _ = routed(doc("r1", {"a1": a1}, {"support": [("a1", 100)]}))
    applied(t, "r1")
    raw = gzip.compress(json.dumps({"model": "support", "messages": [{"role": "user", "content": "hi"}]}).encode())
    r = requests.post(t.url + "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
                      timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "answer of a1" and fake.chats == ["a1"]
    # a body compressed twice is not JSON once decoded: refused, never forwarded
    r = requests.post(t.url + "/v1/chat/completions", data=gzip.compress(raw), headers={"Content-Encoding": "gzip"}, timeout=30)
    assert r.status_code == 400 and fake.chats == ["a1"]
