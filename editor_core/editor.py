"""MendEditor: gradient factors in, better-behaved low-rank weight deltas out."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from editor_core import checkpoint
from editor_core.batching import build_batch
from editor_core.config import MendConfig
from editor_core.delta import EditDelta, LowRankUpdate
from editor_core.fingerprint import model_fingerprint, weights_fingerprint
from editor_core.grads import TokenFactors, capture_factors
from editor_core.models import device_of
from editor_core.nets import MendNets
from editor_core.requests import EditRequest
from editor_core.stack import EditStack
from editor_core.targets import Target, resolve_targets

log = logging.getLogger(__name__)


class MendEditor:
    """Computes MEND edits for the targets of one model; never mutates the model."""

    method = "mend"

    def __init__(
        self, nets: MendNets, config: MendConfig, targets: list[Target], fingerprint: str, editor_id: str
    ):
        missing = [t.name for t in targets if t.name not in nets.target_names]
        if missing:
            raise ValueError(f"editor has no nets for targets {missing}")
        self.nets = nets.eval()
        self.config = config
        self.targets = targets
        self.fingerprint = fingerprint
        self.editor_id = editor_id

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def untrained(cls, stack: EditStack, config: MendConfig | None = None) -> MendEditor:
        """Identity-initialised editor: its edit is a plain gradient step of size ``init_lr``."""
        config = config or MendConfig()
        targets = _stack_targets(stack, config)
        nets = MendNets(targets, config.rank, config.n_blocks, config.init_lr).to(device_of(stack.model))
        return cls(nets, config, targets, stack.fingerprint, editor_id="untrained")

    @classmethod
    def load(cls, path: str | Path, stack: EditStack) -> MendEditor:
        """Load a trained editor for the model behind ``stack``; refuses another model's editor."""
        ckpt = checkpoint.load(path)
        targets = _stack_targets(stack, ckpt.config)
        # the editor was trained on a stack of exactly its own targets; the service's stack may cover
        # more (the locate-then-edit layers), so compare the fingerprint of the editor's targets: the
        # exact one, or the bf16-rounded one (the same checkpoint loaded in another dtype, e.g. bf16)
        trained_for = ckpt.info.get("model_fingerprint")
        mine = model_fingerprint(stack.model, targets)
        trained_weights = ckpt.info.get("weights_fingerprint")
        if trained_for and trained_for != mine and not (
                trained_weights and trained_weights == weights_fingerprint(stack.model, targets)):
            raise ValueError(
                f"editor at {path} was trained for model {trained_for[:12]}..., "
                f"this model is {mine[:12]}...; train an editor for it with `mend train`"
            )
        nets = MendNets(targets, ckpt.config.rank, ckpt.config.n_blocks, ckpt.config.init_lr)
        nets.load_state_dict(ckpt.state)
        nets.to(device_of(stack.model))  # the checkpoint loads on the CPU; the factors come from the model's device
        editor_id = ckpt.info.get("editor_id", Path(path).name)
        log.info("loaded MEND editor %s (%d targets) from %s", editor_id, len(targets), path)
        return cls(nets, ckpt.config, targets, stack.fingerprint, editor_id=editor_id)

    # ---- editing -------------------------------------------------------------------------------
    def updates_from_factors(self, factors: TokenFactors) -> dict[str, LowRankUpdate]:
        """Differentiable in the editor: dW_t = -lr_t * sum_tokens delta~ x~^T, kept as factors."""
        updates = {}
        for t in self.targets:
            x = factors.x[t.name].float()  # (N, d_in)
            delta = factors.delta[t.name].float()  # (N, d_out)
            x_t, delta_t = self.nets.transform(t.name, x, delta)
            updates[t.name] = LowRankUpdate(u=-self.nets.lr(t.name) * delta_t, v=x_t)  # (N, d_out), (N, d_in)
        return updates

    def factor_subjects(self, subjects: list[str | None]) -> list[str | None] | None:
        """Subjects to key the factors on, per ``config.factor_tokens`` (None = all tokens)."""
        return subjects if self.config.factor_tokens == "subject" else None

    def compute_delta(self, model: nn.Module, tokenizer, requests: list[EditRequest]) -> EditDelta:
        """One forward/backward on the edit prompts, then the editor nets; the model is untouched."""
        if not requests:
            raise ValueError("no edit requests")
        batch = build_batch(
            tokenizer, [r.prompt for r in requests], [r.target for r in requests], self.config.max_len,
            subjects=self.factor_subjects([r.subject for r in requests]),
        ).to(device_of(model))
        factors = capture_factors(model, self.targets, batch)  # output layer at target positions only
        with torch.no_grad():
            updates = self.updates_from_factors(factors)
        updates = {n: LowRankUpdate(u.u.detach(), u.v.detach()) for n, u in updates.items()}
        meta = {"method": self.method, "editor": self.editor_id, "n_requests": str(len(requests))}
        return EditDelta(updates, self.fingerprint, meta)


def _stack_targets(stack: EditStack, config: MendConfig) -> list[Target]:
    """The editor's own targets (its config's names, else its blocks), which the stack must cover."""
    names = list(config.targets) or [
        t.name for t in resolve_targets(stack.model, None, config.last_blocks, config.blocks or None)]
    unknown = [n for n in names if n not in stack.targets]
    if unknown:
        raise ValueError(f"editor targets {unknown} are not in the edit stack")
    return [stack.targets[n] for n in names]
