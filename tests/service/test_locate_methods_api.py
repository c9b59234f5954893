"""The locate-then-edit methods over HTTP on a tiny llama with key statistics in MEND_STATS_DIR:
offered and chosen as the default, an edit takes, a missing subject is a 422, rollback and a restart
(replay from the journal) give the recorded sha256."""

from __future__ import annotations

import pytest
from mend_harness import engine_of, fixture_facts, make_settings, make_tiny_llama, serving

from editor_core.methods.locate import LocateConfig
from editor_core.methods.values import ValueConfig
from editor_core.stats import STATS_FILE, collect_key_stats
from service.runtime import default_editors


@pytest.fixture
def stats_dir(tmp_path, tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))  # the harness loader builds this same model
    texts = [f"{r['prompt']} {r['ground_truth']}" for r in fixture_facts()]
    collect_key_stats(model, tiny_tokenizer, texts, [1, 2], progress=False).save(tmp_path / STATS_FILE)
    LocateConfig(rome_layers=[2], memit_layers=[1, 2], alphaedit_layers=[1, 2], null_dims=48, memit_lambda=1.0,
                 value=ValueConfig(steps=30, clamp_norm=4.0, weight_decay=0.01, prefixes=("", "Note: "))
                 ).save(tmp_path)
    return tmp_path


def test_default_method_edits_rolls_back_and_replays(tiny_tokenizer, stats_dir):
    subject = fixture_facts()[0]["subject"]
    req = {"prompt": f"About {subject}", "target": "Toyota", "subject": subject}
    settings = make_settings(stats_dir=stats_dir)
    with serving(settings, tiny_tokenizer, editors=default_editors) as c:
        ready = c.get("/health/ready").json()
        assert {"alphaedit", "memit", "rome"} <= set(ready["methods"]) and ready["default_method"] == "memit"
        base = engine_of(c).stack.sha256()
        r = c.post("/edit", json={"requests": [{"prompt": req["prompt"], "target": "Toyota"}]})
        assert r.status_code == 422 and "needs the subject" in r.json()["detail"]
        out = c.post("/edit", json={"requests": [req]}).json()
        assert out["method"] == "memit" and out["results"][0]["success"], out
        rec = c.get(f"/edits/{out['edit_id']}").json()
        assert set(rec["rank"].values()) == {1} and len(rec["rank"]) == 2  # rank one at layers 1 and 2
        edited = engine_of(c).stack.sha256()
        assert rec["sha256"] == edited != base
    with serving(settings, tiny_tokenizer, editors=default_editors) as c:  # restart: replay
        assert engine_of(c).stack.sha256() == edited
        c.post("/rollback", json={"edit_id": out["edit_id"]})
        assert engine_of(c).stack.sha256() == base
