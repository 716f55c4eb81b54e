"""Resolving artifact and store URIs to something fsspec can open from where this process runs."""

from __future__ import annotations

import os
from urllib.parse import urlparse


def local_path(uri: str, pvc_root: str) -> str | None:
    """A local filesystem path for `file://`, absolute paths and `pvc://` (mounted under `pvc_root`); None otherwise."""
    if uri.startswith("/"):
        return uri
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return parsed.path
    if parsed.scheme == "pvc":
        return os.path.join(pvc_root, parsed.netloc, parsed.path.lstrip("/"))
    return None


def fsspec_url(uri: str, pvc_root: str) -> str:
    """A URL fsspec understands (`pvc://` mapped onto the mount)."""
    path = local_path(uri, pvc_root)
    return path if path is not None else uri


def exists(uri: str, pvc_root: str) -> bool | None:
    """Whether the object exists; None when this process cannot tell (no filesystem implementation or no access)."""
    import fsspec

    url = fsspec_url(uri, pvc_root)
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError):
        return None
    try:
        return bool(fs.exists(path))
    except (PermissionError, OSError):
        return None
