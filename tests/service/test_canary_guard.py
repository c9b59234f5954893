"""The canary guard over HTTP: an edit that moves the canary prompts beyond the thresholds is a 422
with the figures, and nothing is applied or journaled; within them it is applied and its journal
record carries the figures."""

from __future__ import annotations

import contextlib

from mend_harness import edit, engine_of, make_settings, serving

REQ = {"prompt": "The mother tongue of Danielle Darrieux is", "target": "English"}


def _state(client):
    eng = engine_of(client)
    return eng.version, eng.stack.sha256(), client.get("/edits").json()["total"]


def test_edit_moving_canaries_is_refused_with_figures(tiny_tokenizer):
    strict = make_settings(canary_guard=True, canary_max_changed=0.0, canary_max_logprob_drop=0.0)
    with contextlib.ExitStack() as stack:
        c = stack.enter_context(serving(strict, tiny_tokenizer))
        before = _state(c)
        r = c.post("/edit", json={"requests": [REQ], "method": "ft"})
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["code"] == "edit_rejected" and "canary" in body["detail"]
        fig = body["canary"]
        assert fig["canaries"] == 64 and fig["check_ms"] >= 0
        assert fig["new_changed"] > 0 or fig["step_logprob_drop"] > 0  # judged against the model just before it
        assert _state(c) == before  # nothing applied, nothing journaled
        assert "mend_canary_changed" in c.get("/metrics").text


def test_edit_within_thresholds_is_applied_and_records_figures(tiny_tokenizer):
    loose = make_settings(canary_guard=True, canary_max_changed=1.0, canary_max_logprob_drop=100.0)
    with contextlib.ExitStack() as stack:
        c = stack.enter_context(serving(loose, tiny_tokenizer))
        out = edit(c, REQ["prompt"], REQ["target"])
        rec = c.get(f"/edits/{out['edit_id']}").json()
        assert rec["canary"]["canaries"] == 64 and 0 <= rec["canary"]["changed_share"] <= 1
        # the first edit is judged against the unedited model: everything it changed is new
        assert rec["canary"]["new_changed"] == rec["canary"]["changed"]
