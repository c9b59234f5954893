"""create_app(): the FastAPI app, its middleware, error handlers and lifespan.

Tests inject a ``loader`` (tiny model + offline tokenizer) and an ``editors`` factory; production
uses editor_core.models and the shipped editor (see :mod:`service.runtime`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.api import console, edits, events, health, metrics, query
from service.errors import ServiceError
from service.journal import JournalConflictError
from service.metrics import Metrics
from service.runtime import EditorsFactory, Loader, Runtime
from service.settings import Settings, get_settings
from service.writer_lock import LockLostError

log = logging.getLogger("service.http")


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes`` (by Content-Length, or counted as streamed)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send)
        if declared is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            # chunked: read it here (at most max_bytes + one chunk), so that a body too large is a 413
            # and not whatever the route's body parser makes of an error raised mid-read
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return await self.app(scope, _replay([message], receive), send)
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > self.max_bytes:
                    return await self._reject(send)
            body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await self.app(scope, _replay([body], receive), send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send) -> None:
        body = json.dumps({"detail": [{"type": "too_large", "loc": ["body"],
                                       "msg": f"request body larger than max_body_bytes={self.max_bytes}"}]})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body.encode()})


class _TooLarge(Exception):
    pass


def _replay(messages: list[dict], receive):
    """An ASGI receive that hands out ``messages`` first, then defers to ``receive``."""
    pending = list(messages)

    async def replay():
        return pending.pop(0) if pending else await receive()

    return replay


def _json_safe(value):
    """Echoed input made renderable: non-finite floats as strings, lone surrogates escaped."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _is_json_type(content_type: str) -> bool:
    """application/json or any +json type, parameters ignored."""
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _error_response(status: int, code: str, message: str, **extra) -> JSONResponse:
    return JSONResponse({"detail": message, "code": code, **extra}, status_code=status)


def create_app(settings: Settings | None = None, *, loader: Loader | None = None,
               editors: EditorsFactory | None = None) -> FastAPI:
    """Build the service app. ``loader(settings)`` returns an object with ``.model``/``.tokenizer``;
    ``editors(stack, model, tokenizer, settings)`` returns {method: Editor or reason-unavailable}."""
    settings = settings or get_settings()
    app_metrics = Metrics()
    runtime = Runtime(settings, app_metrics, loader=loader, editors=editors)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.auth_enabled:
            log.warning("no API keys configured (MEND_API_KEYS): authentication is off; "
                        "serve on 127.0.0.1 only")
        runtime.start()
        try:
            yield
        finally:
            runtime.shutdown()

    app = FastAPI(
        title="mend-service",
        description="Correct facts in a served language model with MEND edits; every edit is journaled "
                    "in Redis and can be rolled back exactly.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.metrics = app_metrics
    app.include_router(health.router)
    app.include_router(query.router)
    app.include_router(edits.router)
    app.include_router(metrics.router)
    app.include_router(events.router)
    app.include_router(console.router)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        # a JSON body sent without a JSON content type (curl -d's default is a form) reaches the model as
        # a string: say what to send instead of "Input should be a valid dictionary"
        ctype = request.headers.get("content-type", "")
        if not _is_json_type(ctype) and any(tuple(e.get("loc", ())) == ("body",) for e in err.errors()):
            return _error_response(415, "unsupported_media_type",
                                   f"the body must be JSON sent with 'Content-Type: application/json' (got "
                                   f"{ctype or 'none'!r}; with curl: -H 'content-type: application/json'); "
                                   "nothing was applied")
        # FastAPI's own handler echoes the input, and a NaN or a lone surrogate in it cannot be rendered
        return JSONResponse({"detail": _json_safe(jsonable_encoder(err.errors()))}, status_code=422)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, err: ServiceError):
        return _error_response(err.status, err.code, err.message, **err.extra)

    @app.exception_handler(LockLostError)
    async def lock_lost(request: Request, err: LockLostError):
        return _error_response(503, "writer_unavailable", str(err))

    @app.exception_handler(JournalConflictError)
    async def journal_conflict(request: Request, err: JournalConflictError):
        return _error_response(503, "journal_conflict", f"{err}; nothing was applied")

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, err: redis.RedisError):
        log.error("redis error", extra={"error": str(err), "path": request.url.path})
        return _error_response(503, "journal_unavailable", "the journal (Redis) is unavailable; nothing was applied "
                               "(if Redis went away during the journal write itself, the write may have landed: "
                               "this instance then applies it before its next write; a retry with the same "
                               "idempotency_key returns it)")

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(request.scope.get("route"), "path", "unmatched")
            app_metrics.requests.labels(route=route, method=request.method, status=str(status)).inc()
            app_metrics.latency.labels(route=route, method=request.method).observe(elapsed)
            if not route.startswith("/health") and route != "/metrics":
                log.info("request", extra={"method": request.method, "route": route, "status": status,
                                           "ms": round(elapsed * 1000, 1),
                                           "principal": getattr(request.state, "principal", None)})

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
