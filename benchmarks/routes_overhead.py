"""What the sidecar's routes (`--routes-file`, served name -> adapter) cost per proxied request.

Two sidecars side by side in front of one instant OpenAI-like upstream (all on 127.0.0.1, capture
on, 100% sampled): one without routes (requests name the base model, as today), one with a routes
document (requests name a served name; the sidecar picks the adapter from a two-entry canary, rewrites
the request's `model`, renames `model` back in the answer, counts the request in flight). Alternating
rounds of closed-loop keep-alive clients, JSON and SSE. Reports, per mode, the median over rounds of
requests/s and of the sidecar's CPU time per request (utime+stime from /proc), and the ratios
routed/plain. The upstream answers instantly, so this is a stress test of the sidecar's CPU: the
ratio bounds what routes cost, it is not the end-to-end figure (benchmarks/sidecar_overhead.py).
Also the routed sidecar with base-name requests (`base`): routed/base compares two workloads on the
same process, free of the two processes' placement noise (on a busy machine: trust it over routed/plain).

    python benchmarks/routes_overhead.py [--clients 16] [--seconds 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

HOST = "127.0.0.1"
BASE, SERVED = "bench-base", "bench-svc"


def run_upstream(port: int) -> None:
    words = ("The ", "answer ", "is ", "green, ", "as ", "usual", ".", "")
    loaded: set[str] = set()

    async def chat(request: web.Request) -> web.StreamResponse:
        req = json.loads(await request.read())
        model = req["model"]
        if req.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for w in words:
                ev = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 0, "model": model,
                      "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
                await resp.write(b"data: " + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        body = {"id": "chatcmpl-b", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}}
        return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), content_type="application/json")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": BASE, "parent": None}] + [{"id": n, "parent": BASE} for n in sorted(loaded)]})

    async def load(request: web.Request) -> web.Response:
        loaded.add((await request.json())["lora_name"])
        return web.Response(text="ok")

    async def health(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/load_lora_adapter", load)
    app.router.add_get("/health", health)
    web.run_app(app, host=HOST, port=port, print=None, access_log=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"sidecar exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready")


async def load_round(url: str, model: str, stream: bool, clients: int, seconds: float) -> int:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "What colour is a kiwi? " * 8}],
                       "max_tokens": 8, "temperature": 0.7, "stream": stream}).encode()
    headers = {"Content-Type": "application/json"}
    done = 0
    stop = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.monotonic() < stop:
            async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
                data = await r.read()
                if r.status != 200 or (model == SERVED and b'"model":"bench-svc"' not in data):
                    raise SystemExit(f"bad answer {r.status}: {data[:200]!r}")
            done += 1

    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return done


def micro() -> None:
    """In-process: what routing adds per request, next to one parse of the same body (which the
    capture does anyway for every captured request)."""
    import timeit

    from perennial_server.routes import Renamer, Route, Routes
    from pydantic_core import from_json

    r = Routes("/nonexistent", base_name=BASE, adapters_dir="/nonexistent", max_bytes=1)
    r.table = {SERVED: Route([("svc-v1", 90), ("svc-v2", 10)])}
    body = json.dumps({"model": SERVED, "messages": [{"role": "user", "content": "What colour is a kiwi? " * 8}],
                       "max_tokens": 8, "temperature": 0.7}).encode()
    answer = json.dumps({"id": "chatcmpl-b", "object": "chat.completion", "created": 0, "model": "svc-v1",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "The answer is green."}, "finish_reason": "stop"}]},
                        separators=(",", ":")).encode()
    n = 5000

    def routed() -> None:
        rt = r.route(body)
        rt.renamer.whole(answer)
        r.done(rt)

    t_route = min(timeit.repeat(routed, number=n, repeat=9)) / n * 1e6
    t_parse = min(timeit.repeat(lambda: from_json(body), number=n, repeat=9)) / n * 1e6
    ren = Renamer("svc-v1", SERVED)
    ev = b"data: " + answer + b"\n\n"
    t_event = min(timeit.repeat(lambda: ren.feed(ev), number=n, repeat=9)) / n * 1e6
    print(f"in-process: route + rename + done {t_route:.2f} us per JSON request ({t_route / t_parse:.2f}x one parse of its body, "
          f"{t_parse:.2f} us); rename per SSE event {t_event:.2f} us")
    # a body with \\u escapes (non-ASCII text from a client with ensure_ascii, as Python's json.dumps): the
    # duplicate-`model` check looks further (one regex scan), and the rewrite re-serializes it
    body_u = json.dumps({"model": SERVED, "messages": [{"role": "user", "content": "Welche Farbe hat eine Kiwi? \u00fc " * 8}],
                         "max_tokens": 8, "temperature": 0.7}).encode()
    assert b"\\u00fc" in body_u

    def routed_u() -> None:
        rt = r.route(body_u)
        rt.renamer.whole(answer)
        r.done(rt)

    t_route_u = min(timeit.repeat(routed_u, number=n, repeat=9)) / n * 1e6
    t_parse_u = min(timeit.repeat(lambda: from_json(body_u), number=n, repeat=9)) / n * 1e6
    print(f"in-process, body with \\u escapes: route + rename + done {t_route_u:.2f} us ({t_route_u / t_parse_u:.2f}x one parse, {t_parse_u:.2f} us)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    micro()

    up_port = free_port()
    upstream = multiprocessing.Process(target=run_upstream, args=(up_port,), daemon=True)
    upstream.start()
    tmp = Path(tempfile.mkdtemp(prefix="routes-bench-"))
    (tmp / "token").write_text("bench-token\n")
    routes = tmp / "routes.json"
    art = tmp / "artifacts"  # an adapter root of its own, apart from the sidecar's spool and token
    art.mkdir()
    routes.write_text(json.dumps({"revision": "r1", "base": {"name": BASE},
                                  "adapters": {"svc-v1": {"uri": str(art)}, "svc-v2": {"uri": str(art)}},
                                  "routes": {SERVED: [{"adapter": "svc-v1", "weight": 90}, {"adapter": "svc-v2", "weight": 10}]}}))
    procs, urls = {}, {}
    for mode in ("plain", "routed"):
        port = free_port()
        argv = [sys.executable, "-m", "perennial_server.cli", "--log-level", "WARNING", "sidecar", "--upstream", f"http://{HOST}:{up_port}",
                "--host", HOST, "--port", str(port), "--admin-port", "0", "--spool-dir", str(tmp / f"spool-{mode}"), "--token-file", str(tmp / "token"),
                "--base-model-name", BASE]
        if mode == "routed":
            argv += ["--routes-file", str(routes), "--adapters-dir", str(tmp / "adapters"), "--adapter-roots", str(art)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / d) for d in ("server_image", "common", "operator")]))
        procs[mode] = subprocess.Popen(argv, env=env)
        urls[mode] = f"http://{HOST}:{port}"
    try:
        for mode in procs:
            wait_ready(urls[mode], procs[mode])
        print(f"clients={a.clients} seconds={a.seconds} rounds={a.rounds} upstream=instant capture=100%")
        # plain: the sidecar without routes, base name (today); base: the routed sidecar, base name
        # (parsed, passed through); routed: the routed sidecar, served name (rewritten and renamed).
        # routed/base is measured on one process (no placement noise), routed/plain against today.
        runs = {"plain": ("plain", BASE), "base": ("routed", BASE), "routed": ("routed", SERVED)}
        for stream in (False, True):
            rps: dict[str, list[float]] = {m: [] for m in runs}
            cpu: dict[str, list[float]] = {m: [] for m in runs}
            for _ in range(a.rounds):
                for mode, (proc, model) in runs.items():
                    pid = procs[proc].pid
                    c0, t0 = cpu_seconds(pid), time.monotonic()
                    n = asyncio.run(load_round(urls[proc], model, stream, a.clients, a.seconds))
                    c1, t1 = cpu_seconds(pid), time.monotonic()
                    rps[mode].append(n / (t1 - t0))
                    cpu[mode].append((c1 - c0) / max(n, 1) * 1e6)
            r = {m: statistics.median(v) for m, v in rps.items()}
            c = {m: statistics.median(v) for m, v in cpu.items()}
            print(f"{'sse ' if stream else 'json'}: " + " | ".join(f"{m} {r[m]:6.0f} req/s {c[m]:5.0f} us CPU/req" for m in runs)
                  + f" | CPU/req routed/plain {c['routed'] / c['plain']:.3f}x routed/base {c['routed'] / c['base']:.3f}x"
                  + f" | throughput routed/plain {r['routed'] / r['plain']:.3f}x")
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(30)
        upstream.terminate()


if __name__ == "__main__":
    main()
