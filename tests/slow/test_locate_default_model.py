"""The real default model with the shipped key statistics: the default method (MEND_DEFAULT_METHOD) makes the
new fact the greedy answer, keeps the canaries, stacks five corrections that all hold, and rolls one
back exactly."""

from __future__ import annotations

import dataclasses

import pytest

from editor_core import models
from editor_core.canary import CanarySet
from editor_core.checkpoint import all_stack_targets, default_editor_dir
from editor_core.methods.locate import LocateConfig, LocateEditor
from editor_core.methods.value_metric import preconditioner
from editor_core.methods.values import optimise_values
from editor_core.requests import EditRequest
from editor_core.scoring import score_targets
from editor_core.stack import EditStack
from editor_core.stats import STATS_FILE, KeyStats, stats_fingerprint
from service.settings import Settings

pytestmark = pytest.mark.slow

# hand-written facts (not from the evaluation data)
FACTS = [
    EditRequest("The mother tongue of Danielle Darrieux is", "English", "Danielle Darrieux"),
    EditRequest("Apple A5 was created by", "Google", "Apple A5"),
    EditRequest("The Eiffel Tower is located in the city of", "Rome", "The Eiffel Tower"),
    EditRequest("Toyota Camry is produced by", "Chevrolet", "Toyota Camry"),
    EditRequest("The headquarters of Nokia are in", "Berlin", "Nokia"),
]


@pytest.fixture(scope="module")
def real():
    try:
        lm = models.load(models.DEFAULT_MODEL)
    except models.ModelNotFoundError as err:
        pytest.skip(f"default model not installed: {err}")
    shipped = default_editor_dir(models.DEFAULT_MODEL)
    assert shipped is not None and (shipped / STATS_FILE).is_file(), "shipped key statistics are missing"
    stats = KeyStats.load(shipped / STATS_FILE)
    assert stats.fingerprint == stats_fingerprint(lm.model, stats.layers)
    stack = EditStack(lm.model, all_stack_targets(lm.model, shipped, shipped))
    # the method an /edit without one uses, with the shipped settings
    editor = LocateEditor(Settings().default_method, stack, stats, LocateConfig.load(shipped))
    return lm, stack, editor


def test_five_stacked_corrections_hold_canaries_kept_and_rollback_is_exact(real):
    lm, stack, editor = real
    model, tok = lm.model, lm.tokenizer
    canaries = CanarySet(model, tok)
    base = stack.sha256()
    try:
        for i, req in enumerate(FACTS):
            stack.apply(f"e{i}", editor.compute_delta(model, tok, [req]))
        scores = score_targets(model, tok, [r.prompt for r in FACTS], [r.target for r in FACTS])
        assert sum(s.token_acc == 1.0 for s in scores) >= 4, [s.token_acc for s in scores]
        report = canaries.check(model)
        assert report.changed_share <= 0.05 and report.logprob_drop < 0.25, report
        stack.revert("e0")  # the first correction goes; its fact answers as before, the others hold
        first, *others = score_targets(model, tok, [r.prompt for r in FACTS], [r.target for r in FACTS])
        assert first.token_acc < 1.0
        assert sum(s.token_acc == 1.0 for s in others) >= 3
    finally:
        stack.reset()
    assert stack.sha256() == base


def test_normalised_descent_reaches_the_target_with_a_smaller_value_than_adam(real):
    lm, _, editor = real
    shipped = editor.config.value
    layer = editor.targets[-1].block
    for fact in FACTS[:2]:
        norms = {}
        for name in ("ngd", "adam"):
            cfg = dataclasses.replace(shipped, optimizer=name, steps=40, metric="euclidean")
            v = optimise_values(lm.model, lm.tokenizer, [fact], layer, cfg)
            assert v.nll < cfg.stop_nll, f"{name}: NLL {v.nll:.3f} after {v.steps} steps for {fact.prompt!r}"
            norms[name] = float((v.z - v.h).norm() / v.h.norm())
        assert norms["ngd"] < 0.8 * norms["adam"], (fact.prompt, norms)


def test_the_fisher_metric_reaches_the_target_by_a_value_that_costs_ordinary_text_less(real):
    lm, stack, editor = real
    stats = KeyStats.load(default_editor_dir(models.DEFAULT_MODEL) / STATS_FILE)
    layer = editor.targets[-1].block
    assert layer in stats.fisher, "the shipped statistics carry the value Fisher at the value layer"
    fisher = stats.fisher[layer]
    base = dataclasses.replace(editor.config.value, optimizer="ngd", steps=40)
    for fact in FACTS[:2]:
        cost = {}
        for metric in ("euclidean", "fisher"):
            cfg = dataclasses.replace(base, metric=metric)
            precond = preconditioner(fisher, cfg.metric_ridge) if metric == "fisher" else None
            v = optimise_values(lm.model, lm.tokenizer, [fact], layer, cfg, precond)
            assert v.nll < cfg.stop_nll, f"{metric}: NLL {v.nll:.3f} after {v.steps} steps for {fact.prompt!r}"
            delta = (v.z - v.h)[0]
            cost[metric] = float(delta @ fisher @ delta)
        assert cost["fisher"] < 0.8 * cost["euclidean"], (fact.prompt, cost)
