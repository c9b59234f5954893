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

The result is low rank: each target's offset is cut to its best rank-``FTConfig.rank`` approximation
(truncated SVD, ``u = (U_r S_r)^T, v = V_r^T``), and that truncated offset is the delta that is
returned, applied and journaled, so the journal holds exactly what was applied. Adam's element-wise
steps make ``D`` full rank, so the cut can lose the edit: when the truncated offsets no longer make
every target top-1, the optimisation continues from them and cuts again, at most
``FTConfig.refine_rounds`` times. Rank 16 makes an FT entry on SmolLM2's 9 MLP targets about 1 MB
instead of about 44 MB. ``rank=None`` keeps the exact offset as its identity factorisation on the
smaller side (``u = I, v = D`` or ``u = D^T, v = I``; about 1.4x the dense matrix). Targets whose
offset stays zero are omitted.
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
    rank: int | None = 16  # truncated-SVD rank of each offset in the delta; None = exact (dense-sized)
    refine_rounds: int = 2  # continue-and-cut rounds when the cut offsets are no longer top-1


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


def truncated_factors(dense: torch.Tensor, rank: int) -> LowRankUpdate:
    """Best rank-``rank`` factors of ``dense`` (d_out, d_in) by SVD: ``u^T v`` is the truncated matrix."""
    u_full, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    r = min(rank, int(s.shape[0]))
    u = (u_full[:, :r] * s[:r]).t().to(dense.dtype).contiguous()  # (r, d_out)
    v = vh[:r].to(dense.dtype).contiguous()  # (r, d_in)
    return LowRankUpdate(u=u, v=v)


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
        if self.config.rank is not None and self.config.rank < 1:
            raise ValueError("FTConfig.rank must be >= 1 (or None for exact offsets)")

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

    def optimise(self, model: nn.Module, tokenizer, requests: list[EditRequest],
                 init: dict[str, torch.Tensor] | None = None, max_steps: int | None = None) -> FTResult:
        """Run the optimisation and return the dense offsets (the model is left unchanged).

        ``init``: offsets to start from (target name -> (d_out, d_in)); zeros where absent.
        ``max_steps``: step cap of this call (default ``config.max_steps``; 0 only checks top-1)."""
        if not requests:
            raise ValueError("no edit requests")
        cfg = self.config
        device = next(model.parameters()).device
        if model.training:
            log.warning("model is in training mode: dropout makes FT noisy (call model.eval())")
        batch = build_batch(tokenizer, [r.prompt for r in requests], [r.target for r in requests], cfg.max_len)
        batch = batch.to(device)
        init = init or {}
        offsets = {
            n: (init[n].detach().float().clone().to(device) if n in init
                else torch.zeros(t.shape, dtype=torch.float32, device=device)).requires_grad_(True)  # (d_out, d_in)
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
        cap = cfg.max_steps if max_steps is None else max_steps
        for step in range(cap + 1):
            logits = self._forward(model, offsets, batch.input_ids, batch.attention_mask)  # (B, T, V)
            nll = mean_target_nll(logits, batch)
            nll_val = float(nll.detach())
            converged = all_top1(logits, batch.labels)
            if (converged and cfg.stop_at_top1) or step == cap:
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

    def _truncate(self, offsets: dict[str, torch.Tensor]) -> dict[str, LowRankUpdate]:
        """Rank-``config.rank`` factors of every non-zero offset (exact identity factors when rank is None)."""
        rank = self.config.rank
        return {n: identity_factors(d) if rank is None else truncated_factors(d, rank)
                for n, d in offsets.items() if bool(d.any())}

    def compute_delta(self, model: nn.Module, tokenizer, requests: list[EditRequest]) -> EditDelta:
        """Fine-tune offsets for ``requests`` and return them as rank-``config.rank`` factors (pure: no
        mutation). The returned factors are the offsets that were checked, to be applied as they are."""
        cfg = self.config
        res = self.optimise(model, tokenizer, requests)
        steps, rounds = res.steps, 0
        updates = self._truncate(res.offsets)
        kept = _kept_norm(res.offsets, updates)
        converged = res.converged
        if cfg.rank is not None and updates:
            last = cfg.refine_rounds if cfg.stop_at_top1 else 0  # fixed-step FT: cut once, only check it
            for r in range(last + 1):
                cut = {n: u.dense() for n, u in updates.items()}  # what would be applied
                # the cut's top-1 check; while rounds remain, the same call goes on optimising from it
                check = self.optimise(model, tokenizer, requests, init=cut, max_steps=cfg.max_steps if r < last else 0)
                converged = check.steps == 0 and check.converged
                if converged or r == last:
                    break
                rounds, steps = r + 1, steps + check.steps
                updates = self._truncate(check.offsets)
                kept = _kept_norm(check.offsets, updates)
        meta = {
            "method": self.method,
            "steps": str(steps),
            "converged": str(converged).lower(),
            "edit_nll": f"{res.edit_nll:.6g}",
            "n_requests": str(len(requests)),
        }
        if cfg.rank is not None:
            meta.update({"rank": str(cfg.rank), "refine_rounds": str(rounds), "kept_norm": f"{kept:.4g}"})
        if self.config.kl_weight > 0:
            meta["kl"] = f"{res.kl:.6g}"
        return EditDelta(updates, self.fingerprint, meta)


def _kept_norm(dense: dict[str, torch.Tensor], updates: dict[str, LowRankUpdate]) -> float:
    """Smallest ||cut|| / ||offset|| (Frobenius) over the targets: how much of each offset the cut kept."""
    shares = [float(updates[n].dense().norm()) / max(float(d.norm()), 1e-30) for n, d in dense.items() if n in updates]
    return min(shares, default=1.0)


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
