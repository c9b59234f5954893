"""POST /edit, POST /rollback, GET /edits, GET /edits/{edit_id}.

Writes go to the writer only: on a replica, /edit and /rollback answer 409 ``not_writer`` with the
writer's advertised URL (never a silent proxy). The role is checked on the model-worker thread right
before the engine runs, where role changes also happen, so no write slips through a switch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool

from service.api.auth import AdminPrincipal, EditorPrincipal, require
from service.api.deps import await_worker, journal_reachable, ready_runtime
from service.errors import EditNotFoundError
from service.schemas import EditIn, EditOut, EditPage, RollbackIn, RollbackOut, check_edit_limits

router = APIRouter(tags=["edits"])


@dataclass(frozen=True)
class EditFilter:
    """The filters of GET /edits; all given ones must hold."""

    q: str | None = None
    method: str | None = None
    author: str | None = None
    status: str | None = None
    after_version: int | None = None
    subject: str | None = None

    @property
    def active(self) -> bool:
        return any(v not in (None, "") for v in (self.q, self.method, self.author, self.status, self.after_version,
                                                 self.subject))

    def matches(self, record: dict) -> bool:
        """True when the journal record passes every filter given."""
        if self.method and record.get("method") != self.method:
            return False
        if self.author and record.get("author") != self.author:
            return False
        if self.status and record.get("status") != self.status:
            return False
        if self.after_version is not None and int(record.get("version", 0)) <= self.after_version:
            return False
        if self.subject:
            wanted = self.subject.strip().casefold()
            if not any((r.get("subject") or "").strip().casefold() == wanted for r in record.get("requests", [])):
                return False
        if self.q:
            needle = self.q.casefold()
            texts = [r.get(f) or "" for r in record.get("requests", []) for f in ("subject", "prompt", "target")]
            if not any(needle in t.casefold() for t in texts):
                return False
        return True

    def page(self, journal, offset: int, limit: int, newest_first: bool) -> tuple[int, list[dict]]:
        """(number of matching edits, the page of them at ``offset``)."""
        total, page = 0, []
        for record in journal.iter_edits(newest_first):
            if self.matches(record):
                if offset <= total < offset + limit:
                    page.append(record)
                total += 1
        return total, page


def _as_writer(runtime, job: Callable[[], dict]) -> Callable[[], dict]:
    """``job`` run on the worker only if this instance is still the writer then (else 409)."""
    def guarded() -> dict:
        runtime.roles.require_writer(runtime.engine.version)
        return job()
    return guarded


_NOT_WRITER = {409: {"description": "`not_writer`: this instance is a replica; `writer_url` names the writer "
                                    "(also `already_rolled_back`, `idempotency_key_reused`, `editor_unavailable`)"}}


@router.post("/edit", response_model=EditOut, responses=_NOT_WRITER)
async def edit(body: EditIn, request: Request, who: EditorPrincipal) -> dict:
    """Write facts into the model. Journaled (durably) before this returns.

    ``success`` per fact: after the edit, every target token is the model's argmax given the prompt
    and the previous target tokens (so greedy decoding produces the target).
    """
    runtime = ready_runtime(request)
    check_edit_limits(body, runtime.settings)
    await run_in_threadpool(runtime.roles.require_writer, runtime.engine.version)  # 409 on a replica
    await journal_reachable(runtime)
    requests = [r.model_dump() for r in body.requests]
    engine = runtime.engine
    method = body.method  # None: the engine's default (MEND_DEFAULT_METHOD if the model offers it)
    fut = runtime.worker.submit_exclusive(
        _as_writer(runtime, lambda: engine.edit(requests, method, who.name, body.idempotency_key))
    )
    return await await_worker(fut, runtime.settings.edit_timeout_s, "edit")


@router.post("/rollback", response_model=RollbackOut, response_model_exclude_none=True, responses=_NOT_WRITER)
async def rollback(body: RollbackIn, request: Request, who: AdminPrincipal) -> dict:
    """Revert one edit by rebuilding its targets from the pristine base and the remaining edits.

    Later edits stay applied; if they were computed on top of this one they are listed in
    ``dependents`` and the ``note`` says so.
    """
    runtime = ready_runtime(request)
    await run_in_threadpool(runtime.roles.require_writer, runtime.engine.version)  # 409 on a replica
    await journal_reachable(runtime)
    engine = runtime.engine
    fut = runtime.worker.submit_exclusive(_as_writer(runtime, lambda: engine.rollback(body.edit_id, who.name)))
    return await await_worker(fut, runtime.settings.edit_timeout_s, "rollback")


@router.get("/edits", response_model=EditPage, dependencies=[Depends(require("reader"))])
async def list_edits(
    request: Request,
    offset: int = Query(0, ge=0),
    limit: int | None = Query(None, ge=1, description="page size (default min(50, max_page_size))"),
    order: Literal["desc", "asc"] = Query("desc", description="desc = newest first"),
    q: str | None = Query(None, max_length=1000,
                          description="text filter: case-insensitive substring of a request's subject, prompt or "
                                      "target"),
    method: str | None = Query(None, max_length=50, description="only edits made with this method"),
    author: str | None = Query(None, max_length=200, description="only edits by this author (the key's name)"),
    status: Literal["active", "rolled_back"] | None = Query(None, description="only active or rolled-back edits"),
    after_version: int | None = Query(None, ge=0, description="only edits whose version is above this one"),
    subject: str | None = Query(None, max_length=1000,
                                description="only edits with a request about this subject (whole subject, "
                                            "case-insensitive): every correction of a fact about it"),
) -> dict:
    """Journal entries (requests, results, status, author, timestamps, sha256), paged.

    With any filter, ``total`` counts the matching edits and the page is taken from them (the journal
    is scanned: linear in the number of edits).
    """
    runtime = ready_runtime(request)
    if limit is None:
        limit = min(50, runtime.settings.max_page_size)
    if limit > runtime.settings.max_page_size:
        raise RequestValidationError([{"type": "value_error", "loc": ("query", "limit"),
                                       "msg": f"at most max_page_size={runtime.settings.max_page_size}",
                                       "input": limit}])
    filters = EditFilter(q, method, author, status, after_version, subject)
    if filters.active:
        total, page = await run_in_threadpool(filters.page, runtime.journal, offset, limit, order == "desc")
    else:
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
