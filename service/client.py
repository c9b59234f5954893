"""A Python client for applications: edits to the writer, queries to the replicas, read-your-writes.

    from service.client import MendClient

    with MendClient("http://writer:8000", replicas=["http://r1:8000", "http://r2:8000"], api_key=KEY) as mend:
        done = mend.edit([{"prompt": "The capital of Norway is", "target": "Bergen"}])
        mend.query(["The capital of Norway is"]).results[0].completion   # answered at version >= done.version

Rules:
- Every edit carries an idempotency key (a fresh one unless given), so retrying it after a timeout,
  a dropped connection or a 503 never applies it twice: the writer returns the first result.
- A 409 ``not_writer`` names the writer; the client moves its writer there and retries (explicitly,
  here, never as a silent server-side proxy).
- Reads ask the replicas in turn with ``min_version`` = the last version this client wrote (or a
  larger one given), so a query never sees weights older than the client's own writes; a replica
  that is behind answers 503 ``version_not_reached`` and the next one (at last the writer) is asked.
- Bodies are the service's own pydantic models (:mod:`service.schemas`); errors raise
  :class:`MendError` with the HTTP status, the service's ``code`` and its message.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import httpx

from service.schemas import (
    EditIn,
    EditOut,
    EditPage,
    EditRequestIn,
    QueryIn,
    QueryOut,
    RollbackIn,
    RollbackOut,
)

log = logging.getLogger(__name__)

RETRY_STATUSES = {502, 503, 504}  # plus transport errors; 503 covers not_ready, journal_unavailable, ...


class MendError(RuntimeError):
    """The service refused a request (or could not be reached after the retries)."""

    def __init__(self, status: int, code: str | None, detail: Any, body: dict | None = None):
        super().__init__(f"{status} {code or ''}: {detail}".strip())
        self.status = status
        self.code = code
        self.detail = detail
        self.body = body or {}
        self.retried = False  # True when an earlier attempt of the same request may have landed


class MendClient:
    """Synchronous client of one deployment (one writer, any number of replicas, or one instance)."""

    def __init__(self, writer: str, replicas: Sequence[str] = (), api_key: str | None = None,
                 timeout_s: float = 120.0, retries: int = 4, backoff_s: float = 0.25, max_backoff_s: float = 2.0,
                 read_your_writes: bool = True, http: httpx.Client | None = None):
        self.writer = writer.rstrip("/")
        self.replicas = [r.rstrip("/") for r in replicas]
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.read_your_writes = read_your_writes
        self.last_version = 0  # the highest version this client's writes produced
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = http or httpx.Client(timeout=timeout_s)  # your own: proxies, TLS, transports
        self._http.headers.update(headers)
        self._turn = itertools.count()

    # ---- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MendClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- writes --------------------------------------------------------------------------------
    def edit(self, requests: Iterable[EditRequestIn | dict], method: str | None = None,
             idempotency_key: str | None = None) -> EditOut:
        """Write facts (POST /edit on the writer); safe to retry: the same key is sent every time."""
        body = EditIn(requests=[r if isinstance(r, EditRequestIn) else EditRequestIn(**r) for r in requests],
                      method=method, idempotency_key=idempotency_key or uuid.uuid4().hex)
        out = EditOut.model_validate(self._write("/edit", body.model_dump(exclude_none=True)))
        self._saw(out.version)
        return out

    def rollback(self, edit_id: str) -> RollbackOut:
        """Roll back one edit (POST /rollback on the writer). A retry whose first attempt did land gets
        409 ``already_rolled_back``; the client then returns the journal's record of that rollback."""
        body = RollbackIn(edit_id=edit_id).model_dump()
        try:
            out = RollbackOut.model_validate(self._write("/rollback", body))
        except MendError as err:
            if err.code != "already_rolled_back" or not getattr(err, "retried", False):
                raise
            record = self.edit_record(edit_id)
            done = record.get("rolled_back") or {}
            out = RollbackOut(edit_id=edit_id, version=int(done["version"]), status="rolled_back",
                              dependents=list(done.get("dependents") or []))
        self._saw(out.version)
        return out

    # ---- reads ---------------------------------------------------------------------------------
    def query(self, prompts: Sequence[str], max_new_tokens: int | None = None,
              candidates: Sequence[str] | None = None, min_version: int | None = None) -> QueryOut:
        """Greedy completions (and candidate scores) from a replica at version >= the last write's."""
        floor = max(min_version or 0, self.last_version if self.read_your_writes else 0)
        body = QueryIn(prompts=list(prompts), max_new_tokens=max_new_tokens,
                       candidates=list(candidates) if candidates is not None else None,
                       min_version=floor or None)
        return QueryOut.model_validate(self._read("POST", "/query", json=body.model_dump(exclude_none=True)))

    def edits(self, offset: int = 0, limit: int | None = None, order: str = "desc", **filters: Any) -> EditPage:
        """A page of journal entries (GET /edits; filters q, method, author, status, after_version)."""
        params = {"offset": offset, "order": order, **({"limit": limit} if limit else {}),
                  **{k: v for k, v in filters.items() if v is not None}}
        return EditPage.model_validate(self._read("GET", "/edits", params=params))

    def edit_record(self, edit_id: str) -> dict:
        """One journal entry (GET /edits/{id})."""
        return self._read("GET", f"/edits/{edit_id}")

    def ready(self, base: str | None = None) -> dict:
        """GET /health/ready of one instance (the writer by default); raises while it is not ready."""
        return self._send("GET", f"{(base or self.writer)}/health/ready")

    # ---- transport -----------------------------------------------------------------------------
    def _saw(self, version: int) -> None:
        self.last_version = max(self.last_version, version)

    def _write(self, path: str, body: dict) -> dict:
        """POST to the writer, following a 409 not_writer to the writer it names; retried safely.

        When the writer does not answer, the replicas are asked (``/health/ready``) where the writer is
        now: after a failover an ``auto`` replica has taken over and published its URL."""
        for attempt in range(self.retries + 1):
            try:
                return self._send("POST", f"{self.writer}{path}", json=body)
            except MendError as err:
                err.retried = attempt > 0
                url = err.body.get("writer_url")
                if err.code == "not_writer" and url and url.rstrip("/") != self.writer:
                    self._move_writer(url)
                    continue
                if not (self._retryable(err) or err.code == "not_writer") or attempt == self.retries:
                    raise
                self._discover_writer()
            self._pause(attempt)
        raise AssertionError("unreachable")

    def _move_writer(self, url: str) -> None:
        log.info("writer moved", extra={"from": self.writer, "to": url})
        self.writer = url.rstrip("/")

    def _discover_writer(self) -> None:
        """Ask the replicas which writer they follow (no-op without replicas or when none knows)."""
        for base in self.replicas:
            try:
                ready = self._http.get(f"{base}/health/ready", timeout=5.0).json()
            except (httpx.HTTPError, ValueError):
                continue
            if not isinstance(ready, dict):
                continue
            url = base if ready.get("role") == "writer" else ready.get("writer_url")
            if url and url.rstrip("/") != self.writer:
                self._move_writer(url)
                return

    def _read(self, method: str, path: str, **kwargs) -> dict:
        """Ask the replicas in turn (each once), then the writer; a 503 or a dropped connection moves on."""
        bases = self._read_order()
        last: MendError | None = None
        for attempt in range(self.retries + 1):
            base = bases[attempt % len(bases)]
            try:
                return self._send(method, f"{base}{path}", **kwargs)
            except MendError as err:
                if not self._retryable(err):
                    raise
                last = err
            if attempt >= len(bases) - 1:
                self._pause(attempt - len(bases) + 1)
        raise last

    def _read_order(self) -> list[str]:
        if not self.replicas:
            return [self.writer]
        start = next(self._turn) % len(self.replicas)
        return [*self.replicas[start:], *self.replicas[:start], self.writer]

    @staticmethod
    def _retryable(err: MendError) -> bool:
        return err.status in RETRY_STATUSES or err.status == 0

    def _pause(self, attempt: int) -> None:
        time.sleep(min(self.max_backoff_s, self.backoff_s * (2 ** max(0, attempt))))

    def _send(self, method: str, url: str, **kwargs) -> dict:
        try:
            r = self._http.request(method, url, **kwargs)
        except httpx.TransportError as err:  # status 0: not reached (or no answer): retryable
            raise MendError(0, "unreachable", f"{method} {url}: {type(err).__name__}: {err}") from err
        try:
            body = r.json()
        except ValueError:
            body = {"detail": r.text[:500]}
        if r.status_code >= 400:
            detail = body.get("detail") if isinstance(body, dict) else body
            raise MendError(r.status_code, body.get("code") if isinstance(body, dict) else None, detail,
                            body if isinstance(body, dict) else None)
        return body
