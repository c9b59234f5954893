import pytest
import torch

from editor_core.delta import DeltaFormatError, EditDelta, LowRankUpdate
from editor_core.stack import EditStack, NonFiniteEditError
from editor_core.targets import read_weight, resolve_targets


def random_delta(stack: EditStack, rank: int = 3, scale: float = 0.05, seed: int = 0) -> EditDelta:
    g = torch.Generator().manual_seed(seed)
    updates = {
        name: LowRankUpdate(scale * torch.randn(rank, t.d_out, generator=g), torch.randn(rank, t.d_in, generator=g))
        for name, t in stack.targets.items()
    }
    return EditDelta(updates, stack.fingerprint)


def test_apply_changes_weights_by_exact_low_rank_delta(tiny_model):
    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    t = next(iter(stack.targets.values()))
    before = read_weight(tiny_model, t).detach().clone()
    d = random_delta(stack)
    stack.apply("a", d)
    after = read_weight(tiny_model, t).detach()
    torch.testing.assert_close(after - before, d.updates[t.name].dense(), atol=1e-5, rtol=1e-4)


def test_apply_then_revert_all_is_bit_identical(tiny_model):
    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    base = stack.sha256()
    for i in range(4):
        stack.apply(f"e{i}", random_delta(stack, seed=i))
    assert stack.sha256() != base
    for i in [2, 0, 3, 1]:
        stack.revert(f"e{i}")
    assert stack.sha256() == base


def test_revert_middle_equals_never_applying_it(tiny_model):
    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    deltas = [random_delta(stack, seed=i) for i in range(3)]
    for i, d in enumerate(deltas):
        stack.apply(f"e{i}", d)
    stack.revert("e1")
    with_revert = stack.sha256()
    stack.rebuild([("e0", deltas[0]), ("e2", deltas[2])])
    assert stack.sha256() == with_revert
    assert stack.active_ids == ["e0", "e2"]


def test_replay_in_order_reproduces_sha(tiny_tokenizer):
    from conftest import make_tiny_llama

    m1, m2 = make_tiny_llama(len(tiny_tokenizer)), make_tiny_llama(len(tiny_tokenizer))
    s1, s2 = EditStack(m1, resolve_targets(m1)), EditStack(m2, resolve_targets(m2))
    assert s1.fingerprint == s2.fingerprint
    deltas = [random_delta(s1, seed=i) for i in range(5)]
    for i, d in enumerate(deltas):
        s1.apply(f"e{i}", d)
    s2.rebuild([(f"e{i}", EditDelta.from_bytes(d.to_bytes(), s2.fingerprint)) for i, d in enumerate(deltas)])
    assert s1.sha256() == s2.sha256()


def test_non_finite_edit_is_refused_and_changes_nothing(tiny_model):
    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    base = stack.sha256()
    bad = random_delta(stack)
    name = next(iter(bad.updates))
    bad.updates[name].u[0, 0] = float("nan")
    with pytest.raises(NonFiniteEditError):
        stack.apply("bad", bad)
    assert stack.sha256() == base and stack.active_ids == []


def test_overflow_in_model_dtype_is_refused(tiny_tokenizer):
    from conftest import make_tiny_llama

    m = make_tiny_llama(len(tiny_tokenizer)).to(torch.float16)
    stack = EditStack(m, resolve_targets(m))
    base = stack.sha256()
    with pytest.raises(NonFiniteEditError):
        stack.apply("huge", random_delta(stack, scale=1e6))
    assert stack.sha256() == base


def test_foreign_delta_is_rejected(tiny_model):
    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    d = random_delta(stack)
    d.model_fingerprint = "0" * 64
    with pytest.raises(DeltaFormatError):
        stack.apply("x", d)


def test_applied_context_restores_weights(tiny_model):
    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    base = stack.sha256()
    with stack.applied(random_delta(stack)):
        assert stack.sha256() != base
    assert stack.sha256() == base


def test_chunked_sum_is_one_canonical_form_across_chunk_boundaries(tiny_model):
    """Enough deltas to fill several CHUNK_RANK chunks: apply one by one, revert from the middle and from
    the first chunk, and rebuild must agree bit for bit, and reverting everything gives the base."""
    from editor_core.stack import CHUNK_RANK

    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    base = stack.sha256()
    ranks = [CHUNK_RANK // 8 + k % 5 for k in range(20)]  # uneven, so chunks close at different counts
    assert sum(ranks) > 2 * CHUNK_RANK  # at least three chunks
    deltas = {f"e{i}": random_delta(stack, rank=r, seed=100 + i) for i, r in enumerate(ranks)}
    for i, d in deltas.items():
        stack.apply(i, d)
    stack.revert("e11")  # a middle chunk
    stack.revert("e0")  # the first chunk: every later chunk shifts
    live = stack.sha256()
    remaining = [(i, d) for i, d in deltas.items() if i not in ("e0", "e11")]
    stack.rebuild(remaining)
    assert stack.sha256() == live
    stack.apply("late", random_delta(stack, rank=CHUNK_RANK - 1, seed=7))  # overflows the open chunk: a new one opens
    after_apply = stack.sha256()
    stack.rebuild([*remaining, ("late", stack.delta_of("late"))])
    assert stack.sha256() == after_apply
    for i in list(stack.active_ids):
        stack.revert(i)
    assert stack.sha256() == base


def test_first_edited_block_is_the_lowest_block_an_active_edit_writes(tiny_model):
    stack = EditStack(tiny_model, resolve_targets(tiny_model, last_blocks=4))
    assert stack.first_edited_block() is None
    full = random_delta(stack)
    only = {n: u for n, u in full.updates.items() if stack.targets[n].block in (2, 3)}
    stack.apply("upper", EditDelta(only, stack.fingerprint))
    assert stack.first_edited_block() == 2
    low = {n: u for n, u in full.updates.items() if stack.targets[n].block == 1}
    stack.apply("lower", EditDelta(low, stack.fingerprint))
    assert stack.first_edited_block() == 1
    stack.revert("lower")
    assert stack.first_edited_block() == 2
    stack.reset()
    assert stack.first_edited_block() is None
