"""The feedback sidecar: the pod's front door, in front of the engine on localhost.

Kept as the import path of the sidecar's entrypoint; the parts live in:
    api_server.py        routes, lifecycle, serve()/main()
    serving_feedback.py  POST /v1/feedback
    proxy.py             everything proxied to the engine
    capture.py           interaction records
    protocol.py          request models
    middleware.py        auth, rate limit, body reading, JSON errors
    connections.py       client connection timeouts and limits
    idempotency.py       feedback ids already stored
"""

from __future__ import annotations

from .api_server import Sidecar, loop_factory, main, serve
from .capture import Capture, assemble_json, assemble_stream, sse_data
from .metrics import Metrics
from .middleware import RateLimiter, TokenFile, read_body

__all__ = ["Capture", "Metrics", "RateLimiter", "Sidecar", "TokenFile", "assemble_json", "assemble_stream", "loop_factory", "main", "read_body", "serve", "sse_data"]
