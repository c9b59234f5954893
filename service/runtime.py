"""Startup and shutdown of everything behind the HTTP layer.

Startup runs on a background thread so that ``/health/live`` answers at once and ``/health/ready``
says 503 until the service can really serve:

  redis (external or embedded) -> load model -> EditStack (fingerprint) -> role (writer lock)
  -> editors -> replay journal + verify sha256 -> worker thread -> [journal follower] -> ready

The role is decided as soon as the model's fingerprint is known, because the writer lock lives in the
fingerprint's key namespace. ``writer`` waits for the lock (``lock_wait_s``) and nothing writes the
journal before it is held; ``replica`` never takes it; ``auto`` takes it if it is free and is a replica
otherwise (an embedded redis-server has no other user, so ``auto`` is then the writer). Replicas and
``auto`` instances run a :class:`service.replica.Follower` after the replay: it applies the stream's
ops in journal order with a sha256 check per op, and switches an ``auto`` instance's role on failover
(rules in :mod:`service.roles`).

A failed startup, or an embedded redis-server that dies under a running service, calls
``on_failure(reason)``: ``mend serve`` sets it to end the process with a non-zero status, so that a
supervisor restarts it (the restart recovers from the AOF). Without it (``create_app`` in tests) the
runtime just reports ``failed`` / ``journal_unavailable`` on ``/health/ready``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import torch

from editor_core.allocator import pin_mmap_threshold
from editor_core.stack import EditStack
from service.engine import EditEngine
from service.journal import Journal
from service.methods import effective_default_method, locate_editors, mend_editor_dir, service_stack_targets
from service.metrics import Metrics
from service.redis_conn import connect, describe
from service.redis_embedded import EmbeddedRedis
from service.replica import Follower
from service.roles import REPLICA, WRITER, Roles, advertised_url
from service.settings import Settings
from service.worker import ModelWorker
from service.writer_lock import WriterLock

log = logging.getLogger(__name__)

# loader(settings) -> object with .model and .tokenizer (editor_core.models.LoadedModel or similar)
Loader = Callable[[Settings], Any]
# editors(stack, model, tokenizer, settings) -> {method: Editor, or a str saying why it is unavailable}
EditorsFactory = Callable[[EditStack, Any, Any, Settings], dict[str, Any]]


def default_loader(settings: Settings):
    """Load the configured model through editor_core.models (safetensors cache, GGUF, HF dirs)."""
    from editor_core.models import load

    dtype = getattr(torch, settings.dtype)
    return load(settings.model, device=settings.device, dtype=dtype, cache_dir=settings.model_cache)


def default_editors(stack: EditStack, model, tokenizer, settings: Settings) -> dict[str, Any]:
    """FT always; MEND when a trained editor exists for this model; ROME/MEMIT/AlphaEdit with key statistics."""
    editors: dict[str, Any] = locate_editors(stack, settings)
    try:
        from editor_core.baselines import FTConfig, FTEditor
        from editor_core.checkpoint import stack_targets

        # FT tunes MEND's targets only, as before the locate-then-edit layers joined the stack
        ft_targets = tuple(t.name for t in stack_targets(model, mend_editor_dir(settings)))
        editors["ft"] = FTEditor(stack, FTConfig(targets=ft_targets))
    except ImportError as err:
        editors["ft"] = f"the ft editor is not available in this build ({err})"
    editor_dir = mend_editor_dir(settings)
    if editor_dir is None:
        editors["mend"] = (
            f"no trained MEND editor for model {settings.model!r}: train one with `mend train` and point "
            "MEND_EDITOR_DIR at it, or use another method"
        )
        return editors
    try:
        from editor_core.editor import MendEditor

        editors["mend"] = MendEditor.load(Path(editor_dir), stack)
        log.info("trained MEND editor loaded", extra={"editor_dir": str(editor_dir)})
    except Exception as err:  # a checkpoint that does not fit must not stop ft from serving
        log.error("trained MEND editor unusable", extra={"editor_dir": str(editor_dir), "error": str(err)})
        editors["mend"] = f"the MEND editor at {editor_dir} cannot be used with this model: {err}"
    return editors


@dataclass
class Status:
    # starting | connecting | loading | locking | replaying | ready | failed | journal_unavailable | stopped
    phase: str = "starting"
    error: str | None = None


WATCH_INTERVAL_S = 0.5  # how often the embedded redis-server's liveness is polled (a waitpid, no I/O)
# how long /health/ready reports journal_unavailable before the service exits, so a probe or a dashboard
# polling it sees why the service is about to go (without it the exit raced the first probe after the loss)
REPORT_BEFORE_EXIT_S = 1.0


class Runtime:
    """Owns redis, the lock, the engine and the worker of one app instance."""

    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader | None = None,
                 editors: EditorsFactory | None = None, on_failure: Callable[[str], None] | None = None):
        self.settings = settings
        self.on_failure = on_failure
        self.metrics = metrics
        self.loader = loader or default_loader
        self.editors_factory = editors or default_editors
        self.status = Status()
        self.embedded: EmbeddedRedis | None = None
        self.client: redis.Redis | None = None
        self.lock: WriterLock | None = None
        self.journal: Journal | None = None
        self.engine: EditEngine | None = None
        self.worker: ModelWorker | None = None
        self.model_source: str | None = None
        self.roles: Roles | None = None
        self.follower: Follower | None = None
        self._thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._failed_once = threading.Lock()

    @property
    def ready(self) -> bool:
        if self._note_journal_lost():
            return False
        if self.follower is not None and self.follower.error is not None:
            self.status.phase, self.status.error = "failed", self.follower.error
            return False
        return self._ready.is_set() and self.worker is not None and self.worker.alive

    def _note_journal_lost(self) -> bool:
        """True (and the status says why) when the embedded redis-server died under the service."""
        lost = self.journal_lost()
        if lost is not None:
            self.status.phase, self.status.error = "journal_unavailable", lost
        return lost is not None

    def journal_lost(self) -> str | None:
        """Why the embedded redis-server is gone while it should run, or None (cheap: a waitpid)."""
        embedded = self.embedded
        if embedded is None or embedded.stopping or self._closing.is_set():
            return None
        code = embedded.returncode
        return None if code is None else f"embedded redis-server pid {embedded.pid} exited with {code}"

    def start(self) -> None:
        """Begin startup on a background thread."""
        self._thread = threading.Thread(target=self._startup, name="startup", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until ready (True) or failed/timeout (False)."""
        self._ready.wait(timeout_s)
        return self.ready

    def _phase(self, phase: str) -> None:
        self.status.phase = phase
        log.info("startup phase", extra={"phase": phase})

    def _startup(self) -> None:
        s = self.settings
        try:
            self._phase("connecting")
            if s.redis_url:
                log.info("journal in Redis", extra={"redis": describe(s.redis_url)})
                self.client = connect(s.redis_url)
            elif s.role == REPLICA:
                raise ValueError("role replica needs MEND_REDIS_URL: a replica follows the journal of a writer "
                                 "in a shared Redis, and an embedded redis-server has no writer")
            else:
                self.embedded = EmbeddedRedis(s.data_dir).start()
                self.client = redis.Redis.from_url(self.embedded.url)
                self._watch_embedded()
            self.client.ping()
            self._phase("loading")
            pin_mmap_threshold(s.malloc_mmap_threshold)  # before the model's tensors are allocated
            if s.torch_threads:
                torch.set_num_threads(s.torch_threads)
            loaded = self.loader(s)
            model, tokenizer = loaded.model, loaded.tokenizer
            model.eval()
            self.model_source = str(getattr(loaded, "source", s.model))
            # the stack covers the MEND editor's targets (they fix the fingerprint and journal namespace)
            stack = EditStack(model, service_stack_targets(model, s))
            self.journal = Journal(self.client, stack.fingerprint, s.redis_prefix)
            self._phase("locking")
            self.lock = WriterLock(self.client, self.journal.lock_key, s.lock_ttl_ms)
            role = self._take_role()
            self.roles = Roles(s.role, self.journal, advertised_url(s), role)
            made = self.editors_factory(stack, model, tokenizer, s)
            editors = {m: e for m, e in made.items() if not isinstance(e, str)}
            unavailable = {m: e for m, e in made.items() if isinstance(e, str)}
            canaries = None
            if s.canary_guard and s.role != REPLICA:
                from editor_core.canary import CanarySet

                canaries = CanarySet(model, tokenizer)  # on the unedited weights: replay comes after
            self.engine = EditEngine(model, tokenizer, stack, editors, self.journal, self.lock,
                                     self.metrics, unavailable, max_update_ratio=s.max_update_ratio,
                                     canaries=canaries, canary_max_changed=s.canary_max_changed,
                                     canary_max_logprob_drop=s.canary_max_logprob_drop,
                                     canary_max_changed_total=s.canary_max_changed_total,
                                     default_method=effective_default_method(s, sorted(editors)),
                                     max_delta_bytes=s.max_delta_bytes)
            self._phase("replaying")
            self.engine.replay()
            self.worker = ModelWorker(self.engine.answer, max_batch=s.max_batch_size,
                                      max_wait_s=s.max_wait_ms / 1000.0,
                                      on_batch=self.metrics.batch_size.observe)
            self.worker.start()
            if role == WRITER:
                self.roles.publish(self.lock.token)
            if s.role != WRITER:
                url = s.redis_url or self.embedded.url
                follow_client = connect(url, socket_timeout=s.lock_ttl_ms / 1000.0 + 10, socket_connect_timeout=5)
                self.follower = Follower(follow_client, self.journal, self.engine, self.worker, self.roles,
                                         self.lock, self.metrics, on_failure=self._fail)
                self.follower.start()
            self.metrics.ready.set(1)
            self._phase("ready")
            log.info("service ready", extra={"model": s.model, "fingerprint": stack.fingerprint[:16], "role": role,
                                             "version": self.engine.version, "editors": sorted(editors),
                                             "unavailable": sorted(unavailable)})
        except Exception as err:
            self.status.phase, self.status.error = "failed", f"{type(err).__name__}: {err}"
            log.exception("startup failed")
            self._fail(f"startup failed: {self.status.error}")
        finally:
            self._ready.set()

    def _take_role(self) -> str:
        """writer: wait for the lock; replica: never take it; auto: take it if it is free."""
        s = self.settings
        if s.role == REPLICA:
            return REPLICA
        if s.role == "auto" and self.embedded is None:
            if self.lock.try_acquire():
                self.lock.start_heartbeat()
                return WRITER
            log.info("writer lock held by another instance: starting as a replica",
                     extra={"holder": (self.client.get(self.journal.lock_key) or b"").decode(errors="replace")})
            return REPLICA
        if self.embedded is not None:
            self._drop_stale_lock()
        self.lock.acquire(wait_s=s.lock_wait_s)
        self.lock.start_heartbeat()
        return WRITER

    def replication(self) -> dict:
        """Role, versions and lag (also pushed to the metrics)."""
        engine = self.engine
        if self.follower is not None and not self.roles.is_writer:
            lag = self.follower.lag()
        else:
            v = engine.version if engine is not None else 0
            lag = {"applied_version": v, "head_version": v, "lag_ops": 0, "lag_s": 0.0, "redis_reachable": True}
            self.metrics.journal_head_version.set(v)
            self.metrics.replica_lag_ops.set(0)
            self.metrics.replica_lag_seconds.set(0)
        role = self.roles.current if self.roles is not None else None
        self.metrics.writer.set(1 if role == WRITER else 0)
        return {"role": role, "configured_role": self.settings.role, **lag}

    def _drop_stale_lock(self) -> None:
        """Embedded journal: a writer lock found in it was left by a crashed service, so drop it
        rather than wait out its ttl. Nobody alive can hold it: this process holds the data dir's
        flock and started this redis-server itself on a new port, so the holder's heartbeat went
        with the redis-server it was talking to."""
        key = self.journal.lock_key
        holder = self.client.get(key)
        if holder is not None and self.client.delete(key):
            log.warning("writer lock left by a crashed service removed (embedded journal: no other holder "
                        "is possible)", extra={"lock": key, "holder": holder.decode(errors="replace")})

    def _watch_embedded(self) -> None:
        """Start the thread that notices the embedded redis-server dying under the service."""
        self._watcher = threading.Thread(target=self._watch, name="redis-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._closing.wait(WATCH_INTERVAL_S):
            if self._note_journal_lost():
                lost = self.status.error or "embedded redis-server exited"
                self.metrics.ready.set(0)
                log.error("the journal is gone: %s", lost, extra={"phase": "journal_unavailable"})
                self._closing.wait(REPORT_BEFORE_EXIT_S)  # a shutdown meanwhile ends the wait (and _fail is a no-op)
                self._fail(lost)
                return

    def _fail(self, reason: str) -> None:
        """Tell the owner (once) that this runtime cannot serve; ``mend serve`` then exits non-zero."""
        if self.on_failure is None or self._closing.is_set() or not self._failed_once.acquire(blocking=False):
            return
        try:
            self.on_failure(reason)
        except Exception:  # the hook must not take the startup or watcher thread's report down with it
            log.exception("on_failure hook raised")

    def shutdown(self) -> None:
        """Stop the worker, release the lock, close redis, stop the embedded server."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self.metrics.ready.set(0)
        if self.follower is not None:
            self.follower.stop()
        if self.worker is not None:
            self.worker.stop()
        if self.lock is not None and (self.roles is None or self.roles.is_writer):
            self.lock.release()  # a replica holds none (a deposed writer released it when it stepped down)
        if self.client is not None:
            self.client.close()
        if self.embedded is not None:
            self.embedded.stop()
        self.status.phase = "stopped"
        log.info("service stopped")
