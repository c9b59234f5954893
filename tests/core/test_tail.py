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


def test_split_tail_gives_the_full_tails_logits_and_gradients(tiny_model, tiny_tokenizer, facts):
    """Rows cut at different positions (0 included) give the full tail's logits at every selected position
    from the cut on, and the same gradient with respect to the state at the cut."""
    from editor_core.batching import target_positions
    from editor_core.tail import SplitTail

    batch = build_batch(tiny_tokenizer, [f["prompt"] for f in facts[:4]], [f["target_new"] for f in facts[:4]])
    first = 2
    states = prefix_states(tiny_model, batch.input_ids, batch.attention_mask, first)  # (B, T, d)
    sel = target_positions(batch)  # (B, T)
    first_sel = sel.float().argmax(-1)  # (B,) first selected position of each row
    cut = torch.stack([torch.tensor(0), first_sel[1] // 2, first_sel[2], first_sel[3]])  # (B,) 0 and others
    rows = torch.arange(len(cut))
    bump = torch.randn(len(cut), states.shape[-1], generator=torch.Generator().manual_seed(0))  # (B, d)

    def full(b):
        s = states.clone()
        s[rows, cut] = s[rows, cut] + b
        return tail_logits(tiny_model, first, s, batch.attention_mask, sel)

    def short(b):
        s = split.short(states).clone()
        s[:, 0] = s[:, 0] + b
        return split.logits(s, split.short_select(sel))

    split = SplitTail(tiny_model, first, states, batch.attention_mask, cut)
    assert split.real.sum() < batch.attention_mask.sum()  # it runs fewer positions than the rows hold
    b_full, b_short = bump.clone().requires_grad_(True), bump.clone().requires_grad_(True)
    want, got = full(b_full), short(b_short)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    (g_full,) = torch.autograd.grad(want.logsumexp(-1).sum(), [b_full])
    (g_short,) = torch.autograd.grad(got.logsumexp(-1).sum(), [b_short])
    torch.testing.assert_close(g_short, g_full, atol=1e-5, rtol=1e-4)


def test_split_tail_refuses_a_selected_position_before_the_cut(tiny_llama, tiny_tokenizer, facts):
    import pytest

    from editor_core.batching import target_positions
    from editor_core.tail import SplitTail

    batch = build_batch(tiny_tokenizer, [f["prompt"] for f in facts[:2]], [f["target_new"] for f in facts[:2]])
    states = prefix_states(tiny_llama, batch.input_ids, batch.attention_mask, 2)
    sel = target_positions(batch)
    split = SplitTail(tiny_llama, 2, states, batch.attention_mask, batch.attention_mask.sum(-1) - 1)
    with pytest.raises(ValueError, match="before its row's cut"):
        split.short_select(sel)


def test_split_tail_short_batch_and_a_subset_of_rows_keep_the_full_tail_s_targets(tiny_llama, tiny_tokenizer, facts):
    """The short batch reads the same target labels and factor tokens, in the same order, as the full one; the
    logits of a subset of rows are those rows' logits of the whole split."""
    from editor_core.batching import target_labels, target_positions, without_last_input
    from editor_core.tail import SplitTail

    prompts = [f["prompt"] for f in facts[:4]]
    subjects = [f["subject"] for f in facts[:4]]
    batch = build_batch(tiny_tokenizer, prompts, [f["target_new"] for f in facts[:4]], subjects=subjects)
    batch = without_last_input(batch) or batch
    states = prefix_states(tiny_llama, batch.input_ids, batch.attention_mask, 2)  # (B, T, d)
    cut = batch.key_mask.float().argmax(-1)  # (B,) each row's first subject token
    split = SplitTail(tiny_llama, 2, states, batch.attention_mask, cut)
    short = split.short_batch(batch)
    assert short.attention_mask.sum() < batch.attention_mask.sum()  # the cached tokens are not run
    torch.testing.assert_close(target_labels(short), target_labels(batch))
    assert torch.equal(target_positions(short), split.short_select(target_positions(batch)))
    assert torch.equal(states[batch.key_mask], split.short(states)[short.key_mask])  # the same factor tokens
    sel = target_positions(short)
    whole = split.logits(split.short(states), sel)  # (N, V)
    rows = torch.tensor([1, 3])
    part = split.logits(split.short(states)[rows], sel[rows], rows)
    torch.testing.assert_close(part, whole[torch.isin(torch.arange(4)[:, None].expand_as(sel)[sel], rows)])
