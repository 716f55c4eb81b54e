"""What every controller shares: the registry, status writes, Events, metrics, error mapping."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import kopf
import pydantic

from ..api.common import GROUP, VERSION
from ..config import OperatorConfig
from ..kube import ApiError, Kube
from ..metrics import CONDITIONS, RECONCILE_SECONDS, RECONCILES
from ..resources import conditions as cond

REGISTRY = kopf.OperatorRegistry()
#: Timer intervals are fixed at import (kopf registers them then).
RESYNC_SECONDS = OperatorConfig().resync_seconds
API_VERSION = f"{GROUP}/{VERSION}"


@dataclass
class Context:
    """What a reconcile needs besides the object: the API client and operator settings."""

    kube: Kube
    config: OperatorConfig


def context(memo: Any) -> Context:
    return memo.perennial


def generation(body: Any) -> int | None:
    return body.get("metadata", {}).get("generation")


def first_error(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"`spec.{loc}`: {err['msg']}")
    return "; ".join(parts)


async def write_status(ctx: Context, body: Any, status: dict[str, Any], logger: logging.Logger) -> bool:
    """Patch the status subresource if `status` changes anything; post Events for condition transitions."""
    meta = body["metadata"]
    current = dict(body.get("status") or {})
    kind = body["kind"]
    CONDITIONS.observe(kind, meta["namespace"], meta["name"], status.get("conditions") or current.get("conditions") or [])
    if not cond.status_differs(current, status):
        return False
    posted: set[tuple[str, str]] = set()
    for c in cond.transitions(current.get("conditions"), status.get("conditions")):
        if (c["reason"], c.get("message", "")) in posted:
            continue  # two conditions moved for one reason (e.g. Waiting and Succeeded): one Event
        posted.add((c["reason"], c.get("message", "")))
        healthy = c["status"] == "True" or c["type"] not in ("Ready", "Succeeded", "Validated", "ArtifactAvailable")
        if c["status"] == "Unknown":
            healthy = True
        kopf.event(body, type="Normal" if healthy else "Warning", reason=c["reason"] or c["type"], message=c.get("message") or f"{c['type']} is {c['status']}")
    try:
        await ctx.kube.apatch_status(API_VERSION, kind, meta["namespace"], meta["name"], status)
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise
    logger.info("Updated status, kind=%s, name=%s, namespace=%s", kind, meta["name"], meta["namespace"])
    return True


def reconciler(kind: str) -> Callable[[Callable[..., Awaitable[None]]], Callable[..., Awaitable[None]]]:
    """Wrap a reconcile with metrics and error mapping: API failures requeue, nothing escapes as a retry storm."""

    def wrap(fn: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        @functools.wraps(fn)
        async def run(*args: Any, **kwargs: Any) -> None:
            started = time.perf_counter()
            result = "success"
            try:
                await fn(*args, **kwargs)
            except ApiError as exc:
                result = "error"
                if exc.status in (409, 429) or exc.status >= 500 or exc.status == 0:
                    raise kopf.TemporaryError(f"API call failed, will retry: {exc}", delay=5) from None
                raise kopf.TemporaryError(f"API call rejected: {exc}", delay=30) from None
            except kopf.TemporaryError:
                result = "requeue"
                raise
            except Exception:
                result = "error"
                raise
            finally:
                RECONCILES.labels(kind, result).inc()
                RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)

        return run

    return wrap


def forget(kind: str, body: Any) -> None:
    CONDITIONS.forget(kind, body["metadata"]["namespace"], body["metadata"]["name"])


def register(kind: str, plural: str, reconcile: Callable[[Any, Context, logging.Logger], Awaitable[None]], *, interval: float, on_update: bool = True) -> None:
    """Run `reconcile` on create, resume, spec update (unless the spec is immutable) and every `interval` seconds."""
    name = kind.lower()

    @reconciler(kind)
    async def changed(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
        await reconcile(body, context(memo), logger)

    @reconciler(kind)
    async def resync(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
        await reconcile(body, context(memo), logger)

    async def deleted(body: kopf.Body, **_: Any) -> None:
        # Children go by ownerReferences; only the metrics forget the object.
        forget(kind, body)

    events = [kopf.on.resume, kopf.on.create] + ([kopf.on.update] if on_update else [])
    for on in events:
        on(GROUP, VERSION, plural, registry=REGISTRY, id=f"{name}_changed")(changed)
    kopf.timer(GROUP, VERSION, plural, interval=interval, initial_delay=interval, registry=REGISTRY, id=f"{name}_resync")(resync)
    kopf.on.delete(GROUP, VERSION, plural, registry=REGISTRY, optional=True, id=f"{name}_deleted")(deleted)
