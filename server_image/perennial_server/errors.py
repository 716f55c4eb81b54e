"""OpenAI-style JSON errors: {"error": {"message", "type", "code"}}."""

from __future__ import annotations

from aiohttp import web

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


def error_body(status: int, message: str, code: str | None = None, type_: str | None = None, param: str | None = None) -> dict:
    err = {"message": message, "type": type_ or _TYPES.get(status, "invalid_request_error"), "code": code}
    if param is not None:
        err["param"] = param
    return {"error": err}


def json_error(status: int, message: str, code: str | None = None, *, type_: str | None = None, param: str | None = None, headers: dict | None = None) -> web.Response:
    return web.json_response(error_body(status, message, code, type_, param), status=status, headers=headers)
