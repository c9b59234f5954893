"""Roles: one writer per journal, any number of replicas that follow it.

Rules (the design's, enforced here, in :mod:`service.replica` and in :mod:`service.journal`):

- One writer. Only the holder of the journal's writer lock applies and journals edits and rollbacks;
  every journal write WATCHes the lock and the head, so a deposed writer's write fails and the
  stream never forks.
- Journal order. A replica applies the stream's ops one after another from its last applied
  version (never one twice, never one skipped) through the engine's :meth:`EditEngine.follow`.
- sha256 per op. After each op a replica compares its targets' sha256 with the one the journal
  recorded for that op before it serves that version; if they differ it rebuilds from the journal
  (the restart replay) and, if that differs too, stops serving.
- ``writer`` takes the lock (waiting ``lock_wait_s``) and edits; a writer that loses its lock refuses
  edits (503) and keeps its weights (use ``auto`` to have it follow the new writer instead).
  ``replica`` never takes the lock. ``auto`` is the writer while it holds the lock and a replica
  otherwise: a replica whose writer's lock expired takes it and becomes the writer only after it has
  applied the journal head; a writer that sees another holder of the lock becomes a replica.
- No silent proxy. On a replica, ``POST /edit`` and ``POST /rollback`` answer 409 ``not_writer``
  naming the writer's advertised URL, which the writer publishes in Redis (``<ns>:writer``) when it
  becomes the writer; the URL is given only while its publisher still holds the lock.
"""

from __future__ import annotations

import json
import logging
import socket
import threading

import redis

from service.errors import ServiceError
from service.journal import Journal, utc_now
from service.settings import Settings

log = logging.getLogger(__name__)

WRITER, REPLICA = "writer", "replica"


class NotWriterError(ServiceError):
    """A write sent to a replica: 409 with the writer's URL (``writer_url``; null when none holds the lock)."""

    status, code = 409, "not_writer"


def advertised_url(settings: Settings) -> str:
    """``MEND_ADVERTISE_URL``, else http://<host>:<port> (the host name when bound to every address)."""
    if settings.advertise_url:
        return settings.advertise_url.rstrip("/")
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"http://{host}:{settings.port}"


class Roles:
    """The role this instance plays now (``writer`` or ``replica``) and the writer's published URL."""

    def __init__(self, configured: str, journal: Journal, url: str, current: str):
        self.configured = configured  # writer | replica | auto
        self.journal = journal
        self.url = url
        self._current = current
        self._lock = threading.Lock()
        self.changed_at: str | None = None

    @property
    def current(self) -> str:
        return self._current

    @property
    def is_writer(self) -> bool:
        return self._current == WRITER

    def set(self, role: str) -> None:
        """Switch roles (called on the model-worker thread, between jobs, so no edit is in flight)."""
        with self._lock:
            if role != self._current:
                log.warning("role changed", extra={"from": self._current, "to": role})
            self._current = role
            self.changed_at = utc_now()

    def publish(self, owner_token: str) -> None:
        """As the new writer: tell replicas (and their 409s) where edits go."""
        body = {"url": self.url, "owner": owner_token, "since": utc_now()}
        self.journal.client.set(self.journal.key("writer"), json.dumps(body))
        log.info("writer URL published", extra={"url": self.url})

    def writer_url(self) -> str | None:
        """The URL the current lock holder published, or None (no holder, or it published none)."""
        client = self.journal.client
        try:
            raw, holder = client.mget([self.journal.key("writer"), self.journal.lock_key])
        except redis.RedisError:
            return None
        if raw is None or holder is None:
            return None
        body = json.loads(raw)
        return body.get("url") if body.get("owner") == holder.decode() else None

    def require_writer(self, version: int) -> None:
        """Raise :class:`NotWriterError` unless this instance is the writer now."""
        if self.is_writer:
            return
        url = self.writer_url()
        where = f"the writer at {url}" if url else "the writer (none holds the lock right now; retry shortly)"
        raise NotWriterError(f"this instance is a replica (role {self.configured}); send edits and rollbacks to "
                             f"{where}", writer_url=url, version=version)
