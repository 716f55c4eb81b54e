"""The proxy subresources of the embedded API server, as kube-apiserver serves them.

- ``/api/v1/namespaces/{ns}/services/[{scheme}:]{name}[:{port}]/proxy/{path}``: to a ready endpoint of the Service.
  ``port`` is a Service port's name or number; without one, the port without a name, else the Service's only port
  (kube-apiserver insists on the name of a named port; this is the one leniency). The endpoints are read from the
  store at each request: with a selector, the pods of the namespace whose labels match it now, Running, Ready (or any
  with ``publishNotReadyAddresses``), not being deleted, with a pod IP; the target port is the Service port's
  ``targetPort`` (a number, or a container port's name looked up in each pod), else its ``port``. A Service without a
  selector uses the ready addresses of its ``Endpoints`` object (the subset port of the same name). One endpoint is
  picked at random, as kube-apiserver does; one refusing the connection is skipped for the next.
  No endpoint: 503 ``no endpoints available for service "<name>"``; no such port: 503
  ``no service port "<port>" found for service "<name>"``.
- ``/api/v1/namespaces/{ns}/pods/[{scheme}:]{name}[:{port}]/proxy/{path}``: to the pod's IP at ``port`` (a number or
  a container port's name; without one, the first container port of the pod, else 80). 404 without the pod, 503 while
  it is not Running or has no IP.
- Every method; the query string as sent; the request body streamed to the pod (a compressed one is forwarded
  decoded, as aiohttp reads it, without its ``Content-Encoding``/``Content-Length``); the answer streamed back as it
  comes (server-sent events arrive as the pod sends them), status and headers as the pod gave them, bytes untouched
  (no decompression).
- Hop-by-hop headers (RFC 9110 7.6.1 and those named in ``Connection``) are dropped both ways; so are the caller's
  ``Authorization``, ``Impersonate-*`` and ``X-Remote-*`` headers (kube-apiserver removes them once it has authenticated the request:
  the API server's credentials never reach a pod), ``Host`` (the pod's address) and ``Expect``;
  ``X-Forwarded-For`` gets the caller's address appended. Cookies are never kept between requests.
- Authentication is the API server's (its bearer token); requests are accounted as kube-apiserver's authorizer
  names them: ``get``/``create``/``update``/``patch``/``delete`` on ``services/proxy`` or ``pods/proxy``.
- Targets whose address is link-local, multicast or unspecified are refused (``address not allowed``): a pod's
  status is writable by clients and must not make the API server a way to the cloud's metadata service. Loopback is
  allowed: the local runtime's pods live there (``127.<b>.x.y``).
- Bounded waits: ``connect_timeout`` (10 s) to connect, ``read_timeout`` (300 s) between two reads from the pod
  (504 before the answer started; after that the connection to the caller is cut).

Not done: WebSocket/``Upgrade`` (the header is hop-by-hop, so an upgrade is answered as a plain request), rewriting of
``Location`` headers and links in HTML answers (kube-apiserver rewrites them to stay under the proxy path).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .store import APIError

__all__ = ["HOP_BY_HOP", "ProxyForwarder", "Target", "pod_targets", "resolve_port", "service_targets",
           "split_scheme_name_port"]

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "transfer-encoding", "upgrade"})
# never forwarded to a pod: the API server's own credentials, its host, what aiohttp already answered or decoded
_REQUEST_DROP = frozenset({"authorization", "host", "expect", "x-forwarded-for"})
# kube-apiserver's own authentication inputs, removed once it has authenticated: impersonation and the front proxy's
# request headers
_AUTH_PREFIXES = ("impersonate-", "x-remote-")
_SCHEMES = ("", "http", "https")

Target = tuple[str, str, int]  # (scheme, ip, port)


def split_scheme_name_port(ident: str) -> tuple[str, str, str] | None:
    """kube's ``SplitSchemeNamePort``: ``name``, ``name:port`` or ``scheme:name:port`` (None if malformed)."""
    parts = ident.split(":")
    if len(parts) == 1:
        scheme, name, port = "", parts[0], ""
    elif len(parts) == 2:
        scheme, name, port = "", parts[0], parts[1]
    elif len(parts) == 3:
        scheme, name, port = parts
    else:
        return None
    if not name or scheme not in _SCHEMES:
        return None
    return scheme, name, port


def resolve_port(pod: dict, target: Any) -> int | None:
    """A Service's ``targetPort`` (or a proxy's port) in a pod: a number, or the name of one of its container ports."""
    if isinstance(target, int) or str(target).isdigit():
        return int(target)
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == target:
                return int(p["containerPort"])
    return None


def is_ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in (pod.get("status") or {}).get("conditions") or [])


def selects(selector: dict[str, str], pod: dict) -> bool:
    labels = pod["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def proxyable(ip: str) -> bool:
    """kube's ``IsProxyableIP`` less its loopback rule (local pods live on 127.0.0.0/8)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return not (addr.is_link_local or addr.is_multicast or addr.is_unspecified)


def _unavailable(message: str) -> APIError:
    return APIError(503, "ServiceUnavailable", message)


def service_targets(svc: dict, pods: list[dict], endpoints: dict | None, port: str) -> tuple[str, list[tuple[str, int]]]:
    """The Service port's name and the (ip, port) of its ready endpoints now (see the module docstring)."""
    name = svc["metadata"]["name"]
    spec = svc.get("spec") or {}
    ports = spec.get("ports") or []
    chosen = next((p for p in ports if p.get("name", "") == port), None)
    if chosen is None and port:
        chosen = next((p for p in ports if str(p.get("port")) == port), None)
    if chosen is None and not port and len(ports) == 1:
        chosen = ports[0]
    if chosen is None:
        raise _unavailable(f'no service port "{port}" found for service "{name}"')
    out: list[tuple[str, int]] = []
    selector = spec.get("selector") or {}
    if selector:
        target = chosen.get("targetPort", chosen.get("port"))
        for pod in pods:
            status = pod.get("status") or {}
            if (not selects(selector, pod) or pod["metadata"].get("deletionTimestamp") or status.get("phase") != "Running"
                    or not status.get("podIP")):
                continue
            if not is_ready(pod) and not spec.get("publishNotReadyAddresses"):
                continue
            tport = resolve_port(pod, target)
            if tport is not None:
                out.append((status["podIP"], tport))
    elif endpoints is not None:
        for subset in endpoints.get("subsets") or []:
            sports = subset.get("ports") or []
            sport = next((p for p in sports if p.get("name", "") == chosen.get("name", "")), None)
            if sport is None and len(sports) == 1 and len(ports) == 1:
                sport = sports[0]
            if sport is None or sport.get("protocol", "TCP") != "TCP":
                continue
            out.extend((a["ip"], int(sport["port"])) for a in subset.get("addresses") or [] if a.get("ip"))
    out = [(ip, p) for ip, p in out if proxyable(ip)]
    if not out:
        raise _unavailable(f'no endpoints available for service "{name}"')
    return str(chosen.get("name", "")), sorted(set(out))


def pod_targets(pod: dict, port: str) -> tuple[str, int]:
    """The (ip, port) a pod's proxy goes to (see the module docstring)."""
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if status.get("phase") != "Running" or not ip:
        raise _unavailable(f'pod "{name}" is not running (phase {status.get("phase") or "Pending"})')
    if not proxyable(ip):
        raise APIError(400, "BadRequest", f'pod "{name}": address not allowed: {ip}')
    if port:
        number = resolve_port(pod, port)
        if number is None:
            raise _unavailable(f'no port "{port}" found for pod "{name}"')
        return ip, number
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("containerPort"):
                return ip, int(p["containerPort"])
    return ip, 80


def _connection_tokens(headers: Any) -> set[str]:
    return {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",") if t.strip()}


class ProxyForwarder:
    """Forwards one request to a pod and streams its answer back (one client session, made in the server's loop)."""

    def __init__(self, *, connect_timeout: float = 10.0, read_timeout: float = 300.0, max_connections: int = 512) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # a connection per request: a pooled one the pod closed meanwhile (idle eviction) would fail a POST,
                # which is never retried (a streamed body cannot be sent twice); on loopback a connect costs little
                connector=aiohttp.TCPConnector(limit=self.max_connections, ssl=False, force_close=True),
                cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False, trust_env=False,
                timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout, sock_read=self.read_timeout))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _request_headers(self, request: web.Request) -> tuple[CIMultiDict[str], list[str]]:
        drop = HOP_BY_HOP | _REQUEST_DROP | _connection_tokens(request.headers)
        if "Content-Encoding" in request.headers:  # aiohttp hands the body over decoded
            drop = drop | {"content-encoding", "content-length"}
        headers: CIMultiDict[str] = CIMultiDict()
        for k, v in request.headers.items():
            if k.lower() not in drop and not k.lower().startswith(_AUTH_PREFIXES):
                headers.add(k, v)
        forwarded = [*request.headers.getall("X-Forwarded-For", []), request.remote or ""]
        headers.add("X-Forwarded-For", ", ".join(f for f in forwarded if f))
        # aiohttp's client adds these unless told not to: the pod gets what the caller sent, no more
        skip = [h for h in ("Accept", "Accept-Encoding", "User-Agent", "Content-Type") if h not in headers]
        return headers, skip

    async def forward(self, request: web.Request, targets: list[Target], suffix: str, what: str) -> web.StreamResponse:
        """Send ``request`` to the first target that accepts a connection (in the given order), with path ``suffix``."""
        headers, skip = self._request_headers(request)
        path = quote(suffix or "/", safe="/:@!$&'()*+,;=~")
        query = request.rel_url.raw_query_string
        body = request.content if request.body_exists else None
        session = self._client()
        last: Exception | None = None
        for scheme, ip, port in targets:
            url = URL.build(scheme=scheme or "http", host=ip, port=port, path=path, query_string=query, encoded=True)
            try:
                upstream = await session.request(request.method, url, headers=headers, data=body, allow_redirects=False,
                                                  skip_auto_headers=skip)
            except aiohttp.ClientConnectorError as exc:
                last = exc
                continue  # nothing was sent: the next endpoint may take it
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
                raise APIError(504, "Timeout", f"Timeout: the {what} did not answer within {self.read_timeout:g}s "
                                               f"({ip}:{port})") from exc
            except aiohttp.ClientError as exc:
                raise APIError(503, "ServiceUnavailable", f"error trying to reach {what}: {exc}") from exc
            try:
                return await self._relay(request, upstream)
            finally:
                upstream.close()
        raise APIError(503, "ServiceUnavailable", f"error trying to reach {what}: {last}")

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        drop = HOP_BY_HOP | _connection_tokens(upstream.headers)
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for k, v in upstream.headers.items():
            if k.lower() not in drop:
                resp.headers.add(k, v)
        await resp.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError is one
            pass  # the caller went away: releasing the answer closes the pod's connection
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # the pod stopped answering mid-stream: the caller must not take a cut answer for a whole one
            log.debug("Proxied answer cut %s: %r", upstream.url, exc)
            if request.transport is not None:
                request.transport.close()
        return resp

