"""EditEngine: the model, its EditStack, the editors and the journal, driven from the worker thread.

Every method here runs on the model-worker thread (never concurrently with another), so the version
read by a query batch and the weights it runs on always agree.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from typing import Any

from torch import nn

from editor_core.delta import EditDelta
from editor_core.protocol import Editor
from editor_core.requests import EditRequest
from editor_core.scoring import score_targets, target_probability
from editor_core.stack import EditStack, NonFiniteEditError
from service.errors import (
    AlreadyRolledBackError,
    EditNotFoundError,
    EditorUnavailableError,
    EditRejectedError,
    IdempotencyConflictError,
    JournalMismatchError,
    WriterUnavailableError,
)
from service.inference import QueryJob, run_queries
from service.journal import Journal, utc_now
from service.metrics import Metrics
from service.writer_lock import WriterLock

log = logging.getLogger(__name__)

ROLLBACK_NOTE = (
    "later edits {ids} were computed on weights that included this edit; they stay applied, "
    "as computed (like git revert), and may behave differently without it"
)


class EditEngine:
    """Answers queries and applies/journals/reverts edits on one loaded model."""

    def __init__(self, model: nn.Module, tokenizer, stack: EditStack, editors: dict[str, Editor],
                 journal: Journal, lock: WriterLock, metrics: Metrics, unavailable: dict[str, str]):
        self.model = model
        self.tokenizer = tokenizer
        self.stack = stack
        self.editors = editors
        self.unavailable = unavailable  # method -> why it cannot be used on this model
        self.journal = journal
        self.lock = lock
        self.metrics = metrics
        self.version = 0

    # ---- startup -------------------------------------------------------------------------------
    def replay(self) -> int:
        """Rebuild the weights from the journal's active edits and check the recorded sha256."""
        plan = self.journal.replay_plan()
        edits = [(i, EditDelta.from_bytes(b, self.stack.fingerprint, self.stack.shapes)) for i, b in plan.active]
        if edits:
            self.stack.rebuild(edits)  # each target written once
        sha = self.stack.sha256()
        if plan.head.sha256 is not None and sha != plan.head.sha256:
            raise JournalMismatchError(
                f"replaying {len(edits)} edits gave targets sha256 {sha[:16]}..., the journal head "
                f"(version {plan.head.version}) recorded {plan.head.sha256[:16]}..."
            )
        self._set_version(plan.head.version)
        log.info("journal replayed", extra={"version": self.version, "active_edits": len(edits), "sha256": sha})
        return self.version

    # ---- queries -------------------------------------------------------------------------------
    def answer(self, jobs: list[QueryJob]) -> tuple[int, list[list[dict]]]:
        """One micro-batch of queries, with the version that served it."""
        return self.version, run_queries(self.model, self.tokenizer, jobs)

    # ---- edits ---------------------------------------------------------------------------------
    def edit(self, requests: list[dict], method: str, author: str, idempotency_key: str | None) -> dict:
        """Compute, apply and journal one edit; nothing is applied if any step fails."""
        started = time.perf_counter()
        if idempotency_key:
            first = self._idempotent_result(idempotency_key, requests, method)
            if first is not None:
                return first
        editor = self.editors.get(method)
        if editor is None:
            raise EditorUnavailableError(self.unavailable.get(method, f"method {method!r} is not available"),
                                         method=method, available=sorted(self.editors))
        self._check_writer()
        reqs = [EditRequest(r["prompt"], r["target"], r.get("subject"), tuple(r.get("rephrases") or ()))
                for r in requests]
        prompts, targets = [r.prompt for r in reqs], [r.target for r in reqs]
        before = score_targets(self.model, self.tokenizer, prompts, targets)
        delta = editor.compute_delta(self.model, self.tokenizer, reqs)
        blob = delta.to_bytes()
        edit_id = uuid.uuid4().hex
        version = self.version + 1
        try:
            self.stack.apply(edit_id, delta)
        except NonFiniteEditError as err:
            raise EditRejectedError(str(err)) from err
        try:
            after = score_targets(self.model, self.tokenizer, prompts, targets)
            results = [
                {"prompt": r.prompt, "target": r.target,
                 "p_target_before": target_probability(b), "p_target_after": target_probability(a),
                 "success": a.token_acc == 1.0}
                for r, b, a in zip(reqs, before, after, strict=True)
            ]
            latency_ms = (time.perf_counter() - started) * 1000.0
            record = {
                "edit_id": edit_id, "version": version, "method": method, "author": author,
                "created_at": utc_now(), "status": "active", "requests": requests, "results": results,
                "sha256": self.stack.sha256(), "idempotency_key": idempotency_key,
                "delta_sha256": hashlib.sha256(blob).hexdigest(), "delta_bytes": len(blob),
                "rank": {n: u.rank for n, u in delta.updates.items()}, "latency_ms": latency_ms,
                "rolled_back": None,
            }
            self.journal.append_edit(record, blob, self.lock)  # durable before we answer
        except BaseException:
            self.stack.revert(edit_id)
            raise
        self._set_version(version)
        self.metrics.edits_applied.labels(method=method).inc()
        self.metrics.edit_seconds.observe(latency_ms / 1000.0)
        log.info("edit applied", extra={"edit_id": edit_id, "version": version, "method": method,
                                        "author": author, "latency_ms": round(latency_ms, 1)})
        return self.edit_response(record, replayed=False)

    @staticmethod
    def edit_response(record: dict, replayed: bool) -> dict:
        """The /edit response for a journal record."""
        return {"edit_id": record["edit_id"], "version": record["version"], "method": record["method"],
                "results": record["results"], "latency_ms": record["latency_ms"], "idempotent_replay": replayed}

    def _idempotent_result(self, key: str, requests: list[dict], method: str) -> dict | None:
        edit_id = self.journal.edit_for_idempotency_key(key)
        if edit_id is None:
            return None
        record = self.journal.get_edit(edit_id)
        if record is None:
            return None
        if record["requests"] != requests or record["method"] != method:
            raise IdempotencyConflictError(
                f"idempotency_key {key!r} was already used by edit {edit_id} with a different body",
                edit_id=edit_id,
            )
        log.info("idempotent edit replayed", extra={"edit_id": edit_id, "idempotency_key": key})
        return self.edit_response(record, replayed=True)

    # ---- rollback ------------------------------------------------------------------------------
    def rollback(self, edit_id: str, author: str) -> dict:
        """Revert one edit (rebuilding its targets from the pristine base) and journal it."""
        record = self.journal.get_edit(edit_id)
        if record is None:
            raise EditNotFoundError(f"edit {edit_id!r} is not in the journal", edit_id=edit_id)
        if record["status"] == "rolled_back" or edit_id not in self.stack.active_ids:
            raise AlreadyRolledBackError(f"edit {edit_id!r} is already rolled back", edit_id=edit_id)
        self._check_writer()
        active = self.stack.active_ids
        dependents = active[active.index(edit_id) + 1:]
        previous = [(i, self.stack.delta_of(i)) for i in active]
        version = self.version + 1
        self.stack.revert(edit_id)
        try:
            self.journal.append_rollback(edit_id, version, self.stack.sha256(), author, dependents, self.lock)
        except BaseException:
            self.stack.rebuild(previous)
            raise
        self._set_version(version)
        self.metrics.edits_rolled_back.inc()
        log.info("edit rolled back", extra={"edit_id": edit_id, "version": version, "author": author,
                                            "dependents": dependents})
        out: dict[str, Any] = {"edit_id": edit_id, "version": version, "status": "rolled_back",
                               "dependents": dependents}
        if dependents:
            out["note"] = ROLLBACK_NOTE.format(ids=", ".join(dependents))
        return out

    # ---- helpers -------------------------------------------------------------------------------
    def _check_writer(self) -> None:
        if self.lock.lost:
            raise WriterUnavailableError("this instance lost the journal's writer lock; restart it to edit")

    def _set_version(self, version: int) -> None:
        self.version = version
        self.metrics.journal_version.set(version)
        self.metrics.active_edits.set(len(self.stack.active_ids))
