"""Memoised hidden states entering the first edited block, one entry per distinct text."""

from __future__ import annotations

import torch
from torch import nn

from editor_core.batching import TokenBatch
from editor_core.tail import prefix_states


class PrefixStateCache:
    """Maps a token sequence to the (T, d) hidden states entering block ``first``.

    The base model is frozen during editor training, so these states never change; computing them
    once per text leaves each training step only the edited tail to run. With ``enabled=False`` the
    states are recomputed every call (the baseline the speed-up is measured against).
    """

    def __init__(self, model: nn.Module, first: int, enabled: bool = True, dtype: torch.dtype | None = None):
        self.model, self.first, self.enabled = model, first, enabled
        self.dtype = dtype  # storage dtype (e.g. bf16 to halve memory); None keeps the model's
        self._states: dict[tuple[int, ...], torch.Tensor] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._states)

    def states(self, batch: TokenBatch) -> torch.Tensor:
        """(B, T, d) states for a right-padded batch (zeros at padding)."""
        lengths = batch.attention_mask.sum(-1).tolist()
        keys = [tuple(batch.input_ids[i, :n].tolist()) for i, n in enumerate(lengths)]
        missing = [i for i, k in enumerate(keys) if not self.enabled or k not in self._states]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            idx = torch.tensor(missing, device=batch.input_ids.device)
            width = max(lengths[i] for i in missing)
            h = prefix_states(
                self.model, batch.input_ids[idx, :width], batch.attention_mask[idx, :width], self.first
            )  # (M, width, d)
            for j, i in enumerate(missing):
                fresh[i] = h[j, : lengths[i]]
                if self.enabled:
                    stored = fresh[i].clone()
                    self._states[keys[i]] = stored.to(self.dtype) if self.dtype else stored
        d = next(iter(fresh.values())).shape[-1] if fresh else next(iter(self._states.values())).shape[-1]
        dtype = next(self.model.parameters()).dtype
        out = torch.zeros(len(keys), batch.input_ids.shape[1], d, dtype=dtype, device=batch.input_ids.device)
        for i, k in enumerate(keys):
            row = fresh[i] if i in fresh else self._states[k]
            out[i, : lengths[i]] = row.to(dtype)
        return out
