"""Shared route helpers: the runtime, readiness, and awaiting the model worker with a timeout."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool

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
        if runtime.status.phase == "locking":
            detail += (": another instance holds the journal's writer lock; this one waits as a standby and "
                       "takes over when that lock is released or expires")
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


async def journal_reachable(runtime: Runtime) -> None:
    """Fail fast (redis error -> 503 journal_unavailable) when Redis is down, before a write is queued
    behind other jobs or any edit is computed."""
    await run_in_threadpool(runtime.client.ping)
