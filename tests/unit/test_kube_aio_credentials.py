"""The operator's async client reads credentials once per refresh interval, not per request, and
re-reads them at once when the API server says 401 (a rotated token)."""

from __future__ import annotations

import asyncio

import kubernetes
from aiohttp import web

from perennial.kube.aio import AsyncKube


class _Server:
    def __init__(self) -> None:
        self.token = "first"
        self.seen: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        self.seen.append(auth)
        if auth != f"Bearer {self.token}":
            return web.json_response({"kind": "Status", "code": 401, "message": "Unauthorized"}, status=401)
        return web.json_response({"gitVersion": "v1.33.0"})


def _client(url: str, tokens: list[str], calls: list[int]) -> AsyncKube:
    cfg = kubernetes.client.Configuration()
    cfg.host = url
    cfg.api_key = {"BearerToken": "Bearer " + tokens[0]}

    def refresh(c: kubernetes.client.Configuration) -> None:  # what kubeconfig / in-cluster loaders install
        calls.append(1)
        c.api_key = {"BearerToken": "Bearer " + tokens[0]}

    cfg.refresh_api_key_hook = refresh
    return AsyncKube(cfg)


def test_credentials_are_read_once_per_interval_and_again_after_a_401() -> None:
    async def main() -> None:
        server = _Server()
        app = web.Application()
        app.router.add_get("/version", server.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        tokens, calls = ["first"], []
        client = _client(f"http://127.0.0.1:{port}", tokens, calls)
        try:
            for _ in range(50):
                assert (await client.request("GET", "/version"))["gitVersion"] == "v1.33.0"
            assert len(calls) == 1, f"the refresh hook ran {len(calls)} times for 50 requests"
            # the token rotates: the server refuses the old one, the client re-reads and retries once
            tokens[0] = server.token = "second"
            assert (await client.request("GET", "/version"))["gitVersion"] == "v1.33.0"
            assert server.seen[-2:] == ["Bearer first", "Bearer second"]
            assert len(calls) == 2
        finally:
            await client.close()
            await runner.cleanup()

    asyncio.run(main())
