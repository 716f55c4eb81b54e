"""Spool (group commit, rolling, crash recovery) and shipper: unit level."""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import json
import os
from pathlib import Path

import pytest
from perennial.api.records import segment_name
from perennial_server.shipper import Shipper, Store
from perennial_server.spool import Spool, closed_segments


async def test_group_commit_batches_concurrent_durable_writers(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_segment_bytes=1 << 30, max_segment_age_s=3600)
    await sp.start()
    n = 3000
    await asyncio.gather(*(sp.append(json.dumps({"i": i}), durable=True) for i in range(n)))
    assert sp.fsyncs < n / 10, f"{sp.fsyncs} fsyncs for {n} durable records: no group commit"
    await sp.close()
    lines = [json.loads(x) for s in closed_segments(tmp_path) for x in s.path.read_text().splitlines()]
    assert sorted(r["i"] for r in lines) == list(range(n))


async def test_coalescing_batches_interactions_and_never_delays_a_durable_append(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_segment_bytes=1 << 30, max_segment_age_s=3600, coalesce_s=10.0)
    await sp.start()
    writes = 0
    real = sp._write_batch

    def counting(data: bytes, sync: bool, keys: list[bytes] | None = None):
        nonlocal writes
        writes += 1
        return real(data, sync, keys)

    sp._write_batch = counting  # type: ignore[method-assign]
    for i in range(50):
        sp.append_nowait(json.dumps({"i": i}))
        await asyncio.sleep(0)
    assert writes == 0 and sp.pending == 50  # still coalescing
    # a durable append ends the wait at once and takes the interactions with it, in one write
    await asyncio.wait_for(sp.append(json.dumps({"i": 50}), durable=True), timeout=8)  # well under the 10 s wait
    assert writes == 1 and sp.pending == 0
    sp.append_nowait(json.dumps({"i": 51}))
    await asyncio.sleep(0)
    await asyncio.wait_for(sp.close(), timeout=8)  # close ends it too
    lines = [json.loads(x) for s in closed_segments(tmp_path) for x in s.path.read_text().splitlines()]
    assert [r["i"] for r in lines] == list(range(52))


async def test_segments_roll_by_size_and_age_and_never_reuse_numbers(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_segment_bytes=200, max_segment_age_s=3600)
    await sp.start()
    for i in range(40):
        await sp.append(json.dumps({"i": i, "pad": "x" * 20}), durable=True)
    await sp.close()
    segs = closed_segments(tmp_path)
    assert len(segs) >= 5 and [s.seq for s in segs] == list(range(len(segs)))
    for s in segs:
        s.path.unlink()  # as if shipped
    sp2 = Spool(tmp_path, max_segment_bytes=1 << 20, max_segment_age_s=0.2)
    await sp2.start()
    sp2.append_nowait('{"late": 1}')
    for _ in range(400):  # rolled by age (polled: a loaded machine may take a while)
        if closed_segments(tmp_path):
            break
        await asyncio.sleep(0.05)
    segs2 = closed_segments(tmp_path)
    assert len(segs2) == 1 and segs2[0].seq == len(segs), "a restarted spool continues the numbering"
    await sp2.close()


def test_recover_closes_open_segment_and_drops_torn_line(tmp_path: Path) -> None:
    (tmp_path / "00000007-20260102.open").write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": 3, "tor')
    (tmp_path / "00000008-20260102.open").write_bytes(b'{"only": "torn')
    Spool(tmp_path).recover()
    segs = closed_segments(tmp_path)
    assert [s.seq for s in segs] == [7]
    assert segs[0].path.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    assert segs[0].when == dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)


def test_recover_reads_a_preallocated_segment_up_to_its_first_zero_byte(tmp_path: Path) -> None:
    """A preallocated segment ends in zeros; after a crash, bytes written after the last commit may
    have reached the disk while earlier ones did not (zeros in between): the data ends at the first
    zero byte, and after the last complete line before it."""
    zeros = bytes(4096)
    (tmp_path / "00000001-20260102.open").write_bytes(b'{"a": 1}\n{"b": 2}\n' + zeros)  # a zero tail
    (tmp_path / "00000002-20260102.open").write_bytes(b'{"c": 3}\n{"d": 4, "to' + zeros)  # a torn line, then zeros
    (tmp_path / "00000003-20260102.open").write_bytes(b'{"e": 5}\n' + zeros + b'{"never": "acknowledged"}\n' + zeros)
    (tmp_path / "00000004-20260102.open").write_bytes(zeros)  # opened, nothing written
    Spool(tmp_path).recover()
    assert {s.seq: s.path.read_bytes() for s in closed_segments(tmp_path)} == {1: b'{"a": 1}\n{"b": 2}\n', 2: b'{"c": 3}\n', 3: b'{"e": 5}\n'}
    assert not list(tmp_path.glob("*.open"))


async def test_closed_segments_hold_no_preallocated_zeros(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_segment_bytes=3000, max_segment_age_s=3600)
    sp.preallocate_bytes = 1000  # several extensions per segment
    await sp.start()
    for i in range(60):
        await sp.append(json.dumps({"i": i, "pad": "x" * 40}), durable=i % 3 == 0)
    await sp.close()
    segs = closed_segments(tmp_path)
    assert len(segs) > 1
    data = b"".join(s.path.read_bytes() for s in segs)
    assert b"\0" not in data
    assert [json.loads(x)["i"] for x in data.splitlines()] == list(range(60))


async def test_a_segment_is_preallocated_from_64_kib_doubling_to_one_mib(tmp_path: Path) -> None:
    """A quiet segment (rolled by age) is not given a whole MiB of zeros to write; a busy one grows by doubling."""
    sp = Spool(tmp_path, max_segment_bytes=16 << 20, max_segment_age_s=3600)
    await sp.start()
    await sp.append(json.dumps({"i": 0}), durable=True)
    (p,) = tmp_path.glob("*.open")
    sizes = [p.stat().st_size]
    written = len(json.dumps({"i": 0})) + 1
    while written < 3 << 20:
        line = json.dumps({"pad": "x" * 30000})
        await sp.append(line, durable=True)
        written += len(line) + 1
        if p.stat().st_size != sizes[-1]:
            sizes.append(p.stat().st_size)
    assert sizes[:5] == [64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20], sizes
    assert all(b - a == 1 << 20 for a, b in zip(sizes[4:], sizes[5:])), sizes
    await sp.close()
    (seg,) = closed_segments(tmp_path)
    assert seg.path.stat().st_size == written


async def test_a_failed_write_leaves_nothing_a_crash_recovery_could_read_as_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails may still leave its bytes in the file; the next, shorter record written at the same
    offset must not leave the rest of them behind it (a crash would recover them as a torn or foreign line)."""
    sp = Spool(tmp_path / "spool", max_segment_bytes=1 << 20, max_segment_age_s=3600)
    await sp.start()
    await sp.append(json.dumps({"i": 0}), durable=True)
    real_pwritev, real_pwrite, fail = os.pwritev, os.pwrite, [True]

    def failing(vectored: bool):
        def call(fd: int, data, offset: int, flags: int = 0) -> int:
            n = real_pwritev(fd, data, offset, flags) if vectored else real_pwrite(fd, data, offset)  # the bytes land ...
            if fail[0] and b"lost" in (b"".join(map(bytes, data)) if vectored else bytes(data)):
                raise OSError(errno.EIO, "injected write failure")  # ... but the device reports an error
            return n
        return call

    monkeypatch.setattr(os, "pwritev", failing(True))
    monkeypatch.setattr(os, "pwrite", failing(False))
    with pytest.raises(OSError):
        await sp.append(json.dumps({"i": "lost", "pad": "y" * 200}), durable=True)
    fail[0] = False
    await sp.append(json.dumps({"i": 1}), durable=True)
    # kill -9 now: the open segment as the page cache holds it
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for p in (tmp_path / "spool").glob("*.open"):
        (crashed / p.name).write_bytes(p.read_bytes())
    Spool(crashed).recover()
    lines = [json.loads(x) for s in closed_segments(crashed) for x in s.path.read_bytes().splitlines()]
    assert [r["i"] for r in lines] == [0, 1]
    await sp.close()


class FlakyStore(Store):
    def __init__(self, uri: str, fail: int) -> None:
        super().__init__(uri)
        self.fail = fail

    def put(self, name: str, data: bytes) -> str:
        if self.fail > 0:
            self.fail -= 1
            raise OSError("store unavailable")
        return super().put(name, data)


def test_shipper_keeps_segments_until_upload_succeeds(tmp_path: Path) -> None:
    spool, store = tmp_path / "spool", tmp_path / "store"
    spool.mkdir()
    (spool / "00000003-20260105.jsonl").write_text('{"x": 1}\n')
    sh = Shipper(spool, FlakyStore(f"file://{store}", fail=1), deployment="demo", pod="p-1")
    with pytest.raises(OSError):
        sh.ship_all()
    assert sh.failures == 1 and (spool / "00000003-20260105.jsonl").exists()
    assert sh.ship_all() == 1 and not list(spool.iterdir())
    expect = store / segment_name("demo", "p-1", 3, dt.datetime(2026, 1, 5, tzinfo=dt.timezone.utc))
    assert expect.read_text() == '{"x": 1}\n'
    assert not [p for p in store.rglob("*") if p.name.endswith(".tmp")]


def test_store_over_fsspec_memory_filesystem() -> None:
    import fsspec

    st = Store("memory://perennial-test/fb")
    st.put("demo/2026/01/05/p-00000001.jsonl", b'{"x": 1}\n')
    assert fsspec.filesystem("memory").cat_file("/perennial-test/fb/demo/2026/01/05/p-00000001.jsonl") == b'{"x": 1}\n'


class _WritebackDisk:
    """What reaches the disk of each spool file: bytes written stay in the page cache until an `fdatasync`/`fsync`
    (or their own `RWF_DSYNC` write) succeeds. A sync that fails leaves its pages clean in the cache (Linux: the
    next sync of the file succeeds without writing them: "fsyncgate"), so those bytes never reach the disk."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = {n: getattr(os, n) for n in ("write", "pwrite", "pwritev", "fdatasync", "fsync", "ftruncate")}
        self.dirty: dict[int, list[tuple[int, int]]] = {}  # inode -> byte ranges written, not on disk
        self.disk: dict[int, bytearray] = {}
        self.fail_sync = False
        for n in self.real:
            monkeypatch.setattr(os, n, getattr(self, n))

    def _ino(self, fd: int) -> int | None:
        st = os.fstat(fd)
        return st.st_ino if st.st_mode & 0o170000 == 0o100000 else None

    def _to_disk(self, fd: int, ino: int, start: int, end: int) -> None:
        d = self.disk.setdefault(ino, bytearray())
        if len(d) < end:
            d.extend(bytes(end - len(d)))
        r = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)  # the spool's descriptor is write-only
        try:
            d[start:end] = os.pread(r, end - start, start).ljust(end - start, b"\0")
        finally:
            os.close(r)

    def write(self, fd: int, data) -> int:
        ino = self._ino(fd)
        offset = os.fstat(fd).st_size  # the spool's plain writes are O_APPEND
        n = self.real["write"](fd, data)
        if ino is not None:
            self.dirty.setdefault(ino, []).append((offset, offset + n))
        return n

    def pwrite(self, fd: int, data, offset: int) -> int:
        n = self.real["pwrite"](fd, data, offset)
        if (ino := self._ino(fd)) is not None:
            self.dirty.setdefault(ino, []).append((offset, offset + n))
        return n

    def pwritev(self, fd: int, buffers, offset: int, flags: int = 0) -> int:
        n = self.real["pwritev"](fd, buffers, offset, flags)
        if (ino := self._ino(fd)) is not None:
            if flags & getattr(os, "RWF_DSYNC", 0):
                self._to_disk(fd, ino, offset, offset + n)
            else:
                self.dirty.setdefault(ino, []).append((offset, offset + n))
        return n

    def _sync(self, name: str, fd: int) -> None:
        ino = self._ino(fd)
        if ino is not None and self.fail_sync:
            self.dirty.pop(ino, None)  # written back in vain: clean in the cache, never on the disk
            raise OSError(errno.EIO, "injected writeback failure")
        self.real[name](fd)
        for start, end in self.dirty.pop(ino, []) if ino is not None else ():
            self._to_disk(fd, ino, start, end)

    def fdatasync(self, fd: int) -> None:
        self._sync("fdatasync", fd)

    def fsync(self, fd: int) -> None:
        self._sync("fsync", fd)

    def ftruncate(self, fd: int, length: int) -> None:
        self.real["ftruncate"](fd, length)
        if (ino := self._ino(fd)) is not None:
            del self.disk.setdefault(ino, bytearray())[length:]

    def crash(self, spool_dir: Path, into: Path) -> None:
        """kill -9 and a power cut: each open segment as its disk holds it."""
        into.mkdir()
        for p in spool_dir.glob("*.open"):
            (into / p.name).write_bytes(bytes(self.disk.get(os.stat(p).st_ino, b"")))


@pytest.mark.parametrize("preallocate", [1 << 20, 0])
async def test_a_failed_sync_never_costs_a_later_acknowledged_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preallocate: int) -> None:
    """Interactions are written without a sync; a rating's sync that fails leaves their pages clean in the cache but
    not on the disk (the preallocated zeros stay there). A later rating acknowledged after a successful sync must
    survive a crash: recovery ends a segment at its first zero byte, so the spool must not go on writing behind bytes
    it cannot know are on the disk."""
    disk = _WritebackDisk(monkeypatch)
    sp = Spool(tmp_path / "spool", max_segment_bytes=1 << 20, max_segment_age_s=3600, interaction_fsync_interval_s=3600)
    sp.preallocate_bytes = preallocate
    await sp.start()
    await sp.append(json.dumps({"i": "durable-0"}), durable=True)
    await sp.append(json.dumps({"i": "interaction"}), durable=False)
    while sp.pending:  # written (to the cache), not synced
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    disk.fail_sync = True
    with pytest.raises(OSError):
        await sp.append(json.dumps({"i": "refused"}), durable=True)
    disk.fail_sync = False
    await sp.append(json.dumps({"i": "acknowledged"}), durable=True)
    disk.crash(tmp_path / "spool", tmp_path / "crashed")
    for seg in closed_segments(tmp_path / "spool"):  # a segment closed meanwhile: its disk image too
        (tmp_path / "crashed" / seg.path.name).write_bytes(bytes(disk.disk.get(os.stat(seg.path).st_ino, b"")))
    Spool(tmp_path / "crashed").recover()
    recovered = [json.loads(x)["i"] for s in closed_segments(tmp_path / "crashed") for x in s.path.read_bytes().splitlines() if x.strip(b"\0")]
    assert "durable-0" in recovered and "acknowledged" in recovered, recovered
    await sp.close()


async def test_the_spool_hands_each_segments_keys_over_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys given with records (feedback ids, for the shipper's journal) come back per segment, exactly those of
    the records in it, once; past `max_keys`, after a failed write, and for a predecessor's segments, None (read
    the segment instead)."""
    sp = Spool(tmp_path, max_segment_bytes=300, max_segment_age_s=3600, max_keys=1000)
    await sp.start()
    for i in range(30):
        sp.append_nowait(json.dumps({"interaction": i}))  # no key
        if i % 3:
            await sp.durable(json.dumps({"k": f"k{i}"}).encode(), key=f'"k{i}"'.encode())
        else:
            sp.append_nowait(json.dumps({"k": f"k{i}"}), key=f'"k{i}"'.encode())
    await sp.close()
    segs = closed_segments(tmp_path)
    assert len(segs) >= 3, "the records should span several segments"
    for s in segs:
        expected = [json.dumps(r["k"]).encode() for r in map(json.loads, s.path.read_text().splitlines()) if "k" in r]
        assert sp.take_keys(s.seq) == expected, s.path.name
        assert sp.take_keys(s.seq) is None, "handed over once"
    assert sp._keys_held == 0

    capped = Spool(tmp_path / "capped", max_segment_bytes=1 << 20, max_segment_age_s=3600, max_keys=5)
    await capped.start()
    for i in range(10):
        await capped.durable(b'{"k":1}', key=b'"k"')
    await capped.close()
    (seg,) = closed_segments(tmp_path / "capped")
    assert capped.take_keys(seg.seq) is None and capped._keys_held == 0

    unkept = Spool(tmp_path / "unkept", max_segment_bytes=20, max_segment_age_s=3600, max_keys=0)
    await unkept.start()
    for i in range(10):
        await unkept.durable(b'{"k":1}', key=b'"k"')
    await unkept.close()
    assert len(closed_segments(tmp_path / "unkept")) > 1 and unkept._seg_keys == {}, "nothing held per segment when no keys are kept"

    failing = Spool(tmp_path / "failing", max_segment_bytes=1 << 20, max_segment_age_s=3600)
    failing.preallocate_bytes = 0  # O_APPEND: a batch whose fsync fails stays in the segment
    await failing.start()
    await failing.durable(b'{"k":"a"}', key=b'"a"')
    real_fsync = os.fsync

    def refuse(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fsync", refuse)
    with pytest.raises(OSError):
        await failing.durable(b'{"k":"b"}', key=b'"b"')
    monkeypatch.setattr(os, "fsync", real_fsync)
    await failing.close()
    first = closed_segments(tmp_path / "failing")[0]
    assert b'"b"' in first.path.read_bytes() and failing.take_keys(first.seq) is None

    again = Spool(tmp_path, max_segment_bytes=300, max_segment_age_s=3600)
    await again.start()
    assert all(again.take_keys(s.seq) is None for s in segs), "a predecessor's segments: read from their bytes"
    await again.close()
