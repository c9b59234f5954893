"""Bring your own model over HTTP: a model directory (tiny gptj and qwen2, random, from config) gets
`mend stats`, then the service loads it from the directory as `mend serve --model DIR` does, with no
MEND editor for it: /health/ready lists the statistics-based methods, says why MEND is not there and
which default it chose; an edit without a method uses AlphaEdit, and rollback and a restart (replay)
give the recorded weights back."""

from __future__ import annotations

import json

import pytest
from mend_harness import engine_of, fixture_facts, make_settings, serving
from tiny_families import LAYERS, save_tiny_model, tiny_locate_config

from editor_core.targets import out_proj_targets
from service.cli import main
from service.runtime import default_editors, default_loader


@pytest.mark.parametrize("family", ["gptj", "qwen2"])
def test_own_model_dir_served_with_statistics_methods(family, tiny_tokenizer, tmp_path):
    model_dir, stats_dir = tmp_path / f"my-{family}", tmp_path / "stats"
    model = save_tiny_model(family, tiny_tokenizer, model_dir)
    stats_dir.mkdir()
    tiny_locate_config(out_proj_targets(model, LAYERS)[0].d_in).save(stats_dir)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(fixture_facts()))
    assert main(["stats", "--model", str(model_dir), "--layers", "1", "2", "--data", str(data), "--samples", "4",
                 "--tokens", "3000", "--no-progress", "--out", str(stats_dir)]) == 0

    subject = fixture_facts()[0]["subject"]
    req = {"prompt": f"About {subject}", "target": "Toyota", "subject": subject}
    settings = make_settings(model=str(model_dir), stats_dir=stats_dir)
    with serving(settings, tiny_tokenizer, editors=default_editors, loader=default_loader) as c:
        ready = c.get("/health/ready").json()
        assert set(ready["methods"]) == {"alphaedit", "memit", "rome", "ft"}, ready
        assert "no trained MEND editor" in ready["unavailable_methods"]["mend"]
        assert ready["default_method"] == "memit" and ready["dtype"] == "float32" and ready["device"] == "cpu"
        base = ready["sha256"]
        out = c.post("/edit", json={"requests": [req]}).json()
        assert out["method"] == "memit" and out["results"][0]["success"], out
        edited = engine_of(c).stack.sha256()
        assert edited != base
    with serving(settings, tiny_tokenizer, editors=default_editors, loader=default_loader) as c:  # replay
        assert c.get("/health/ready").json()["sha256"] == edited
        assert c.post("/rollback", json={"edit_id": out["edit_id"]}).status_code == 200
        assert engine_of(c).stack.sha256() == base
