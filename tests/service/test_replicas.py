"""1 writer + 2 replicas as separate ``mend serve`` processes on one real redis-server (localhost only).

One cluster serves the module, in this order (each test leaves it healthy for the next):
  A  role auto     (starts first, so the writer)
  B  role replica
  C  role auto     (a replica until A's lock expires)
1. an edit acknowledged by A is visible on B and C; a query with min_version never answers from an
   older version; a rollback propagates; sha256 equal on all three and equal to the journal head's
2. B frozen (SIGSTOP) while edits land catches up from its version; B SIGKILLed mid-follow and
   restarted replays and follows again; no op applied twice (no fallback replay in its log)
3. Redis SIGKILLed and restarted from its AOF while B and C follow: they resume from their version
4. A SIGKILLed under edit load: C becomes the writer within lock ttl + a bounded time, no acknowledged
   edit is lost, the stream never forks, and A restarted comes back as a replica
Most requests go through :class:`service.client.MendClient`; raw HTTP only where HTTP is the point.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from harness import FACTS, RedisProc, ServiceProc, journal_problems, tiny_model_dir  # noqa: E402

from service.client import MendClient, MendError  # noqa: E402

pytestmark = [pytest.mark.integration]

LOCK_TTL_MS = 2000
TAKEOVER_BOUND_S = 5.0  # beyond the lock ttl: one follower poll, the catch-up, the role switch


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.model_dir = tiny_model_dir(root)
        self.redis = RedisProc(root / "redis").start()
        self.prefix = f"rep-{uuid.uuid4().hex[:6]}"
        self.procs: dict[str, ServiceProc] = {}

    def add(self, name: str, role: str) -> ServiceProc:
        p = ServiceProc(self.root, self.model_dir, self.redis.url, self.prefix, name=name, role=role,
                        lock_ttl_ms=LOCK_TTL_MS, min_version_wait_s=10, log_format="text")
        p.env["MEND_ADVERTISE_URL"] = p.base
        self.procs[name] = p
        return p.start()

    def ready(self, name: str) -> dict:
        return self.procs[name].ready_body()[1]

    def wait_version(self, name: str, version: int, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                body = self.ready(name)
                if body.get("version", -1) >= version:
                    return body
            except (httpx.TransportError, ValueError):
                pass
            assert time.monotonic() < deadline, f"{name} did not reach version {version}:\n" \
                                                f"{self.procs[name].log_tail()}"
            time.sleep(0.02)

    def client(self, **kw) -> MendClient:
        a, b, c = (self.procs[n].base for n in "ABC")
        return MendClient(kw.pop("writer", a), replicas=kw.pop("replicas", [b, c]), retries=kw.pop("retries", 8),
                          backoff_s=0.1, timeout_s=60, **kw)

    def journal(self):
        fingerprint = self.ready("B")["fingerprint"]
        return journal_problems(self.redis.client(), self.prefix, fingerprint)

    def stop(self) -> None:
        for p in self.procs.values():
            p.signal(signal.SIGCONT)
            p.stop(timeout_s=30)
        self.redis.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("replicas"))
    try:
        c.add("A", "auto").wait_ready()  # first: it takes the lock
        c.add("B", "replica")
        c.add("C", "auto")
        c.procs["B"].wait_ready()
        c.procs["C"].wait_ready()
        yield c
    finally:
        c.stop()


def _fact(i: int) -> dict:
    f = FACTS[i % len(FACTS)]
    return {"prompt": f["prompt"], "target": f["target_new"]}


def test_edits_reach_both_replicas_in_order_and_rollback_propagates(cluster):
    assert [cluster.ready(n)["role"] for n in "ABC"] == ["writer", "replica", "replica"]
    assert cluster.ready("C")["writer_url"] == cluster.procs["A"].base
    # writes on a replica: 409 with the writer's URL, never proxied
    r = httpx.post(f"{cluster.procs['B'].base}/edit", json={"requests": [_fact(0)], "method": "ft"}, timeout=30)
    assert r.status_code == 409 and r.json()["writer_url"] == cluster.procs["A"].base, r.text
    done = []
    with cluster.client() as mend:
        for i in range(4):
            done.append(mend.edit([_fact(i)], method="ft"))
            for name in "BC":  # read-your-writes on each replica, straight after the acknowledgement
                q = httpx.post(f"{cluster.procs[name].base}/query", timeout=30,
                               json={"prompts": [_fact(i)["prompt"]], "max_new_tokens": 3,
                                     "min_version": done[-1].version})
                assert q.status_code == 200 and q.json()["version"] >= done[-1].version, q.text
        answers = mend.query([_fact(3)["prompt"]], max_new_tokens=3)
        assert answers.version >= done[-1].version
        rolled = mend.rollback(done[1].edit_id)
        assert rolled.version == done[-1].version + 1
        bodies = {n: cluster.wait_version(n, rolled.version) for n in "ABC"}
    problems, state = cluster.journal()
    assert not problems, problems
    assert {b["sha256"] for b in bodies.values()} == {state["head"].sha256}
    assert {b["version"] for b in bodies.values()} == {rolled.version}
    assert {b["active_edits"] for b in bodies.values()} == {3}
    # the same weights answer the same way on every instance
    prompt = {"prompts": [_fact(3)["prompt"], _fact(1)["prompt"]], "max_new_tokens": 3}
    outs = {n: httpx.post(f"{cluster.procs[n].base}/query", json=prompt, timeout=30).json() for n in "ABC"}
    assert outs["A"] == outs["B"] == outs["C"]
    metrics = httpx.get(f"{cluster.procs['B'].base}/metrics", timeout=10).text
    assert f"mend_replica_ops_applied_total {float(rolled.version)}" in metrics
    assert "mend_replica_lag_ops 0.0" in metrics


def test_replica_frozen_or_killed_mid_follow_catches_up_without_applying_an_op_twice(cluster):
    b = cluster.procs["B"]
    with cluster.client() as mend:
        b.signal(signal.SIGSTOP)  # frozen mid-follow: it misses the next ops
        try:
            frozen = [mend.edit([_fact(i)], method="ft") for i in range(4, 7)]
        finally:
            b.signal(signal.SIGCONT)
        cluster.wait_version("B", frozen[-1].version)
        # SIGKILL while edits keep landing, restart: replay at start, then follow from that version
        stop = threading.Event()
        acked: list = []

        def load() -> None:
            with cluster.client() as writer:
                i = 7
                while not stop.is_set() and i < 13:
                    acked.append(writer.edit([_fact(i)], method="ft"))
                    i += 1

        t = threading.Thread(target=load)
        t.start()
        try:
            cluster.wait_version("B", frozen[-1].version + 1)
            b.kill()
            b.start()
            b.wait_ready()
        finally:
            stop.set()
            t.join(timeout=120)
        head = max(e.version for e in acked)
        body = cluster.wait_version("B", head)
    problems, state = cluster.journal()
    assert not problems and body["sha256"] == cluster.ready("A")["sha256"] == state["head"].sha256
    log = b.log_text()
    assert "falls back to a full replay" not in log and "already applied" not in log


def test_replicas_resume_after_redis_restarts_from_its_aof(cluster):
    start = cluster.ready("A")["version"]
    cluster.redis.kill()  # SIGKILL: the AOF (appendfsync always) holds every acknowledged op
    time.sleep(0.3)
    cluster.redis.start()
    with cluster.client() as mend:
        out = mend.edit([_fact(13)], method="ft")  # retried through the 503s until the writer is back
    assert out.version == start + 1
    bodies = {n: cluster.wait_version(n, out.version) for n in "ABC"}
    problems, state = cluster.journal()
    assert not problems, problems
    assert {b["sha256"] for b in bodies.values()} == {state["head"].sha256}
    assert sum(b["role"] == "writer" for b in bodies.values()) == 1


def test_writer_killed_under_load_auto_replica_takes_over_without_a_fork(cluster):
    writer = next(n for n in "AC" if cluster.ready(n)["role"] == "writer")
    standby = "C" if writer == "A" else "A"
    acked: list = []
    failures: list = []
    stop = threading.Event()

    def load() -> None:
        with cluster.client(writer=cluster.procs[writer].base, replicas=[cluster.procs[n].base for n in "BAC"
                                                                           if n != writer]) as mend:
            i = 20
            while not stop.is_set():
                try:
                    acked.append(mend.edit([_fact(i)], method="ft"))
                except MendError as err:
                    failures.append(err)
                i += 1

    t = threading.Thread(target=load)
    t.start()
    try:
        while len(acked) < 2:
            assert t.is_alive() and not failures, failures
            time.sleep(0.05)
        killed_at = time.monotonic()
        cluster.procs[writer].kill()
        deadline = killed_at + LOCK_TTL_MS / 1000 + TAKEOVER_BOUND_S
        while cluster.ready(standby)["role"] != "writer":
            assert time.monotonic() < deadline, cluster.procs[standby].log_tail()
            time.sleep(0.05)
        took_over_s = time.monotonic() - killed_at
        n_before = len(acked)
        while len(acked) < n_before + 2:  # the load carries on against the new writer
            assert t.is_alive() and time.monotonic() < deadline + 60, failures
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(timeout=120)
    assert not failures, failures
    assert took_over_s < LOCK_TTL_MS / 1000 + TAKEOVER_BOUND_S
    # the old writer comes back as a replica of the new one
    old = cluster.procs[writer]
    old.start()
    back = old.wait_ready()
    assert back["role"] == "replica" and back["writer_url"] == cluster.procs[standby].base
    head = max(e.version for e in acked)
    bodies = {n: cluster.wait_version(n, head) for n in "ABC"}
    problems, state = cluster.journal()
    assert not problems, problems  # versions 1..head without a gap: the stream never forked
    for e in acked:  # no acknowledged edit lost or moved
        assert state["records"][e.edit_id]["version"] == e.version
    assert {b["sha256"] for b in bodies.values()} == {state["head"].sha256}
