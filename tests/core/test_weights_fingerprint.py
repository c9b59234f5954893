"""An editor and key statistics made on a model's fp32 weights fit the same model loaded in bf16 (their
bf16-rounded ``weights_fingerprint``), and are still refused by a model with other weights."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import fixture_facts, make_tiny_llama

from editor_core import checkpoint
from editor_core.config import MendConfig
from editor_core.editor import MendEditor
from editor_core.fingerprint import model_fingerprint, weights_fingerprint
from editor_core.methods.locate import LocateConfig
from editor_core.stack import EditStack
from editor_core.stats import (
    STATS_FILE,
    KeyStats,
    StatsError,
    collect_key_stats,
    stats_fingerprint,
    stats_weights_fingerprint,
)
from editor_core.targets import out_proj_targets, resolve_targets
from service.methods import LOCATE_METHODS, locate_editors
from service.settings import Settings

LAYERS = [1, 2]


@pytest.fixture
def models(tiny_tokenizer):
    """(fp32 model, the same model cast to bf16, another fp32 model of the same architecture)."""
    fp32 = make_tiny_llama(len(tiny_tokenizer))
    return fp32, copy.deepcopy(fp32).to(torch.bfloat16), make_tiny_llama(len(tiny_tokenizer), seed=1)


def test_bf16_cast_keeps_the_weights_fingerprint_not_the_exact_one(models):
    fp32, bf16, other = models
    targets = resolve_targets(fp32)
    assert model_fingerprint(bf16, targets) != model_fingerprint(fp32, targets)  # random fp32 weights
    assert weights_fingerprint(bf16, targets) == weights_fingerprint(fp32, targets)
    assert weights_fingerprint(other, targets) != weights_fingerprint(fp32, targets)
    assert weights_fingerprint(fp32, targets) != model_fingerprint(fp32, targets)
    # a model whose fp32 weights are bf16 values: the exact fingerprints agree across the cast too
    rounded = copy.deepcopy(bf16).float()
    assert model_fingerprint(rounded, targets) == model_fingerprint(rounded.to(torch.bfloat16), targets)


def _save_editor(model, directory, with_weights: bool = True):
    stack = EditStack(model, resolve_targets(model, blocks=[3]))
    editor = MendEditor.untrained(stack, MendConfig(rank=4, blocks=[3], targets=list(stack.targets)))
    with torch.no_grad():
        editor.nets.log_lr.fill_(-3.0)
    info = {"model_fingerprint": stack.fingerprint}
    if with_weights:
        info["weights_fingerprint"] = weights_fingerprint(model, list(stack.targets.values()))
    checkpoint.save(directory, editor.config, editor.nets.state_dict(), info)
    return editor


def test_editor_made_on_fp32_loads_on_bf16_and_refuses_other_weights(models, tmp_path):
    fp32, bf16, other = models
    editor = _save_editor(fp32, tmp_path / "ed")
    stack = EditStack(bf16, checkpoint.stack_targets(bf16, tmp_path / "ed"))
    assert stack.fingerprint != editor.fingerprint
    loaded = MendEditor.load(tmp_path / "ed", stack)
    assert torch.equal(loaded.nets.log_lr, editor.nets.log_lr) and loaded.fingerprint == stack.fingerprint
    for foreign in (other, copy.deepcopy(other).to(torch.bfloat16)):
        with pytest.raises(ValueError, match="was trained for model"):
            MendEditor.load(tmp_path / "ed", EditStack(foreign, checkpoint.stack_targets(foreign, tmp_path / "ed")))
    # an editor written before the field existed still needs the exact fingerprint
    _save_editor(fp32, tmp_path / "old", with_weights=False)
    with pytest.raises(ValueError, match="was trained for model"):
        MendEditor.load(tmp_path / "old", stack)
    MendEditor.load(tmp_path / "old", EditStack(fp32, list(stack.targets.values())))


def test_stats_made_on_fp32_fit_bf16_and_refuse_other_weights(models, tiny_tokenizer, tmp_path):
    fp32, bf16, other = models
    texts = [r["prompt"] for r in fixture_facts()]
    stats = collect_key_stats(fp32, tiny_tokenizer, texts, LAYERS, progress=False)
    assert stats.weights_fingerprint == stats_weights_fingerprint(bf16, LAYERS)
    path = stats.save(tmp_path / "stats" / STATS_FILE)
    again = KeyStats.load(path)
    assert (again.fingerprint, again.weights_fingerprint) == (stats.fingerprint, stats.weights_fingerprint)
    assert again.fits(fp32) and again.fits(bf16) and not again.fits(other)
    assert stats_fingerprint(bf16, LAYERS) != stats.fingerprint
    KeyStats.load(path, stats_fingerprint(bf16, LAYERS), stats_weights_fingerprint(bf16, LAYERS))
    with pytest.raises(StatsError, match="another model"):
        KeyStats.load(path, stats_fingerprint(other, LAYERS), stats_weights_fingerprint(other, LAYERS))
    with pytest.raises(StatsError, match="another model"):  # the exact fingerprint alone: as before
        KeyStats.load(path, stats_fingerprint(bf16, LAYERS))
    # statistics written before the field existed: only the exact fingerprint matches
    old = KeyStats(stats.moments, stats.tokens, stats.corpus, stats.fingerprint)
    assert old.fits(fp32) and not old.fits(bf16)

    # the service offers the locate-then-edit methods on the bf16 model, and not on the other one
    LocateConfig(rome_layers=[2], memit_layers=LAYERS, alphaedit_layers=LAYERS, null_dims=48).save(tmp_path / "stats")
    settings = Settings(model="tiny", stats_dir=str(tmp_path / "stats"))
    offered = locate_editors(EditStack(bf16, out_proj_targets(bf16, LAYERS)), settings)
    assert all(not isinstance(offered[m], str) for m in LOCATE_METHODS), offered
    refused = locate_editors(EditStack(other, out_proj_targets(other, LAYERS)), settings)
    assert all("computed for another model" in refused[m] for m in LOCATE_METHODS), refused
