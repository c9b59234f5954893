"""What the embedded data dir's ``redis-server.pid`` points at, decided from evidence.

A service killed with SIGKILL (OOM killer, crashed container) cannot stop its embedded redis-server.
The next ``mend serve`` on the same data dir then finds a pid file naming a live process, which may be

- ``ours``: this data dir's own embedded redis-server, left over. Proven only when its command line
  is a redis-server's, the port it listens on answers PING, that server's ``INFO`` says it is this
  very pid, and its ``CONFIG`` says it keeps ``journal.aof`` in this data dir. It is then shut down
  cleanly (``SHUTDOWN`` fsyncs the AOF) so that a fresh one, bound to the new service, takes over.
- ``foreign``: a redis-server that is not provably this dir's (another dir, no PING, a password...):
  refused, touched in no way (two servers on one AOF would corrupt it; guessing could kill the wrong one).
- ``unrelated``: not a redis-server at all: the pid was reused by another program after our redis
  died, so the pid file is stale. That process is never signalled.
- ``dead`` / ``none``: stale or no pid file.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

AOF_NAME = "journal.aof"
_TITLE_ADDR = re.compile(r"^\S*:(\d+)$")  # redis' process title: "redis-server 127.0.0.1:6379"


@dataclass(frozen=True)
class Leftover:
    """The verdict on a pid file: ``kind`` is none | dead | unrelated | ours | foreign."""

    kind: str
    pid: int | None = None
    port: int | None = None
    cmdline: str = ""
    reason: str = ""


def read_pidfile(path: Path) -> int | None:
    """The pid written in ``path``, or None when there is no readable pid."""
    try:
        pid = int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return _signal_zero(pid)  # no /proc (not Linux): existence only
    state = stat.rsplit(")", 1)[-1].split()[0]  # "pid (comm) S ...": comm may hold spaces and ")"
    return state not in ("Z", "X", "x")


def _signal_zero(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parse_cmdline(raw: bytes) -> list[str]:
    """argv from /proc/<pid>/cmdline. A redis-server started with ``set-proc-title yes`` (its
    default) has overwritten its argv with one space-separated title: split that on spaces."""
    parts = [p.decode(errors="replace") for p in raw.split(b"\0") if p]
    if len(parts) == 1 and " " in parts[0]:
        return parts[0].split()
    return parts


def read_cmdline(pid: int) -> list[str] | None:
    """argv of ``pid``, or None when it cannot be read."""
    try:
        return parse_cmdline(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return None


def is_redis_server(argv: list[str]) -> bool:
    """True when argv[0] is a redis-server executable."""
    return bool(argv) and os.path.basename(argv[0]) == "redis-server"


def arg_value(argv: list[str], flag: str) -> str | None:
    """The value following ``flag`` in argv (``--port 6379``), or None."""
    for i, arg in enumerate(argv[:-1]):
        if arg == flag:
            return argv[i + 1]
    return None


def listening_port(argv: list[str]) -> int | None:
    """The port from ``--port P``, else from the process title's ``host:port``."""
    value = arg_value(argv, "--port")
    if value is None:
        matched = next((m for m in map(_TITLE_ADDR.match, argv[1:]) if m), None)
        value = matched.group(1) if matched else None
    return int(value) if value is not None and value.isdigit() else None


def _same_dir(a: str | Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def argv_mismatch(argv: list[str], data_dir: Path) -> str | None:
    """Why argv shows another data dir, or None. Arguments are checked when argv still has them; a
    process title (pre-``--set-proc-title no`` servers) has none, and CONFIG then decides alone."""
    d = arg_value(argv, "--dir")
    if d is not None and not _same_dir(d, data_dir):
        return f"its --dir is {d}"
    name = arg_value(argv, "--appendfilename")
    if name is not None and name != AOF_NAME:
        return f"its --appendfilename is {name}"
    if d is None and any(a.startswith("--") for a in argv[1:]):
        return "its arguments name no --dir"
    return None


def one_shot_client(port: int, timeout_s: float) -> redis.Redis:
    """A client that does not retry: redis-py's default retries would turn SHUTDOWN's expected
    ConnectionError, or a port nobody answers on, into seconds of backoff."""
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                       retry=Retry(NoBackoff(), 0))


def probe_server(pid: int, port: int, data_dir: Path, timeout_s: float = 2.0) -> str | None:
    """Ask the server on 127.0.0.1:``port`` who it is; None when it is ``pid`` serving this dir's AOF,
    else why not."""
    client = one_shot_client(port, timeout_s)
    try:
        client.ping()
        served_by = int(client.info("server").get("process_id", -1))
        if served_by != pid:
            return f"port {port} is served by pid {served_by}"
        cfg_dir = client.config_get("dir").get("dir", "")
        if not _same_dir(cfg_dir, data_dir):
            return f"its CONFIG dir is {cfg_dir}"
        aof = client.config_get("appendfilename").get("appendfilename", "")
        if aof != AOF_NAME:
            return f"its CONFIG appendfilename is {aof}"
        return None
    except (redis.RedisError, OSError, ValueError) as err:
        return f"port {port} did not answer as expected ({type(err).__name__}: {err})"
    finally:
        client.close()


def examine(pidfile: Path, data_dir: Path) -> Leftover:
    """Classify what ``pidfile`` points at (see the module docstring)."""
    pid = read_pidfile(pidfile)
    if pid is None:
        return Leftover("none")
    if pid == os.getpid() or not process_alive(pid):
        return Leftover("dead", pid)  # our own pid can only be a reuse: that redis is gone
    argv = read_cmdline(pid)
    if argv is None:
        return Leftover("foreign", pid, reason="its command line cannot be read")
    shown = " ".join(argv)
    if not is_redis_server(argv):
        return Leftover("unrelated", pid, cmdline=shown)
    port = listening_port(argv)
    reason = argv_mismatch(argv, data_dir)
    if reason is None and port is None:
        reason = "its port cannot be told from its command line"
    if reason is None:
        reason = probe_server(pid, port, data_dir)
    return Leftover("foreign" if reason else "ours", pid, port, shown, reason or "")


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Poll until ``pid`` has exited (True) or ``timeout_s`` passed (False)."""
    deadline = time.monotonic() + timeout_s
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def shut_down(found: Leftover, timeout_s: float = 10.0) -> bool:
    """Stop a proven leftover (``kind == "ours"``) cleanly: SHUTDOWN fsyncs the AOF and exits; True.
    SIGKILL only if it is still there after ``timeout_s`` (the AOF is ``appendfsync always``, so
    even then nothing acknowledged is lost); False. Raises RuntimeError if it outlives that too."""
    assert found.kind == "ours" and found.pid is not None and found.port is not None
    client = one_shot_client(found.port, timeout_s)
    try:
        client.shutdown()  # returns when the server closes the connection on its way out
    except redis.RedisError as err:
        log.warning("SHUTDOWN of the leftover redis-server failed", extra={"pid": found.pid, "error": str(err)})
    finally:
        client.close()
    if wait_gone(found.pid, timeout_s):
        return True
    log.error("leftover redis-server ignored SHUTDOWN: killing it", extra={"pid": found.pid, "wait_s": timeout_s})
    os.kill(found.pid, signal.SIGKILL)
    if not wait_gone(found.pid, 5.0):
        raise RuntimeError(f"leftover redis-server pid {found.pid} survived SIGKILL")
    return False
