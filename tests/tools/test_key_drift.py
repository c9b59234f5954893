"""tools.key_drift: what later edits add at a fact's key, against the fact's own update."""

from __future__ import annotations

import torch

from tools.key_drift import later_firing


def test_later_firing_counts_only_the_edits_after_each_fact():
    us = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])  # (N=3, d_out)
    vs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # (N, d_in)
    k_now = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # keys of facts 0 and 1
    out = later_firing(k_now, us, vs, first=0)
    # fact 0: own (1*2)*[1,0] -> 2; later: edit 1 gives 2*[0,1], edit 2 gives 0 -> 2; ratio 1
    # fact 1: own (1*1)*[0,1] -> 1; later: edit 2 gives 1*[0,3] -> 3; ratio 3
    torch.testing.assert_close(out, torch.tensor([1.0, 3.0]))
    # the last fact has no later edits
    assert float(later_firing(k_now[:1], us, vs, first=2)[0]) == 0.0
