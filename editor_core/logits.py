"""Logits only where they are read.

A causal LM's output layer (V x d, the largest matrix of a small model) turns every position of a
batch into a V-wide row: for 64 canary prompts of ~15 tokens and SmolLM2's 49,152-token vocabulary
that is 189 MB of fp32 logits, and as much again for their log-softmax, when a check reads four
positions per prompt. Here the model body runs as usual and the output layer runs only on the
selected positions.

The output layer is ``get_output_embeddings()`` applied to the body's last hidden state, as
:func:`editor_core.tail.tail_logits` does; a model whose forward post-processes logits (Gemma 2's
tanh soft-capping) differs there by a monotone map, which leaves argmaxes unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def logits_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              select: torch.Tensor) -> torch.Tensor:
    """(N, V) logits at the N positions where ``select`` (B, T) is true, in row-major order."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return model.get_output_embeddings()(out.last_hidden_state[select])  # (N, V)
