"""Run only the edited tail of a model from cached hidden states (the frozen-prefix trick).

MEND edits the last few blocks, so during training the blocks before the first edited one compute
the same thing for a text every time. ``prefix_states`` computes the hidden state entering block
``first`` once; ``tail_logits`` runs blocks ``first..`` plus the head from it. Both work for every
family in :mod:`editor_core.targets` with one mechanism: a forward pre-hook that swaps the input of a
block, and a temporary block list holding only the tail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from editor_core.targets import blocks_of, family_of


class _StopForward(Exception):
    """Raised by a hook to abandon a forward pass once the needed state is captured."""


@contextmanager
def block_input_hook(
    model: nn.Module, block: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Replace the hidden state entering ``blocks[block]`` by ``fn(hidden_state)``."""

    def pre_hook(_module, args, kwargs):
        return (fn(args[0]), *args[1:]), kwargs

    handle = blocks_of(model)[block].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def prefix_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int
) -> torch.Tensor:
    """(B, T, d) hidden states entering block ``first``; the blocks after it are never run."""
    captured: list[torch.Tensor] = []

    def grab(h: torch.Tensor) -> torch.Tensor:
        captured.append(h.detach())
        raise _StopForward

    with block_input_hook(model, first, grab):
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    return captured[0]


@contextmanager
def _only_tail(model: nn.Module, first: int) -> Iterator[None]:
    path = family_of(model).blocks
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name)
    full = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(list(full)[first:]))
    try:
        yield
    finally:
        setattr(parent, attr, full)


def tail_logits(
    model: nn.Module,
    first: int,
    states: torch.Tensor,
    attention_mask: torch.Tensor,
    select: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits from hidden states ``states`` (B, T, d) entering block ``first``.

    Returns (B, T, V), or (N, V) for the N positions where ``select`` (B, T) is true: the output
    layer (V x d, the largest matrix of a small LM) then runs only where a loss reads it.
    The embeddings run on zeros and are discarded: the first tail block's input is swapped for
    ``states``, so positional encodings (rotary or learned) are handled by the model itself.
    """
    dummy = torch.zeros_like(states)
    with _only_tail(model, first), block_input_hook(model, 0, lambda _h: states):
        if select is None:
            return model(inputs_embeds=dummy, attention_mask=attention_mask, use_cache=False).logits
        out = model.base_model(inputs_embeds=dummy, attention_mask=attention_mask, use_cache=False)
        return model.get_output_embeddings()(out.last_hidden_state[select])  # (N, V)
