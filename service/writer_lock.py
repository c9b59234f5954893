"""Single-writer lock in Redis: ``SET NX PX`` with an owner token, a heartbeat, compare-and-delete."""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time

import redis

log = logging.getLogger(__name__)

# Renew only while we still own it.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
# Delete only while we still own it.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class LockUnavailableError(RuntimeError):
    """Another writer holds the lock."""


class LockLostError(RuntimeError):
    """This process no longer owns the writer lock; it must not write the journal."""


class WriterLock:
    """The journal's writer lock for one model namespace."""

    def __init__(self, client: redis.Redis, key: str, ttl_ms: int):
        self.client = client
        self.key = key
        self.ttl_ms = ttl_ms
        self.token = f"{socket.gethostname()}:{secrets.token_hex(8)}"
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take the lock, waiting up to ``wait_s`` for a current holder to release or expire."""
        deadline = time.monotonic() + wait_s
        warned = False
        while True:
            if self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
                log.info("writer lock acquired", extra={"lock": self.key, "owner": self.token})
                self.lost = False
                return
            holder = self.client.get(self.key)
            if time.monotonic() >= deadline:
                raise LockUnavailableError(f"writer lock {self.key} is held by {holder!r}")
            if not warned:
                log.warning("waiting for writer lock", extra={"lock": self.key, "holder": str(holder)})
                warned = True
            time.sleep(min(0.5, max(0.05, deadline - time.monotonic())))

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; never waits (an ``auto`` instance deciding its role)."""
        if self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
            log.info("writer lock acquired", extra={"lock": self.key, "owner": self.token})
            self.lost = False
            return True
        return False

    def try_reacquire(self) -> bool:
        """Take the lock again if it is free (it expired, e.g. while Redis was down); never waits.

        The caller must check that the journal did not move meanwhile before writing again.
        """
        if self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
            log.warning("writer lock re-acquired after it expired", extra={"lock": self.key})
            self.lost = False
            return True
        return False

    def owned(self) -> bool:
        """Whether Redis says we hold the lock right now."""
        value = self.client.get(self.key)
        return value is not None and value.decode() == self.token

    def renew(self) -> bool:
        """Extend the expiry; False (and ``lost``) when someone else owns it or it expired."""
        ok = bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))
        if not ok and not self.lost:
            log.error("writer lock lost (expired or taken over); edits are refused until it is free again and "
                      "the journal has not moved", extra={"lock": self.key})
            self.lost = True
        return ok

    def start_heartbeat(self) -> None:
        """Renew the lock every third of its ttl on a daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="writer-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = self.ttl_ms / 3000.0
        while not self._stop.wait(interval):
            try:
                self.renew()
            except redis.RedisError as err:
                log.warning("writer lock heartbeat failed", extra={"error": str(err)})

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            released = bool(self._release(keys=[self.key], args=[self.token]))
            log.info("writer lock released" if released else "writer lock was no longer ours",
                     extra={"lock": self.key})
        except redis.RedisError as err:
            log.warning("could not release writer lock (it will expire)", extra={"error": str(err)})
