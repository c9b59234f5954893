"""Bring your own model: every family of ``targets.FAMILIES``, built tiny and random from its config and
saved as a model directory, goes through what a user runs: ``mend stats --model DIR``, then the model
is loaded from DIR as ``mend serve --model DIR`` loads it, takes an AlphaEdit edit (the target becomes
the greedy answer) and rolls it back bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from editor_core.methods.locate import LocateConfig, LocateEditor
from editor_core.methods.values import ValueConfig
from editor_core.models import load
from editor_core.requests import EditRequest
from editor_core.scoring import score_targets
from editor_core.stack import EditStack
from editor_core.stats import STATS_FILE, KeyStats, stats_fingerprint
from editor_core.targets import FAMILIES, family_of, out_proj_targets, read_weight
from service.cli import main

LAYERS = [1, 2]  # of 4 blocks
_IDS = {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}  # inside the 400-token tiny vocabulary
_GENERIC = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 128, **_IDS}

# model_type -> config kwargs of a 4-block model (vocab_size added by the test). One per FAMILIES row.
TINY_CONFIGS: dict[str, dict] = {
    "gpt2": {"n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 128, **_IDS},
    "llama": _GENERIC, "mistral": _GENERIC, "qwen2": _GENERIC, "qwen3": _GENERIC, "smollm3": _GENERIC,
    "olmo2": _GENERIC, "phi3": _GENERIC, "phi": _GENERIC, "starcoder2": _GENERIC,
    "gemma": {**_GENERIC, "head_dim": 8}, "gemma2": {**_GENERIC, "head_dim": 8},
    "gemma3_text": {**_GENERIC, "head_dim": 8},
    "gptj": {"n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 128, "rotary_dim": 4, **_IDS},
    "gpt_neo": {"hidden_size": 32, "num_layers": 4, "num_heads": 4, "max_position_embeddings": 128,
                "attention_types": [[["global", "local"], 2]], "window_size": 16, **_IDS},
    "falcon": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, **_IDS},
}


def tiny_locate_config(d_in: int) -> LocateConfig:
    """Value settings a random 4-block model can reach (a real model uses the defaults)."""
    value = ValueConfig(steps=30, lr=0.5, clamp_norm=4.0, kl_weight=0.0625, weight_decay=0.01,
                        prefixes=("", "Note: "))
    return LocateConfig(rome_layers=[2], memit_layers=LAYERS, alphaedit_layers=LAYERS, memit_lambda=1.0,
                        null_dims=d_in * 3 // 4, value=value)


def save_tiny_model(family: str, tokenizer, directory) -> None:
    """A random 4-block model of ``family`` and the tiny tokenizer, saved as a model directory."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), **TINY_CONFIGS[family])
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


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
