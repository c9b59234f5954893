"""Teacher-forced batches: prompt tokens followed by target tokens, loss only on the target.

Prompt and target are tokenized separately and concatenated, so the target's token ids are exactly
those of ``" " + target`` wherever it is placed, and the boundary never merges into the prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class TokenBatch:
    """Right-padded ids with labels set only on target tokens."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE outside target tokens; labels[t] is predicted at t-1
    # ((B, T + 1) for a batch without its last input column: see without_last_input)
    key_mask: torch.Tensor | None = None  # (B, T) bool: tokens whose gradient factors key an edit

    def to(self, device: torch.device | str) -> TokenBatch:
        key = self.key_mask.to(device) if self.key_mask is not None else None
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), key)

    @property
    def factor_mask(self) -> torch.Tensor:
        """(B, T) bool: the tokens whose (x, delta) feed an edit: the key tokens, else every real token."""
        return self.key_mask if self.key_mask is not None else self.attention_mask.bool()

    @property
    def target_mask(self) -> torch.Tensor:
        """(B, T-1) bool: positions whose next-token prediction is a target token."""
        return self.labels[:, 1:] != IGNORE


def target_ids(tokenizer, target: str) -> list[int]:
    """Token ids of a target as it follows a prompt (with its leading space)."""
    text = target if target.startswith(" ") else " " + target
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt, with the model's BOS when it uses one."""
    return prompt_ids_and_subject(tokenizer, prompt, None)[0]


def prompt_ids_and_subject(tokenizer, prompt: str, subject: str | None) -> tuple[list[int], list[bool]]:
    """Token ids of a prompt (with the model's BOS when it uses one) and which tokens spell ``subject``.

    The flags are all False when no subject is given or it does not occur in the prompt.
    """
    text = prompt.rstrip(" ")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=subject is not None)
    ids = list(enc["input_ids"])
    flags = [False] * len(ids)
    start = text.find(subject) if subject else -1
    if start >= 0:
        end = start + len(subject)
        flags = [s < end and e > start for s, e in enc["offset_mapping"]]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False):
        ids, flags = [bos] + ids, [False] + flags
    return ids, flags


def pad_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS, else 0."""
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if cand is not None:
            return int(cand)
    return 0


def right_pad(rows: list[list[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows right-padded into ids (B, T) and attention mask (B, T)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


# What one more forward costs, counted in padded positions: every weight is read once per forward
# whatever its rows. For SmolLM2-135M on one CPU core a forward of 896 positions took 2.1 s on a quiet
# machine (4.1-4.5 s beside other jobs), and reading its 0.5 GB of fp32 weights takes about 0.05 s:
# 10-20 positions' work.
FORWARD_OVERHEAD_POSITIONS = 16


def length_groups(lengths: list[int], overhead: int = FORWARD_OVERHEAD_POSITIONS) -> list[list[int]]:
    """Row indices grouped by length so that right-padded forwards do the least work.

    Rows sorted by length are cut into contiguous groups minimising ``sum(rows * longest) + overhead
    * groups`` (exact, by dynamic programming over the cut points: O(n^2) for n rows). The 64 shipped
    canaries padded as one batch are 896 positions for 653 tokens.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: least cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):  # group = sorted rows i..j-1, padded to the longest (the last)
            cost = best[i] + (j - i) * longest + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def build_batch(
    tokenizer,
    prompts: list[str],
    targets: list[str],
    max_len: int = 128,
    subjects: list[str | None] | None = None,
) -> TokenBatch:
    """Batch ``prompt + " " + target`` pairs; prompts are truncated from the left to fit ``max_len``.

    With ``subjects``, ``key_mask`` marks each prompt's subject tokens; a row whose subject is missing
    or not found in its prompt falls back to all of its real tokens.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if subjects is not None and len(subjects) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(subjects)} subjects")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    rows, labels, keys = [], [], []
    for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        t_ids = target_ids(tokenizer, target)[: max_len - 1]
        p_ids, flags = prompt_ids_and_subject(tokenizer, prompt, subjects[i] if subjects else None)
        keep = max_len - len(t_ids)
        p_ids, flags = p_ids[-keep:], flags[-keep:]
        rows.append(p_ids + t_ids)
        labels.append([IGNORE] * len(p_ids) + t_ids)
        keys.append(flags + [False] * len(t_ids) if any(flags) else [True] * (len(p_ids) + len(t_ids)))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(r)] = 1
    key_mask = None
    if subjects is not None:
        key_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, k in enumerate(keys):
            key_mask[i, : len(k)] = torch.tensor(k)
    return TokenBatch(ids, mask, lab, key_mask)


def token_logprobs(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """(B, T-1) log-prob of each next token, zero where it is not a target token.

    logits: (B, T, V) from the model on ``batch.input_ids``.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    nxt = batch.labels[:, 1:].clamp(min=0)  # (B, T-1)
    picked = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return picked * batch.target_mask


def greedy_rows(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """(B,) bool: is every target token of each row the argmax next token under teacher forcing?

    logits: (B, T, V) from the model on ``batch.input_ids`` (what ``success`` asks of a prompt, read in one
    forward instead of decoding).
    """
    missed = (logits[:, :-1].argmax(-1) != batch.labels[:, 1:]) & batch.target_mask  # (B, T-1)
    return ~missed.any(-1)


def target_positions(batch: TokenBatch) -> torch.Tensor:
    """(B, T) bool, T the input's width: positions whose logits predict a target token (the last column
    of a full batch never does; a batch :func:`without_last_input` has its labels one column wider)."""
    sel = torch.zeros_like(batch.input_ids, dtype=torch.bool)  # (B, T)
    sel[:, : batch.target_mask.shape[1]] = batch.target_mask  # (B, T-1) of a full batch, (B, T) of a shorter one
    return sel


def without_last_input(batch: TokenBatch) -> TokenBatch | None:
    """``batch`` without its last input column, when no loss or edit factor reads it; else None.

    The last input token of a row only predicts what follows the target, and causal attention keeps
    every earlier position's output the same without it. So when no row's factor tokens include the
    last column (``key_mask``: each row's subject found), the forward and backward can run one column
    shorter and give the same target logits and factors. The labels keep their last column: labels[t]
    is still the token predicted at t-1, and :func:`target_positions` and :func:`target_labels` are
    unchanged.
    """
    if batch.key_mask is None or batch.input_ids.shape[1] < 2 or bool(batch.key_mask[:, -1].any()):
        return None
    return TokenBatch(batch.input_ids[:, :-1], batch.attention_mask[:, :-1], batch.labels, batch.key_mask[:, :-1])


def target_labels(batch: TokenBatch) -> torch.Tensor:
    """(N,) the target tokens, row-major like logits taken at :func:`target_positions`."""
    return batch.labels[:, 1:][batch.target_mask]


def selected_target_nll(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Scalar mean target NLL from logits (N, V) taken at :func:`target_positions` only."""
    return torch.nn.functional.cross_entropy(logits.float(), target_labels(batch))


def per_request_target_nll(request_of_row: torch.Tensor, weight: torch.Tensor | None = None
                           ) -> Callable[[torch.Tensor, TokenBatch], torch.Tensor]:
    """A loss like :func:`selected_target_nll` that sums, over requests, each request's mean target NLL.

    ``request_of_row`` (B,) is the request each batch row belongs to. With one request it is the batch
    mean; with many, each request's gradient is what it would be edited alone, where the batch mean
    would shrink it by the number of facts (and an editor net reads its input's scale). ``weight`` (n,)
    multiplies each request's term (0: that request gives no gradient).
    """
    def loss(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        per_request = per_request_mean_nll(logits, batch, request_of_row)  # (n,)
        return (per_request if weight is None else per_request * weight.to(per_request)).sum()
    return loss


def per_request_mean_nll(logits: torch.Tensor, batch: TokenBatch, request_of_row: torch.Tensor) -> torch.Tensor:
    """(n,) each request's mean target NLL, from logits (N, V) at :func:`target_positions`."""
    nll = torch.nn.functional.cross_entropy(logits.float(), target_labels(batch), reduction="none")  # (N,)
    req = label_requests(batch, request_of_row).to(nll.device)  # (N,) request of each target token
    n = int(request_of_row.max()) + 1
    tokens = torch.bincount(req, minlength=n).clamp(min=1).to(nll.dtype)  # (n,)
    return torch.zeros(n, dtype=nll.dtype, device=nll.device).index_add(0, req, nll) / tokens


def label_requests(batch: TokenBatch, request_of_row: torch.Tensor) -> torch.Tensor:
    """(N,) the request of each target token, row-major like :func:`target_labels`."""
    rows = torch.arange(batch.labels.shape[0], device=batch.labels.device).unsqueeze(1).expand_as(batch.target_mask)
    return request_of_row.to(rows.device)[rows[batch.target_mask]]


def mean_target_nll(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Scalar: mean NLL over all target tokens of the batch (the edit loss)."""
    lp = token_logprobs(logits, batch)
    return -lp.sum() / batch.target_mask.sum().clamp(min=1)


def kl_pre_post(pre_logp: torch.Tensor, post_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scalar mean over real positions of KL(pre || post). pre_logp, post_logits (B, T, V); mask (B, T)."""
    post_logp = torch.log_softmax(post_logits.float(), dim=-1)  # (B, T, V)
    kl = (pre_logp.exp() * (pre_logp - post_logp)).sum(-1)  # (B, T)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1)
