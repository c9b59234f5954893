"""EditEngine: the model, its EditStack, the editors and the journal, driven from the worker thread.

Every method here runs on the model-worker thread (never concurrently with another), so the version
read by a query batch and the weights it runs on always agree.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from torch import nn

from editor_core.canary import CanarySet, CanaryState
from editor_core.delta import EditDelta
from editor_core.methods.values import SubjectError
from editor_core.protocol import Editor
from editor_core.requests import EditRequest
from editor_core.scoring import score_targets, target_probability
from editor_core.stack import EditStack, NonFiniteEditError
from editor_core.targets import weight_param
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
from service.journal import Head, Journal, utc_now
from service.metrics import Metrics
from service.writer_lock import WriterLock

log = logging.getLogger(__name__)

ROLLBACK_NOTE = (
    "later edits {ids} were computed on weights that included this edit; they stay applied, "
    "as computed (like git revert), and may behave differently without it"
)


@dataclass
class _Unsure:
    """An op whose journal write failed on a lost connection: Redis may have committed it anyway.

    The weights were put back as if it had not; the next write looks at the journal head and, if the
    op is there, ``redo`` applies it again so that the weights and the journal agree.
    """

    op: str
    edit_id: str
    version: int
    sha256: str
    redo: Callable[[], None]


class EditEngine:
    """Answers queries and applies/journals/reverts edits on one loaded model."""

    def __init__(self, model: nn.Module, tokenizer, stack: EditStack, editors: dict[str, Editor],
                 journal: Journal, lock: WriterLock, metrics: Metrics, unavailable: dict[str, str],
                 max_update_ratio: float | None = None, canaries: CanarySet | None = None,
                 canary_max_changed: float = 0.05, canary_max_logprob_drop: float = 0.25,
                 canary_max_changed_total: float = 0.5,
                 default_method: str | None = None, max_delta_bytes: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.stack = stack
        self.editors = editors
        self.unavailable = unavailable  # method -> why it cannot be used on this model
        self.journal = journal
        self.lock = lock
        self.metrics = metrics
        self.max_update_ratio = max_update_ratio
        self.default_method = default_method  # used by an /edit that names no method
        self.max_delta_bytes = max_delta_bytes  # largest serialized delta (journal entry) /edit accepts
        # baseline answers of the canary prompts on the UNEDITED model (taken before replay); every
        # candidate edit is checked against the state just before it and, for a ceiling, against them
        self.canaries = canaries
        self.canary_max_changed = canary_max_changed
        self.canary_max_logprob_drop = canary_max_logprob_drop
        self.canary_max_changed_total = canary_max_changed_total
        self._canaries_at: tuple[str, CanaryState] | None = None  # (targets' sha256, canary state there)
        self.version = 0
        self.sha256: str | None = None  # targets' sha256 at ``version`` (None until replayed)
        self._unsure: _Unsure | None = None

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
        self.sha256 = sha
        self._set_version(plan.head.version)
        log.info("journal replayed", extra={"version": self.version, "active_edits": len(edits), "sha256": sha})
        return self.version

    def follow(self, entries: list[tuple[dict, bytes | None]]) -> int:
        """Replica: apply journal ops after ``version`` in journal order, as the writer applied them
        (an edit's delta added, a rollback reverted), and check the targets' sha256 the journal
        recorded after EVERY op before serving it. ``entries`` are (stream op as str dict, delta blob
        of an edit op or None). An op already applied is skipped (never applied twice). An op this
        path cannot reproduce exactly (a gap, an unknown op kind, a missing or altered blob, another
        sha256) falls back to :meth:`replay`, the restart path, which checks the head's sha256 and
        raises JournalMismatchError if even that disagrees. Runs on the worker thread; returns the
        version now served."""
        self._unsure = None  # a replica writes nothing; a committed op arrives through the stream
        for op, blob in entries:
            version = int(op["version"])
            if version <= self.version:
                continue
            try:
                if version != self.version + 1:
                    raise ValueError(f"journal gap: op {version} after version {self.version}")
                if op["op"] == "edit":
                    if blob is None or hashlib.sha256(blob).hexdigest() != op.get("delta_sha256"):
                        raise ValueError(f"delta blob of edit {op['edit_id']} missing or not as recorded")
                    self.stack.apply(op["edit_id"], EditDelta.from_bytes(blob, self.stack.fingerprint,
                                                                         self.stack.shapes))
                elif op["op"] == "rollback":
                    self.stack.revert(op["edit_id"])
                else:
                    raise ValueError(f"op kind {op['op']!r} is not followed op by op")
                sha = self.stack.sha256()
                if sha != op["sha256"]:
                    raise ValueError(f"targets sha256 {sha[:16]}... after op {version}, journal recorded "
                                     f"{op['sha256'][:16]}...")
            except (KeyError, ValueError, NonFiniteEditError) as err:  # DeltaFormatError is a ValueError
                log.warning("replica falls back to a full replay", extra={"version": version, "reason": str(err)})
                return self.replay()
            self.sha256 = sha
            self._set_version(version)
        return self.version

    # ---- queries -------------------------------------------------------------------------------
    def answer(self, jobs: list[QueryJob]) -> tuple[int, list[list[dict]]]:
        """One micro-batch of queries, with the version that served it."""
        return self.version, run_queries(self.model, self.tokenizer, jobs)

    # ---- edits ---------------------------------------------------------------------------------
    def edit(self, requests: list[dict], method: str | None, author: str, idempotency_key: str | None) -> dict:
        """Compute, apply and journal one edit; nothing is applied if any step fails."""
        started = time.perf_counter()
        method = method or self.default_method or ""
        if idempotency_key:
            first = self._idempotent_result(idempotency_key, requests, method)
            if first is not None:
                return first
        editor = self.editors.get(method)
        if editor is None:
            raise EditorUnavailableError(self.unavailable.get(method, f"method {method!r} is not available"),
                                         method=method, available=sorted(self.editors))
        self._ensure_writer()
        reqs = [EditRequest(r["prompt"], r["target"], r.get("subject"), tuple(r.get("rephrases") or ()))
                for r in requests]
        prompts, targets = [r.prompt for r in reqs], [r.target for r in reqs]
        before = score_targets(self.model, self.tokenizer, prompts, targets)
        try:
            delta = editor.compute_delta(self.model, self.tokenizer, reqs)
        except SubjectError as err:
            raise EditRejectedError(f"{err}; nothing was applied or journaled", method=method) from err
        self._check_magnitude(delta)
        blob = delta.to_bytes()
        self._check_size(blob, method)
        edit_id = uuid.uuid4().hex
        version = self.version + 1
        canaries_before = self._canary_state()
        try:
            self.stack.apply(edit_id, delta)
        except NonFiniteEditError as err:
            raise EditRejectedError(f"{err}; nothing was applied or journaled") from err
        try:
            after = score_targets(self.model, self.tokenizer, prompts, targets)
            broken = [r.prompt for r, a in zip(reqs, after, strict=True) if not math.isfinite(a.mean_logprob)]
            if broken:
                raise EditRejectedError(
                    f"the edited model scores the targets of {broken!r} as non-finite (the update explodes "
                    "the activations); the edit was refused, nothing was applied or journaled")
            canary, canaries_now = self._check_canaries(canaries_before)
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
            if canary is not None:
                record["canary"] = canary
            try:
                self.journal.append_edit(record, blob, self.lock)  # durable before we answer
            except (redis.ConnectionError, redis.TimeoutError):
                self._unsure = _Unsure("edit", edit_id, version, record["sha256"],
                                       lambda: self.stack.apply(edit_id, delta))
                raise
        except BaseException:
            self.stack.revert(edit_id)
            raise
        self.sha256 = record["sha256"]
        if canaries_now is not None:
            self._canaries_at = (self.sha256, canaries_now)
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
        self._ensure_writer()
        active = self.stack.active_ids
        dependents = active[active.index(edit_id) + 1:]
        previous = [(i, self.stack.delta_of(i)) for i in active]
        version = self.version + 1
        self.stack.revert(edit_id)
        sha = self.stack.sha256()
        try:
            self.journal.append_rollback(edit_id, version, sha, author, dependents, self.lock)
        except BaseException as err:
            self.stack.rebuild(previous)
            if isinstance(err, (redis.ConnectionError, redis.TimeoutError)):
                self._unsure = _Unsure("rollback", edit_id, version, sha, lambda: self.stack.revert(edit_id))
            raise
        self.sha256 = sha
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
    def _ensure_writer(self) -> None:
        """Before computing anything: Redis answers (a redis error here is a fast 503), this instance
        holds the writer lock (taken again if it merely expired, e.g. while Redis was down), and the
        journal head is the version these weights are at."""
        if not self.lock.owned():
            if not self.lock.try_reacquire():
                self.lock.lost = True
                raise WriterUnavailableError(
                    "another instance holds the journal's writer lock; this one serves queries only "
                    "(send edits to the lock holder, or restart this one to take over once the lock is free)")
        else:
            self.lock.lost = False
        head = self.journal.head()
        if self._unsure is not None:
            self._settle(self._unsure, head)
        if head.version != self.version:
            raise WriterUnavailableError(
                f"the journal is at version {head.version} but this instance's weights are at {self.version} "
                "(another writer moved it on); restart this instance to replay the journal; nothing was applied")

    def _settle(self, unsure: _Unsure, head: Head) -> None:
        """Redo an op whose journal write looked failed but did commit (seen at the head)."""
        self._unsure = None
        if head.version != unsure.version or head.edit_id != unsure.edit_id:
            log.info("unconfirmed journal write had not committed", extra={"op": unsure.op,
                                                                          "edit_id": unsure.edit_id})
            return
        unsure.redo()
        if self.stack.sha256() != unsure.sha256:
            raise JournalMismatchError(f"re-applying committed {unsure.op} {unsure.edit_id} did not give the "
                                       "journal's sha256; restart this instance to replay the journal")
        self.sha256 = unsure.sha256
        self._set_version(unsure.version)
        log.warning("journal write reported failed had committed; applied it", extra={
            "op": unsure.op, "edit_id": unsure.edit_id, "version": unsure.version})

    def _check_magnitude(self, delta: EditDelta) -> None:
        """Refuse an exploding update: ||dW||_F above ``max_update_ratio`` * ||W||_F on any target."""
        if self.max_update_ratio is None:
            return
        for name, upd in delta.updates.items():
            weight = weight_param(self.model, self.stack.targets[name]).detach().double()
            dw = upd.dense()  # (d_out, d_in) fp32, as the stack adds it
            if not bool(dw.isfinite().all()):
                raise EditRejectedError(f"the edit's update of {name!r} is non-finite (NaN or inf): refused, "
                                        "nothing was applied or journaled", target=name)
            ratio = float(dw.double().norm()) / max(float(weight.norm()), 1e-12)
            if not math.isfinite(ratio) or ratio > self.max_update_ratio:
                raise EditRejectedError(
                    f"the edit's update of {name!r} has norm {ratio:.3g} times the weight's "
                    f"(max_update_ratio={self.max_update_ratio:g}): refused as exploding, nothing was applied "
                    "or journaled", target=name, ratio=ratio)

    def _check_size(self, blob: bytes, method: str) -> None:
        """Refuse a delta whose serialized size (its journal entry) is above ``max_delta_bytes``."""
        if self.max_delta_bytes is None or len(blob) <= self.max_delta_bytes:
            return
        raise EditRejectedError(
            f"the edit's delta serializes to {len(blob):,} bytes, above max_delta_bytes={self.max_delta_bytes:,} "
            "(MEND_MAX_DELTA_BYTES): refused, nothing was applied or journaled", method=method,
            delta_bytes=len(blob), max_delta_bytes=self.max_delta_bytes)

    def _canary_state(self) -> CanaryState | None:
        """The canaries' answers under the current weights: cached per targets' sha256 (an edit leaves
        its post-edit state behind; after a rollback or replay one forward pass measures it again)."""
        if self.canaries is None:
            return None
        sha = self.sha256 or self.stack.sha256()
        if self._canaries_at is None or self._canaries_at[0] != sha:
            self._canaries_at = (sha, self.canaries.measure(self.model, self.stack.first_edited_block()))
        return self._canaries_at[1]

    def _check_canaries(self, before: CanaryState | None) -> tuple[dict | None, CanaryState | None]:
        """With the candidate applied: refuse it if it newly changes more than ``canary_max_changed`` of the
        canaries or takes more than ``canary_max_logprob_drop`` from their answers (against the state just
        before it), or if the model would then differ from the unedited one on more than
        ``canary_max_changed_total`` of them (the ceiling on drift that adds up)."""
        if self.canaries is None:
            return None, None
        started = time.perf_counter()
        now = self.canaries.measure(self.model, self.stack.first_edited_block())
        report = self.canaries.check(self.model, before=before, now=now)
        figures = {**report.to_dict(), "check_ms": round((time.perf_counter() - started) * 1000.0, 1)}
        n = max(report.n, 1)
        if report.new_changed / n > self.canary_max_changed or report.step_logprob_drop > self.canary_max_logprob_drop:
            raise EditRejectedError(
                f"this edit changes the answers of {report.new_changed} of {report.n} canary prompts unrelated to "
                f"it (max share {self.canary_max_changed:g}) and takes {report.step_logprob_drop:.3f} nats/token "
                f"from their answers (max {self.canary_max_logprob_drop:g}): refused, nothing was applied or "
                "journaled", canary=figures)
        if report.changed_share > self.canary_max_changed_total:
            raise EditRejectedError(
                f"with this edit applied, {report.changed} of {report.n} canary prompts would answer differently "
                f"from the unedited model, above the ceiling canary_max_changed_total="
                f"{self.canary_max_changed_total:g} (edits so far have drifted them; roll some back): refused, "
                "nothing was applied or journaled", canary=figures)
        self.metrics.canary_changed.set(report.changed)
        return figures, now

    def _set_version(self, version: int) -> None:
        self.version = version
        self.metrics.journal_version.set(version)
        self.metrics.active_edits.set(len(self.stack.active_ids))
