"""tools.rephrase_reach: the re-solve's reach from an edit's key to others, and the classes of a rephrasing's answer."""

from __future__ import annotations

import pytest
import torch

from tools.rephrase_reach import answer_class, reach


def test_reach_is_the_share_of_the_change_the_resolve_leaves_at_another_key():
    # the rank-one re-solve at key k writes dW = r (A k)^T / (1 + k^T A k): at k' it changes the output by
    # (k'^T A k) / (k^T A k) of its change at k, whatever the value r
    torch.manual_seed(0)
    m = torch.randn(6, 6, dtype=torch.float64)
    inverse = m @ m.t() + torch.eye(6, dtype=torch.float64)  # (d, d) a positive definite (lam C)^-1
    k, other, r = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    dw = torch.outer(r, inverse @ k) / (1 + k @ inverse @ k)  # (d_out, d_in)
    want = (dw @ other) @ r / ((dw @ k) @ r)
    got = reach(k[None], other[None], inverse)
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(float(want))
    assert float(reach(k[None], k[None], inverse)[0]) == pytest.approx(1.0)  # the key itself keeps all of it


@pytest.mark.parametrize(("said", "rank", "want"), [
    (" Paris, the capital", 0, "success"),
    (" the city of Paris", 3, "later"),
    (" the city of Lyon", 3, "top5"),
    (" the city of Lyon", 40, "other"),
])
def test_answer_class_reads_what_the_user_would_see(said, rank, want):
    assert answer_class(said, "Paris", rank) == want
