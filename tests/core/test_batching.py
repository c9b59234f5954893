"""Length groups: every row once, and the grouping does no more padded work than one batch."""

from __future__ import annotations

import random

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
