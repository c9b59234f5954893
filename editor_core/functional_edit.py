"""See a model as if low-rank deltas were applied, without writing any weight.

Forward hooks add ``x @ dW^T = (x @ v^T) @ u`` to each target's output; cost is O(rank) per token and
the graph stays differentiable in (u, v), which is how MEND training backpropagates through an edit.
Weights are only ever written by :class:`editor_core.stack.EditStack`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from editor_core.delta import LowRankUpdate


@contextmanager
def added_updates(model: nn.Module, updates: dict[str, LowRankUpdate]) -> Iterator[None]:
    """Within the block, each target's output is computed with ``W + u^T v``."""

    def make_hook(upd: LowRankUpdate):
        def hook(_module, inputs, output):
            x = inputs[0]  # (B, T, d_in)
            low = x.to(upd.v.dtype) @ upd.v.t()  # (B, T, r)
            return output + (low @ upd.u).to(output.dtype)  # (B, T, d_out)

        return hook

    handles = [model.get_submodule(name).register_forward_hook(make_hook(u)) for name, u in updates.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()

