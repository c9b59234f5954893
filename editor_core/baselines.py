"""Fine-tuning baselines with the :class:`~editor_core.protocol.Editor` interface: FT and FT+KL.

Both optimise one additive offset ``D_t`` per target (fp32, zero-initialised, (d_out, d_in)) with
Adam on the edit loss (mean NLL of the target tokens given the prompt), applied *functionally*
(``torch.func.functional_call`` with ``W + D``), so the model's weights, ``.grad`` and mode are
never touched. Optimisation stops as soon as every request's target is top-1 at every target token
under teacher forcing, or at ``max_steps``.

FT+KL adds ``kl_weight * KL(pre || post)`` of the next-token distributions at every position of a
set of *locality texts*. An :class:`EditRequest` carries no locality prompts, so the texts come from
the config: by default :data:`DEFAULT_KL_PROMPTS`, a fixed set of short, neutral, fact-shaped
sentences about unrelated entities (any list can be configured, e.g. same-relation neighbours).

The result is returned as exact factors: the offset's identity factorisation on its smaller side
(``u = I, v = D`` or ``u = D^T, v = I``), so ``u^T v == D`` exactly. Adam's element-wise steps make
``D`` full rank, so a truncated SVD would not be smaller; the price is a rank ``min(d_out, d_in)``
delta (about 1.4x the dense matrix for SmolLM2's MLP). Targets whose offset stays zero are omitted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from editor_core.batching import build_batch, kl_pre_post, mean_target_nll, pad_id, prompt_ids, right_pad
from editor_core.delta import EditDelta, LowRankUpdate
from editor_core.requests import EditRequest
from editor_core.targets import Target

log = logging.getLogger(__name__)

DEFAULT_KL_PROMPTS: tuple[str, ...] = (
    "The capital of France is Paris, and the capital of Japan is",
    "Water is made of hydrogen and",
    "The first person to walk on the Moon was",
    "My favourite colour is blue because",
    "The Eiffel Tower is located in the city of",
    "Football is a sport played by two teams of",
    "William Shakespeare wrote the play",
    "The largest planet in the Solar System is",
)


@dataclass
class FTConfig:
    """Settings of the fine-tuning baselines."""

    lr: float = 5e-4  # Adam learning rate on the offsets
    max_steps: int = 50  # optimiser step cap
    norm_constraint: float | None = None  # element-wise |D| bound (ROME's FT-L), None = unbounded
    kl_weight: float = 0.0  # > 0 makes it FT+KL
    kl_prompts: tuple[str, ...] = field(default_factory=lambda: DEFAULT_KL_PROMPTS)
    max_len: int = 128  # token cap of an edit prompt + target
    stop_at_top1: bool = True  # False: always run max_steps (ROME-style fixed-step FT)
    targets: tuple[str, ...] = ()  # names of the stack targets to fine-tune; empty = all of them


@dataclass
class FTResult:
    """The optimised dense offsets and how the optimisation went."""

    offsets: dict[str, torch.Tensor]  # target name -> (d_out, d_in) fp32
    steps: int  # optimiser steps taken
    converged: bool  # every target top-1 at every token
    edit_nll: float  # edit loss at the last evaluated step
    kl: float  # KL term at the last step that computed it (0.0 for FT)


def identity_factors(dense: torch.Tensor) -> LowRankUpdate:
    """Exact factors ``u^T v == dense`` using an identity on the smaller side (rank min(d_out, d_in))."""
    d_out, d_in = dense.shape
    eye = torch.eye(min(d_out, d_in), dtype=dense.dtype, device=dense.device)
    if d_out <= d_in:
        return LowRankUpdate(u=eye, v=dense.clone())  # (d_out, d_out), (d_out, d_in)
    return LowRankUpdate(u=dense.t().contiguous(), v=eye)  # (d_in, d_out), (d_in, d_in)


def _prompt_batch(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask of plain prompts: (B, T), (B, T)."""
    return right_pad([prompt_ids(tokenizer, p) for p in prompts], pad_id(tokenizer), device)


def all_top1(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    """True when every target token is the argmax under teacher forcing. logits (B, T, V), labels (B, T)."""
    mask = labels[:, 1:] != -100  # (B, T-1)
    hits = logits[:, :-1].argmax(-1) == labels[:, 1:]  # (B, T-1)
    return bool(hits[mask].all())


class FTEditor:
    """Fine-tuning editor (``method == "ft"``; ``"ft-kl"`` when ``config.kl_weight > 0``).

    Bound to an :class:`~editor_core.stack.EditStack` for its targets and fingerprint; it never
    applies anything itself.
    """

    def __init__(self, stack, config: FTConfig | None = None):
        self.config = config or FTConfig()  # set before the targets: config.targets picks them
        chosen = self.config.targets or tuple(stack.targets)
        unknown = [n for n in chosen if n not in stack.targets]
        if unknown:
            raise ValueError(f"FT targets {unknown} are not in the edit stack")
        self.targets: dict[str, Target] = {n: stack.targets[n] for n in chosen}
        self.fingerprint: str = stack.fingerprint
        if self.config.max_steps < 0 or self.config.lr <= 0:
            raise ValueError("FTConfig needs lr > 0 and max_steps >= 0")
        if self.config.kl_weight > 0 and not self.config.kl_prompts:
            raise ValueError("FT+KL needs at least one locality prompt (FTConfig.kl_prompts)")

    @property
    def method(self) -> str:
        return "ft-kl" if self.config.kl_weight > 0 else "ft"

    def _forward(self, model: nn.Module, offsets: dict[str, torch.Tensor], ids, mask) -> torch.Tensor:
        """Logits (B, T, V) of the model with ``W + D`` for every target, without touching the model."""
        params = {}
        for name, d in offsets.items():
            t = self.targets[name]
            w = model.get_submodule(name).weight  # stored orientation
            dd = d.t() if t.transposed else d  # (stored)
            params[f"{name}.weight"] = (w.detach().float() + dd).to(w.dtype)
        return functional_call(model, params, (), {"input_ids": ids, "attention_mask": mask}).logits

    def optimise(self, model: nn.Module, tokenizer, requests: list[EditRequest]) -> FTResult:
        """Run the optimisation and return the dense offsets (the model is left unchanged)."""
        if not requests:
            raise ValueError("no edit requests")
        cfg = self.config
        device = next(model.parameters()).device
        if model.training:
            log.warning("model is in training mode: dropout makes FT noisy (call model.eval())")
        batch = build_batch(tokenizer, [r.prompt for r in requests], [r.target for r in requests], cfg.max_len)
        batch = batch.to(device)
        offsets = {
            n: torch.zeros(t.shape, dtype=torch.float32, device=device, requires_grad=True)  # (d_out, d_in)
            for n, t in self.targets.items()
        }
        opt = torch.optim.Adam(list(offsets.values()), lr=cfg.lr)
        use_kl = cfg.kl_weight > 0
        if use_kl:
            kl_ids, kl_mask = _prompt_batch(tokenizer, list(cfg.kl_prompts), device)
            with torch.no_grad():
                pre = model(input_ids=kl_ids, attention_mask=kl_mask).logits  # (K, T, V)
                pre_logp = torch.log_softmax(pre.float(), dim=-1)  # (K, T, V)
        steps, converged, nll_val, kl_val = 0, False, float("nan"), 0.0
        for step in range(cfg.max_steps + 1):
            logits = self._forward(model, offsets, batch.input_ids, batch.attention_mask)  # (B, T, V)
            nll = mean_target_nll(logits, batch)
            nll_val = float(nll.detach())
            converged = all_top1(logits, batch.labels)
            if (converged and cfg.stop_at_top1) or step == cfg.max_steps:
                break
            loss = nll
            if use_kl:
                kl = kl_pre_post(pre_logp, self._forward(model, offsets, kl_ids, kl_mask), kl_mask)
                kl_val = float(kl.detach())
                loss = loss + cfg.kl_weight * kl
            grads = torch.autograd.grad(loss, list(offsets.values()))
            for d, g in zip(offsets.values(), grads, strict=True):
                d.grad = g
            opt.step()
            if cfg.norm_constraint is not None:
                with torch.no_grad():
                    for d in offsets.values():
                        d.clamp_(-cfg.norm_constraint, cfg.norm_constraint)
            steps += 1
        log.debug("%s: %d steps, converged=%s, nll=%.4f, kl=%.4g", self.method, steps, converged, nll_val, kl_val)
        dense = {n: d.detach() for n, d in offsets.items()}
        return FTResult(dense, steps, converged, nll_val, kl_val)

    def compute_delta(self, model: nn.Module, tokenizer, requests: list[EditRequest]) -> EditDelta:
        """Fine-tune offsets for ``requests`` and return them as exact factors (pure: no mutation)."""
        res = self.optimise(model, tokenizer, requests)
        updates = {n: identity_factors(d) for n, d in res.offsets.items() if bool(d.any())}
        meta = {
            "method": self.method,
            "steps": str(res.steps),
            "converged": str(res.converged).lower(),
            "edit_nll": f"{res.edit_nll:.6g}",
            "n_requests": str(len(requests)),
        }
        if self.config.kl_weight > 0:
            meta["kl"] = f"{res.kl:.6g}"
        return EditDelta(updates, self.fingerprint, meta)


class FTKLEditor(FTEditor):
    """FT with a KL(pre || post) locality term (``method == "ft-kl"``); kl_weight defaults to 1."""

    def __init__(self, stack, config: FTConfig | None = None):
        config = config or FTConfig(kl_weight=1.0)
        if config.kl_weight <= 0:
            raise ValueError("FTKLEditor needs config.kl_weight > 0 (use FTEditor for plain FT)")
        super().__init__(stack, config)


def make_baseline(method: str, stack, config: FTConfig | None = None) -> FTEditor:
    """``"ft"`` -> :class:`FTEditor`, ``"ft-kl"`` -> :class:`FTKLEditor`."""
    if method == "ft":
        return FTEditor(stack, config)
    if method == "ft-kl":
        return FTKLEditor(stack, config)
    raise ValueError(f"unknown baseline method {method!r}; use 'ft' or 'ft-kl'")
