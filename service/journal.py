"""The edit journal in Redis, namespaced by model fingerprint.

Keys under ``<prefix>:<fingerprint>:``
  ``ops``            Stream of operations; entry id ``<version>-0``; fields op, edit_id, version,
                     sha256 (targets after the op), author, ts, and for edits method/requests/results.
  ``delta:<id>``     the edit's factors (``EditDelta.to_bytes``; never dense matrices).
  ``edit:<id>``      JSON record of the edit, including its current status (what GET /edits shows).
  ``edits``          list of edit ids in journal order (paging).
  ``idem:<key>``     edit id of the first edit made with this idempotency key.
  ``head``           JSON {version, sha256, op, edit_id, ts} of the latest op.
  ``lock``           the writer lock (see :mod:`service.writer_lock`).

Every op is one MULTI/EXEC that WATCHes the lock and the head: it fails if this process lost the
lock or another writer moved the head, so the stream never forks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone

import redis

from service.writer_lock import LockLostError, WriterLock

log = logging.getLogger(__name__)


WATCH_ATTEMPTS = 5  # a WatchError is retried (owner and head re-checked) this many times in all


class JournalConflictError(RuntimeError):
    """The journal head moved under us (another writer) or the lock was lost mid-write."""


@dataclass(frozen=True)
class Head:
    """Where the journal stands: the version of the latest op and the targets' sha256 after it."""

    version: int
    sha256: str | None
    edit_id: str | None = None  # the edit the latest op wrote or rolled back


@dataclass(frozen=True)
class ReplayPlan:
    """What startup needs: the active edits in journal order (with their delta bytes) and the head."""

    active: list[tuple[str, bytes]]
    head: Head


def utc_now() -> str:
    """ISO-8601 UTC timestamp with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Journal:
    """Read and append the journal of one model (one fingerprint)."""

    def __init__(self, client: redis.Redis, fingerprint: str, prefix: str = "mend"):
        self.client = client
        self.fingerprint = fingerprint
        self.ns = f"{prefix}:{fingerprint}"

    # ---- keys ----------------------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        return ":".join([self.ns, *parts])

    @property
    def lock_key(self) -> str:
        return self.key("lock")

    # ---- reads ---------------------------------------------------------------------------------
    def head(self) -> Head:
        """The latest op's version and sha256 (version 0, sha None for an empty journal)."""
        raw = self.client.get(self.key("head"))
        if raw is None:
            return Head(0, None)
        data = json.loads(raw)
        return Head(int(data["version"]), data.get("sha256"), data.get("edit_id"))

    def get_edit(self, edit_id: str) -> dict | None:
        """The JSON record of one edit, or None."""
        raw = self.client.get(self.key("edit", edit_id))
        return json.loads(raw) if raw is not None else None

    def count_edits(self) -> int:
        return int(self.client.llen(self.key("edits")))

    def list_edits(self, offset: int, limit: int, newest_first: bool = True) -> tuple[int, list[dict]]:
        """(total, page of records) in journal order or reversed."""
        total = self.count_edits()
        if newest_first:
            start, stop = total - offset - limit, total - offset - 1
            if stop < 0:
                return total, []
            ids = self.client.lrange(self.key("edits"), max(start, 0), stop)[::-1]
        else:
            ids = self.client.lrange(self.key("edits"), offset, offset + limit - 1)
        if not ids:
            return total, []
        raws = self.client.mget([self.key("edit", i.decode()) for i in ids])
        return total, [json.loads(r) for r in raws if r is not None]

    def iter_edits(self, newest_first: bool = True, batch: int = 200):
        """Every edit record in journal order or reversed, read ``batch`` records at a time (read-only;
        for filtered listings, which must look at records a plain page would skip)."""
        total = self.count_edits()
        for start in range(0, total, batch):
            if newest_first:
                lo, hi = max(total - start - batch, 0), total - start - 1
                ids = self.client.lrange(self.key("edits"), lo, hi)[::-1]
            else:
                ids = self.client.lrange(self.key("edits"), start, start + batch - 1)
            if not ids:
                return
            for raw in self.client.mget([self.key("edit", i.decode()) for i in ids]):
                if raw is not None:
                    yield json.loads(raw)

    def edit_for_idempotency_key(self, idempotency_key: str) -> str | None:
        raw = self.client.get(self.key("idem", idempotency_key))
        return raw.decode() if raw is not None else None

    def ops(self, batch: int = 500):
        """Every op of the stream in order, as dicts of str."""
        start = "-"
        while True:
            entries = self.client.xrange(self.key("ops"), min=start, max="+", count=batch)
            for entry_id, fields in entries:
                yield {k.decode(): v.decode() for k, v in fields.items()} | {"id": entry_id.decode()}
            if len(entries) < batch:
                return
            start = "(" + entries[-1][0].decode()

    def replay_plan(self) -> ReplayPlan:
        """Active edits (not rolled back) in journal order, their delta bytes, and the head."""
        order: list[str] = []
        rolled_back: set[str] = set()
        last_version = 0
        for op in self.ops():
            version = int(op["version"])
            if version != last_version + 1:
                raise JournalConflictError(f"journal gap: version {version} after {last_version}")
            last_version = version
            if op["op"] == "edit":
                order.append(op["edit_id"])
            elif op["op"] == "rollback":
                rolled_back.add(op["edit_id"])
        head = self.head()
        if head.version != last_version:
            raise JournalConflictError(f"journal head says version {head.version}, stream ends at {last_version}")
        active = [i for i in order if i not in rolled_back]
        blobs = self.client.mget([self.key("delta", i) for i in active]) if active else []
        missing = [i for i, b in zip(active, blobs, strict=True) if b is None]
        if missing:
            raise JournalConflictError(f"delta blobs missing for edits {missing}")
        return ReplayPlan(list(zip(active, blobs, strict=True)), head)

    # ---- writes --------------------------------------------------------------------------------
    def append_edit(self, record: dict, delta_bytes: bytes, lock: WriterLock) -> None:
        """Journal one edit: stream op, delta blob, record, paging list, idempotency key, head."""
        edit_id, version = record["edit_id"], int(record["version"])
        fields = {
            "op": "edit", "edit_id": edit_id, "version": str(version), "sha256": record["sha256"],
            "author": record["author"], "ts": record["created_at"], "method": record["method"],
            "requests": json.dumps(record["requests"]), "results": json.dumps(record["results"]),
            "delta_sha256": record["delta_sha256"],
        }

        def writes(pipe) -> None:
            pipe.xadd(self.key("ops"), fields, id=f"{version}-0")
            pipe.set(self.key("delta", edit_id), delta_bytes)
            pipe.set(self.key("edit", edit_id), json.dumps(record))
            pipe.rpush(self.key("edits"), edit_id)
            if record.get("idempotency_key"):
                pipe.set(self.key("idem", record["idempotency_key"]), edit_id)

        self._transact(version, record["sha256"], "edit", edit_id, record["created_at"], lock, writes)

    def append_rollback(self, edit_id: str, version: int, sha256: str, author: str,
                        dependents: list[str], lock: WriterLock) -> dict:
        """Journal a rollback and mark the edit's record; returns the updated record."""
        ts = utc_now()
        record = self.get_edit(edit_id)
        if record is None:
            raise KeyError(edit_id)
        record["status"] = "rolled_back"
        record["rolled_back"] = {"version": version, "at": ts, "by": author, "sha256": sha256,
                                 "dependents": dependents}
        fields = {"op": "rollback", "edit_id": edit_id, "version": str(version), "sha256": sha256,
                  "author": author, "ts": ts, "dependents": json.dumps(dependents)}

        def writes(pipe) -> None:
            pipe.xadd(self.key("ops"), fields, id=f"{version}-0")
            pipe.set(self.key("edit", edit_id), json.dumps(record))

        self._transact(version, sha256, "rollback", edit_id, ts, lock, writes)
        return record

    def _transact(self, version: int, sha256: str, op: str, edit_id: str, ts: str,
                  lock: WriterLock, writes) -> None:
        head = {"version": version, "sha256": sha256, "op": op, "edit_id": edit_id, "ts": ts}
        for attempt in range(WATCH_ATTEMPTS):
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self.lock_key, self.key("head"))
                    owner = pipe.get(self.lock_key)
                    if owner is None or owner.decode() != lock.token:
                        raise LockLostError(f"writer lock {self.lock_key} is not held by this process")
                    raw = pipe.get(self.key("head"))
                    current = int(json.loads(raw)["version"]) if raw is not None else 0
                    if current != version - 1:
                        raise JournalConflictError(f"journal is at version {current}, expected {version - 1}")
                    pipe.multi()
                    writes(pipe)
                    pipe.set(self.key("head"), json.dumps(head))
                    pipe.execute()
                    break
                except redis.WatchError as err:
                    # our own heartbeat's PEXPIRE on the lock also trips WATCH: check owner and head again
                    if attempt + 1 == WATCH_ATTEMPTS:
                        raise JournalConflictError("journal head or writer lock changed during the write") from err
                    log.info("journal write raced a change of the lock or head; checking again",
                             extra={"op": op, "edit_id": edit_id, "attempt": attempt + 1})
        log.info("journal op written", extra={"op": op, "edit_id": edit_id, "version": version})
