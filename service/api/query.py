"""POST /query: greedy completions and candidate scores, micro-batched on the model worker."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.api.auth import require
from service.api.deps import await_worker, ready_runtime
from service.inference import QueryJob
from service.schemas import QueryIn, QueryOut, check_query_limits

router = APIRouter(tags=["query"])


@router.post("/query", response_model=QueryOut, dependencies=[Depends(require("reader"))])
async def query(body: QueryIn, request: Request) -> dict:
    """Complete each prompt greedily; score ``candidates`` by mean token log-prob.

    ``version`` is the journal version of the weights that answered (one version per response).
    """
    runtime = ready_runtime(request)
    s = runtime.settings
    check_query_limits(body, s)
    job = QueryJob(list(body.prompts), body.max_new_tokens or min(s.default_new_tokens, s.max_new_tokens),
                   list(body.candidates or []))
    version, results = await await_worker(runtime.worker.submit_query(job), s.query_timeout_s, "query")
    return {"version": version, "results": results}
