"""The least-squares form of a MEND update: its normal equation, its keys, and what it spares."""

from __future__ import annotations

import pytest
import torch

from editor_core.delta import LowRankUpdate
from editor_core.preserved_solve import preserved_inverse, preserved_update


def _setup(seed: int = 0, d_in: int = 24, d_out: int = 10, n: int = 3, r: int = 5):
    g = torch.Generator().manual_seed(seed)
    ordinary = torch.randn(400, d_in, generator=g)  # (T, d_in) keys of ordinary text
    moment = ordinary.t() @ ordinary / ordinary.shape[0]  # (d_in, d_in)
    update = LowRankUpdate(torch.randn(r, d_out, generator=g), torch.randn(r, d_in, generator=g))
    keys = torch.randn(n, d_in, generator=g)  # (n, d_in)
    return ordinary, moment, update, keys


def test_it_is_the_ridge_least_squares_solution():
    _, moment, update, keys = _setup()
    lam = 2.0
    solved = preserved_update(update, keys, preserved_inverse(moment, lam, ridge=0.0)).dense().double()
    k, c = keys.double(), moment.double()
    r = k @ update.dense().double().t()  # (n, d_out)
    expected = r.t() @ k @ torch.linalg.inv(lam * c + k.t() @ k)  # (d_out, d_in)
    torch.testing.assert_close(solved, expected, atol=1e-4, rtol=1e-4)


def test_keys_get_the_update_s_change_and_ordinary_keys_far_less():
    ordinary, moment, update, keys = _setup()
    solved = preserved_update(update, keys, preserved_inverse(moment, lam=1e-3))
    dense, new = update.dense(), solved.dense()  # (d_out, d_in)
    torch.testing.assert_close(keys @ new.t(), keys @ dense.t(), atol=1e-3, rtol=1e-2)
    leak_before = (ordinary @ dense.t()).pow(2).mean()
    leak_after = (ordinary @ new.t()).pow(2).mean()
    assert leak_after < 0.5 * leak_before


def test_a_larger_lambda_trades_the_keys_change_for_less_leak():
    ordinary, moment, update, keys = _setup(seed=1)
    target = keys @ update.dense().t()  # (n, d_out)
    fits, leaks = [], []
    for lam in (0.01, 1.0, 100.0):
        new = preserved_update(update, keys, preserved_inverse(moment, lam)).dense()
        fits.append(float((keys @ new.t() - target).norm()))
        leaks.append(float((ordinary @ new.t()).norm()))
    assert fits == sorted(fits) and leaks == sorted(leaks, reverse=True)


def test_factors_have_one_row_per_key_and_lambda_must_be_positive():
    _, moment, update, keys = _setup()
    solved = preserved_update(update, keys, preserved_inverse(moment, 1.0))
    assert solved.u.shape == (3, 10) and solved.v.shape == (3, 24)
    with pytest.raises(ValueError, match="lam must be > 0"):
        preserved_inverse(moment, 0.0)


def test_kept_inverse_extends_and_recomputes_to_the_direct_inverse():
    from editor_core.preserved_solve import KeptInverse

    _, moment, _, _ = _setup()
    g = torch.Generator().manual_seed(3)
    ka, kb, kc = (torch.randn(m, 24, generator=g) for m in (2, 1, 3))
    lam, keep = 2.0, 0.5
    kept = KeptInverse(preserved_inverse(moment, lam, ridge=0.0), keep)

    def direct(*keys):
        k = torch.cat(keys).double()
        return torch.linalg.inv(lam * moment.double() + keep * k.t() @ k).float()

    torch.testing.assert_close(kept.inverse([("a", ka), ("b", kb)]), direct(ka, kb), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kept.inverse([("a", ka), ("b", kb), ("c", kc)]), direct(ka, kb, kc),
                               atol=1e-5, rtol=1e-4)
    # "b" rolled back: not an extension of what it holds, so it starts again from (lam C)^-1
    torch.testing.assert_close(kept.inverse([("a", ka), ("c", kc)]), direct(ka, kc), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kept.inverse([]), torch.linalg.inv(lam * moment.double()).float(),
                               atol=1e-5, rtol=1e-4)
