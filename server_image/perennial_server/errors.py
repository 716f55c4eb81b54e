"""OpenAI-style JSON errors: {"error": {"message", "type", "param", "code"}}.

Every error the sidecar (and the CPU engine) answers has this shape, protocol-level ones included
(a malformed request line or header, see connections.py): never plain text, never the request's bytes."""

from __future__ import annotations

import json

from aiohttp import web

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


def error_body(status: int, message: str, code: str | None = None, type_: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or _TYPES.get(status, "invalid_request_error"), "param": param, "code": code}}


def json_error(status: int, message: str, code: str | None = None, *, type_: str | None = None, param: str | None = None, headers: dict | None = None) -> web.Response:
    return web.json_response(error_body(status, message, code, type_, param), status=status, headers=headers)


_REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Payload Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


def raw_error(status: int, message: str, code: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 error response, for writing straight to a transport that is then closed
    (no request object exists: the head never completed, or the connection was refused)."""
    body = json.dumps(error_body(status, message, code)).encode()
    retry = b"" if retry_after is None else b"Retry-After: %d\r\n" % retry_after
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n%bConnection: close\r\n\r\n%b"
            % (status, _REASONS.get(status, "Error").encode(), len(body), retry, body))
