"""Shared helpers of the routes tests (test_routes.py, test_routes_attacks.py): a ConfigMap volume as kubelet
writes it, routes documents, a fake engine speaking vLLM's adapter API, adapter folders, and reading the
sidecar's `GET /perennial/routes`. The `fake` and `routed` fixtures are in conftest.py."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from aiohttp import web
from srvutil import AppThread

BASE = "tiny-base"


def wait_until(fn: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or fn}")
        time.sleep(0.05)


class KubeletDir:
    """A ConfigMap volume as kubelet writes it: `routes.json -> ..data/routes.json`, `..data -> ..<ts>`,
    updated by writing a new timestamped dir and renaming a new `..data` symlink over the old one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.n = 0
        self.path = root / "routes.json"

    def write(self, doc: dict | str) -> None:
        self.n += 1
        ts = self.root / f"..2026_11_29_{self.n:04d}"
        ts.mkdir()
        (ts / "routes.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
        tmp = self.root / "..data_tmp"
        os.symlink(ts.name, tmp)
        os.rename(tmp, self.root / "..data")
        if not self.path.is_symlink():
            os.symlink("..data/routes.json", self.path)


def doc(revision: str, adapters: dict[str, str], routes: dict[str, list[tuple[str, int]]]) -> dict:
    return {"revision": revision, "base": {"name": BASE}, "adapters": {n: {"uri": u, "rank": 8} for n, u in adapters.items()},
            "routes": {s: [{"adapter": a, "weight": w} for a, w in entries] for s, entries in routes.items()}}


class FakeEngine:
    """An engine speaking vLLM's adapter API: `/v1/models` (adapters with `parent`), load/unload
    (paths must exist), chat answering with the model it was asked for; loads can fail or block."""

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.chats: list[str] = []
        self.authorizations: list[str | None] = []  # the Authorization header of each chat request
        self.engine_saw_token_header = 0  # chat requests that came with X-Perennial-Token
        self.fail: dict[str, str] = {}
        self.hold_loads: threading.Event | None = None
        self.load_delay = 0.0
        self.hold_chat: asyncio.Event | None = None
        self.chat_started = threading.Event()
        self.t = AppThread(self.make).start()
        self.url = self.t.url

    def make(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": BASE, "object": "model", "parent": None}]
        data += [{"id": n, "object": "model", "root": p, "parent": BASE} for n, p in self.loaded.items()]
        return web.json_response({"object": "list", "data": data})

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        name, path = body["lora_name"], body["lora_path"]
        self.calls.append(("load", name))
        await asyncio.sleep(self.load_delay)
        if self.hold_loads is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.hold_loads.wait, 60)
        if name in self.fail:
            return web.json_response({"error": {"message": self.fail[name], "type": "BadRequestError", "code": 400}}, status=400)
        if name in self.loaded:
            return web.json_response({"error": {"message": f"The lora adapter '{name}' has already been loaded.", "code": 400}}, status=400)
        if not Path(path, "adapter_config.json").is_file():
            return web.json_response({"error": {"message": f"no adapter at {path}", "code": 400}}, status=400)
        self.loaded[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        name = (await request.json())["lora_name"]
        self.calls.append(("unload", name))
        if name not in self.loaded:
            return web.json_response({"error": {"message": "not loaded", "code": 404}}, status=404)
        del self.loaded[name]
        return web.Response(text="Success")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body["model"]
        self.chats.append(model)
        self.authorizations.append(request.headers.get("Authorization"))
        self.engine_saw_token_header += "X-Perennial-Token" in request.headers
        if model != BASE and model not in self.loaded:
            return web.json_response({"error": {"message": f"The model `{model}` does not exist.", "code": 404}}, status=404)
        if body.get("hold"):
            self.hold_chat = asyncio.Event()
            self.chat_started.set()
            await self.hold_chat.wait()
        text = f"answer of {model}"
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for piece in (text[:4], text[4:]):
                ev = {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "model": model,
                      "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                # one event split over two writes mid-`"model"`: the proxy must still rename it
                raw = b"data: " + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n"
                cut = raw.index(b'"model"') + 5
                await resp.write(raw[:cut])
                await asyncio.sleep(0.01)
                await resp.write(raw[cut:])
            await resp.write(b"data: [DONE]\n\n")
            return resp
        return web.json_response({"id": "chatcmpl-" + os.urandom(6).hex(), "object": "chat.completion", "model": model,
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})

    def release_chat(self) -> None:
        ev = self.hold_chat
        assert ev is not None
        self.t.loop.call_soon_threadsafe(ev.set)

    def stop(self) -> None:
        if self.hold_loads is not None:
            self.hold_loads.set()
        self.t.stop()


def make_adapter_dir(root: Path, name: str) -> str:
    d = root / "artifacts" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "name": name}))
    (d / "adapter_model.safetensors").write_bytes(os.urandom(256))
    return str(d)


def routes_state(t: AppThread) -> dict:
    r = requests.get(t.admin_url + "/perennial/routes", timeout=30)  # the admin port only
    assert r.status_code == 200, r.text
    return r.json()


def applied(t: AppThread, revision: str) -> dict:
    return wait_until(lambda: (s := routes_state(t))["revision"] == revision and s, what=f"revision {revision}")
