"""Prometheus text exposition of the app's own registry (reader role when keys are configured)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.auth import require

router = APIRouter(tags=["operations"])


@router.get("/metrics", dependencies=[Depends(require("reader"))])
def metrics(request: Request) -> Response:
    """Request counts/latency per route, edits applied/rolled back, journal version, batch sizes, role and lag."""
    runtime = request.app.state.runtime
    if runtime.engine is not None:
        runtime.replication()  # role, head version and lag as of this scrape
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
