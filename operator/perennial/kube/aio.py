"""The operator's API client: asynchronous, one aiohttp session per cluster.

Controllers read from the watch-fed cache (`kube.cache`) and come here only to
write (create, patch, status, Events) and for what no watch serves (pod logs).
Credentials come from a `kubernetes.client.Configuration` (kubeconfig, in-cluster
service account, or a bare server URL for the embedded control plane); the
token is re-read through the configuration's refresh hook once a minute (as
client-go re-reads a projected service-account token) and at once after a 401,
then the request is retried once: rotated service-account tokens and exec-plugin
tokens keep working without a kubeconfig parse per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import kubernetes

from .client import ApiError, apply_patch, local_credentials, path_for

log = logging.getLogger(__name__)

USER_AGENT = "perennial-operator/0.1.0"
#: Seconds an Authorization header is reused before the credentials are read again.
CREDENTIALS_TTL = 60.0
#: The largest watch event a stream may carry (a ConfigMap holds at most 1 MiB).
MAX_WATCH_EVENT_BYTES = 16 * 1024 * 1024


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


MANAGED_LABEL = "app.kubernetes.io/managed-by"


def desired_label(obj: dict[str, Any]) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(MANAGED_LABEL)


def _ours(current: dict[str, Any], desired: dict[str, Any]) -> bool:
    """Whether an existing object may be brought to `desired`: it carries the managed-by label `desired` sets,
    or an ownerReference to the parent `desired` names. Anything else is someone else's (a user's Service
    that happens to bear the name): never taken over, as Helm refuses objects without its ownership metadata."""
    want = desired_label(desired)
    if want is not None and desired_label(current) == want:
        return True
    uids = {r.get("uid") for r in (desired.get("metadata") or {}).get("ownerReferences") or [] if r.get("uid")}
    return any(r.get("uid") in uids for r in (current.get("metadata") or {}).get("ownerReferences") or [])


class AsyncKube:
    """create / patch / status / Events / pod logs over aiohttp; a 409 on create is the caller's to judge."""

    def __init__(self, configuration: kubernetes.client.Configuration, *, name: str = "local", timeout: float = 30.0):
        self.configuration = configuration
        self.name = name
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self.host = configuration.host.rstrip("/")
        self._auth: str | None = None
        self._auth_read_at: float | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        cfg = self.configuration
        if not self.host.startswith("https"):
            return False
        if not cfg.verify_ssl:
            return False
        context = ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.ssl_ca_cert else ssl.create_default_context()
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, cfg.key_file)
        return context

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=32, ssl=self._ssl())
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout, headers={"User-Agent": USER_AGENT})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _authorization(self, *, fresh: bool = False) -> str | None:
        """The Authorization header: the credentials are read (the configuration's refresh hook: a kubeconfig
        parse, a token file read) at most once per `CREDENTIALS_TTL`, or at once when `fresh`."""
        now = time.monotonic()
        if fresh or self._auth_read_at is None or now - self._auth_read_at >= CREDENTIALS_TTL:
            token = self.configuration.get_api_key_with_prefix("BearerToken", alias="authorization")  # kubeconfig, in-cluster: BearerToken
            if not token and self.configuration.username:
                token = self.configuration.get_basic_auth_token()
            self._auth, self._auth_read_at = token or None, now
        return self._auth

    def _tls_options(self) -> dict[str, Any]:
        """The TLS server name to verify when it differs from the URL's host (kubeconfig `tls-server-name`)."""
        name = getattr(self.configuration, "tls_server_name", None)
        return {"server_hostname": name} if name and self.host.startswith("https") else {}

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if auth := self._authorization():
            headers["Authorization"] = auth
        return headers

    async def request(self, method: str, path: str, body: Any = None, *, query: dict[str, Any] | None = None,
                      content_type: str | None = None, raw: bool = False, headers: dict[str, str] | None = None,
                      timeout: float | None = None) -> Any:
        """`headers`: more request headers (e.g. for a Service behind the API server's proxy; never Authorization,
        which is the API server's); `timeout`: this request's total, instead of the client's."""
        params = {k: str(v) for k, v in (query or {}).items() if v is not None}
        data = None if body is None else json.dumps(body, separators=(",", ":"))
        ctype = (content_type or "application/json") if body is not None else None
        extra = {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}
        options: dict[str, Any] = {"timeout": aiohttp.ClientTimeout(total=timeout)} if timeout is not None else {}
        try:
            for attempt in (0, 1):
                headers = {**extra, **self._headers(ctype)}
                async with self.session().request(method, self.host + path, data=data, params=params, headers=headers,
                                                  **options, **self._tls_options()) as response:
                    text = await response.text()
                    if response.status == 401 and attempt == 0 and self._authorization(fresh=True) != headers.get("Authorization"):
                        continue  # the credentials rotated since they were read: once more with the new ones
                    break
            if response.status >= 400:
                try:
                    parsed = json.loads(text) if text else {}
                except ValueError:
                    parsed = {"message": text[:1024]}
                raise ApiError(response.status, parsed, method, path, retry_after=_retry_after(response.headers))
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            raise ApiError(0, {"message": f"{type(exc).__name__}: {exc}"}, method, path) from None
        if raw:
            return text
        return json.loads(text) if text else {}

    async def watch(self, path: str, *, query: dict[str, Any] | None = None, read_timeout: float | None = None,
                    on_open: Callable[[], None] | None = None) -> AsyncIterator[dict[str, Any]]:
        """Stream a watch (`?watch=true` is added): its events (`{"type": ..., "object": ...}`) as they arrive,
        until the server ends the stream. `read_timeout`: seconds without a byte before giving up (the server's
        `timeoutSeconds` plus a margin); `on_open`: called once the server accepted the watch. An HTTP error is
        an `ApiError` with its status (a 410 Expired as the stream's ERROR event is the caller's to read);
        connection failures and cut streams are `ApiError(0)`. Close it with `contextlib.aclosing`."""
        params = {k: str(v) for k, v in (query or {}).items() if v is not None}
        params["watch"] = "true"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout.total, sock_read=read_timeout)
        try:
            for attempt in (0, 1):
                headers = self._headers(None)
                async with self.session().get(self.host + path, params=params, headers=headers, timeout=timeout,
                                              **self._tls_options()) as response:
                    if response.status == 401 and attempt == 0 and self._authorization(fresh=True) != headers.get("Authorization"):
                        continue
                    if response.status >= 400:
                        text = await response.text()
                        try:
                            parsed = json.loads(text) if text else {}
                        except ValueError:
                            parsed = {"message": text[:1024]}
                        raise ApiError(response.status, parsed, "GET", path, retry_after=_retry_after(response.headers))
                    if on_open is not None:
                        on_open()
                    buffer = b""
                    async for chunk in response.content.iter_any():
                        buffer += chunk
                        *lines, buffer = buffer.split(b"\n")
                        for line in lines:
                            if line.strip():
                                yield json.loads(line)
                        if len(buffer) > MAX_WATCH_EVENT_BYTES:
                            raise ApiError(0, {"message": f"a watch event over {MAX_WATCH_EVENT_BYTES} bytes"}, "GET", path)
                    if buffer.strip():
                        yield json.loads(buffer)
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, ValueError) as exc:
            raise ApiError(0, {"message": f"{type(exc).__name__}: {exc}"}, "GET", path) from None

    # -- typed helpers -------------------------------------------------------
    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", path_for(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path_for(obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace")), obj)

    async def patch(self, api_version: str, kind: str, namespace: str | None, name: str, patch: Any,
                    subresource: str | None = None) -> dict[str, Any]:
        return await self.request("PATCH", path_for(api_version, kind, namespace, name, subresource), patch,
                                  content_type="application/merge-patch+json")

    async def apply(self, obj: dict[str, Any], current: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
        """Bring `obj` about: create it when `current` (from the cache) is None, patch what differs, else nothing.

        Returns (object, "created" | "updated" | "unchanged"). A stale cache is harmless:
        a 409 on create reads the object once and continues from it.
        """
        meta = obj["metadata"]
        desired = {k: v for k, v in obj.items() if k != "status"}
        if current is None:
            try:
                return await self.create(desired), "created"
            except ApiError as exc:
                if exc.status != 409:
                    raise
            current = await self.get(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
            if current is None:
                return await self.create(desired), "created"
            if not _ours(current, desired):
                raise ApiError(409, {"kind": "Status", "reason": "AlreadyExists", "message": (
                    f"{obj['kind']} {meta['name']!r} already exists and is not Perennial's (neither labelled "
                    f"{MANAGED_LABEL}={desired_label(desired)!r} nor owned by its parent): rename or delete it; it is left as it is")},
                    "POST", path_for(obj["apiVersion"], obj["kind"], meta.get("namespace")))
        patch = apply_patch(obj, current)
        if patch is None:
            return current, "unchanged"
        updated = await self.patch(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"], patch)
        return updated, "updated"

    async def pod_log(self, namespace: str, pod: str, *, tail_lines: int | None = None, container: str | None = None) -> str:
        return await self.request("GET", path_for("v1", "Pod", namespace, pod, "log"),
                                  query={"tailLines": tail_lines, "container": container}, raw=True)


def configuration(server: str | None = None, kubeconfig: str | None = None, context: str | None = None,
                  token: str | None = None, ca_file: str | None = None) -> kubernetes.client.Configuration:
    """Credentials for `server` (the embedded control plane: its bearer `token` and certificate `ca_file`), a
    kubeconfig, or the in-cluster service account."""
    cfg = kubernetes.client.Configuration()
    if server:
        return local_credentials(cfg, server, token, ca_file)
    try:
        kubernetes.config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    except kubernetes.config.ConfigException:
        if kubeconfig:
            raise
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    return cfg
