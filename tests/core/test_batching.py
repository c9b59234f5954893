"""Length groups: every row once, and the grouping does no more padded work than one batch; the per-request loss."""

from __future__ import annotations

import random

import torch

from editor_core.batching import length_groups


def _cost(lengths: list[int], groups: list[list[int]], overhead: int) -> int:
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


def test_groups_cover_every_row_once_and_split_where_padding_costs_more_than_a_forward():
    lengths = [3, 12, 3, 12, 3, 12, 3, 12]
    groups = length_groups(lengths, overhead=4)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert [sorted(lengths[i] for i in g) for g in groups] == [[3] * 4, [12] * 4]
    assert length_groups(lengths, overhead=100) == [sorted(range(8), key=lambda i: lengths[i])]  # one forward


def test_grouping_is_optimal_among_contiguous_cuts_on_random_lengths():
    rng = random.Random(0)
    for _ in range(20):
        lengths = [rng.randint(2, 20) for _ in range(rng.randint(1, 9))]
        groups = length_groups(lengths, overhead=6)
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        best = min(  # every way of cutting the sorted rows into contiguous groups
            _cost(lengths, [order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)), strict=True)], 6)
            for mask in range(2 ** (len(order) - 1))
            for cuts in [tuple(i + 1 for i in range(len(order) - 1) if mask >> i & 1)]
        )
        assert _cost(lengths, groups, 6) == best <= _cost(lengths, [order], 6)


def test_per_request_nll_weights_each_request_s_term(tiny_tokenizer, facts):
    from editor_core.batching import build_batch, label_requests, per_request_target_nll, target_labels

    batch = build_batch(tiny_tokenizer, [f["prompt"] for f in facts[:3]], [f["target_new"] for f in facts[:3]])
    request_of_row = torch.tensor([0, 1, 1])  # the second request has two rows
    labels = target_labels(batch)  # (N,)
    logits = torch.randn(labels.shape[0], len(tiny_tokenizer), generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    req = label_requests(batch, request_of_row)
    assert req.tolist() == [r for r, row in zip([0, 1, 1], batch.target_mask.sum(1).tolist(), strict=True) for _ in range(row)]
    plain = per_request_target_nll(request_of_row)(logits, batch)
    nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(plain, nll[req == 0].mean() + nll[req == 1].mean())  # each request's mean, summed
    assert torch.equal(per_request_target_nll(request_of_row, torch.ones(2))(logits, batch), plain)
    # weight 0: the request gives no gradient at all
    (grad,) = torch.autograd.grad(per_request_target_nll(request_of_row, torch.tensor([1.0, 0.0]))(logits, batch), logits)
    assert grad[req == 1].abs().max() == 0 and grad[req == 0].abs().max() > 0


def test_without_last_input_keeps_the_target_positions_and_labels(tiny_tokenizer):
    from editor_core.batching import build_batch, target_labels, target_positions, without_last_input

    batch = build_batch(tiny_tokenizer, ["Paris is the capital of", "Rome is in"], ["France", "Italy now"],
                        subjects=["Paris", "Rome"])
    short = without_last_input(batch)
    assert short.input_ids.shape[1] == batch.input_ids.shape[1] - 1
    assert torch.equal(target_positions(short), target_positions(batch)[:, :-1])
    assert not target_positions(batch)[:, -1].any()  # what the shorter batch leaves out predicts nothing
    assert torch.equal(target_labels(short), target_labels(batch))
    # a row whose factor tokens fall back to every token (subject not found) reads the last column
    assert without_last_input(build_batch(tiny_tokenizer, ["Paris is"], ["France"], subjects=["Berlin"])) is None
    assert without_last_input(build_batch(tiny_tokenizer, ["Paris is"], ["France"])) is None


def test_greedy_rows_need_every_target_token_to_be_the_argmax(tiny_tokenizer):
    from editor_core.batching import build_batch, greedy_rows

    batch = build_batch(tiny_tokenizer, ["Paris is in", "Rome is in"], [" France now", " Italy"])
    logits = torch.zeros(*batch.input_ids.shape, len(tiny_tokenizer))  # (B, T, V)
    nxt = batch.labels[:, 1:].clamp(min=0)  # (B, T-1)
    logits[:, :-1].scatter_(-1, nxt.unsqueeze(-1), 1.0)  # every next token is the argmax
    assert greedy_rows(logits, batch).tolist() == [True, True]
    first_target = batch.target_mask[0].nonzero()[0, 0]  # row 0's first target position
    logits[0, first_target, nxt[0, first_target]] = -1.0  # one target token is no longer greedy
    assert greedy_rows(logits, batch).tolist() == [False, True]
    prompt_pos = (~batch.target_mask[1]).nonzero()[0, 0]  # a prompt position of row 1: not read
    logits[1, prompt_pos] = 0.0
    logits[1, prompt_pos, 0] = 5.0
    assert greedy_rows(logits, batch).tolist() == [False, True]
