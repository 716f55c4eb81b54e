"""Served name -> adapter routing, owned by the sidecar (`--routes-file`).

The operator writes a routes document into a ConfigMap mounted at `/etc/perennial/routes/routes.json`
(see the deployment contract):

    {"revision": "<sha>", "base": {"name": "<served base name>"},
     "adapters": {"<adapter>": {"uri": "<artifact URI or local path>", "rank": 8}},
     "routes": {"<served name>": [{"adapter": "<adapter>", "weight": 100}, ...]}}

The sidecar polls the file by path once a second (kubelet updates a ConfigMap volume by swapping its
`..data` symlink: nothing here keeps a file descriptor), and for each new document:

1. fetches every adapter whose `uri` is not a local path with fsspec into `<adapters-dir>/<adapter>`
   (into a temporary folder renamed into place; size bounded; names that could leave the folder refused),
2. loads every adapter the engine does not have through `POST /v1/load_lora_adapter` (vLLM's API,
   also the CPU engine's),
3. only when every adapter of the document is loaded, swaps the routing table in one assignment
   (a document with any failure is not applied: the previous routes stay in force, the failures are
   reported at `GET /perennial/routes` and retried),
4. unloads (`/v1/unload_lora_adapter`) the engine's adapters that neither the applied nor the pending
   document lists, each once no request routed to it is still in flight, and removes what it fetched.

With `--routes-file` the sidecar owns the engine's adapters: anything the engine has that the document
does not list is unloaded (don't combine it with the engine's `--lora-modules`), and clients cannot
call the engine's load/unload endpoints through the sidecar (403).

Requests (the proxy's hot path: one dict lookup per request, no file access): a `model` that is a
served name becomes one of its adapters (weighted random choice: a canary); the base name passes
through; any other name is a 404 `model_not_found` that never reaches the engine (an adapter's own name
is not addressable). The answer's `model` says the served name again. `GET /v1/models` lists the base
and the served names (what a client may ask for), not the adapters.

Preview names (a served name ending in `-preview`: the operator loads the next adapter under `<served>-preview`
and smoke-tests it before moving `<served>` to it) answer only requests with `Authorization: Bearer <feedback
token>` (the token file of /v1/feedback, which the operator reads from the token Secret) or `X-Perennial-Token: <feedback
token>` (what passes another cluster's API server proxy); any other request naming one is a 401
`preview_unauthorized`, and `GET /v1/models` lists them only to that token. The token is not forwarded to the
engine.

The engine's adapters are those of its `/v1/models` entries with a `parent` (vLLM and the CPU engine
list LoRA adapters that way). The sidecar re-checks them every `resync_s` and reloads what an engine
restart lost.

Several workers (`--workers N`): worker 0 fetches, loads and unloads; the others apply a document once
the engine has all its adapters. Each worker writes what it applied and which adapters it has requests
in flight on to `<its spool dir>/routes-state.json`; worker 0 unloads an adapter only once every worker
has applied the same revision and none has a request in flight on it.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import inspect
import json
import logging
import os
import posixpath
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic
from pydantic import ConfigDict, Field
from pydantic_core import from_json, to_json

from .errors import json_error

if TYPE_CHECKING:
    from collections.abc import Mapping

    from aiohttp import web

    from .middleware import TokenFile
    from .upstream import UpstreamPool

log = logging.getLogger("perennial_server.routes")

# adapter names are Kubernetes object names (DNS-1123 subdomains) and become folder names
ADAPTER_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
# served names: what clients send as `model`; JSON-safe without escaping (the proxy renames by bytes)
SERVED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}")
DOCUMENT_KEY = "(document)"  # key of document-level errors in `errors` (no adapter can be named so)
ENGINE_KEY = "(engine)"
MANAGED_PATHS = frozenset(("/v1/load_lora_adapter", "/v1/unload_lora_adapter"))
MAX_DOCUMENT_BYTES = 1 << 20
#: served names ending so are previews: only the operator's token may call them (the operator's PREVIEW_SUFFIX)
PREVIEW_SUFFIX = "-preview"
PREVIEW_UNAUTHORIZED = "preview names need the operator's token (`Authorization: Bearer <feedback token>`)"
#: the header the operator's token may come in instead (never forwarded to the engine: proxy.HOP_BY_HOP)
TOKEN_HEADER = "X-Perennial-Token"
SOURCE_MARKER = ".perennial-source"


# never an adapter's folder, whatever the roots say: the system's and the sidecar's own (Routes.denied adds these)
DENIED_DIRS = ("/proc", "/sys", "/dev", "/etc", "/run", "/var/run", "/boot", "/root")
MAX_LOCAL_ENTRIES = 1000


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root if root == "/" else root + "/")


def check_local_adapter(name: str, path: str, roots: Sequence[str], denied: Sequence[str]) -> str:
    """`path` when a local adapter folder may be loaded from it, else ValueError: absolute, no `.`/`..` parts,
    under one of `roots` both as written and once its symlinks are resolved, not under `denied` (either way),
    and no symlink inside it resolving elsewhere or to a denied file (at most MAX_LOCAL_ENTRIES entries looked at)."""
    where = f"adapter `{name}`: the local path {path!r}"
    if not os.path.isabs(path) or any(p in (".", "..") for p in path.split("/")):
        raise ValueError(f"{where} must be absolute, without `.` or `..`")
    norm = os.path.normpath(path)
    real = os.path.realpath(norm)
    real_roots = [(os.path.normpath(r), os.path.realpath(r)) for r in roots]
    real_denied = {os.path.normpath(d) for d in denied} | {os.path.realpath(d) for d in denied}
    def allowed(p: str) -> bool:
        return not any(_under(p, d) for d in real_denied) and any(_under(p, rr) for _, rr in real_roots)
    if not any(_under(norm, r) for r, _ in real_roots):
        raise ValueError(f"{where} must be under {', '.join(roots)}")
    if any(_under(norm, d) or _under(real, d) for d in real_denied):
        raise ValueError(f"{where} must not be a system folder or the sidecar's own (its token, its spool)")
    if not allowed(real):
        raise ValueError(f"{where} must not lead out of {', '.join(roots)} through a symlink")
    seen = 0
    for dirpath, dirs, files in os.walk(real):  # symlinked folders are not followed: each is checked as an entry
        for entry in (*dirs, *files):
            seen += 1
            if seen > MAX_LOCAL_ENTRIES:
                raise ValueError(f"{where} must not hold more than {MAX_LOCAL_ENTRIES} files and folders")
            full = os.path.join(dirpath, entry)
            if os.path.islink(full) and not allowed(os.path.realpath(full)):
                raise ValueError(f"{where} must not hold a symlink leading out of {', '.join(roots)} ({entry!r})")
    return norm


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"adapter name {name!r} must be a lowercase DNS-1123 subdomain (a-z, 0-9, '-', '.'; no '..')")
    return name


# fsspec protocols an adapter may be fetched with: the artifact stores the operator writes (s3://, gs://;
# pvc:// and file:// reach the sidecar as absolute paths) and the in-process memory store. Any other one
# is refused before anything is read: file:// would copy the sidecar's own files (its feedback token, the
# spool) where the engine reads; http(s)/ftp/ssh/dask reach the network (the cloud metadata service);
# chained URLs (`simplecache::`, `zip::`) and `reference://` wrap any of those.
FETCH_PROTOCOLS = frozenset(("s3", "gs", "gcs", "memory"))


def is_local(uri: str) -> bool:
    return "://" not in uri and "::" not in uri


def check_fetch_uri(uri: str) -> str:
    """ValueError unless `uri` is `<protocol>://...` with a protocol of FETCH_PROTOCOLS, unchained."""
    proto = uri.split("://", 1)[0] if "://" in uri else ""
    if "::" in uri or proto not in FETCH_PROTOCOLS:
        raise ValueError(f"an adapter `uri` must be an absolute path or use the protocol {', '.join(sorted(FETCH_PROTOCOLS))}"
                         " (no chained `::` URL)")
    return uri


# ---------------------------------------------------------------- the document
class _Model(pydantic.BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)  # fields added by a newer operator are ignored


class AdapterSource(_Model):
    uri: str = Field(min_length=1, max_length=4096)
    rank: int | None = Field(default=None, ge=1, le=1024)

    @pydantic.field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if is_local(v):
            if not os.path.isabs(v):
                raise ValueError("a local adapter `uri` must be an absolute path")
            return v
        return check_fetch_uri(v)


class RouteEntry(_Model):
    adapter: str
    weight: int = Field(default=100, ge=0, le=1_000_000)


class BaseModelName(_Model):
    name: str = Field(min_length=1, max_length=256)


class RoutesDocument(_Model):
    revision: str = Field(min_length=1, max_length=128)
    base: BaseModelName | None = None
    adapters: dict[str, AdapterSource] = Field(default_factory=dict, max_length=256)
    routes: dict[str, list[RouteEntry]] = Field(default_factory=dict, max_length=1024)

    @pydantic.model_validator(mode="after")
    def _check(self) -> RoutesDocument:
        for name in self.adapters:
            check_adapter_name(name)
        base = self.base.name if self.base else None
        for served, entries in self.routes.items():
            if not SERVED_NAME.fullmatch(served):
                raise ValueError(f"served name {served!r} must match {SERVED_NAME.pattern}")
            if served == base:
                raise ValueError(f"served name {served!r} must differ from the base model's name")
            if not 1 <= len(entries) <= 16:
                raise ValueError(f"route `{served}` must have 1 to 16 entries")
            for e in entries:
                if e.adapter not in self.adapters:
                    raise ValueError(f"route `{served}` names adapter {e.adapter!r}, which must be listed in `adapters`")
            if sum(e.weight for e in entries) <= 0:
                raise ValueError(f"route `{served}` must have a positive total weight")
        return self


def parse_document(data: bytes) -> RoutesDocument:
    """ValueError with a one-line message when the document is not valid."""
    try:
        return RoutesDocument.model_validate_json(data)
    except pydantic.ValidationError as e:
        errs = e.errors(include_url=False)
        parts = []
        for err in errs[:3]:
            loc = ".".join(str(x) for x in err["loc"])
            parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
        raise ValueError("the routes document is not valid: " + "; ".join(parts)) from None


def is_preview(served: str) -> bool:
    return served.endswith(PREVIEW_SUFFIX)


class Route:
    """One served name's adapters and weights; `pick` chooses one (weight 0: never). `preview`: callable with the
    operator's token only."""

    __slots__ = ("adapters", "cum", "preview", "total")

    def __init__(self, entries: Sequence[tuple[str, int]], preview: bool = False) -> None:
        self.preview = preview
        live = [(a, w) for a, w in entries if w > 0]
        if not live:
            raise ValueError("a route needs a positive weight")
        self.adapters = tuple(a for a, _ in live)
        cum, t = [], 0
        for _, w in live:
            t += w
            cum.append(t)
        self.cum = cum
        self.total = t

    def pick(self, rng: random.Random) -> str:
        if len(self.adapters) == 1:
            return self.adapters[0]
        return self.adapters[bisect.bisect_right(self.cum, rng.random() * self.total)]


# ---------------------------------------------------------------- fetching
def _relative(base: str, path: str) -> str:
    """`path`'s part below `base` (posix); ValueError when it is not below it."""
    base = base.rstrip("/")
    if not path.startswith(base + "/"):
        raise ValueError(f"listed file {path!r} is outside the adapter's folder {base!r}")
    rel = path[len(base) + 1:]
    norm = posixpath.normpath(rel)
    if not rel or norm != rel or norm == ".." or norm.startswith(("../", "/")):
        raise ValueError(f"listed file {path!r} is outside the adapter's folder {base!r}")
    return rel


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FetchTimeout(ValueError):
    """An adapter fetch ran past its deadline."""


def _remaining(deadline: float, name: str, timeout_s: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchTimeout(f"adapter `{name}`: fetching it took longer than adapter_fetch_timeout_s={timeout_s:g}")
    return left


def list_files(fs: Any, path: str, *, max_files: int, deadline: float, name: str = "", timeout_s: float = 0.0) -> dict[str, int]:
    """{file path: size} of the files below `path`, the listing stopped once it passed `max_files` entries
    (ValueError then): a prefix holding millions of objects never sits in memory, whatever the store.

    s3fs: one paginated `list_objects_v2` with MaxItems (`S3FileSystem._iterdir(max_items=)`); gcsfs: `maxResults`
    pages up to the limit (`GCSFileSystem._do_list_objects(max_results=)`); any other filesystem (the in-process
    memory store): `walk`, stopped between folders. Every call bounded by `deadline` (time.monotonic())."""
    from fsspec.asyn import sync

    limit = max_files + 1
    too_many = ValueError(f"adapter `{name}` has more than {max_files} files")
    out: dict[str, int] = {}

    def add(p: str, size: Any) -> None:
        if not p.endswith("/"):  # a folder marker object
            out[p] = int(size or 0)
        if len(out) >= limit:
            raise too_many

    iterdir = getattr(fs, "_iterdir", None)
    if iterdir is not None and "max_items" in inspect.signature(iterdir).parameters:  # s3fs
        bucket, key, *_ = fs.split_path(path)
        prefix = key.rstrip("/") + "/" if key else ""

        async def s3_list() -> list[tuple[str, Any]]:
            got = []
            async for c in iterdir(bucket, max_items=limit, delimiter="", prefix=prefix):
                got.append((c["name"], c.get("size")))
                if len(got) >= limit:
                    break
            return got

        for p, size in sync(fs.loop, s3_list, timeout=_remaining(deadline, name, timeout_s)):
            add(p, size)
        return out
    if hasattr(fs, "_do_list_objects"):  # gcsfs
        items, _ = sync(fs.loop, fs._do_list_objects, path.rstrip("/"), max_results=limit, delimiter="",
                        timeout=_remaining(deadline, name, timeout_s))
        for item in items[:limit]:
            add(item["name"], item.get("size"))
        return out
    for _root, _dirs, files in fs.walk(path, detail=True):
        _remaining(deadline, name, timeout_s)
        for p, info in files.items():
            add(info.get("name") or p, info.get("size"))
    return out


def fetch_adapter(name: str, uri: str, root: Path, *, max_bytes: int, max_files: int = 1000, chunk: int = 1 << 20,
                  timeout_s: float = 600.0) -> str:
    """Copy the adapter folder at `uri` (any fsspec URL) to `root/<name>`; returns that path.

    Atomic: files go into a temporary folder next to it, fsync'd, renamed into place. A folder
    already fetched from the same URI is reused. ValueError for a bad name, a listing that climbs
    out, too many files (the listing stops there: list_files) or bytes (counted while copying, not
    trusted from the listing), and FetchTimeout once `timeout_s` have passed (checked around every
    listing and between chunks: a store that stops answering is also bounded by the caller)."""
    import fsspec

    deadline = time.monotonic() + timeout_s

    check_adapter_name(name)
    check_fetch_uri(uri)
    root = Path(root)
    dest = root / name
    if dest.resolve().parent != root.resolve():
        raise ValueError(f"adapter name {name!r} must stay inside the adapters folder")
    marker = dest / SOURCE_MARKER
    try:
        if marker.read_text() == uri:
            return str(dest)
    except OSError:
        pass
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        listing = list_files(fs, path, max_files=max_files, deadline=deadline, name=name, timeout_s=timeout_s)
    except (TimeoutError, asyncio.TimeoutError):  # fsspec's FSTimeoutError is one
        raise FetchTimeout(f"adapter `{name}`: listing it took longer than adapter_fetch_timeout_s={timeout_s:g}") from None
    if not listing:
        raise ValueError(f"adapter `{name}`: no files at its uri")
    rels = {p: _relative(path, p) for p in listing}
    if sum(listing.values()) > max_bytes:
        raise ValueError(f"adapter `{name}` is larger than adapter_max_bytes={max_bytes}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        total = 0
        for p, rel in rels.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open(p, "rb") as src, open(target, "wb") as out:
                while True:
                    _remaining(deadline, name, timeout_s)
                    buf = src.read(chunk)
                    if not buf:
                        break
                    total += len(buf)
                    if total > max_bytes:
                        raise ValueError(f"adapter `{name}` is larger than adapter_max_bytes={max_bytes}")
                    out.write(buf)
                out.flush()
                os.fsync(out.fileno())
        (tmp / SOURCE_MARKER).write_text(uri)
        _fsync_dir(tmp)
        if dest.exists():
            old = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.old."))
            os.rename(dest, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, dest)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(dest)


# ---------------------------------------------------------------- the engine's adapter API
class EngineCallError(Exception):
    pass


class EngineAdapters:
    """`/v1/models`, `/v1/load_lora_adapter`, `/v1/unload_lora_adapter` on the engine."""

    def __init__(self, pool: UpstreamPool, prefix: str = "") -> None:
        self.pool = pool
        self.prefix = prefix

    async def _call(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        from .upstream import UpstreamError

        data = json.dumps(body).encode() if body is not None else None
        try:
            r = await self.pool.request(method, self.prefix + path, [("Content-Type", "application/json")] if data else [], data)
            try:
                return r.status, await r.read()
            finally:
                r.release()
        except (UpstreamError, OSError) as e:
            raise EngineCallError(f"the engine is unavailable: {e}") from None

    @staticmethod
    def _message(status: int, raw: bytes) -> str:
        try:
            j = from_json(raw)
            msg = j["error"]["message"] if isinstance(j, dict) and isinstance(j.get("error"), dict) else (j.get("message") if isinstance(j, dict) else None)
        except (ValueError, KeyError, TypeError):
            msg = None
        return f"the engine answered {status}: {msg or raw[:300].decode('utf-8', 'replace')}"[:500]

    async def loaded(self) -> set[str]:
        status, raw = await self._call("GET", "/v1/models")
        if status != 200:
            raise EngineCallError(self._message(status, raw))
        try:
            data = from_json(raw)["data"]
            return {m["id"] for m in data if isinstance(m, dict) and m.get("parent") and isinstance(m.get("id"), str)}
        except (ValueError, KeyError, TypeError):
            raise EngineCallError("the engine's /v1/models answer is not a model list") from None

    async def load(self, name: str, path: str) -> None:
        status, raw = await self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if status != 200:
            raise EngineCallError(self._message(status, raw))

    async def unload(self, name: str) -> None:
        status, raw = await self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if status == 404:
            return  # already gone
        if status != 200:
            raise EngineCallError(self._message(status, raw))


# ---------------------------------------------------------------- the response's `model`
_KEY = b'"model"'


@functools.lru_cache(maxsize=4096)
def _patterns(adapter: str, served: str) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    a, s = json.dumps(adapter).encode(), json.dumps(served).encode()
    return (_KEY + b":" + a, _KEY + b":" + s), (_KEY + b": " + a, _KEY + b": " + s)


class Renamer:
    """Rewrites `"model": "<adapter>"` to the served name in response bytes, chunk by chunk (a
    pattern cut between two chunks is held back until the next one). Names never need JSON
    escaping (see ADAPTER_NAME/SERVED_NAME), so a match is always a key and its value: inside a
    JSON string every quote is escaped."""

    __slots__ = ("carry", "compact", "spaced")

    def __init__(self, adapter: str, served: str) -> None:
        self.compact, self.spaced = _patterns(adapter, served)
        self.carry = b""

    def feed(self, data: bytes) -> bytes:
        buf = self.carry + data if self.carry else (data if type(data) is bytes else bytes(data))
        c, sp = self.compact[0], self.spaced[0]
        if c in buf:
            buf = buf.replace(c, self.compact[1])
        if sp in buf:
            buf = buf.replace(sp, self.spaced[1])
        self.carry = b""
        if buf[-1:] in (b"\n", b"}", b"]", b""):  # an SSE event's or a JSON body's end: nothing cut
            return buf
        n = len(buf)
        # a tail that is a proper prefix of a pattern: at least `"model"` (7 bytes) ...
        i = buf.rfind(_KEY, max(0, n - len(sp) + 1))
        if i != -1 and (c.startswith(tail := buf[i:]) or sp.startswith(tail)):
            self.carry = tail
            return buf[:i]
        # ... or shorter, a prefix of `"model"`
        i = buf.rfind(b'"', max(0, n - len(_KEY) + 1))
        if i != -1 and _KEY.startswith(tail := buf[i:]):
            self.carry = tail
            return buf[:i]
        return buf

    def flush(self) -> bytes:
        c, self.carry = self.carry, b""
        return c

    def whole(self, data: bytes) -> bytes:
        return self.feed(data) + self.flush()


class Routed:
    """One request's route: the body to send, the served name, the adapter (None: the base); `preview`: the
    request carried the operator's token (not to be forwarded)."""

    __slots__ = ("adapter", "body", "preview", "renamer", "served")

    def __init__(self, body: bytes, served: str, adapter: str | None, preview: bool = False) -> None:
        self.body = body
        self.served = served
        self.adapter = adapter
        self.preview = preview
        self.renamer = Renamer(adapter, served) if adapter is not None and adapter != served else None


# a JSON object key that decodes to `model`: each letter literal or a \\u escape (no other escape spells a letter)
_MODEL_KEY = re.compile(rb'"(?:m|\\u006[dD])(?:o|\\u006[fF])(?:d|\\u0064)(?:e|\\u0065)(?:l|\\u006[cC])"[ \t\n\r]*:')


class _RepeatsModel(dict):
    """An object of a request body that has the key `model` more than once."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    n = 0
    for k, _ in pairs:
        if k == "model":
            n += 1
    return _RepeatsModel(pairs) if n > 1 else dict(pairs)


def _repeats_model(body: bytes) -> bool:
    """Whether the body's top-level object has the key `model` twice or more (however its keys are escaped).
    Which duplicate a parser keeps is its own choice (json.loads and pydantic-core keep the last, others the
    first): routing must not depend on it. Called only for a body with two `"model"` or a `\\u006` escape;
    a body with fewer than two keys spelling `model` anywhere is cleared by one regex scan, the rest (nested
    `model` keys) parsed once more with json.loads, whose object_pairs_hook sees every key."""
    if len(_MODEL_KEY.findall(body)) < 2:
        return False
    try:
        return isinstance(json.loads(body, object_pairs_hook=_pairs), _RepeatsModel)
    except (ValueError, RecursionError):
        return True  # pydantic-core parsed it: refuse what the two parsers disagree on


def _with_model(body: bytes, req: dict, served: str, adapter: str, keys: int | None = None, escaped: bool | None = None) -> bytes:
    """`body` with its top-level `model` (== served) set to `adapter`. The bytes are spliced when the
    served name appears exactly once, quoted, right after the only `"model":` key, and the body has no
    escapes a served name could be written with (`\\u`, `\\/`): then the top-level value is written
    literally, so that one occurrence is it. Else the parsed body is re-serialized. `keys`, `escaped`:
    body.count(b'"model"') and whether the body has a backslash, when the caller knows them."""
    q = b'"' + served.encode() + b'"'
    if keys is None:
        keys = body.count(_KEY)
    if escaped is None:
        escaped = b"\\" in body
    if keys == 1 and body.count(q) == 1 and (not escaped or (b"\\u" not in body and b"\\/" not in body)):
        i = body.find(q)
        head = body[max(0, i - 24):i].rstrip()
        if head.endswith(b":") and head[:-1].rstrip().endswith(_KEY):
            return body[:i] + b'"' + adapter.encode() + b'"' + body[i + len(q):]
    req["model"] = adapter
    return to_json(req)


# ---------------------------------------------------------------- the routes
class Routes:
    poll_s = 1.0  # the file is looked at this often
    retry_s = 2.0  # a document that failed is tried again after this long, doubling up to retry_max_s
    retry_max_s = 60.0
    resync_s = 15.0  # the engine's adapters are re-checked this often (an engine restart loses them)

    def __init__(self, path: str, *, base_name: str, adapters_dir: str, max_bytes: int, manage: bool = True,
                 state_file: str | None = None, peer_state_files: Sequence[str] = (), rng: random.Random | None = None,
                 token: TokenFile | None = None, local_roots: Sequence[str] | None = None, denied: Sequence[str] = (),
                 fetch_timeout_s: float = 600.0) -> None:
        self.path = path
        self.fetch_timeout_s = fetch_timeout_s
        self._fetches: dict[tuple[str, str], asyncio.Future[str]] = {}  # (adapter, uri) -> its fetch, until it ends
        # where local adapter paths may be (check_local_adapter); default: the adapters dir only
        self.local_roots = list(local_roots) if local_roots is not None else [adapters_dir]
        self.denied = [*DENIED_DIRS, *denied]
        self.token = token  # the operator's token: the only key to preview names (None: previews answer nobody)
        self.cfg_base = base_name
        self.adapters_dir = Path(adapters_dir)
        self.max_bytes = max_bytes
        self.manage = manage
        self.state_file = state_file
        self.peer_state_files = list(peer_state_files)
        self.rng = rng or random.Random()
        # applied
        self.base = base_name
        self.table: dict[str, Route] = {}
        self.revision: str | None = None
        self.applied: RoutesDocument | None = None
        # wanted
        self.desired: RoutesDocument | None = None
        self.errors: dict[str, str] = {}
        self.doc_error: str | None = None
        self.engine_loaded: set[str] = set()
        self.sources: dict[str, str] = {}  # adapter -> uri it was loaded from (by this process)
        self.draining: set[str] = set()
        self.inflight: dict[str, int] = {}
        self.engine: EngineAdapters | None = None
        self.created = int(time.time())
        self._stat: tuple | None = None
        self._raw: bytes | None = None
        self._retry_at = 0.0
        self._failures = 0
        self._resync_at = 0.0
        self._state_written: Any = None
        self._raw_revision: str | None = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ hot path
    def route(self, body: bytes, headers: Mapping[str, str] | None = None) -> Routed | web.Response | None:
        """The route of a request body: None when it names no model (or is a JSON value but not an
        object: the engine answers it), a 400 for a body that is not UTF-8 JSON, a 404 response for a
        model that is not served, a 401 for a preview name without the operator's token (in `headers`),
        else a `Routed` (its adapter counted in flight until `done`).

        A body this parser refuses is never forwarded: the engine's parser may read it (vLLM's
        `json.loads` takes UTF-16/32, a BOM, lone surrogates, deeper nesting), and with a `model`
        that names an adapter directly, which only served names may reach."""
        try:
            req = from_json(body)
        except ValueError:
            return json_error(400, "the request body must be a JSON object in UTF-8", "invalid_json")
        if not isinstance(req, dict):
            return None
        keys, escaped = body.count(_KEY), b"\\" in body  # two scans, shared with _with_model
        # a second `model` key is either literal or has a letter escaped: m o d e l are \\u006d \\u006f \\u0064 \\u0065 \\u006c
        if (keys > 1 or (escaped and b"\\u006" in body)) and _repeats_model(body):
            return json_error(400, "the request body must not repeat the key `model`", "duplicate_model", param="model")
        model = req.get("model")
        if not isinstance(model, str):
            return None
        if model == self.base:
            return Routed(body, model, None)
        r = self.table.get(model)
        if r is None:
            return json_error(404, f"The model `{model}` does not exist.", "model_not_found", param="model")
        if r.preview and not self.authorized(headers):
            return json_error(401, PREVIEW_UNAUTHORIZED, "preview_unauthorized", param="model")
        adapter = r.pick(self.rng)
        self.inflight[adapter] = self.inflight.get(adapter, 0) + 1
        return Routed(_with_model(body, req, model, adapter, keys, escaped), model, adapter, r.preview)

    def authorized(self, headers: Mapping[str, str] | None) -> bool:
        """Whether `headers` carry the operator's token: `Authorization: Bearer <feedback token>`, or
        `X-Perennial-Token: <feedback token>` (through another cluster's API server proxy, which consumes
        Authorization itself)."""
        if self.token is None or headers is None:
            return False
        return self.token.check(headers.get("Authorization")) or self.token.check_raw(headers.get(TOKEN_HEADER))

    def done(self, routed: Routed) -> None:
        a = routed.adapter
        if a is not None:
            n = self.inflight.get(a, 0) - 1
            if n > 0:
                self.inflight[a] = n
            else:
                self.inflight.pop(a, None)

    def kick(self) -> None:
        """The engine did not know a routed adapter (it restarted?): re-check its adapters at the next tick."""
        self._resync_at = 0.0

    @property
    def ready(self) -> bool:
        return self.revision is not None

    # ------------------------------------------------------------ reports
    def report(self) -> dict:
        errors = dict(self.errors)
        if self.doc_error:
            errors[DOCUMENT_KEY] = self.doc_error
        listed = set(self.applied.adapters) if self.applied else set()
        # the revision of the file's latest document (valid or not) while it is not the applied one
        pending = self._raw_revision if self._raw_revision != self.revision else None
        return {"revision": self.revision, "pending": pending, "loaded": sorted(self.engine_loaded & listed),
                "draining": sorted(self.draining), "errors": errors}

    def models(self, previews: bool = False) -> dict:
        """The base and the served names; preview names only when `previews` (the operator's token)."""
        data = [{"id": self.base, "object": "model", "created": self.created, "owned_by": "perennial", "parent": None}] if self.base else []
        for served, route in self.table.items():
            if route.preview and not previews:
                continue
            data.append({"id": served, "object": "model", "created": self.created, "owned_by": "perennial", "parent": self.base or None})
        return {"object": "list", "data": data}

    # ------------------------------------------------------------ the file
    def _read(self) -> bool:
        """Re-read the file when its stat changed; True when a new valid document was read."""
        try:
            st = os.stat(self.path)  # follows kubelet's symlinks: a swap is a new inode
        except OSError as e:
            self.doc_error = f"cannot read the routes file: {e.strerror}"  # the applied routes stay in force
            self._stat = self._raw = None  # the same document coming back is read again
            return False
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._stat:
            return False
        self._stat = key
        if st.st_size > MAX_DOCUMENT_BYTES:
            self.doc_error = f"the routes file must not exceed {MAX_DOCUMENT_BYTES} bytes"
            return False
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_DOCUMENT_BYTES + 1)
        except OSError as e:
            self.doc_error = f"cannot read the routes file: {e.strerror}"  # the applied routes stay in force
            self._stat = self._raw = None  # the same document coming back is read again
            return False
        if raw == self._raw:
            return False
        self._raw = raw
        try:
            rev = from_json(raw).get("revision")
            self._raw_revision = rev if isinstance(rev, str) else None
        except (ValueError, AttributeError):
            self._raw_revision = None
        try:
            doc = parse_document(raw)
        except ValueError as e:
            self.doc_error = str(e)[:1000]
            self.desired = None
            log.warning("Refused routes document error=%s", self.doc_error)
            return False
        self.doc_error = None
        self.desired = doc
        log.info("Read routes document revision=%s adapters=%d routes=%d", doc.revision, len(doc.adapters), len(doc.routes))
        return True

    # ------------------------------------------------------------ reconcile
    async def tick(self) -> None:
        now = time.monotonic()
        changed = self._read()
        if changed:
            self._failures = 0
        want = self.desired
        due = (changed or self.draining or now >= self._resync_at
               or (want is not None and (want.revision != self.revision or self.errors) and now >= self._retry_at))
        if due and self.engine is not None and (want is not None or self.applied is not None):
            await self.reconcile()
            self._resync_at = time.monotonic() + self.resync_s
        self._write_state()

    async def reconcile(self) -> None:
        assert self.engine is not None
        want = self.desired
        try:
            have = await self.engine.loaded()
        except EngineCallError as e:
            self.errors = {ENGINE_KEY: str(e)[:500]}
            self._retry_at = time.monotonic() + min(self.retry_s, 1.0)
            return
        errors: dict[str, str] = {}
        if want is not None:
            for name, src in want.adapters.items():
                if name in have:
                    known = self.sources.get(name) or self._fetched_from(name)
                    if known is not None and known != src.uri:
                        errors[name] = (f"adapter `{name}` is loaded from another uri; an adapter's artifact must not change "
                                        "(give the new artifact a new adapter name)")
                    continue
                if not self.manage:
                    errors[name] = "not loaded in the engine yet (worker 0 loads adapters)"
                    continue
                try:
                    if is_local(src.uri):
                        path = await asyncio.to_thread(check_local_adapter, name, src.uri, self.local_roots, self.denied)
                    else:
                        path = await self._fetch(name, src.uri)
                    await self.engine.load(name, path)
                except (EngineCallError, ValueError, OSError, ImportError) as e:
                    errors[name] = str(e)[:500] or type(e).__name__
                    log.warning("Failed to load adapter name=%s error=%s", name, errors[name])
                    continue
                log.info("Loaded adapter name=%s", name)
                self.sources[name] = src.uri
                have.add(name)
            if not errors and want.revision != self.revision:
                self._apply(want)
            elif not errors and want is not self.applied:
                self._apply(want)  # same revision, new content: the table still follows the file
        self.errors = errors
        if errors:
            self._retry_at = time.monotonic() + min(self.retry_max_s, self.retry_s * 2 ** min(self._failures, 16))
            self._failures += 1
        else:
            self._failures = 0
        if self.manage:
            await self._unload_unused(have)
        self.engine_loaded = have

    async def _fetch(self, name: str, uri: str) -> str:
        """fetch_adapter in a daemon thread, awaited at most `fetch_timeout_s` (and a little): a store that stops
        answering mid-read fails this apply (reported, retried later) instead of holding the routes for ever, and
        never holds the process at exit. A fetch still running when the document is retried is awaited again, not
        started twice."""
        key = (name, uri)
        fut = self._fetches.get(key)
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = self._fetches[key] = loop.create_future()

            def settle(result: Any, error: BaseException | None) -> None:
                if self._fetches.get(key) is fut:
                    del self._fetches[key]
                if fut.done():
                    return
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)
                fut.exception()  # retrieved: nobody may be waiting any more

            def run() -> None:
                try:
                    r = fetch_adapter(name, uri, self.adapters_dir, max_bytes=self.max_bytes, timeout_s=self.fetch_timeout_s)
                except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
                    loop.call_soon_threadsafe(settle, None, e)
                else:
                    loop.call_soon_threadsafe(settle, r, None)

            threading.Thread(target=run, name=f"fetch-{name}", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.fetch_timeout_s + 5.0)
        except TimeoutError:
            raise FetchTimeout(f"adapter `{name}`: fetching it took longer than adapter_fetch_timeout_s={self.fetch_timeout_s:g}"
                               " (the store stopped answering)") from None

    def _fetched_from(self, name: str) -> str | None:
        """The uri an adapter folder was fetched from (by an earlier run of the sidecar: the folder outlives it)."""
        try:
            return (self.adapters_dir / name / SOURCE_MARKER).read_text()
        except (OSError, UnicodeDecodeError):
            return None

    def _apply(self, doc: RoutesDocument) -> None:
        table = {served: Route([(e.adapter, e.weight) for e in entries], is_preview(served)) for served, entries in doc.routes.items()}
        self.base = doc.base.name if doc.base else self.cfg_base
        self.table = table  # one assignment: a request sees the old table or the new one
        self.applied = doc
        self.revision = doc.revision
        log.info("Applied routes revision=%s routes=%s", doc.revision, ",".join(f"{s}->{'/'.join(r.adapters)}" for s, r in table.items()))

    async def _unload_unused(self, have: set[str]) -> None:
        assert self.engine is not None
        if self.applied is None:
            return  # nothing applied yet: what the engine has may still be wanted
        keep = set(self.applied.adapters) | (set(self.desired.adapters) if self.desired else set())
        busy = self._peer_busy()
        draining = set()
        for name in sorted(have - keep):
            if self.inflight.get(name) or busy is None or name in busy:
                draining.add(name)
                continue
            try:
                await self.engine.unload(name)
            except EngineCallError as e:
                self.errors[name] = f"could not unload: {e}"[:500]
                draining.add(name)
                continue
            have.discard(name)
            log.info("Unloaded adapter name=%s", name)
            src = self.sources.pop(name, None)
            if src is None or not is_local(src):
                d = self.adapters_dir / name
                if ADAPTER_NAME.fullmatch(name) and ".." not in name and (d / SOURCE_MARKER).exists():
                    await asyncio.to_thread(shutil.rmtree, d, True)
        self.draining = draining

    # ------------------------------------------------------------ workers
    def _write_state(self) -> None:
        if not self.state_file:
            return
        state = (self.revision, tuple(sorted(self.inflight)))
        if state == self._state_written:
            return
        tmp = self.state_file + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"revision": state[0], "busy": list(state[1])}, f)
            os.replace(tmp, self.state_file)
            self._state_written = state
        except OSError as e:
            log.warning("Could not write routes state file=%s error=%s", self.state_file, e)

    def _peer_busy(self) -> set[str] | None:
        """Adapters other workers have requests in flight on; None while one of them has not
        applied this revision yet (or its state cannot be read)."""
        busy: set[str] = set()
        for p in self.peer_state_files:
            try:
                st = json.loads(Path(p).read_text())
            except (OSError, ValueError):
                return None
            if not isinstance(st, dict) or st.get("revision") != self.revision:
                return None
            busy.update(x for x in st.get("busy") or [] if isinstance(x, str))
        return busy

    # ------------------------------------------------------------ lifecycle
    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the watcher die: report and go on
                log.exception("Routes reconcile failed")
                self.errors = {**self.errors, ENGINE_KEY: "internal error while applying routes (see the sidecar's log)"}
            await asyncio.sleep(self.poll_s)

    def start(self, engine: EngineAdapters) -> None:
        self.engine = engine
        if self.manage and self.adapters_dir.is_dir():
            for d in self.adapters_dir.glob(".*.*"):  # temporary folders of a fetch that did not finish
                shutil.rmtree(d, ignore_errors=True)
        self._task = asyncio.create_task(self._loop(), name="routes")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    # ------------------------------------------------------------ HTTP
    async def routes_handler(self, request: web.Request) -> web.Response:
        from aiohttp import web

        return web.json_response(self.report())

    async def models_handler(self, request: web.Request) -> web.Response:
        from aiohttp import web

        previews = any(r.preview for r in self.table.values()) and self.authorized(request.headers)
        return web.json_response(self.models(previews))

    async def model_handler(self, request: web.Request) -> web.Response:
        """`GET /v1/models/{model}` (the OpenAI clients' `models.retrieve`): a base or served name only (a preview
        name with the operator's token only)."""
        from aiohttp import web

        name = request.match_info["model"]
        r = self.table.get(name)
        if r is not None and r.preview and not self.authorized(request.headers):
            return json_error(401, PREVIEW_UNAUTHORIZED, "preview_unauthorized", param="model")
        for m in self.models(previews=True)["data"]:
            if m["id"] == name:
                return web.json_response(m)
        return json_error(404, f"The model `{name}` does not exist.", "model_not_found", param="model")


def managed_path_error(path: str) -> web.Response:
    return json_error(403, f"`{path}` is not available: the routes file decides which adapters are loaded", "adapters_managed")

