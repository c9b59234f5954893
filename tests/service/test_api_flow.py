"""The HTTP contract end to end on a tiny model, against a real redis-server."""

from __future__ import annotations

import threading
import time

import pytest
from mend_harness import edit, engine_of, fixture_facts, make_settings, query, serving, tiny_loader

from service.runtime import default_editors

FACTS = fixture_facts()


@pytest.fixture
def client(tiny_tokenizer):
    with serving(make_settings(), tiny_tokenizer) as c:
        yield c


def test_edit_query_rollback_query(client):
    fact = FACTS[7]  # The capital of Norway is -> Bergen
    prompt, target = fact["prompt"], fact["target_new"]
    before = query(client, [prompt], candidates=[target])
    assert before["version"] == 0
    assert not before["results"][0]["completion"].startswith(" " + target)

    out = edit(client, prompt, target)
    assert out["version"] == 1 and out["method"] == "ft" and not out["idempotent_replay"]
    res = out["results"][0]
    assert res["success"] is True and res["p_target_after"] > res["p_target_before"]

    during = query(client, [prompt], candidates=[target])
    assert during["version"] == 1
    assert during["results"][0]["completion"].startswith(" " + target)
    assert during["results"][0]["candidates"][target] > before["results"][0]["candidates"][target] + 0.1

    rb = client.post("/rollback", json={"edit_id": out["edit_id"]})
    assert rb.status_code == 200, rb.text
    assert rb.json() == {"edit_id": out["edit_id"], "version": 2, "status": "rolled_back", "dependents": []}

    after = query(client, [prompt], candidates=[target])
    assert after["version"] == 2
    assert after["results"][0]["completion"] == before["results"][0]["completion"]
    assert after["results"][0]["candidates"] == before["results"][0]["candidates"]

    again = client.post("/rollback", json={"edit_id": out["edit_id"]})
    assert again.status_code == 409 and again.json()["code"] == "already_rolled_back"
    unknown = client.post("/rollback", json={"edit_id": "nope"})
    assert unknown.status_code == 404 and unknown.json()["code"] == "edit_not_found"


def test_journal_listing_and_dependents(client):
    a = edit(client, FACTS[0]["prompt"], FACTS[0]["target_new"])
    b = edit(client, FACTS[1]["prompt"], FACTS[1]["target_new"])
    c = edit(client, FACTS[2]["prompt"], FACTS[2]["target_new"])
    rb = client.post("/rollback", json={"edit_id": a["edit_id"]}).json()
    assert rb["dependents"] == [b["edit_id"], c["edit_id"]]
    assert "git revert" in rb["note"] and b["edit_id"] in rb["note"]
    assert engine_of(client).stack.active_ids == [b["edit_id"], c["edit_id"]]

    page = client.get("/edits", params={"limit": 2}).json()
    assert page["version"] == 4 and page["total"] == 3
    assert [e["edit_id"] for e in page["edits"]] == [c["edit_id"], b["edit_id"]]
    page2 = client.get("/edits", params={"limit": 2, "offset": 2}).json()
    assert [e["edit_id"] for e in page2["edits"]] == [a["edit_id"]]
    asc = client.get("/edits", params={"order": "asc"}).json()
    assert [e["edit_id"] for e in asc["edits"]] == [a["edit_id"], b["edit_id"], c["edit_id"]]

    rec = client.get(f"/edits/{a['edit_id']}").json()
    assert rec["status"] == "rolled_back" and rec["author"] == "anonymous" and rec["version"] == 1
    assert rec["rolled_back"]["version"] == 4 and rec["rolled_back"]["by"] == "anonymous"
    assert rec["rolled_back"]["at"].endswith("Z") and rec["created_at"].endswith("Z")
    assert rec["requests"][0]["prompt"] == FACTS[0]["prompt"] and rec["results"][0]["success"] is True
    assert len(rec["sha256"]) == 64 and rec["delta_bytes"] > 0
    assert client.get(f"/edits/{b['edit_id']}").json()["status"] == "active"
    assert client.get("/edits/unknown").status_code == 404


def test_idempotency_key_returns_first_result_and_applies_nothing(client):
    fact = FACTS[3]
    first = edit(client, fact["prompt"], fact["target_new"], idempotency_key="k-1")
    sha = engine_of(client).stack.sha256()
    second = edit(client, fact["prompt"], fact["target_new"], idempotency_key="k-1")
    assert second["idempotent_replay"] is True
    assert {k: v for k, v in second.items() if k != "idempotent_replay"} == \
           {k: v for k, v in first.items() if k != "idempotent_replay"}
    assert engine_of(client).stack.sha256() == sha and engine_of(client).version == 1
    assert client.get("/edits").json()["total"] == 1
    other = client.post("/edit", json={"requests": [{"prompt": "Other", "target": "x"}], "method": "ft",
                                       "idempotency_key": "k-1"})
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
    assert client.get("/edits").json()["total"] == 1


def test_untrained_mend_edit_is_journaled_and_changes_weights(client):
    eng = engine_of(client)
    base = eng.stack.sha256()
    out = edit(client, FACTS[4]["prompt"], FACTS[4]["target_new"], method="mend")
    assert out["method"] == "mend" and out["version"] == 1
    rec = client.get(f"/edits/{out['edit_id']}").json()
    assert rec["sha256"] == eng.stack.sha256() != base
    assert set(rec["rank"]) == set(eng.stack.targets)  # factors for every target, stored low rank
    client.post("/rollback", json={"edit_id": out["edit_id"]})
    assert eng.stack.sha256() == base


def test_mend_refused_without_trained_editor_but_ft_works(tiny_tokenizer, tmp_path):
    settings = make_settings(editor_dir=tmp_path / "missing")
    with serving(settings, tiny_tokenizer, editors=default_editors) as c:
        ready = c.get("/health/ready").json()
        assert ready["methods"] == ["ft"] and "mend" in ready["unavailable_methods"]
        assert "no key statistics" in ready["unavailable_methods"]["alphaedit"]
        assert ready["default_method"] == "ft"  # MEND_DEFAULT_METHOD (memit) is not offered: falls back
        r = c.post("/edit", json={"requests": [{"prompt": "The capital of Norway is", "target": "Bergen"}],
                                  "method": "mend"})
        assert r.status_code == 409 and r.json()["code"] == "editor_unavailable"
        assert "no trained MEND editor" in r.json()["detail"] and "another method" in r.json()["detail"]
        assert c.get("/edits").json()["total"] == 0
        ok = c.post("/edit", json={"requests": [{"prompt": "The capital of Norway is", "target": "Bergen"}]})
        assert ok.status_code == 200 and ok.json()["version"] == 1 and ok.json()["method"] == "ft"


def test_not_ready_until_loaded_and_replayed(tiny_tokenizer):
    gate = threading.Event()
    inner = tiny_loader(tiny_tokenizer)

    def slow_loader(settings):
        gate.wait(30)
        return inner(settings)

    with serving(make_settings(), tiny_tokenizer, loader=slow_loader, wait=False) as c:
        assert c.get("/health/live").status_code == 200
        r = c.get("/health/ready")
        assert r.status_code == 503 and r.json()["status"] in {"connecting", "loading"}
        q = c.post("/query", json={"prompts": ["hi"]})
        assert q.status_code == 503 and q.json()["code"] == "not_ready"
        gate.set()
        deadline = time.monotonic() + 30
        while c.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.post("/query", json={"prompts": ["hi"]}).status_code == 200


def test_query_times_out_with_504(tiny_tokenizer):
    # generous margins: the query after the blocker must finish within the timeout on a loaded 2-core CI box
    with serving(make_settings(query_timeout_s=1.5), tiny_tokenizer) as c:
        worker = c.app.state.runtime.worker
        blocker = worker.submit_exclusive(lambda: time.sleep(4.0))
        r = c.post("/query", json={"prompts": ["hi"]})
        assert r.status_code == 504 and "timed out" in r.json()["detail"]
        blocker.result(timeout=10)
        assert c.post("/query", json={"prompts": ["hi"]}).status_code == 200


def test_metrics_exposes_routes_edits_version_and_batches(client):
    out = edit(client, FACTS[5]["prompt"], FACTS[5]["target_new"])
    query(client, ["a", "b"])
    client.post("/rollback", json={"edit_id": out["edit_id"]})
    text = client.get("/metrics").text
    assert 'mend_http_requests_total{method="POST",route="/edit",status="200"} 1.0' in text
    assert 'mend_http_request_duration_seconds_count{method="POST",route="/query"}' in text
    assert 'mend_edits_applied_total{method="ft"} 1.0' in text
    assert "mend_edits_rolled_back_total 1.0" in text
    assert "mend_journal_version 2.0" in text
    assert "mend_query_batch_size_count" in text and "mend_ready 1.0" in text
