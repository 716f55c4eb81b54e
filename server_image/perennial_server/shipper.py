"""Ships closed spool segments to the feedback store, at least once.

Object names are `perennial.api.records.segment_name(deployment, pod, seq, day)`:
the same local segment always maps to the same object, so a retry (or a
restarted sidecar re-shipping a segment whose upload finished just before a
crash) overwrites identical bytes. Local stores get a temp file + fsync +
rename; object stores (s3://, gs://) rely on their atomic single PUT. The local
segment is deleted only after the upload succeeded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from pathlib import Path
from typing import Callable

from perennial.api.records import segment_name

from .spool import Segment, closed_segments

log = logging.getLogger(__name__)


def _local_root(uri: str) -> Path | None:
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" not in uri:
        return Path(uri)
    return None


class Store:
    """A feedback store addressed by an fsspec URI."""

    def __init__(self, uri: str, storage_options: dict | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.local = _local_root(self.uri)
        self._fs = None
        self._root = ""
        if self.local is None:
            import fsspec

            self._fs, self._root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))

    def put(self, name: str, data: bytes) -> str:
        if self.local is not None:
            dest = self.local / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
            fd = os.open(dest.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return str(dest)
        assert self._fs is not None
        path = f"{self._root.rstrip('/')}/{name}"
        # object stores: one PUT is atomic; no temp name needed (and no rename in S3)
        self._fs.pipe_file(path, data)
        return path


class Shipper:
    def __init__(
        self,
        spool_dir: str | os.PathLike[str],
        store: Store,
        *,
        deployment: str,
        pod: str,
        interval_s: float = 2.0,
        on_shipped: Callable[[Segment, str], None] | None = None,
        on_failure: Callable[[Segment, BaseException], None] | None = None,
        on_backlog: Callable[[int, int], None] | None = None,
        before_delete: Callable[[Segment, bytes], None] | None = None,
    ) -> None:
        self.dir = Path(spool_dir)
        self.store = store
        self.deployment = deployment or "default"
        self.pod = pod or "pod"
        self.interval_s = interval_s
        self.on_shipped = on_shipped
        self.on_failure = on_failure
        self.on_backlog = on_backlog
        # called (in the shipping thread) with a shipped segment and its bytes before it leaves the spool:
        # the feedback-id journal (idempotency.py)
        self.before_delete = before_delete
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[int] | None = None
        self._backoff = 0.0
        self._stopping = False
        self.shipped = 0
        self.failures = 0

    def object_name(self, seg: Segment) -> str:
        return segment_name(self.deployment, self.pod, seg.seq, seg.when)

    def kick(self, _seg: Segment | None = None) -> None:
        self._kick.set()

    def backlog(self) -> tuple[int, int]:
        n = size = 0
        for p in self.dir.glob("*"):
            if p.suffix in (".jsonl", ".open"):
                try:
                    size += p.stat().st_size
                    n += 1
                except FileNotFoundError:
                    pass
        return n, size

    def ship_one(self, seg: Segment) -> str:
        data = seg.path.read_bytes()
        where = self.store.put(self.object_name(seg), data)
        if self.before_delete is not None:
            self.before_delete(seg, data)
        seg.path.unlink()
        return where

    def ship_all(self) -> int:
        """Ship every closed segment, oldest first; raise on the first failure."""
        done = 0
        for seg in closed_segments(self.dir):
            try:
                where = self.ship_one(seg)
            except FileNotFoundError:
                continue
            except BaseException as e:
                self.failures += 1
                if self.on_failure:
                    self.on_failure(seg, e)
                raise
            done += 1
            self.shipped += 1
            log.info("Shipped segment seq=%d object=%s", seg.seq, where)
            if self.on_shipped:
                self.on_shipped(seg, where)
        return done

    def _report_backlog(self) -> None:
        if self.on_backlog:
            self.on_backlog(*self.backlog())

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._kick.wait(), timeout=max(self.interval_s, self._backoff))
            except asyncio.TimeoutError:
                pass
            self._kick.clear()
            if self._stopping:
                return
            try:
                self._inflight = asyncio.ensure_future(asyncio.to_thread(self.ship_all))
                await asyncio.shield(self._inflight)
                self._backoff = 0.0
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                self._backoff = min(60.0, max(1.0, self._backoff * 2))
                log.warning("Failed to ship segments error=%r retry_in=%.1fs", e, self._backoff)
            await asyncio.to_thread(self._report_backlog)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="shipper")
        self._kick.set()

    async def stop(self, final_timeout_s: float = 20.0) -> None:
        self._stopping = True
        self._kick.set()
        if self._task:
            # no cancel(): on 3.11 wait_for can swallow it; the loop sees `_stopping`
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=final_timeout_s)
            except (asyncio.CancelledError, Exception):
                self._task.cancel()
        if self._inflight is not None:  # an upload in progress finishes first
            try:
                await asyncio.wait_for(asyncio.shield(self._inflight), timeout=final_timeout_s)
            except (asyncio.CancelledError, Exception):
                pass
        try:
            await asyncio.wait_for(asyncio.to_thread(self.ship_all), timeout=final_timeout_s)
        except Exception as e:
            log.warning("Left segments in the spool for the next start error=%r", e)
        self._report_backlog()
