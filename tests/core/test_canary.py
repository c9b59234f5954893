"""Canary prompts and greedy continuations on a tiny model: unchanged model -> nothing changed; a
large update to the MLPs -> canaries change and lose log-prob; still_greedy agrees with decoding."""

from __future__ import annotations

import pytest
import torch

from editor_core.canary import CanarySet, load_canary_prompts
from editor_core.delta import EditDelta, LowRankUpdate
from editor_core.greedy import greedy_ids, still_greedy
from editor_core.stack import EditStack
from editor_core.targets import blocks_of, resolve_targets


def test_shipped_canaries_are_64_distinct_prompts():
    prompts = load_canary_prompts()
    assert len(prompts) == 64 and len(set(prompts)) == 64


def test_still_greedy_matches_decoding(tiny_llama, tiny_tokenizer):
    prompts = ["The mother tongue of Danielle Darrieux is", "Toyota is headquartered in"]
    ids = greedy_ids(tiny_llama, tiny_tokenizer, prompts, [3, 2])
    assert [len(i) for i in ids] == [3, 2]
    assert still_greedy(tiny_llama, tiny_tokenizer, prompts, ids) == [True, True]
    wrong = [[(ids[0][0] + 1) % len(tiny_tokenizer)] + ids[0][1:], ids[1]]
    assert still_greedy(tiny_llama, tiny_tokenizer, prompts, wrong) == [False, True]


def test_canaries_see_no_change_then_a_damaging_update(tiny_model, tiny_tokenizer):
    canaries = CanarySet(tiny_model, tiny_tokenizer, n_tokens=3)
    quiet = canaries.check(tiny_model)
    assert quiet.changed == 0 and abs(quiet.logprob_drop) < 1e-5 and quiet.n == 64
    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    torch.manual_seed(0)
    updates = {}
    for name, t in stack.targets.items():
        w = tiny_model.get_submodule(name).weight
        scale = 20 * float(w.detach().norm()) / (t.d_out * t.d_in) ** 0.5
        updates[name] = LowRankUpdate(scale * torch.randn(4, t.d_out), torch.randn(4, t.d_in))
    with stack.applied(EditDelta(updates, stack.fingerprint)):
        loud = canaries.check(tiny_model)
    assert loud.changed > 8 and loud.logprob_drop > 0.1
    assert loud.to_dict()["changed"] == loud.changed and len(loud.to_dict()["changed_prompts"]) <= 8
    assert canaries.check(tiny_model).changed == 0  # reverted: the baseline answers are back


def test_marginal_figures_judge_one_edit_against_the_state_before_it(tiny_model, tiny_tokenizer):
    """After a damaging update, a second tiny one is judged by what IT changes (nothing much), while the
    cumulative figures still show the damage; measured against the base, the damaging one shows it all."""
    canaries = CanarySet(tiny_model, tiny_tokenizer, n_tokens=3)
    base_state = canaries.measure(tiny_model)
    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    torch.manual_seed(1)
    big, small = {}, {}
    for name, t in stack.targets.items():
        w = tiny_model.get_submodule(name).weight.detach()
        scale = float(w.norm()) / (t.d_out * t.d_in) ** 0.5
        big[name] = LowRankUpdate(20 * scale * torch.randn(4, t.d_out), torch.randn(4, t.d_in))
        small[name] = LowRankUpdate(1e-4 * scale * torch.randn(1, t.d_out), torch.randn(1, t.d_in))
    with stack.applied(EditDelta(big, stack.fingerprint), "big"):
        damaged = canaries.measure(tiny_model)
        first = canaries.check(tiny_model, before=base_state, now=damaged)
        assert first.new_changed == first.changed > 8 and first.step_logprob_drop == pytest.approx(first.logprob_drop)
        with stack.applied(EditDelta(small, stack.fingerprint), "small"):
            second = canaries.check(tiny_model, before=damaged)
    assert second.changed > 8  # the drift so far is still reported ...
    assert second.new_changed == 0 and abs(second.step_logprob_drop) < 1e-3  # ... but not blamed on this edit
    assert second.to_dict()["new_changed"] == 0


def _update_at(stack: EditStack, block: int, scale: float, seed: int) -> EditDelta:
    """A random rank-2 update of every target of ``block``, ``scale`` times the weight's typical entry."""
    g = torch.Generator().manual_seed(seed)
    updates = {}
    for name, t in stack.targets.items():
        if t.block == block:
            w = stack.model.get_submodule(name).weight.detach()
            s = scale * float(w.norm()) / (t.d_out * t.d_in) ** 0.5
            updates[name] = LowRankUpdate(s * torch.randn(2, t.d_out, generator=g), torch.randn(2, t.d_in, generator=g))
    return EditDelta(updates, stack.fingerprint)


def test_measuring_from_the_first_edited_block_equals_the_whole_model(tiny_model, tiny_tokenizer):
    """With the blocks below the edits unedited, the kept states entering the first edited block give
    the same answers and log-probs as running every block, and block 0 is not run again."""
    canaries = CanarySet(tiny_model, tiny_tokenizer, n_tokens=3)
    stack = EditStack(tiny_model, resolve_targets(tiny_model, last_blocks=4))
    assert stack.first_edited_block() is None
    runs = []
    handle = blocks_of(tiny_model)[0].register_forward_pre_hook(lambda *_: runs.append(1))
    try:
        for i, scale in enumerate([30.0, 5.0]):
            stack.apply(f"e{i}", _update_at(stack, 2 + i, scale, seed=i))
            assert stack.first_edited_block() == 2
            whole = canaries.measure(tiny_model)
            runs.clear()
            tail = canaries.measure(tiny_model, stack.first_edited_block())
            assert bool((tail.same == whole.same).all())
            torch.testing.assert_close(tail.logprob, whole.logprob, atol=1e-5, rtol=1e-5)
            assert runs == ([1] * len(canaries._groups) if i == 0 else [])  # kept after the first call
        assert canaries.check(tiny_model).changed > 0  # the scale-30 update did reach the canaries
        stack.revert("e0")
        assert stack.first_edited_block() == 3
    finally:
        handle.remove()
