"""What a /query does on the model: greedy generation (left padded) and candidate scoring."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import GenerationConfig

from editor_core.batching import prompt_ids
from editor_core.scoring import score_targets


@dataclass
class QueryJob:
    """One /query request as the worker sees it."""

    prompts: list[str]
    max_new_tokens: int
    candidates: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.prompts)


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def max_positions(model: nn.Module) -> int | None:
    """The model's context length when its config states one."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.no_grad()
def greedy_complete(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation ids of each prompt; prompts are left padded into one batch."""
    device = next(model.parameters()).device
    limit = max_positions(model)
    keep = None if limit is None else max(1, limit - max_new_tokens)
    rows = [prompt_ids(tokenizer, p) for p in prompts]
    rows = [r[-keep:] if keep else r for r in rows]
    pad = pad_id(tokenizer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
    )
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    new = out[:, width:].tolist()  # (B, <= max_new_tokens)
    eos = tokenizer.eos_token_id
    trimmed = []
    for seq in new:
        if eos is not None and eos in seq:
            seq = seq[: seq.index(eos)]
        trimmed.append(seq)
    return trimmed


def run_queries(model: nn.Module, tokenizer, jobs: list[QueryJob]) -> list[list[dict]]:
    """Answer a micro-batch of queries with one generate call and one scoring pass.

    Returns, per job, one result dict per prompt: ``prompt``, ``completion`` and, when the job asked
    for candidates, ``candidates`` {candidate: mean token log-prob}.
    """
    prompts = [p for job in jobs for p in job.prompts]
    longest = max(job.max_new_tokens for job in jobs)
    completions = greedy_complete(model, tokenizer, prompts, longest)
    pairs = [(p, c) for job in jobs for p in job.prompts for c in job.candidates]
    scores = score_targets(model, tokenizer, [p for p, _ in pairs], [c for _, c in pairs]) if pairs else []
    out: list[list[dict]] = []
    row = 0
    pair = 0
    for job in jobs:
        results = []
        for prompt in job.prompts:
            ids = completions[row][: job.max_new_tokens]
            result = {"prompt": prompt, "completion": tokenizer.decode(ids, skip_special_tokens=True)}
            if job.candidates:
                result["candidates"] = {}
                for cand in job.candidates:
                    result["candidates"][cand] = scores[pair].mean_logprob
                    pair += 1
            results.append(result)
            row += 1
        out.append(results)
    return out
