"""Helpers of the server-image tests (servers in threads, store reading)."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Callable


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for tinymodel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppThread:
    """Runs an aiohttp Application on 127.0.0.1 in its own thread and loop."""

    def __init__(self, make_app: Callable[[], Any], shutdown_timeout: float = 5.0, runner: Callable[..., Any] | None = None,
                 admin: Callable[[], Any] | None = None) -> None:
        """`runner(app, shutdown_timeout=...)`: the AppRunner to serve it with (default aiohttp's plain one);
        `admin`: a second app served on its own port by the same loop (the sidecar's admin port: `admin_url`)."""
        self.make_app = make_app
        self.make_admin = admin
        self.runner = runner
        self.shutdown_timeout = shutdown_timeout
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.admin_port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        from aiohttp import web

        try:
            self._stop = asyncio.Event()
            if self.runner is not None:
                runner = self.runner(self.make_app(), shutdown_timeout=self.shutdown_timeout)
            else:
                runner = web.AppRunner(self.make_app(), shutdown_timeout=self.shutdown_timeout, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            admin_runner = None
            if self.make_admin is not None:
                admin_app = self.make_admin()
                admin_runner = (self.runner(admin_app, shutdown_timeout=1.0) if self.runner is not None
                                else web.AppRunner(admin_app, shutdown_timeout=1.0, access_log=None))
                await admin_runner.setup()
                admin_site = web.TCPSite(admin_runner, "127.0.0.1", 0)
                await admin_site.start()
                self.admin_port = admin_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        except BaseException as e:
            self._error = e
            self._ready.set()
            raise
        self._ready.set()
        await self._stop.wait()
        if admin_runner is not None:
            await admin_runner.cleanup()
        await runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        assert self.admin_port, "no admin app"
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> "AppThread":
        self.thread.start()
        self._ready.wait(60)
        if self._error:
            raise self._error
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)


def fake_engine(chat: Callable[[Any], Any]) -> AppThread:
    """A started fake engine: `chat` answers `POST /v1/chat/completions`, `GET /health` answers `{}`."""
    from aiohttp import web

    async def health(request: web.Request) -> web.Response:
        return web.json_response({})

    def make() -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/health", health)
        return app

    return AppThread(make).start()


def make_adapter(base_path: str, out: Path, seed: int) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.5)  # non-zero B: the adapter really changes outputs
    model.save_pretrained(out)
    return str(out)


TOKEN = "s3cr3t-feedback-token"


def read_store(store: Path) -> list[dict]:
    import json

    out = []
    for p in sorted(store.rglob("*.jsonl")):
        for line in p.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out
