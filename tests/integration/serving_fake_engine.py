"""A stand-in engine for the local serving tests: the engine's HTTP surface the sidecar uses, plus test hooks.

`fake-engine --host H --port P [--watch FILE]`: `GET /health` (500 once `POST /sick` was called), OpenAI-style
`/v1/models` and `/v1/chat/completions` answering with this pod's name, LoRA load/unload, `GET /whoami`
(pod name, pid), `GET /file` (the content of `--watch`, a path the kubelet maps to the pod's volume).
Exits on SIGTERM (aiohttp's run_app).
"""

from __future__ import annotations

import argparse
import os
import socket

from aiohttp import web


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--watch", default="")
    args = p.parse_args()
    state = {"sick": False}
    pod = os.environ.get("POD_NAME") or socket.gethostname()

    async def health(request: web.Request) -> web.Response:
        return web.json_response({}, status=500 if state["sick"] else 200)

    async def sick(request: web.Request) -> web.Response:
        state["sick"] = True
        return web.json_response({"sick": True})

    async def whoami(request: web.Request) -> web.Response:
        return web.json_response({"pod": pod, "pid": os.getpid()})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "base", "object": "model"}]})

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "model": body.get("model", "base"),
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": f"hello from {pod}"}}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}})

    async def lora(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def read_file(request: web.Request) -> web.Response:
        try:
            with open(args.watch, "rb") as fh:
                return web.Response(body=fh.read())
        except OSError as exc:
            return web.Response(status=404, text=str(exc))

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/sick", sick)
    app.router.add_get("/whoami", whoami)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/load_lora_adapter", lora)
    app.router.add_post("/v1/unload_lora_adapter", lora)
    app.router.add_get("/file", read_file)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
