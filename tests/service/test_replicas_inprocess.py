"""Roles inside one process (two apps on one real redis-server): a replica follows the writer op by op,
refuses writes with the writer's URL, honours min_version, reports its lag; an auto instance fails
over. The real-process versions (SIGKILL, Redis restart) are in test_replicas.py."""

from __future__ import annotations

import time

import pytest
from mend_harness import edit, engine_of, fixture_facts, make_settings, query, serving

from service.redis_conn import RedisUrlError, describe, parse_sentinel_url

pytestmark = pytest.mark.integration


def _wait_version(client, version: int, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get("/health/ready").json()
        if body.get("version") == version:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.02)


def test_replica_follows_refuses_writes_and_waits_for_min_version(tiny_tokenizer):
    facts = fixture_facts()
    writer_settings = make_settings(role="writer", advertise_url="http://writer.example:8000")
    replica_settings = writer_settings.model_copy(update={"role": "replica", "min_version_wait_s": 0.3})
    with serving(writer_settings, tiny_tokenizer) as w, serving(replica_settings, tiny_tokenizer) as r:
        ready = r.get("/health/ready").json()
        assert ready["role"] == "replica" and ready["configured_role"] == "replica"
        assert ready["writer_url"] == "http://writer.example:8000" and ready["lag_ops"] == 0
        assert w.get("/health/ready").json()["role"] == "writer"
        # a write on the replica: 409 naming the writer, nothing applied
        body = {"requests": [{"prompt": facts[0]["prompt"], "target": facts[0]["target_new"]}], "method": "ft"}
        refused = r.post("/edit", json=body)
        assert refused.status_code == 409, refused.text
        assert refused.json()["code"] == "not_writer"
        assert refused.json()["writer_url"] == "http://writer.example:8000"
        assert r.post("/rollback", json={"edit_id": "x"}).json()["code"] == "not_writer"
        first = edit(w, facts[0]["prompt"], facts[0]["target_new"])
        second = edit(w, facts[1]["prompt"], facts[1]["target_new"])
        # read-your-writes: the query waits for version 2, never answers from 0 or 1
        got = r.post("/query", json={"prompts": [facts[1]["prompt"]], "min_version": second["version"]})
        assert got.status_code == 200 and got.json()["version"] >= 2
        assert _wait_version(r, 2)["sha256"] == w.get("/health/ready").json()["sha256"]
        rolled = w.post("/rollback", json={"edit_id": first["edit_id"]}).json()
        _wait_version(r, rolled["version"])
        assert engine_of(r).stack.active_ids == [second["edit_id"]]
        assert engine_of(r).stack.sha256() == engine_of(w).stack.sha256()
        assert query(r, [facts[1]["prompt"]]) == query(w, [facts[1]["prompt"]])
        # a version nobody has: bounded wait, then 503 with Retry-After and the version served
        late = r.post("/query", json={"prompts": ["hi"], "min_version": 99})
        assert late.status_code == 503 and late.headers["Retry-After"] == "1"
        assert late.json()["code"] == "version_not_reached" and late.json()["version"] == 3
        bad = r.post("/query", json={"prompts": ["hi"], "min_version": -1})
        assert bad.status_code == 422 and "min_version" in bad.text
        metrics = r.get("/metrics").text
        assert "mend_replica_lag_ops 0.0" in metrics and "mend_journal_head_version 3.0" in metrics
        assert "mend_replica_ops_applied_total 3.0" in metrics and "mend_writer 0.0" in metrics
        assert "mend_writer 1.0" in w.get("/metrics").text


def test_auto_replica_takes_over_when_the_writer_lock_is_released(tiny_tokenizer):
    facts = fixture_facts()
    settings = make_settings(role="auto", lock_ttl_ms=1000)
    with serving(settings, tiny_tokenizer) as a:
        with serving(settings.model_copy(update={"advertise_url": "http://b:1"}), tiny_tokenizer) as b:
            assert a.get("/health/ready").json()["role"] == "writer"
            assert b.get("/health/ready").json()["role"] == "replica"
            done = edit(a, facts[0]["prompt"], facts[0]["target_new"])
            runtime = a.app.state.runtime
            runtime.lock.release()  # the writer goes away (its lock is free); b takes over
            deadline = time.monotonic() + 15
            while b.get("/health/ready").json()["role"] != "writer":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert b.get("/health/ready").json()["version"] == done["version"]
            after = edit(b, facts[1]["prompt"], facts[1]["target_new"])
            assert after["version"] == done["version"] + 1
            # a sees another holder: it steps down and follows b instead of serving a fork
            deadline = time.monotonic() + 15
            while a.get("/health/ready").json().get("version") != after["version"]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            body = a.get("/health/ready").json()
            assert body["role"] == "replica" and body["writer_url"] == "http://b:1"
            assert a.post("/edit", json={"requests": [{"prompt": "x", "target": "y"}], "method": "ft"}).status_code == 409


def test_sentinel_urls_are_parsed_with_every_part():
    spec = parse_sentinel_url("rediss+sentinel://u:p%40ss@s1:26379,s2:26380/mymaster/2?sentinel_password=sp"
                              "&ssl_cert_reqs=required")
    assert spec.hosts == [("s1", 26379), ("s2", 26380)] and spec.service == "mymaster" and spec.db == 2
    assert (spec.username, spec.password, spec.tls, spec.sentinel_password) == ("u", "p@ss", True, "sp")
    assert spec.options == {"ssl_cert_reqs": "required"}
    assert parse_sentinel_url("redis://localhost:6379/0") is None
    assert "p@ss" not in describe("redis+sentinel://u:p%40ss@s1:26379/m")
    assert describe("rediss://:secret@h:6380/0") == "rediss://h:6380/0"
    for bad in ("redis+sentinel://s1:26379", "redis+sentinel://s1/m", "redis+sentinel://s1:1/m/x"):
        with pytest.raises(RedisUrlError):
            parse_sentinel_url(bad)
