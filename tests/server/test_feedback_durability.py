"""`POST /v1/feedback` answers 200 only once the record is durable, tested by watching and failing fsync.

kill -9 keeps the page cache, so a crash test cannot tell a written record from a durable one.
Here every fsync the sidecar makes is recorded (what it covered: a file's inode and size, or a
directory's entries) and can be made to fail. At the moment a 200 is about to go out (aiohttp's
`on_response_prepare`, in the sidecar, before a byte of the response is sent) each acknowledged
record must lie in a spool file that an earlier fsync covered up to the record's last byte, and
that file's name must be in a directory listing an earlier directory fsync made durable."""

from __future__ import annotations

import asyncio
import errno
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
    """`os.fsync`, recorded and breakable."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.lock = threading.Lock()
        self.files: list[tuple[int, int]] = []  # (inode, size before the fsync: all of it is durable after)
        self.dirs: list[tuple[int, frozenset[str]]] = []  # (inode, entries before the fsync)
        self.fail_files = False
        self.fail_dirs = False

    def fsync(self, fd: int) -> None:
        st = os.fstat(fd)
        is_dir = stat.S_ISDIR(st.st_mode)
        if self.fail_dirs if is_dir else self.fail_files:
            raise OSError(errno.EIO, "injected fsync failure")
        entries = frozenset(os.listdir(os.readlink(f"/proc/self/fd/{fd}"))) if is_dir else frozenset()
        self.real(fd)
        with self.lock:
            if is_dir:
                self.dirs.append((st.st_ino, entries))
            else:
                self.files.append((st.st_ino, st.st_size))


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
    disk = Disk(os.fsync)
    monkeypatch.setattr(os, "fsync", disk.fsync)
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
            with disk.lock:
                if not any(i == ino and size >= end for i, size in disk.files):
                    violations.append(f"{fid}: acknowledged before an fsync of {path.name} covered byte {end}")
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
