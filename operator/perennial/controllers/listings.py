"""The end of kopf's listings, for the cache's Replace.

kopf lists a resource, streams `Bookmark.LISTED`, then watches; after a watch it
cannot resume (410 Gone, a dropped connection past its retries) it lists again,
but tells its handlers nothing about objects that vanished in between: no
DELETED ever comes for them. client-go's reflector replaces its store with each
listing; kopf has no hook for it, so this module wraps kopf's stream (the one
function kopf's queueing calls, `kopf._cogs.clients.watching.infinite_watch`)
to collect each listing's objects and hand them to subscribers at the bookmark.
It only observes the stream: every event and bookmark passes through unchanged.
kopf is pinned (1.45.*); `tests/unit/test_listings.py` breaks if that function moves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from kopf._cogs.clients import watching

#: (resource, namespace or None, {(namespace, name): resourceVersion}) at the end of every listing
Listener = Callable[[Any, "str | None", "dict[tuple[str, str], str]"], None]

_listeners: list[Listener] = []
_original = watching.infinite_watch


async def _infinite_watch(**kwargs: Any) -> AsyncIterator[Any]:
    listed: dict[tuple[str, str], str] = {}
    async for raw in _original(**kwargs):
        if raw is watching.Bookmark.LISTED:
            for listener in list(_listeners):
                listener(kwargs["resource"], kwargs.get("namespace"), listed)
            listed = {}
        elif isinstance(raw, dict) and raw.get("type") is None:
            meta = (raw.get("object") or {}).get("metadata") or {}
            if meta.get("name"):
                listed[(meta.get("namespace") or "", meta["name"])] = str(meta.get("resourceVersion") or "")
        yield raw


def subscribe(listener: Listener) -> None:
    if watching.infinite_watch is not _infinite_watch:
        watching.infinite_watch = _infinite_watch
    if listener not in _listeners:
        _listeners.append(listener)


def unsubscribe(listener: Listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)
