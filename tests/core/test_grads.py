import torch

from editor_core.batching import build_batch, mean_target_nll
from editor_core.grads import capture_factors
from editor_core.targets import grad_out_in, resolve_targets, weight_param


def test_factors_sum_to_parameter_gradient_float64(tiny_model, tiny_tokenizer, facts):
    """sum_t delta_t x_t^T equals dL/dW for Linear (llama) and transposed Conv1D (gpt2)."""
    model = tiny_model.double()
    targets = resolve_targets(model, last_blocks=2)
    batch = build_batch(tiny_tokenizer, [f["prompt"] for f in facts[:3]], [f["target_new"] for f in facts[:3]])
    factors = capture_factors(model, targets, batch)

    params = [weight_param(model, t) for t in targets]
    for p in params:
        p.requires_grad_(True)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    grads = torch.autograd.grad(mean_target_nll(logits, batch), params)
    for t, g in zip(targets, grads, strict=True):
        expected = grad_out_in(g, t)  # (d_out, d_in)
        assert expected.abs().max() > 0
        torch.testing.assert_close(factors.gradient(t.name), expected, atol=1e-12, rtol=1e-9)


def test_capture_leaves_no_parameter_grads(tiny_llama, tiny_tokenizer, facts):
    targets = resolve_targets(tiny_llama)
    batch = build_batch(tiny_tokenizer, [facts[0]["prompt"]], [facts[0]["target_new"]])
    factors = capture_factors(tiny_llama, targets, batch)
    n_real = int(batch.attention_mask.sum())
    assert all(x.shape[0] == n_real for x in factors.x.values())
    assert all(p.grad is None for p in tiny_llama.parameters())
