"""Content hashes of model weights: which model a delta belongs to, and whether weights match."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from editor_core.targets import Target, weight_param


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor in its own dtype (works for bf16, which numpy lacks)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def targets_sha256(model: nn.Module, targets: list[Target]) -> str:
    """sha256 over the current stored weights of the targets, in order, as the model holds them."""
    h = hashlib.sha256()
    for t in targets:
        h.update(t.name.encode())
        h.update(tensor_bytes(weight_param(model, t)))
    return h.hexdigest()


def model_fingerprint(model: nn.Module, targets: list[Target]) -> str:
    """Identity of (architecture, target set, pristine target weights): edits only fit this model.

    Hashing the base target weights, not a model name, means two checkpoints with the same name but
    different weights never share a journal, while the same weights loaded from GGUF or safetensors do.
    """
    h = hashlib.sha256()
    cfg = model.config
    h.update(f"{cfg.model_type}:{cfg.hidden_size}:{len(targets)}".encode())
    for t in targets:
        h.update(f"{t.name}:{t.d_out}x{t.d_in}".encode())
        h.update(tensor_bytes(weight_param(model, t).float()))
    return h.hexdigest()
