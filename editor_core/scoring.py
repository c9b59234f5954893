"""Score continuations under a model: mean token log-prob and teacher-forced token accuracy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from editor_core.batching import build_batch, token_logprobs


@dataclass(frozen=True)
class TargetScore:
    """How a model rates ``target`` after ``prompt``."""

    mean_logprob: float  # mean over target tokens of log P(token | prefix)
    token_acc: float  # share of target tokens that are the argmax under teacher forcing
    argmax_ids: tuple[int, ...]  # the model's argmax at each target position


@torch.no_grad()
def score_targets(
    model: nn.Module, tokenizer, prompts: list[str], targets: list[str], batch_size: int = 32
) -> list[TargetScore]:
    """Score each (prompt, target) pair, in batches; one forward pass per batch."""
    device = next(model.parameters()).device
    out: list[TargetScore] = []
    for start in range(0, len(prompts), batch_size):
        batch = build_batch(tokenizer, prompts[start : start + batch_size], targets[start : start + batch_size])
        batch = batch.to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
        lp = token_logprobs(logits, batch)  # (B, T-1)
        mask = batch.target_mask  # (B, T-1)
        argmax = logits[:, :-1].argmax(-1)  # (B, T-1)
        hits = (argmax == batch.labels[:, 1:]) & mask
        n = mask.sum(-1).clamp(min=1)
        for i in range(lp.shape[0]):
            out.append(
                TargetScore(
                    mean_logprob=float(lp[i].sum() / n[i]),
                    token_acc=float(hits[i].sum() / n[i]),
                    argmax_ids=tuple(argmax[i][mask[i]].tolist()),
                )
            )
    return out


def target_probability(score: TargetScore) -> float:
    """exp(mean token log-prob): the per-token geometric-mean probability of the target."""
    return float(torch.tensor(score.mean_logprob).exp())
