"""editor_core.export on tiny llama (Linear) and gpt2 (Conv1D) models: full directories and PEFT adapters."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from editor_core.delta import EditDelta, LowRankUpdate
from editor_core.export import (
    ADAPTER_CONFIG,
    lora_factors,
    save_adapter,
    save_model_dir,
    stacked_factors,
    truncate_factors,
)
from editor_core.fingerprint import targets_sha256
from editor_core.stack import EditStack
from editor_core.targets import read_weight, resolve_targets

MAKERS = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}
PEFT_ATOL = 1e-5  # fp32 logits of W x + B (A x) against (W + B A) x on the tiny models (observed ~1e-6)


def delta_on(stack: EditStack, names: list[str], rank: int, seed: int, scale: float = 0.05) -> EditDelta:
    """A random exact low-rank edit of the named targets."""
    g = torch.Generator().manual_seed(seed)
    updates = {}
    for name in names:
        t = stack.targets[name]
        updates[name] = LowRankUpdate(scale * torch.randn(rank, t.d_out, generator=g),  # (r, d_out)
                                      torch.randn(rank, t.d_in, generator=g))  # (r, d_in)
    return EditDelta(updates, stack.fingerprint)


def edited(arch: str, vocab: int):
    """A tiny model with three edits of different ranks on different targets, the second rolled back."""
    model = MAKERS[arch](vocab)
    targets = resolve_targets(model)
    stack = EditStack(model, targets)
    names = [t.name for t in targets]
    deltas = {"e0": delta_on(stack, names[:-1], 2, 0), "e1": delta_on(stack, names[:2], 5, 1),
              "e2": delta_on(stack, names[1:4], 3, 2)}
    for i, d in deltas.items():
        stack.apply(i, d)
    stack.revert("e1")
    active = [deltas["e0"], deltas["e2"]]
    return model, stack, targets, active


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # (B, T, V)


@pytest.fixture
def ids(tiny_tokenizer) -> torch.Tensor:
    return tiny_tokenizer(["The mother tongue of Danielle Darrieux is French"], return_tensors="pt").input_ids


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_directory_reloads_bit_equal(arch, tiny_tokenizer, ids, tmp_path):
    model, stack, targets, _ = edited(arch, len(tiny_tokenizer))
    want = logits(model, ids)
    save_model_dir(model, tiny_tokenizer, tmp_path / "out")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert torch.equal(logits(loaded, ids), want)  # bit for bit
    assert targets_sha256(loaded, targets) == stack.sha256()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("Paris is").input_ids == tiny_tokenizer("Paris is").input_ids


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exact_adapter_on_the_base_gives_the_edited_logits(arch, tiny_tokenizer, ids, tmp_path):
    model, stack, targets, active = edited(arch, len(tiny_tokenizer))
    factors = lora_factors(active, targets)
    names = [t.name for t in targets]
    # rank = the sum of the active edits' ranks on each target (e0: 2 on all but the last, e2: 3 on
    # three); the last target carries no active edit and is left out
    assert {n: f.rank for n, f in factors.items()} == {n: 5 if n in names[1:4] else 2 for n in names[:-1]}
    assert all(f.rel_error == 0.0 for f in factors.values())
    save_adapter(factors, transposed=arch == "gpt2", base_model="tiny", out_dir=tmp_path / "adapter")

    base = MAKERS[arch](len(tiny_tokenizer))
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(adapted, ids), logits(model, ids), atol=PEFT_ATOL, rtol=0)
    merged = adapted.merge_and_unload()
    for t in targets:
        torch.testing.assert_close(read_weight(merged, t), read_weight(model, t), atol=1e-6, rtol=0)


def test_adapter_config_scale_is_one_for_every_target(tiny_tokenizer, tmp_path):
    model, _, targets, active = edited("llama", len(tiny_tokenizer))
    save_adapter(lora_factors(active, targets), transposed=False, base_model="tiny", out_dir=tmp_path)
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert cfg["lora_alpha"] == cfg["r"] == 5
    assert cfg["rank_pattern"] == cfg["alpha_pattern"]
    with pytest.raises(ValueError, match="empty"):
        save_adapter({}, transposed=False, base_model="tiny", out_dir=tmp_path / "empty")


def test_truncation_matches_a_dense_svd():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(12, 40, generator=g), torch.randn(12, 30, generator=g)  # (r, d_out), (r, d_in)
    dense = (u.double().t() @ v.double())  # (d_out, d_in)
    s = torch.linalg.svdvals(dense)
    for k in (1, 4, 11):
        b, a, err = truncate_factors(u, v, k)
        assert b.shape == (40, k) and a.shape == (k, 30)
        assert err == pytest.approx(float(s[k:].norm() / s.norm()), rel=1e-6)
        actual = float((dense - b.double() @ a.double()).norm() / dense.norm())
        assert actual == pytest.approx(err, rel=1e-4)
    b, a, err = truncate_factors(u, v, 12)
    assert err < 1e-12 and torch.allclose(b.double() @ a.double(), dense, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_truncated_adapter_is_within_the_reported_error(arch, tiny_tokenizer, ids, tmp_path):
    model, stack, targets, active = edited(arch, len(tiny_tokenizer))
    factors = lora_factors(active, targets, max_rank=2)
    assert all(f.rank <= 2 for f in factors.values())
    assert [f.rel_error > 0 for f in factors.values()] == [f.exact_rank > 2 for f in factors.values()]
    save_adapter(factors, transposed=arch == "gpt2", base_model="tiny", out_dir=tmp_path)

    base = MAKERS[arch](len(tiny_tokenizer))
    base_w = {t.name: read_weight(base, t).detach().clone() for t in targets}
    merged = peft.PeftModel.from_pretrained(base, tmp_path).merge_and_unload()
    for name, f in factors.items():
        u, v = stacked_factors(active, name)
        exact = u.t() @ v  # (d_out, d_in)
        got = read_weight(merged, stack.targets[name]) - base_w[name]
        err = float((exact - got).norm() / exact.norm())
        assert err == pytest.approx(f.rel_error, abs=1e-5)  # the error PEFT serves is the error reported
    # the truncated adapter still moves the logits most of the way towards the edited model's
    full_gap = (logits(model, ids) - logits(MAKERS[arch](len(tiny_tokenizer)), ids)).norm()
    assert (logits(merged, ids) - logits(model, ids)).norm() < full_gap
