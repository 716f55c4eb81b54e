"""CPU engine: an OpenAI-compatible server on Transformers + PEFT.

One base model, several LoRA adapters, each addressed by its served model name
(vLLM's `--lora-modules name=path`). Generation runs off the event loop on one
worker thread; adapters are switched under a lock. Routes mirror vLLM:
`/v1/models`, `/v1/chat/completions`, `/v1/completions` (SSE with `data: [DONE]`),
`/health`, `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web
from pydantic_core import from_json

from .errors import json_error

log = logging.getLogger("perennial_server.engine")

MAX_TOKENS_LIMIT = 4096


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


@dataclass
class GenParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


def _num(body: dict, key: str, default: Any, lo: float, hi: float, integer: bool = False) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise RequestError(400, f"`{key}` must be {'an integer' if integer else 'a number'}", "invalid_value", key)
    if isinstance(v, float) and not math.isfinite(v):
        raise RequestError(400, f"`{key}` must be finite", "invalid_value", key)
    if not lo <= v <= hi:
        raise RequestError(400, f"`{key}` must be within {lo}..{hi}", "invalid_value", key)
    return v


def _text(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise RequestError(400, f"`{what}` must be a string", "invalid_value", what)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, f"`{what}` must be valid Unicode", "invalid_value", what) from None
    return v


def parse_params(body: dict, max_model_len: int) -> GenParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    p = GenParams()
    p.max_tokens = _num({"max_tokens": max_tokens}, "max_tokens", 16, 1, min(MAX_TOKENS_LIMIT, max_model_len), integer=True)
    p.temperature = float(_num(body, "temperature", 1.0, 0.0, 2.0))
    p.top_p = float(_num(body, "top_p", 1.0, 0.0, 1.0))
    if p.top_p == 0.0:
        raise RequestError(400, "`top_p` must be greater than 0", "invalid_value", "top_p")
    seed = body.get("seed")
    if seed is not None:
        p.seed = _num(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        p.stop = []
    elif isinstance(stop, str):
        p.stop = [_text(stop, "stop")] if stop else []
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        p.stop = [_text(s, "stop") for s in stop if s]
    else:
        raise RequestError(400, "`stop` must be a string or a list of at most 4 strings", "invalid_value", "stop")
    n = body.get("n", 1)
    if n not in (1, None) or isinstance(n, bool):
        raise RequestError(400, "`n` must be 1 on this engine", "invalid_value", "n")
    return p


class Engine:
    """The model, its adapters, and one generation worker thread."""

    def __init__(self, model_path: str, served_model_name: str | None = None, adapters: list[tuple[str, str]] | None = None,
                 max_model_len: int | None = None, dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.model_path = model_path
        self.name = served_model_name or model_path.rstrip("/").rsplit("/", 1)[-1]
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.base = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.base.eval()
        self.model: Any = self.base  # becomes a PeftModel once an adapter is loaded
        self.adapters: dict[str, str] = {}
        cfg_len = getattr(self.base.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len or cfg_len, cfg_len)
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        eos = self.tokenizer.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        gen_eos = getattr(getattr(self.base, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            self.eos_ids.add(gen_eos)
        elif isinstance(gen_eos, list):
            self.eos_ids.update(gen_eos)
        import inspect

        self._cache_kw = "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"
        self.alive = True
        for name, path in adapters or []:
            self._load(name, path)

    # ------------------------------------------------------------ adapters
    def _load(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self._lock:
            if name in self.adapters or name == self.name:
                raise RequestError(400, f"the adapter `{name}` is already loaded", "adapter_exists")
            try:
                if self.model is self.base:
                    self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name)
                else:
                    self.model.load_adapter(path, adapter_name=name)
            except (OSError, ValueError) as e:
                raise RequestError(400, f"could not load adapter `{name}` from `{path}`: {e}"[:500], "adapter_load_failed") from e
            self.model.eval()
            self.adapters[name] = path
            log.info("Loaded adapter name=%s path=%s", name, path)

    def _unload(self, name: str) -> None:
        with self._lock:
            if name not in self.adapters:
                raise RequestError(404, f"the adapter `{name}` is not loaded", "adapter_not_found")
            if len(self.adapters) == 1:
                self.model = self.model.unload()  # drops the LoRA layers, back to the bare base
                self.base = self.model
            else:
                self.model.delete_adapter(name)
            del self.adapters[name]
            log.info("Unloaded adapter name=%s", name)

    async def load_adapter(self, name: str, path: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._load, name, path)

    async def unload_adapter(self, name: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._unload, name)

    def models(self) -> list[dict]:
        out = [{"id": self.name, "object": "model", "created": self.created, "owned_by": "perennial", "root": self.model_path, "parent": None, "max_model_len": self.max_model_len}]
        for n, p in self.adapters.items():
            out.append({"id": n, "object": "model", "created": self.created, "owned_by": "perennial", "root": p, "parent": self.name})
        return out

    def resolve(self, model: Any) -> str | None:
        """Adapter name for a served model name (None = base); 404 if unknown."""
        if not isinstance(model, str) or not model:
            raise RequestError(400, "`model` must be a non-empty string", "invalid_value", "model")
        if model == self.name:
            return None
        if model in self.adapters:
            return model
        raise RequestError(404, f"The model `{model}` does not exist.", "model_not_found", "model")

    # ------------------------------------------------------------ prompts
    def chat_prompt(self, messages: Any) -> str:
        if not isinstance(messages, list) or not messages or len(messages) > 1024:
            raise RequestError(400, "`messages` must be a non-empty list", "invalid_value", "messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
                raise RequestError(400, f"`messages[{i}]` must be an object with a valid `role`", "invalid_value", "messages")
            c = m.get("content")
            if isinstance(c, list):
                texts = []
                for part in c:
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise RequestError(400, f"`messages[{i}].content` parts must be text parts", "invalid_value", "messages")
                    texts.append(part["text"])
                c = "".join(texts)
            elif c is None:
                c = ""
            role = "system" if m["role"] == "developer" else m["role"]
            clean.append({"role": role, "content": _text(c, f"messages[{i}].content")})
        try:
            return self.tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # template errors (e.g. role order) are the client's
            raise RequestError(400, f"messages do not fit the chat template: {e}"[:300], "invalid_messages", "messages") from None

    def encode(self, prompt: str, params: GenParams) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else next(iter(self.eos_ids), 0)
            ids = [bos]
        if len(ids) + params.max_tokens > self.max_model_len:
            raise RequestError(400, f"This model's maximum context length is {self.max_model_len} tokens; the prompt has {len(ids)} and `max_tokens` is {params.max_tokens}.", "context_length_exceeded")
        return ids

    # ------------------------------------------------------------ generation (worker thread)
    def _generate(self, ids: list[int], adapter: str | None, p: GenParams, emit: Callable[[str], None] | None, cancelled: threading.Event) -> tuple[str, str, int]:
        torch = self.torch
        with self._lock, torch.inference_mode():
            model = self.model
            ctx = None
            if adapter is not None:
                model.set_adapter(adapter)
            elif model is not self.base:
                ctx = model.disable_adapter()
                ctx.__enter__()
            try:
                gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
                input_ids = torch.tensor([ids])
                past = None
                out_ids: list[int] = []
                text = ""
                sent = 0
                finish = "length"
                hold = max((len(s) for s in p.stop), default=1) - 1
                for _ in range(p.max_tokens):
                    if cancelled.is_set():
                        finish = "abort"
                        break
                    out = model(input_ids=input_ids, use_cache=True, **{self._cache_kw: past})
                    past = getattr(out, self._cache_kw, None)
                    logits = out.logits[0, -1].float()
                    nxt = self._sample(logits, p, gen)
                    if nxt in self.eos_ids:
                        finish = "stop"
                        break
                    out_ids.append(nxt)
                    text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                    cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
                    if cut >= 0:
                        text = text[:cut]
                        finish = "stop"
                        break
                    if emit is not None:
                        safe = len(text) - hold
                        if text.endswith("\ufffd"):
                            safe = min(safe, len(text) - 1)
                        if safe > sent:
                            emit(text[sent:safe])
                            sent = safe
                    input_ids = torch.tensor([[nxt]])
                if emit is not None and len(text) > sent:
                    emit(text[sent:])
                return text, finish, len(out_ids)
            finally:
                if ctx is not None:
                    ctx.__exit__(None, None, None)

    def _sample(self, logits: Any, p: GenParams, gen: Any) -> int:
        torch = self.torch
        if p.temperature <= 1e-5:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            cum = torch.cumsum(sp, dim=-1)
            keep = cum - sp < p.top_p
            keep[0] = True
            sp = sp * keep
            idx = torch.multinomial(sp / sp.sum(), 1, generator=gen)
            return int(si[idx])
        return int(torch.multinomial(probs, 1, generator=gen))

    async def generate(self, ids: list[int], adapter: str | None, p: GenParams) -> tuple[str, str, int]:
        cancelled = threading.Event()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._generate, ids, adapter, p, None, cancelled)
        finally:
            cancelled.set()

    async def stream(self, ids: list[int], adapter: str | None, p: GenParams):
        """Async iterator of text deltas; the last item is ("", finish, n_tokens)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(delta: str) -> None:
            loop.call_soon_threadsafe(q.put_nowait, ("delta", delta))

        fut = loop.run_in_executor(self._pool, self._generate, ids, adapter, p, emit, cancelled)
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(q.put_nowait, ("done", None)) if not loop.is_closed() else None)
        try:
            while True:
                kind, val = await q.get()
                if kind == "delta":
                    yield val
                else:
                    break
            text, finish, n = fut.result()
            yield ("", finish, n)
        finally:
            cancelled.set()

    def shutdown(self) -> None:
        self.alive = False
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- HTTP
class EngineServer:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/load_lora_adapter", self.load_lora)
        app.router.add_post("/v1/unload_lora_adapter", self.unload_lora)
        app.middlewares.append(self._errors)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except RequestError as e:
            return json_error(e.status, e.message, e.code, param=e.param)
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, "request body is too large", "body_too_large")
        except web.HTTPException as e:
            if e.status >= 400:
                return json_error(e.status, e.reason, "http_error")
            raise

    async def _json(self, request: web.Request) -> dict:
        try:
            # pydantic-core's parser bounds nesting (a ValueError); json.loads would recurse until a
            # RecursionError, a 500 with a traceback
            body = from_json(await request.read())
        except ValueError:
            raise RequestError(400, "request body must be a JSON object", "invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object", "invalid_json")
        return body

    async def health(self, request: web.Request) -> web.Response:
        if not self.engine.alive:
            return json_error(503, "engine is dead", "engine_dead")
        return web.json_response({"status": "ok"})

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self.engine.models()})

    async def load_lora(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise RequestError(400, "`lora_name` and `lora_path` must be non-empty strings", "invalid_value")
        await self.engine.load_adapter(name, path)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise RequestError(400, "`lora_name` must be a non-empty string", "invalid_value")
        await self.engine.unload_adapter(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        adapter = self.engine.resolve(body.get("model"))
        params = parse_params(body, self.engine.max_model_len)
        prompt = self.engine.chat_prompt(body.get("messages"))
        return await self._complete(request, body, adapter, params, prompt, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        adapter = self.engine.resolve(body.get("model"))
        params = parse_params(body, self.engine.max_model_len)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        prompt = _text(prompt, "prompt")
        return await self._complete(request, body, adapter, params, prompt, chat=False)

    async def _complete(self, request: web.Request, body: dict, adapter: str | None, params: GenParams, prompt: str, chat: bool) -> web.StreamResponse:
        ids = self.engine.encode(prompt, params)
        model = body["model"]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        stream = body.get("stream") is True
        if not stream:
            text, finish, n = await self.engine.generate(ids, adapter, params)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
                      if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
            return web.json_response({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                                      "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}})
        so = body.get("stream_options")
        include_usage = isinstance(so, dict) and so.get("include_usage") is True
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        cobj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> bytes:
            if chat:
                d: dict = {}
                if role:
                    d["role"] = "assistant"
                if delta is not None:
                    d["content"] = delta
                ch = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                ch = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            ev = {"id": rid, "object": cobj, "created": created, "model": model, "choices": [ch]}
            if include_usage:
                ev["usage"] = None
            return b"data: " + json.dumps(ev).encode() + b"\n\n"

        if chat:
            await resp.write(chunk("", None, role=True))
        async for item in self.engine.stream(ids, adapter, params):
            if isinstance(item, tuple):
                _, finish, n = item
                await resp.write(chunk(None if chat else "", finish))
                if include_usage:
                    u = {"id": rid, "object": cobj, "created": created, "model": model, "choices": [],
                         "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}}
                    await resp.write(b"data: " + json.dumps(u).encode() + b"\n\n")
            else:
                await resp.write(chunk(item, None))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def parse_lora_modules(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for it in items:
        it = it.strip()
        if it.startswith("{"):
            j = json.loads(it)
            out.append((j["name"], j["path"]))
            continue
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise argparse.ArgumentTypeError(f"`--lora-modules` entries must be name=path, got {it!r}")
        out.append((name, path))
    return out


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model directory (save_pretrained layout)")
    p.add_argument("--served-model-name", default=None, help="name the base model is served under")
    p.add_argument("--lora-modules", nargs="*", default=[], help="adapters as name=path (or JSON {name, path})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")


def main(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    engine = Engine(args.model, args.served_model_name, parse_lora_modules(args.lora_modules), args.max_model_len, args.dtype)
    app = EngineServer(engine).make_app()
    app.on_cleanup.append(lambda _a: asyncio.sleep(0, engine.shutdown()))
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, shutdown_timeout=10)
    return 0
