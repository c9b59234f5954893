"""Canary prompts: fixed unrelated prompts whose answers an edit must leave alone.

The baseline is taken once, on the unedited model: each canary's greedy continuation (token ids)
and its mean token log-prob. :meth:`CanarySet.check` scores the model as it is now, in one batched
teacher-forced forward pass: how many canaries would no longer decode the same tokens, and how much
log-probability their baseline answers lost on average. A canary counts as *changed* when its greedy
answer differs and its baseline answer lost more than a margin (a flip between near-tied tokens is
reported as ``flipped`` but is not damage). ``mend eval`` reports these figures.

The service's guard asks two questions of a candidate edit. What did *this edit* do: given the
canaries' state just before it (:meth:`CanarySet.measure`), how many canaries does it newly change
and how much log-prob does it take from their answers (``new_changed``, ``step_logprob_drop``)?
A collapsing edit fails this at once, whatever came before. And where is the model now against the
unedited one (``changed``, ``logprob_drop``), so slow drift over many edits has a ceiling. A guard
on the cumulative figures alone would refuse every edit, good or bad, once many good ones had
drifted a few canaries (measured: 12 of 64 after 100 stacked AlphaEdit corrections).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from editor_core.batching import pad_id, prompt_ids, right_pad
from editor_core.greedy import greedy_ids
from editor_core.logits import logits_at

DEFAULT_CANARIES = Path(__file__).parent / "assets" / "canaries.json"


@dataclass(frozen=True)
class CanaryReport:
    """How the current model answers the canaries compared with the baseline."""

    n: int
    changed: int  # canaries whose greedy answer is no longer the baseline's AND whose answer lost > margin
    flipped: int  # canaries whose greedy answer differs at all (near ties included)
    logprob_drop: float  # mean over canaries of (baseline - now) mean token log-prob of the baseline answer
    changed_prompts: tuple[str, ...]
    new_changed: int = 0  # changed now but not in the ``before`` state (0 without one)
    step_logprob_drop: float = 0.0  # mean over canaries of (before - now) log-prob of the baseline answer

    @property
    def changed_share(self) -> float:
        return self.changed / self.n if self.n else 0.0

    def to_dict(self) -> dict:
        return {"canaries": self.n, "changed": self.changed, "changed_share": round(self.changed_share, 4),
                "flipped": self.flipped,
                "logprob_drop": round(self.logprob_drop, 4), "changed_prompts": list(self.changed_prompts[:8]),
                "new_changed": self.new_changed, "step_logprob_drop": round(self.step_logprob_drop, 4)}


@dataclass(frozen=True)
class CanaryState:
    """How one model state answers the canaries (the input of :meth:`CanarySet.check`)."""

    same: torch.Tensor  # (n,) bool: greedy answer is the baseline's
    logprob: torch.Tensor  # (n,) mean token log-prob of the baseline answer


def load_canary_prompts(path: str | Path | None = None) -> list[str]:
    """The shipped canary prompts (or those of a JSON file with a ``prompts`` list)."""
    doc = json.loads(Path(path or DEFAULT_CANARIES).read_text())
    prompts = doc["prompts"] if isinstance(doc, dict) else doc
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{path or DEFAULT_CANARIES}: expected a non-empty list of prompts")
    return list(prompts)


class CanarySet:
    """Baseline answers of the canary prompts, and the check of a model state against them."""

    def __init__(self, model: nn.Module, tokenizer, prompts: list[str] | None = None, n_tokens: int = 4,
                 tie_margin: float = 0.1):
        self.tokenizer = tokenizer
        # A canary whose greedy answer flips while its baseline answer loses less than this (nats per
        # token) was a near tie: measured on SmolLM2, five good stacked edits flip 4 of 64 four-token
        # answers while the answers lose 0.0003 nats/token on average. Such flips are not damage.
        self.tie_margin = tie_margin
        self.prompts = prompts if prompts is not None else load_canary_prompts()
        self.answers = greedy_ids(model, tokenizer, self.prompts, [n_tokens] * len(self.prompts))
        self.baseline = self._logprobs(model)[1]  # (n,)

    @torch.no_grad()
    def _logprobs(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(n,) bool: greedy answer unchanged; (n,) mean token log-prob of the baseline answers."""
        device = next(model.parameters()).device
        rows = [prompt_ids(self.tokenizer, p) for p in self.prompts]
        seqs = [r + a for r, a in zip(rows, self.answers, strict=True)]
        ids, mask = right_pad(seqs, pad_id(self.tokenizer), device)
        select = torch.zeros_like(mask, dtype=torch.bool)  # (n, T): the positions predicting an answer token
        for i, (r, a) in enumerate(zip(rows, self.answers, strict=True)):
            select[i, len(r) - 1 : len(r) - 1 + len(a)] = True
        logp = torch.log_softmax(logits_at(model, ids, mask, select).float(), -1)  # (N, V) row-major
        same, mean_lp, at = [], [], 0
        for a in self.answers:
            tgt = torch.tensor(a, device=logp.device)  # (len(a),)
            rows_lp = logp[at : at + len(a)]  # (len(a), V)
            same.append(bool((rows_lp.argmax(-1) == tgt).all()))
            mean_lp.append(float(rows_lp.gather(-1, tgt.unsqueeze(-1)).mean()))
            at += len(a)
        return torch.tensor(same), torch.tensor(mean_lp)

    def measure(self, model: nn.Module) -> CanaryState:
        """The canaries' answers under the model as it is now (one batched forward pass)."""
        return CanaryState(*self._logprobs(model))

    def changed_mask(self, state: CanaryState) -> torch.Tensor:
        """(n,) bool: canaries whose answer changed against the baseline (flip AND drop > tie margin)."""
        return ~state.same & ((self.baseline - state.logprob) > self.tie_margin)

    def check(self, model: nn.Module, before: CanaryState | None = None,
              now: CanaryState | None = None) -> CanaryReport:
        """Compare the model as it is now (or the state ``now``) with the baseline, and with ``before``."""
        now = now if now is not None else self.measure(model)
        drop = self.baseline - now.logprob  # (n,)
        mask = self.changed_mask(now)
        changed = tuple(p for p, c in zip(self.prompts, mask.tolist(), strict=True) if c)
        new, step = 0, 0.0
        if before is not None:
            new = int((mask & ~self.changed_mask(before)).sum())
            step = float((before.logprob - now.logprob).mean())
        return CanaryReport(len(self.prompts), len(changed), int((~now.same).sum()), float(drop.mean()), changed,
                            new, step)
