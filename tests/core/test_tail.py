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


def test_selected_positions_match_full_logits_and_nll(tiny_model, tiny_tokenizer, facts):
    from editor_core.batching import mean_target_nll, selected_target_nll, target_positions

    batch = build_batch(tiny_tokenizer, [f["prompt"] for f in facts[:3]], [f["target_new"] for f in facts[:3]])
    states = prefix_states(tiny_model, batch.input_ids, batch.attention_mask, 2)
    full = tail_logits(tiny_model, 2, states, batch.attention_mask)
    sel = target_positions(batch)
    picked = tail_logits(tiny_model, 2, states, batch.attention_mask, sel)
    torch.testing.assert_close(picked, full[sel], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(selected_target_nll(picked, batch), mean_target_nll(full, batch), atol=1e-5, rtol=1e-4)
