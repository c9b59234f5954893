"""What locate-then-edit methods share: subject positions, keys, and the value optimisation.

For a fact (prompt with subject -> target) and an edited layer ``L``:

- the *key* at layer ``l`` is the input of that block's MLP output projection at the subject's last
  token, averaged over the prompt behind a few fixed prefixes (so the edit does not hinge on the
  exact sentence start);
- the *value* is the hidden state leaving block ``L`` at that token that makes the model say the
  target: ``z = h + delta``, with ``delta`` found by a few descent steps on the target's NLL behind
  every prefix, plus a KL term that keeps "<subject> is a" as it was, a small weight decay and a norm
  bound.

The descent is Adam (ROME's choice) or normalised gradient descent (``optimizer="ngd"``), where
each step moves ``delta`` a fixed length (``step_size * ||h||``) along the gradient. Adam moves every
coordinate by about its learning rate whatever the gradient there, so it reaches the same NLL with a
delta spread over all coordinates: measured on the default model (12 counterfact-val facts, layer 8,
NLL < 0.05 behind every prefix) Adam's ``||delta|| / ||h||`` was 0.66 after 16 steps, normalised
descent's 0.36 after 12. The
value's norm is what every edited layer must write (its residual), and what an edit leaks onto the
keys the model already uses grows with its square.

Only the blocks above ``L`` run during the optimisation: the hidden states leaving ``L`` are computed
once (they do not depend on ``delta`` except at the subject's position, where it is added).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from editor_core.batching import IGNORE, pad_id, prompt_ids_and_subject, right_pad, target_ids
from editor_core.delta import LowRankUpdate
from editor_core.requests import EditRequest
from editor_core.tail import checked_split, prefix_states, run_blocks, run_until, tail_logits
from editor_core.targets import Target

log = logging.getLogger(__name__)

# Short fixed openings the prompt is also read behind. Fixed (not sampled) so that an edit computed
# twice on the same weights gives the same bits, which replay and tests rely on.
DEFAULT_PREFIXES: tuple[str, ...] = ("", "The following is true. ", "Here is a fact: ", "I read that ",
                                     "As everyone knows, ")
KL_TEMPLATE = "{subject} is a"
OPTIMIZERS = ("ngd", "adam")
METRICS = ("euclidean", "fisher")


class SubjectError(ValueError):
    """A request has no subject, or its subject does not occur in its prompt."""


@dataclass
class ValueConfig:
    """Settings of the value optimisation (ROME/MEMIT's ``compute_z``)."""

    steps: int = 40  # descent steps at most
    # "ngd": normalised gradient descent, each step step_size * ||h|| along the gradient; "adam": ROME's
    # Adam on delta, which moves every coordinate by about lr and so writes longer values that leak more
    # (docs/LOCATE.md, "Levers tried"). A saved config without this field was made with Adam and is read as such
    # (LocateConfig.from_dict)
    optimizer: str = "ngd"
    step_size: float = 0.1  # ngd: length of one step, relative to ||h||
    lr: float = 0.5  # adam: learning rate on delta
    kl_weight: float = 0.0625  # KL(pre || post) on "<subject> is a"
    weight_decay: float = 0.5  # times ||delta||^2 / ||h||^2
    clamp_norm: float = 0.75  # ||delta|| <= clamp_norm * ||h||
    stop_nll: float = 0.05  # stop once every request's target NLL is below this and every token is top-1
    prefixes: tuple[str, ...] = DEFAULT_PREFIXES
    # what an ngd step's direction is steepest in: "euclidean", the gradient itself; "fisher", the gradient
    # times (F / mean diag F + metric_ridge I)^-1, with F the Fisher of ordinary text at the value layer
    # (methods/value_metric.py; shipped in the key statistics file), so the value reaches its target by
    # directions that what the edit leaks onto ordinary text costs less in
    metric: str = "euclidean"
    metric_ridge: float = 0.3

    def __post_init__(self) -> None:
        # refused when the config is built or loaded (locate_config.json), not at the first edit
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"ValueConfig.optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        if self.metric not in METRICS:
            raise ValueError(f"ValueConfig.metric must be one of {METRICS}, not {self.metric!r}")
        if self.metric == "fisher" and self.optimizer != "ngd":
            raise ValueError("ValueConfig.metric 'fisher' steers the normalised descent: it needs optimizer 'ngd'")
        if not self.metric_ridge > 0:
            raise ValueError(f"ValueConfig.metric_ridge must be > 0, not {self.metric_ridge}")


@dataclass
class _Row:
    ids: list[int]
    labels: list[int]
    subject_pos: int
    request: int
    kl: bool


def check_subjects(requests: list[EditRequest], method: str) -> None:
    """Every request must name a subject that occurs in its prompt (these methods key on it)."""
    for i, r in enumerate(requests):
        if not r.subject:
            raise SubjectError(f"requests[{i}].subject: method {method!r} needs the subject the fact is about "
                               "(the edit is keyed on its last token)")
        if r.subject not in r.prompt:
            raise SubjectError(f"requests[{i}].subject: {r.subject!r} does not occur in the prompt {r.prompt!r}")


def _subject_last(tokenizer, text: str, subject: str) -> tuple[list[int], int]:
    ids, flags = prompt_ids_and_subject(tokenizer, text, subject)
    if not any(flags):
        raise SubjectError(f"subject {subject!r} not found in {text!r}")
    return ids, max(i for i, f in enumerate(flags) if f)


def _rows(tokenizer, requests: list[EditRequest], prefixes: tuple[str, ...], with_kl: bool) -> list[_Row]:
    rows = []
    for i, r in enumerate(requests):
        t_ids = target_ids(tokenizer, r.target)
        for p in prefixes:
            ids, pos = _subject_last(tokenizer, p + r.prompt, r.subject)
            rows.append(_Row(ids + t_ids, [IGNORE] * len(ids) + t_ids, pos, i, kl=False))
        if with_kl:
            ids, pos = _subject_last(tokenizer, KL_TEMPLATE.format(subject=r.subject), r.subject)
            rows.append(_Row(ids, [IGNORE] * len(ids), pos, i, kl=True))
    return rows


def _first_rows(rows: list[_Row], n: int, device) -> torch.Tensor:
    """(n,) index of each request's first row: its bare prompt (the prefix "")."""
    return torch.tensor([next(b for b, r in enumerate(rows) if r.request == i) for i in range(n)], device=device)


def _pad(rows: list[_Row], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = right_pad([r.ids for r in rows], pad, device)  # (B, T), (B, T)
    labels, _ = right_pad([r.labels for r in rows], IGNORE, device)  # (B, T)
    return ids, mask, labels


@dataclass
class Values:
    """Target hidden states for each request at the output of one block."""

    z: torch.Tensor  # (n, d) wanted state leaving block ``layer`` at the subject's last token
    h: torch.Tensor  # (n, d) the state there before the edit (bare prompt)
    steps: int  # objective evaluations (tail forwards), the last one included
    nll: float  # mean target NLL at the end


@dataclass
class Evaluation:
    """The objective at one ``delta``, per request and in total."""

    loss: torch.Tensor  # () NLL sum + KL + weight decay
    nll: torch.Tensor  # (n,) mean target-token NLL per request, over every prefix
    hit: torch.Tensor  # (n,) bool: every target token is the top-1 prediction behind every prefix


class ValueProblem:
    """The value objective of a batch of requests at one layer, with the prefix states cached.

    Built once per edit (one forward of the blocks up to ``layer``); :meth:`evaluate` runs only the
    blocks above it, so each evaluation of a candidate ``delta`` (n, d) costs one tail forward.
    Used by :func:`optimise_values` (descent on delta) and by ``tools/value_probe.py`` (how far one
    gradient step gets: the question behind a one-pass, MEND-style value editor).
    """

    def __init__(self, model: nn.Module, tokenizer, requests: list[EditRequest], layer: int, cfg: ValueConfig):
        device = next(model.parameters()).device
        self.model, self.layer, self.cfg, self.n = model, layer, cfg, len(requests)
        rows = _rows(tokenizer, requests, cfg.prefixes, with_kl=cfg.kl_weight > 0)
        ids, mask, labels = _pad(rows, pad_id(tokenizer), device)
        n, B = len(requests), len(rows)
        self.mask = mask
        self.pos = torch.tensor([r.subject_pos for r in rows], device=device)  # (B,)
        self.req = torch.tensor([r.request for r in rows], device=device)  # (B,)
        is_kl = torch.tensor([r.kl for r in rows], device=device)  # (B,)
        lengths = mask.sum(-1)  # (B,)
        # positions whose logits are read: target predictions, and the last token of each KL row
        select = torch.zeros_like(mask, dtype=torch.bool)  # (B, T)
        select[:, :-1] = labels[:, 1:] != IGNORE
        select[is_kl, lengths[is_kl] - 1] = True
        self.select = select
        where = select.nonzero()  # (N, 2) row-major, matching tail_logits' selected order
        sel_row = where[:, 0]
        self.sel_is_kl = is_kl[sel_row]  # (N,)
        nxt = torch.zeros(where.shape[0], dtype=torch.long, device=device)
        self.tgt = ~self.sel_is_kl
        nxt[self.tgt] = labels[where[self.tgt, 0], where[self.tgt, 1] + 1]
        self.nxt = nxt
        self.tok_req = req_of_tok = self.req[sel_row]  # (N,) request of each selected position
        self.tokens_per_req = torch.bincount(req_of_tok[self.tgt], minlength=n).clamp(min=1).float()  # (n,)

        self.base = prefix_states(model, ids, mask, layer + 1)  # (B, T, d): leaving block ``layer``
        self.rows_idx = torch.arange(B, device=device)
        h_rows = self.base[self.rows_idx, self.pos].float()  # (B, d)
        self.h = h_rows[_first_rows(rows, n, device)]  # (n, d): bare prompt (prefix "")
        self.h_norm = self.h.norm(dim=-1, keepdim=True)  # (n, 1)
        with torch.no_grad():
            pre = tail_logits(model, layer + 1, self.base, mask, select)  # (N, V)
            self.pre_kl = torch.log_softmax(pre[self.sel_is_kl].float(), -1)  # (n_kl, V)
        self.split = checked_split(model, layer + 1, self.base, mask, self.pos, select, lambda: pre, "value search")
        if self.split is not None:
            self.short_base = self.split.short(self.base)  # (B, T2, d): from each row's subject on
            self.short_select = self.split.short_select(select)  # (B, T2)

    def evaluate(self, delta: torch.Tensor) -> Evaluation:
        """The objective with ``delta`` (n, d) added at each request's subject; differentiable in delta."""
        cfg, n = self.cfg, self.n
        if self.split is not None:  # index 0 of each short row is its subject's last token
            states = self.short_base.clone()  # (B, T2, d)
            states[:, 0] = states[:, 0] + delta[self.req].to(states.dtype)
            logits = self.split.logits(states, self.short_select).float()  # (N, V)
        else:
            states = self.base.clone()  # (B, T, d)
            states[self.rows_idx, self.pos] = states[self.rows_idx, self.pos] + delta[self.req].to(states.dtype)
            logits = tail_logits(self.model, self.layer + 1, states, self.mask, self.select).float()  # (N, V)
        logp = torch.log_softmax(logits, -1)
        tgt = self.tgt
        tok_nll = -logp[tgt].gather(-1, self.nxt[tgt].unsqueeze(-1)).squeeze(-1)  # (N_t,)
        nll = torch.zeros(n, device=delta.device).index_add(0, self.tok_req[tgt], tok_nll) / self.tokens_per_req
        miss = (logits[tgt].argmax(-1) != self.nxt[tgt]).float()  # (N_t,)
        hit = torch.zeros(n, device=delta.device).index_add(0, self.tok_req[tgt], miss) == 0  # (n,)
        loss = nll.sum()
        if cfg.kl_weight > 0:
            post_kl = logp[self.sel_is_kl]
            kl = (self.pre_kl.exp() * (self.pre_kl - post_kl)).sum(-1)  # (n_kl,)
            loss = loss + cfg.kl_weight * kl.sum()
        loss = loss + cfg.weight_decay * ((delta.norm(dim=-1) / self.h_norm.squeeze(-1)) ** 2).sum()
        return Evaluation(loss=loss, nll=nll, hit=hit)

    def clamp(self, delta: torch.Tensor) -> torch.Tensor:
        """The norm bound ||delta|| <= clamp_norm * ||h||, per request (differentiable)."""
        limit = self.cfg.clamp_norm * self.h_norm  # (n, 1)
        return delta * torch.clamp(limit / delta.norm(dim=-1, keepdim=True).clamp(min=1e-12), max=1.0)

    def gradient_at_zero(self) -> torch.Tensor:
        """(n, d) gradient of the objective with respect to delta at delta = 0: the editor's input."""
        delta = torch.zeros_like(self.h, requires_grad=True)
        with frozen(self.model):
            (grad,) = torch.autograd.grad(self.evaluate(delta).loss, [delta])
        return grad


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No gradient to the model's own parameters inside (they are not what is being optimised)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def optimise_values(model: nn.Module, tokenizer, requests: list[EditRequest], layer: int,
                    cfg: ValueConfig, precond: torch.Tensor | None = None) -> Values:
    """Find, per request, the state leaving block ``layer`` at the subject that makes the target come out.

    At most ``cfg.steps`` evaluations of the objective, stopping once every request's target NLL is
    below ``cfg.stop_nll`` and every target token is top-1. With ``ngd`` a request that has got there
    stops moving while the others go on (in a batch, each fact's value is as small as it can be).
    ``precond`` (d, d), symmetric, turns each ngd step from the gradient ``g`` to ``g @ precond``
    (``metric = "fisher"``: :func:`~editor_core.methods.value_metric.preconditioner`); it is required
    exactly when the config asks for that metric.
    """
    if (precond is not None) != (cfg.metric == "fisher"):
        raise ValueError(f"value metric {cfg.metric!r} " + ("needs a preconditioner (the value Fisher)"
                                                           if precond is None else "takes no preconditioner"))
    problem = ValueProblem(model, tokenizer, requests, layer, cfg)
    delta = torch.zeros_like(problem.h, requires_grad=True)  # (n, d)
    opt = torch.optim.Adam([delta], lr=cfg.lr) if cfg.optimizer == "adam" else None
    steps, nll_mean = 0, float("nan")
    with frozen(model):
        for steps in range(1, cfg.steps + 1):  # noqa: B007 (steps is reported)
            ev = problem.evaluate(delta)
            nll = ev.nll.detach()  # (n,)
            nll_mean = float(nll.mean())
            done = (nll < cfg.stop_nll) & ev.hit  # (n,)
            if bool(done.all()) or steps == cfg.steps:
                break
            (grad,) = torch.autograd.grad(ev.loss, [delta])  # (n, d)
            if opt is not None:
                delta.grad = grad
                opt.step()
            else:
                with torch.no_grad():
                    if precond is not None:
                        grad = grad @ precond.to(grad.dtype)  # (n, d): steepest in the Fisher metric
                    step = grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # (n, d) unit rows
                    delta -= cfg.step_size * problem.h_norm * step * (~done).unsqueeze(-1)  # done rows stay
            with torch.no_grad():  # the norm bound
                delta.copy_(problem.clamp(delta))
    return Values(z=(problem.h + delta.detach()), h=problem.h, steps=steps, nll=nll_mean)


@contextmanager
def added_updates(model: nn.Module, updates: dict[str, tuple[Target, LowRankUpdate]]) -> Iterator[None]:
    """Run the model as if ``W + u^T v`` for each target, without writing any weight (forward hooks)."""

    def make_hook(upd: LowRankUpdate):
        def hook(_module, inputs, output):
            x = inputs[0]  # (..., d_in)
            return output + ((x.float() @ upd.v.t()) @ upd.u).to(output.dtype)  # (..., d_out)
        return hook

    handles = [model.get_submodule(name).register_forward_hook(make_hook(u)) for name, (_, u) in updates.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Stop(Exception):
    pass


@torch.no_grad()
def keys_and_states(model: nn.Module, tokenizer, requests: list[EditRequest], target: Target, last_layer: int,
                    prefixes: tuple[str, ...], per_prefix: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys at ``target`` and states leaving block ``last_layer``, at the subject's last token.

    Returns (n, d_in) keys averaged over ``prefixes`` and (n, d) states of the bare prompt; with
    ``per_prefix`` also (n * P, d_in) the key behind each prefix, request-major.
    """
    device = next(model.parameters()).device
    rows = _rows(tokenizer, requests, prefixes, with_kl=False)
    ids, mask, _ = _pad(rows, pad_id(tokenizer), device)
    pos = torch.tensor([r.subject_pos for r in rows], device=device)
    req = torch.tensor([r.request for r in rows], device=device)
    rows_idx = torch.arange(len(rows), device=device)
    box: list[torch.Tensor] = []

    def grab(_module, inputs):
        box.append(inputs[0][rows_idx, pos].float())  # (B, d_in)

    handle = model.get_submodule(target.name).register_forward_pre_hook(grab)
    try:
        states = prefix_states(model, ids, mask, last_layer + 1)  # (B, T, d)
    finally:
        handle.remove()
    n = len(requests)
    keys = torch.zeros(n, target.d_in, device=device).index_add(0, req, box[0])
    keys = keys / torch.bincount(req, minlength=n).unsqueeze(-1).float()  # (n, d_in)
    first_row = _first_rows(rows, n, device)
    state = states[first_row, pos[first_row]].float()  # (n, d)
    if per_prefix:
        return keys, state, box[0][torch.argsort(req, stable=True)]  # rows of one request together
    return keys, state


def _subject_rows(tokenizer, facts: list[tuple[str, str]], prefixes: tuple[str, ...],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each fact behind each prefix, fact-major: ids and mask (B, T), right-padded, and the subject's last
    token of each row (B,)."""
    seqs, pos = [], []
    for prompt, subject in facts:
        for p in prefixes:
            ids, at = _subject_last(tokenizer, p + prompt, subject)
            seqs.append(ids)
            pos.append(at)
    ids, mask = right_pad(seqs, pad_id(tokenizer), device)  # (B, T)
    return ids, mask, torch.tensor(pos, device=device)


@contextmanager
def _grabbing_keys(model: nn.Module, targets: list[Target], at: torch.Tensor,
                   out: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """While open, every forward appends each target's input at row ``b``'s position ``at[b]`` (B, d_in)."""
    rows = torch.arange(len(at), device=at.device)

    def grab(name):
        def hook(_module, inputs):
            out[name].append(inputs[0][rows, at].float())  # (B, d_in)
        return hook

    handles = [model.get_submodule(t.name).register_forward_pre_hook(grab(t.name)) for t in targets]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _joined_keys(out: dict[str, list[torch.Tensor]], targets: list[Target], device) -> dict[str, torch.Tensor]:
    return {name: (torch.cat(parts) if parts else torch.zeros(0, t.d_in, device=device))
            for (name, parts), t in zip(out.items(), targets, strict=True)}


@torch.no_grad()
def subject_keys(model: nn.Module, tokenizer, facts: list[tuple[str, str]], targets: list[Target],
                 prefixes: tuple[str, ...], chunk: int = 64) -> dict[str, torch.Tensor]:
    """Keys at every target in one pass per chunk of facts: ``{name: (n * P, d_in)}``, the key of each
    fact ``(prompt, subject)`` behind each prefix, fact-major (rows ``i * P .. i * P + P - 1``).

    The same keys :func:`keys_and_states` reads (its ``per_prefix`` rows), for many facts and layers at
    once, without a target: what re-reading the keys of earlier facts on the current weights needs.
    """
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
    last = max(t.block for t in targets)
    for start in range(0, len(facts), chunk):
        ids, mask, at = _subject_rows(tokenizer, facts[start:start + chunk], prefixes, device)
        with _grabbing_keys(model, targets, at, out):
            run_until(model, ids, mask, last + 1)
    return _joined_keys(out, targets, device)


class SubjectKeyReader:
    """:func:`subject_keys` of fixed facts, read again and again while the weights change only from block
    ``first`` on (MEND's passes with ``key_prefixes``, which re-solve at the keys the edit so far leaves).

    The facts are tokenised, and the hidden states entering block ``first`` computed, once; each
    :meth:`read` runs only blocks ``first`` to the last target's. The weights below ``first`` must not
    change between reads.
    """

    def __init__(self, model: nn.Module, tokenizer, facts: list[tuple[str, str]], targets: list[Target],
                 prefixes: tuple[str, ...], first: int):
        if first > min(t.block for t in targets):
            raise ValueError(f"block {first} is after a target's block: its key would not be re-read")
        device = next(model.parameters()).device
        self.model, self.targets, self.first = model, targets, first
        self.until = max(t.block for t in targets) + 1
        ids, self.mask, self.at = _subject_rows(tokenizer, facts, prefixes, device)
        self.states = prefix_states(model, ids, self.mask, first)  # (B, T, d)

    @torch.no_grad()
    def read(self) -> dict[str, torch.Tensor]:
        """``{name: (n * P, d_in)}`` on the current weights, rows as :func:`subject_keys` orders them."""
        out: dict[str, list[torch.Tensor]] = {t.name: [] for t in self.targets}
        with _grabbing_keys(self.model, self.targets, self.at, out):
            run_blocks(self.model, self.first, self.states, self.mask, self.until)
        return _joined_keys(out, self.targets, self.states.device)


@torch.no_grad()
def context_keys(model: nn.Module, tokenizer, requests: list[EditRequest], target: Target) -> torch.Tensor:
    """(m, d_in) the inputs of ``target`` at every token of each bare prompt *before* its subject's last one.

    What the subject's last token attends to: a later edit that changes the edited layers' output there
    moves this fact's keys at the layers above, so these are what a later edit must also stay off to
    leave the fact's keys where they were (``LocateConfig.keep_context_keys``).
    """
    device = next(model.parameters()).device
    seqs, last = [], []
    for r in requests:
        ids, pos = _subject_last(tokenizer, r.prompt, r.subject)
        seqs.append(ids)
        last.append(pos)
    ids, mask = right_pad(seqs, pad_id(tokenizer), device)  # (n, T)
    box: list[torch.Tensor] = []
    handle = model.get_submodule(target.name).register_forward_pre_hook(lambda _m, inputs: box.append(inputs[0]))
    try:
        prefix_states(model, ids, mask, target.block + 1)
    finally:
        handle.remove()
    rows = [box[0][i, :pos].float() for i, pos in enumerate(last)]  # each (pos, d_in)
    return torch.cat(rows) if rows else torch.zeros(0, target.d_in, device=device)
