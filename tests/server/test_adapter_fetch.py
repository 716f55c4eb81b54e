"""Adapter fetches from object stores are bounded (issue 12): a listing stops once it passes the file limit (a prefix
holding millions of objects never sits in the sidecar's memory), and every fetch ends within
`--adapter-fetch-timeout-s`, so a store that stops answering fails one routes document (reported at
`/perennial/routes`, retried) instead of holding the routes for ever.

s3fs and gcsfs are not installed here: the stores are fakes with the very methods the sidecar calls
(`S3FileSystem._iterdir(bucket, max_items=, delimiter=, prefix=)`, a paginator with MaxItems, and
`GCSFileSystem._do_list_objects(path, max_results=, delimiter=)`, as in s3fs and gcsfs today), each holding an
endless number of objects unless the caller bounds what it asks for."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import pytest
import requests
from fsspec.asyn import AsyncFileSystem
from routesutil import FakeEngine, applied, doc, make_adapter_dir, routes_state, wait_until


UNBOUNDED = 100_000  # what "endless" stands for here (a real prefix may hold millions)


class SlowFile:
    """A file that trickles 1 KiB every 0.2 s, for ever."""

    def __enter__(self) -> SlowFile:
        return self

    def __exit__(self, *a: Any) -> None:
        pass

    def read(self, n: int = -1) -> bytes:
        time.sleep(0.2)
        return b"x" * 1024

    def close(self) -> None:
        pass


class FakeS3(AsyncFileSystem):
    """An s3fs stand-in: `_iterdir` yields objects until `max_items` (the paginator's MaxItems) says stop."""

    protocol = ("s3", "s3a")
    cachable = False
    yielded: ClassVar[int] = 0
    hang: ClassVar[bool] = False
    objects: ClassVar[int | None] = None  # None: endless

    def split_path(self, path: str) -> tuple[str, str, None]:
        bucket, _, key = self._strip_protocol(path).partition("/")
        return bucket, key, None

    async def _iterdir(self, bucket: str, max_items: int | None = None, delimiter: str = "/", prefix: str = "", versions: bool = False):
        assert delimiter == "", "a recursive listing (no delimiter)"
        n = 0
        while n < (self.objects or UNBOUNDED):
            if self.hang:
                await asyncio.sleep(3600)
            n += 1
            type(self).yielded += 1
            yield {"name": f"{bucket}/{prefix}f{n}", "size": 100, "type": "file"}
            if max_items is not None and n >= max_items:
                return

    def _open(self, path: str, mode: str = "rb", **kw: Any) -> SlowFile:
        return SlowFile()

    async def _find(self, path: str, maxdepth: Any = None, withdirs: Any = None, detail: bool = False, **kw: Any) -> Any:
        """s3fs's `find`: one listing without a delimiter, every page collected (`_lsdir` -> `_iterdir`, no max_items)."""
        bucket, key, _ = self.split_path(path)
        out = {c["name"]: c async for c in self._iterdir(bucket, delimiter="", prefix=key.rstrip("/") + "/")}
        return out if detail else list(out)


class FakeGCS(AsyncFileSystem):
    """A gcsfs stand-in: `_do_list_objects` returns as many objects as `max_results` asks for (endless otherwise)."""

    protocol = ("gs", "gcs")
    cachable = False
    calls: ClassVar[list[dict]] = []

    async def _do_list_objects(self, path: str, max_results: int | None = None, delimiter: str = "/", prefix: str = "", versions: bool = False, **kw: Any):
        type(self).calls.append({"path": path, "max_results": max_results, "delimiter": delimiter})
        return [{"name": f"{path}/f{i}", "size": 1, "type": "file"} for i in range(max_results or UNBOUNDED)], []

    async def _find(self, path: str, maxdepth: Any = None, withdirs: Any = None, detail: bool = False, **kw: Any) -> Any:
        """gcsfs's `find`: `_do_list_objects(path, delimiter="")`, every page."""
        items, _ = await self._do_list_objects(self._strip_protocol(path), delimiter="")
        out = {i["name"]: i for i in items}
        return out if detail else list(out)


@pytest.fixture
def stores(monkeypatch: pytest.MonkeyPatch) -> Any:
    from fsspec.registry import _registry

    for proto in FakeS3.protocol:
        monkeypatch.setitem(_registry, proto, FakeS3)
    for proto in FakeGCS.protocol:
        monkeypatch.setitem(_registry, proto, FakeGCS)
    FakeS3.yielded, FakeS3.hang, FakeS3.objects, FakeGCS.calls = 0, False, None, []
    yield
    FakeS3.hang = False


def test_an_endless_s3_prefix_is_listed_only_up_to_the_file_limit(stores: Any, tmp_path: Path) -> None:
    from perennial_server.routes import fetch_adapter

    with pytest.raises(ValueError, match="more than 10 files"):
        fetch_adapter("big", "s3://bucket/adapters/big", tmp_path / "adapters", max_bytes=1 << 30, max_files=10, timeout_s=60)
    assert FakeS3.yielded <= 11, FakeS3.yielded
    assert not (tmp_path / "adapters" / "big").exists()


def test_an_endless_gcs_prefix_is_listed_only_up_to_the_file_limit(stores: Any, tmp_path: Path) -> None:
    from perennial_server.routes import fetch_adapter

    with pytest.raises(ValueError, match="more than 10 files"):
        fetch_adapter("big", "gs://bucket/adapters/big", tmp_path / "adapters", max_bytes=1 << 30, max_files=10, timeout_s=60)
    assert FakeGCS.calls == [{"path": "bucket/adapters/big", "max_results": 11, "delimiter": ""}]


def test_an_in_memory_listing_stops_between_folders(tmp_path: Path) -> None:
    from perennial_server.routes import fetch_adapter

    mem = fsspec.filesystem("memory")
    for d in range(40):
        for f in range(5):
            mem.pipe(f"/many-{tmp_path.name}/d{d:02d}/f{f}", b"x")
    listed: list[str] = []
    real_ls = type(mem).ls

    def ls(self: Any, path: str, detail: bool = True, **kw: Any) -> Any:
        listed.append(path)
        return real_ls(self, path, detail=detail, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(mem), "ls", ls)
        with pytest.raises(ValueError, match="more than 12 files"):
            fetch_adapter("many", f"memory://many-{tmp_path.name}", tmp_path / "adapters", max_bytes=1 << 20, max_files=12, timeout_s=60)
    assert len(listed) <= 5, listed  # the root and the few folders that passed the limit, not all 40


def test_a_store_that_trickles_is_cut_at_the_deadline(stores: Any, tmp_path: Path) -> None:
    from perennial_server.routes import FetchTimeout, fetch_adapter

    FakeS3.objects = 1
    with pytest.raises(FetchTimeout, match="adapter_fetch_timeout_s=1"):
        fetch_adapter("slow", "s3://bucket/adapters/slow", tmp_path / "adapters", max_bytes=1 << 30, timeout_s=1)
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == []  # its temporary folder is gone too


def test_a_store_that_stops_answering_fails_one_document_not_the_routes(stores: Any, fake: FakeEngine, routed, tmp_path: Path) -> None:
    a1, a2 = make_adapter_dir(tmp_path, "a1"), make_adapter_dir(tmp_path, "a2")
    t, _, kd = routed(doc("r1", {"a1": a1}, {"svc": [("a1", 100)]}), adapter_fetch_timeout_s=1.0)
    applied(t, "r1")
    FakeS3.hang = True  # the listing never answers
    kd.write(doc("r2", {"a1": a1, "stuck": "s3://bucket/adapters/stuck"}, {"svc": [("a1", 100)], "new": [("stuck", 100)]}))
    st = wait_until(lambda: (s := routes_state(t))["errors"].get("stuck") and s, what="the stuck fetch reported")
    assert "adapter_fetch_timeout_s=1" in st["errors"]["stuck"] and st["revision"] == "r1" and st["pending"] == "r2"
    assert requests.get(t.url + "/readyz", timeout=30).status_code == 200
    # the next document is applied: the routes were never held by the stuck store
    kd.write(doc("r3", {"a1": a1, "a2": a2}, {"svc": [("a2", 100)]}))
    applied(t, "r3")
    assert ("load", "stuck") not in fake.calls


def test_adapter_fetch_timeout_flag() -> None:
    from perennial_server.cli import build_parser
    from perennial_server.config import sidecar_config_from_args

    assert sidecar_config_from_args(build_parser().parse_args(["sidecar"])).adapter_fetch_timeout_s == 600
    with pytest.raises(ValueError, match="adapter_fetch_timeout_s"):
        sidecar_config_from_args(build_parser().parse_args(["sidecar", "--adapter-fetch-timeout-s", "0"]))
