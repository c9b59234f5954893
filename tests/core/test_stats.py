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


def test_stored_as_the_upper_triangle_and_read_back_symmetric(tmp_path):
    keys = torch.randn(100, 6)
    moment = keys.t() @ keys / 100  # (6, 6) symmetric
    path = KeyStats({2: moment}, 100, "test", "fp").save(tmp_path / "keystats.safetensors", dtype=torch.float32)
    from safetensors.torch import load_file

    assert load_file(str(path))["U.2"].shape == (21,)  # 6 * 7 / 2: half the matrix is stored
    back = KeyStats.load(path).moments[2]
    assert torch.equal(back, back.t()) and torch.allclose(back, moment, atol=1e-6)


def test_files_with_the_full_matrix_still_load(tmp_path):
    from safetensors.torch import save_file

    moment = torch.eye(4) * 2.0
    save_file({"C.5": moment.half()}, str(tmp_path / "old.safetensors"), metadata={"tokens": "10", "corpus": "old",
                                                                                   "fingerprint": "fp"})
    assert torch.equal(KeyStats.load(tmp_path / "old.safetensors").moments[5], moment)
