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
    return _fingerprint(model, targets, torch.float32)


def weights_fingerprint(model: nn.Module, targets: list[Target]) -> str:
    """:func:`model_fingerprint` of the target weights rounded to bf16: the same for every load that
    rounds to the same bf16 values, so fp32 and bf16 loads of one checkpoint agree.

    :func:`model_fingerprint` hashes the weights as loaded (widened to fp32), so a checkpoint loaded
    in bf16 gets another fingerprint than the same checkpoint in fp32 whenever a weight is not
    exactly representable in bf16 (most weights of a dequantised GGUF model). Rounding an fp32 weight
    to bf16 (round to nearest even, as ``Tensor.to`` and a bf16 ``from_pretrained`` do) and rounding it
    again gives the same bits, so the fp32 load and the bf16 load hash alike. Editors and key
    statistics store this beside the exact fingerprint and are accepted by either: they are trained
    or measured on one dtype and fit the same checkpoint in the other. Nothing else uses it (journal
    namespaces and deltas stay keyed by the exact fingerprint: a delta is exact bytes for exact weights).

    An fp16 load agrees when the fp16 cast changes no weight (e.g. a checkpoint of bf16 values within
    fp16's normal range), but not in general: fp32 -> fp16 -> bf16 rounds twice (a value the fp16
    rounding moves onto a bf16 tie can round the other way), fp16 loses bits below 6.1e-5 and
    overflows above 65504. For the default model (dequantised GGUF), 25% of the MEND targets' fp32
    weights are bf16 values, bf16 loads match here, fp16 loads do not (3% of weights differ).
    Two checkpoints whose weights differ only below bf16's precision (8 significant bits) share it.
    """
    return _fingerprint(model, targets, torch.bfloat16, tag="bf16-rounded:")


def _fingerprint(model: nn.Module, targets: list[Target], dtype: torch.dtype, tag: str = "") -> str:
    h = hashlib.sha256()
    cfg = model.config
    h.update(f"{tag}{cfg.model_type}:{cfg.hidden_size}:{len(targets)}".encode())
    for t in targets:
        h.update(f"{t.name}:{t.d_out}x{t.d_in}".encode())
        h.update(tensor_bytes(weight_param(model, t).to(dtype)))
    return h.hexdigest()
