"""Liveness and readiness probes (no auth: load balancers and compose healthcheck call them).

On a replica ``/health/ready`` is 200 only while it is within ``MEND_REPLICA_MAX_LAG_OPS`` ops and
``MEND_REPLICA_MAX_LAG_S`` seconds of the journal head (503 ``lagging`` otherwise, with the figures):
a load balancer then sends queries elsewhere while it catches up. Both roles report their role,
applied and head versions and lag.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.deps import get_runtime
from service.methods import default_method_reason

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live")
def live() -> dict:
    """200 while the process serves HTTP."""
    return {"status": "live"}


@router.get("/ready")
def ready(request: Request):
    """200 once the model is loaded and the journal replayed (and, on a replica, within the allowed lag);
    503 before, after a failed start, or while a replica lags."""
    runtime = get_runtime(request)
    if not runtime.ready:
        body = {"status": runtime.status.phase, "error": runtime.status.error}
        return JSONResponse(body, status_code=503)
    engine = runtime.engine
    s = runtime.settings
    replication = runtime.replication()
    body = {
        "status": "ready",
        "version": engine.version,
        "model": s.model,
        "fingerprint": engine.stack.fingerprint,
        "sha256": engine.sha256,  # targets' sha256 as written at ``version`` (compare with the journal head)
        "active_edits": len(engine.stack.active_ids),
        "device": str(next(engine.model.parameters()).device),
        "dtype": str(next(engine.model.parameters()).dtype).removeprefix("torch."),
        "methods": sorted(engine.editors),  # what this model can be edited with
        "default_method": engine.default_method,
        "default_method_reason": default_method_reason(s.default_method, engine.default_method, engine.unavailable),
        "unavailable_methods": engine.unavailable,  # method -> why not (e.g. no MEND editor for this model)
        **replication,
    }
    if replication["role"] != "writer":
        body["writer_url"] = runtime.roles.writer_url()
        too_far = replication["lag_ops"] > s.replica_max_lag_ops or replication["lag_s"] > s.replica_max_lag_s
        if too_far:
            body["status"] = "lagging"
            body["error"] = (f"{replication['lag_ops']} ops and {replication['lag_s']:.1f}s behind the journal head "
                             f"(allowed: {s.replica_max_lag_ops} ops, {s.replica_max_lag_s:g}s)")
            return JSONResponse(body, status_code=503)
    return body
