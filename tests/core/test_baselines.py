import pytest
import torch

from editor_core.baselines import (
    FTConfig,
    FTEditor,
    FTKLEditor,
    _prompt_batch,
    identity_factors,
    make_baseline,
    truncated_factors,
)
from editor_core.batching import kl_pre_post
from editor_core.requests import EditRequest
from editor_core.scoring import score_targets
from editor_core.stack import EditStack
from editor_core.targets import resolve_targets

FAST = FTConfig(lr=1e-2, max_steps=40)


def req(fact) -> EditRequest:
    return EditRequest(fact["prompt"], fact["target_new"], fact["subject"])


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_ft_makes_target_top1_without_touching_the_model(tiny_model, tiny_tokenizer, facts):
    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    f = facts[0]
    before = score_targets(tiny_model, tiny_tokenizer, [f["prompt"]], [f["target_new"]])[0]
    assert before.token_acc < 1.0  # otherwise the test would prove nothing
    sha, state = stack.sha256(), snapshot(tiny_model)

    delta = FTEditor(stack, FAST).compute_delta(tiny_model, tiny_tokenizer, [req(f)])

    assert stack.sha256() == sha
    for n, p in tiny_model.state_dict().items():
        assert torch.equal(p, state[n]), n
    assert all(p.grad is None for p in tiny_model.parameters())
    assert delta.meta["method"] == "ft" and delta.meta["converged"] == "true"
    assert 0 < int(delta.meta["steps"]) <= FAST.max_steps
    with stack.applied(delta):
        after = score_targets(tiny_model, tiny_tokenizer, [f["prompt"]], [f["target_new"]])[0]
    assert after.token_acc == 1.0
    assert after.mean_logprob > before.mean_logprob
    assert stack.sha256() == sha


def test_factors_exactly_reproduce_the_optimised_offsets(tiny_model, tiny_tokenizer, facts):
    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    editor = FTEditor(stack, FTConfig(lr=1e-2, max_steps=3, stop_at_top1=False, rank=None))
    res = editor.optimise(tiny_model, tiny_tokenizer, [req(facts[1])])
    delta = editor.compute_delta(tiny_model, tiny_tokenizer, [req(facts[1])])  # deterministic re-run
    assert res.steps == 3 and delta.meta["steps"] == "3"
    assert set(delta.updates) == set(stack.targets)
    for name, d in res.offsets.items():
        t = stack.targets[name]
        assert d.shape == t.shape and d.abs().max() > 0
        upd = delta.updates[name]
        assert upd.rank == min(t.d_out, t.d_in)
        assert torch.equal(upd.dense(), d), name


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (4, 4)])
def test_identity_factors_are_exact(shape):
    d = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e-3
    f = identity_factors(d)
    assert f.shape == shape and f.rank == min(shape)
    assert torch.equal(f.dense(), d)


def test_norm_constraint_bounds_every_offset(tiny_llama, tiny_tokenizer, facts):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    cfg = FTConfig(lr=1e-2, max_steps=5, norm_constraint=2e-3, stop_at_top1=False)
    res = FTEditor(stack, cfg).optimise(tiny_llama, tiny_tokenizer, [req(facts[2])])
    assert max(float(d.abs().max()) for d in res.offsets.values()) == pytest.approx(2e-3)


def test_batched_requests_all_become_top1(tiny_llama, tiny_tokenizer, facts):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    reqs = [req(f) for f in facts[:3]]
    delta = FTEditor(stack, FAST).compute_delta(tiny_llama, tiny_tokenizer, reqs)
    assert delta.meta["n_requests"] == "3" and delta.meta["converged"] == "true"
    with stack.applied(delta):
        scores = score_targets(tiny_llama, tiny_tokenizer, [r.prompt for r in reqs], [r.target for r in reqs])
    assert [s.token_acc for s in scores] == [1.0, 1.0, 1.0]


def test_ft_kl_disturbs_locality_less_than_ft_at_equal_efficacy(tiny_model, tiny_tokenizer, facts):
    """Same steps, both edits succeed; FT+KL's KL(pre||post) is lower on its own locality texts and
    on held-out locality prompts it never saw."""
    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    seen = tuple(f["locality_prompt"] for f in facts[8:])
    held_out = [f["locality_prompt"] for f in facts[3:8]]
    base = FTConfig(lr=1e-2, max_steps=15, stop_at_top1=False, kl_prompts=seen)
    ft = FTEditor(stack, base)
    ftkl = FTKLEditor(stack, FTConfig(**{**base.__dict__, "kl_weight": 10.0}))
    assert (ft.method, ftkl.method) == ("ft", "ft-kl")
    d_ft = ft.compute_delta(tiny_model, tiny_tokenizer, [req(facts[0])])
    d_kl = ftkl.compute_delta(tiny_model, tiny_tokenizer, [req(facts[0])])
    assert d_ft.meta["converged"] == d_kl.meta["converged"] == "true"

    def kl(delta, prompts):
        ids, mask = _prompt_batch(tiny_tokenizer, list(prompts), "cpu")
        with torch.no_grad():
            pre = torch.log_softmax(tiny_model(input_ids=ids, attention_mask=mask).logits, -1)
            with stack.applied(delta):
                post = tiny_model(input_ids=ids, attention_mask=mask).logits
        return float(kl_pre_post(pre, post, mask))

    assert kl(d_kl, seen) < 0.8 * kl(d_ft, seen)
    assert kl(d_kl, held_out) < kl(d_ft, held_out)


def test_already_known_fact_needs_no_step(tiny_llama, tiny_tokenizer):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    prompt = "The mother tongue of Jean Gabin is"
    ids = score_targets(tiny_llama, tiny_tokenizer, [prompt], ["French"])[0].argmax_ids
    greedy = tiny_tokenizer.decode(ids[:1]).strip()  # the model's own top-1 next token
    r = EditRequest(prompt, greedy)
    if score_targets(tiny_llama, tiny_tokenizer, [prompt], [greedy])[0].token_acc < 1.0:
        pytest.skip("tokenizer does not round-trip the greedy token")
    delta = FTEditor(stack, FAST).compute_delta(tiny_llama, tiny_tokenizer, [r])
    assert delta.meta["steps"] == "0" and delta.updates == {}


def test_truncated_factors_are_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(12, 7, generator=g)
    f = truncated_factors(d, 3)
    assert f.rank == 3 and f.u.shape == (3, 12) and f.v.shape == (3, 7)
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    assert torch.allclose(f.dense().double(), best, atol=1e-5)
    assert truncated_factors(d, 50).rank == 7  # capped at min(d_out, d_in)
    assert torch.allclose(truncated_factors(d, 50).dense(), d, atol=1e-5)


def test_low_rank_delta_is_what_was_checked_and_still_makes_the_target_top1(tiny_llama, tiny_tokenizer, facts):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    cfg = FTConfig(lr=1e-2, max_steps=40, rank=2)
    editor = FTEditor(stack, cfg)
    dense = editor.optimise(tiny_llama, tiny_tokenizer, [req(facts[2])]).offsets
    delta = editor.compute_delta(tiny_llama, tiny_tokenizer, [req(facts[2])])
    assert delta.updates and all(u.rank <= 2 for u in delta.updates.values())
    assert delta.meta["rank"] == "2" and 0 < float(delta.meta["kept_norm"]) <= 1.0
    exact = sum(d.numel() for d in dense.values()) * 4
    assert len(delta.to_bytes()) < exact / 4  # far smaller than the dense offsets
    with stack.applied(delta):
        after = score_targets(tiny_llama, tiny_tokenizer, [facts[2]["prompt"]], [facts[2]["target_new"]])[0]
    assert (after.token_acc == 1.0) == (delta.meta["converged"] == "true")
    assert delta.meta["converged"] == "true"


def test_factory_and_config_errors(tiny_llama):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    assert make_baseline("ft", stack).method == "ft"
    assert make_baseline("ft-kl", stack).method == "ft-kl"
    with pytest.raises(ValueError):
        make_baseline("rome", stack)
    with pytest.raises(ValueError):
        FTKLEditor(stack, FTConfig(kl_weight=0.0))
    with pytest.raises(ValueError):
        FTEditor(stack, FTConfig(rank=0))
    with pytest.raises(ValueError):
        FTEditor(stack).compute_delta(tiny_llama, None, [])
