"""tools.key_coverage: the keys it reads are the ones the key statistics are made of, at every position."""

from __future__ import annotations

import torch

from editor_core.stats import collect_key_stats
from tools.key_coverage import position_keys


def test_position_keys_are_what_the_statistics_average(tiny_llama, tiny_tokenizer):
    texts = ["Paris is the capital of", "The Eiffel Tower is in Paris", "Toyota is headquartered in"]
    names = {0: "model.layers.0.mlp.down_proj", 1: "model.layers.1.mlp.down_proj"}
    keys = position_keys(tiny_llama, tiny_tokenizer, texts, names)
    tokens = sum(len(tiny_tokenizer(t)["input_ids"]) for t in texts)
    stats = collect_key_stats(tiny_llama, tiny_tokenizer, texts, [0, 1], progress=False)
    assert stats.tokens == tokens
    for block in names:
        k = keys[block]  # (P, d_in)
        assert k.shape == (tokens, tiny_llama.config.intermediate_size) and k.dtype == torch.float64
        torch.testing.assert_close((k.t() @ k / tokens).float(), stats.moments[block], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(keys[0], keys[1])  # each block's own inputs
