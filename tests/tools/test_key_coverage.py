"""tools.key_coverage: the keys it reads are the output projection's inputs at every position."""

from __future__ import annotations

import torch

from tools.key_coverage import position_keys


def test_position_keys_are_the_down_proj_inputs_of_every_token(tiny_llama, tiny_tokenizer):
    texts = ["Paris is the capital of", "The Eiffel Tower is in Paris"]
    names = {0: "model.layers.0.mlp.down_proj", 1: "model.layers.1.mlp.down_proj"}
    keys = position_keys(tiny_llama, tiny_tokenizer, texts, names)
    lengths = [len(tiny_tokenizer(t)["input_ids"]) for t in texts]
    for block in names:
        assert keys[block].shape == (sum(lengths), tiny_llama.config.intermediate_size)
        assert keys[block].dtype == torch.float64
    # the last text's keys at block 1, recomputed from the MLP's own halves
    with torch.no_grad():
        out = tiny_llama(**tiny_tokenizer(texts[1], return_tensors="pt"), output_hidden_states=True)
        mlp = tiny_llama.model.layers[1].mlp
        h = out.hidden_states[1]  # (1, T, d): what enters block 1
        attn = tiny_llama.model.layers[1]
        x = h + attn.self_attn(attn.input_layernorm(h), position_embeddings=tiny_llama.model.rotary_emb(
            h, torch.arange(h.shape[1]).unsqueeze(0)), attention_mask=None)[0]
        want = mlp.act_fn(mlp.gate_proj(attn.post_attention_layernorm(x))) * mlp.up_proj(attn.post_attention_layernorm(x))
    assert not torch.equal(keys[0][-lengths[1]:], keys[1][-lengths[1]:])
    torch.testing.assert_close(keys[1][-lengths[1]:].float(), want[0], atol=1e-4, rtol=1e-4)
