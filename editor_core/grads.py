"""Capture MEND's per-token gradient factors for the edited weights.

For a linear map ``y = W x`` applied at every token, ``dL/dW = sum_t delta_t x_t^T`` with ``x_t`` the
layer input and ``delta_t = dL/dy_t``. Keeping the pairs (x_t, delta_t) instead of the summed matrix
is what lets MEND transform a rank-``n_tok`` gradient with a small network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from editor_core.batching import TokenBatch, selected_target_nll, target_positions
from editor_core.targets import Target


@dataclass
class TokenFactors:
    """Per-token layer inputs and output gradients for each target (real tokens only)."""

    x: dict[str, torch.Tensor]  # name -> (N, d_in)
    delta: dict[str, torch.Tensor]  # name -> (N, d_out)
    row: torch.Tensor  # (N,) which batch row each token came from

    def gradient(self, name: str) -> torch.Tensor:
        """(d_out, d_in): the summed weight gradient these factors stand for."""
        return self.delta[name].t() @ self.x[name]


@contextmanager
def recording(model: nn.Module, targets: list[Target]) -> Iterator[dict[str, tuple]]:
    """Record (input, output) of each target module during the forward passes inside the block.

    Outputs are made to require grad (as graph leaves where nothing upstream does), so a backward
    from the loss reaches every target without building a graph through the frozen prefix.
    """
    seen: dict[str, tuple] = {}

    def make_hook(name: str):
        def hook(_module, inputs, output):
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            seen[name] = (inputs[0], output)
            return output

        return hook

    handles = [model.get_submodule(t.name).register_forward_hook(make_hook(t.name)) for t in targets]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def capture_factors(
    model: nn.Module,
    targets: list[Target],
    batch: TokenBatch,
    run: Callable[[], torch.Tensor] | None = None,
    loss_fn: Callable[[torch.Tensor, TokenBatch], torch.Tensor] = selected_target_nll,
    stop: Callable[[torch.Tensor], bool] | None = None,
) -> TokenFactors | None:
    """One forward/backward of the edit loss; returns (x, delta) for the factor tokens of ``batch``.

    ``run`` returns the logits ``loss_fn`` reads. By default the full model runs on the batch's ids
    and its output layer only at :func:`target_positions` (N, V): the (V x d) head is the largest
    matrix of a small LM and the loss reads nothing else. Pass a tail runner to start from cached
    prefix states. Model parameters get no ``.grad``. With ``stop``, the forward's logits are shown to
    it first and, when it says so, no backward runs and the result is None (a refinement loop's check
    of the edit so far is this forward).
    """
    if run is None:
        def run() -> torch.Tensor:  # (N, V)
            hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      use_cache=False).last_hidden_state  # (B, T, d)
            return model.get_output_embeddings()(hidden[target_positions(batch)])

    with torch.enable_grad(), recording(model, targets) as seen:
        logits = run()  # (N, V) by default; whatever loss_fn reads otherwise
        if stop is not None and stop(logits.detach()):
            return None
        loss = loss_fn(logits, batch)
        outputs = [seen[t.name][1] for t in targets]
        grads = torch.autograd.grad(loss, outputs)
    real = batch.factor_mask  # (B, T): key tokens (or all real tokens); padding carries no gradient
    row = torch.arange(real.shape[0], device=real.device).unsqueeze(1).expand_as(real)[real]  # (N,)
    xs, deltas = {}, {}
    for t, g in zip(targets, grads, strict=True):
        xs[t.name] = seen[t.name][0].detach()[real]  # (N, d_in)
        deltas[t.name] = g.detach()[real]  # (N, d_out)
    return TokenFactors(xs, deltas, row)
