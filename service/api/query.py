"""POST /query: greedy completions and candidate scores, micro-batched on the model worker.

Read-your-writes: ``min_version`` (the version an /edit or /rollback returned) makes an instance that
is behind, a replica still applying the journal, wait up to ``MEND_MIN_VERSION_WAIT_S`` for that
version; then it answers 503 ``version_not_reached`` with ``Retry-After`` and its current version. A
query is never answered from a version below its ``min_version`` (versions only grow, and the batch
reports the version it ran on).
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from service.api.auth import require
from service.api.deps import await_worker, ready_runtime
from service.inference import QueryJob
from service.schemas import QueryIn, QueryOut, check_query_limits

router = APIRouter(tags=["query"])

POLL_S = 0.005  # how often a waiting query looks at the applied version
RETRY_AFTER_S = "1"  # a replica applies an op in well under a second once it has it


def _not_reached(version: int, wanted: int, waited_s: float) -> JSONResponse:
    return JSONResponse(
        {"detail": f"this instance serves journal version {version}, below min_version={wanted} (waited "
                   f"{waited_s:.2f}s); retry here after Retry-After, or ask another instance (the writer has "
                   "every acknowledged version)",
         "code": "version_not_reached", "version": version, "min_version": wanted},
        status_code=503, headers={"Retry-After": RETRY_AFTER_S})


@router.post("/query", response_model=QueryOut, dependencies=[Depends(require("reader"))],
             responses={503: {"description": "not ready, or `min_version` not reached in time (`Retry-After`)"}})
async def query(body: QueryIn, request: Request):
    """Complete each prompt greedily; score ``candidates`` by mean token log-prob.

    ``version`` is the journal version of the weights that answered (one version per response), and
    at least ``min_version`` when one is given.
    """
    runtime = ready_runtime(request)
    s = runtime.settings
    check_query_limits(body, s)
    wanted = body.min_version
    if wanted is not None and runtime.engine.version < wanted:
        started = time.monotonic()
        deadline = started + s.min_version_wait_s
        while runtime.engine.version < wanted and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        if runtime.engine.version < wanted:
            return _not_reached(runtime.engine.version, wanted, time.monotonic() - started)
    job = QueryJob(list(body.prompts), body.max_new_tokens or min(s.default_new_tokens, s.max_new_tokens),
                   list(body.candidates or []))
    version, results = await await_worker(runtime.worker.submit_query(job), s.query_timeout_s, "query")
    if wanted is not None and version < wanted:  # cannot happen (versions only grow); never serve it anyway
        return _not_reached(version, wanted, 0.0)
    return {"version": version, "results": results}
