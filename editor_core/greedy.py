"""Greedy continuations as token ids, and whether a model still produces them.

What a user sees of a prompt is its greedy continuation. ``greedy_ids`` decodes it once; afterwards
``still_greedy`` checks, in one teacher-forced forward pass, whether another model state would
decode exactly the same tokens (it does iff every token is the argmax given the ones before it).
"""

from __future__ import annotations

import torch
from torch import nn

from editor_core.batching import pad_id, prompt_ids, right_pad
from editor_core.logits import logits_at


@torch.no_grad()
def greedy_ids(model: nn.Module, tokenizer, prompts: list[str], lengths: list[int],
               batch_size: int = 32) -> list[list[int]]:
    """The first ``lengths[i]`` greedily decoded token ids after each prompt."""
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        rows = [prompt_ids(tokenizer, p) for p in prompts[s : s + batch_size]]
        want = lengths[s : s + batch_size]
        gen: list[list[int]] = [[] for _ in rows]
        for _ in range(max(want, default=0)):
            seqs = [r + g for r, g in zip(rows, gen, strict=True)]
            ids, mask = right_pad(seqs, pad_id(tokenizer), device)
            last = mask.sum(-1) - 1  # (B,)
            select = torch.zeros_like(mask, dtype=torch.bool)  # (B, T): each row's last real token
            select[torch.arange(len(seqs), device=device), last] = True
            nxt = logits_at(model, ids, mask, select).argmax(-1).tolist()  # (B,)
            for i, t in enumerate(nxt):
                if len(gen[i]) < want[i]:
                    gen[i].append(int(t))
        out += gen
    return out


@torch.no_grad()
def still_greedy(model: nn.Module, tokenizer, prompts: list[str], continuations: list[list[int]],
                 batch_size: int = 32) -> list[bool]:
    """For each prompt, True when greedy decoding would produce exactly ``continuations[i]``."""
    device = next(model.parameters()).device
    out: list[bool] = []
    for s in range(0, len(prompts), batch_size):
        rows = [prompt_ids(tokenizer, p) for p in prompts[s : s + batch_size]]
        conts = continuations[s : s + batch_size]
        ids, mask = right_pad([r + c for r, c in zip(rows, conts, strict=True)], pad_id(tokenizer), device)
        select = torch.zeros_like(mask, dtype=torch.bool)  # (B, T): the positions predicting c's tokens
        for i, (r, c) in enumerate(zip(rows, conts, strict=True)):
            select[i, len(r) - 1 : len(r) - 1 + len(c)] = True
        argmax = logits_at(model, ids, mask, select).argmax(-1).tolist()  # (N,) row-major
        at = 0
        for c in conts:
            out.append(argmax[at : at + len(c)] == list(c))
            at += len(c)
    return out
