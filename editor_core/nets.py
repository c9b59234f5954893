"""MEND editor networks.

One :class:`EditorNet` per distinct (d_in, d_out) weight shape, shared by every target of that shape,
with a per-target scale and shift inside its hidden layer (MEND section 3.2). Input per token is
``concat(norm(x), norm(delta))``; the net is residual with a zero-initialised output factor, so an
untrained editor is the identity and the edit it makes is a plain (normalised) gradient step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from editor_core.targets import Target


class RunningNorm(nn.Module):
    """Per-feature standardisation with statistics updated only in training mode (Welford)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def _update(self, z: torch.Tensor) -> None:
        z = z.detach().double()  # (N, D)
        n = z.shape[0]
        batch_mean = z.mean(0)
        batch_m2 = ((z - batch_mean) ** 2).sum(0)
        total = self.count + n
        diff = batch_mean - self.mean
        self.mean += diff * n / total
        self.m2 += batch_m2 + diff**2 * self.count * n / total
        self.count.copy_(total)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, D)
        if self.training:
            self._update(z)
        if self.count < 2:  # no statistics yet: identity, so the untrained editor is a plain gradient step
            return z
        std = (self.m2 / (self.count - 1)).sqrt().to(z.dtype) + self.eps
        return (z - self.mean.to(z.dtype)) / std


class EditorNet(nn.Module):
    """Residual low-rank MLP on concat(x, delta) with per-target scale/shift: identity at init."""

    def __init__(self, d_in: int, d_out: int, n_targets: int, rank: int, n_blocks: int = 1):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        self.down = nn.ParameterList()
        self.bias = nn.ParameterList()
        self.up = nn.ParameterList()
        for _ in range(n_blocks):
            down = torch.empty(rank, dim)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            self.down.append(nn.Parameter(down))  # (rank, D)
            self.bias.append(nn.Parameter(torch.zeros(rank)))  # (rank,)
            self.up.append(nn.Parameter(torch.zeros(dim, rank)))  # (D, rank): zero => identity
        # per-target modulation of the hidden layer: h = relu(scale_t * (down z + b) + shift_t)
        self.scale = nn.Parameter(torch.ones(n_targets, n_blocks, rank))
        self.shift = nn.Parameter(torch.zeros(n_targets, n_blocks, rank))

    def forward(self, z: torch.Tensor, target_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """z: (N, d_in + d_out) -> (x_tilde (N, d_in), delta_tilde (N, d_out))."""
        for k in range(len(self.down)):
            hidden = z @ self.down[k].t() + self.bias[k]  # (N, rank)
            hidden = torch.relu(self.scale[target_index, k] * hidden + self.shift[target_index, k])
            z = z + hidden @ self.up[k].t()  # (N, D)
        return z[:, : self.d_in], z[:, self.d_in :]


def shape_key(target: Target) -> str:
    """Name of the shared net for a target's shape, e.g. ``"576x1536"`` (d_in x d_out)."""
    return f"{target.d_in}x{target.d_out}"


def norm_key(target: Target) -> str:
    """A ModuleDict-safe key for a target name."""
    return target.name.replace(".", "__")


class MendNets(nn.Module):
    """All trainable parts of a MEND editor for one model's targets."""

    def __init__(self, targets: list[Target], rank: int, n_blocks: int = 1, init_lr: float = 1e-4):
        super().__init__()
        self.target_names = [t.name for t in targets]
        by_shape: dict[str, list[Target]] = {}
        for t in targets:
            by_shape.setdefault(shape_key(t), []).append(t)
        # index of each target within the net of its shape (selects its scale/shift rows)
        self.slot = {t.name: group.index(t) for group in by_shape.values() for t in group}
        self.shape_of = {t.name: shape_key(t) for t in targets}
        self.nets = nn.ModuleDict({
            key: EditorNet(group[0].d_in, group[0].d_out, len(group), rank, n_blocks)
            for key, group in by_shape.items()
        })
        self.norms = nn.ModuleDict({norm_key(t): RunningNorm(t.d_in + t.d_out) for t in targets})
        # learned per-target edit step size, in log space (positive, scale-free optimisation)
        self.log_lr = nn.Parameter(torch.full((len(targets),), math.log(init_lr)))
        self._norm_key = {t.name: norm_key(t) for t in targets}

    def lr(self, name: str) -> torch.Tensor:
        """The positive edit step size of a target (a 0-d tensor, differentiable)."""
        return self.log_lr[self.target_names.index(name)].exp()

    def transform(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, d_in), delta: (N, d_out) -> edited factors (x~, delta~) of the same shapes."""
        z = torch.cat([x, delta], dim=-1)  # (N, d_in + d_out)
        z = self.norms[self._norm_key[name]](z)
        return self.nets[self.shape_of[name]](z, self.slot[name])

    def editor_parameters(self) -> list[nn.Parameter]:
        """Everything but the step sizes (they get their own optimizer learning rate)."""
        return [p for n, p in self.named_parameters() if n != "log_lr"]
