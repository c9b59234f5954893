"""Hand an edited model over to other software: a Hugging Face directory or a PEFT LoRA adapter.

Full weights: the caller rebuilds the model's targets with :class:`~editor_core.stack.EditStack`
(the only code that writes weights) and :func:`save_model_dir` saves the model as it is, so the
saved tensors are bit for bit the ones the service computes with.

LoRA: the active deltas of one target are ``dW = sum_i u_i^T v_i``; stacking the factors gives
``dW = U^T V`` with ``U = cat(u_i)`` ``(r, d_out)`` and ``V = cat(v_i)`` ``(r, d_in)``, which is
PEFT's ``B @ A`` with ``B = U^T`` (``lora_B.weight``), ``A = V`` (``lora_A.weight``) and a scale
``lora_alpha / r`` of 1. The rank is the sum of the edits' ranks; ``max_rank`` truncates by an SVD
of the low-rank product (computed from QR factors, never the dense matrix) and reports the
relative Frobenius error of what was dropped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from editor_core.delta import EditDelta
from editor_core.targets import Target

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoraFactors:
    """One target's adapter: ``B @ A`` is the (possibly truncated) summed update."""

    a: torch.Tensor  # (r, d_in)  lora_A.weight
    b: torch.Tensor  # (d_out, r) lora_B.weight
    exact_rank: int  # sum of the edits' ranks on this target
    rel_error: float  # ||dW - B A||_F / ||dW||_F (0.0 when not truncated)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def save_model_dir(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """Save ``model`` (weights as they are now) and ``tokenizer`` as a Hugging Face directory."""
    out = Path(out_dir)
    cfg = model.config
    # A model dequantised from GGUF keeps a quantization_config that save_pretrained refuses; its
    # weights are plain tensors by now (see editor_core.models). A live quantizer is left alone.
    if getattr(cfg, "quantization_config", None) is not None and getattr(model, "hf_quantizer", None) is None:
        del cfg.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def stacked_factors(deltas: list[EditDelta], name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(U, V)`` with ``U^T V`` the sum of the deltas on target ``name`` in order; None if untouched."""
    ups = [d.updates[name] for d in deltas if name in d.updates]
    if not ups:
        return None
    u = torch.cat([x.u.detach().float().cpu() for x in ups])  # (r, d_out)
    v = torch.cat([x.v.detach().float().cpu() for x in ups])  # (r, d_in)
    return u, v


def truncate_factors(u: torch.Tensor, v: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``max_rank`` factors of ``u^T v`` and the relative Frobenius error of the cut.

    Returns ``(b, a, rel_error)`` with ``b @ a`` the truncated product. Works in float64 on the
    QR factors: ``u^T = Qu Ru``, ``v^T = Qv Rv``, so ``u^T v = Qu (Ru Rv^T) Qv^T`` and only the small
    ``Ru Rv^T`` is decomposed.
    """
    qu, ru = torch.linalg.qr(u.double().t())  # (d_out, k1), (k1, r)
    qv, rv = torch.linalg.qr(v.double().t())  # (d_in, k2), (k2, r)
    p, s, wh = torch.linalg.svd(ru @ rv.t(), full_matrices=False)  # (k1, k), (k,), (k, k2)
    keep = min(max_rank, int(s.shape[0]))
    total = float(s.pow(2).sum().sqrt())
    dropped = float(s[keep:].pow(2).sum().sqrt())
    root = s[:keep].sqrt()  # split the singular values evenly between the two factors
    b = (qu @ p[:, :keep]) * root  # (d_out, keep)
    a = root[:, None] * (wh[:keep] @ qv.t())  # (keep, d_in)
    return b.float(), a.float(), (dropped / total if total > 0 else 0.0)


def lora_factors(deltas: list[EditDelta], targets: list[Target], max_rank: int | None = None) -> dict[str, LoraFactors]:
    """Per touched target, the LoRA factors of the summed deltas (exact, or truncated to ``max_rank``)."""
    out: dict[str, LoraFactors] = {}
    for t in targets:
        stacked = stacked_factors(deltas, t.name)
        if stacked is None:
            continue
        u, v = stacked  # (r, d_out), (r, d_in)
        exact = int(u.shape[0])
        if max_rank is None or exact <= max_rank:
            out[t.name] = LoraFactors(a=v.contiguous(), b=u.t().contiguous(), exact_rank=exact, rel_error=0.0)
        else:
            b, a, err = truncate_factors(u, v, max_rank)
            out[t.name] = LoraFactors(a=a.contiguous(), b=b.contiguous(), exact_rank=exact, rel_error=err)
    return out


def adapter_config(factors: dict[str, LoraFactors], transposed: bool, base_model: str) -> dict:
    """PEFT ``adapter_config.json`` for the factors: per-target rank, and ``alpha == rank`` everywhere.

    With ``lora_alpha == r`` globally and per target, the scale ``alpha / r`` is 1 whether a loader
    honours ``rank_pattern``/``alpha_pattern`` (PEFT) or reads only the global pair (some servers).
    """
    ranks = {name: f.rank for name, f in factors.items()}
    top = max(ranks.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": ranks,
        "alpha_pattern": dict(ranks),
        "target_modules": sorted(ranks),
        "fan_in_fan_out": transposed,  # GPT-2 Conv1D stores (d_in, d_out)
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def save_adapter(factors: dict[str, LoraFactors], transposed: bool, base_model: str, out_dir: str | Path) -> Path:
    """Write ``adapter_model.safetensors`` (fp32 factors) and ``adapter_config.json`` as PEFT names them."""
    if not factors:
        raise ValueError("no target carries an edit: the adapter would be empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, f in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = f.a  # (r, d_in)
        tensors[f"base_model.model.{name}.lora_B.weight"] = f.b  # (d_out, r)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = adapter_config(factors, transposed, base_model)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def error_table(factors: dict[str, LoraFactors]) -> str:
    """Markdown table: target, adapter rank, exact rank, relative Frobenius error."""
    rows = ["| target | rank | exact rank | relative Frobenius error |", "| --- | ---: | ---: | ---: |"]
    rows += [f"| `{n}` | {f.rank} | {f.exact_rank} | {f.rel_error:.3e} |" for n, f in sorted(factors.items())]
    return "\n".join(rows)
