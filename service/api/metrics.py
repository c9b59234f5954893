"""Prometheus text exposition of the app's own registry (reader role when keys are configured)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.auth import require

router = APIRouter(tags=["operations"])


@router.get("/metrics", dependencies=[Depends(require("reader"))])
def metrics(request: Request) -> Response:
    """Request counts/latency per route, edits applied/rolled back, journal version, batch sizes."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
