"""POST /edit, POST /rollback, GET /edits, GET /edits/{edit_id}."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool

from service.api.auth import AdminPrincipal, EditorPrincipal, require
from service.api.deps import await_worker, journal_reachable, ready_runtime
from service.errors import EditNotFoundError
from service.schemas import EditIn, EditOut, EditPage, RollbackIn, RollbackOut, check_edit_limits

router = APIRouter(tags=["edits"])


@router.post("/edit", response_model=EditOut)
async def edit(body: EditIn, request: Request, who: EditorPrincipal) -> dict:
    """Write facts into the model. Journaled (durably) before this returns.

    ``success`` per fact: after the edit, every target token is the model's argmax given the prompt
    and the previous target tokens (so greedy decoding produces the target).
    """
    runtime = ready_runtime(request)
    check_edit_limits(body, runtime.settings)
    await journal_reachable(runtime)
    requests = [r.model_dump() for r in body.requests]
    engine = runtime.engine
    method = body.method  # None: the engine's default (MEND_DEFAULT_METHOD if the model offers it)
    fut = runtime.worker.submit_exclusive(
        lambda: engine.edit(requests, method, who.name, body.idempotency_key)
    )
    return await await_worker(fut, runtime.settings.edit_timeout_s, "edit")


@router.post("/rollback", response_model=RollbackOut, response_model_exclude_none=True)
async def rollback(body: RollbackIn, request: Request, who: AdminPrincipal) -> dict:
    """Revert one edit by rebuilding its targets from the pristine base and the remaining edits.

    Later edits stay applied; if they were computed on top of this one they are listed in
    ``dependents`` and the ``note`` says so.
    """
    runtime = ready_runtime(request)
    await journal_reachable(runtime)
    engine = runtime.engine
    fut = runtime.worker.submit_exclusive(lambda: engine.rollback(body.edit_id, who.name))
    return await await_worker(fut, runtime.settings.edit_timeout_s, "rollback")


@router.get("/edits", response_model=EditPage, dependencies=[Depends(require("reader"))])
async def list_edits(
    request: Request,
    offset: int = Query(0, ge=0),
    limit: int | None = Query(None, ge=1, description="page size (default min(50, max_page_size))"),
    order: Literal["desc", "asc"] = Query("desc", description="desc = newest first"),
) -> dict:
    """Journal entries (requests, results, status, author, timestamps, sha256), paged."""
    runtime = ready_runtime(request)
    if limit is None:
        limit = min(50, runtime.settings.max_page_size)
    if limit > runtime.settings.max_page_size:
        raise RequestValidationError([{"type": "value_error", "loc": ("query", "limit"),
                                       "msg": f"at most max_page_size={runtime.settings.max_page_size}",
                                       "input": limit}])
    total, page = await run_in_threadpool(runtime.journal.list_edits, offset, limit, order == "desc")
    return {"version": runtime.engine.version, "total": total, "offset": offset, "limit": limit, "edits": page}


@router.get("/edits/{edit_id}", dependencies=[Depends(require("reader"))])
async def get_edit(edit_id: str, request: Request) -> dict:
    """One journal entry; 404 when the id is unknown."""
    runtime = ready_runtime(request)
    record = await run_in_threadpool(runtime.journal.get_edit, edit_id)
    if record is None:
        raise EditNotFoundError(f"edit {edit_id!r} is not in the journal", edit_id=edit_id)
    return record
