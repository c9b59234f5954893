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
