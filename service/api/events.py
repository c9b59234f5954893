"""GET /events: the journal's ops as server-sent events, following its Redis Stream.

Each op of the stream (``<prefix>:<fingerprint>:ops``, entry id ``<version>-0``) becomes one event::

    id: 7
    event: op
    data: {"op": "edit", "edit_id": "...", "version": 7, "author": "...", "ts": "...", ...}

A stream first sends ``retry:`` and an ``event: head`` with the journal's version, then every op
after ``after`` (or the ``Last-Event-ID`` header, or else the head), waiting for new ones with a
blocking XREAD, and a ``: keepalive`` comment when nothing happened for a few seconds. It ends
after ``max_s`` seconds: the client reconnects with ``after`` (or ``Last-Event-ID``, which a browser's
EventSource sends by itself), so no op is lost, and a graceful shutdown never waits on an open stream.

Auth is the reader role through the ``Authorization`` header, like every other route; keys are never
accepted in the URL (URLs end up in access logs). A browser's ``EventSource`` cannot send that header,
so the console reads the stream with ``fetch()``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import anyio
import redis
import redis.asyncio as aredis
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse

from service.api.auth import require
from service.api.deps import ready_runtime
from service.redis_conn import connect_async
from service.runtime import Runtime

log = logging.getLogger(__name__)

router = APIRouter(tags=["edits"])

KEEPALIVE_S = 5.0  # longest silence on an open stream (one XREAD BLOCK)
RETRY_MS = 1000  # the reconnect delay suggested to EventSource clients
BATCH = 100  # ops read per XREAD
JSON_FIELDS = ("requests", "results", "dependents")  # stream fields holding JSON text

_EVENTS_DOC = {
    200: {
        "description": "A `text/event-stream`: `retry:`, then `event: head` (data `{\"version\": N}`), then one "
                       "`event: op` per journal op (`id:` = its version; data: the op as JSON: `op` edit|rollback, "
                       "`edit_id`, `version`, `sha256`, `author`, `ts`; for edits `method`, `requests`, `results`, "
                       "`delta_sha256`; for rollbacks `dependents`), `: keepalive` comments in between. Ends after "
                       "`max_s`; reconnect with `after` = the last id seen.",
        "content": {"text/event-stream": {"schema": {"type": "string"},
                                          "example": 'retry: 1000\n\nevent: head\ndata: {"version": 6}\n\n'
                                                     'id: 7\nevent: op\ndata: {"op": "rollback", "edit_id": '
                                                     '"3f2c...", "version": 7, "dependents": []}\n\n'}},
    },
}


def format_event(data: dict, event: str, event_id: int | None = None) -> str:
    """One SSE frame (the JSON is on one line, so a single ``data:`` field carries it)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def op_payload(fields: dict[bytes, bytes]) -> dict:
    """A stream entry's fields as the event's JSON object (version an int, JSON fields parsed)."""
    op: dict = {k.decode(): v.decode() for k, v in fields.items()}
    for name in JSON_FIELDS:
        if name in op:
            try:
                op[name] = json.loads(op[name])
            except ValueError:
                pass  # shown as recorded
    if "version" in op:
        op["version"] = int(op["version"])
    return op


def _version_of(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def _redis_url(runtime: Runtime) -> str:
    if runtime.settings.redis_url:
        return runtime.settings.redis_url
    return runtime.embedded.url


def _start_after(after: int | None, last_event_id: str | None, head: int) -> int:
    """Where the stream starts: ``after``, else a numeric Last-Event-ID, else the head."""
    if after is not None:
        return after
    if last_event_id is not None and last_event_id.strip().isdigit():
        return int(last_event_id.strip())
    return head


@router.get("/events", dependencies=[Depends(require("reader"))], response_class=StreamingResponse,
            responses=_EVENTS_DOC)
async def events(
    request: Request,
    after: int | None = Query(None, ge=0, description="send the ops whose version is above this one first "
                                                       "(default: Last-Event-ID, else only new ops)"),
    max_s: float = Query(15.0, ge=1.0, le=300.0, description="end the stream after this many seconds"),
    last_event_id: str | None = Header(None, alias="Last-Event-ID", include_in_schema=False),
) -> StreamingResponse:
    """Follow the journal: every op (edit, rollback) as a server-sent event, live. Role reader."""
    runtime = ready_runtime(request)
    key = runtime.journal.key("ops")
    client = connect_async(_redis_url(runtime), socket_timeout=KEEPALIVE_S + 10, socket_connect_timeout=5)
    try:
        newest = await client.xrevrange(key, count=1)
    except BaseException:
        await client.aclose()
        raise  # a redis error here is the app's 503 journal_unavailable
    head = _version_of(newest[0][0]) if newest else 0
    start = _start_after(after, last_event_id, head)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_follow(client, key, start, head, max_s), media_type="text/event-stream",
                             headers=headers)


async def _follow(client: aredis.Redis, key: str, start: int, head: int, max_s: float) -> AsyncIterator[str]:
    """The event stream: head, then ops after ``start`` as they are read, until ``max_s`` passes."""
    deadline = anyio.current_time() + max_s
    if start > head:  # the client saw a later journal (e.g. one since wiped): resume at this one's head
        start = head
    last = f"{start}-0"
    try:
        yield f"retry: {RETRY_MS}\n\n"
        yield format_event({"version": head, "after": start}, "head")
        while True:
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return
            block_ms = max(1, int(min(KEEPALIVE_S, remaining) * 1000))
            reply = await client.xread({key: last}, count=BATCH, block=block_ms)
            if not reply:
                yield ": keepalive\n\n"
                continue
            for entry_id, fields in reply[0][1]:
                last = entry_id.decode()
                yield format_event(op_payload(fields), "op", _version_of(entry_id))
    except redis.RedisError as err:  # the client reconnects; /events answers 503 while Redis is down
        log.warning("event stream ended by a redis error", extra={"error": str(err)})
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()
