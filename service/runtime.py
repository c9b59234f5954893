"""Startup and shutdown of everything behind the HTTP layer.

Startup runs on a background thread so that ``/health/live`` answers at once and ``/health/ready``
says 503 until the service can really serve:

  redis (external or embedded) -> load model -> EditStack (fingerprint) -> writer lock
  -> editors -> replay journal + verify sha256 -> worker thread -> ready

The writer lock is taken as soon as the model's fingerprint is known, because the lock lives in the
fingerprint's key namespace; nothing reads or writes the journal before it is held.

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

from editor_core.stack import EditStack
from service.engine import EditEngine
from service.journal import Journal
from service.methods import effective_default_method, locate_editors, mend_editor_dir, service_stack_targets
from service.metrics import Metrics
from service.redis_embedded import EmbeddedRedis
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
        self._thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._failed_once = threading.Lock()

    @property
    def ready(self) -> bool:
        if self._note_journal_lost():
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
                self.client = redis.Redis.from_url(s.redis_url)
            else:
                self.embedded = EmbeddedRedis(s.data_dir).start()
                self.client = redis.Redis.from_url(self.embedded.url)
                self._watch_embedded()
            self.client.ping()
            self._phase("loading")
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
            if self.embedded is not None:
                self._drop_stale_lock()
            self.lock = WriterLock(self.client, self.journal.lock_key, s.lock_ttl_ms)
            self.lock.acquire(wait_s=s.lock_wait_s)
            self.lock.start_heartbeat()
            made = self.editors_factory(stack, model, tokenizer, s)
            editors = {m: e for m, e in made.items() if not isinstance(e, str)}
            unavailable = {m: e for m, e in made.items() if isinstance(e, str)}
            canaries = None
            if s.canary_guard:
                from editor_core.canary import CanarySet

                canaries = CanarySet(model, tokenizer)  # on the unedited weights: replay comes after
            self.engine = EditEngine(model, tokenizer, stack, editors, self.journal, self.lock,
                                     self.metrics, unavailable, max_update_ratio=s.max_update_ratio,
                                     canaries=canaries, canary_max_changed=s.canary_max_changed,
                                     canary_max_logprob_drop=s.canary_max_logprob_drop,
                                     default_method=effective_default_method(s, sorted(editors)))
            self._phase("replaying")
            self.engine.replay()
            self.worker = ModelWorker(self.engine.answer, max_batch=s.max_batch_size,
                                      max_wait_s=s.max_wait_ms / 1000.0,
                                      on_batch=self.metrics.batch_size.observe)
            self.worker.start()
            self.metrics.ready.set(1)
            self._phase("ready")
            log.info("service ready", extra={"model": s.model, "fingerprint": stack.fingerprint[:16],
                                             "version": self.engine.version, "editors": sorted(editors),
                                             "unavailable": sorted(unavailable)})
        except Exception as err:
            self.status.phase, self.status.error = "failed", f"{type(err).__name__}: {err}"
            log.exception("startup failed")
            self._fail(f"startup failed: {self.status.error}")
        finally:
            self._ready.set()

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
        if self.worker is not None:
            self.worker.stop()
        if self.lock is not None:
            self.lock.release()
        if self.client is not None:
            self.client.close()
        if self.embedded is not None:
            self.embedded.stop()
        self.status.phase = "stopped"
        log.info("service stopped")
