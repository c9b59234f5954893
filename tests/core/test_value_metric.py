"""The value search's Fisher metric on tiny models built from config: the Fisher of ordinary text is a
seeded, symmetric, positive semi-definite matrix; the preconditioner steers every step of the search and
is required exactly when the config asks for it; the statistics file carries it; the editor refuses a
config that needs it when the statistics lack it, and edits with it when they have it."""

from __future__ import annotations

import pytest
import torch

from editor_core.methods.locate import LocateConfig, LocateEditor
from editor_core.methods.value_metric import collect_value_fisher, preconditioner
from editor_core.methods.values import ValueConfig, optimise_values
from editor_core.requests import EditRequest
from editor_core.scoring import score_targets
from editor_core.stack import EditStack
from editor_core.stats import KeyStats, collect_key_stats
from editor_core.targets import out_proj_targets

LAYER = 2  # of 4 blocks


def corpus(facts) -> list[str]:
    return [f"{f['prompt']} {f['ground_truth']}" for f in facts] + [f["locality_prompt"] for f in facts]


def value_config(**changes) -> ValueConfig:
    base = dict(steps=20, optimizer="ngd", step_size=0.25, clamp_norm=4.0, kl_weight=0.0625, weight_decay=0.01,
                stop_nll=0.05, prefixes=("", "Note: "))
    return ValueConfig(**(base | changes))


def request(fact) -> EditRequest:
    return EditRequest(f"About {fact['subject']}", "Toyota", fact["subject"])


def test_fisher_is_seeded_symmetric_and_positive(tiny_model, tiny_tokenizer, facts):
    fisher, seen = collect_value_fisher(tiny_model, tiny_tokenizer, corpus(facts), [LAYER], max_tokens=10_000,
                                        progress=False)
    f = fisher[LAYER]
    d = tiny_model.config.hidden_size
    assert f.shape == (d, d) and 0 < seen < 10_000  # the whole (small) corpus, every real position once
    torch.testing.assert_close(f, f.t())
    assert float(torch.linalg.eigvalsh(f.double()).min()) > -1e-6 * float(f.diagonal().mean())
    again, _ = collect_value_fisher(tiny_model, tiny_tokenizer, corpus(facts), [LAYER], progress=False)
    assert torch.equal(again[LAYER], f)  # same text, weights and seed: the same matrix
    other, _ = collect_value_fisher(tiny_model, tiny_tokenizer, corpus(facts), [LAYER], seed=1, progress=False)
    assert not torch.equal(other[LAYER], f)  # the labels are sampled: another seed, another estimate
    capped, n = collect_value_fisher(tiny_model, tiny_tokenizer, corpus(facts), [LAYER], max_tokens=10,
                                     batch_size=1, progress=False)
    assert 10 <= n < seen  # stops at the first batch that reaches the budget


def test_preconditioner_inverts_the_normalised_fisher_plus_ridge():
    a = torch.randn(6, 6)
    f = a @ a.t() * 1e-3  # small entries, as the model's are
    p = preconditioner(f, 0.3)
    target = f / f.diagonal().mean() + 0.3 * torch.eye(6)
    torch.testing.assert_close(p @ target, torch.eye(6), atol=1e-4, rtol=1e-4)


def test_every_step_follows_the_preconditioned_gradient(tiny_model, tiny_tokenizer, facts):
    req = [request(facts[0])]
    plain = optimise_values(tiny_model, tiny_tokenizer, req, LAYER, value_config())
    d = plain.z.shape[-1]
    same = optimise_values(tiny_model, tiny_tokenizer, req, LAYER, value_config(metric="fisher"), torch.eye(d))
    torch.testing.assert_close(same.z, plain.z)  # the identity metric is the Euclidean search
    e = (plain.z - plain.h)[0]
    e = e / e.norm()  # the direction the Euclidean search went
    shut = torch.eye(d) - (1 - 1e-6) * torch.outer(e, e)  # a metric in which that direction costs a million times more
    steered = optimise_values(tiny_model, tiny_tokenizer, req, LAYER, value_config(metric="fisher"), shut)
    delta = (steered.z - steered.h)[0]
    assert float(delta.norm()) > 0
    assert abs(float(delta @ e)) < 1e-3 * float(delta.norm()), "the search went where its metric forbids"


def test_the_preconditioner_is_required_exactly_when_the_config_asks_for_it(tiny_model, tiny_tokenizer, facts):
    req = [request(facts[0])]
    with pytest.raises(ValueError, match="needs a preconditioner"):
        optimise_values(tiny_model, tiny_tokenizer, req, LAYER, value_config(metric="fisher"))
    with pytest.raises(ValueError, match="takes no preconditioner"):
        optimise_values(tiny_model, tiny_tokenizer, req, LAYER, value_config(), torch.eye(tiny_model.config.hidden_size))


@pytest.mark.parametrize(("changes", "message"), [
    ({"metric": "cosine"}, "metric must be one of"),
    ({"metric": "fisher", "optimizer": "adam"}, "needs optimizer 'ngd'"),
    ({"metric_ridge": 0.0}, "metric_ridge"),
])
def test_bad_metric_settings_are_refused_when_the_config_is_made_or_loaded(changes, message):
    with pytest.raises(ValueError, match=message):
        value_config(**changes)
    with pytest.raises(ValueError, match=message):
        LocateConfig.from_dict({"value": {"optimizer": "ngd", **changes}})


def test_statistics_file_carries_the_fisher(tmp_path):
    a = torch.randn(5, 5)
    f = a @ a.t() * 1e-4
    f = (f + f.t()) / 2  # a blocked fp32 matmul need not give an exactly symmetric a a^T; the file keeps one triangle
    path = KeyStats({3: torch.eye(4)}, 10, "test", "fp", fisher={3: f}, fisher_tokens=77).save(tmp_path / "s.safetensors")
    back = KeyStats.load(path)
    torch.testing.assert_close(back.fisher[3], f, atol=0, rtol=0)  # fp32 upper triangle, read back symmetric
    assert back.fisher_tokens == 77
    assert KeyStats.load(KeyStats({3: torch.eye(4)}, 10, "t", "fp").save(tmp_path / "n.safetensors")).fisher == {}


def test_editor_needs_the_fisher_for_the_metric_and_edits_with_it(tiny_model, tiny_tokenizer, facts):
    stats = collect_key_stats(tiny_model, tiny_tokenizer, corpus(facts), [1, 2], progress=False)
    stack = EditStack(tiny_model, out_proj_targets(tiny_model, [1, 2]))
    cfg = LocateConfig(rome_layers=[2], memit_layers=[1, 2], alphaedit_layers=[1, 2], memit_lambda=1.0,
                       value=value_config(steps=30, metric="fisher"))
    with pytest.raises(ValueError, match="value Fisher at blocks \\[2\\].*mend stats"):
        LocateEditor("memit", stack, stats, cfg)
    stats.fisher, _ = collect_value_fisher(tiny_model, tiny_tokenizer, corpus(facts), [2], progress=False)
    editor = LocateEditor("memit", stack, stats, cfg)
    base = stack.sha256()
    req = request(facts[0])
    stack.apply("e1", editor.compute_delta(tiny_model, tiny_tokenizer, [req]))
    assert score_targets(tiny_model, tiny_tokenizer, [req.prompt], [req.target])[0].token_acc == 1.0
    stack.revert("e1")
    assert stack.sha256() == base
