"""Liveness and readiness probes (no auth: load balancers and compose healthchecks call them)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.deps import get_runtime

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live")
def live() -> dict:
    """200 while the process serves HTTP."""
    return {"status": "live"}


@router.get("/ready")
def ready(request: Request):
    """200 once the model is loaded and the journal replayed; 503 before (or after a failed start)."""
    runtime = get_runtime(request)
    if not runtime.ready:
        body = {"status": runtime.status.phase, "error": runtime.status.error}
        return JSONResponse(body, status_code=503)
    engine = runtime.engine
    return {
        "status": "ready",
        "version": engine.version,
        "model": runtime.settings.model,
        "fingerprint": engine.stack.fingerprint,
        "sha256": engine.sha256,  # targets' sha256 as written at ``version`` (compare with the journal head)
        "active_edits": len(engine.stack.active_ids),
        "methods": sorted(engine.editors),
        "default_method": engine.default_method,
        "unavailable_methods": engine.unavailable,
    }
