"""URIs: `file://`, plain paths, `pvc://<claim>/<path>`, and any fsspec protocol (s3://, gs://, ...)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from perennial.storage import fsspec_url

from .errors import TrainerError


def pvc_root() -> str:
    return os.environ.get("PERENNIAL_PVC_ROOT", "/mnt/pvc")


def resolve_uri(uri: str) -> str:
    """Map `pvc://claim/path` to `<PERENNIAL_PVC_ROOT>/claim/path` and `file://` to a path; other URIs unchanged."""
    return fsspec_url(uri, pvc_root())


def is_local(uri: str) -> bool:
    return "://" not in resolve_uri(uri)


def filesystem(uri: str):
    """(fsspec filesystem, path) for a URI, with a clear error when its protocol is unavailable."""
    import fsspec

    target = resolve_uri(uri)
    try:
        fs, path = fsspec.core.url_to_fs(target)
    except (ImportError, ValueError) as e:
        raise TrainerError(f"cannot open {uri}: {e} (is the fsspec backend for this protocol installed?)", "StorageUnavailable") from None
    return fs, path


def localize(uri: str, dest_dir: str | os.PathLike) -> str:
    """A local path holding the content of `uri` (downloaded into `dest_dir` when remote)."""
    target = resolve_uri(uri)
    if is_local(uri):
        if not os.path.exists(target):
            raise TrainerError(f"{uri} does not exist (resolved to {target})", "NotFound")
        return target
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise TrainerError(f"{uri} does not exist", "NotFound")
    dest = Path(dest_dir) / Path(path.rstrip("/")).name
    fs.get(path, str(dest), recursive=fs.isdir(path))
    return str(dest)


def upload_dir(local_dir: str | os.PathLike, uri: str) -> str:
    """Copy a local directory's content to `uri` (local path or fsspec URI). Returns the URI."""
    target = resolve_uri(uri)
    if is_local(uri):
        if os.path.abspath(target) != os.path.abspath(local_dir):
            os.makedirs(target, exist_ok=True)
            shutil.copytree(local_dir, target, dirs_exist_ok=True)
        return uri
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)
    for f in sorted(Path(local_dir).rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"{path.rstrip('/')}/{f.relative_to(local_dir).as_posix()}")
    return uri
