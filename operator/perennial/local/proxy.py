"""A local kube-proxy: each Service with a selector gets a TCP port on 127.0.0.1 relaying to its ready pods.

- Every TCP port of a Service that has a `selector` gets a listener on `host` (127.0.0.1) at a port chosen by
  the kernel, kept for the Service's life (and the port's). The Service's annotations say where:
  `perennial.ai/local-url: http://127.0.0.1:<port>` (the port named `http`, else the first) and
  `perennial.ai/local-ports: {"<service port>": <local port>, ...}`. `spec.clusterIP` is allocated by the API
  server as in a cluster (nothing listens there).
- Each new connection goes to the next ready endpoint, round robin: the pods of the Service's namespace whose
  labels match the selector *now* (read from the store at accept time, so a selector switch — a blue-green
  switch — takes effect for the next connection; open connections stay where they are, as with kube-proxy's
  conntrack), that are Ready (or any with `publishNotReadyAddresses`), not being deleted, with a pod IP. The
  target port is `targetPort` (a number, or a container port name looked up in each pod), else `port`.
- No ready endpoint: the connection is closed at once (kube-proxy rejects it). An endpoint refusing the
  connection is skipped for the next one.
- A byte relay (asyncio streams, both directions, half-close passed on), no HTTP parsing, in the runtime's loop.
  Once the pod closed its side, the client's side is closed after `fin_timeout_s` (30 s) if it has not ended.
- The endpoints controller's part: a v1 `Endpoints` object per Service with a selector (`subsets` of ready
  `addresses` and `notReadyAddresses` with their `targetRef`, grouped by resolved ports), rewritten when pods or
  the Service change, deleted with the Service. (No EndpointSlices: the embedded server does not serve them.)
Services without a selector, ExternalName and UDP ports get no listener.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from typing import Any

from ..kube.client import ApiError, Kube
from .apiproxy import resolve_port, service_targets
from .informers import Api, LoopThread, StoreReader
from .store import APIError

__all__ = ["LocalServiceProxy", "LOCAL_URL", "LOCAL_PORTS"]

log = logging.getLogger(__name__)

LOCAL_URL = "perennial.ai/local-url"
LOCAL_PORTS = "perennial.ai/local-ports"
MANAGED_BY = "perennial.ai/endpoints-managed-by"
_CHUNK = 65536


class _Listener:
    def __init__(self, server: asyncio.base_events.Server, port: int) -> None:
        self.server = server
        self.port = port
        self.rr = itertools.count()


class LocalServiceProxy:
    """See the module docstring. `host`: where the listeners bind (loopback by default)."""

    #: After the pod closed its side of a connection, how long the client's side may still send (HAProxy's
    #: `timeout client-fin`); then the relay closes both (a client that never closes held two fds for ever).
    fin_timeout_s = 30.0

    def __init__(self, kube: Kube, server_handle: Any, *, loop: LoopThread | None = None, host: str = "127.0.0.1") -> None:
        self.api = Api(kube)
        self.host = host
        self._own_loop = loop is None
        self.loop = loop or LoopThread("perennial-service-proxy")
        self.reader = StoreReader(server_handle, self.loop)
        self._listeners: dict[tuple[str, str, int], _Listener] = {}
        self._uids: dict[tuple[str, str], str] = {}
        self._conns: set[asyncio.Task[Any]] = set()
        self._syncing: dict[tuple[str, str], asyncio.Task[Any]] = {}
        self._endpoints_due: set[str] = set()  # namespaces whose Endpoints are recomputed soon
        self._endpoints_task: asyncio.Task[Any] | None = None

    def start(self) -> "LocalServiceProxy":
        self.loop.start()
        self.reader.watch("", "v1", "services", self._on_service)
        self.reader.watch("", "v1", "pods", self._on_pod)
        log.info("Started the local service proxy on %s", self.host)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.reader.close()
        try:
            self.loop.submit(self._close_all()).result(timeout)
        except Exception:
            log.debug("Closing the service proxy failed", exc_info=True)
        if self._own_loop:
            self.loop.stop()

    def local_port(self, namespace: str, name: str, port: int) -> int | None:
        """The local port of a Service port (tests, tools); None without a listener."""
        listener = self._listeners.get((namespace, name, int(port)))
        return listener.port if listener else None

    async def _close_all(self) -> None:
        for listener in self._listeners.values():
            listener.server.close()
        self._listeners.clear()
        for t in list(self._conns):
            t.cancel()

    # ------------------------------------------------------------------ Services -> listeners

    def _on_service(self, etype: str, svc: dict) -> None:
        key = (svc["metadata"]["namespace"], svc["metadata"]["name"])
        previous = self._syncing.get(key)
        task = asyncio.get_running_loop().create_task(self._sync(key, previous))
        self._syncing[key] = task
        self._endpoints_soon(key[0])

    def _on_pod(self, etype: str, pod: dict) -> None:
        self._endpoints_soon(pod["metadata"]["namespace"])

    def _endpoints_soon(self, namespace: str) -> None:
        self._endpoints_due.add(namespace)
        if self._endpoints_task is None or self._endpoints_task.done():
            self._endpoints_task = asyncio.get_running_loop().create_task(self._write_endpoints())

    async def _write_endpoints(self) -> None:
        """Bring the Endpoints of every Service of the namespaces that changed up to date (events coalesced)."""
        while self._endpoints_due:
            await asyncio.sleep(0.05)
            namespaces, self._endpoints_due = self._endpoints_due, set()
            for ns in sorted(namespaces):
                try:
                    await asyncio.to_thread(self._sync_endpoints, ns)
                except Exception as exc:
                    log.debug("Could not write endpoints namespace=%s: %s", ns, exc)
                    self._endpoints_due.add(ns)
                    await asyncio.sleep(1.0)

    def _sync_endpoints(self, ns: str) -> None:
        services = {s["metadata"]["name"]: s for s in self.reader.list("", "v1", "services", ns)
                    if (s.get("spec") or {}).get("selector")}
        current = {e["metadata"]["name"]: e for e in self.reader.list("", "v1", "endpoints", ns)}
        pods = self.reader.list("", "v1", "pods", ns)
        for name, svc in services.items():
            subsets = _subsets(svc, pods)
            have = current.get(name)
            if have is None:
                self.api.create({"apiVersion": "v1", "kind": "Endpoints",
                                 "metadata": {"name": name, "namespace": ns, "labels": svc["metadata"].get("labels") or {},
                                              "annotations": {MANAGED_BY: "perennial-local"}},
                                 "subsets": subsets})
            elif (have.get("subsets") or []) != subsets:
                self.api.patch("v1", "Endpoints", ns, name, {"subsets": subsets})
        for name, ep in current.items():
            if name not in services and (ep["metadata"].get("annotations") or {}).get(MANAGED_BY) == "perennial-local":
                self.api.delete("v1", "Endpoints", ns, name)

    async def _sync(self, key: tuple[str, str], previous: asyncio.Task[Any] | None) -> None:
        if previous is not None and not previous.done():
            await asyncio.gather(previous, return_exceptions=True)  # one sync of a Service at a time, in order
        ns, name = key
        svc = self.reader.get("", "v1", "services", ns, name)
        spec = (svc or {}).get("spec") or {}
        uid = (svc or {}).get("metadata", {}).get("uid")
        if self._uids.get(key) not in (None, uid):  # deleted and created again: new ports
            self._close(key, set())
        wanted: set[int] = set()
        if svc is not None and spec.get("selector") and spec.get("type", "ClusterIP") != "ExternalName":
            wanted = {int(p["port"]) for p in spec.get("ports") or [] if p.get("protocol", "TCP") == "TCP"}
        self._close(key, wanted)
        if svc is None or not wanted:
            self._uids.pop(key, None)
            return
        self._uids[key] = uid
        for port in sorted(wanted):
            if (ns, name, port) not in self._listeners:
                lkey = (ns, name, port)
                server = await asyncio.start_server(lambda r, w, k=lkey: self._accept(k, r, w), self.host, 0)
                local = server.sockets[0].getsockname()[1]
                self._listeners[lkey] = _Listener(server, local)
                log.info("Service proxied service=%s/%s port=%d local=%s:%d", ns, name, port, self.host, local)
        ports = {str(p): self._listeners[(ns, name, p)].port for p in sorted(wanted)}
        http_port = next((int(p["port"]) for p in spec.get("ports") or [] if p.get("name") == "http" and int(p["port"]) in wanted), None)
        first = http_port if http_port is not None else min(wanted, key=lambda p: [int(x["port"]) for x in spec["ports"]].index(p))
        annotations = {LOCAL_URL: f"http://{self.host}:{self._listeners[(ns, name, first)].port}",
                       LOCAL_PORTS: json.dumps(ports, sort_keys=True)}
        current = (svc["metadata"].get("annotations") or {})
        if any(current.get(k) != v for k, v in annotations.items()):
            try:
                await asyncio.to_thread(self.api.patch, "v1", "Service", ns, name, {"metadata": {"annotations": annotations}})
            except ApiError as exc:
                if exc.status != 404:
                    log.warning("Could not annotate service=%s/%s: %s", ns, name, exc)

    def _close(self, key: tuple[str, str], keep: set[int]) -> None:
        ns, name = key
        for lkey in [k for k in self._listeners if k[:2] == key and k[2] not in keep]:
            self._listeners.pop(lkey).server.close()
            log.info("Service port unproxied service=%s/%s port=%d", ns, name, lkey[2])

    # ------------------------------------------------------------------ connections

    def endpoints(self, namespace: str, name: str, port: int) -> list[tuple[str, int]]:
        """(pod IP, port) of the endpoints of a Service port now, in a stable order (the API server's proxy
        subresource picks from the same: `apiproxy.service_targets`)."""
        svc = self.reader.get("", "v1", "services", namespace, name)
        if svc is None or not (svc.get("spec") or {}).get("selector"):
            return []
        try:
            return service_targets(svc, self.reader.list("", "v1", "pods", namespace), None, str(port))[1]
        except APIError:  # no such port, no ready endpoint
            return []

    async def _accept(self, lkey: tuple[str, str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            listener = self._listeners.get(lkey)
            eps = self.endpoints(*lkey)
            if listener is None or not eps:
                return  # no endpoint: closed at once
            start = next(listener.rr)
            for i in range(len(eps)):
                host, port = eps[(start + i) % len(eps)]
                try:
                    up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
                except (OSError, asyncio.TimeoutError):
                    continue
                up = asyncio.ensure_future(_pipe(reader, up_writer))
                down = asyncio.ensure_future(_pipe(up_reader, writer))
                try:
                    await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
                    if down.done() and not up.done():
                        # the pod closed its side: the client gets `fin_timeout_s` to finish, not for ever
                        await asyncio.wait({up}, timeout=self.fin_timeout_s)
                    elif not down.done():
                        await down  # the client half-closed (sent its request): the answer still comes back
                finally:
                    for t in (up, down):
                        t.cancel()
                    up_writer.close()
                return
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()
            if task is not None:
                self._conns.discard(task)


def _subsets(svc: dict, pods: list[dict]) -> list[dict]:
    """`Endpoints.subsets` of a Service: pods grouped by their resolved ports, ready or not."""
    spec = svc.get("spec") or {}
    selector = spec.get("selector") or {}
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status") or {}
        labels = meta.get("labels") or {}
        if any(labels.get(k) != v for k, v in selector.items()) or meta.get("deletionTimestamp") or not status.get("podIP"):
            continue
        if status.get("phase") in ("Succeeded", "Failed"):
            continue
        ports = []
        for p in spec.get("ports") or []:
            target = resolve_port(pod, p.get("targetPort", p.get("port")))
            if target is not None:
                ports.append({**({"name": p["name"]} if p.get("name") else {}), "port": target, "protocol": p.get("protocol", "TCP")})
        key = tuple((p.get("name", ""), p["port"], p["protocol"]) for p in ports)
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        address = {"ip": status["podIP"], "targetRef": {"kind": "Pod", "namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]}}
        group = groups.setdefault(key, {"ports": ports, "addresses": [], "notReadyAddresses": []})  # type: ignore[dict-item]
        group["addresses" if ready or spec.get("publishNotReadyAddresses") else "notReadyAddresses"].append(address)
    out = []
    for key in sorted(groups):
        g = groups[key]
        subset: dict[str, Any] = {}
        for field in ("addresses", "notReadyAddresses"):
            if g[field]:
                subset[field] = sorted(g[field], key=lambda a: (a["ip"], a["targetRef"]["name"]))
        subset["ports"] = g["ports"]
        out.append(subset)
    return out


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await src.read(_CHUNK)
            if not data:
                break
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError, RuntimeError):
        dst.close()
