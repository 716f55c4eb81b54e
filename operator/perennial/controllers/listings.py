"""The operator's informer: kopf's watch streams, observed as they arrive.

kopf lists each watched resource, yields its objects, then `Bookmark.LISTED`,
then streams watch events, and lists again after a watch it cannot resume
(410 Gone, a dropped connection past its retries). It offers handlers per
object (with per-object bookkeeping that, for indices, grows with the square of
the objects on a restart) but no view of the stream itself: no end of a
listing, no deletions of objects that vanished between two listings. This
module wraps the one function kopf's queueing calls for a stream,
`kopf._cogs.clients.watching.infinite_watch`, and shows every raw event and
every listing's end to its subscribers — what client-go's reflector gives an
informer (`Add`/`Update`/`Delete`, and `Replace` at each list). It only
observes: every event and bookmark passes through to kopf unchanged. kopf is
pinned (1.45.*); `tests/unit/test_controller_machinery.py` fails if that
function moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from kopf._cogs.clients import errors as kopf_errors
from kopf._cogs.clients import watching


class Observer(Protocol):
    def observed(self, resource: Any, namespace: str | None, raw: dict[str, Any]) -> None:
        """One raw event: {"type": None (listed) | "ADDED" | "MODIFIED" | "DELETED", "object": {...}}."""

    def listed(self, resource: Any, namespace: str | None, present: dict[tuple[str, str], str]) -> None:
        """A listing ended; it held exactly `present`: (namespace, name) → resourceVersion."""


log = logging.getLogger(__name__)
_observers: list[Observer] = []
_original = watching.infinite_watch
_original_block = watching.streaming_block


@contextlib.asynccontextmanager
async def _streaming_block(**kwargs: Any) -> AsyncIterator[Any]:
    """kopf's `streaming_block` (around each stream of `infinite_watch`), without its lost cancellations.

    kopf ends the block by cancelling its pause-waiter task and awaiting it under
    `contextlib.suppress(CancelledError)`: a cancellation of the watcher that arrives during that await (the
    operator stopping while a watch ends, as after every 410 Gone) goes to the waiter, is swallowed, and the
    watcher lists and watches again, for ever: kopf waits for it without end and the operator never stops
    (SIGKILL at the end of the pod's grace period). Here the waiter is cancelled and awaited first, with
    `asyncio.wait`, which lets the watcher's own cancellation through; kopf's await then finds it done."""
    async with _original_block(**kwargs) as waiter:
        try:
            yield waiter
        finally:
            if not waiter.done():
                waiter.cancel()
                await asyncio.wait([waiter])


def _safely(method: Any, *args: Any) -> None:
    """An observer's failure is logged, never let into kopf's stream (it would end the watch)."""
    try:
        method(*args)
    except Exception:
        log.exception("A stream observer failed, observer=%r", getattr(method, "__self__", method))


#: Waits before listing a resource again that the API server no longer serves (404), until kopf stops the watch.
GONE_BACKOFF_SECONDS = (1.0, 5.0, 30.0, 60.0)


async def _infinite_watch(**kwargs: Any) -> AsyncIterator[Any]:
    resource, namespace = kwargs["resource"], kwargs.get("namespace")
    gone = 0
    while True:
        listed: dict[tuple[str, str], str] = {}
        try:
            async for raw in _original(**kwargs):
                gone = 0
                if raw is watching.Bookmark.LISTED:
                    for observer in list(_observers):
                        _safely(observer.listed, resource, namespace, listed)
                    listed = {}
                elif isinstance(raw, dict) and raw.get("type") in (None, "ADDED", "MODIFIED", "DELETED") and isinstance(raw.get("object"), dict):
                    if raw.get("type") is None:
                        meta = raw["object"].get("metadata") or {}
                        listed[(meta.get("namespace") or "", meta.get("name") or "")] = str(meta.get("resourceVersion") or "")
                    for observer in list(_observers):
                        _safely(observer.observed, resource, namespace, raw)
                    if _is_consumed(resource):
                        continue  # consumed here: kopf's per-object machinery has no handler to run for it
                yield raw
            return
        except kopf_errors.APINotFoundError:
            # The resource is no longer served (its CRD was removed): kopf's watch of CRDs stops this watch in a
            # moment; until then (or for good, without permission to watch CRDs) it is listed again now and then,
            # quietly, instead of the watcher dying with a traceback (and never coming back with the CRD).
            log.log(logging.INFO if gone == 0 else logging.DEBUG, "Paused a watch: the API server no longer serves it, resource=%s", resource)
            await asyncio.sleep(GONE_BACKOFF_SECONDS[min(gone, len(GONE_BACKOFF_SECONDS) - 1)])
            gone += 1


_consumed: dict[int, set[tuple[str, str]]] = {}  # id(observer) -> (group, plural) whose events end with it


def _is_consumed(resource: Any) -> bool:
    key = (getattr(resource, "group", None), getattr(resource, "plural", None))
    return any(key in c for c in _consumed.values())


def subscribe(observer: Observer, consumes: set[tuple[str, str]] | None = None) -> None:
    """Show `observer` every stream; events of the `consumes` resources (group, plural) end with it:
    kopf gets only their listings' ends, so its per-object machinery does no work for them."""
    if watching.infinite_watch is not _infinite_watch:
        watching.infinite_watch = _infinite_watch
    if watching.streaming_block is not _streaming_block:
        watching.streaming_block = _streaming_block
    if observer not in _observers:
        _observers.append(observer)
    _consumed[id(observer)] = set(consumes or ())


def unsubscribe(observer: Observer) -> None:
    if observer in _observers:
        _observers.remove(observer)
    _consumed.pop(id(observer), None)
