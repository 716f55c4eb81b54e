"""In-process plumbing of the local runtime's controllers: store watches, a work queue, an event loop thread.

The controllers of the local runtime (`controllers.py`, `serving.py`, `proxy.py`) run in the same process as the
embedded API server. They are told about changes by the store's own watch (a `store.Watcher` registered with
`Store.watch`, the mechanism the server's HTTP watches use, fed from a loop of ours), read the current objects
from the store (consistent: a write they made through the API is visible as soon as it returned) and write
through the API server like any client. No polling: a key is worked on when an event names it, or when the
controller asked to look again at a given time (a deadline, a backoff).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any, Coroutine

from .store import APIError, Store, Watcher

__all__ = ["LoopThread", "WorkQueue", "StoreReader", "selector_matches", "controller_of"]

log = logging.getLogger(__name__)


class LoopThread:
    """An asyncio event loop in a daemon thread (store watches, the local proxy)."""

    def __init__(self, name: str = "perennial-local-runtime") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        try:
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    def start(self) -> "LoopThread":
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    @property
    def started(self) -> bool:
        """Its thread started (not only start() called): what is submitted from now on runs."""
        return self._thread.ident is not None

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        """Run `coro` on the loop; a future of its result. Before the thread started nothing would ever run it: the
        future fails at once (the coroutine closed), instead of a caller waiting out its timeout for it."""
        if not self.started:
            coro.close()
            fut: Future[Any] = Future()
            fut.set_exception(RuntimeError(f"the event loop thread {self._thread.name} is not running"))
            return fut
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float = 10.0) -> None:
        if self._started and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)


class WorkQueue:
    """Kubernetes' rate-limited work queue, reduced: a key is queued once however often it is added, a key being
    worked on is not handed to a second worker, and `add_after` queues a key later (deadlines, backoff)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[Hashable] = []
        self._queued: set[Hashable] = set()
        self._processing: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._later: list[tuple[float, int, Hashable]] = []
        self._seq = 0
        self._shutdown = False

    def add(self, key: Hashable) -> None:
        with self._cond:
            if self._shutdown:
                return
            if key in self._processing:
                self._dirty.add(key)
                return
            if key not in self._queued:
                self._queued.add(key)
                self._queue.append(key)
                self._cond.notify()

    def add_after(self, key: Hashable, seconds: float) -> None:
        if seconds <= 0:
            self.add(key)
            return
        with self._cond:
            self._seq += 1
            heapq.heappush(self._later, (time.monotonic() + seconds, self._seq, key))
            self._cond.notify()

    def get(self) -> Hashable | None:
        """The next key (blocks); None once shut down."""
        with self._cond:
            while True:
                if self._shutdown:
                    return None
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    _, _, key = heapq.heappop(self._later)
                    if key in self._processing:
                        self._dirty.add(key)
                    elif key not in self._queued:
                        self._queued.add(key)
                        self._queue.append(key)
                if self._queue:
                    key = self._queue.pop(0)
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                self._cond.wait(None if not self._later else max(0.0, self._later[0][0] - now))

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                if key not in self._queued:
                    self._queued.add(key)
                    self._queue.append(key)
                    self._cond.notify()

    def shutdown(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()


EventHandler = Callable[[str, dict], None]


class StoreReader:
    """Reads and watches of the embedded API server's store, in this process."""

    def __init__(self, server_handle: Any, loop: LoopThread) -> None:
        self.store: Store = server_handle.store
        self.loop = loop
        self._watches: list[tuple[Any, Watcher]] = []

    def _rt(self, group: str, version: str, plural: str) -> Any:
        rt = self.store.lookup(group, version, plural)
        if rt is None:
            raise LookupError(f"the embedded API server does not serve {group or 'core'}/{version} {plural}")
        return rt

    def get(self, group: str, version: str, plural: str, namespace: str | None, name: str) -> dict | None:
        """The stored object (never modify it) or None."""
        try:
            return self.store.get(self._rt(group, version, plural), namespace, name)
        except APIError as exc:
            if exc.code == 404:
                return None
            raise

    def list(self, group: str, version: str, plural: str, namespace: str | None) -> list[dict]:
        """Stored objects (never modify them)."""
        items, _ = self.store.list(self._rt(group, version, plural), namespace)
        return items

    def watch(self, group: str, version: str, plural: str, handler: EventHandler) -> None:
        """Call `handler(event_type, object)` in the loop thread for every object now stored (ADDED) and every
        later change. The handler must be quick (queue a key)."""
        rt = self._rt(group, version, plural)

        async def pump() -> None:
            w = Watcher(loop=asyncio.get_running_loop(), queue=asyncio.Queue(), namespace=None,
                        labels=lambda _labels: True, fields=lambda _obj: True)
            initial = self.store.watch(rt, w, None) or []
            self._watches.append((rt, w))
            try:
                for etype, obj in initial:
                    _call(handler, etype, obj)
                while True:
                    item = await w.queue.get()
                    if item is None:
                        return
                    _call(handler, *item)
            finally:
                self.store.unwatch(rt, w)

        self.loop.submit(pump())

    def close(self) -> None:
        for rt, w in self._watches:
            self.store.unwatch(rt, w)
            w.push(None)
        self._watches.clear()


def _call(handler: EventHandler, etype: str, obj: dict) -> None:
    try:
        handler(etype, obj)
    except Exception:
        log.exception("A local runtime watch handler failed")


def selector_matches(selector: dict | None, labels: dict | None) -> bool:
    """A metav1.LabelSelector (matchLabels, matchExpressions) against labels; an empty selector matches all."""
    labels = labels or {}
    selector = selector or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def controller_of(obj: dict) -> dict | None:
    """The ownerReference with `controller: true`, if any."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref
    return None


_PLURALS = {("v1", "Pod"): "pods", ("v1", "Service"): "services", ("v1", "Endpoints"): "endpoints",
            ("apps/v1", "Deployment"): "deployments", ("apps/v1", "ReplicaSet"): "replicasets"}


class Api:
    """The few writes the local runtime's controllers make, through the API server (`Kube.request`)."""

    def __init__(self, kube: Any) -> None:
        self.kube = kube

    @staticmethod
    def path(api_version: str, kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        path = f"{base}/namespaces/{namespace}/{_PLURALS[(api_version, kind)]}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path

    def create(self, obj: dict) -> dict:
        return self.kube.request("POST", self.path(obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"]), body=obj)

    def patch(self, api_version: str, kind: str, namespace: str, name: str, patch: dict, subresource: str | None = None) -> dict:
        return self.kube.request("PATCH", self.path(api_version, kind, namespace, name, subresource), body=patch,
                                 content_type="application/merge-patch+json")

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str, status: dict) -> dict:
        return self.patch(api_version, kind, namespace, name, {"status": status}, "status")

    def delete(self, api_version: str, kind: str, namespace: str, name: str, grace_seconds: int | None = None) -> bool:
        from ..kube.client import ApiError

        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            self.kube.request("DELETE", self.path(api_version, kind, namespace, name), body=body)
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
