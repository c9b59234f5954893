"""tools.refit_probe: the summed update it re-solves is the facts' own rows, not an earlier refit's."""

from __future__ import annotations

import torch

from editor_core.delta import EditDelta, LowRankUpdate
from tools.refit_probe import summed_updates


def test_summed_updates_take_only_each_deltas_fact_rows():
    name = "t"
    plain = EditDelta({name: LowRankUpdate(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]]))}, "fp",
                      {}, keys={name: torch.tensor([[0.0, 1.0, 0.0]])})
    refitting = EditDelta({name: LowRankUpdate(torch.tensor([[0.0, 1.0], [5.0, 5.0]]),
                                               torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))}, "fp",
                          {"fact_rows": "1"}, keys={name: torch.tensor([[1.0, 0.0, 0.0]])})
    a, k = summed_updates([plain, refitting], name)
    want = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)  # the refit's row left out
    torch.testing.assert_close(a, want)
    assert k.shape == (2, 3)
