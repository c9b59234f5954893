"""tools.layer_damage: taking a layer's summed update out leaves that layer at its base weight, the rest as
stacked."""

from __future__ import annotations

import torch

from editor_core.delta import EditDelta, LowRankUpdate
from editor_core.methods.locate import _summed
from editor_core.stack import EditStack
from editor_core.targets import resolve_targets
from tools.layer_damage import taking_out


def test_taking_out_a_layer_restores_it_and_only_it(tiny_llama):
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama, names))
    base = {n: tiny_llama.get_submodule(n).weight.detach().clone() for n in names}
    g = torch.Generator().manual_seed(0)

    def delta() -> EditDelta:
        ups = {}
        for n in names:
            d_out, d_in = base[n].shape
            ups[n] = LowRankUpdate(0.1 * torch.randn(2, d_out, generator=g), torch.randn(2, d_in, generator=g))
        return EditDelta(ups, stack.fingerprint, {})

    deltas = [delta(), delta(), delta()]
    stack.rebuild([(f"e{i}", d) for i, d in enumerate(deltas)])
    stacked = {n: tiny_llama.get_submodule(n).weight.detach().clone() for n in names}
    summed = {n: _summed([d.updates[n] for d in deltas], "cpu").float() for n in names}
    with stack.applied(taking_out(summed, [names[0]], stack.fingerprint)):
        torch.testing.assert_close(tiny_llama.get_submodule(names[0]).weight, base[names[0]], atol=1e-5, rtol=0)
        assert torch.equal(tiny_llama.get_submodule(names[1]).weight, stacked[names[1]])
    assert torch.equal(tiny_llama.get_submodule(names[0]).weight, stacked[names[0]])  # put back afterwards


def test_a_share_takes_out_that_part_of_the_update(tiny_llama):
    name = "model.layers.0.mlp.down_proj"
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama, [name]))
    base = tiny_llama.get_submodule(name).weight.detach().clone()
    update = LowRankUpdate(torch.ones(1, base.shape[0]), torch.ones(1, base.shape[1]))
    stack.rebuild([("e0", EditDelta({name: update}, stack.fingerprint, {}))])
    with stack.applied(taking_out({name: torch.ones_like(base)}, [name], stack.fingerprint, share=0.5)):
        torch.testing.assert_close(tiny_llama.get_submodule(name).weight, base + 0.5)
