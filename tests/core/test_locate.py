"""ROME / MEMIT / AlphaEdit on tiny llama and gpt2 models built from config (key statistics from the
fixture facts): edits take, rollback is bit-exact, replay reproduces the sha256, and AlphaEdit's memory
of earlier edits is a function of the active deltas only."""

from __future__ import annotations

import copy

import pytest
import torch

from editor_core.delta import EditDelta
from editor_core.methods.locate import LocateConfig, LocateEditor, group_of
from editor_core.methods.values import SubjectError, ValueConfig, keys_and_states
from editor_core.requests import EditRequest
from editor_core.scoring import score_targets
from editor_core.stack import EditStack
from editor_core.stats import KeyStats, StatsError, collect_key_stats, null_space_projector, stats_fingerprint
from editor_core.targets import out_proj_targets

LAYERS = [1, 2]  # of 4 blocks: the value is read leaving block 2, block 3 and the head run on top


def config(d_in: int = 64) -> LocateConfig:
    value = ValueConfig(steps=30, lr=0.5, clamp_norm=4.0, kl_weight=0.0625, weight_decay=0.01, stop_nll=0.05,
                        prefixes=("", "Note: "))
    return LocateConfig(rome_layers=[2], memit_layers=LAYERS, alphaedit_layers=LAYERS, memit_lambda=1.0,
                        alphaedit_lambda=0.01, null_dims=d_in * 3 // 4, value=value)


def texts(facts) -> list[str]:
    out = []
    for r in facts:
        out += [f"{r['prompt']} {r['ground_truth']}", f"{r['rephrase_prompt']} {r['ground_truth']}",
                f"{r['locality_prompt']} {r['locality_ground_truth']}"]
    return out


def d_in(stack: EditStack) -> int:
    return next(iter(stack.targets.values())).d_in


@pytest.fixture
def setup(tiny_model, tiny_tokenizer, facts):
    stats = collect_key_stats(tiny_model, tiny_tokenizer, texts(facts), LAYERS, progress=False)
    stack = EditStack(tiny_model, out_proj_targets(tiny_model, LAYERS))
    return tiny_model, tiny_tokenizer, stack, stats


# Single-token targets of the tiny tokenizer, and prompts that end on the subject: in a random 4-block
# model, attention carries almost nothing from the subject to later positions, so the value written at
# the subject's last token is what must make the target come out (it does, in a real model, through
# attention too: tests/slow/test_locate_default_model.py).
TARGETS = ("Toyota", "Honda", "Apple", "city", "capital")


def request(fact: dict, i: int = 0) -> EditRequest:
    return EditRequest(f"About {fact['subject']}", TARGETS[i % len(TARGETS)], fact["subject"])


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_edit_takes_and_rolls_back_bit_exact(setup, facts, method):
    model, tok, stack, stats = setup
    editor = LocateEditor(method, stack, stats, config(d_in(stack)))
    base = stack.sha256()
    req = request(facts[0])
    assert score_targets(model, tok, [req.prompt], [req.target])[0].token_acc < 1.0
    delta = editor.compute_delta(model, tok, [req])
    assert stack.sha256() == base  # computing never writes
    assert set(delta.updates) == {t.name for t in editor.targets}
    assert all(u.rank == 1 for u in delta.updates.values())  # one fact: rank one per layer
    stack.apply("e1", delta)
    after = score_targets(model, tok, [req.prompt], [req.target])[0]
    assert after.token_acc == 1.0, f"{method}: the target is not the greedy continuation after the edit"
    stack.revert("e1")
    assert stack.sha256() == base


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_batch_of_facts_solved_together_and_replay_reproduces_sha(setup, facts, method):
    model, tok, stack, stats = setup
    editor = LocateEditor(method, stack, stats, config(d_in(stack)))
    reqs = [request(f, i) for i, f in enumerate(facts[:3])]
    delta = editor.compute_delta(model, tok, reqs)
    assert all(u.rank == 3 for u in delta.updates.values())
    stack.apply("e1", delta)
    hits = [s.token_acc == 1.0 for s in score_targets(model, tok, [r.prompt for r in reqs], [r.target for r in reqs])]
    assert all(hits), hits
    live = stack.sha256()
    blob = delta.to_bytes()
    again = EditDelta.from_bytes(blob, stack.fingerprint, stack.shapes)
    assert set(again.keys) == set(delta.keys) and all(torch.equal(again.keys[n], delta.keys[n]) for n in delta.keys)
    twin = copy.deepcopy(model)
    for t in stack.targets.values():  # the twin starts from the pristine weights
        twin.get_submodule(t.name).weight.data.copy_(model.get_submodule(t.name).weight.data)
    stack.revert("e1")
    for t in stack.targets.values():
        twin.get_submodule(t.name).weight.data.copy_(model.get_submodule(t.name).weight.data)
    twin_stack = EditStack(twin, list(stack.targets.values()))
    twin_stack.rebuild([("e1", again)])
    assert twin_stack.sha256() == live


def keeping(method: str, keep: float, width: int) -> LocateConfig:
    """The test config with the method's weight on earlier edits' keys set to ``keep``."""
    cfg = config(width)
    setattr(cfg, f"{method}_keep", keep)
    return cfg


@pytest.mark.parametrize("method", ["alphaedit", "memit"])
def test_memory_of_earlier_edits_is_the_active_edits(setup, facts, method):
    """After edit A, edit B, rollback A: the next edit equals the one computed where A never happened
    (AlphaEdit, and MEMIT with a keep weight: both read the earlier edits' keys from the stack)."""
    model, tok, stack, stats = setup
    base_weights = {n: model.get_submodule(n).weight.detach().clone() for n in stack.targets}
    twin = copy.deepcopy(model)
    editor = LocateEditor(method, stack, stats, keeping(method, 1.0, d_in(stack)))
    a = editor.compute_delta(model, tok, [request(facts[0])])
    stack.apply("A", a)
    b = editor.compute_delta(model, tok, [request(facts[1], 1)])
    stack.apply("B", b)
    name = editor.targets[0].name
    assert editor.earlier_keys(name).shape[0] == 2
    stack.revert("A")
    assert editor.earlier_keys(name).shape[0] == 1
    c_seen = editor.compute_delta(model, tok, [request(facts[2], 2)])

    for n, w in base_weights.items():
        twin.get_submodule(n).weight.data.copy_(w)
    twin_stack = EditStack(twin, list(stack.targets.values()))
    twin_stack.apply("B", b)
    twin_editor = LocateEditor(method, twin_stack, stats, keeping(method, 1.0, d_in(stack)))
    c_never = twin_editor.compute_delta(twin, tok, [request(facts[2], 2)])
    for n in c_seen.updates:
        assert torch.equal(c_seen.updates[n].u, c_never.updates[n].u)
        assert torch.equal(c_seen.updates[n].v, c_never.updates[n].v)


@pytest.mark.parametrize("method", ["alphaedit", "memit"])
def test_keep_weight_holds_the_earlier_edits_keys(setup, facts, method):
    """Edit B after edit A: a heavy keep weight moves the edited layers' output at A's keys much less
    (relative to the change at B's own keys) than no keep weight at all."""
    model, tok, stack, stats = setup
    moved = {}
    for keep in (0.0, 100.0):
        editor = LocateEditor(method, stack, stats, keeping(method, keep, d_in(stack)))
        a = editor.compute_delta(model, tok, [request(facts[0])])
        stack.apply("A", a)
        b = editor.compute_delta(model, tok, [request(facts[1], 1)])
        stack.revert("A")
        ratios = []
        for name, upd in b.updates.items():
            dw = upd.dense()  # (d_out, d_in)
            ratios.append(float((a.keys[name] @ dw.t()).norm() / (b.keys[name] @ dw.t()).norm()))
        moved[keep] = max(ratios)
    assert moved[100.0] < 0.2 * moved[0.0], moved


def test_key_spread_journals_each_prefix_key_with_the_mean_keys_weight(setup, facts):
    """keep_key_spread: the delta carries the key behind every prefix, scaled so that their Gram matrix
    is the mean of the outer products; they sum to the averaged key the update was solved for."""
    model, tok, stack, stats = setup
    plain = LocateEditor("memit", stack, stats, config(d_in(stack))).compute_delta(model, tok, [request(facts[0])])
    cfg = config(d_in(stack))
    cfg.keep_key_spread = True
    spread = LocateEditor("memit", stack, stats, cfg).compute_delta(model, tok, [request(facts[0])])
    n_prefixes = len(cfg.value.prefixes)
    for name, k in plain.keys.items():
        rows = spread.keys[name]  # (P, d_in)
        assert rows.shape == (n_prefixes, k.shape[1])
        torch.testing.assert_close(rows.sum(0) / n_prefixes ** 0.5, k[0], rtol=1e-4, atol=1e-5)
        # the mean key's outer product is at most the spread's Gram (Jensen): nothing of it is lost
        assert float(k[0] @ (rows.t() @ rows) @ k[0]) >= float((k[0] @ k[0]) ** 2) * (1 - 1e-4)
        torch.testing.assert_close(spread.updates[name].v, plain.updates[name].v)  # the edit itself is the same


@pytest.mark.parametrize("field", ["memit_keep", "alphaedit_keep"])
def test_negative_keep_weight_is_refused_when_the_config_is_made_or_loaded(field):
    with pytest.raises(ValueError, match=field):
        LocateConfig(**{field: -1.0})
    with pytest.raises(ValueError, match=field):
        LocateConfig.from_dict({field: -0.5})


def test_alphaedit_keeps_earlier_edits_and_preserved_keys_better_than_memit(setup, facts):
    """The null-space update barely moves the layer's output on the statistics' dominant directions."""
    model, tok, stack, stats = setup
    layer_target = out_proj_targets(model, [2])[0]
    keys = torch.linalg.eigh(stats.moments[2].double())[1][:, -8:].float().t()  # (8, d_in) dominant directions
    moved = {}
    for method in ("memit", "alphaedit"):
        editor = LocateEditor(method, stack, stats, config(d_in(stack)))
        upd = editor.compute_delta(model, tok, [request(facts[3], 3)]).updates[layer_target.name]
        moved[method] = float((keys @ upd.dense().t()).norm() / upd.dense().norm())
    assert moved["alphaedit"] < 0.2 * moved["memit"], moved


def test_subject_is_required_and_must_occur(setup):
    model, tok, stack, stats = setup
    editor = LocateEditor("rome", stack, stats, config())
    with pytest.raises(SubjectError, match="needs the subject"):
        editor.compute_delta(model, tok, [EditRequest("The capital of Norway is", "Bergen")])
    with pytest.raises(SubjectError, match="does not occur"):
        editor.compute_delta(model, tok, [EditRequest("The capital of Norway is", "Bergen", "Sweden")])


def test_stats_roundtrip_fingerprint_and_projector(setup, tmp_path):
    model, _, _, stats = setup
    assert stats.tokens > 0 and stats.layers == LAYERS
    c = stats.moments[1]
    assert torch.allclose(c, c.t()) and float(torch.linalg.eigvalsh(c.double()).min()) > -1e-6  # PSD
    path = stats.save(tmp_path / "keystats.safetensors", dtype=torch.float32)
    again = KeyStats.load(path, stats_fingerprint(model, LAYERS))
    assert all(torch.equal(again.moments[layer], stats.moments[layer]) for layer in LAYERS)
    with pytest.raises(StatsError, match="another model"):
        KeyStats.load(path, "0" * 64)
    p = null_space_projector(c, 10)
    assert torch.allclose(p @ p, p, atol=1e-5) and round(float(p.trace())) == 10
    with pytest.raises(StatsError, match="mend stats"):
        KeyStats.load(tmp_path / "missing.safetensors")


def test_editor_refuses_layers_without_statistics(setup):
    _, _, stack, stats = setup
    cfg = config()
    cfg.memit_layers = [0, 1]
    with pytest.raises(ValueError, match="no layers"):
        LocateEditor("memit", stack, stats, cfg)


def test_settings_name_what_decides_the_deltas(setup):
    _, _, stack, stats = setup
    memit = LocateEditor("memit", stack, stats, config(d_in(stack))).settings()
    assert memit["method"] == "memit" and memit["stats"]["tokens"] == stats.tokens
    assert LocateEditor("rome", stack, stats, config(d_in(stack))).settings()["method"] == "rome"
    cfg = config(d_in(stack))
    cfg.value.steps += 1
    assert LocateEditor("memit", stack, stats, cfg).settings()["config"]["value"]["steps"] == \
        memit["config"]["value"]["steps"] + 1
    stats.corpus = "other text"
    assert LocateEditor("memit", stack, stats, config(d_in(stack))).settings()["stats"]["corpus"] == "other text"


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_same_fact_corrected_twice_later_wins_and_rollback_restores_the_earlier(setup, facts, method):
    model, tok, stack, stats = setup
    editor = LocateEditor(method, stack, stats, config(d_in(stack)))
    first, second = request(facts[0], 0), request(facts[0], 1)  # same prompt and subject, two targets

    def top1() -> list[float]:
        return [s.token_acc for s in score_targets(model, tok, [first.prompt] * 2, [first.target, second.target])]

    stack.apply("first", editor.compute_delta(model, tok, [first]))
    assert top1() == [1.0, 0.0]
    stack.apply("second", editor.compute_delta(model, tok, [second]))  # AlphaEdit protects `first`'s key
    assert top1() == [0.0, 1.0]  # ... and still the later correction wins
    stack.revert("second")
    assert top1() == [1.0, 0.0]  # the earlier correction, not the base answer


def test_statistics_and_earlier_keys_sit_on_the_models_device(setup, facts, monkeypatch):
    """The statistics load on the CPU, the keys of an edit are computed on the model's device, and a
    replayed delta's keys come back on the CPU: everything a solve combines must be on the model's
    device (on CUDA `mend check-gpu` found them mixed). No second device here, so the model's device
    is reported as 'meta' once the edits are made."""
    import editor_core.methods.locate as locate_module

    model, tok, stack, stats = setup
    editor = LocateEditor("alphaedit", stack, stats, config(d_in(stack)))
    stack.apply("A", editor.compute_delta(model, tok, [request(facts[0])]))  # keys on the CPU, as replayed
    monkeypatch.setattr(locate_module, "device_of", lambda m: torch.device("meta"))
    name = editor.targets[0].name
    assert editor.earlier_keys(name).device.type == "meta"
    for method in ("rome", "memit", "alphaedit"):
        ed = LocateEditor(method, stack, stats, keeping(method, 1.0, d_in(stack)) if method != "rome"
                          else config(d_in(stack)))
        held = [*ed._moments.values(), *ed._c_inv.values(), *ed._null_basis.values()]
        assert len(held) >= len(ed.targets) and {t.device.type for t in held} == {"meta"}
    assert ed.earlier_gram(name).device.type == "meta"


def test_grouped_alphaedit_writes_each_fact_into_its_subjects_layer_group(setup, facts):
    model, tok, stack, stats = setup
    cfg = config(d_in(stack))
    cfg.alphaedit_groups = 2  # layers [1, 2] dealt into groups [1] and [2]
    editor = LocateEditor("alphaedit", stack, stats, cfg)
    by_group = {}
    for f in facts:
        by_group.setdefault(group_of(f["subject"], 2), f)
    assert set(by_group) == {0, 1}, "the fixture's subjects should fall into both groups"
    assert group_of(f"  {by_group[0]['subject'].upper()} ", 2) == 0  # case and spaces do not move a subject
    names = [t.name for t in editor.targets]
    reqs = []
    for g, fact in sorted(by_group.items()):
        req = request(fact, g)
        reqs.append(req)
        delta = editor.compute_delta(model, tok, [req])
        assert set(delta.updates) == {names[g]} and set(delta.keys) == {names[g]}
        stack.apply(f"g{g}", delta)
        assert score_targets(model, tok, [req.prompt], [req.target])[0].token_acc == 1.0
        stack.revert(f"g{g}")
    both = editor.compute_delta(model, tok, reqs)  # one call with a fact for each group: both layers, rank one each
    assert set(both.updates) == set(names) and all(u.rank == 1 for u in both.updates.values())
    stack.apply("both", both)
    assert all(s.token_acc == 1.0 for s in score_targets(model, tok, [r.prompt for r in reqs], [r.target for r in reqs]))


def test_alphaedit_groups_must_fit_the_layers(setup):
    _, _, stack, stats = setup
    cfg = config(d_in(stack))
    cfg.alphaedit_groups = 3
    with pytest.raises(ValueError, match="alphaedit_groups"):
        LocateEditor("alphaedit", stack, stats, cfg)


def test_config_saved_before_a_default_changed_is_read_as_it_was_made(tmp_path):
    """A locate_config.json without memit_keep / value.optimizer was written when MEMIT had no keep term
    and the value search was Adam; a new config gets the current defaults, and saving keeps them."""
    old = LocateConfig.from_dict({"memit_lambda": 15.0, "value": {"steps": 25, "lr": 0.5}})
    assert old.memit_keep == 0.0 and old.value.optimizer == "adam" and old.value.steps == 25
    new = LocateConfig()
    assert new.memit_keep > 0 and new.value.optimizer == "ngd"
    new.save(tmp_path)
    again = LocateConfig.load(tmp_path)
    assert again.memit_keep == new.memit_keep and again.value.optimizer == "ngd"


def test_key_refresh_reads_earlier_facts_keys_on_the_weights_of_the_active_head(setup, facts):
    """key_refresh=2: with A and B active, the keys kept for A are A's keys on today's weights (at the
    lowest layer still the recorded ones; above it moved by B); an edit C after them is taken off for
    that reading (the head's weights, not C's), and rolling B back reads them again for the new head."""
    model, tok, stack, stats = setup
    cfg = keeping("memit", 1.0, d_in(stack))
    cfg.key_refresh = 2
    editor = LocateEditor("memit", stack, stats, cfg)
    req_a = request(facts[0])
    stack.apply("A", editor.compute_delta(model, tok, [req_a]))
    stack.apply("B", editor.compute_delta(model, tok, [request(facts[1], 1)]))
    low, high = editor.targets[0], editor.targets[-1]
    head, fresh = editor.refreshed_keys(high.name)
    assert head == ("A", "B") and set(fresh) == {"A", "B"}
    now = {t.name: keys_and_states(model, tok, [req_a], t, high.block, cfg.value.prefixes)[0] for t in editor.targets}
    recorded = stack.delta_of("A").keys
    torch.testing.assert_close(editor.refreshed_keys(low.name)[1]["A"], recorded[low.name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fresh["A"], now[high.name], rtol=1e-4, atol=1e-5)
    moved = float((fresh["A"] - recorded[high.name]).norm())
    noise = float((fresh["A"] - now[high.name]).norm())
    assert moved > 100 * noise, (moved, noise)  # B moved A's key up there, far beyond reading's rounding

    stack.apply("C", editor.compute_delta(model, tok, [request(facts[2], 2)]))
    editor._refreshed = ((), {})  # as after a restart: read again, with C taken off by hooks
    head, again = editor.refreshed_keys(high.name)
    assert head == ("A", "B")
    torch.testing.assert_close(again["A"], fresh["A"], rtol=1e-4, atol=1e-4)
    stack.revert("B")
    head, after = editor.refreshed_keys(high.name)
    assert head == ("A", "C") and set(after) == {"A", "C"}


def test_key_refresh_must_be_a_whole_number():
    with pytest.raises(ValueError, match="key_refresh"):
        LocateConfig(key_refresh=-1)


def test_context_keys_journal_the_prompt_tokens_before_the_subjects_last(setup, facts):
    """keep_context_keys: the delta keeps, after the fact's key, one row per prompt token before the
    subject's last one (what it attends to); the edit itself is unchanged, and later edits are held off
    those rows too (they enter the earlier edits' Gram matrix)."""
    from editor_core.batching import prompt_ids_and_subject

    model, tok, stack, stats = setup
    req = request(facts[0])
    plain = LocateEditor("memit", stack, stats, config(d_in(stack))).compute_delta(model, tok, [req])
    cfg = config(d_in(stack))
    cfg.keep_context_keys = True
    editor = LocateEditor("memit", stack, stats, cfg)
    ctx = editor.compute_delta(model, tok, [req])
    ids, flags = prompt_ids_and_subject(tok, req.prompt, req.subject)
    before = max(i for i, f in enumerate(flags) if f)  # tokens before the subject's last
    assert before >= 1
    for name, k in plain.keys.items():
        assert ctx.keys[name].shape == (1 + before, k.shape[1])
        torch.testing.assert_close(ctx.keys[name][:1], k)
        torch.testing.assert_close(ctx.updates[name].v, plain.updates[name].v)
    stack.apply("A", ctx)
    name = editor.targets[0].name
    torch.testing.assert_close(editor.earlier_gram(name), ctx.keys[name].t() @ ctx.keys[name])
    stack.revert("A")
    with pytest.raises(ValueError, match="keep_context_keys"):
        LocateConfig(key_refresh=5, keep_context_keys=True)


def test_refit_rewrites_the_stack_to_the_joint_solve_of_the_facts_own_updates(setup, facts):
    """With refit_every 2, the second edit also carries the rows that take the two facts' summed update to
    refit(): the stack then sums to that (rank uncapped, fp32 rounding), the facts still take, a third
    edit does not refit, and rollback and replay stay bit-exact."""
    from editor_core.methods.locate import refit

    model, tok, stack, stats = setup
    cfg = config(d_in(stack))
    cfg.memit_keep, cfg.refit_every, cfg.refit_lambda, cfg.refit_rank = 1.0, 2, 1.0, 10_000
    editor = LocateEditor("memit", stack, stats, cfg)
    base = stack.sha256()
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in stack.targets}
    reqs = [request(facts[i], i) for i in range(3)]
    a = editor.compute_delta(model, tok, reqs[:1])
    assert "fact_rows" not in a.meta and all(u.rank == 1 for u in a.updates.values())
    stack.apply("A", a)
    b = editor.compute_delta(model, tok, reqs[1:2])
    assert b.meta["fact_rows"] == "1" and all(u.rank > 1 for u in b.updates.values())
    stack.apply("B", b)
    for t in editor.targets:
        n = t.name
        facts_sum = a.updates[n].dense().double() + (b.updates[n].u[:1].t() @ b.updates[n].v[:1]).double()
        keys = torch.cat([a.keys[n], b.keys[n]]).double()
        want = refit(facts_sum, keys.t() @ keys, editor._moments[n].double(), 1.0)
        got = (model.get_submodule(n).weight.detach() - weights[n]).double()
        got = got if got.shape == want.shape else got.t()  # gpt2's Conv1D stores (d_in, d_out)
        assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max())), n
        assert float((want - facts_sum).norm()) > 1e-3 * float(facts_sum.norm())  # the refit did change it
    hits = score_targets(model, tok, [r.prompt for r in reqs[:2]], [r.target for r in reqs[:2]])
    assert all(s.token_acc == 1.0 for s in hits)
    c = editor.compute_delta(model, tok, reqs[2:])
    assert "fact_rows" not in c.meta  # three active edits: not a multiple of 2
    live = stack.sha256()
    stack.reset()
    assert stack.sha256() == base
    twin = EditStack(model, list(stack.targets.values()))
    twin.rebuild([("A", EditDelta.from_bytes(a.to_bytes())), ("B", EditDelta.from_bytes(b.to_bytes()))])
    assert twin.sha256() == live


def test_refit_settings_are_checked():
    with pytest.raises(ValueError, match="refit_every"):
        LocateConfig(refit_every=-1)
    with pytest.raises(ValueError, match="refit_lambda"):
        LocateConfig(refit_lambda=0.0)


def test_refit_solves_its_normal_equation_and_keeps_keys_when_statistics_weigh_little():
    from editor_core.methods.locate import refit

    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 8, generator=g, dtype=torch.float64)  # (d_out, d_in)
    k = torch.randn(3, 8, generator=g, dtype=torch.float64)  # three facts' keys
    x = torch.randn(8, 8, generator=g, dtype=torch.float64)
    c = x @ x.t() / 8 + 0.1 * torch.eye(8, dtype=torch.float64)  # SPD statistics
    gram = k.t() @ k
    for lam in (0.01, 1.0, 100.0):
        fitted = refit(a, gram, c, lam)
        torch.testing.assert_close((fitted - a) @ gram + lam * fitted @ c, torch.zeros(5, 8, dtype=torch.float64))
    near = refit(a, gram, c, 1e-6)
    torch.testing.assert_close(near @ k.t(), a @ k.t(), rtol=1e-4, atol=1e-4)  # the keys get what A gives them
    assert float((refit(a, gram, c, 100.0) @ k.t()).norm()) < 0.5 * float((a @ k.t()).norm())  # C wins
