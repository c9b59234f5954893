"""EditStack: the only code that writes model weights.

Current weights are always ``W = W_base + sum of active deltas in order`` accumulated in fp32 and
cast to the model dtype. Every path (apply, revert, rebuild after a restart) produces a target's
weights by the same sequence of fp32 ``addmm`` calls over the same active list, so rolling back every
edit gives the base bit for bit and replaying a journal reproduces the live weights bit for bit.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from editor_core.delta import DeltaFormatError, EditDelta
from editor_core.fingerprint import model_fingerprint, targets_sha256
from editor_core.targets import Target, weight_param

log = logging.getLogger(__name__)


class NonFiniteEditError(ValueError):
    """Applying the edit would put inf/nan into the weights; nothing was written."""


class EditStack:
    """Snapshot of the pristine targets plus the ordered list of active deltas."""

    def __init__(self, model: nn.Module, targets: list[Target]):
        self.model = model
        self.targets = {t.name: t for t in targets}
        self.fingerprint = model_fingerprint(model, targets)
        with torch.no_grad():
            # (d_out, d_in) fp32 copies; never modified after this point.
            self._base = {t.name: self._stored_as_out_in(t).float().clone() for t in targets}
        self._acc = {n: b.clone() for n, b in self._base.items()}  # current fp32 weights
        self._active: OrderedDict[str, EditDelta] = OrderedDict()

    # ---- queries -------------------------------------------------------------------------------
    @property
    def active_ids(self) -> list[str]:
        """Ids of the applied edits, oldest first."""
        return list(self._active)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """Target name -> (d_out, d_in)."""
        return {n: t.shape for n, t in self.targets.items()}

    def sha256(self) -> str:
        """Hash of the target weights as the model holds them now."""
        return targets_sha256(self.model, list(self.targets.values()))

    def delta_of(self, edit_id: str) -> EditDelta:
        return self._active[edit_id]

    # ---- mutations -----------------------------------------------------------------------------
    def apply(self, edit_id: str, delta: EditDelta) -> None:
        """Add one edit on top of the active ones. Raises before writing anything if it cannot."""
        if edit_id in self._active:
            raise KeyError(f"edit {edit_id!r} is already applied")
        self._check(delta)
        new = {n: self._add(self._acc[n], delta, n) for n in delta.updates}
        self._commit(new)
        self._active[edit_id] = delta

    def revert(self, edit_id: str) -> None:
        """Remove one edit, rebuilding the targets it touched from the base and the others."""
        if edit_id not in self._active:
            raise KeyError(f"edit {edit_id!r} is not applied")
        remaining = [(i, d) for i, d in self._active.items() if i != edit_id]
        touched = set(self._active[edit_id].updates)
        self._commit({n: self._accumulate(n, remaining) for n in touched})
        del self._active[edit_id]

    def rebuild(self, edits: Iterable[tuple[str, EditDelta]]) -> None:
        """Replace the active set with ``edits`` (in order); each target is written once."""
        edits = list(edits)
        ids = [i for i, _ in edits]
        if len(set(ids)) != len(ids):
            raise KeyError("duplicate edit ids in rebuild")
        for _, d in edits:
            self._check(d)
        self._commit({n: self._accumulate(n, edits) for n in self.targets})
        self._active = OrderedDict(edits)

    def reset(self) -> None:
        """Revert every edit: the targets return to the base bit for bit."""
        self.rebuild([])

    @contextmanager
    def applied(self, delta: EditDelta, edit_id: str = "__scratch__") -> Iterator[None]:
        """Apply ``delta`` for the duration of a ``with`` block (evaluation, trial edits)."""
        self.apply(edit_id, delta)
        try:
            yield
        finally:
            self.revert(edit_id)

    # ---- internals -----------------------------------------------------------------------------
    def _check(self, delta: EditDelta) -> None:
        if delta.model_fingerprint != self.fingerprint:
            raise DeltaFormatError("delta was computed for a different model (fingerprint mismatch)")
        for name, upd in delta.updates.items():
            if name not in self.targets:
                raise DeltaFormatError(f"delta edits {name!r}, which is not a target of this stack")
            if upd.shape != self.targets[name].shape:
                raise DeltaFormatError(f"delta for {name!r} has shape {upd.shape}, target is "
                                       f"{self.targets[name].shape}")

    def _add(self, acc: torch.Tensor, delta: EditDelta, name: str) -> torch.Tensor:
        upd = delta.updates[name]
        u = upd.u.to(acc.device, torch.float32)  # (r, d_out)
        v = upd.v.to(acc.device, torch.float32)  # (r, d_in)
        return torch.addmm(acc, u.t(), v)  # (d_out, d_in)

    def _accumulate(self, name: str, edits: list[tuple[str, EditDelta]]) -> torch.Tensor:
        # In place: one buffer for a whole replay instead of one 3.5 MB allocation per edit. addmm_
        # runs the same kernel as the out-of-place addmm in ``apply``, so the bits agree (tested).
        acc = self._base[name].clone()
        for _, d in edits:
            upd = d.updates.get(name)
            if upd is not None:
                acc.addmm_(upd.u.to(acc.device, torch.float32).t(), upd.v.to(acc.device, torch.float32))
        return acc

    def _commit(self, new: dict[str, torch.Tensor]) -> None:
        """Cast, check finiteness of all targets, then write all of them (all or nothing)."""
        cast = {}
        for name, acc in new.items():
            dtype = weight_param(self.model, self.targets[name]).dtype
            w = acc.to(dtype)
            if not bool(torch.isfinite(w).all()):
                raise NonFiniteEditError(f"edit would make {name!r} non-finite; weights left unchanged")
            cast[name] = w
        with torch.no_grad():
            for name, w in cast.items():
                t = self.targets[name]
                weight_param(self.model, t).copy_(w.t() if t.transposed else w)
                self._acc[name] = new[name]

    def _stored_as_out_in(self, t: Target) -> torch.Tensor:
        w = weight_param(self.model, t).detach()
        return w.t() if t.transposed else w
