"""Scenario 2 at CI size (real redis-server SIGKILLed and restarted from its AOF under a real
`mend serve`), plus in-process checks of the two service fixes it needs: writes resume after the
writer lock expired during the outage, and a journal write cut by the outage is settled correctly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import redis
from scenarios import redis_kill

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from mend_harness import edit, engine_of, fixture_facts, make_settings, serving  # noqa: E402

from service.journal import Journal  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.reliability]
FACTS = fixture_facts()


def test_redis_sigkill_and_aof_restart_under_traffic(tmp_path):
    figures = redis_kill.run(**redis_kill.CI, workdir=tmp_path)
    assert not figures["problems"], figures["problems"]
    assert figures["outages"] == 2 and figures["acknowledged_edits"] >= 2
    assert figures["edit_503_while_down"]["n"] >= 1 and figures["queries_served_while_down"]["n"] >= 1
    assert figures["first_edit_after_redis_back"]["n"] == 2


def _body(i: int) -> dict:
    return {"requests": [{"prompt": FACTS[i]["prompt"], "target": FACTS[i]["target_new"]}], "method": "ft"}


def test_write_that_committed_but_lost_its_reply_is_applied_before_the_next(tiny_tokenizer, monkeypatch):
    with serving(make_settings(), tiny_tokenizer) as c:
        eng = engine_of(c)
        real = Journal._transact

        def commit_then_drop(self, *args, **kwargs):
            real(self, *args, **kwargs)  # Redis applied and fsynced the op ...
            raise redis.ConnectionError("connection reset")  # ... but the reply never arrived

        monkeypatch.setattr(Journal, "_transact", commit_then_drop)
        r = c.post("/edit", json=_body(0))
        monkeypatch.setattr(Journal, "_transact", real)
        assert r.status_code == 503 and r.json()["code"] == "journal_unavailable"
        journal = c.app.state.runtime.journal
        landed = journal.head()
        assert landed.version == 1 and eng.version == 0  # the journal has it, the weights not (yet)
        out = edit(c, FACTS[1]["prompt"], FACTS[1]["target_new"])  # the next write settles it first
        assert out["version"] == 2
        assert eng.stack.active_ids == [landed.edit_id, out["edit_id"]]
        assert eng.sha256 == eng.stack.sha256() == journal.head().sha256


def test_write_that_did_not_commit_is_not_applied(tiny_tokenizer, monkeypatch):
    with serving(make_settings(), tiny_tokenizer) as c:
        def drop(self, *args, **kwargs):
            raise redis.ConnectionError("connection refused")

        monkeypatch.setattr(Journal, "_transact", drop)
        assert c.post("/edit", json=_body(0)).status_code == 503
        monkeypatch.undo()
        out = edit(c, FACTS[1]["prompt"], FACTS[1]["target_new"])
        eng = engine_of(c)
        assert out["version"] == 1 and eng.stack.active_ids == [out["edit_id"]]


def test_expired_lock_is_taken_again_only_if_the_journal_did_not_move(tiny_tokenizer):
    settings = make_settings()
    with serving(settings, tiny_tokenizer) as c:
        runtime = c.app.state.runtime
        lock_key = runtime.journal.lock_key
        runtime.client.delete(lock_key)  # expired (e.g. Redis was down longer than the ttl)
        assert edit(c, FACTS[0]["prompt"], FACTS[0]["target_new"])["version"] == 1
        assert runtime.client.get(lock_key).decode() == runtime.lock.token
        # another writer took the lock, wrote version 2, and went away: our weights are stale now
        runtime.client.delete(lock_key)
        head = runtime.journal.head()
        runtime.client.set(runtime.journal.key("head"), json.dumps({"version": 2, "sha256": head.sha256}))
        r = c.post("/edit", json=_body(1))
        assert r.status_code == 503 and r.json()["code"] == "writer_unavailable"
        assert "restart this instance" in r.json()["detail"] and engine_of(c).version == 1
        runtime.client.set(lock_key, "someone-else")
        r = c.post("/edit", json=_body(1))
        assert r.status_code == 503 and "another instance holds" in r.json()["detail"]
        runtime.client.delete(lock_key)


def test_lock_heartbeat_during_a_journal_write_does_not_fail_the_edit(tiny_tokenizer):
    """Found by the full load run: the heartbeat's PEXPIRE on the lock key, landing between WATCH and
    EXEC, aborted the transaction and the edit got a spurious 503 journal_conflict."""
    with serving(make_settings(), tiny_tokenizer) as c:
        runtime = c.app.state.runtime
        other = redis.Redis.from_url(runtime.settings.redis_url)  # the heartbeat's own connection
        client = runtime.journal.client
        original = client.pipeline
        renewed: list[bool] = []

        def pipeline(*args, **kwargs):
            pipe = original(*args, **kwargs)
            multi = pipe.multi

            def multi_then_heartbeat():  # after WATCH and the checks, before EXEC: once
                multi()
                if not renewed:
                    renewed.append(bool(other.pexpire(runtime.journal.lock_key, runtime.settings.lock_ttl_ms)))

            pipe.multi = multi_then_heartbeat
            return pipe

        client.pipeline = pipeline
        try:
            out = edit(c, FACTS[0]["prompt"], FACTS[0]["target_new"])
        finally:
            client.pipeline = original
            other.close()
        assert renewed == [True] and out["version"] == 1
        assert runtime.journal.head().version == 1 and engine_of(c).stack.active_ids == [out["edit_id"]]
