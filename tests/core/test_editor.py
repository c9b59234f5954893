from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from editor_core.batching import build_batch, mean_target_nll, target_ids, token_logprobs
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
    # the same factors as a backward from the full (B, T, V) logits, each request's mean NLL summed
    def full_logits():
        return tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def per_row_nll(logits, batch):
        return (-token_logprobs(logits, batch).sum(-1) / batch.target_mask.sum(-1)).sum()

    full = capture_factors(tiny_model, editor.targets, batch, run=full_logits, loss_fn=per_row_nll)
    with torch.no_grad():
        want = editor.updates_from_factors(full)
    for name, up in want.items():
        torch.testing.assert_close(delta.updates[name].u, up.u, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(delta.updates[name].v, up.v, atol=1e-6, rtol=1e-4)


def test_refinement_passes_until_the_target_is_greedy(tiny_llama, tiny_tokenizer, facts):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    f = facts[0]
    # a target the model already answers greedily: one pass, then the check stops the loop
    b = build_batch(tiny_tokenizer, [f["prompt"]], [f["target_new"]])
    with torch.no_grad():
        ranked = tiny_llama(input_ids=b.input_ids).logits[0, b.target_mask[0].nonzero()[0, 0]].argsort(descending=True)
    top = int(ranked[0])
    greedy = tiny_tokenizer.decode([top])
    assert target_ids(tiny_tokenizer, greedy) == [top]  # the greedy token is a target of its own
    editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-6, refine_passes=3, refine_seconds=60))
    took = editor.compute_delta(tiny_llama, tiny_tokenizer, [EditRequest(f["prompt"], greedy)])
    assert took.meta["passes"] == "1"
    # a tiny step size never makes the new target greedy: every allowed pass runs, each adding its rows
    req = EditRequest(f["prompt"], f["target_new"])
    many = editor.compute_delta(tiny_llama, tiny_tokenizer, [req])
    one = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-6)).compute_delta(tiny_llama, tiny_tokenizer, [req])
    assert many.meta["passes"] == "4" and one.meta["passes"] == "1"
    assert {u.rank for u in many.updates.values()} == {4 * u.rank for u in one.updates.values()}


def _greedy_target(model, tokenizer, fact: dict) -> str:
    """The model's greedy next token after the fact's prompt, as text: a target that has taken already."""
    b = build_batch(tokenizer, [fact["prompt"]], [fact["target_new"]])
    with torch.no_grad():
        top = int(model(input_ids=b.input_ids).logits[0, b.target_mask[0].nonzero()[0, 0]].argmax())
    return tokenizer.decode([top])


def test_extra_passes_run_after_the_prompt_takes(tiny_llama, tiny_tokenizer, facts):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    f = facts[0]
    req = [EditRequest(f["prompt"], _greedy_target(tiny_llama, tiny_tokenizer, f))]  # taken already: the check says so each pass
    deltas, forwards = {}, {}
    for extra in (0, 2):
        editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-6, refine_passes=5, refine_seconds=60,
                                                        extra_passes=extra))
        with _last_block_inputs(tiny_llama) as shapes:
            deltas[extra] = editor.compute_delta(tiny_llama, tiny_tokenizer, req)
        forwards[extra] = len(shapes)
    assert deltas[0].meta["passes"] == "1" and "extra_passes" not in deltas[0].meta
    assert deltas[2].meta["passes"] == "3" and deltas[2].meta["extra_passes"] == "2"
    # without extra passes the second forward is the check that stops the edit; with them, a forward after
    # the last one checks the take again (an extra pass can drop a target token from greedy)
    assert forwards == {0: 2, 2: 4}
    # the first pass is the same edit; the extra ones add their rows
    for name, upd in deltas[2].updates.items():
        assert upd.rank == 3 * deltas[0].updates[name].rank
        torch.testing.assert_close(upd.u[: deltas[0].updates[name].rank], deltas[0].updates[name].u)
    # refine_passes still bounds them: at most 1 + refine_passes passes
    capped = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-6, refine_passes=1, refine_seconds=60,
                                                    extra_passes=4)).compute_delta(tiny_llama, tiny_tokenizer, req)
    assert capped.meta["passes"] == "2"


def test_passes_run_the_unedited_blocks_once_and_check_in_the_next_pass_s_forward(tiny_llama, tiny_tokenizer, facts):
    """The blocks below the first edited one run once per edit, whatever the passes; a pass's forward is
    also the check of the edit so far (no separate forward for it)."""
    from editor_core.targets import blocks_of

    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    first = min(t.block for t in stack.targets.values())
    assert first > 0
    calls = {"below": 0, "last": 0}
    blocks = blocks_of(tiny_llama)
    hooks = [blocks[0].register_forward_hook(lambda *_: calls.__setitem__("below", calls["below"] + 1)),
             blocks[-1].register_forward_hook(lambda *_: calls.__setitem__("last", calls["last"] + 1))]
    try:
        editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-6, refine_passes=3, refine_seconds=60))
        delta = editor.compute_delta(tiny_llama, tiny_tokenizer, [EditRequest(facts[0]["prompt"], facts[0]["target_new"])])
    finally:
        for h in hooks:
            h.remove()
    assert delta.meta["passes"] == "4"  # a tiny step never takes: every allowed pass runs
    assert calls == {"below": 1, "last": 4}  # was 7 and 7: each pass from the embeddings, and 3 checks


def test_more_passes_lower_the_loss_further(tiny_model, tiny_tokenizer, facts):
    stack = EditStack(tiny_model, resolve_targets(tiny_model))
    req = EditRequest(facts[1]["prompt"], facts[1]["target_new"])
    losses = []
    for passes in (0, 2):
        editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-3, refine_passes=passes))
        with stack.applied(editor.compute_delta(tiny_model, tiny_tokenizer, [req])):
            losses.append(_loss(tiny_model, tiny_tokenizer, req))
    assert losses[1] < losses[0]


def test_pass_scale_writes_each_pass_smaller(tiny_llama, tiny_tokenizer, facts):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    req = [EditRequest(facts[1]["prompt"], facts[1]["target_new"])]
    full = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-3)).compute_delta(tiny_llama, tiny_tokenizer, req)
    half = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-3, pass_scale=0.5)).compute_delta(
        tiny_llama, tiny_tokenizer, req)
    for name, upd in full.updates.items():
        torch.testing.assert_close(half.updates[name].dense(), 0.5 * upd.dense())
    assert half.meta["pass_scale"] == "0.5" and "pass_scale" not in full.meta


def test_first_pass_times_sizes_the_first_pass_only(tiny_llama, tiny_tokenizer, facts):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    req = [EditRequest(facts[1]["prompt"], facts[1]["target_new"])]
    base = dict(rank=8, init_lr=1e-3, pass_scale=0.5)
    one = MendEditor.untrained(stack, MendConfig(**base)).compute_delta(tiny_llama, tiny_tokenizer, req)
    big = MendEditor.untrained(stack, MendConfig(**base, first_pass_times=3.0)).compute_delta(
        tiny_llama, tiny_tokenizer, req)
    for name, upd in one.updates.items():
        torch.testing.assert_close(big.updates[name].dense(), 3 * upd.dense())
    assert big.meta["first_pass_times"] == "3" and "first_pass_times" not in one.meta
    # with refinement, the passes after the first are computed on the model the big first pass left and
    # written at pass_scale: the delta's first pass rows are 3x, the rest are not scaled again
    refine = dict(base, init_lr=1e-6, refine_passes=2, refine_seconds=60)
    a = MendEditor.untrained(stack, MendConfig(**refine)).compute_delta(tiny_llama, tiny_tokenizer, req)
    b = MendEditor.untrained(stack, MendConfig(**refine, first_pass_times=3.0)).compute_delta(
        tiny_llama, tiny_tokenizer, req)
    assert a.meta["passes"] == b.meta["passes"] == "3"
    for name, upd in a.updates.items():
        r = upd.rank // 3
        torch.testing.assert_close(b.updates[name].u[:r], 3 * upd.u[:r])
        torch.testing.assert_close(b.updates[name].u[r:].norm(), upd.u[r:].norm(), rtol=0.05, atol=0)
    with pytest.raises(ValueError, match="first_pass_times"):
        MendConfig(first_pass_times=0.0)


def test_gradient_scale_scales_what_the_nets_read(tiny_llama, tiny_tokenizer, facts):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    req = [EditRequest(facts[1]["prompt"], facts[1]["target_new"])]
    seen = {}
    for scale in (1.0, 0.25):
        editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-3, gradient_scale=scale))
        transform = editor.nets.transform

        def spy(name, x, delta, transform=transform, scale=scale):
            seen.setdefault(scale, {})[name] = delta.clone()
            return transform(name, x, delta)

        editor.nets.transform = spy
        delta = editor.compute_delta(tiny_llama, tiny_tokenizer, req)
        assert (delta.meta.get("gradient_scale") == "0.25") == (scale == 0.25)
    for name, d in seen[1.0].items():
        torch.testing.assert_close(seen[0.25][name], 0.25 * d)


def test_statistics_re_solve_the_covered_targets_only(tiny_llama, tiny_tokenizer, facts):
    from editor_core.stats import collect_key_stats
    from editor_core.targets import out_proj_targets

    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    texts = [f["prompt"] + " " + f["ground_truth"] for f in facts]
    stats = collect_key_stats(tiny_llama, tiny_tokenizer, texts, [1], progress=False)
    plain = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-2, factor_tokens="subject"))
    with pytest.raises(ValueError, match="preserve_lambda is 0"):
        plain.use_statistics(stats, tiny_llama)
    solved = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-2, factor_tokens="subject",
                                                    preserve_lambda=1.0))
    covered = solved.use_statistics(stats, tiny_llama)
    assert covered == [out_proj_targets(tiny_llama, [1])[0].name]
    req = [EditRequest(facts[2]["prompt"], facts[2]["target_new"], subject=facts[2]["subject"])]
    a, b = plain.compute_delta(tiny_llama, tiny_tokenizer, req), solved.compute_delta(tiny_llama, tiny_tokenizer, req)
    for name in a.updates:
        same = torch.equal(a.updates[name].dense(), b.updates[name].dense())
        assert same == (name not in covered), name
    assert b.meta["preserve_lambda"] == "1"


def test_statistics_of_another_model_or_of_no_target_are_refused(tiny_llama, tiny_tokenizer, facts):
    from conftest import make_tiny_llama

    from editor_core.stats import collect_key_stats

    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))  # the MLPs of blocks 2-3
    editor = MendEditor.untrained(stack, MendConfig(rank=8, preserve_lambda=1.0))
    texts = [f["prompt"] for f in facts]
    other = make_tiny_llama(len(tiny_tokenizer), seed=1)
    with pytest.raises(ValueError, match="ks.st holds key statistics of another model"):
        editor.use_statistics(collect_key_stats(other, tiny_tokenizer, texts, [2], progress=False), tiny_llama,
                              source="ks.st")
    with pytest.raises(ValueError, match="covers none of the editor's targets"):
        editor.use_statistics(collect_key_stats(tiny_llama, tiny_tokenizer, texts, [0], progress=False), tiny_llama)
    assert editor.preserved == {}  # nothing adopted from either
    assert editor.use_statistics(collect_key_stats(tiny_llama, tiny_tokenizer, texts, [2], progress=False),
                                 tiny_llama) == ["model.layers.2.mlp.down_proj"]


def test_config_refuses_negative_settings():
    for bad in ({"refine_passes": -1}, {"refine_passes": 1.5}, {"extra_passes": -1}, {"extra_passes": True}, {"preserve_lambda": -2.0}, {"refine_seconds": -1},
                {"pass_scale": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MendConfig(**bad)


def test_last_key_re_solve_has_one_row_per_request(tiny_llama, tiny_tokenizer, facts):
    from editor_core.editor import last_of_each_row
    from editor_core.stats import collect_key_stats

    assert last_of_each_row(torch.tensor([0, 0, 0, 1, 2, 2])).tolist() == [2, 3, 5]
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    stats = collect_key_stats(tiny_llama, tiny_tokenizer, [f["prompt"] for f in facts], [1], progress=False)
    editor = MendEditor.untrained(stack, MendConfig(rank=8, factor_tokens="subject", preserve_lambda=1.0,
                                                    preserve_keys="last"))
    (covered,) = editor.use_statistics(stats, tiny_llama)
    reqs = [EditRequest(f["prompt"], f["target_new"], subject=f["subject"]) for f in facts[:3]]
    delta = editor.compute_delta(tiny_llama, tiny_tokenizer, reqs)
    assert delta.updates[covered].rank == 3  # one key (the subject's last token) per request
    assert all(u.rank > 3 for n, u in delta.updates.items() if n != covered)  # every subject token


def test_edit_targets_restrict_what_an_edit_writes(tiny_llama, tiny_tokenizer, facts):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    names = list(stack.targets)
    editor = MendEditor.untrained(stack, MendConfig(rank=8, targets=names, edit_targets=names[:1]))
    delta = editor.compute_delta(tiny_llama, tiny_tokenizer, [EditRequest(facts[0]["prompt"], facts[0]["target_new"])])
    assert list(delta.updates) == names[:1]
    with pytest.raises(ValueError, match="edit_targets"):
        MendEditor.untrained(stack, MendConfig(rank=8, targets=names, edit_targets=["model.nowhere"]))


def test_keep_holds_an_earlier_edit_s_key_where_it_was(tiny_llama, tiny_tokenizer, facts):
    from editor_core.stats import collect_key_stats

    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    stats = collect_key_stats(tiny_llama, tiny_tokenizer, [f["prompt"] for f in facts], [1], progress=False)
    first = EditRequest(facts[0]["prompt"], facts[0]["target_new"], subject=facts[0]["subject"])
    second = EditRequest(facts[3]["prompt"], facts[3]["target_new"], subject=facts[3]["subject"])
    moved = {}
    for keep in (0.0, 10.0):
        editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-2, factor_tokens="subject",
                                                        preserve_lambda=1.0, preserve_keys="last", preserve_keep=keep))
        (name,) = editor.use_statistics(stats, tiny_llama)
        d1 = editor.compute_delta(tiny_llama, tiny_tokenizer, [first])
        assert d1.keys[name].shape == (1, stack.targets[name].d_in)  # journaled: one key per request
        stack.apply("first", d1)
        try:
            d2 = editor.compute_delta(tiny_llama, tiny_tokenizer, [second])
        finally:
            stack.revert("first")
        moved[keep] = float((d1.keys[name] @ d2.updates[name].dense().t()).norm())  # the 2nd's change at the 1st
    assert moved[10.0] < 0.5 * moved[0.0]


def test_load_takes_inference_settings_only(tiny_llama, tmp_path):
    from editor_core import checkpoint

    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    editor = MendEditor.untrained(stack, MendConfig(rank=4, targets=list(stack.targets)))
    checkpoint.save(tmp_path, editor.config, editor.nets.state_dict(), {"model_fingerprint": stack.fingerprint})
    assert MendEditor.load(tmp_path, stack, settings={"refine_passes": 2}).config.refine_passes == 2
    with pytest.raises(ValueError, match="rank"):
        MendEditor.load(tmp_path, stack, settings={"rank": 8})


def test_edit_prefixes_edit_behind_each_prefix_and_journal_the_bare_prompt_s_key(tiny_llama, tiny_tokenizer, facts):
    from editor_core.stats import collect_key_stats

    with pytest.raises(ValueError, match="edit_prefixes"):
        MendConfig(preserve_lambda=1.0, preserve_keys="all", edit_prefixes=["I read that "])
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    texts = [f["prompt"] + " " + f["ground_truth"] for f in facts]
    stats = collect_key_stats(tiny_llama, tiny_tokenizer, texts, [1], progress=False)
    reqs = [EditRequest(f["prompt"], f["target_new"], subject=f["subject"]) for f in facts[:2]]
    deltas = {}
    for prefixes, averaged in (([], []), (["I read that ", "As everyone knows, "], []),
                               ([], ["Here is a fact: "]), (["I read that ", "As everyone knows, "], ["Here is a fact: "])):
        editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-2, factor_tokens="subject",
                                                        preserve_lambda=1.0, preserve_keys="last",
                                                        edit_prefixes=prefixes, key_prefixes=averaged))
        (name,) = editor.use_statistics(stats, tiny_llama)
        deltas[len(prefixes), len(averaged)] = editor.compute_delta(tiny_llama, tiny_tokenizer, reqs)
    bare, behind = deltas[0, 0], deltas[2, 0]
    # the rows behind the prefixes give gradient (another update), and the re-solve keeps the change at one
    # key per request, its bare prompt's, whatever the rows: the same keys an edit without prefixes journals
    assert bare.updates[name].rank == 2 and behind.updates[name].rank == 2
    torch.testing.assert_close(behind.keys[name], bare.keys[name])
    assert not torch.allclose(behind.updates[name].u, bare.updates[name].u)
    assert behind.meta["edit_prefixes"] == "2" and "edit_prefixes" not in bare.meta
    # with key_prefixes too, that one key is the bare prompt's averaged over the key wordings, as without
    # edit_prefixes (each request's own: the rows behind the edit prefixes do not shift whose key is whose)
    keyed, both = deltas[0, 1], deltas[2, 1]
    assert both.updates[name].rank == 2
    torch.testing.assert_close(both.keys[name], keyed.keys[name])
    assert not torch.allclose(both.keys[name], bare.keys[name])


def test_the_edit_prefix_cache_runs_the_prompts_only_and_its_first_pass_is_the_padded_rows(
        tiny_llama, tiny_tokenizer, facts):
    """With the prefixes' keys and values cached, every pass runs each row from its prompt on (as wide as
    the bare rows), and a one-pass edit of a batch (factors, re-solve, keys) is the padded rows' edit."""
    from editor_core.stats import collect_key_stats

    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    stats = collect_key_stats(tiny_llama, tiny_tokenizer, [f["prompt"] for f in facts], [1], progress=False)
    reqs = [EditRequest(f["prompt"], f["target_new"], subject=f["subject"]) for f in facts[:3]]
    prefixes = ["She closed the book and looked outside. ", "I read that "]
    def width(wordings):  # of the rows prompt + target behind each wording
        rows = [(w + r.prompt, r.target) for r in reqs for w in wordings]
        return build_batch(tiny_tokenizer, [p for p, _ in rows], [t for _, t in rows]).input_ids.shape[1]

    deltas, widths = {}, {}
    for cached in (False, True):
        editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-2, factor_tokens="subject",
                                                        preserve_lambda=1.0, preserve_keys="last", refine_passes=0,
                                                        edit_prefixes=prefixes, edit_prefix_cache=cached))
        (name,) = editor.use_statistics(stats, tiny_llama)
        with _last_block_inputs(tiny_llama) as shapes:
            deltas[cached] = editor.compute_delta(tiny_llama, tiny_tokenizer, reqs)
        widths[cached] = shapes[-1]  # the pass's forward
    # the longest prefix pads every row; cached, the rows hold the prompt and target only (both one column
    # shorter, as every pass runs), give or take the space this byte-level tokenizer splits off where the
    # prefix ends
    assert widths[False] == (9, width(["", *prefixes]) - 1)
    assert widths[True][0] == 9 and width([""]) - 1 <= widths[True][1] <= width([""]) + 1 < widths[False][1]
    torch.testing.assert_close(deltas[True].keys[name], deltas[False].keys[name])
    for target, upd in deltas[False].updates.items():
        torch.testing.assert_close(deltas[True].updates[target].dense(), upd.dense(), atol=1e-6, rtol=1e-4)


def test_edit_prefixes_from_take_run_a_request_behind_them_once_its_bare_prompt_has_taken(
        tiny_llama, tiny_tokenizer, facts):
    with pytest.raises(ValueError, match="edit_prefixes_from"):
        MendConfig(edit_prefixes_from="later")
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    f = facts[0]
    taken = EditRequest(f["prompt"], _greedy_target(tiny_llama, tiny_tokenizer, f))  # it takes at the first check
    missing = EditRequest(facts[1]["prompt"], facts[1]["target_new"])  # init_lr 1e-6 never makes it take
    rows, metas = {}, {}
    for start in ("first_pass", "take"):
        editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-6, refine_passes=4, refine_seconds=60,
                                                        extra_passes=1, edit_prefixes=["I read that "],
                                                        edit_prefixes_from=start))
        with _last_block_inputs(tiny_llama) as shapes:
            metas[start] = editor.compute_delta(tiny_llama, tiny_tokenizer, [taken, missing]).meta
        rows[start] = [r for r, _ in shapes]
    # both rows of each request in every pass, against the bare prompts alone until one takes: the first pass
    # has no check, the second's forward finds the greedy one taken, and from the third on it runs behind the
    # prefix too (until it has finished its extra pass), while the other stays bare
    assert rows["first_pass"][:2] == [4, 4]
    assert rows["take"][:3] == [2, 2, 3]
    assert max(rows["take"]) == 3 and sum(rows["take"]) < sum(rows["first_pass"])
    assert metas["take"]["edit_prefixes_from"] == "take" and "edit_prefixes_from" not in metas["first_pass"]


def test_check_prefixed_false_reads_the_take_on_the_bare_prompt_and_the_prefix_gives_gradient(
        tiny_llama, tiny_tokenizer, facts):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    f = facts[0]
    taken = EditRequest(f["prompt"], _greedy_target(tiny_llama, tiny_tokenizer, f))  # it takes at the first check
    # the take is read on the bare prompt alone, so the greedy request runs the passes it runs without the
    # prefix (its first, then its extra one), and the prefix's row adds only gradient
    alone = {}
    for prefixes, checked in (([], True), (["I read that "], False)):
        editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-6, refine_passes=4, refine_seconds=60,
                                                        extra_passes=1, edit_prefixes=prefixes,
                                                        check_prefixed=checked))
        with _last_block_inputs(tiny_llama) as shapes:
            alone[checked] = editor.compute_delta(tiny_llama, tiny_tokenizer, [taken])
        assert [r for r, _ in shapes] == [1 + len(prefixes)] * 3
    assert alone[False].meta["passes"] == alone[True].meta["passes"] == "2"
    assert alone[False].meta["check_prefixed"] == "false"
    name = next(iter(alone[True].updates))
    assert not torch.allclose(alone[False].updates[name].dense(), alone[True].updates[name].dense(), rtol=1e-3, atol=0)


def test_a_batch_of_facts_is_the_sum_of_each_fact_edited_alone(tiny_llama, tiny_tokenizer, facts):
    # a batch-mean loss would shrink each fact's gradient by the batch size before the nets read it
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-2, factor_tokens="subject"))
    reqs = [EditRequest(f["prompt"], f["target_new"], subject=f["subject"]) for f in facts[:3]]
    both = editor.compute_delta(tiny_llama, tiny_tokenizer, reqs)
    alone = [editor.compute_delta(tiny_llama, tiny_tokenizer, [r]) for r in reqs]
    for name, upd in both.updates.items():
        torch.testing.assert_close(upd.dense(), sum(a.updates[name].dense() for a in alone), atol=1e-6, rtol=1e-4)


def test_a_batch_re_solve_asks_each_key_for_its_own_fact_s_change(tiny_llama, tiny_tokenizer, facts):
    from editor_core.preserved_solve import preserved_inverse
    from editor_core.stats import collect_key_stats

    stats = collect_key_stats(tiny_llama, tiny_tokenizer, [f["prompt"] for f in facts], [1], progress=False)
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1.0, factor_tokens="subject",
                                                    preserve_lambda=1.0, preserve_keys="last"))
    (covered,) = editor.use_statistics(stats, tiny_llama)
    reqs = [EditRequest(f["prompt"], f["target_new"], subject=f["subject"]) for f in facts[:2]]
    delta = editor.compute_delta(tiny_llama, tiny_tokenizer, reqs)
    both, keys = delta.updates[covered], delta.keys[covered]  # keys (2, d_in): each fact's subject's last token
    plain = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1.0, factor_tokens="subject"))
    own = [plain.compute_delta(tiny_llama, tiny_tokenizer, [r]).updates[covered] for r in reqs]
    # what fact i's own proposal does at its key, and nothing of the other fact's
    wanted = torch.stack([keys[i] @ own[i].dense().t() for i in range(2)])  # (2, d_out)
    inverse = preserved_inverse(stats.moments[1], 1.0).to(keys.device)
    summed = own[0].dense() + own[1].dense()
    mixed = keys @ summed.t()  # (2, d_out): what the summed proposals do at each key
    assert (mixed - wanted).norm() > 0.05 * wanted.norm()  # the facts' proposals do reach each other's keys
    # R^T K (lam C + K^T K)^-1 with R = wanted, in its Woodbury form
    a = inverse @ keys.t()  # (d_in, 2)
    x = torch.linalg.solve(torch.eye(2) + keys @ a, a.t())  # (2, d_in)
    want = wanted.t() @ x  # (d_out, d_in)
    assert (both.dense() - want).norm() < 1e-4 * want.norm()


def test_key_prefixes_re_solve_at_the_subject_key_averaged_over_wordings(tiny_llama, tiny_tokenizer, facts):
    from editor_core.methods.values import subject_keys
    from editor_core.stats import collect_key_stats

    with pytest.raises(ValueError, match="key_prefixes needs"):
        MendConfig(preserve_lambda=1.0, preserve_keys="all", key_prefixes=["I read that "])
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    stats = collect_key_stats(tiny_llama, tiny_tokenizer, [f["prompt"] for f in facts], [1], progress=False)
    base = dict(rank=8, init_lr=1e-2, factor_tokens="subject", preserve_lambda=1.0, preserve_keys="last")
    bare = MendEditor.untrained(stack, MendConfig(**base))
    (covered,) = bare.use_statistics(stats, tiny_llama)
    mean = MendEditor.untrained(stack, MendConfig(**base, key_prefixes=["I read that "]))
    mean.use_statistics(stats, tiny_llama)
    f = facts[0]
    reqs = [EditRequest(f["prompt"], f["target_new"], subject=f["subject"]),
            EditRequest(facts[1]["prompt"], facts[1]["target_new"])]  # no subject: keeps the bare key
    a, b = bare.compute_delta(tiny_llama, tiny_tokenizer, reqs), mean.compute_delta(tiny_llama, tiny_tokenizer, reqs)
    both = subject_keys(tiny_llama, tiny_tokenizer, [(f["prompt"], f["subject"])], [stack.targets[covered]],
                        ("", "I read that "))[covered]  # (2, d_in): bare, behind the prefix
    torch.testing.assert_close(a.keys[covered][0], both[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b.keys[covered][0], both.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b.keys[covered][1], a.keys[covered][1])
    assert not torch.allclose(a.updates[covered].dense(), b.updates[covered].dense())
    assert b.meta["key_prefixes"] == "1" and "key_prefixes" not in a.meta
    # no request names a subject: every key is the bare prompt's, as without prefixes
    none = [EditRequest(f["prompt"], f["target_new"]) for f in facts[:2]]
    a, b = bare.compute_delta(tiny_llama, tiny_tokenizer, none), mean.compute_delta(tiny_llama, tiny_tokenizer, none)
    torch.testing.assert_close(b.keys[covered], a.keys[covered])


def test_key_reads_first_pass_reads_the_averaged_keys_once(tiny_llama, tiny_tokenizer, facts, monkeypatch):
    from editor_core.methods.values import SubjectKeyReader
    from editor_core.stats import collect_key_stats

    with pytest.raises(ValueError, match="key_reads"):
        MendConfig(key_reads="never")
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    stats = collect_key_stats(tiny_llama, tiny_tokenizer, [f["prompt"] for f in facts], [1], progress=False)
    reads = [0]
    real = SubjectKeyReader.read

    def counted(self):
        reads[0] += 1
        return real(self)

    monkeypatch.setattr(SubjectKeyReader, "read", counted)
    f = facts[0]
    req = [EditRequest(f["prompt"], f["target_new"], subject=f["subject"])]
    deltas, counts = {}, {}
    for mode in ("every_pass", "first_pass"):
        editor = MendEditor.untrained(stack, MendConfig(
            rank=8, init_lr=1e-6, factor_tokens="subject", preserve_lambda=1.0, preserve_keys="last",
            refine_passes=2, refine_seconds=60, key_prefixes=["I read that "], key_reads=mode))
        (covered,) = editor.use_statistics(stats, tiny_llama)
        reads[0] = 0
        deltas[mode] = editor.compute_delta(tiny_llama, tiny_tokenizer, req)
        counts[mode] = reads[0]
    assert deltas["first_pass"].meta["passes"] == deltas["every_pass"].meta["passes"] == "3"
    assert counts == {"every_pass": 3, "first_pass": 1}
    assert deltas["first_pass"].meta["key_reads"] == "first_pass" and "key_reads" not in deltas["every_pass"].meta
    # the first pass reads as before: its rows and the journaled keys are the same
    first, every = deltas["first_pass"].updates[covered], deltas["every_pass"].updates[covered]
    torch.testing.assert_close(first.u[:1], every.u[:1])
    torch.testing.assert_close(first.v[:1], every.v[:1])
    torch.testing.assert_close(deltas["first_pass"].keys[covered], deltas["every_pass"].keys[covered])


def test_key_reads_first_pass_carries_the_first_read_s_offset_to_later_bare_keys(tiny_llama, tiny_tokenizer, facts):
    from editor_core.stats import collect_key_stats

    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    stats = collect_key_stats(tiny_llama, tiny_tokenizer, [f["prompt"] for f in facts], [1], progress=False)
    editor = MendEditor.untrained(stack, MendConfig(rank=8, factor_tokens="subject", preserve_lambda=1.0,
                                                    preserve_keys="last", key_prefixes=["I read that "],
                                                    key_reads="first_pass"))
    (covered,) = editor.use_statistics(stats, tiny_llama)
    f = facts[0]
    reqs = [EditRequest(facts[1]["prompt"], facts[1]["target_new"]),  # no subject: not read
            EditRequest(f["prompt"], f["target_new"], subject=f["subject"])]
    first = min(t.block for t in editor.targets)
    read = editor._mean_keys(tiny_llama, tiny_tokenizer, reqs, first)
    d = stack.targets[covered].d_in
    bare1, bare2 = {covered: torch.randn(2, d)}, {covered: torch.randn(2, d)}
    index, averaged = read(bare1)
    assert index.tolist() == [1]
    index, later = read(bare2)  # no second read: the later bare key moved by the first read's offset
    torch.testing.assert_close(later[covered], bare2[covered][index] + averaged[covered] - bare1[covered][index])


def test_a_fact_of_a_batch_stops_when_it_takes_and_the_others_go_on(tiny_llama, tiny_tokenizer, facts):
    """Each fact of a batch gets the passes it would get alone: once it has taken (and run its extra
    passes) later passes give it no gradient and no rows, and re-solve to leave its key where it is."""
    from editor_core.stats import collect_key_stats

    stats = collect_key_stats(tiny_llama, tiny_tokenizer, [f["prompt"] for f in facts], [1], progress=False)
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    f, g = facts[0], facts[1]
    easy = EditRequest(f["prompt"], _greedy_target(tiny_llama, tiny_tokenizer, f), subject=f["subject"])
    hard = EditRequest(g["prompt"], g["target_new"], subject=g["subject"])  # a tiny step never takes
    config = MendConfig(rank=8, init_lr=1e-6, factor_tokens="subject", refine_passes=3, refine_seconds=60,
                        preserve_lambda=1.0, preserve_keys="last")
    editor = MendEditor.untrained(stack, config)
    (name,) = editor.use_statistics(stats, tiny_llama)
    both = editor.compute_delta(tiny_llama, tiny_tokenizer, [easy, hard])
    alone = editor.compute_delta(tiny_llama, tiny_tokenizer, [easy])
    assert alone.meta["passes"] == "1"
    assert both.meta["passes"] == "4" and both.meta["passes_per_request"] == "1,4"
    # the first pass writes a row at each fact's key; the three later ones at the hard fact's key only
    assert both.updates[name].rank == 2 + 3
    # those later rows move the hard fact's output and leave the easy fact's about where it was
    later = type(both.updates[name])(both.updates[name].u[2:], both.updates[name].v[2:]).dense()  # (d_out, d_in)
    easy_key, hard_key = both.keys[name]  # (d_in,) each
    assert (easy_key @ later.t()).norm() < 0.01 * (hard_key @ later.t()).norm()
    # with extra passes, the easy fact runs them, then stops
    extra = MendEditor.untrained(stack, replace(config, extra_passes=1))
    extra.use_statistics(stats, tiny_llama)
    assert extra.compute_delta(tiny_llama, tiny_tokenizer, [easy, hard]).meta["passes_per_request"] == "2,4"


@contextmanager
def _last_block_inputs(model):
    """The (rows, columns) of each hidden state that enters the model's last block while in the block."""
    shapes = []
    hook = model.model.layers[-1].register_forward_pre_hook(
        lambda _m, args, kwargs: shapes.append(tuple((args[0] if args else kwargs["hidden_states"]).shape[:2])),
        with_kwargs=True)
    try:
        yield shapes
    finally:
        hook.remove()


def test_a_batch_runs_only_the_facts_still_writing_and_checks_the_finished_ones_again(
        tiny_llama, tiny_tokenizer, facts, monkeypatch):
    """Once a fact of a batch has finished, later passes run the other facts' rows only; when those
    finish, one forward over every row checks them all, and a fact the later passes moved back writes
    again. The verdicts are scripted (a tiny random model's edits do not take on cue)."""
    from editor_core.stats import collect_key_stats

    stats = collect_key_stats(tiny_llama, tiny_tokenizer, [f["prompt"] for f in facts], [1], progress=False)
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    a, b = (EditRequest(f["prompt"], f["target_new"], subject=f["subject"]) for f in facts[:2])
    config = MendConfig(rank=8, init_lr=1e-6, factor_tokens="subject", refine_passes=10, refine_seconds=60,
                        preserve_lambda=1.0, preserve_keys="last")
    editor = MendEditor.untrained(stack, config)
    (name,) = editor.use_statistics(stats, tiny_llama)
    T, F = True, False
    verdicts = [[T, F],  # pass 2 (both rows): a has taken, b not
                [F], [T],  # passes 3 and 4 run b's row only; b takes at 4
                [F, T],  # the check of every row: b's passes moved a back
                [F], [T],  # passes 5 and 6 run a's row only
                [T, T]]  # the check of every row: both hold
    asked = []

    def scripted(self, logits, batch, request_of_row, checked=None):
        verdict = torch.tensor(verdicts[len(asked)])
        asked.append(batch.input_ids.shape[0])
        assert verdict.shape[0] == int(request_of_row.max()) + 1  # one verdict per request of that forward
        return verdict

    monkeypatch.setattr(MendEditor, "_taken", scripted)
    with _last_block_inputs(tiny_llama) as shapes:
        delta = editor.compute_delta(tiny_llama, tiny_tokenizer, [a, b])
    assert asked == [2, 1, 1, 2, 1, 1, 2] and len(asked) == len(verdicts)
    assert [rows for rows, _ in shapes] == [2, 2, 1, 1, 2, 1, 1, 2]  # pass 1 (no check), then as scripted
    # passes 1, 2, 3 and 5 wrote: a in 1 and 5, b in 1, 2 and 3
    assert delta.meta["passes"] == "4" and delta.meta["passes_per_request"] == "2,3"
    assert delta.updates[name].rank == 2 + 1 + 1 + 1  # one row per fact written in each pass


def test_passes_run_without_the_last_input_column_and_give_the_same_delta(tiny_llama, tiny_tokenizer, facts,
                                                                          monkeypatch):
    """The last input token predicts nothing the loss reads: the passes run one column shorter, and the
    delta is the one the full batch gives."""
    import editor_core.editor as editor_module
    from editor_core.stats import collect_key_stats

    stats = collect_key_stats(tiny_llama, tiny_tokenizer, [f["prompt"] for f in facts], [1], progress=False)
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    reqs = [EditRequest(f["prompt"], f["target_new"], subject=f["subject"]) for f in facts[:2]]
    editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-3, factor_tokens="subject", refine_passes=2,
                                                    refine_seconds=60, preserve_lambda=1.0, preserve_keys="last"))
    editor.use_statistics(stats, tiny_llama)
    full_width = build_batch(tiny_tokenizer, [r.prompt for r in reqs], [r.target for r in reqs]).input_ids.shape[1]
    with _last_block_inputs(tiny_llama) as shapes:
        short = editor.compute_delta(tiny_llama, tiny_tokenizer, reqs)
    assert {width for _, width in shapes} == {full_width - 1}
    monkeypatch.setattr(editor_module, "without_last_input", lambda batch: None)
    with _last_block_inputs(tiny_llama) as shapes:
        full = editor.compute_delta(tiny_llama, tiny_tokenizer, reqs)
    assert {width for _, width in shapes} == {full_width}
    assert short.meta["passes"] == full.meta["passes"] == "3"
    for name, upd in full.updates.items():
        torch.testing.assert_close(short.updates[name].dense(), upd.dense(), rtol=1e-4, atol=1e-7)
    for name, k in full.keys.items():
        torch.testing.assert_close(short.keys[name], k)


def test_take_nll_asks_a_taken_prompt_for_a_margin_too(tiny_llama, tiny_tokenizer, facts):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    f = facts[0]
    b = build_batch(tiny_tokenizer, [f["prompt"]], [f["target_new"]])
    with torch.no_grad():
        logits = tiny_llama(input_ids=b.input_ids).logits[0, b.target_mask[0].nonzero()[0, 0]]
    top = int(logits.argmax())
    nll = float(-logits.log_softmax(-1)[top])  # the greedy token's NLL: a random tiny model is unsure of it
    req = [EditRequest(f["prompt"], tiny_tokenizer.decode([top]))]  # greedy already
    passes = {}
    for take_nll in (0.0, 2 * nll, nll / 2):
        editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-6, refine_passes=3, refine_seconds=60,
                                                        take_nll=take_nll))
        delta = editor.compute_delta(tiny_llama, tiny_tokenizer, req)
        passes[take_nll] = delta.meta["passes"]
    assert passes == {0.0: "1", 2 * nll: "1", nll / 2: "4"}  # a tiny step never halves the NLL
    assert delta.meta["take_nll"] == f"{nll / 2:g}"
    with pytest.raises(ValueError, match="take_nll"):
        MendConfig(take_nll=-1.0)


def _recording_passes(editor):
    """Wrap ``editor._pass`` to keep each pass's returned updates (name -> LowRankUpdate), in order."""
    seen = []
    plain = editor._pass

    def wrapped(*args, **kwargs):
        found = plain(*args, **kwargs)
        if found is not None:
            seen.append(found[0])
        return found

    editor._pass = wrapped
    return seen


def test_pass_momentum_writes_each_earlier_pass_again_until_the_prompt_takes(tiny_llama, tiny_tokenizer, facts):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    m = 0.5
    editor = MendEditor.untrained(stack, MendConfig(rank=8, init_lr=1e-3, refine_passes=3, refine_seconds=60,
                                                    pass_momentum=m))
    seen = _recording_passes(editor)
    delta = editor.compute_delta(tiny_llama, tiny_tokenizer, [EditRequest(facts[0]["prompt"], facts[0]["target_new"])])
    assert delta.meta["passes"] == "4" and delta.meta["pass_momentum"] == "0.5"  # a tiny step never takes
    # heavy ball: after the last pass (t = 3) pass p weighs 1 + m + ... + m^(3-p)
    weights = [sum(m ** j for j in range(4 - p)) for p in range(4)]
    for name, upd in delta.updates.items():
        expected = torch.cat([w * s[name].u for w, s in zip(weights, seen, strict=True)])
        torch.testing.assert_close(upd.u, expected)
        torch.testing.assert_close(upd.v, torch.cat([s[name].v for s in seen]))
    # the passes saw the grown updates: the second pass's gradient is not the plain run's
    plain = MendEditor.untrained(stack, replace(editor.config, pass_momentum=0.0))
    plain_seen = _recording_passes(plain)
    plain.compute_delta(tiny_llama, tiny_tokenizer, [EditRequest(facts[0]["prompt"], facts[0]["target_new"])])
    name = next(iter(delta.updates))
    torch.testing.assert_close(seen[1][name].u, plain_seen[1][name].u)  # pass 1 read only pass 0, weight 1
    assert not torch.allclose(seen[2][name].u, plain_seen[2][name].u, rtol=1e-3, atol=0)  # read pass 0 at 1 + m


def test_pass_momentum_stops_growing_once_the_prompt_has_taken(tiny_llama, tiny_tokenizer, facts):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama))
    f = facts[0]
    req = [EditRequest(f["prompt"], _greedy_target(tiny_llama, tiny_tokenizer, f))]  # taken at the first check
    config = MendConfig(rank=8, init_lr=1e-6, refine_passes=5, refine_seconds=60, extra_passes=2)
    plain = MendEditor.untrained(stack, config).compute_delta(tiny_llama, tiny_tokenizer, req)
    heavy = MendEditor.untrained(stack, replace(config, pass_momentum=0.9)).compute_delta(tiny_llama, tiny_tokenizer, req)
    assert plain.meta["passes"] == heavy.meta["passes"] == "3"
    for name, upd in heavy.updates.items():  # the extra passes after the take are plain passes
        torch.testing.assert_close(upd.u, plain.updates[name].u)


def test_pass_momentum_outside_its_range_is_refused():
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="pass_momentum"):
            MendConfig(pass_momentum=bad)
