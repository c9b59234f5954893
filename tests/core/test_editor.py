import torch

from editor_core.batching import build_batch, mean_target_nll
from editor_core.config import MendConfig
from editor_core.editor import MendEditor
from editor_core.functional_edit import added_updates
from editor_core.requests import EditRequest
from editor_core.stack import EditStack
from editor_core.targets import resolve_targets


def _loss(model, tok, req):
    b = build_batch(tok, [req.prompt], [req.target])
    with torch.no_grad():
        return float(mean_target_nll(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b))


def test_untrained_editor_is_a_gradient_step_that_lowers_the_loss(tiny_model, tiny_tokenizer, facts):
    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-2))
    req = EditRequest(facts[0]["prompt"], facts[0]["target_new"])
    before_sha, before_loss = stack.sha256(), _loss(tiny_model, tiny_tokenizer, req)
    delta = editor.compute_delta(tiny_model, tiny_tokenizer, [req])
    assert stack.sha256() == before_sha  # pure: nothing written
    stack.apply("e", delta)
    assert _loss(tiny_model, tiny_tokenizer, req) < before_loss


def test_hooked_updates_equal_applied_weights(tiny_model, tiny_tokenizer, facts):
    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-2))
    reqs = [EditRequest(f["prompt"], f["target_new"]) for f in facts[:2]]
    delta = editor.compute_delta(tiny_model, tiny_tokenizer, reqs)
    b = build_batch(tiny_tokenizer, [facts[5]["prompt"]], [facts[5]["target_new"]])
    with torch.no_grad(), added_updates(tiny_model, delta.updates):
        hooked = tiny_model(input_ids=b.input_ids).logits
    with torch.no_grad(), stack.applied(delta):
        applied = tiny_model(input_ids=b.input_ids).logits
    torch.testing.assert_close(hooked, applied, atol=1e-5, rtol=1e-4)


def test_batched_delta_has_one_rank_per_token(tiny_llama, tiny_tokenizer, facts):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    editor = MendEditor.untrained(stack, MendConfig(rank=8))
    reqs = [EditRequest(f["prompt"], f["target_new"]) for f in facts[:3]]
    delta = editor.compute_delta(tiny_llama, tiny_tokenizer, reqs)
    n_tok = int(build_batch(tiny_tokenizer, [r.prompt for r in reqs], [r.target for r in reqs]).attention_mask.sum())
    assert {u.rank for u in delta.updates.values()} == {n_tok}


def test_subject_keyed_factors_use_only_subject_tokens(tiny_llama, tiny_tokenizer, facts):
    from editor_core.batching import build_batch as bb

    f = facts[0]
    batch = bb(tiny_tokenizer, [f["prompt"]], [f["target_new"]], subjects=[f["subject"]])
    picked = batch.input_ids[batch.key_mask]
    assert tiny_tokenizer.decode(picked).strip() == f["subject"]
    missing = bb(tiny_tokenizer, [f["prompt"]], [f["target_new"]], subjects=["Nobody Here"])
    assert torch.equal(missing.key_mask, missing.attention_mask.bool())  # falls back to all tokens

    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    editor = MendEditor.untrained(stack, MendConfig(rank=8, factor_tokens="subject"))
    delta = editor.compute_delta(tiny_llama, tiny_tokenizer, [EditRequest(f["prompt"], f["target_new"], f["subject"])])
    assert {u.rank for u in delta.updates.values()} == {int(batch.key_mask.sum())}


def test_edit_runs_the_output_layer_at_target_positions_only_and_gets_the_full_gradient(
    tiny_model, tiny_tokenizer, facts
):
    from editor_core.grads import capture_factors

    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-2))
    reqs = [EditRequest(f["prompt"], f["target_new"]) for f in facts[:3]]
    head = tiny_model.get_output_embeddings()
    rows = []
    handle = head.register_forward_hook(lambda _m, inp, _out: rows.append(inp[0].shape[0]))
    try:
        delta = editor.compute_delta(tiny_model, tiny_tokenizer, reqs)
    finally:
        handle.remove()
    batch = build_batch(tiny_tokenizer, [r.prompt for r in reqs], [r.target for r in reqs])
    assert rows == [int(batch.target_mask.sum())]  # one (N, d) call: N target tokens, not B x T
    # the same factors as a backward from the full (B, T, V) logits
    def full_logits():
        return tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    full = capture_factors(tiny_model, editor.targets, batch, run=full_logits, loss_fn=mean_target_nll)
    with torch.no_grad():
        want = editor.updates_from_factors(full)
    for name, up in want.items():
        torch.testing.assert_close(delta.updates[name].u, up.u, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(delta.updates[name].v, up.v, atol=1e-6, rtol=1e-4)
