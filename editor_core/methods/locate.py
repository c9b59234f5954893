"""ROME, MEMIT and AlphaEdit: one editor class, three closed-form solves over the same keys and values.

All three find, per fact, the state the last edited block must output at the subject's last token
(:func:`~editor_core.methods.values.optimise_values`), then spread the change over the edited
layers' MLP output projections, lowest layer first, each layer taking ``1 / layers left`` of the
remaining residual ``R`` (n, d_out) at its keys ``K`` (n, d_in):

- ``rome``: one layer, exact insertion with the smallest C-weighted change:
  ``dW = R^T (K C^-1 K^T)^-1 K C^-1`` (rank one per fact; Meng et al. 2022).
- ``memit``: least squares against the statistics, ``dW = R^T K (lam C + K^T K)^-1`` (Meng et al. 2023);
  with ``memit_keep`` > 0 the keys of earlier active edits join the preserved term,
  ``dW = R^T K (lam C + keep K_p^T K_p + K^T K)^-1``; with ``refit_every`` R, every R-th active edit
  also carries the rows that take the stack to :func:`refit` of the active facts' summed update (the
  joint least-squares solve, against ``refit_lambda * C``).
- ``alphaedit``: the update's input side restricted to the null space ``P`` of the preserved keys
  (the statistics) and kept off the keys of every edit still active at that layer, ``K_p``:
  ``dW^T = (P (keep K_p^T K_p + K^T K) + lam I)^-1 P K^T R`` (Fang et al. 2025, where keep = 1),
  ``lam`` relative to trace(C).

With ``alphaedit_groups`` > 1, AlphaEdit deals its layers into interleaved groups and writes each fact
into the group its subject hashes to (:func:`group_of`), with the same steps over that group's layers.

Every solve is returned as exact factors ``u = R``, ``v = W`` (n rows each), and the keys ``K`` ride in
the delta, so AlphaEdit's memory of earlier edits is read from the stack's *active* deltas: rolling
an edit back, replaying the journal or restarting gives the state that never saw it, by construction.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from editor_core.delta import EditDelta, LowRankUpdate
from editor_core.methods.value_metric import preconditioner
from editor_core.methods.values import (
    ValueConfig,
    added_updates,
    check_subjects,
    context_keys,
    keys_and_states,
    optimise_values,
    subject_keys,
)
from editor_core.models import device_of
from editor_core.requests import EditRequest
from editor_core.stack import EditStack
from editor_core.stats import KeyStats, null_space_basis, ridged
from editor_core.targets import Target, out_proj_targets

log = logging.getLogger(__name__)

METHODS = ("rome", "memit", "alphaedit")
CONFIG_FILE = "locate_config.json"
REFRESHED = "\0refreshed"  # marks, in a memoised Gram matrix's ids, that the ids after it were read again


# fields whose default changed after configs were saved without them: a config that lacks one was made
# with the old behaviour (memit_keep: MEMIT without the earlier edits' keys; refit_every: no joint
# re-solve; optimizer: Adam)
LEGACY = {"memit_keep": 0.0, "refit_every": 0}
VALUE_LEGACY = {"optimizer": "adam"}


@dataclass
class LocateConfig:
    """Which layers each method edits and how it solves; saved as JSON beside the key statistics."""

    rome_layers: list[int] = field(default_factory=lambda: [8])
    memit_layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    alphaedit_layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    memit_lambda: float = 15.0  # weight of the statistics (C is a mean over tokens, not a sum)
    # weight of the keys of earlier active edits in MEMIT's preserved term, beside memit_lambda * C:
    # 0 is the paper's MEMIT, which protects only what the statistics describe; > 0 keeps earlier
    # corrections where they were, as AlphaEdit's second term does, without a hard null space. 5 was
    # measured against 1 up to 1,000 stacked edits (docs/LOCATE.md, "Two levers against the wearing away"): no
    # better at 1,000 (success 0.69 against 0.72), so 1 stays.
    # A saved config without this field was made before it existed and is read as 0 (from_dict)
    memit_keep: float = 1.0
    # what of a fact later edits keep (MEMIT with memit_keep, and AlphaEdit): False, its key averaged over
    # the prefixes; True, its key behind each prefix, scaled by 1/sqrt(prefixes) so that their Gram matrix
    # is the mean of the outer products: the averaged key's weight is about the same, and the directions
    # the key varies in with the context are kept too. Measured on the default model: after 1,000 stacked
    # edits the keys of the first 100 facts had moved 8-19% at layers 5-8, and the later edits' updates,
    # held off only the recorded keys, fired there at 0.1-0.26 of each fact's own update
    keep_key_spread: bool = False
    # every this many active edits, the keys of the earlier facts that later edits keep (above) are read
    # again on the weights as they are then, instead of as they were when each fact was edited: the
    # edits below a layer move the keys above it (8-19% at layers 5-8 after 1,000 edits), and later
    # edits held off the recorded keys fire on the moved ones. 0 keeps the recorded keys. Measured with 50
    # (docs/LOCATE.md, "Reading the moved keys again"): the same success at 1,000 stacked edits (0.72), at up to
    # a minute's reading every 50 edits, so it is off
    key_refresh: int = 0
    # also keep, for every earlier fact, the edited layers' inputs at the tokens of its prompt before the
    # subject's last one (what that token attends to), so that later edits leave its keys above where they
    # were instead of only not firing on them as recorded (docs/LOCATE.md, "Reading the moved keys again")
    keep_context_keys: bool = False
    # ridge on the update (AlphaEdit's L2), relative to trace(C) = E||k||^2 so that one setting fits any
    # key scale: a fact whose key puts a share f of its energy into the null space is inserted to
    # f / (f + alphaedit_lambda) of its residual (before the earlier edits' term)
    alphaedit_lambda: float = 0.01
    null_dims: int = 1024  # dimensions of the preserved keys' null space AlphaEdit may write into
    # AlphaEdit's layers dealt into this many interleaved groups (group g = layers[g::groups]); each
    # fact is written into one group, chosen from its subject, so each layer holds the keys of about
    # 1/groups of the facts. Every fact takes one direction of a layer's null_dims-wide null space, so
    # groups delay its filling up; but each fact then spreads over fewer layers and leaks more
    # (docs/LOCATE.md, "Levers tried": 2 groups lose to 1 at 100, 300 and 600 stacked edits), hence the default of one group
    alphaedit_groups: int = 1
    # weight of AlphaEdit's term that keeps the keys of earlier active edits where they were
    # (||dW K_p||^2 beside the new facts' ||dW K - R||^2); the paper weighs both alike (1.0). More
    # holds earlier facts against later edits, at the cost of the room left for new ones
    alphaedit_keep: float = 1.0
    ridge: float = 1e-4  # times mean(diag C), added to C before inverting it
    # MEMIT only: every this many active edits, the edit also re-solves the sum of every active fact's
    # update jointly (:func:`refit`): the weights that give the facts' keys what the sum gives them, in the
    # least-squares sense, against refit_lambda * C. One fact at a time, each solve spends its own budget
    # on C; the joint solve finds what the facts share and drops what only added to the leaks. 0: off.
    # Measured every 100 on the default model (docs/LOCATE.md, "Re-solving the stack jointly"): with lam 50,
    # success 0.829 at 1,000 stacked edits against 0.794 without, and within 0.011 of it at 300 and 600
    # (lam 150: 0.810 at 1,000, but 0.03-0.04 less at 300 and 600). A config saved before this field
    # existed reads 0 (LEGACY)
    refit_every: int = 100
    # weight of the statistics in that joint solve (C a mean, as for memit_lambda). 15, memit_lambda
    # itself, changes next to nothing on a stack of sequential solves (they are already that solve);
    # 150 keeps about 0.97 of what the keys get and takes a fifth to a third off the summed update; 50
    # takes less off and keeps older facts better (oldest fifth 0.77 against 0.75 at 1,000 edits)
    refit_lambda: float = 50.0
    # the refit is written as factors of at most this rank per layer (its largest singular directions),
    # so that the edit that carries it stays a bounded journal entry; what is cut is picked up by the next
    refit_rank: int = 128
    value: ValueConfig = field(default_factory=ValueConfig)

    def __post_init__(self) -> None:
        for name in ("memit_keep", "alphaedit_keep"):
            if not getattr(self, name) >= 0:  # a negative weight makes the solve's matrix indefinite
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not (isinstance(self.key_refresh, int) and self.key_refresh >= 0):
            raise ValueError(f"key_refresh must be a whole number >= 0, not {self.key_refresh!r}")
        for name in ("refit_every", "refit_rank"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a whole number >= 0, not {getattr(self, name)!r}")
        if not self.refit_lambda > 0:
            raise ValueError(f"refit_lambda must be > 0, not {self.refit_lambda}")
        if self.key_refresh and self.keep_context_keys:
            raise ValueError("key_refresh reads again only the subject's keys; it cannot be combined with "
                             "keep_context_keys")

    def layers(self, method: str) -> list[int]:
        return {"rome": self.rome_layers, "memit": self.memit_layers, "alphaedit": self.alphaedit_layers}[method]

    @property
    def value_layers(self) -> list[int]:
        """The layers values are read at: the last layer of each method (of each AlphaEdit layer group)."""
        n = self.alphaedit_groups  # group g is alphaedit_layers[g::n]
        last = {self.alphaedit_layers[g::n][-1] for g in range(min(n, len(self.alphaedit_layers)))}
        return sorted({self.rome_layers[-1], self.memit_layers[-1]} | last)

    @property
    def all_layers(self) -> list[int]:
        return sorted(set(self.rome_layers) | set(self.memit_layers) | set(self.alphaedit_layers))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LocateConfig:
        """Build from JSON, rejecting unknown keys.

        A field the file lacks takes the value that reproduces the version that wrote it where the default
        has changed since (``LEGACY``), and the dataclass default otherwise.
        """
        data = {**LEGACY, **data}
        value = {**VALUE_LEGACY, **data.pop("value", {})}
        value = ValueConfig(**{k: (tuple(v) if k == "prefixes" else v) for k, v in value.items()})
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown LocateConfig keys: {sorted(unknown)}")
        return cls(**data, value=value)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> LocateConfig:
        """The config saved in ``directory``, or the defaults when there is none."""
        path = Path(directory) / CONFIG_FILE
        return cls.from_dict(json.loads(path.read_text())) if path.is_file() else cls()


class LocateEditor:
    """ROME / MEMIT / AlphaEdit behind the :class:`~editor_core.protocol.Editor` protocol."""

    def __init__(self, method: str, stack: EditStack, stats: KeyStats, config: LocateConfig | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown locate-then-edit method {method!r}; choose from {METHODS}")
        self.method = method
        self.stack = stack
        self.config = config or LocateConfig()
        layers = self.config.layers(method)
        n_groups = self.config.alphaedit_groups if method == "alphaedit" else 1
        if not 1 <= n_groups <= len(layers):
            raise ValueError(f"alphaedit_groups must be between 1 and the number of layers ({len(layers)}), "
                             f"not {n_groups}")
        missing = [layer for layer in layers if layer not in stats.moments]
        if missing:
            raise ValueError(f"the key statistics have no layers {missing} (they have {stats.layers}): "
                             "run `mend stats` for them")
        self.targets: list[Target] = out_proj_targets(stack.model, layers)
        self.groups: list[list[Target]] = [self.targets[g::n_groups] for g in range(n_groups)]
        absent = [t.name for t in self.targets if t.name not in stack.targets]
        if absent:
            raise ValueError(f"{method}: targets {absent} are not covered by the edit stack")
        self.fingerprint = stack.fingerprint
        # which statistics these deltas come from, for settings(): two files of the same corpus and size
        # hold the same moments
        self._stats_id = {"corpus": stats.corpus, "tokens": stats.tokens, "fisher_tokens": stats.fisher_tokens,
                          "fingerprint": stats.fingerprint}
        ridge = self.config.ridge
        moments = {t.name: ridged(stats.moments[t.block].float(), ridge) for t in self.targets}  # (d_in, d_in)
        # method-specific precomputation, from the statistics only (never from edits), done on the CPU
        # where the statistics load (the same basis on every device), then kept on the model's device,
        # where the keys of each edit are computed
        # solves with C itself, not its inverse (the keep term, or the refit)
        keeps = method == "memit" and (self.config.memit_keep > 0 or self.config.refit_every > 0)
        c_inv = ({t.name: torch.linalg.inv(moments[t.name].double()).float() for t in self.targets}
                 if method in ("rome", "memit") and not keeps else {})
        null_basis = ({t.name: null_space_basis(stats.moments[t.block], self.config.null_dims)
                       for t in self.targets} if method == "alphaedit" else {})
        device = device_of(stack.model)
        # AlphaEdit's ridge needs only trace(C); the full (d_in, d_in) moments are kept only where a solve
        # uses them (MEMIT with a keep weight), so five editors do not hold five copies of the statistics
        self._trace = {n: float(m.trace()) for n, m in moments.items()}
        self._moments = {n: m.to(device) for n, m in moments.items()} if keeps else {}
        self._c_inv = {n: m.to(device) for n, m in c_inv.items()}
        self._null_basis = {n: b.to(device) for n, b in null_basis.items()}
        # the value search's metric (ValueConfig.metric = "fisher"): per value layer, from the statistics file
        self._precond: dict[int, torch.Tensor] = {}
        if self.config.value.metric == "fisher":
            wanted = sorted({g[-1].block for g in self.groups})
            absent = [layer for layer in wanted if layer not in stats.fisher]
            if absent:
                raise ValueError(f"value metric 'fisher' needs the value Fisher at blocks {absent}; the key "
                                 f"statistics have it at {sorted(stats.fisher)}: run `mend stats` again")
            self._precond = {layer: preconditioner(stats.fisher[layer], self.config.value.metric_ridge).to(device)
                             for layer in wanted}
        # the Gram matrix of earlier edits' keys (AlphaEdit: in null-space coordinates), memoised per target
        # under the exact list of active edit ids it sums (recomputed whenever that list is not a prefix
        # of the current one): a function of the active edits, never state that outlives them
        self._gram: dict[str, tuple[tuple[str, ...], torch.Tensor]] = {}
        # with key_refresh: the earlier facts' keys read again, under the ids of the active edits they were
        # read for (the head of the active list, a multiple of key_refresh long)
        self._refreshed: tuple[tuple[str, ...], dict[str, dict[str, torch.Tensor]]] = ((), {})
        self._tokenizer = None

    # ---- the Editor protocol -------------------------------------------------------------------
    def settings(self) -> dict:
        """What decides this editor's deltas besides the weights they are computed on, as JSON: a cache of
        deltas (:func:`editor_core.stacked.stacked_curve`) made under other settings is refused by it."""
        return {"method": self.method, "config": self.config.to_dict(), "stats": dict(self._stats_id)}

    def compute_delta(self, model: nn.Module, tokenizer, requests: list[EditRequest]) -> EditDelta:
        """Per layer group: values at its last layer, then one closed-form solve per layer, lowest first.

        With one group (every method but a grouped AlphaEdit) that is all the requests over all the layers.
        Groups are solved one after another, each on the model with the groups before it applied.
        """
        if not requests:
            raise ValueError("no edit requests")
        check_subjects(requests, self.method)
        cfg = self.config
        self._tokenizer = tokenizer  # for reading earlier facts' keys again (key_refresh)
        solved: dict[str, tuple[Target, LowRankUpdate]] = {}
        keys: dict[str, torch.Tensor] = {}
        steps, nlls = [], []
        for targets, reqs in self.by_group(requests):
            last = targets[-1].block
            with added_updates(model, solved):
                values = optimise_values(model, tokenizer, reqs, last, cfg.value, self._precond.get(last))
            for i, target in enumerate(targets):
                with added_updates(model, solved):
                    k, state, rows = keys_and_states(model, tokenizer, reqs, target, last, cfg.value.prefixes,
                                                     per_prefix=True)  # (n, d_in), (n, d), (n * P, d_in)
                resid = (values.z - state) / (len(targets) - i)  # (n, d_out)
                w = self._solve(target, k)  # (n, d_in)
                solved[target.name] = (target, LowRankUpdate(u=resid.float(), v=w.float()))
                # what later edits keep: the mean key, or the key behind each prefix (keep_key_spread)
                kept = (rows / len(cfg.value.prefixes) ** 0.5 if cfg.keep_key_spread else k).float()
                if cfg.keep_context_keys:
                    with added_updates(model, solved):
                        kept = torch.cat([kept, context_keys(model, tokenizer, reqs, target)])  # (n + m, d_in)
                keys[target.name] = kept
            steps.append(str(values.steps))
            nlls.append(f"{values.nll:.4f}")
        meta = {"method": self.method, "n_requests": str(len(requests)), "value_steps": ",".join(steps),
                "value_nll": ",".join(nlls), "layers": ",".join(str(t.block) for t, _ in solved.values()),
                # what a later edit needs to read this edit's keys again on the weights of its day
                "facts": json.dumps([[r.prompt, r.subject] for r in requests])}
        updates = {n: u for n, (_, u) in solved.items()}
        if self.refits_now():
            updates, kept = self._with_refit(updates, keys)
            # the rows after the facts' own are the refit's: the next refit sums only the facts' rows
            meta.update(fact_rows=str(len(requests)), refit_energy=json.dumps(kept))
        return EditDelta(updates, self.fingerprint, meta, keys=keys)

    def refits_now(self) -> bool:
        """Whether the next edit carries a refit: MEMIT with ``refit_every`` R, at every R-th active edit
        (a function of how many edits are active, so a replay of the same journal refits at the same ones)."""
        every = self.config.refit_every
        return self.method == "memit" and every > 0 and (len(self.stack.active_ids) + 1) % every == 0

    def _with_refit(self, updates: dict[str, LowRankUpdate], keys: dict[str, torch.Tensor]
                    ) -> tuple[dict[str, LowRankUpdate], dict[str, float]]:
        """``updates`` with, per target, the rows that take the stack from what it sums to (with these
        updates) to :func:`refit` of the active facts' own updates; and the share of each refit's squared
        norm that the ``refit_rank`` rows written keep."""
        device = device_of(self.stack.model)
        out, kept = dict(updates), {}
        for target in self.targets:
            name = target.name
            active = [self.stack.delta_of(i) for i in self.stack.active_ids]
            every = [d.updates[name] for d in active if name in d.updates]  # all rows of every active delta
            facts = [fact_rows(d, name) for d in active if name in d.updates]  # their facts' own rows
            new = updates[name]
            a_raw = _summed(facts + [new], device)  # (d_out, d_in)
            a_now = _summed(every + [new], device)  # (d_out, d_in)
            k_new = keys[name].double()  # (n, d_in)
            gram = self.earlier_gram(name).double() + k_new.t() @ k_new  # (d_in, d_in)
            fitted = refit(a_raw, gram, self._moments[name].double(), self.config.refit_lambda)
            u, v, kept[name] = _factors(fitted - a_now, self.config.refit_rank)  # (r, d_out), (r, d_in)
            out[name] = LowRankUpdate(torch.cat([new.u, u]), torch.cat([new.v, v]))
        log.info("%s: refit of %d active edits (share of the refit kept per layer: %s)", self.method,
                 len(self.stack.active_ids) + 1, {k.split(".")[2]: round(e, 4) for k, e in kept.items()})
        return out, {k: round(e, 6) for k, e in kept.items()}

    def by_group(self, requests: list[EditRequest]) -> list[tuple[list[Target], list[EditRequest]]]:
        """The requests dealt to their layer groups (groups without requests left out), in group order."""
        dealt: dict[int, list[EditRequest]] = {}
        for r in requests:
            dealt.setdefault(group_of(r.subject, len(self.groups)), []).append(r)
        return [(self.groups[g], dealt[g]) for g in sorted(dealt)]

    # ---- solves --------------------------------------------------------------------------------
    def _solve(self, target: Target, k: torch.Tensor) -> torch.Tensor:
        """The input-side factor W (n, d_in) of dW = R^T W for keys ``k`` (n, d_in)."""
        name = target.name
        if self.method == "rome":
            c_inv_k = self._c_inv[name] @ k.t()  # (d_in, n)
            gram = k @ c_inv_k  # (n, n)
            return torch.linalg.solve(gram.double(), c_inv_k.t().double()).float()  # (n, d_in)
        if self.method == "memit" and self._moments:
            # the earlier edits' keys join the preserved term: one (d_in, d_in) SPD solve
            kd = k.double()
            m = (self.config.memit_lambda * self._moments[name].double()
                 + self.config.memit_keep * self.earlier_gram(name).double() + kd.t() @ kd)  # (d_in, d_in)
            chol, info = torch.linalg.cholesky_ex(m)
            if int(info) == 0:
                return torch.cholesky_solve(kd.t(), chol).t().float().contiguous()  # (n, d_in)
            # statistics from too few tokens, stored in fp16, can be slightly indefinite beyond the ridge
            # (a tiny test model's are): the general solve still gives the least-squares update
            return torch.linalg.solve(m, kd.t()).t().float().contiguous()  # (n, d_in)
        if self.method == "memit":
            # (lam C + K^T K)^-1 K^T = C^-1 K^T (lam I + K C^-1 K^T)^-1: an (n, n) solve instead of (d, d)
            c_inv_k = self._c_inv[name] @ k.t()  # (d_in, n)
            small = self.config.memit_lambda * torch.eye(k.shape[0], device=k.device) + k @ c_inv_k  # (n, n)
            return torch.linalg.solve(small.double(), c_inv_k.t().double()).float()  # (n, d_in); small symmetric
        # AlphaEdit. The solution X = dW^T lies in the null space B (d_in, m), so with X = B Y the system
        # (P S + lam I) X = P K^T R becomes (B^T S B + lam I) Y = (K B)^T R: SPD, m x m, one Cholesky.
        basis = self._null_basis[name]  # (d_in, m)
        kb = k @ basis  # (n, m)
        lam = self.config.alphaedit_lambda * self._trace[name]
        eye = torch.eye(basis.shape[1], device=basis.device)
        g = self.config.alphaedit_keep * self.earlier_gram(name) + kb.t() @ kb + lam * eye  # (m, m)
        chol = torch.linalg.cholesky(g.double())
        z = torch.cholesky_solve(kb.t().double(), chol).float()  # (m, n)
        return (basis @ z).t().contiguous()  # (n, d_in)

    def earlier_keys(self, name: str) -> torch.Tensor:
        """(m, d_in) keys of every active edit at target ``name``, read from the stack (not cached)."""
        d_in = self.stack.targets[name].d_in
        found = [self.stack.delta_of(i).keys[name] for i in self.stack.active_ids
                 if name in self.stack.delta_of(i).keys]
        device = device_of(self.stack.model)  # a replayed delta's keys are on the CPU, a new one's on the device
        return torch.cat([k.float().to(device) for k in found]) if found else torch.zeros(0, d_in, device=device)

    def earlier_gram(self, name: str) -> torch.Tensor:
        """Sum over active edits of (K B)^T (K B) at ``name``, in journal order: (m, m) in AlphaEdit's
        null-space coordinates B, (d_in, d_in) K^T K for MEMIT (B the identity).

        With ``key_refresh`` R, the keys of the first ``R * (len(active) // R)`` active edits are the ones
        :meth:`refreshed_keys` reads on the weights those edits alone give; the rest are as recorded.
        """
        active = self.stack.active_ids
        head: tuple[str, ...] = ()
        fresh: dict[str, torch.Tensor] = {}
        if self.config.key_refresh > 0:
            head, fresh = self.refreshed_keys(name)
        ids = tuple(i for i in active if name in self.stack.delta_of(i).keys)
        basis = self._null_basis.get(name)  # None: full coordinates
        device = device_of(self.stack.model)
        width = basis.shape[1] if basis is not None else self.stack.targets[name].d_in
        # memo key: the refreshed head, then the recorded ids summed after it
        memo = ((REFRESHED,) + head if head else ()) + tuple(i for i in ids if i not in fresh)
        known, gram = self._gram.get(name, ((), None))
        if gram is None or memo[: len(known)] != known:
            known, gram = (), torch.zeros(width, width, device=device)
            for k in fresh.values():
                kb = k.to(device) @ basis if basis is not None else k.to(device)
                gram += kb.t() @ kb
            known = (REFRESHED,) + head if head else ()
        gram = gram.clone()
        for i in memo[len(known):]:
            # a replayed delta's keys are on the CPU, a new one's on the model's device
            kb = self.stack.delta_of(i).keys[name].float().to(device)  # (r, d_in)
            if basis is not None:
                kb = kb @ basis  # (r, m)
            gram += kb.t() @ kb
        self._gram[name] = (memo, gram)
        return gram

    def refreshed_keys(self, name: str) -> tuple[tuple[str, ...], dict[str, torch.Tensor]]:
        """The head of the active edits (``key_refresh`` times as many as fit) and, for each of them that
        carries its facts and keys at ``name``, those keys read again on the weights the head alone gives.

        The weights of the head are the stack's with the later active edits taken off (forward hooks,
        nothing written), so the result is a function of the active list: the same after a rollback of a
        later edit, a replay or a restart, up to float rounding (taken off by hooks, not absent).
        Memoised under the head, so it is read once per ``key_refresh`` edits.
        """
        active = self.stack.active_ids
        head = tuple(active[: len(active) // self.config.key_refresh * self.config.key_refresh])
        if self._refreshed[0] != head or not head:
            self._refreshed = (head, self._read_keys(head, active[len(head):]) if head else {})
        return head, {i: per_name[name] for i, per_name in self._refreshed[1].items() if name in per_name}

    def _read_keys(self, head: tuple[str, ...], tail: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """``{edit id: {target name: keys}}`` for the edits in ``head`` that carry their facts, read on the
        weights without ``tail``'s edits, shaped as :meth:`compute_delta` journals them."""
        names = {t.name for t in self.targets}
        wanted = [(i, self.stack.delta_of(i)) for i in head]
        wanted = [(i, d) for i, d in wanted if "facts" in d.meta and names & set(d.keys)]
        per_edit = [[tuple(f) for f in json.loads(d.meta["facts"])] for _, d in wanted]  # each edit's facts
        facts = [f for edit in per_edit for f in edit]
        if not facts:
            return {}
        prefixes = self.config.value.prefixes
        p = len(prefixes)
        undo: dict[str, tuple[Target, LowRankUpdate]] = {}
        for i in tail:  # the later edits, taken off: W - sum u^T v
            for tname, upd in self.stack.delta_of(i).updates.items():
                target = self.stack.targets[tname]
                u, v = -upd.u.float(), upd.v.float()
                if tname in undo:
                    u, v = torch.cat([undo[tname][1].u, u]), torch.cat([undo[tname][1].v, v])
                undo[tname] = (target, LowRankUpdate(u=u, v=v))
        device = device_of(self.stack.model)
        undo = {n: (t, LowRankUpdate(u.u.to(device), u.v.to(device))) for n, (t, u) in undo.items()}
        log.info("%s: reading the keys of %d earlier facts again (%d active edits)", self.method, len(facts),
                 len(head) + len(tail))
        with added_updates(self.stack.model, undo):
            rows = subject_keys(self.stack.model, self._tokenizer, facts, self.targets, prefixes)  # {name: (F * P, d_in)}
        out: dict[str, dict[str, torch.Tensor]] = {}
        at = 0
        for (i, d), edit in zip(wanted, per_edit, strict=True):
            n = len(edit)
            per_name = {}
            for t in self.targets:
                if t.name not in d.keys:
                    continue
                r = rows[t.name][at * p:(at + n) * p]  # (n * P, d_in)
                per_name[t.name] = (r / p ** 0.5 if self.config.keep_key_spread
                                    else r.view(n, p, -1).mean(1))  # as journaled: spread rows or the mean
            out[i] = per_name
            at += n
        return out


def group_of(subject: str | None, n_groups: int) -> int:
    """The layer group a fact about ``subject`` is written into: a stable hash of the subject (case and
    surrounding spaces ignored), so every correction of one subject lands in the same layers on every
    instance and after every restart."""
    if n_groups == 1:
        return 0
    digest = hashlib.sha256((subject or "").strip().lower().encode()).digest()
    return int.from_bytes(digest[:8], "big") % n_groups


def refit(summed: torch.Tensor, gram: torch.Tensor, moment: torch.Tensor, lam: float) -> torch.Tensor:
    """The joint least-squares solve of many facts' updates: ``X`` minimising
    ``||(X - A) K^T||^2 + lam tr(X C X^T)``, i.e. ``X = A G (lam C + G)^-1`` with ``G = K^T K``.

    ``summed`` A (d_out, d_in) is the sum of the facts' updates, ``gram`` G (d_in, d_in) the Gram matrix
    of their keys, ``moment`` C (d_in, d_in) the statistics. X gives the keys about what A gives them
    and takes off what A does that no key needs, as measured on ordinary text by C.
    """
    m = lam * moment + gram  # (d_in, d_in), SPD: C is ridged
    chol, info = torch.linalg.cholesky_ex(m)
    rhs = gram @ summed.t()  # (d_in, d_out)
    x = torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.solve(m, rhs)  # (d_in, d_out)
    return x.t()  # (d_out, d_in)


def fact_rows(delta: EditDelta, name: str) -> LowRankUpdate:
    """The rows of ``delta``'s update at ``name`` that are its facts' own: all of them, or the first
    ``fact_rows`` of an edit that also carried a refit (the refit's rows come after)."""
    upd = delta.updates[name]
    n = int(delta.meta.get("fact_rows", upd.rank))
    return LowRankUpdate(upd.u[:n], upd.v[:n])


def _summed(updates: list[LowRankUpdate], device) -> torch.Tensor:
    """(d_out, d_in) fp64 sum of low-rank updates (factors on the CPU or the device)."""
    u = torch.cat([x.u.to(device, torch.float64) for x in updates])  # (R, d_out)
    v = torch.cat([x.v.to(device, torch.float64) for x in updates])  # (R, d_in)
    return u.t() @ v


def _factors(d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``d`` (d_out, d_in) as factors of its ``rank`` largest singular directions, (r, d_out) and (r, d_in)
    fp32 with ``u^T v`` the truncation, and the share of ``d``'s squared norm they keep."""
    left, sing, right = torch.linalg.svd(d, full_matrices=False)  # (d_out, q), (q,), (q, d_in)
    r = min(rank, int((sing > 0).sum()))
    total = float((sing ** 2).sum())
    kept = float((sing[:r] ** 2).sum()) / total if total > 0 else 1.0
    return (left[:, :r] * sing[:r]).t().float().contiguous(), right[:r].float().contiguous(), kept
