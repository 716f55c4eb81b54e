"""An informer over `AsyncKube`: list, then watch from the listing's resourceVersion, into a `Cache`.

The operator's own cluster is watched through kopf (`controllers.manager`); other clusters are watched here,
one `Informer` per kind and cluster, as client-go's reflector does it:

* list (label selector `perennial.ai/deployment`: only Perennial's children), `Cache.replace` drops what the
  listing no longer has, then watch with `resourceVersion`, `allowWatchBookmarks` and `timeoutSeconds`;
* a stream that ends (the server's timeout, a cut connection) resumes from the last resourceVersion seen
  (events and bookmarks); a 410 Expired relists;
* errors back off exponentially with jitter (`Backoff`), so an unreachable API server gets a bounded
  trickle of attempts; one watch per informer at a time, never more;
* `reachability()`: whether the latest attempt reached the API server, when one last did, the last error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .aio import AsyncKube
from .cache import Cache
from .client import ApiError, path_for

log = logging.getLogger(__name__)

DEPLOYMENT_LABEL = "perennial.ai/deployment"
#: A watch that delivered an event or stayed open this long was healthy: the backoff starts over.
HEALTHY_WATCH_SECONDS = 1.0


def parent_of(obj: dict[str, Any]) -> tuple[str, str] | None:
    """The Perennial Deployment (namespace, name) a child in any cluster belongs to, by its label (no
    ownerReference crosses clusters)."""
    meta = obj.get("metadata") or {}
    name = (meta.get("labels") or {}).get(DEPLOYMENT_LABEL)
    return (meta.get("namespace") or "", name) if name else None


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter in [delay/2, delay]: `initial` * 2**(attempt-1), at most `maximum`."""

    initial: float = 0.5
    maximum: float = 30.0
    rng: random.Random | None = None

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * (2 ** min(max(0, attempt - 1), 30)))  # no float overflow, ever
        return base * (self.rng or random).uniform(0.5, 1.0)

    @property
    def smallest(self) -> float:
        """The shortest wait between two failed attempts."""
        return self.initial * 0.5


@dataclass(frozen=True)
class Reachability:
    """reachable: the latest attempt reached the API server (None: none finished yet); times are the clock's
    (`time.time()` by default)."""

    reachable: bool | None
    last_success: float | None
    last_error: str | None
    last_error_at: float | None


class Informer:
    """Keeps `cache` current with the objects of one kind in one cluster (see the module docstring)."""

    def __init__(self, kube: AsyncKube, api_version: str, kind: str, cache: Cache, *, namespace: str | None = None,
                 label_selector: str = DEPLOYMENT_LABEL, timeout_seconds: int = 300, backoff: Backoff | None = None,
                 clock: Callable[[], float] = time.time, on_health: Callable[[Informer], None] | None = None) -> None:
        self.kube = kube
        self.api_version, self.kind = api_version, kind
        self.cache = cache
        self.namespace = namespace
        self.label_selector = label_selector
        self.timeout_seconds = timeout_seconds
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.on_health = on_health
        self.path = path_for(api_version, kind, namespace)
        self.resource_version: str | None = None
        self.synced = False  # listed at least once
        #: False when the cluster does not serve the kind (a 404 on the listing: KEDA not installed there); it
        #: counts as listed and empty, and is looked for again now and then
        self.served: bool | None = None
        #: counters for tests and metrics
        self.lists = 0
        self.relists_after_expiry = 0
        self.watches = 0
        self.failures = 0
        self.open_watches = 0
        self.max_open_watches = 0
        self._reachable: bool | None = None
        self._last_success: float | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._task: asyncio.Task | None = None
        self._cut = False  # the latest watch was accepted, then its stream broke

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"informer {self.kube.name} {self.kind}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def reachability(self) -> Reachability:
        return Reachability(self._reachable, self._last_success, self._last_error, self._last_error_at)

    # -- health ----------------------------------------------------------------
    def _succeeded(self) -> None:
        self._last_success = self.clock()
        if self._reachable is not True:
            self._reachable = True
            self._health_changed()

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self._last_error = str(exc)[:512]
        self._last_error_at = self.clock()
        if self._reachable is not False:
            self._reachable = False
            self._health_changed()

    def _health_changed(self) -> None:
        if self.on_health is not None:
            try:
                self.on_health(self)
            except Exception:  # a callback's bug must not stop the watch
                log.exception("Reachability callback failed, cluster=%s, kind=%s", self.kube.name, self.kind)

    # -- list and watch --------------------------------------------------------
    def _typed(self, obj: dict[str, Any]) -> dict[str, Any]:
        return {**obj, "apiVersion": self.api_version, "kind": self.kind}  # list items may lack them

    async def _list(self) -> None:
        listing = await self.kube.request("GET", self.path, query={"labelSelector": self.label_selector})
        self.lists += 1
        present: dict[tuple[str, str], str] = {}
        for item in listing.get("items") or []:
            obj = self._typed(item)
            meta = obj["metadata"]
            present[(meta.get("namespace") or "", meta["name"])] = meta.get("resourceVersion") or ""
            self.cache.put(obj)
        gone = self.cache.replace(self.api_version, self.kind, self.namespace, present)
        if gone:
            log.info("Dropped objects deleted while the watch was down, cluster=%s, kind=%s, count=%d",
                     self.kube.name, self.kind, gone)
        self.resource_version = (listing.get("metadata") or {}).get("resourceVersion") or None
        self.synced = True
        self.served = True

    def _opened(self) -> None:
        self.open_watches += 1
        self.max_open_watches = max(self.max_open_watches, self.open_watches)
        self._succeeded()

    async def _watch(self) -> tuple[int, bool]:
        """One watch from `resource_version`; returns (events seen, expired)."""
        query = {"labelSelector": self.label_selector, "resourceVersion": self.resource_version,
                 "allowWatchBookmarks": "true", "timeoutSeconds": self.timeout_seconds}
        seen = 0
        opened = False

        def on_open() -> None:
            nonlocal opened
            opened = True
            self._opened()

        self.watches += 1
        self._cut = False
        try:
            stream = self.kube.watch(self.path, query=query, read_timeout=self.timeout_seconds + 30.0, on_open=on_open)
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    etype, obj = event.get("type"), event.get("object") or {}
                    if etype == "ERROR":
                        if obj.get("code") == 410:
                            return seen, True
                        raise ApiError(int(obj.get("code") or 500), obj, "GET", self.path)
                    version = (obj.get("metadata") or {}).get("resourceVersion")
                    if etype == "BOOKMARK":
                        self.resource_version = version or self.resource_version
                        continue
                    if etype not in ("ADDED", "MODIFIED", "DELETED"):
                        continue
                    seen += 1
                    obj = self._typed(obj)
                    if etype == "DELETED":
                        self.cache.remove(obj)
                    else:
                        self.cache.put(obj)
                    self.resource_version = version or self.resource_version
                    self._last_success = self.clock()
        except ApiError as exc:
            if opened and exc.status == 0:
                self._cut = True  # the server answered: a cut stream is no outage (the next attempt tells)
            raise
        finally:
            if opened:
                self.open_watches -= 1
        return seen, False

    async def _run(self) -> None:
        attempt = 0
        while True:
            started = time.monotonic()
            healthy = self._cut = False
            try:
                if self.resource_version is None or not self.synced:
                    await self._list()
                    self._succeeded()
                seen, expired = await self._watch()
                if expired:
                    self.relists_after_expiry += 1
                    log.info("Relisting after 410 Expired, cluster=%s, kind=%s, resource_version=%s",
                             self.kube.name, self.kind, self.resource_version)
                    self.resource_version = None
                healthy = seen > 0 or time.monotonic() - started >= HEALTHY_WATCH_SECONDS
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                if exc.status == 410:  # a listing or watch answered 410 itself
                    self.resource_version = None
                elif self._cut:
                    log.info("Resuming a watch cut mid-stream, cluster=%s, kind=%s, error=%s", self.kube.name, self.kind, exc)
                elif exc.status == 404 and self.resource_version is None:
                    # the listing: the kind is not served there (an add-on's CRD is not installed); no reason
                    # to call the cluster unreachable nor to hold the controller back
                    if self.served is not False:
                        log.info("Not watching a kind the remote cluster does not serve, cluster=%s, kind=%s",
                                 self.kube.name, self.kind)
                    self.served, self.synced = False, True
                    self.cache.replace(self.api_version, self.kind, self.namespace, {})
                    self._succeeded()
                    await asyncio.sleep(self.backoff.maximum)
                    continue
                else:
                    self._failed(exc)
                    # the first failure of a streak is a warning; the retries of an outage are not worth one each
                    log.log(logging.WARNING if attempt == 0 else logging.DEBUG,
                            "Could not list or watch a remote cluster, cluster=%s, kind=%s, attempt=%d, error=%s",
                            self.kube.name, self.kind, attempt + 1, exc)
            except Exception as exc:  # a bug or a malformed answer: never a dead informer
                self._failed(exc)
                log.exception("Informer failed, cluster=%s, kind=%s", self.kube.name, self.kind)
            if healthy:
                attempt = 0
                continue  # resume at once from the last resourceVersion
            attempt += 1
            await asyncio.sleep(self.backoff.delay(attempt))
