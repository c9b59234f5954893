"""Bring your own model: every family of ``targets.FAMILIES``, built tiny and random from its config and
saved as a model directory, goes through what a user runs: ``mend stats --model DIR``, then the model
is loaded from DIR as ``mend serve --model DIR`` loads it, takes an AlphaEdit edit (the target becomes
the greedy answer) and rolls it back bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_families import LAYERS, TINY_CONFIGS, save_tiny_model, tiny_locate_config

from editor_core.methods.locate import LocateConfig, LocateEditor
from editor_core.models import load
from editor_core.requests import EditRequest
from editor_core.scoring import score_targets
from editor_core.stack import EditStack
from editor_core.stats import STATS_FILE, KeyStats, stats_fingerprint
from editor_core.targets import FAMILIES, family_of, out_proj_targets, read_weight
from service.cli import main


def test_every_family_has_a_tiny_config():
    assert set(TINY_CONFIGS) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stats_then_edit_and_exact_rollback(family, tiny_tokenizer, facts, tmp_path):
    model_dir, stats_dir = tmp_path / f"tiny-{family}", tmp_path / "stats"
    save_tiny_model(family, tiny_tokenizer, model_dir)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(facts))
    loaded = load(str(model_dir))  # what `mend serve --model DIR` loads
    model, tok = loaded.model, loaded.tokenizer
    assert family_of(model) is FAMILIES[family]
    d_in = out_proj_targets(model, LAYERS)[0].d_in
    stats_dir.mkdir()
    tiny_locate_config(d_in).save(stats_dir)  # `mend stats` keeps a config already in --out
    rc = main(["stats", "--model", str(model_dir), "--layers", *map(str, LAYERS), "--data", str(data),
               "--samples", "4", "--tokens", "300", "--no-progress", "--out", str(stats_dir)])
    assert rc == 0
    stats = KeyStats.load(stats_dir / STATS_FILE, stats_fingerprint(model, LAYERS))
    assert stats.layers == LAYERS and stats.tokens >= 300

    stack = EditStack(model, out_proj_targets(model, LAYERS))
    before = {n: read_weight(model, t).clone() for n, t in stack.targets.items()}
    base_sha = stack.sha256()
    editor = LocateEditor("alphaedit", stack, stats, LocateConfig.load(stats_dir))
    req = EditRequest(f"About {facts[0]['subject']}", "Toyota", facts[0]["subject"])
    assert score_targets(model, tok, [req.prompt], [req.target])[0].token_acc < 1.0
    stack.apply("e1", editor.compute_delta(model, tok, [req]))
    assert stack.sha256() != base_sha
    assert score_targets(model, tok, [req.prompt], [req.target])[0].token_acc == 1.0, family
    stack.revert("e1")
    assert stack.sha256() == base_sha
    assert all(torch.equal(read_weight(model, t), before[n]) for n, t in stack.targets.items())
