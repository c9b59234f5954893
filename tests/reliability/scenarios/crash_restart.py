"""Scenario: back by itself after a crash (issue 12). `mend serve` with its EMBEDDED redis-server.

- kill -9 of the whole service process group, then an immediate restart on the same data dir,
  ``cycles`` times in a row: the old redis-server goes with its parent (parent-death signal), the
  restart is ready with every acknowledged edit active and the same sha256;
- kill -9 of the embedded redis-server only: /health/ready says 503 journal_unavailable naming it,
  the service exits 1 by itself, and a restart recovers from the AOF;
- a redis-server left over by a pre-fix service (started by hand with the old arguments): shut down
  cleanly, then ready with the journal intact;
- a pid file naming an unrelated live process (``sleep``): that process untouched, service ready;
- a pid file naming a live redis-server of another dir: refused with the reason, exit 1, untouched;
- a port in use: exit 1 with the reason.

    python tests/reliability/scenarios/crash_restart.py          # CI size: 5 kill -9 cycles
    python tests/reliability/scenarios/crash_restart.py --full   # 20 cycles
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import httpx  # noqa: E402
import redis  # noqa: E402
from harness import REPO, ServiceProc, edit_body, percentiles, scenario_main, tiny_model_dir  # noqa: E402

from service.redis_embedded import EmbeddedRedis, free_port, redis_server_binary  # noqa: E402
from service.redis_leftover import process_alive, read_pidfile, wait_gone  # noqa: E402

CI = {"cycles": 5}
FULL = {"cycles": 20}
READY_S = 60.0  # "the usual time": the tiny model is ready in seconds; this only bounds a hang
REDIS_GONE_S = 5.0  # the orphaned redis-server must exit this soon after its service's SIGKILL


class EmbeddedServiceProc(ServiceProc):
    """``python -m service.cli serve`` with the embedded redis-server (no MEND_REDIS_URL), in its own
    process group so that the test can SIGKILL the group as an OOM kill or a crashed container does."""

    def __init__(self, workdir: Path, model_dir: Path, **settings):
        # the production lock ttl (the harness shortens it): a restart within it must not wait it out
        settings = {"lock_ttl_ms": 15000, **settings}
        super().__init__(workdir, model_dir, redis_url="", prefix="mend", name="embedded", **settings)
        self.data_dir = self.workdir / "var"

    def start(self) -> EmbeddedServiceProc:
        self.starts += 1
        out = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        out.write(f"\n--- start {self.starts} ---\n".encode())
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=self.env, cwd=REPO,
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        out.close()
        return self

    def kill_group(self) -> None:
        """SIGKILL the service's process group (the redis-server has its own session: not in it)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def exit_code(self, timeout_s: float = 60.0) -> int | None:
        """The exit status once the process ends by itself within ``timeout_s``, else None."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def redis_pid(self) -> int | None:
        return read_pidfile(self.data_dir / "redis-server.pid")

    def this_start_log(self) -> str:
        return self.log_text().rsplit(f"--- start {self.starts} ---", 1)[-1]


def _timed_start(svc: EmbeddedServiceProc) -> tuple[dict, float]:
    t0 = time.monotonic()
    ready = svc.start().wait_ready(READY_S)
    return ready, (time.monotonic() - t0) * 1000


def _same_state(ready: dict, before: dict, edits: list[str], svc: EmbeddedServiceProc, what: str) -> list[str]:
    problems = []
    got = (ready["version"], ready["sha256"], ready["active_edits"])
    want = (before["version"], before["sha256"], before["active_edits"])
    if got != want:
        problems.append(f"{what}: (version, sha256, active) {got} != {want}")
    for eid in edits:
        r = httpx.get(f"{svc.base}/edits/{eid}", timeout=10)
        if r.status_code != 200 or r.json().get("status") != "active":
            problems.append(f"{what}: edit {eid} is not active: {r.status_code} {r.text[:200]}")
    return problems


def _edit(svc: EmbeddedServiceProc, i: int) -> str:
    r = httpx.post(f"{svc.base}/edit", json=edit_body(i), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["edit_id"]


def _watch_exit(pid: int, sink: list[float]) -> threading.Thread:
    """Record (ms) when ``pid`` is gone, polling from now on."""
    t0 = time.monotonic()

    def poll() -> None:
        if wait_gone(pid, 30):
            sink.append((time.monotonic() - t0) * 1000)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    return t


def run_kill_restart(cycles: int, workdir: Path, model_dir: Path | None = None) -> dict:
    """Edit, SIGKILL the service's group, restart at once: ``cycles`` times."""
    svc = EmbeddedServiceProc(workdir, model_dir or tiny_model_dir(workdir))
    problems: list[str] = []
    restart_ms: list[float] = []
    redis_exit_ms: list[float] = []
    edits: list[str] = []
    adopted = stale_locks = 0
    try:
        ready, first_ms = _timed_start(svc)
        for cycle in range(cycles):
            edits.append(_edit(svc, cycle))
            before = svc.ready_body()[1]
            old_redis = svc.redis_pid()
            svc.kill_group()
            watcher = _watch_exit(old_redis, redis_exit_ms)
            ready, ms = _timed_start(svc)  # a supervisor restarts at once
            restart_ms.append(ms)
            problems += _same_state(ready, before, edits, svc, f"cycle {cycle}")
            watcher.join(REDIS_GONE_S)
            if process_alive(old_redis):
                problems.append(f"cycle {cycle}: redis-server pid {old_redis} outlived its service")
            text = svc.this_start_log()
            adopted += "found leftover embedded redis-server" in text
            stale_locks += "writer lock left by a crashed service removed" in text
            if "waiting for writer lock" in text:
                problems.append(f"cycle {cycle}: the restart waited for the dead service's writer lock")
        if redis_exit_ms and max(redis_exit_ms) > REDIS_GONE_S * 1000:
            problems.append(f"an orphaned redis-server took {max(redis_exit_ms):.0f} ms to exit")
        if svc.stop() not in (0, -signal.SIGTERM):
            problems.append(f"graceful stop exited with {svc.proc.returncode}")
    finally:
        svc.kill()
    return {"cycles": cycles, "edits": len(edits), "first_start_ms": round(first_ms), "problems": problems,
            "restart_to_ready": percentiles(restart_ms), "restart_ms": [round(x) for x in restart_ms],
            "old_redis_exit_after_kill": percentiles(redis_exit_ms), "leftovers_shut_down_at_restart": adopted,
            "stale_writer_locks_dropped": stale_locks}


def run_redis_killed(workdir: Path, model_dir: Path | None = None) -> dict:
    """SIGKILL the embedded redis-server only: reported, the service exits 1, a restart recovers."""
    svc = EmbeddedServiceProc(workdir, model_dir or tiny_model_dir(workdir))
    problems: list[str] = []
    seen_503: dict = {}
    try:
        svc.start().wait_ready(READY_S)
        edits = [_edit(svc, 3)]
        before = svc.ready_body()[1]
        pid = svc.redis_pid()
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while svc.proc.poll() is None and time.monotonic() - t0 < 30 and not seen_503:
            try:
                status, body = svc.ready_body()
                if status == 503:
                    seen_503 = body
            except httpx.TransportError:
                break  # already shutting down
            time.sleep(0.01)
        code = svc.exit_code(60)
        exit_ms = (time.monotonic() - t0) * 1000
        want = {"status": "journal_unavailable", "error": f"embedded redis-server pid {pid} exited with -9"}
        if seen_503 != want:
            problems.append(f"/health/ready while redis is dead: {seen_503} != {want}")
        if code != 1:
            problems.append(f"the service did not exit 1 by itself after its redis died: {code}")
        if f"the journal is gone: embedded redis-server pid {pid} exited with -9" not in svc.this_start_log():
            problems.append("the ERROR naming the dead redis-server is not in the log")
        ready, restart_ms = _timed_start(svc)
        problems += _same_state(ready, before, edits, svc, "restart after redis SIGKILL")
    finally:
        svc.stop()
    return {"problems": problems, "exit_after_redis_kill_ms": round(exit_ms), "restart_to_ready_ms": round(restart_ms),
            "ready_body_while_down": seen_503}


def _prefix_redis(data_dir: Path) -> subprocess.Popen:
    """A redis-server for ``data_dir`` started with the arguments EmbeddedRedis used before issue 12
    (its argv turns into the title "redis-server 127.0.0.1:P"): what a kill -9 used to leave behind."""
    port = free_port()
    proc = subprocess.Popen([redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir),
                             "--appendonly", "yes", "--appendfsync", "always", "--appendfilename", "journal.aof",
                             "--save", "", "--daemonize", "no", "--protected-mode", "yes",
                             "--logfile", str(data_dir / "redis-server.log"),
                             "--pidfile", str(data_dir / "redis-server.pid")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 15
    while read_pidfile(data_dir / "redis-server.pid") != proc.pid:  # written once it serves
        assert proc.poll() is None and time.monotonic() < deadline, "hand-started redis-server did not come up"
        time.sleep(0.02)
    return proc


def run_leftover_redis(workdir: Path, model_dir: Path | None = None) -> dict:
    """A live leftover redis-server of this data dir (journal in it): shut down cleanly, then ready."""
    svc = EmbeddedServiceProc(workdir, model_dir or tiny_model_dir(workdir))
    problems: list[str] = []
    try:
        svc.start().wait_ready(READY_S)
        edits = [_edit(svc, 5)]
        before = svc.ready_body()[1]
        svc.stop()
        leftover = _prefix_redis(svc.data_dir)
        ready, ms = _timed_start(svc)
        problems += _same_state(ready, before, edits, svc, "after a leftover redis-server")
        code = leftover.wait(timeout=10)
        if code != 0:
            problems.append(f"the leftover redis-server exited with {code}, not 0 (clean SHUTDOWN)")
        line = f"found leftover embedded redis-server pid {leftover.pid} on port"
        if line not in svc.this_start_log():
            problems.append("the WARNING about the leftover is not in the log")
    finally:
        svc.stop()
    return {"problems": problems, "restart_to_ready_ms": round(ms)}


def run_unrelated_pid(workdir: Path, model_dir: Path | None = None) -> dict:
    """The pid file names a live ``sleep``: never signalled; the service starts."""
    svc = EmbeddedServiceProc(workdir, model_dir or tiny_model_dir(workdir))
    svc.data_dir.mkdir(parents=True, exist_ok=True)
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    problems: list[str] = []
    try:
        (svc.data_dir / "redis-server.pid").write_text(f"{sleeper.pid}\n")
        svc.start().wait_ready(READY_S)
        if sleeper.poll() is not None:
            problems.append(f"the unrelated process was touched: exited with {sleeper.returncode}")
        if f"pid {sleeper.pid} is now another program" not in svc.this_start_log():
            problems.append("the WARNING about the stale pid file is not in the log")
    finally:
        svc.stop()
        alive_after = sleeper.poll() is None
        sleeper.kill()
        sleeper.wait()
    if not alive_after:
        problems.append("the unrelated process did not survive the service")
    return {"problems": problems}


def run_foreign_redis(workdir: Path, model_dir: Path | None = None) -> dict:
    """The pid file names a live redis-server of another dir: refused (exit 1, reason), untouched."""
    svc = EmbeddedServiceProc(workdir, model_dir or tiny_model_dir(workdir))
    svc.data_dir.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with EmbeddedRedis(workdir / "other-dir") as other:
        (svc.data_dir / "redis-server.pid").write_text(f"{other.pid}\n")
        svc.start()
        code = svc.exit_code(READY_S)
        if code != 1:
            problems.append(f"a foreign redis-server in the pid file: exit {code}, not 1")
        text = svc.this_start_log()
        if f"redis-server pid {other.pid}" not in text or "already uses" not in text:
            problems.append("the refusal's reason is not in the log")
        if "exiting with status 1" not in text:
            problems.append("the exit reason is not in the log")
        if other.returncode is not None or not redis.Redis.from_url(other.url).ping():
            problems.append("the foreign redis-server was touched")
    svc.kill()
    return {"problems": problems}


def run_port_in_use(workdir: Path, model_dir: Path | None = None) -> dict:
    """``mend serve`` on a busy port exits 1 with the reason, before starting redis or the model."""
    svc = EmbeddedServiceProc(workdir, model_dir or tiny_model_dir(workdir))
    problems: list[str] = []
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        svc.port = port
        svc.env["MEND_PORT"] = str(port)
        svc.start()
        code = svc.exit_code(READY_S)
    text = svc.this_start_log()
    if code != 1:
        problems.append(f"busy port: exit {code}, not 1")
    if f"cannot listen on 127.0.0.1:{port}" not in text or "Address already in use" not in text:
        problems.append(f"busy port: the reason is not in the log: {text[-500:]}")
    if (svc.data_dir / "journal.aof").exists():
        problems.append("busy port: redis was started for nothing")
    svc.kill()
    return {"problems": problems}


def run(cycles: int, workdir: Path | None = None) -> dict:
    """Every crash shape above, each in its own work dir; ``problems`` lists what did not hold."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mend-crash-restart-"))
    model_dir = tiny_model_dir(workdir)
    parts = {"kill_restart": lambda w, m: run_kill_restart(cycles, w, m), "redis_killed": run_redis_killed,
             "leftover_redis": run_leftover_redis, "unrelated_pid": run_unrelated_pid,
             "foreign_redis": run_foreign_redis, "port_in_use": run_port_in_use}
    figures: dict = {"problems": []}
    for name, part in parts.items():
        figures[name] = part(workdir / name, model_dir)
        figures["problems"] += [f"{name}: {p}" for p in figures[name]["problems"]]
    return figures

if __name__ == "__main__":
    sys.exit(scenario_main("crash and restart without a human (embedded redis)", run, __doc__, CI, FULL,
                           full_help="20 kill -9 cycles"))
