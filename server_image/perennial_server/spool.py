"""Append-only, fsync'd segment files on the local spool dir, with group commit.

Layout of the spool dir:

    next_seq                       next segment number (survives restarts, so
                                   object names are never reused by this pod)
    <seq:08d>-<yyyymmdd>.open      the segment being written
    <seq:08d>-<yyyymmdd>.jsonl     closed segments waiting for the shipper

Writers call `append(line, durable=...)` (or `durable(line)`, which returns the
future to await). Lines accumulate in a buffer; one flusher task writes the
whole buffer with a single write and, when a durable writer is waiting, makes
it durable (group commit: every writer that arrived while the previous commit
ran shares the next one). Non-durable appends (interactions) return
immediately. Tags given with durable records are handed to `on_durable` once
per group, after its commit and before its writers are woken (per-group
bookkeeping such as metrics, instead of per record). Segments roll by size and
age; closing fsyncs the file, renames it to `.jsonl` and fsyncs the directory.

Preallocated segments: a segment is extended ahead of its records with zeros
that are written and `fdatasync`'d (64 KiB, doubling up to `PREALLOCATE_BYTES`
at a time, never past the roll size), so a commit overwrites blocks the file
already has without changing its size, and one
`pwritev(..., RWF_DSYNC)` both writes the group and makes it durable: no
journal commit of the file's size or block map per group, one syscall (and one
GIL release) on the I/O thread instead of a write and an fsync. `RWF_DSYNC`
makes only its own bytes durable, so it is used only when every byte before
them already is; after a non-durable write (interactions) a commit is a write
and an `fdatasync` of the whole file, as it is where `pwritev`/`RWF_DSYNC` are
missing (not Linux) or refused (`preallocate_bytes = 0`: O_APPEND writes and
fsyncs, no preallocation). Zero bytes never
occur in a record (JSON escapes control characters), so the first zero byte of
a segment is the end of its data: closing truncates the file there; recovery
after a crash cuts it there (and then after the last complete line). A failed
write or commit leaves bytes that may or may not reach the disk: the zeros
from its offset on are written again before the next record. A failed write or
sync may also have dropped earlier bytes not yet durable (a failed writeback
leaves its pages clean in the cache; the next sync succeeds without them): then
the segment is closed and the next record goes to a new one, never behind a
hole that recovery would end the segment at.

On start, `recover()` closes what a crashed predecessor left open, dropping a
torn final line and the zeros after the data.

Keys: a writer may hand a record's key (bytes: for feedback, its id as JSON)
with the record; the spool remembers the keys of each segment this process
writes (in the I/O thread, before the segment can close), and `take_keys(seq)`
hands them over once, when the segment leaves the spool (the shipper journals
them: idempotency.py). At most `max_keys` are held (a store outage piles up
segments; 0: none, and no entry per segment). Past that, after a write that
failed (its records may or may not be in the segment), and for segments
recovered from a predecessor, `take_keys` answers None and the caller reads the
keys from the segment's bytes.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import errno
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

_SEG_RE = re.compile(r"^(\d{8})-(\d{8})\.(open|jsonl)$")
PREALLOCATE_BYTES = 1 << 20  # zeros written ahead of the records, a chunk at a time
_RWF_DSYNC = getattr(os, "RWF_DSYNC", 0) if hasattr(os, "pwritev") else 0


@dataclass(frozen=True)
class Segment:
    path: Path
    seq: int
    day: _dt.date

    @property
    def when(self) -> _dt.datetime:
        return _dt.datetime(self.day.year, self.day.month, self.day.day, tzinfo=_dt.timezone.utc)


def parse_segment(path: Path) -> Segment | None:
    m = _SEG_RE.match(path.name)
    if not m:
        return None
    d = _dt.datetime.strptime(m.group(2), "%Y%m%d").date()
    return Segment(path=path, seq=int(m.group(1)), day=d)


def closed_segments(spool_dir: Path) -> list[Segment]:
    segs = [s for p in spool_dir.glob("*.jsonl") if (s := parse_segment(p))]
    return sorted(segs, key=lambda s: s.seq)


def data_end(data: bytes) -> int:
    """Where a segment's complete records end: before its first zero byte (preallocated space, or
    bytes that never reached the disk), after the last newline before it."""
    z = data.find(0)
    return data.rfind(b"\n", 0, len(data) if z < 0 else z) + 1


def _datasync(fd: int) -> None:
    """fdatasync (fsync where the platform has none): enough where the size did not change, and
    the size (what reads of the data need) is made durable by both."""
    (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _settle(fut: asyncio.Future, result: object, error: BaseException | None) -> None:
    if not fut.done():  # cancelled meanwhile: nothing to tell
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)


class _IOThread:
    """One thread that runs the spool's blocking calls (write, fsync, close) in order: a job costs a
    queue put and one call_soon_threadsafe, where asyncio.to_thread (the default executor) costs a
    context copy, an executor submit with its locks and two chained futures per call."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, fut, fn, args = job
            try:
                result, error = fn(*args), None
            except BaseException as e:  # noqa: BLE001 -- handed to the awaiting coroutine
                result, error = None, e
            try:
                loop.call_soon_threadsafe(_settle, fut, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def run(self, fn: Callable, *args: object) -> asyncio.Future:
        """`fn(*args)` on the thread; a future of its result."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._jobs.put((loop, fut, fn, args))
        return fut

    def stop(self) -> None:
        self._jobs.put(None)


class Spool:
    def __init__(
        self,
        spool_dir: str | os.PathLike[str],
        *,
        max_segment_bytes: int = 16 * 1024 * 1024,
        max_segment_age_s: float = 60.0,
        interaction_fsync_interval_s: float = 1.0,
        on_closed: Callable[[Segment], None] | None = None,
        on_durable: Callable[[list[str]], None] | None = None,
        coalesce_s: float = 0.0,
        max_keys: int = 200_000,
    ) -> None:
        self.dir = Path(spool_dir)
        self.max_segment_bytes = max_segment_bytes
        self.max_segment_age_s = max_segment_age_s
        self.interaction_fsync_interval_s = interaction_fsync_interval_s
        self.on_closed = on_closed
        self.on_durable = on_durable
        # non-durable records only: wait this long after the first one before writing, so that
        # one worker-thread hop writes many (a hop costs far more CPU than the write itself)
        self.coalesce_s = coalesce_s
        self._coalescing: asyncio.Future[None] | None = None
        self._buf: list[bytes] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._tags: list[str] = []
        self._keys: list[bytes] = []  # the keys of the buffered records that have one
        # seq -> keys of the records written to it (None: past `max_keys` or after a failed write: read the segment)
        self._seg_keys: dict[int, list[bytes] | None] = {}
        self._keys_held = 0
        self.max_keys = max_keys
        self._keys_lock = threading.Lock()  # the I/O thread notes, the shipper's thread takes
        # the flusher's wake-up: a future it awaits while idle (None while it works), so that an
        # append to a busy flusher costs one attribute test, not an Event.set() call
        self._wake: asyncio.Future[None] | None = None
        self._started = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._age_task: asyncio.Task[None] | None = None
        self._fd: int | None = None
        self._seg: Segment | None = None
        self._seg_bytes = 0  # the records' bytes in the open segment: its write offset
        self._zeroed = 0  # the open segment's bytes up to here are records or durable zeros
        self._stale = 0  # after a failed write: zeros are due up to here
        self._synced = 0  # every byte of the open segment before this offset is durable
        self._dsync = _RWF_DSYNC  # 0 once the filesystem refused it
        # a write or sync failed while bytes before it were not known durable: those may never reach the disk (a
        # failed writeback leaves its pages clean in the cache, and the next sync succeeds without them); recovery
        # ends a segment at its first zero byte, so nothing more is written behind them: the segment is closed first
        self._suspect = False
        self.preallocate_bytes = PREALLOCATE_BYTES
        self._seg_opened = 0.0
        self._dirty = False  # written but not fsync'd
        self._last_fsync = time.monotonic()
        self._closing = False
        self._io_lock = asyncio.Lock()
        self._io: _IOThread | None = None
        self.fsyncs = 0
        self.records = 0

    # ---------------------------------------------------------------- startup
    def recover(self) -> list[Segment]:
        """Close segments left open by a crashed predecessor (torn last line dropped)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        recovered = []
        for p in sorted(self.dir.glob("*.open")):
            seg = parse_segment(p)
            if seg is None:
                continue
            data = p.read_bytes()
            cut = data_end(data)
            if cut != len(data):
                torn = len(data[cut:].split(b"\0", 1)[0])
                if torn:
                    log.warning("Dropped torn final line of recovered segment path=%s bytes=%d", p, torn)
                with open(p, "r+b") as f:
                    f.truncate(cut)
                    f.flush()
                    os.fsync(f.fileno())
            if cut == 0:
                p.unlink()
                continue
            final = p.with_suffix(".jsonl")
            os.replace(p, final)
            recovered.append(Segment(final, seg.seq, seg.day))
        # drop empty closed segments
        for s in closed_segments(self.dir):
            if s.path.stat().st_size == 0:
                s.path.unlink()
        _fsync_dir(self.dir)
        return recovered

    def _next_seq(self) -> int:
        state = self.dir / "next_seq"
        try:
            n = int(state.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            n = 0
        for p in self.dir.iterdir():
            seg = parse_segment(p)
            if seg is not None:
                n = max(n, seg.seq + 1)
        tmp = self.dir / "next_seq.tmp"
        with open(tmp, "w") as f:
            f.write(str(n + 1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, state)
        return n

    async def start(self) -> None:
        await asyncio.to_thread(self.recover)
        self._io = _IOThread(f"spool-io-{self.dir.name}"[:15])
        self._loop = asyncio.get_running_loop()
        self._started = True
        self._task = asyncio.create_task(self._flusher(), name="spool-flusher")
        self._age_task = asyncio.create_task(self._ager(), name="spool-ager")

    # ---------------------------------------------------------------- writing
    def append_nowait(self, line: str | bytes, key: bytes | None = None) -> None:
        """Queue a record; it reaches disk with the next flush (no fsync awaited). `key`: see Keys above."""
        if self._closing:
            raise RuntimeError("spool is closed")
        b = line.encode() if isinstance(line, str) else line
        self._buf.append(b if b.endswith(b"\n") else b + b"\n")
        if key is not None:
            self._keys.append(key)
        assert self._started, "spool not started"
        if (w := self._wake) is not None:
            self._wake = None
            w.set_result(None)

    def durable(self, line: bytes, tag: str | None = None, key: bytes | None = None) -> asyncio.Future[None]:
        """Queue a record (bytes, no newline needed); the returned future is resolved once it is
        fsync'd, failed if the write or fsync failed (group commit with every other writer that
        arrives before the flusher's next write). `tag`, if given, reaches `on_durable` with the
        rest of its group once the group is durable (never for a failed group). `key`: see Keys above."""
        if self._closing:
            raise RuntimeError("spool is closed")
        self._buf.append(line + b"\n" if line[-1:] != b"\n" else line)
        assert self._loop is not None, "spool not started"
        fut = self._loop.create_future()
        self._waiters.append(fut)
        if tag is not None:
            self._tags.append(tag)
        if key is not None:
            self._keys.append(key)
        if (c := self._coalescing) is not None:
            _resolve(c)
        if (w := self._wake) is not None:
            self._wake = None
            w.set_result(None)
        return fut

    async def append(self, line: str | bytes, durable: bool = True) -> None:
        """Append a record; with `durable`, return only once it is fsync'd."""
        self.append_nowait(line)
        if durable:
            await self.sync()

    async def sync(self) -> None:
        """Return once everything appended so far is fsync'd (group commit with other waiters)."""
        if self._closing:
            raise RuntimeError("spool is closed")
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if self._coalescing is not None:
            _resolve(self._coalescing)
        assert self._started, "spool not started"
        if (w := self._wake) is not None:
            self._wake = None
            w.set_result(None)
        await fut

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the spool runs on (None before start()): its writers' futures belong to it."""
        return self._loop

    @property
    def pending(self) -> int:
        return len(self._buf)

    def take_keys(self, seq: int) -> list[bytes] | None:
        """The keys of the records this process wrote to segment `seq`, once (any thread); None where the
        spool does not hold them all (see Keys above): read them from the segment."""
        with self._keys_lock:
            keys = self._seg_keys.pop(seq, None)
            if keys is not None:
                self._keys_held -= len(keys)
            return keys

    def _note_keys(self, seq: int, keys: list[bytes] | None) -> None:
        """The I/O thread, once a batch is written to segment `seq` (before the segment can close); None: a write
        that failed, whose records may or may not be in the segment (its keys are read from its bytes)."""
        with self._keys_lock:
            held = self._seg_keys.get(seq)
            if held is None:
                return  # over the cap before (or a failed write): this segment's keys are read from its bytes
            if keys is None or self._keys_held + len(keys) > self.max_keys:
                self._seg_keys[seq] = None
                self._keys_held -= len(held)
                return
            held.extend(keys)
            self._keys_held += len(keys)

    def _open_segment(self) -> None:
        seq = self._next_seq()
        day = _dt.datetime.now(_dt.timezone.utc).date()
        path = self.dir / f"{seq:08d}-{day:%Y%m%d}.open"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | (0 if self.preallocate_bytes > 0 else os.O_APPEND), 0o640)
        try:
            _fsync_dir(self.dir)
        except BaseException:
            # never write (and acknowledge) records into a file whose directory entry is not
            # durable: drop it (empty; its number stays used) and open a new one next time
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fd = fd
        self._seg = Segment(path, seq, day)
        if self.max_keys > 0:  # (none held: no entry either, e.g. a spool nothing ships)
            with self._keys_lock:
                self._seg_keys[seq] = []
        self._seg_bytes = self._zeroed = self._synced = self._stale = 0
        self._suspect = False
        self._seg_opened = time.monotonic()

    def _close_segment(self) -> Segment | None:
        if self._fd is None or self._seg is None:
            return None
        if self.preallocate_bytes > 0:
            os.ftruncate(self._fd, self._seg_bytes)  # the preallocated zeros go (and what a failed write left)
        os.fsync(self._fd)
        self.fsyncs += 1
        os.close(self._fd)
        self._fd = None
        seg, self._seg = self._seg, None
        if self._seg_bytes == 0:
            seg.path.unlink(missing_ok=True)
            self.take_keys(seg.seq)
            _fsync_dir(self.dir)
            return None
        final = seg.path.with_suffix(".jsonl")
        os.replace(seg.path, final)
        _fsync_dir(self.dir)
        self._dirty = False
        return Segment(final, seg.seq, seg.day)

    def _sync_segment(self) -> None:
        """Runs in a worker thread: make the open segment durable (interactions, once a second)."""
        if self._fd is not None:
            try:
                if self.preallocate_bytes > 0:
                    _datasync(self._fd)
                else:
                    os.fsync(self._fd)
            except BaseException:
                self._suspect = self._synced < self._seg_bytes
                raise
            self._synced = self._seg_bytes
            self._dirty = False

    def _write_batch(self, data: bytes, sync: bool, keys: list[bytes] | None = None) -> Segment | None:
        """Runs in a worker thread: write (and make durable) one batch, note its keys, roll if due."""
        closed = None
        if self._suspect and self._fd is not None:
            closed = self._close_segment()  # see `_suspect`: what it holds stays; the batch goes to a new segment
        if self._fd is None:
            self._open_segment()
        fd = self._fd
        assert fd is not None
        now = time.monotonic()
        sync = sync or now - self._last_fsync >= self.interaction_fsync_interval_s
        try:
            if self.preallocate_bytes <= 0:
                view = memoryview(data)  # O_APPEND
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                self._seg_bytes += len(data)
                if sync:
                    os.fsync(fd)
                    self._synced = self._seg_bytes
            else:
                self._write_preallocated(fd, data, sync)
        except BaseException:
            self._suspect = self._synced < self._seg_bytes  # (preallocated: the failed bytes are zeroed again)
            if keys and self._seg is not None:
                self._note_keys(self._seg.seq, None)  # some of them may be in the segment after all: read it when it ships
            raise
        self._dirty = not sync
        if sync:
            self.fsyncs += 1
            self._last_fsync = now
        if keys:
            assert self._seg is not None
            self._note_keys(self._seg.seq, keys)
        if self._seg_bytes >= self.max_segment_bytes:
            return self._close_segment() or closed
        return closed

    def _write_preallocated(self, fd: int, data: bytes, sync: bool) -> None:
        start = self._seg_bytes
        end = start + len(data)
        zeroed = self._zeroed
        try:
            if end > zeroed:
                # zeros ahead of the records (and over what a failed write left), durable before a
                # record is written over them; the fdatasync makes every byte before `start` durable too
                # a new segment grows from 64 KiB, doubling up to `preallocate_bytes`, never past the roll size: a
                # quiet segment (rolled by age) costs little zeroing, a busy one one extension per MiB
                step = min(self.preallocate_bytes, max(zeroed, 64 << 10))
                upto = max(end, min(zeroed + step, self.max_segment_bytes), self._stale)
                self._pwrite_all(fd, bytes(upto - zeroed), zeroed, 0)
                _datasync(fd)
                self._zeroed, self._stale, self._synced = upto, 0, start
            if sync and self._dsync and self._synced == start:
                try:
                    self._pwrite_all(fd, data, start, self._dsync)  # written and durable in one call
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    self._dsync = 0  # this filesystem refuses RWF_DSYNC: a write and an fdatasync
                    self._pwrite_all(fd, data, start, 0)
                    _datasync(fd)
            else:
                self._pwrite_all(fd, data, start, 0)
                if sync:
                    _datasync(fd)
        except BaseException:
            # the bytes from `start` on may or may not reach the disk: zeros over them before the next record
            self._stale = max(self._stale, self._zeroed)
            self._zeroed = start
            raise
        self._seg_bytes = end
        if sync:
            self._synced = end

    @staticmethod
    def _pwrite_all(fd: int, data: bytes, offset: int, flags: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwritev(fd, [view], offset, flags) if flags else os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    async def _flush_once(self) -> None:
        if not self._buf and not self._waiters:
            return
        buf, self._buf = self._buf, []
        waiters, self._waiters = self._waiters, []
        tags, self._tags = self._tags, []
        keys, self._keys = self._keys, []
        data = b"".join(buf)
        try:
            async with self._io_lock:
                closed = await self._run_io(self._write_batch, data, bool(waiters), keys)
        except BaseException as e:  # disk full, I/O error: fail the waiters, keep going
            log.error("Failed to write spool batch error=%r", e)
            for w in waiters:
                if not w.done():
                    w.set_exception(OSError(f"spool write failed: {e}"))
            if isinstance(e, asyncio.CancelledError):
                raise
            await asyncio.sleep(0.1)
            return
        self.records += len(buf)
        if tags and self.on_durable is not None:
            try:
                self.on_durable(tags)
            except Exception:  # bookkeeping only: never fail (or strand) the writers over it
                log.exception("on_durable failed")
        for w in waiters:
            if not w.done():
                w.set_result(None)
        if closed is not None and self.on_closed:
            self.on_closed(closed)

    def _run_io(self, fn: Callable, *args: object) -> asyncio.Future:
        if self._io is None:  # not started (close() of a spool that never started)
            return asyncio.ensure_future(asyncio.to_thread(fn, *args))
        return self._io.run(fn, *args)

    async def _flusher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._buf and not self._waiters and not self._closing:
                self._wake = wake = loop.create_future()
                try:
                    await wake
                finally:
                    self._wake = None
            if self.coalesce_s > 0 and not self._waiters and not self._closing and len(self._buf) < 1024:
                loop = asyncio.get_running_loop()
                self._coalescing = fut = loop.create_future()
                h = loop.call_later(self.coalesce_s, _resolve, fut)
                try:
                    await fut  # ended early by a durable append or close()
                finally:
                    h.cancel()
                    self._coalescing = None
            elif self._waiters and not self._closing:
                # group commit over one more turn of the loop: the requests whose bytes the next poll
                # reads reach this fsync instead of the next one (one yield polls, the second lets
                # the handlers it woke queue their records) -- fewer, larger commits for ~1 loop turn
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            await self._flush_once()
            if self._closing and not self._buf:
                return

    async def _ager(self) -> None:
        tick = max(0.05, min(1.0, self.max_segment_age_s / 4, self.interaction_fsync_interval_s))
        while not self._closing:
            await asyncio.sleep(tick)
            if not self._closing:
                await self.roll_if_due()

    async def roll_if_due(self, force: bool = False) -> Segment | None:
        now = time.monotonic()
        async with self._io_lock:
            if self._fd is None:
                return None
            if force or now - self._seg_opened >= self.max_segment_age_s:
                closed = await self._run_io(self._close_segment)
            elif self._dirty and now - self._last_fsync >= self.interaction_fsync_interval_s:
                await self._run_io(self._sync_segment)
                self._last_fsync = now
                return None
            else:
                return None
        if closed is not None and self.on_closed:
            self.on_closed(closed)
        return closed

    async def close(self) -> None:
        """Flush everything, close the open segment (it becomes shippable)."""
        if self._closing:
            return
        self._closing = True
        # let the flusher and ager finish what they are doing (never cancel a write mid-way)
        if (w := self._wake) is not None:
            self._wake = None
            w.set_result(None)
        if self._coalescing is not None:
            _resolve(self._coalescing)
        for t in (self._task, self._age_task):
            if t:
                try:
                    await asyncio.wait_for(asyncio.shield(t), timeout=30)
                except (asyncio.CancelledError, asyncio.TimeoutError, Exception) as e:
                    log.warning("Spool task did not stop cleanly task=%s error=%r", t.get_name(), e)
        await self._flush_once()
        await self.roll_if_due(force=True)
        if self._io is not None:
            io, self._io = self._io, None  # later calls (none expected) take asyncio.to_thread
            io.stop()
