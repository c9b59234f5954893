"""The value optimisation shared by ROME, MEMIT and AlphaEdit, on tiny models built from config: each
fact of a batch stops where it would alone, and a bad optimiser name is refused when the config is made. (That the normalised
descent writes a smaller value than Adam is checked on the real model, tests/slow/test_locate_default_model.py:
a random tiny model cannot be made to say a target at all.)"""

from __future__ import annotations

import pytest
import torch

from editor_core.methods.locate import LocateConfig
from editor_core.methods.values import ValueConfig, optimise_values
from editor_core.requests import EditRequest

LAYER = 2  # of 4 blocks


def value_config(**changes) -> ValueConfig:
    base = dict(steps=60, optimizer="ngd", step_size=0.25, clamp_norm=4.0, kl_weight=0.0625, weight_decay=0.01,
                stop_nll=0.05, prefixes=("", "Note: "))
    return ValueConfig(**(base | changes))


def requests(facts, n: int) -> list[EditRequest]:
    targets = ("Toyota", "Honda", "Apple")
    return [EditRequest(f"About {f['subject']}", targets[i % 3], f["subject"]) for i, f in enumerate(facts[:n])]


def test_each_fact_of_a_batch_stops_where_it_would_alone(tiny_model, tiny_tokenizer, facts):
    reqs = requests(facts, 3)
    # a random tiny model gets its targets' NLL only a little below ln(vocab): at 5.5 the three facts
    # stop after different numbers of steps (some after a few, one runs to the cap)
    cfg = value_config(stop_nll=5.5)
    steps = [optimise_values(tiny_model, tiny_tokenizer, [r], LAYER, cfg).steps for r in reqs]
    assert len(set(steps)) > 1, steps
    together = optimise_values(tiny_model, tiny_tokenizer, reqs, LAYER, cfg)
    for i, r in enumerate(reqs):
        alone = optimise_values(tiny_model, tiny_tokenizer, [r], LAYER, cfg)
        torch.testing.assert_close(together.z[i], alone.z[0], atol=1e-4, rtol=1e-4)


def test_unknown_optimizer_is_refused_when_the_config_is_made_or_loaded():
    with pytest.raises(ValueError, match="optimizer"):
        value_config(optimizer="sgd")
    with pytest.raises(ValueError, match="optimizer"):
        LocateConfig.from_dict({"value": {"optimizer": "sgd"}})


def test_the_cut_tail_gives_the_same_objective_and_gradient(tiny_model, tiny_tokenizer, facts):
    """The value search runs only the positions from each subject on; the objective and its gradient are
    those of running every position."""
    from editor_core.methods.values import ValueProblem, frozen

    problem = ValueProblem(tiny_model, tiny_tokenizer, requests(facts, 3), LAYER, value_config())
    assert problem.split is not None
    delta = torch.randn(problem.h.shape, generator=torch.Generator().manual_seed(0)) * problem.h_norm
    out = []
    for split in (problem.split, None):
        problem.split = split
        d = delta.clone().requires_grad_(True)
        with frozen(tiny_model):
            ev = problem.evaluate(d)
            (grad,) = torch.autograd.grad(ev.loss, [d])
        out.append((ev.loss.detach(), ev.nll.detach(), ev.hit, grad))
    (loss_s, nll_s, hit_s, g_s), (loss_f, nll_f, hit_f, g_f) = out
    torch.testing.assert_close(loss_s, loss_f, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(nll_s, nll_f, atol=1e-5, rtol=1e-5)
    assert torch.equal(hit_s, hit_f)
    torch.testing.assert_close(g_s, g_f, atol=1e-5, rtol=1e-4)


def test_a_model_without_a_cacheable_attention_runs_every_position(tiny_tokenizer, facts, tmp_path, caplog):
    """GPT-Neo's blocks carry no cache index: the cut is not taken, the search still runs, and says why."""
    from editor_core.methods.values import ValueProblem
    from tests.tiny_families import save_tiny_model

    model = save_tiny_model("gpt_neo", tiny_tokenizer, tmp_path / "neo")
    with caplog.at_level("WARNING"):
        problem = ValueProblem(model, tiny_tokenizer, requests(facts, 2), LAYER, value_config())
    assert problem.split is None
    assert "runs every position" in caplog.text
    assert optimise_values(model, tiny_tokenizer, requests(facts, 2), LAYER, value_config(steps=3)).steps == 3


def test_rows_longer_than_a_sliding_window_are_not_cut(tiny_llama, tiny_tokenizer, facts):
    """A prepared mask would let the cut tail attend past the window: such rows run every position."""
    from editor_core.methods.values import ValueProblem

    tiny_llama.config.sliding_window = 4  # shorter than every row here
    assert ValueProblem(tiny_llama, tiny_tokenizer, requests(facts, 2), LAYER, value_config()).split is None
    tiny_llama.config.sliding_window = 4096
    assert ValueProblem(tiny_llama, tiny_tokenizer, requests(facts, 2), LAYER, value_config()).split is not None


@pytest.mark.parametrize("blocks", [[1, 2], [1, 3]])  # stops after block 2; runs to the last block
def test_a_key_reader_reads_what_subject_keys_reads_as_the_weights_change(tiny_model, tiny_tokenizer, facts, blocks):
    from editor_core.methods.values import SubjectKeyReader, subject_keys
    from editor_core.targets import resolve_targets

    targets = resolve_targets(tiny_model, blocks=blocks)
    known = [(f"About {f['subject']}", f["subject"]) for f in facts[:3]]
    prefixes = ("", "Note: ")
    reader = SubjectKeyReader(tiny_model, tiny_tokenizer, known, targets, prefixes, first=1)
    before = subject_keys(tiny_model, tiny_tokenizer, known, targets, prefixes)
    got = reader.read()
    for t in targets:
        assert got[t.name].shape == (len(known) * len(prefixes), t.d_in)
        torch.testing.assert_close(got[t.name], before[t.name], atol=1e-5, rtol=1e-4)
    # a change at block 1 (at or after the reader's first block) reaches the keys of the later targets
    first = targets[0]
    with torch.no_grad():
        tiny_model.get_submodule(first.name).weight.mul_(1.5)
    after, got = subject_keys(tiny_model, tiny_tokenizer, known, targets, prefixes), reader.read()
    last = targets[-1].name
    assert not torch.allclose(after[last], before[last])
    for t in targets:
        torch.testing.assert_close(got[t.name], after[t.name], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="after a target"):
        SubjectKeyReader(tiny_model, tiny_tokenizer, known, targets, prefixes, first=2)
