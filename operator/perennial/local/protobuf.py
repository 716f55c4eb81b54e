"""Decoding of the few protobuf request bodies imperative kubectl commands send.

``kubectl create namespace|configmap|secret|serviceaccount`` POST
``application/vnd.kubernetes.protobuf``: the magic ``k8s\\0`` and a
``runtime.Unknown`` envelope around the typed message. Only the fields those
commands set are decoded (metadata name/generateName/namespace/labels/annotations,
ConfigMap and Secret data); anything else is refused with 415 by the caller.
"""

from __future__ import annotations

import base64
from typing import Any, Iterator

MAGIC = b"k8s\x00"


class ProtobufError(ValueError):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise ProtobufError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _varint(buf, pos)
        elif wt == 2:
            n, pos = _varint(buf, pos)
            val, pos = buf[pos:pos + n], pos + n
        elif wt == 1:
            val, pos = buf[pos:pos + 8], pos + 8
        elif wt == 5:
            val, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ProtobufError(f"unsupported wire type {wt}")
        yield num, wt, val


def _map_entry(buf: bytes) -> tuple[str, bytes]:
    key, value = "", b""
    for num, _, val in _fields(buf):
        if num == 1:
            key = val.decode()
        elif num == 2:
            value = val
    return key, value


def _meta(buf: bytes) -> dict:
    meta: dict[str, Any] = {}
    for num, _, val in _fields(buf):
        if num == 1:
            meta["name"] = val.decode()
        elif num == 2:
            meta["generateName"] = val.decode()
        elif num == 3:
            meta["namespace"] = val.decode()
        elif num in (11, 12):
            k, v = _map_entry(val)
            meta.setdefault("labels" if num == 11 else "annotations", {})[k] = v.decode()
    return {k: v for k, v in meta.items() if v != ""}


def decode(body: bytes) -> dict:
    """Decode a protobuf-encoded Namespace, ConfigMap, Secret or ServiceAccount into a JSON-like dict."""
    if not body.startswith(MAGIC):
        raise ProtobufError("missing k8s protobuf magic")
    api_version = kind = ""
    raw = b""
    for num, _, val in _fields(body[len(MAGIC):]):
        if num == 1:
            for n2, _, v2 in _fields(val):
                if n2 == 1:
                    api_version = v2.decode()
                elif n2 == 2:
                    kind = v2.decode()
        elif num == 2:
            raw = val
    obj: dict[str, Any] = {"apiVersion": api_version, "kind": kind, "metadata": {}}
    if kind not in ("Namespace", "ConfigMap", "Secret", "ServiceAccount"):
        raise ProtobufError(f"protobuf bodies of kind {kind!r} are not supported; send JSON")
    for num, wt, val in _fields(raw):
        if num == 1:
            obj["metadata"] = _meta(val)
        elif kind == "ConfigMap" and num in (2, 3):
            k, v = _map_entry(val)
            if num == 2:
                obj.setdefault("data", {})[k] = v.decode()
            else:
                obj.setdefault("binaryData", {})[k] = base64.b64encode(v).decode()
        elif kind == "ConfigMap" and num == 4:
            obj["immutable"] = bool(val)
        elif kind == "Secret" and num in (2, 4):
            k, v = _map_entry(val)
            if num == 2:
                obj.setdefault("data", {})[k] = base64.b64encode(v).decode()
            else:
                obj.setdefault("stringData", {})[k] = v.decode()
        elif kind == "Secret" and num == 3:
            obj["type"] = val.decode()
        elif kind == "Secret" and num == 5:
            obj["immutable"] = bool(val)
    return obj
