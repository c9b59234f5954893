"""Shared route helpers: the runtime, readiness, and awaiting the model worker with a timeout."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

from fastapi import HTTPException, Request

from service.errors import NotReadyError
from service.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    """The app's runtime."""
    return request.app.state.runtime


def ready_runtime(request: Request) -> Runtime:
    """The runtime, or 503 while the model is loading / the journal replaying / after a failure."""
    runtime = get_runtime(request)
    if not runtime.ready:
        detail = f"service is {runtime.status.phase}"
        if runtime.status.error:
            detail += f": {runtime.status.error}"
        raise NotReadyError(detail)
    return runtime


async def await_worker(fut: Future, timeout_s: float, what: str):
    """The worker's result, or 504 when it is not done within ``timeout_s``.

    A job that has not started yet is cancelled; one already running finishes (an edit is then
    journaled; retry it with the same idempotency_key to get its result).
    """
    try:
        return await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)
    except asyncio.TimeoutError:
        fut.cancel()
        raise HTTPException(status_code=504, detail=f"{what} timed out after {timeout_s:g}s "
                                                    "waiting for the model worker") from None
