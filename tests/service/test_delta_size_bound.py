"""MEND_MAX_DELTA_BYTES: /edit refuses a delta whose journal entry would be larger (422, nothing applied)."""

from __future__ import annotations

from mend_harness import edit, engine_of, fixture_facts, make_settings, serving

from service.settings import Settings


def test_default_bound_and_env(monkeypatch):
    assert Settings().max_delta_bytes == 8_000_000
    monkeypatch.setenv("MEND_MAX_DELTA_BYTES", "1234")
    assert Settings().max_delta_bytes == 1234
    monkeypatch.setenv("MEND_MAX_DELTA_BYTES", "")
    assert Settings().max_delta_bytes is None


def test_edit_over_the_bound_is_refused_and_nothing_is_applied(tiny_tokenizer):
    f = fixture_facts()[0]
    body = {"requests": [{"prompt": f["prompt"], "target": f["target_new"]}], "method": "ft"}
    with serving(make_settings(max_delta_bytes=2000, canary_guard=False), tiny_tokenizer) as client:
        engine = engine_of(client)
        sha = engine.stack.sha256()
        r = client.post("/edit", json=body)
        assert r.status_code == 422, r.text
        out = r.json()
        assert "max_delta_bytes=2,000" in out["detail"] and "MEND_MAX_DELTA_BYTES" in out["detail"]
        assert out["delta_bytes"] > 2000 and out["max_delta_bytes"] == 2000
        assert engine.version == 0 and engine.stack.sha256() == sha and engine.stack.active_ids == []
        assert client.get("/edits").json()["total"] == 0
        engine.max_delta_bytes = 10_000_000  # the same edit fits under a larger bound
        assert edit(client, f["prompt"], f["target_new"])["version"] == 1
