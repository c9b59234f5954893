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

The guard runs after every edit, so its forward is cheap where it can be: the canaries run in
groups of similar length (:func:`editor_core.batching.length_groups`; one padded batch wastes a
quarter of its positions), and a caller that knows the lowest block any active edit touches passes
it, so that what enters that block, the same as on the unedited model, is computed once and kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from editor_core.batching import length_groups, pad_id, prompt_ids, right_pad
from editor_core.greedy import greedy_ids
from editor_core.logits import logits_at
from editor_core.tail import prefix_states, tail_logits

DEFAULT_CANARIES = Path(__file__).parent / "assets" / "canaries.json"
KEPT_PREFIX_BLOCKS = 4  # blocks whose unedited input states are kept (each ~ canary tokens x d floats)


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
        self._groups = self._batches(next(model.parameters()).device)
        # block -> per group, the (B, T, d) states entering that block on the unedited model
        self._prefix: dict[int, list[torch.Tensor]] = {}
        self.baseline = self._logprobs(model)[1]  # (n,)

    def _batches(self, device) -> list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per length group: (canary indices, ids (B, T), mask (B, T), select (B, T) = the positions
        predicting an answer token)."""
        rows = [prompt_ids(self.tokenizer, p) for p in self.prompts]
        seqs = [r + a for r, a in zip(rows, self.answers, strict=True)]
        out = []
        for group in length_groups([len(q) for q in seqs]):
            ids, mask = right_pad([seqs[i] for i in group], pad_id(self.tokenizer), device)
            select = torch.zeros_like(mask, dtype=torch.bool)
            for b, i in enumerate(group):
                select[b, len(rows[i]) - 1 : len(rows[i]) - 1 + len(self.answers[i])] = True
            out.append((group, ids, mask, select))
        return out

    def _states_entering(self, model: nn.Module, block: int) -> list[torch.Tensor]:
        """Per group, the states entering ``block``: computed on the first call and kept, which is right
        only because every caller promises that the blocks below ``block`` hold their base weights."""
        if block not in self._prefix:
            if len(self._prefix) >= KEPT_PREFIX_BLOCKS:
                del self._prefix[next(iter(self._prefix))]  # the oldest block asked for
            self._prefix[block] = [prefix_states(model, ids, mask, block) for _, ids, mask, _ in self._groups]
        return self._prefix[block]

    @torch.no_grad()
    def _logprobs(self, model: nn.Module, first_edited: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(n,) bool: greedy answer unchanged; (n,) mean token log-prob of the baseline answers."""
        n = len(self.prompts)
        same, mean_lp = torch.zeros(n, dtype=torch.bool), torch.zeros(n)
        # None or 0: nothing below the edits to skip
        states = self._states_entering(model, first_edited) if first_edited else None
        for g, (group, ids, mask, select) in enumerate(self._groups):
            if states is None:
                logits = logits_at(model, ids, mask, select)  # (N, V) row-major
            else:
                logits = tail_logits(model, first_edited, states[g], mask, select)
            logp = torch.log_softmax(logits.float(), -1)
            at = 0
            for i in group:
                tgt = torch.tensor(self.answers[i], device=logp.device)  # (len(a),)
                rows_lp = logp[at : at + len(tgt)]  # (len(a), V)
                same[i] = bool((rows_lp.argmax(-1) == tgt).all())
                mean_lp[i] = float(rows_lp.gather(-1, tgt.unsqueeze(-1)).mean())
                at += len(tgt)
        return same, mean_lp

    def measure(self, model: nn.Module, first_edited: int | None = None) -> CanaryState:
        """The canaries' answers under the model as it is now.

        ``first_edited``: the lowest block whose weights differ from the unedited model's, when the
        caller knows it (:meth:`editor_core.stack.EditStack.first_edited_block`); the blocks below it
        are then not run again. None runs the whole model.
        """
        return CanaryState(*self._logprobs(model, first_edited))

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
