"""`POST /v1/feedback` answers 200 only once the record is durable, tested by watching and failing fsync.

kill -9 keeps the page cache, so a crash test cannot tell a written record from a durable one.
Here every write and every sync the sidecar makes to a file is recorded, byte by byte (a plain
write makes its bytes not durable; `fsync`/`fdatasync` make the whole file durable; a write with
`RWF_DSYNC` makes its own bytes durable, and nothing else), and each can be made to fail; so are
directory fsyncs (the entries they made durable). At the moment a 200 is about to go out (aiohttp's
`on_response_prepare`, in the sidecar, before a byte of the response is sent) every byte of the
spool file from its start to the acknowledged record's last byte must be durable as it is now (a
recovered segment ends at its first byte that never reached the disk, see spool.recover), and that
file's name must be in a directory listing an earlier directory fsync made durable."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
from srvutil import TOKEN, free_port

AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Disk:
    """The file calls a spool makes (`os.write`, `os.pwrite`, `os.pwritev`, `os.ftruncate`, `os.fsync`,
    `os.fdatasync`), recorded and breakable: per regular file (inode) which bytes are durable now."""

    CALLS = ("write", "pwrite", "pwritev", "ftruncate", "fsync", "fdatasync")

    def __init__(self) -> None:
        self.real = {name: getattr(os, name) for name in self.CALLS if hasattr(os, name)}
        self.lock = threading.Lock()
        self.durable: dict[int, bytearray] = {}  # inode -> one flag per byte: 1 durable as it is now
        self.dirs: list[tuple[int, frozenset[str]]] = []  # (inode, entries before the fsync)
        self.fail_files = False
        self.fail_dirs = False
        self.dsync_writes = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in self.real:
            monkeypatch.setattr(os, name, getattr(self, name))

    def _file(self, fd: int) -> int | None:
        st = os.fstat(fd)
        return st.st_ino if stat.S_ISREG(st.st_mode) else None

    def _mark(self, ino: int, start: int, end: int, flag: int) -> None:
        with self.lock:
            d = self.durable.setdefault(ino, bytearray())
            if len(d) < end:
                d.extend(bytes(end - len(d)))
            d[start:end] = bytes([flag]) * (end - start)

    def covered(self, ino: int, end: int) -> bool:
        """Bytes [0, end) of the file are durable as they are now."""
        with self.lock:
            d = self.durable.get(ino, bytearray())
            return len(d) >= end and d.find(0, 0, end) < 0

    def _sync(self, name: str, fd: int) -> None:
        st = os.fstat(fd)
        is_dir = stat.S_ISDIR(st.st_mode)
        if self.fail_dirs if is_dir else self.fail_files:
            raise OSError(errno.EIO, "injected fsync failure")
        entries = frozenset(os.listdir(os.readlink(f"/proc/self/fd/{fd}"))) if is_dir else frozenset()
        self.real[name](fd)
        if is_dir:
            with self.lock:
                self.dirs.append((st.st_ino, entries))
        elif stat.S_ISREG(st.st_mode):
            size = os.fstat(fd).st_size
            self._mark(st.st_ino, 0, size, 1)
            with self.lock:
                del self.durable[st.st_ino][size:]

    def fsync(self, fd: int) -> None:
        self._sync("fsync", fd)

    def fdatasync(self, fd: int) -> None:
        self._sync("fdatasync", fd)

    def _written(self, fd: int, offset: int, n: int, dsync: bool) -> None:
        ino = self._file(fd)
        if ino is not None and n > 0:
            self._mark(ino, offset, offset + n, 1 if dsync else 0)
            if dsync:
                with self.lock:
                    self.dsync_writes += 1

    def write(self, fd: int, data: Any) -> int:
        ino = self._file(fd)
        if ino is None:
            return self.real["write"](fd, data)
        offset = os.fstat(fd).st_size if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND else os.lseek(fd, 0, os.SEEK_CUR)
        n = self.real["write"](fd, data)
        self._written(fd, offset, n, False)
        return n

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        n = self.real["pwrite"](fd, data, offset)
        self._written(fd, offset, n, False)
        return n

    def pwritev(self, fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        dsync = bool(flags & getattr(os, "RWF_DSYNC", 0) or flags & getattr(os, "RWF_SYNC", 0))
        if dsync and self.fail_files:
            # the bytes reach the page cache, the device reports an error: nothing of it is durable
            n = self.real["pwritev"](fd, buffers, offset, flags & ~(os.RWF_DSYNC | getattr(os, "RWF_SYNC", 0)))
            self._written(fd, offset, n, False)
            raise OSError(errno.EIO, "injected write failure")
        n = self.real["pwritev"](fd, buffers, offset, flags)
        self._written(fd, offset, n, dsync)
        return n

    def ftruncate(self, fd: int, length: int) -> None:
        self.real["ftruncate"](fd, length)
        ino = self._file(fd)
        if ino is not None:
            with self.lock:
                d = self.durable.setdefault(ino, bytearray())
                del d[length:]  # a size change is durable only after a sync: bytes past `length` are gone anyway


def where(spool_dir: Path, fid: str) -> tuple[Path, int] | None:
    """(file, offset just past the line) of the record with id `fid` in the spool, if it is there."""
    for p in sorted(spool_dir.iterdir()):
        if p.suffix not in (".open", ".jsonl"):
            continue
        offset = 0
        for line in p.read_bytes().splitlines(keepends=True):
            offset += len(line)
            try:
                if json.loads(line).get("id") == fid:
                    return p, offset
            except ValueError:
                pass
    return None


@pytest.fixture
def durable_sidecar(sidecar_factory, monkeypatch: pytest.MonkeyPatch):
    disk = Disk()
    disk.install(monkeypatch)
    acks: list[str] = []
    violations: list[str] = []
    spool_dir: list[Path] = []

    async def at_acknowledgement(request, response) -> None:
        if request.path != "/v1/feedback" or response.status != 200:
            return
        body = json.loads(response.body)
        for fid in [d["id"] for d in body["data"]] if body.get("object") == "list" else [body["id"]]:
            acks.append(fid)
            found = where(spool_dir[0], fid)
            if found is None:
                violations.append(f"{fid}: acknowledged but not in any spool file")
                continue
            path, end = found
            ino, dir_ino = path.stat().st_ino, spool_dir[0].stat().st_ino
            if not disk.covered(ino, end):
                violations.append(f"{fid}: acknowledged before every byte of {path.name} up to byte {end} was durable")
            with disk.lock:
                if not any(i == dir_ino and path.name in names for i, names in disk.dirs):
                    violations.append(f"{fid}: acknowledged before the directory entry of {path.name} was fsync'd")

    t, sc, cfg = sidecar_factory(f"http://127.0.0.1:{free_port()}", app_hook=lambda app: app.on_response_prepare.append(at_acknowledgement),
                                 segment_max_age_s=3600, store_uri="")
    spool_dir.append(Path(cfg.spool_dir))
    # no background fsync (of interactions, every second by default) may make a record durable by luck
    sc.spool.interaction_fsync_interval_s = 1e9

    def roll() -> None:
        """Close the open segment now: the next record opens a new file."""
        asyncio.run_coroutine_threadsafe(sc.spool.roll_if_due(force=True), t.loop).result(30)

    def interaction(line: bytes) -> None:
        """A captured interaction (not durable when written), written to the open segment before returning."""
        async def append() -> None:
            sc.spool.append_nowait(line)
            while sc.spool.pending:
                await asyncio.sleep(0.01)
            async with sc.spool._io_lock:  # its write has ended
                pass

        asyncio.run_coroutine_threadsafe(append(), t.loop).result(30)

    t.interaction = interaction
    t.spool_dir = spool_dir[0]
    return t, disk, acks, violations, roll


def _post(t, body: Any) -> requests.Response:
    return requests.post(t.url + "/v1/feedback", json=body, headers=AUTH, timeout=30)


def _storage_error(r: requests.Response) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json")
    e = r.json()["error"]
    assert e["code"] == "storage_unavailable" and e["message"], e


def test_feedback_is_acknowledged_only_after_fsync_of_its_file_and_directory(durable_sidecar) -> None:
    t, disk, acks, violations, roll = durable_sidecar
    sent = []
    for i in range(4):
        sent.append(f"fb-{i}")
        assert _post(t, {"id": f"fb-{i}", "response_id": f"chatcmpl-{i}", "thumbs": "up"}).status_code == 200
        if i == 1:
            roll()  # the next record goes to a new segment file: its directory entry must be made durable too
    batch = [{"id": f"fb-b{i}", "response_id": f"chatcmpl-b{i}", "score": 0.5} for i in range(3)]
    assert _post(t, batch).status_code == 200
    sent += [b["id"] for b in batch]
    assert acks == sent, "every acknowledgement was checked"
    assert not violations, violations


def test_a_failing_fsync_is_a_503_and_never_an_acknowledgement(durable_sidecar) -> None:
    t, disk, acks, violations, roll = durable_sidecar
    assert _post(t, {"id": "fb-ok-1", "response_id": "chatcmpl-1", "thumbs": "up"}).status_code == 200

    # the record's file cannot be fsync'd: a JSON 503, no 200 (then the disk recovers)
    disk.fail_files = True
    _storage_error(_post(t, {"id": "fb-lost-1", "response_id": "chatcmpl-2", "thumbs": "down"}))
    _storage_error(_post(t, [{"id": "fb-lost-2", "response_id": "chatcmpl-3", "thumbs": "down"}]))
    disk.fail_files = False
    assert _post(t, {"id": "fb-ok-2", "response_id": "chatcmpl-4", "thumbs": "up"}).status_code == 200

    # a new segment file whose directory entry cannot be fsync'd: a 503; and the records after it
    # must not be acknowledged from a file whose creation was never made durable
    roll()
    disk.fail_dirs = True
    _storage_error(_post(t, {"id": "fb-lost-3", "response_id": "chatcmpl-5", "thumbs": "down"}))
    disk.fail_dirs = False
    assert _post(t, {"id": "fb-ok-3", "response_id": "chatcmpl-6", "thumbs": "up"}).status_code == 200

    assert acks == ["fb-ok-1", "fb-ok-2", "fb-ok-3"]
    assert not violations, violations
    roll()
    # what a failed write left behind never becomes a torn or half-overwritten line of a closed segment
    ids = [r["id"] for r in _lines(t.spool_dir)]
    assert {"fb-ok-1", "fb-ok-2", "fb-ok-3"} <= set(ids) and len(ids) == len(set(ids)), ids


def _lines(spool_dir: Path) -> list[dict]:
    out = []
    for p in sorted(spool_dir.glob("*.jsonl")):
        data = p.read_bytes()
        assert b"\0" not in data, f"{p.name} holds zero bytes"
        out += [json.loads(line) for line in data.splitlines()]
    return out


def test_a_record_is_acknowledged_only_with_the_interactions_written_before_it_durable(durable_sidecar) -> None:
    """Interactions are written without a sync (durable within a second); a feedback record written after
    them must not be acknowledged while they are not durable: a recovered segment ends at the first
    byte that never reached the disk, so the record after them would be lost with them."""
    t, _, acks, violations, _ = durable_sidecar
    assert _post(t, {"id": "fb-1", "response_id": "chatcmpl-1", "thumbs": "up"}).status_code == 200
    for i in range(3):
        t.interaction(json.dumps({"kind": "interaction", "id": f"ia-{i}"}).encode())
        assert _post(t, {"id": f"fb-{i + 2}", "response_id": f"chatcmpl-{i + 2}", "thumbs": "up"}).status_code == 200
    assert acks == ["fb-1", "fb-2", "fb-3", "fb-4"]
    assert not violations, violations
