"""Restarts, crashes and the writer lock, with real redis-server processes (never mocks)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from mend_harness import edit, engine_of, fixture_facts, make_settings, query, serving  # noqa: E402

from editor_core.targets import weight_param  # noqa: E402
from service.journal import Journal  # noqa: E402
from service.redis_embedded import EmbeddedRedis, EmbeddedRedisError  # noqa: E402

pytestmark = pytest.mark.integration
FACTS = fixture_facts()


def _weights(client) -> dict[str, torch.Tensor]:
    eng = engine_of(client)
    return {n: weight_param(eng.model, t).detach().clone() for n, t in eng.stack.targets.items()}


def _history(client) -> dict:
    ids = []
    for i, method in [(0, "ft"), (1, "mend"), (2, "ft"), (7, "ft")]:
        ids.append(edit(client, FACTS[i]["prompt"], FACTS[i]["target_new"], method=method)["edit_id"])
    assert client.post("/rollback", json={"edit_id": ids[0]}).status_code == 200
    eng = engine_of(client)
    return {"version": eng.version, "sha": eng.stack.sha256(), "weights": _weights(client),
            "active": eng.stack.active_ids, "answer": query(client, [FACTS[7]["prompt"]], [FACTS[7]["target_new"]]),
            "edits": client.get("/edits").json()["edits"]}


def test_restart_replays_to_the_same_version_and_bit_identical_weights(tiny_tokenizer):
    settings = make_settings()
    with serving(settings, tiny_tokenizer) as c:
        before = _history(c)
        base_sha = c.get(f"/edits/{before['edits'][-1]['edit_id']}").json()["sha256"]
    assert before["version"] == 5 and len(before["active"]) == 3
    with serving(settings, tiny_tokenizer) as c:
        eng = engine_of(c)
        assert c.get("/health/ready").json()["version"] == 5
        assert eng.stack.sha256() == before["sha"] != base_sha
        assert eng.stack.active_ids == before["active"]
        after = _weights(c)
        assert all(torch.equal(after[n], before["weights"][n]) for n in after)
        answer = query(c, [FACTS[7]["prompt"]], [FACTS[7]["target_new"]])
        assert answer == before["answer"]
        assert c.get("/edits").json()["edits"] == before["edits"]
        # the journal keeps going from where it was
        assert edit(c, FACTS[8]["prompt"], FACTS[8]["target_new"])["version"] == 6


def test_embedded_redis_killed_and_restarted_from_aof_keeps_the_journal(tiny_tokenizer, tmp_path):
    # the crashed instance cannot release its lock: the next one waits for it to expire
    settings = make_settings(redis_url=None, data_dir=tmp_path / "var", lock_ttl_ms=1500, lock_wait_s=20)
    with serving(settings, tiny_tokenizer) as c:
        before = _history(c)
        embedded = c.app.state.runtime.embedded
        assert embedded is not None and (tmp_path / "var" / "journal.aof").exists()
        embedded.kill()  # SIGKILL, as a crash: only what was fsynced survives
        r = c.post("/edit", json={"requests": [{"prompt": "x", "target": "y"}], "method": "ft"})
        # the runtime sees its embedded redis-server gone (a waitpid): no longer ready, and says why
        assert r.status_code == 503 and r.json()["code"] == "not_ready"
        assert "journal_unavailable: embedded redis-server pid" in r.json()["detail"]
        ready = c.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "journal_unavailable"
        assert ready.json()["error"].endswith("exited with -9")
        assert engine_of(c).stack.sha256() == before["sha"]  # the failed edit left the weights alone
    # a new service on the same data dir starts redis from its AOF and replays
    with serving(settings, tiny_tokenizer) as c:
        eng = engine_of(c)
        assert eng.version == before["version"] and eng.stack.sha256() == before["sha"]
        assert all(torch.equal(w, before["weights"][n]) for n, w in _weights(c).items())
        assert c.get("/edits").json()["edits"] == before["edits"]


def test_aof_survives_sigkill_at_journal_level(tmp_path):
    with EmbeddedRedis(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        client.xadd("s", {"op": "edit", "n": "1"}, id="1-0")
        client.set("blob", b"\x00\x01" * 100)
        deadline = time.monotonic() + 5
        while not server.pidfile.exists():  # redis writes it just after it starts listening
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(EmbeddedRedisError, match="already uses"):
            EmbeddedRedis(tmp_path).start()  # a second server on the same AOF is refused
        server.kill()  # leaves a stale pidfile behind
    with EmbeddedRedis(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        assert client.xrange("s")[0][1] == {b"op": b"edit", b"n": b"1"}
        assert client.get("blob") == b"\x00\x01" * 100


def test_second_writer_waits_for_the_lock_then_fails_clearly(tiny_tokenizer):
    settings = make_settings(lock_wait_s=0.5, role="writer")  # role auto would start as a replica instead
    with serving(settings, tiny_tokenizer) as first:
        with serving(settings, tiny_tokenizer, wait=False) as second:
            deadline = time.monotonic() + 30
            while second.get("/health/ready").json()["status"] != "failed":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            body = second.get("/health/ready").json()
            assert "writer lock" in body["error"]
        assert first.get("/health/ready").status_code == 200
        assert edit(first, FACTS[0]["prompt"], FACTS[0]["target_new"])["version"] == 1


def test_lost_lock_refuses_edits_and_applies_nothing(tiny_tokenizer):
    settings = make_settings()
    with serving(settings, tiny_tokenizer) as c:
        runtime = c.app.state.runtime
        sha = engine_of(c).stack.sha256()
        runtime.client.set(runtime.journal.lock_key, "someone-else")  # another writer took over
        r = c.post("/edit", json={"requests": [{"prompt": "x", "target": "y"}], "method": "ft"})
        assert r.status_code == 503 and r.json()["code"] == "writer_unavailable"
        assert engine_of(c).stack.sha256() == sha and engine_of(c).version == 0
        assert runtime.journal.head().version == 0
        assert query(c, ["hi"])["version"] == 0  # reads keep working
        runtime.client.delete(runtime.journal.lock_key)


def test_tampered_journal_head_blocks_readiness(tiny_tokenizer):
    settings = make_settings()
    with serving(settings, tiny_tokenizer) as c:
        edit(c, FACTS[0]["prompt"], FACTS[0]["target_new"])
        journal: Journal = c.app.state.runtime.journal
        client = c.app.state.runtime.client
    import json

    head = json.loads(client.get(journal.key("head")))
    head["sha256"] = "0" * 64
    client.set(journal.key("head"), json.dumps(head))
    with serving(settings, tiny_tokenizer, wait=False) as c:
        deadline = time.monotonic() + 30
        while (r := c.get("/health/ready")).json()["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert r.status_code == 503 and "JournalMismatchError" in r.json()["error"]
