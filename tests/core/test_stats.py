"""KeyStats storage: fp16 where it fits, fp32 where a layer's moment would overflow it."""

from __future__ import annotations

import torch

from editor_core.stats import KeyStats


def test_a_moment_beyond_fp16_is_stored_exactly_enough_to_stay_finite(tmp_path):
    # a key with one "massive activation" coordinate of 400: its square, 160,000, overflows fp16
    keys = torch.randn(64, 8)
    keys[:, 3] *= 400.0
    big = keys.t() @ keys / keys.shape[0]  # (8, 8)
    small = torch.eye(8) * 0.5
    path = KeyStats({4: small, 11: big}, 64, "test", "fp").save(tmp_path / "keystats.safetensors")
    back = KeyStats.load(path)
    assert torch.isfinite(back.moments[11]).all()
    assert torch.allclose(back.moments[11], big, rtol=1e-6)
    assert torch.equal(back.moments[4], small.half().float())  # the ordinary layer stays fp16
