import torch

from editor_core.batching import build_batch
from editor_core.tail import prefix_states, tail_logits


def test_tail_from_cached_prefix_equals_full_forward(tiny_model, tiny_tokenizer, facts):
    batch = build_batch(tiny_tokenizer, [f["prompt"] for f in facts[:4]], [f["target_new"] for f in facts[:4]])
    full = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for first in (1, 3):
        states = prefix_states(tiny_model, batch.input_ids, batch.attention_mask, first)
        tail = tail_logits(tiny_model, first, states, batch.attention_mask)
        mask = batch.attention_mask.bool()
        torch.testing.assert_close(tail[mask], full[mask], atol=1e-5, rtol=1e-4)
    # the block list is restored afterwards
    again = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(again, full)
