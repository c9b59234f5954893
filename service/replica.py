"""Follow the journal: a replica applies the writer's ops as they land; ``auto`` fails over.

Rules (see also :mod:`service.roles`):

- Journal order: ops are read from the Redis Stream (``<ns>:ops``, entry id ``<version>-0``) with a
  blocking ``XREAD`` from the last applied version and applied in that order; an op at or below the
  applied version is never applied again, and a gap is never skipped over.
- sha256 per op: each op is applied by :meth:`EditEngine.follow` on the model-worker thread, which
  checks the targets' sha256 recorded for that op before the new version serves a query (so a query
  batch always runs on exactly one journal version, and never on one that was not verified).
- One writer: a replica never writes the journal. In ``auto`` a replica that finds the writer lock
  free takes it, applies the journal up to the head (nobody can move it while we hold the lock), and
  only then becomes the writer; a writer that sees another holder of the lock (twice in a row, one
  check interval apart) becomes a replica and follows from its version, so it never serves a fork.
- Redis errors (a restart from the AOF, a Sentinel failover, a network cut) are retried with backoff
  from the applied version: nothing is lost and nothing is applied twice.

Lag, for ``/health/ready`` and ``/metrics``: ops = head version - applied version; seconds = how long
this replica has been behind the head without catching up (measured on its own clock), or, while
Redis cannot be reached, since it last could.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import redis

from service.engine import EditEngine
from service.errors import JournalMismatchError
from service.journal import Journal, JournalConflictError
from service.metrics import Metrics
from service.roles import REPLICA, WRITER, Roles
from service.worker import ModelWorker, WorkerStoppedError
from service.writer_lock import WriterLock

log = logging.getLogger(__name__)

READ_BATCH = 200  # ops per XREAD
APPLY_BATCH = 64  # ops per exclusive job on the worker (queries run between jobs)
MAX_BLOCK_MS = 1000  # longest XREAD BLOCK (also how often an auto replica looks at the lock)
BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0)  # after consecutive Redis errors
CONFLICT_RETRIES = 5  # a full replay racing the writer (JournalConflictError) is retried this often
JOB_TIMEOUT_S = 600.0


class Follower:
    """The follower thread of a ``replica`` or ``auto`` instance."""

    def __init__(self, client: redis.Redis, journal: Journal, engine: EditEngine, worker: ModelWorker,
                 roles: Roles, lock: WriterLock, metrics: Metrics, on_failure: Callable[[str], None]):
        self.client = client  # own connection pool, with a socket timeout above the XREAD block
        self.journal = Journal(client, journal.fingerprint, journal.ns.rsplit(":", 1)[0])
        self.engine = engine
        self.worker = worker
        self.roles = roles
        self.lock = lock
        self.metrics = metrics
        self.on_failure = on_failure
        self.block_ms = max(50, min(MAX_BLOCK_MS, lock.ttl_ms // 4))
        self.head_version = engine.version
        self.error: str | None = None
        self._behind_since: float | None = None
        self._last_contact = time.monotonic()
        self._redis_down_since: float | None = None
        self._suspect_deposed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="journal-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.block_ms / 1000.0 + 10)
        self.client.close()

    # ---- lag -----------------------------------------------------------------------------------
    def lag(self) -> dict:
        """Applied and head versions, lag in ops and seconds, and whether Redis answers."""
        now = time.monotonic()
        ops = max(0, self.head_version - self.engine.version)
        if self._redis_down_since is not None:
            seconds = now - self._last_contact
        elif ops and self._behind_since is not None:
            seconds = now - self._behind_since
        else:
            seconds = 0.0
        return {"applied_version": self.engine.version, "head_version": self.head_version, "lag_ops": ops,
                "lag_s": round(seconds, 3), "redis_reachable": self._redis_down_since is None}

    def _note_head(self, head_version: int) -> None:
        self.head_version = max(head_version, self.engine.version)
        self._last_contact = time.monotonic()
        self._redis_down_since = None
        if self.head_version > self.engine.version:
            if self._behind_since is None:
                self._behind_since = time.monotonic()
        else:
            self._behind_since = None
        self._export()

    def _export(self) -> None:
        lag = self.lag()
        self.metrics.journal_head_version.set(lag["head_version"])
        self.metrics.replica_lag_ops.set(lag["lag_ops"])
        self.metrics.replica_lag_seconds.set(lag["lag_s"])

    # ---- loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        errors = conflicts = 0
        while not self._stop.is_set():
            try:
                if self.roles.is_writer:
                    self._step_writer()
                else:
                    self._step_replica()
                errors = conflicts = 0
            except (WorkerStoppedError, RuntimeError) as err:
                if self._stop.is_set() or isinstance(err, WorkerStoppedError):
                    return
                if isinstance(err, JournalConflictError) and conflicts < CONFLICT_RETRIES:
                    conflicts += 1  # a full replay read the stream while the writer appended: again
                    log.info("journal moved during a replay; reading again", extra={"error": str(err)})
                    continue
                self._give_up(f"{type(err).__name__}: {err}")
                return
            except redis.RedisError as err:
                if self._redis_down_since is None:
                    self._redis_down_since = time.monotonic()
                    log.warning("journal unreachable; the follower retries from its version",
                                extra={"error": str(err), "version": self.engine.version})
                self._export()
                self._stop.wait(BACKOFF_S[min(errors, len(BACKOFF_S) - 1)])
                errors += 1
            except JournalMismatchError as err:
                self._give_up(err.message)
                return

    def _give_up(self, reason: str) -> None:
        self.error = reason
        log.error("the follower stopped: %s", reason, extra={"version": self.engine.version})
        self.on_failure(f"journal follower: {reason}")

    def _step_replica(self) -> None:
        entries = self._read(self.engine.version, block=True)
        if entries:
            self._apply(entries)
        self._note_head(self.journal.head().version)
        if self.roles.configured == "auto" and not self._stop.is_set() and self.client.get(self.lock.key) is None:
            self._take_over()

    def _step_writer(self) -> None:
        """auto writer: watch the lock; another holder (seen twice) or a moved head means deposed."""
        self._stop.wait(self.lock.ttl_ms / 3000.0)
        if self._stop.is_set():
            return
        owner = self.client.get(self.lock.key)
        head = self.journal.head()
        self._note_head(head.version)
        mine = owner is not None and owner.decode() == self.lock.token
        deposed = (owner is not None and not mine) or (owner is None and head.version != self.engine.version)
        self._suspect_deposed = self._suspect_deposed + 1 if deposed else 0
        if self._suspect_deposed >= 2:
            self._suspect_deposed = 0
            self.lock.release()  # stops the heartbeat; deletes the key only if it is still ours
            self._on_worker(lambda: self.roles.set(REPLICA))
            log.warning("writer lock held by another instance: now a replica following the journal",
                        extra={"holder": owner.decode() if owner else None, "version": self.engine.version})

    # ---- reading and applying ------------------------------------------------------------------
    def _read(self, after: int, block: bool) -> list[tuple[dict, bytes | None]]:
        """Ops after version ``after`` (blocking up to ``block_ms`` for the first), with edit blobs."""
        key = self.journal.key("ops")
        if block:
            reply = self.client.xread({key: f"{after}-0"}, count=READ_BATCH, block=self.block_ms)
            raw = reply[0][1] if reply else []
        else:
            raw = self.client.xrange(key, min=f"({after}-0", max="+", count=READ_BATCH)
        ops = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in raw]
        edit_ids = [o["edit_id"] for o in ops if o.get("op") == "edit"]
        blobs = dict(zip(edit_ids, self.client.mget([self.journal.key("delta", i) for i in edit_ids]),
                         strict=True)) if edit_ids else {}
        return [(o, blobs.get(o["edit_id"]) if o.get("op") == "edit" else None) for o in ops]

    def _apply(self, entries: list[tuple[dict, bytes | None]]) -> None:
        for start in range(0, len(entries), APPLY_BATCH):
            chunk = entries[start:start + APPLY_BATCH]
            before = self.engine.version
            after = self._on_worker(lambda c=chunk: self.engine.follow(c))
            self.metrics.replica_ops_applied.inc(max(0, after - before))

    def _on_worker(self, fn: Callable[[], object]):
        """Run ``fn`` as an exclusive job on the model-worker thread and wait for it."""
        fut: Future = self.worker.submit_exclusive(fn)
        return fut.result(timeout=JOB_TIMEOUT_S)

    # ---- failover ------------------------------------------------------------------------------
    def _take_over(self) -> None:
        """auto replica, writer lock free: take it, apply up to the head, then become the writer."""
        if not self.lock.try_acquire():
            return
        self.lock.start_heartbeat()
        started = time.monotonic()
        try:
            head = self.journal.head()
            while self.engine.version < head.version and not self._stop.is_set():
                entries = self._read(self.engine.version, block=False)
                if not entries:
                    raise JournalConflictError(f"the journal head is version {head.version} but its stream "
                                               f"ends at {self.engine.version}")
                self._apply(entries)
            if self.engine.version != head.version or (head.sha256 and self.engine.sha256 != head.sha256):
                raise JournalConflictError(f"after catching up to version {self.engine.version} the weights do "
                                           f"not match the head (version {head.version})")
            self._on_worker(lambda: self.roles.set(WRITER))
            self.roles.publish(self.lock.token)
            self._note_head(head.version)
        except BaseException:
            self.lock.release()
            raise
        log.warning("took over as the writer", extra={"version": self.engine.version,
                                                      "catch_up_ms": round((time.monotonic() - started) * 1000)})
