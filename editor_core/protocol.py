"""The interface every editor (MEND, FT, FT+KL) offers, so callers can swap them."""

from __future__ import annotations

from typing import Protocol

from torch import nn

from editor_core.delta import EditDelta
from editor_core.requests import EditRequest


class Editor(Protocol):
    """Computes an edit without changing the model.

    An editor is bound at construction to the model's targets and fingerprint (taken from the
    :class:`~editor_core.stack.EditStack`), and ``compute_delta`` reads the model's *current* weights,
    so an edit stacked on earlier edits is computed against them.
    """

    method: str  # "mend", "ft", "ft-kl"

    def compute_delta(self, model: nn.Module, tokenizer, requests: list[EditRequest]) -> EditDelta:
        """Factors that, added to the current target weights, make each request's target likely."""
        ...
