"""A work queue of object keys, shaped like controller-runtime's (client-go's workqueue).

- a key is queued at most once, however many events name it;
- a key is processed by one worker at a time; an event during processing marks it
  dirty and it runs again right after;
- `add_after` schedules a key (the earliest request wins), for time-triggered work;
- failures back off per key, exponentially, until the key succeeds (`forget`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self, *, base_delay: float = 0.05, max_delay: float = 60.0):
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._ready: asyncio.Queue[K | None] | None = None
        self._queued: set[K] = set()
        self._processing: set[K] = set()
        self._dirty: set[K] = set()
        self._timers: dict[K, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[K, int] = {}
        self._closed = False
        self._workers = 0

    def _loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def _queue(self) -> asyncio.Queue[K | None]:
        if self._ready is None:
            self._ready = asyncio.Queue()
        return self._ready

    def __len__(self) -> int:
        return len(self._queued)

    @property
    def scheduled(self) -> int:
        return len(self._timers)

    def add(self, key: K) -> None:
        """Queue `key` now (a no-op when it is already queued)."""
        if self._closed:
            return
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer[1].cancel()
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._queue().put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        """Queue `key` in `delay` seconds, unless it is queued sooner."""
        if self._closed:
            return
        if delay <= 0:
            self.add(key)
            return
        loop = self._loop()
        when = loop.time() + delay
        current = self._timers.get(key)
        if current is not None:
            if current[0] <= when:
                return
            current[1].cancel()
        self._timers[key] = (when, loop.call_at(when, self._fire, key))

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def add_rate_limited(self, key: K, delay: float | None = None) -> float:
        """Queue `key` again after a failure: exponential per-key backoff, or the server's `delay` if larger."""
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        backoff = min(self.max_delay, self.base_delay * (2 ** n))
        wait = max(backoff, min(delay, self.max_delay)) if delay is not None else backoff
        self.add_after(key, wait)
        return wait

    def forget(self, key: K) -> None:
        self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    async def get(self) -> K | None:
        """The next key to process, or None once the queue is shut down."""
        key = await self._queue().get()
        if key is None or self._closed:
            return None
        self._queued.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: K) -> None:
        """Processing of `key` finished; re-queue it if events arrived meanwhile."""
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    async def shutdown(self) -> None:
        self._closed = True
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for _ in range(max(1, self._workers)):
            self._queue().put_nowait(None)

    async def run_workers(self, count: int, process: Callable[[K], Awaitable[None]]) -> None:
        """Run `count` workers until shutdown; `process` must not raise (errors are its to handle)."""

        async def worker() -> None:
            while (key := await self.get()) is not None:
                try:
                    await process(key)
                finally:
                    self.done(key)

        self._workers += count
        await asyncio.gather(*(worker() for _ in range(count)))
