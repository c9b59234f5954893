"""tools.leak_budget: MEMIT's input factors solved again offline with another keep weight."""

from __future__ import annotations

import pytest
import torch

from tools.leak_budget import solved_again


@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_solved_again_is_the_direct_solve_with_the_earlier_keys_kept(keep):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    moment = x.t() @ x / 50  # (6, 6) SPD
    keys = 3 * torch.randn(4, 6, generator=g, dtype=torch.float64)  # (N, d)
    lam = 2.0
    got = solved_again(keys, moment, lam, keep)  # (N, d)
    for i, k in enumerate(keys):
        m = lam * moment + keep * keys[:i].t() @ keys[:i] + torch.outer(k, k)
        torch.testing.assert_close(got[i], torch.linalg.solve(m, k))
    if keep > 0:  # the kept keys change the later solves; without them every key is solved alone
        assert not torch.allclose(got[3], torch.linalg.solve(lam * moment + torch.outer(keys[3], keys[3]), keys[3]))
