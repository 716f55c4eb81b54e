"""Feedback sidecar overhead: direct vs through-the-sidecar, all on 127.0.0.1.

A local aiohttp upstream answers like an OpenAI server (JSON and SSE, 8 tokens). By
default it takes the time of a fast engine: first token after `--ttft-ms` (20), then
one token every `--itl-ms` (5) -- faster than vLLM at 64 concurrent sequences. The
load generator (this process) runs closed-loop keep-alive clients against the upstream
directly and through the sidecar (capture on, 100% sampled, redaction on), in
alternating rounds, and reports:

  * added latency p50/p99 at 1 client (the proxy's own cost per request) and at
    N clients (sidecar minus direct percentiles), and the throughput ratio (median
    of the per-round ratios)   -- targets < 1 ms, < 5 ms, >= 0.9x;
  * the same with an instant upstream (no generation time at all): a stress test of
    the sidecar's CPU. Its ratio is bounded by CPU, not by the proxy's design: there
    the sidecar does strictly more work per request than the upstream it fronts, so
    it reports CPU per request and the requests/s one sidecar core sustains;
  * durable feedback records per second over HTTP (each answered after fsync): one
    record per request, and arrays of `--batch` records per request (target >= 10,000/s);
    and at the spool (group commit, in-process).
  * floors, placed like the sidecar: a bare byte relay (no HTTP parsing, no capture) compared
    the same way on the fast engine, i.e. what any extra process in the path costs on this
    machine, and an empty aiohttp endpoint's requests/s, the ceiling for one feedback record
    per request in one process (`--no-floor` skips them). Printed as ratios measured side by
    side: the sidecar's throughput ratio over the relay's (target >= 0.91x, within 1.1x of the
    floor) and feedback requests/s over the empty endpoint's in alternating rounds (target >= 0.8x).

Placement: like a pod, where the sidecar container has its own CPU, the sidecar is
pinned to the last CPU and the upstream + load generator to the others (`--no-pin`:
everything shares every CPU). `--workers N` runs the sidecar as N processes on the port
(`perennial-server sidecar --workers N`, as a pod that gives the sidecar N CPUs would), pinned
to the last N CPUs when the machine has more than N. Bounded: about a minute. Usage:

    python benchmarks/sidecar_overhead.py [--clients 64] [--seconds 3] [--rounds 3] [--ttft-ms 20] [--itl-ms 5] [--no-pin] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

HOST = "127.0.0.1"  # never anything else
TOKEN = "bench-token"


# ---------------------------------------------------------------- upstream
def run_upstream(port: int, ttft_s: float, itl_s: float) -> None:
    """OpenAI-like answers; generation time per request unless `X-Bench-Engine: instant`."""
    words = ("The ", "answer ", "is ", "green, ", "as ", "usual", ".", "")
    body = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": len(words), "total_tokens": 12 + len(words)}}
    raw = json.dumps(body).encode()
    chunks = [b"data: " + json.dumps({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                      "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}).encode() + b"\n\n"
              for w in words]
    chunks.append(b"data: " + json.dumps({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                          "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode() + b"\n\n")
    chunks.append(b"data: [DONE]\n\n")
    generate_s = ttft_s + (len(words) - 1) * itl_s

    async def chat(request: web.Request) -> web.StreamResponse:
        req = await request.read()
        timed = request.headers.get("X-Bench-Engine") != "instant" and generate_s > 0
        if b'"stream": true' not in req:
            if timed:
                await asyncio.sleep(generate_s)
            return web.Response(body=raw, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if timed:
            await asyncio.sleep(ttft_s)
        for i, c in enumerate(chunks):
            if timed and 0 < i < len(words):
                await asyncio.sleep(itl_s)
            await resp.write(c)
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(app, host=HOST, port=port, access_log=None, print=None)


# ---------------------------------------------------------------- floors
def sidecar_loop() -> asyncio.AbstractEventLoop:
    """The event loop the sidecar runs on (uvloop when installed), for a fair floor."""
    from perennial_server.sidecar import loop_factory

    return (loop_factory() or asyncio.new_event_loop)()


def run_relay(port: int, upstream_port: int) -> None:
    """The least any proxy process must do: a byte relay (no HTTP parsing, no capture) on
    uvloop, one engine connection per client connection. Placed like the sidecar, it shows what
    an extra process in the path costs on this machine (the scheduler's cross-CPU wake-ups)."""
    loop = sidecar_loop()

    class Upstream(asyncio.Protocol):
        def __init__(self, client: asyncio.Transport) -> None:
            self.client = client

        def data_received(self, data: bytes) -> None:
            self.client.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self.client.close()

    class Client(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.pending: list[bytes] = []
            self.up: asyncio.Transport | None = None
            transport.pause_reading()
            loop.create_task(self.connect())

        async def connect(self) -> None:
            self.up, _ = await loop.create_connection(lambda: Upstream(self.transport), HOST, upstream_port)
            for data in self.pending:
                self.up.write(data)
            self.transport.resume_reading()

        def data_received(self, data: bytes) -> None:
            if self.up is None:
                self.pending.append(data)
            else:
                self.up.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.up is not None:
                self.up.close()

    async def main() -> None:
        server = await loop.create_server(Client, HOST, port, backlog=2048)
        async with server:
            await server.serve_forever()

    loop.run_until_complete(main())


def run_hello(port: int) -> None:
    """The least an aiohttp endpoint does (read the body, answer JSON), on uvloop like the
    sidecar: the ceiling of one-record-per-request feedback in one process on this core."""
    async def feedback(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"id": "fb-0", "object": "feedback", "status": "recorded"})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/feedback", feedback)
    app.router.add_get("/health", health)
    loop = sidecar_loop()
    web.run_app(app, host=HOST, port=port, access_log=None, print=None, loop=loop)


# ---------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process for {url} exited")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its children alive now (the sidecar's workers; Linux /proc)."""
    total = 0.0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(d) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


CHAT = json.dumps({"model": "fruit-a", "messages": [{"role": "user", "content": "Mail me at a.b@example.com: what colour is a kiwi?"}], "max_tokens": 16}).encode()
CHAT_STREAM = json.dumps({"model": "fruit-a", "messages": [{"role": "user", "content": "Call +1 415 555 0134: what colour is a kiwi?"}], "max_tokens": 16, "stream": True}).encode()


async def _read_response(r: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked); return its status."""
    head = await r.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    i = lower.find(b"content-length:")
    if i >= 0:
        n = int(lower[i + 15:lower.index(b"\r\n", i)])
        await r.readexactly(n)
    elif b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
            await r.readexactly(size + 2)
            if size == 0:
                break
    return status


async def load(url: str, body: bytes, clients: int, seconds: float, headers: dict | None = None) -> tuple[list[float], float, int]:
    """Closed loop: `clients` keep-alive connections for `seconds`; returns (latencies s, rps, errors).

    A minimal HTTP/1.1 client on asyncio streams (like wrk), so that the load
    generator takes as little of the shared CPU as possible.
    """
    from urllib.parse import urlsplit

    u = urlsplit(url)
    assert u.hostname == HOST, "load tests only ever target 127.0.0.1"
    hdrs = {"Host": f"{u.hostname}:{u.port}", "Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
    req = (f"POST {u.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n").encode() + body
    lat: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        r, w = await asyncio.open_connection(u.hostname, u.port)
        try:
            w.write(req)  # warm-up request
            await _read_response(r)
            while time.perf_counter() < end:
                t = time.perf_counter()
                w.write(req)
                status = await _read_response(r)
                if status >= 300:
                    errors += 1
                    continue
                lat.append(time.perf_counter() - t)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
        finally:
            w.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return lat, len(lat) / wall, errors


def hist_quantiles(metrics_text: str, name: str) -> tuple[float, float, int]:
    """p50 / p99 upper bucket bounds of a Prometheus histogram."""
    buckets = []
    for line in metrics_text.splitlines():
        if line.startswith(name + "_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1] if buckets else 0
    def q(p: float) -> float:
        for le, c in buckets:
            if c >= p * total:
                return le
        return float("nan")
    return q(0.5), q(0.99), int(total)


async def spool_rate(seconds: float, writers: int) -> tuple[float, int]:
    from perennial_server.spool import Spool

    with tempfile.TemporaryDirectory(prefix="bench-spool-") as d:
        sp = Spool(d, max_segment_bytes=64 << 20, max_segment_age_s=3600)
        await sp.start()
        line = json.dumps({"kind": "feedback", "responseId": "chatcmpl-x", "type": "score", "score": 0.5, "id": "fb-" + "0" * 32})
        n = 0
        end = time.perf_counter() + seconds

        async def w() -> None:
            nonlocal n
            while time.perf_counter() < end:
                await sp.append(line, durable=True)
                n += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(w() for _ in range(writers)))
        wall = time.perf_counter() - t0
        fs = sp.fsyncs
        await sp.close()
    return n / wall, fs


# ---------------------------------------------------------------- main
def placement(pin: bool, sidecar_cpus: int) -> tuple[set[int] | None, set[int] | None]:
    """(CPUs for the load generator + upstream, CPUs for the sidecar: the last `sidecar_cpus`)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin or len(cpus) <= sidecar_cpus:
        return None, None
    return set(cpus[:-sidecar_cpus]), set(cpus[-sidecar_cpus:])


def spawn(cmd: list[str], env: dict, cpus: set[int] | None) -> subprocess.Popen:
    p = subprocess.Popen(cmd, env=env)
    if cpus:
        os.sched_setaffinity(p.pid, cpus)
    return p


async def compare(direct: str, proxied: str, body: bytes, headers: dict, args: argparse.Namespace, sc_pid: int) -> dict:
    """Alternating rounds (direct, sidecar, sidecar, direct, ...) of `args.seconds` each."""
    lat = {"direct": [], "sidecar": []}
    rps = {"direct": [], "sidecar": []}
    errors, cpu, n_sc = 0, 0.0, 0
    for r in range(args.rounds):
        order = ("direct", "sidecar") if r % 2 == 0 else ("sidecar", "direct")
        for name in order:
            c0 = cpu_seconds(sc_pid)
            l, x, e = await load(direct if name == "direct" else proxied, body, args.clients, args.seconds, headers=headers)
            if name == "sidecar":
                cpu += cpu_seconds(sc_pid) - c0
                n_sc += len(l)
            lat[name] += l
            rps[name].append(x)
            errors += e
    ratios = sorted(s / d for s, d in zip(rps["sidecar"], rps["direct"]) if d)
    return {
        "direct_rps": statistics.median(rps["direct"]), "sidecar_rps": statistics.median(rps["sidecar"]),
        "throughput_ratio": statistics.median(ratios) if ratios else float("nan"), "round_ratios": [round(x, 3) for x in ratios],
        "direct_p50_ms": pct(lat["direct"], .5) * 1e3, "direct_p99_ms": pct(lat["direct"], .99) * 1e3,
        "sidecar_p50_ms": pct(lat["sidecar"], .5) * 1e3, "sidecar_p99_ms": pct(lat["sidecar"], .99) * 1e3,
        "added_p50_ms": (pct(lat["sidecar"], .5) - pct(lat["direct"], .5)) * 1e3,
        "added_p99_ms": (pct(lat["sidecar"], .99) - pct(lat["direct"], .99)) * 1e3,
        "errors": errors, "sidecar_cpu_us_per_request": cpu / max(1, n_sc) * 1e6,
    }


async def bench(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-sidecar-"))
    (tmp / "token").write_text(TOKEN)
    up_port, sc_port, admin_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERENNIAL_")}
    load_cpus, sc_cpus = placement(not args.no_pin, args.sidecar_cpus or args.workers)
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
    up = spawn([sys.executable, __file__, "--serve-upstream", str(up_port), "--ttft-ms", str(args.ttft_ms), "--itl-ms", str(args.itl_ms)], env, load_cpus)
    sc = spawn([
        sys.executable, "-m", "perennial_server.cli", "--log-level", "WARNING", "sidecar", "--upstream", f"http://{HOST}:{up_port}",
        "--host", HOST, "--port", str(sc_port), "--admin-port", str(admin_port), "--spool-dir", str(tmp / "spool"), "--store-uri", str(tmp / "store"),
        "--token-file", str(tmp / "token"), "--sample-percent", "100", "--rate-limit-per-second", "1000000",
        "--deployment", "bench", "--pod", "bench-0", "--base-model-name", "base", "--workers", str(args.workers),
    ], env, sc_cpus)  # workers inherit the supervisor's CPUs
    res: dict = {"placement": {"load_generator_and_upstream": sorted(load_cpus) if load_cpus else "all", "sidecar": sorted(sc_cpus) if sc_cpus else "all"}}
    try:
        wait_http(f"http://{HOST}:{up_port}/health", up)
        wait_http(f"http://{HOST}:{sc_port}/readyz", sc)
        direct = f"http://{HOST}:{up_port}/v1/chat/completions"
        proxied = f"http://{HOST}:{sc_port}/v1/chat/completions"
        instant = {"X-Bench-Engine": "instant"}

        if not args.feedback_only:
            await proxy_phases(res, direct, proxied, instant, args, sc, up_port, env, sc_cpus, admin_port)
        await feedback_phases(res, args, sc, sc_port, env, sc_cpus, tmp / "spool")
    finally:
        sc.terminate()
        try:
            sc.wait(30)
        except subprocess.TimeoutExpired:
            sc.kill()
        up.terminate()
        up.wait(10)
    stored = sum(1 for p in (tmp / "store").rglob("*.jsonl") for _ in p.open())
    res["stored_records_after_shutdown"] = stored
    shutil.rmtree(tmp, ignore_errors=True)
    rate, fs = await spool_rate(min(3.0, args.seconds), args.clients)
    res["feedback_spool"] = {"durable_records_per_s": rate, "fsyncs": fs}
    return res


async def proxy_phases(res: dict, direct: str, proxied: str, instant: dict, args: argparse.Namespace, sc: subprocess.Popen, up_port: int,
                       env: dict, sc_cpus: set[int] | None, admin_port: int) -> None:
    # 1 client, instant upstream: the proxy's own cost per request
    d1, _, _ = await load(direct, CHAT, 1, args.seconds / 2, headers=instant)
    p1, _, _ = await load(proxied, CHAT, 1, args.seconds / 2, headers=instant)
    res["unloaded"] = {"direct_p50_ms": pct(d1, .5) * 1e3, "sidecar_p50_ms": pct(p1, .5) * 1e3,
                       "added_p50_ms": (pct(p1, .5) - pct(d1, .5)) * 1e3, "added_p99_ms": (pct(p1, .99) - pct(d1, .99)) * 1e3}
    for engine, hdrs in (("engine", {}), ("instant", instant)):
        for kind, body in (("json", CHAT), ("sse", CHAT_STREAM)):
            res[f"{engine}_{kind}"] = await compare(direct, proxied, body, hdrs, args, sc.pid)
    if not args.no_floor:
        # the same fast-engine comparisons through a bare byte relay placed like the sidecar
        relay_port = free_port()
        relay = spawn([sys.executable, __file__, "--serve-relay", str(relay_port), str(up_port)], env, sc_cpus)
        try:
            wait_http(f"http://{HOST}:{relay_port}/health", relay)
            relayed = f"http://{HOST}:{relay_port}/v1/chat/completions"
            for kind, body in (("json", CHAT), ("sse", CHAT_STREAM)):
                res[f"floor_{kind}"] = await compare(direct, relayed, body, {}, args, relay.pid)
        finally:
            relay.terminate()
            relay.wait(10)

    async with aiohttp.ClientSession() as s, s.get(f"http://{HOST}:{admin_port}/metrics") as r:
        mt = await r.text()
    h50, h99, hn = hist_quantiles(mt, "perennial_sidecar_proxy_added_latency_seconds")
    res["sidecar_histogram"] = {"p50_le_ms": h50 * 1e3, "p99_le_ms": h99 * 1e3, "observations": hn}
    captured = [l for l in mt.splitlines() if l.startswith('perennial_sidecar_captured_records_total{kind="interaction"}')]
    res["captured_interactions"] = int(float(captured[0].rsplit(" ", 1)[1])) if captured else 0


async def shipped(spool: Path, timeout: float = 120.0) -> float:
    """Wait until the sidecar's shipper has taken every closed segment out of the spool (the one being written stays):
    a phase then pays for shipping its own records, not for a backlog an earlier phase left. Seconds waited (printed:
    0.0 s on the 2-core machine of 2026-11-30, the shipper keeps up with the batched phase's ~70,000 records/s, so
    the spread of the alternating rounds is not a shipping backlog)."""
    t0 = time.monotonic()
    while any(spool.rglob("*.jsonl")) and time.monotonic() - t0 < timeout:
        await asyncio.sleep(0.2)
    return time.monotonic() - t0


async def feedback_phases(res: dict, args: argparse.Namespace, sc: subprocess.Popen, sc_port: int, env: dict, sc_cpus: set[int] | None,
                          spool: Path) -> None:
    # durable feedback over HTTP: one record per request, then arrays of --batch records
    auth = {"Authorization": f"Bearer {TOKEN}"}
    one = {"response_id": "chatcmpl-bench", "type": "thumbs", "thumbs": "up"}
    for name, body, per in (("feedback_http", json.dumps(one).encode(), 1),
                            ("feedback_http_batch", json.dumps([{"response_id": f"chatcmpl-{i}", "type": "score", "score": i / args.batch} for i in range(args.batch)]).encode(), args.batch)):
        res.setdefault("shipping_waits_s", []).append(round(await shipped(spool), 1))
        c0 = cpu_seconds(sc.pid)
        fl, frps, fe = await load(f"http://{HOST}:{sc_port}/v1/feedback", body, args.clients, args.seconds, headers=auth)
        fcpu = (cpu_seconds(sc.pid) - c0) / max(1, len(fl) * per) * 1e6
        res[name] = {"records_per_request": per, "durable_records_per_s": frps * per, "requests_per_s": frps, "p50_ms": pct(fl, .5) * 1e3,
                     "p99_ms": pct(fl, .99) * 1e3, "errors": fe, "sidecar_cpu_us_per_record": fcpu}
    if not args.no_floor:
        hello_port = free_port()
        hello = spawn([sys.executable, __file__, "--serve-hello", str(hello_port)], env, sc_cpus)
        try:
            wait_http(f"http://{HOST}:{hello_port}/health", hello)
            hl, hrps, he = await load(f"http://{HOST}:{hello_port}/v1/feedback", json.dumps(one).encode(), args.clients, args.seconds)
            res["floor_feedback"] = {"requests_per_s": hrps, "p50_ms": pct(hl, .5) * 1e3, "errors": he}
            # side by side on a noisy machine: alternate rounds (sidecar feedback, empty endpoint), a ratio per round
            # and the CPU each process takes per request (less sensitive to what else the machine runs)
            ratios, cpu_ratios, rates = [], [], []
            res["shipping_waits_s"].append(round(await shipped(spool), 1))  # the batched phase's backlog
            for _ in range(args.rounds):
                c0 = cpu_seconds(sc.pid)
                fl_i, frps_i, _ = await load(f"http://{HOST}:{sc_port}/v1/feedback", json.dumps(one).encode(),
                                             args.clients, args.seconds, headers=auth)
                f_cpu = (cpu_seconds(sc.pid) - c0) / max(1, len(fl_i))
                c0 = cpu_seconds(hello.pid)
                hl_i, hrps_i, _ = await load(f"http://{HOST}:{hello_port}/v1/feedback", json.dumps(one).encode(), args.clients, args.seconds)
                h_cpu = (cpu_seconds(hello.pid) - c0) / max(1, len(hl_i))
                rates.append((round(frps_i), round(hrps_i)))
                ratios.append(round(frps_i / max(1.0, hrps_i), 3))
                cpu_ratios.append(round(h_cpu / f_cpu, 3) if f_cpu > 0 else float("nan"))
            res["feedback_vs_floor"] = {"round_ratios": ratios, "ratio": statistics.median(ratios), "round_rates": rates,
                                        "cpu_round_ratios": cpu_ratios, "cpu_ratio": statistics.median(cpu_ratios)}
        finally:
            hello.terminate()
            hello.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=3.0, help="per round and phase")
    p.add_argument("--rounds", type=int, default=3, help="alternating direct/sidecar rounds per comparison")
    p.add_argument("--ttft-ms", type=float, default=20.0, help="upstream time to first token")
    p.add_argument("--itl-ms", type=float, default=5.0, help="upstream time per further token (8 tokens per answer)")
    p.add_argument("--batch", type=int, default=100, help="feedback records per request in the batched phase")
    p.add_argument("--no-pin", action="store_true", help="do not pin: sidecar, upstream and load generator share every CPU")
    p.add_argument("--workers", type=int, default=1, help="sidecar worker processes (needs more CPUs than this to pin)")
    p.add_argument("--sidecar-cpus", type=int, default=0, help="CPUs pinned for the sidecar (default: --workers)")
    p.add_argument("--serve-upstream", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--serve-relay", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--serve-hello", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-floor", action="store_true", help="skip the floors: a byte relay and an empty aiohttp endpoint placed like the sidecar")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON")
    p.add_argument("--feedback-only", action="store_true", help="only the feedback phases (and the empty endpoint's floor): skip the proxy's")
    args = p.parse_args()
    if args.serve_relay:
        run_relay(*args.serve_relay)
        return
    if args.serve_hello:
        run_hello(args.serve_hello)
        return
    if args.serve_upstream:
        run_upstream(args.serve_upstream, args.ttft_ms / 1e3, args.itl_ms / 1e3)
        return
    args.seconds = max(0.5, min(args.seconds, 10.0))
    args.rounds = max(1, min(args.rounds, 9))
    t0 = time.time()
    r = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(r, indent=2))
    N = args.clients
    pl = r["placement"]
    print(f"cores={os.cpu_count()} clients={N} rounds={args.rounds}x{args.seconds}s sidecar workers={args.workers} total={time.time() - t0:.1f}s; "
          f"CPUs: load generator + upstream {pl['load_generator_and_upstream']}, sidecar {pl['sidecar']}")
    u = r.get("unloaded")
    if u:
        print(f"1 client, instant engine   : direct p50 {u['direct_p50_ms']:.3f} ms, sidecar p50 {u['sidecar_p50_ms']:.3f} ms -> added p50 {u['added_p50_ms']:.3f} ms, p99 {u['added_p99_ms']:.3f} ms   (target < 1 / < 5 ms)")
    for engine, label in () if args.feedback_only else (("engine", f"fast engine {args.ttft_ms:g}+7x{args.itl_ms:g} ms"), ("instant", "instant engine (CPU stress)")):
        for kind in ("json", "sse"):
            x = r[f"{engine}_{kind}"]
            target = "(target >= 0.9x, < 1 / < 5 ms)" if engine == "engine" else f"(1 sidecar core ~ {1e6 / max(1.0, x['sidecar_cpu_us_per_request']):.0f} req/s)"
            print(f"{N} clients {kind:4s} {label:28s}: direct {x['direct_rps']:.0f} req/s p50 {x['direct_p50_ms']:.2f} p99 {x['direct_p99_ms']:.2f} ms | sidecar {x['sidecar_rps']:.0f} req/s p50 {x['sidecar_p50_ms']:.2f} p99 {x['sidecar_p99_ms']:.2f} ms"
                  f" | added p50 {x['added_p50_ms']:.2f} p99 {x['added_p99_ms']:.2f} ms | throughput ratio {x['throughput_ratio']:.2f}x {x['round_ratios']} | errors {x['errors']} | sidecar CPU {x['sidecar_cpu_us_per_request']:.0f} us/request {target}")
    for kind in ("json", "sse") if "floor_json" in r else ():
        x = r[f"floor_{kind}"]
        print(f"{N} clients {kind:4s} {'byte relay, same engine':28s}: added p50 {x['added_p50_ms']:.2f} p99 {x['added_p99_ms']:.2f} ms | throughput ratio {x['throughput_ratio']:.2f}x {x['round_ratios']}"
              f" | relay CPU {x['sidecar_cpu_us_per_request']:.0f} us/request   (the floor for any proxy process placed like the sidecar here)")
    h = r.get("sidecar_histogram")
    if h:
        print(f"sidecar histogram          : time added in the sidecar p50 <= {h['p50_le_ms']:.2f} ms, p99 <= {h['p99_le_ms']:.2f} ms over {h['observations']} requests; captured interactions {r['captured_interactions']}")
    for name in ("feedback_http", "feedback_http_batch"):
        f = r[name]
        print(f"feedback, {f['records_per_request']:3d} per request  : {f['durable_records_per_s']:.0f} durable records/s ({f['requests_per_s']:.0f} requests/s, fsync before 200), p50 {f['p50_ms']:.2f} ms p99 {f['p99_ms']:.2f} ms, errors {f['errors']}, sidecar CPU {f['sidecar_cpu_us_per_record']:.0f} us/record   (target >= 10,000 records/s)")
    if "floor_feedback" in r:
        f = r["floor_feedback"]
        print(f"aiohttp endpoint, no work  : {f['requests_per_s']:.0f} requests/s, p50 {f['p50_ms']:.2f} ms   (the ceiling for one record per request in one process here)")
        v = r["feedback_vs_floor"]
        print(f"feedback vs empty endpoint : 1 record per request / empty aiohttp endpoint, alternating rounds: {v['ratio']:.2f}x {v['round_ratios']}   (target >= 0.8x)")
        print(f"  the same by CPU          : empty endpoint's CPU per request / the sidecar's, same rounds: {v['cpu_ratio']:.2f}x {v['cpu_round_ratios']}")
        print(f"  requests/s per round     : (sidecar feedback, empty endpoint) {v['round_rates']}; waited for the shipper to empty the spool "
              f"before each phase: {r.get('shipping_waits_s')} s (a phase pays for shipping its own records, not an earlier phase's)")
    if "floor_json" in r:
        for kind in ("json", "sse"):
            x, fl = r[f"engine_{kind}"], r[f"floor_{kind}"]
            print(f"{N} clients {kind:4s} sidecar vs byte relay    : {x['throughput_ratio'] / max(1e-9, fl['throughput_ratio']):.2f}x of the relay's throughput ratio   (target >= 0.91x, i.e. within 1.1x of the floor)")
    s = r["feedback_spool"]
    print(f"feedback at the spool      : {s['durable_records_per_s']:.0f} durable records/s with {N} concurrent writers, {s['fsyncs']} fsyncs (group commit)")
    print(f"store                      : {r['stored_records_after_shutdown']} records shipped after SIGTERM")


if __name__ == "__main__":
    main()
