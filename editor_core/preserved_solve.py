"""Re-solve a MEND update by least squares against key statistics (MALMEN's aggregation, with C).

MEND writes ``dW = sum_i u_i x~_i^T``: one rank-one term per factor token, built from the editor's
transformed keys ``x~`` rather than the keys the layer actually sees. What the edit has to do is
change the layer's output at the edit's own keys ``K`` (n, d_in) by ``R = K dW^T`` (n, d_out); every
other key the update touches is damage. The update that does exactly that and moves the outputs of
ordinary keys (second moment ``C``) least is the ridge least-squares solution

    dW* = argmin  ||dW K^T - R^T||^2 + lam * E_k ||dW k||^2  =  R^T K (lam C + K^T K)^-1,

the normal equation MALMEN (Tan et al., ICLR 2024) solves for its hypernetwork's proposals and MEMIT
solves for its values. With Woodbury it costs one (n, n) solve against a precomputed ``(lam C)^-1``:
``(lam C + K^T K)^-1 K^T = A (I + K A)^-1`` with ``A = (lam C)^-1 K^T`` (d_in, n). Returned as exact
factors of rank n, so the journal, rollback and replay see an ordinary low-rank delta.
"""

from __future__ import annotations

import torch

from editor_core.delta import LowRankUpdate
from editor_core.stats import ridged


def preserved_inverse(moment: torch.Tensor, lam: float, ridge: float = 1e-4) -> torch.Tensor:
    """(d, d) fp32 ``(lam (C + ridge * mean(diag C) I))^-1`` for :func:`preserved_update`.

    ``moment`` is E[k k^T] (d, d); the ridge keeps a near-singular moment (keys that never vary in
    some direction) invertible, relative to its own scale.
    """
    if lam <= 0:
        raise ValueError(f"lam must be > 0, not {lam}")
    return torch.linalg.inv(lam * ridged(moment.double(), ridge)).float()  # (d, d)


def preserved_update(update: LowRankUpdate, keys: torch.Tensor, inverse: torch.Tensor,
                     owners: tuple[torch.Tensor, torch.Tensor] | None = None) -> LowRankUpdate:
    """The least-squares form of ``update`` against the statistics behind ``inverse``.

    update: dW = u^T v, u (r, d_out), v (r, d_in); keys: (n, d_in), the inputs the edit must change;
    inverse: (d_in, d_in) from :func:`preserved_inverse`. Returns factors (n, d_out), (n, d_in) of
    ``R^T K (lam C + K^T K)^-1`` with ``R = K dW^T``: the same output change at ``keys`` up to the
    ridge (each key keeps about ``s / (1 + s)`` of it, ``s = k^T (lam C)^-1 k``), far less elsewhere.

    ``owners`` = (key_owner (n,), factor_owner (r,)), the fact each key and each factor row belongs to:
    then a key's wanted change is what its *own* fact's rows do there, not what the other facts of a
    batch also do (their proposals would otherwise add up at it, and the solve would write that sum).
    """
    k = keys.float()  # (n, d_in)
    scores = k @ update.v.float().t()  # (n, r): each factor row's weight at each key
    if owners is not None:
        key_owner, factor_owner = owners
        scores = scores * (key_owner.unsqueeze(1) == factor_owner.unsqueeze(0)).to(scores.dtype)
    r = scores @ update.u.float()  # (n, d_out): the output change at each key
    a = inverse @ k.t()  # (d_in, n)
    gram = torch.eye(k.shape[0], dtype=k.dtype, device=k.device) + k @ a  # (n, n) = I + K (lam C)^-1 K^T
    x = torch.linalg.solve(gram, a.t())  # (n, d_in) = (I + K A)^-T A^T; gram is symmetric
    return LowRankUpdate(u=r.to(update.u.dtype), v=x.to(update.v.dtype))


class KeptInverse:
    """``(lam C + keep K_p^T K_p)^-1`` of one target, ``K_p`` the keys of the edits still active there.

    MEMIT's ``memit_keep`` for MEND's re-solve: the keys earlier edits were written at join the preserved
    term, so a later edit leaves their outputs where they were. The inverse is memoised by the ids of
    the edits it covers and extended by Woodbury as edits are added (fp64, a rank-m update per edit); a
    list of ids that is not an extension of the memoised one (a rollback) recomputes it from ``(lam C)^-1``.
    """

    def __init__(self, base: torch.Tensor, keep: float):
        self.base = base.double()  # (d, d) (lam C)^-1
        self.keep = keep
        self._ids: tuple[str, ...] = ()
        self._inverse = self.base

    def inverse(self, earlier: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """(d, d) fp32 inverse for the earlier edits ``[(edit id, keys (m, d)), ...]``, oldest first."""
        ids = tuple(i for i, _ in earlier)
        known = len(self._ids)
        if ids[:known] != self._ids:
            self._ids, self._inverse, known = (), self.base, 0
        new = [k for _, k in earlier[known:]]
        if new and self.keep > 0:
            k = self.keep ** 0.5 * torch.cat(new).to(self.base)  # (m, d)
            a = self._inverse @ k.t()  # (d, m)
            gram = torch.eye(k.shape[0], dtype=k.dtype, device=k.device) + k @ a  # (m, m)
            self._inverse = self._inverse - a @ torch.linalg.solve(gram, a.t())  # Woodbury
        self._ids = ids
        return self._inverse.float()
