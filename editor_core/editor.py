"""MendEditor: gradient factors in, better-behaved low-rank weight deltas out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from editor_core import checkpoint
from editor_core.batching import (
    TokenBatch,
    build_batch,
    label_requests,
    per_request_mean_nll,
    per_request_target_nll,
    prompt_ids,
    target_labels,
    target_positions,
    without_last_input,
)
from editor_core.config import INFERENCE_FIELDS, MendConfig
from editor_core.delta import EditDelta, LowRankUpdate, join_updates
from editor_core.fingerprint import model_fingerprint, weights_fingerprint
from editor_core.functional_edit import added_updates
from editor_core.grads import TokenFactors, capture_factors
from editor_core.methods.values import SubjectKeyReader
from editor_core.models import device_of
from editor_core.nets import MendNets
from editor_core.preserved_solve import KeptInverse, preserved_inverse, preserved_update
from editor_core.requests import EditRequest
from editor_core.stack import EditStack
from editor_core.stats import STATS_FILE as LOCATE_STATS_FILE
from editor_core.stats import KeyStats, StatsError
from editor_core.tail import SplitTail, checked_split, prefix_states, tail_logits
from editor_core.targets import Target, out_proj_targets, resolve_targets

log = logging.getLogger(__name__)

# key statistics of the editor's own layers, beside its checkpoint (for config.preserve_lambda > 0); without
# it the editor reads the locate-then-edit statistics shipped in the same directory (stats.STATS_FILE), which
# serve an editor whose targets are those methods' layers with no second copy
STATS_FILE = "mend_keystats.safetensors"

# a refinement pass's check: given which requests took (n,) bool, the requests still to write (n,) bool
Check = Callable[[torch.Tensor], torch.Tensor]

# key_prefixes' reader: given a pass's bare keys (target -> (n, d_in)), the requests that have a subject
# (m,) and their keys averaged over the wordings (target -> (m, d_in))
MeanKeys = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class MendEditor:
    """Computes MEND edits for the targets of one model; never mutates the model."""

    method = "mend"

    def __init__(
        self, nets: MendNets, config: MendConfig, targets: list[Target], fingerprint: str, editor_id: str,
        stack: EditStack | None = None,
    ):
        missing = [t.name for t in targets if t.name not in nets.target_names]
        if missing:
            raise ValueError(f"editor has no nets for targets {missing}")
        self.nets = nets.eval()
        self.config = config
        if config.edit_targets:  # the nets cover every trained target; an edit writes only these
            unknown = sorted(set(config.edit_targets) - {t.name for t in targets})
            if unknown:
                raise ValueError(f"edit_targets {unknown} are not among the editor's targets")
            targets = [t for t in targets if t.name in config.edit_targets]
        self.targets = targets
        self.fingerprint = fingerprint
        self.editor_id = editor_id
        # target name -> (lam C + keep K_p^T K_p)^-1 of its inputs, for config.preserve_lambda > 0
        self.preserved: dict[str, KeptInverse] = {}
        self.stack = stack  # where the earlier edits' keys are read (config.preserve_keep > 0)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def untrained(cls, stack: EditStack, config: MendConfig | None = None) -> MendEditor:
        """Identity-initialised editor: its edit is a plain gradient step of size ``init_lr``."""
        config = config or MendConfig()
        targets = _stack_targets(stack, config)
        nets = MendNets(targets, config.rank, config.n_blocks, config.init_lr).to(device_of(stack.model))
        return cls(nets, config, targets, stack.fingerprint, editor_id="untrained", stack=stack)

    @classmethod
    def load(cls, path: str | Path, stack: EditStack, settings: dict | None = None) -> MendEditor:
        """Load a trained editor for the model behind ``stack``; refuses another model's editor.

        ``settings`` replaces inference fields of the checkpoint's config (``INFERENCE_FIELDS``), to try
        another way of applying the same nets.
        """
        ckpt = checkpoint.load(path)
        if settings:
            unknown = sorted(set(settings) - set(INFERENCE_FIELDS))
            if unknown:
                raise ValueError(f"{unknown} are not inference settings of a MEND editor ({', '.join(INFERENCE_FIELDS)})")
            ckpt.config = replace(ckpt.config, **settings)
        targets = _stack_targets(stack, ckpt.config)
        # the editor was trained on a stack of exactly its own targets; the service's stack may cover
        # more (the locate-then-edit layers), so compare the fingerprint of the editor's targets: the
        # exact one, or the bf16-rounded one (the same checkpoint loaded in another dtype, e.g. bf16)
        trained_for = ckpt.info.get("model_fingerprint")
        mine = model_fingerprint(stack.model, targets)
        trained_weights = ckpt.info.get("weights_fingerprint")
        if trained_for and trained_for != mine and not (
                trained_weights and trained_weights == weights_fingerprint(stack.model, targets)):
            raise ValueError(
                f"editor at {path} was trained for model {trained_for[:12]}..., "
                f"this model is {mine[:12]}...; train an editor for it with `mend train`"
            )
        nets = MendNets(targets, ckpt.config.rank, ckpt.config.n_blocks, ckpt.config.init_lr)
        nets.load_state_dict(ckpt.state)
        nets.to(device_of(stack.model))  # the checkpoint loads on the CPU; the factors come from the model's device
        editor_id = ckpt.info.get("editor_id", Path(path).name)
        editor = cls(nets, ckpt.config, targets, stack.fingerprint, editor_id=editor_id, stack=stack)
        if ckpt.config.preserve_lambda > 0:
            stats_path = statistics_path(path)
            try:
                stats = KeyStats.load(stats_path)
            except StatsError as err:
                raise ValueError(f"editor at {path} re-solves its updates against key statistics "
                                 f"(preserve_lambda {ckpt.config.preserve_lambda:g}; its own {STATS_FILE}, else "
                                 f"the locate methods' {LOCATE_STATS_FILE}): {err}") from err
            editor.use_statistics(stats, stack.model, source=str(stats_path))
        log.info("loaded MEND editor %s (nets for %d targets, edits %d) from %s", editor_id, len(targets),
                 len(editor.targets), path)
        return editor

    # ---- editing -------------------------------------------------------------------------------
    def updates_from_factors(self, factors: TokenFactors) -> dict[str, LowRankUpdate]:
        """Differentiable in the editor: dW_t = -lr_t * sum_tokens delta~ x~^T, kept as factors."""
        updates = {}
        for t in self.targets:
            x = factors.x[t.name].float()  # (N, d_in)
            delta = factors.delta[t.name].float()  # (N, d_out)
            x_t, delta_t = self.nets.transform(t.name, x, delta)
            updates[t.name] = LowRankUpdate(u=-self.nets.lr(t.name) * delta_t, v=x_t)  # (N, d_out), (N, d_in)
        return updates

    def factor_subjects(self, subjects: list[str | None]) -> list[str | None] | None:
        """Subjects to key the factors on, per ``config.factor_tokens`` (None = all tokens)."""
        return subjects if self.config.factor_tokens == "subject" else None

    def use_statistics(self, stats: KeyStats, model: nn.Module, source: str = "the key statistics") -> list[str]:
        """Re-solve the updates of the targets ``stats`` covers against them (``preserve_lambda`` > 0).

        ``stats`` holds E[k k^T] of MLP output-projection inputs per layer (``mend stats``); returns the
        names of the editor's targets it covers. The others keep MEND's sum of rank-one terms. Statistics
        of another model, or covering none of the targets, are refused (``source`` names them).
        """
        if self.config.preserve_lambda <= 0:
            raise ValueError("preserve_lambda is 0: the editor makes MEND's sum, it has no use for statistics")
        if not stats.fits(model):
            raise ValueError(f"{source} holds key statistics of another model")
        mine = {t.name for t in self.targets}
        covered = [t for t in out_proj_targets(model, stats.layers) if t.name in mine]
        if not covered:
            raise ValueError(f"{source} covers none of the editor's targets ({', '.join(sorted(mine))})")
        self.preserved = {t.name: KeptInverse(preserved_inverse(stats.moments[t.block], self.config.preserve_lambda)
                                              .to(device_of(model)), self.config.preserve_keep) for t in covered}
        return [t.name for t in covered]

    def _pass(self, model: nn.Module, batch: TokenBatch, so_far: dict[str, list[LowRankUpdate]],
              inverses: dict[str, torch.Tensor], request_of_row: torch.Tensor,
              mean_keys: MeanKeys | None = None,
              run: Callable[[], torch.Tensor] | None = None, check: Check | None = None,
              size: float = 1.0, held: dict[str, torch.Tensor] | None = None,
              checked: torch.Tensor | None = None) -> tuple[dict[str, LowRankUpdate], dict[str, torch.Tensor], torch.Tensor] | None:
        """One forward/backward on the model as the updates ``so_far`` leave it: the next updates, the keys
        the re-solved ones were solved at (target name -> (n, d_in)), and which requests they write (n,).

        ``run`` gives the logits at the target positions (the tail from cached prefix states). With
        ``check``, the forward's verdict per request (is every target token of it already greedy under
        ``so_far``?) is passed to it, and it answers which requests this pass still writes: the others
        give no gradient and no rows, and their keys ask the re-solve for no change (the other facts'
        rows leave their outputs about where they are, up to the ridge's coupling of the keys). None is
        returned when it answers none (then no backward runs: the check of the edit so far is this
        pass's own forward).

        ``request_of_row`` (B,): the request of each batch row. Each request's gradient is the one it
        would have alone (a batch of facts is not a batch-mean loss, which would shrink every fact's
        gradient by their number below what the nets were trained on), and each key of the re-solve
        asks for what its own request's proposal does there. ``mean_keys`` (``key_prefixes``), run on
        the model as ``so_far`` leaves it with this pass's bare keys, gives the keys to re-solve at
        instead of the bare prompts'. The updates are written times ``size``. ``held`` (target ->
        (h, d_in)): keys of requests of the edit that are not in ``batch`` (they have taken); the
        re-solve asks them for no change, as it does the keys of requests this pass does not write.
        ``checked`` (B,) bool: the rows whose target tokens the check reads (None: every row).
        """
        scale = self.config.gradient_scale
        n = int(request_of_row.max()) + 1
        writing = torch.ones(n, dtype=torch.bool, device=request_of_row.device)  # (n,) the check may narrow it

        def loss_fn(logits: torch.Tensor, b: TokenBatch) -> torch.Tensor:
            weight = None if bool(writing.all()) else writing.float()  # None: bit for bit the plain sum
            return per_request_target_nll(request_of_row, weight)(logits, b) * scale  # times 1.0 is exact

        def took_and_stop(logits: torch.Tensor) -> bool:  # (N, V) at the target positions
            writing.copy_(check(self._taken(logits, batch, request_of_row, checked)))
            return not bool(writing.any())

        with added_updates(model, join_updates(so_far)):  # output layer at targets only
            factors = capture_factors(model, self.targets, batch, run=run, loss_fn=loss_fn,
                                      stop=took_and_stop if check is not None else None)
        if factors is None:
            return None
        with torch.no_grad():
            # "last": one key per request, its bare prompt's last factor token (the first of its rows; those
            # behind edit_prefixes give gradient, not keys)
            rows = (last_of_each_row(factors.row)[first_of_each(request_of_row)]
                    if self.config.preserve_keys == "last" else slice(None))
            keys = {name: factors.x[name][rows] for name in inverses}  # (n, d_in) each
            if mean_keys is not None:
                with added_updates(model, join_updates(so_far)):
                    index, averaged = mean_keys(keys)  # (m,) requests with a subject, their (m, d_in) keys
                keys = {name: k.index_copy(0, index, averaged[name].to(k.dtype)) for name, k in keys.items()}
            updates = self.updates_from_factors(factors)
            factor_owner = request_of_row[factors.row]  # (N,)
            key_owner = factor_owner[rows]
            if not bool(writing.all()):  # the nets map a zero gradient to a small nonzero row: drop it exactly
                updates = {name: LowRankUpdate(u.u * writing[factor_owner].unsqueeze(1).to(u.u), u.v)
                           for name, u in updates.items()}
            for name, inverse in inverses.items():
                solve_at, owner = keys[name], key_owner
                if held:  # owner -1: no factor row is theirs, so the solve asks no change there
                    solve_at = torch.cat([solve_at, held[name].to(solve_at)])
                    owner = torch.cat([owner, owner.new_full((held[name].shape[0],), -1)])
                solved = preserved_update(updates[name], solve_at, inverse, (owner, factor_owner))
                # the held keys' rows are zero (no change asked): only this pass's keys' rows are kept
                updates[name] = _rows_of(solved, slice(0, len(key_owner))) if held else solved
            if not bool(writing.all()):  # rows of requests not written are zero: leave them out of the delta
                updates = {name: _rows_of(u, writing[key_owner if name in inverses else factor_owner])
                           for name, u in updates.items()}
        return {name: LowRankUpdate((size * u.u if size != 1 else u.u).detach(), u.v.detach())
                for name, u in updates.items()}, keys, writing

    def _taken(self, logits: torch.Tensor, batch: TokenBatch, request_of_row: torch.Tensor,
               checked: torch.Tensor | None = None) -> torch.Tensor:
        """(n,) bool: has each request taken? Every target token of it is greedy in ``logits`` (N, V) at the
        target positions, in the rows ``checked`` (B,) bool or every row (and, with ``config.take_nll``,
        its mean target NLL over every row is at most that)."""
        n = int(request_of_row.max()) + 1
        wrong = logits.argmax(-1) != target_labels(batch)  # (N,)
        if checked is not None:
            wrong &= label_requests(batch, checked)
        missed = label_requests(batch, request_of_row)[wrong]  # (misses,)
        took = torch.bincount(missed, minlength=n) == 0  # (n,)
        if self.config.take_nll > 0:
            took &= per_request_mean_nll(logits, batch, request_of_row) <= self.config.take_nll
        return took

    def _earlier_keys(self, name: str) -> list[tuple[str, torch.Tensor]]:
        """[(edit id, keys (m, d_in))] of the stack's active edits that journaled keys at ``name``."""
        if self.stack is None or self.config.preserve_keep <= 0:
            return []
        found = [(i, self.stack.delta_of(i).keys.get(name)) for i in self.stack.active_ids]
        return [(i, k) for i, k in found if k is not None]

    def _mean_keys(self, model: nn.Module, tokenizer, requests: list[EditRequest], first: int
                   ) -> MeanKeys | None:
        """A reader of each request's key at every re-solved target, averaged over the bare prompt and the
        prompt behind each of ``config.key_prefixes`` (a request without its subject in the prompt: the
        bare prompt's last factor token, as without prefixes). The edit writes blocks ``first..`` only,
        so what enters block ``first`` is computed once, and each read runs blocks ``first`` to the last
        re-solved target's. With ``config.key_reads`` "first_pass" only the first call reads; later
        ones add its offset from the bare keys it was given to theirs. None when no request names a
        subject in its prompt: every key stays bare."""
        prefixes = ("", *self.config.key_prefixes)
        targets = [t for t in self.targets if t.name in self.preserved]
        with_subject = [i for i, r in enumerate(requests) if r.subject and r.subject in r.prompt]
        if not with_subject:
            return None
        index = torch.tensor(with_subject, dtype=torch.long, device=device_of(model))  # (m,)
        reader = SubjectKeyReader(model, tokenizer, [(requests[i].prompt, requests[i].subject) for i in with_subject],
                                  targets, prefixes, first)

        offset: dict[str, torch.Tensor] = {}  # target -> (m, d_in): averaged minus bare, first pass
        once = self.config.key_reads == "first_pass"

        def read(bare: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            # bare: target -> (n, d_in), this pass's key of each request on its bare prompt
            if once and offset:
                return index, {name: bare[name][index] + offset[name] for name in offset}
            # (m * P, d_in) per target, fact-major; averaged over the P wordings: (m, d_in)
            found = reader.read()
            averaged = {name: k.view(len(with_subject), len(prefixes), -1).mean(1) for name, k in found.items()}
            if once:
                offset.update({name: k - bare[name][index].to(k.dtype) for name, k in averaged.items()})
            return index, averaged

        return read

    def compute_delta(self, model: nn.Module, tokenizer, requests: list[EditRequest]) -> EditDelta:
        """One forward/backward on the edit prompts, then the editor nets; the model is untouched.

        With ``config.refine_passes`` > 0, while the new target is not every token's greedy answer,
        another pass on the model as the edit so far leaves it (at most that many, within
        ``config.refine_seconds`` per request); the delta is the sum of the passes' updates, each
        written times ``config.pass_scale``. With ``config.edit_prefixes``, every pass and the check
        also cover each prompt behind each prefix. Each request of a batch is checked on its own: once
        it has taken (and run ``config.extra_passes`` more) the later passes stop writing it.
        """
        if not requests:
            raise ValueError("no edit requests")
        # each request's bare prompt first, then behind each of the edit prefixes: rows request-major
        wordings = ["", *self.config.edit_prefixes]
        rows = [(w + r.prompt, r) for r in requests for w in wordings]
        batch = build_batch(
            tokenizer, [p for p, _ in rows], [r.target for _, r in rows], self.config.max_len,
            subjects=self.factor_subjects([r.subject for _, r in rows]),
        ).to(device_of(model))
        # the last input column predicts nothing the loss reads: every pass runs one column shorter
        batch = without_last_input(batch) or batch
        # the time cap is per fact: a batch's passes each cost about as much as one pass per fact
        deadline = time.perf_counter() + self.config.refine_seconds * len(requests)
        so_far: dict[str, list[LowRankUpdate]] = {t.name: [] for t in self.targets}
        device = device_of(model)
        inverses = {name: kept.inverse([(i, k.to(device)) for i, k in self._earlier_keys(name)])
                    for name, kept in self.preserved.items()}
        passes, journaled = 0, {}
        request_of_row = torch.arange(len(rows), device=device) // len(wordings)  # (B,) rows are request-major
        # the edit writes only blocks first.. : what enters block ``first`` is the same in every pass
        first = min(t.block for t in self.targets)
        mean_keys = (self._mean_keys(model, tokenizer, requests, first)
                     if self.config.key_prefixes and self.preserved else None)
        states = prefix_states(model, batch.input_ids, batch.attention_mask, first)  # (B, T, d)
        select = target_positions(batch)  # (B, T)
        split = (_prefix_split(model, tokenizer, batch, states, select, wordings, first)
                 if self.config.edit_prefixes and self.config.edit_prefix_cache else None)
        if split is not None:  # from here on every row runs from its prompt on (B, T2), its prefix cached
            batch, states, select = split.short_batch(batch), split.short(states), split.short_select(select)

        # each request's passes still to run once its prompt has taken: a fact of a batch stops as it would
        # alone, and the other facts' later passes leave it where it is
        n = len(requests)
        extra = torch.full((n,), self.config.extra_passes, device=device)  # (n,)
        running = torch.ones(n, dtype=torch.bool, device=device)  # (n,) requests the next pass runs
        # (n,) requests whose rows behind the edit prefixes run: all, or (edit_prefixes_from "take") those
        # whose bare prompt has taken; (B,) the bare prompt's rows, which every running request runs
        wide = torch.full((n,), self.config.edit_prefixes_from == "first_pass", device=device)
        bare_row = torch.arange(len(request_of_row), device=device) % len(wordings) == 0
        checked = None if self.config.check_prefixed else bare_row  # (B,) the rows the take is read on
        # a pass runs only the rows of the requests still writing, once some have finished (a batch's hardest
        # fact no longer costs every fact's rows); their keys stay in the re-solve as they were last solved
        # at. Only where the re-solve has one key per request (or none): "all" keys would need every token
        narrows = not inverses or self.config.preserve_keys == "last"
        solved_at: dict[str, torch.Tensor] = {}  # target -> (n, d_in) each request's key at its latest pass
        bare_at: dict[str, torch.Tensor] = {}  # target -> (n, d_in) each request's bare key at its latest pass
        written = torch.zeros(n, dtype=torch.long, device=device)  # (n,) passes that wrote each
        verified = False  # every request was just checked again, and no pass has written since
        momentum = self.config.pass_momentum if n == 1 else 0.0  # one request only (a batch's facts take apart)
        while True:
            ids = running.nonzero().squeeze(-1)  # (m,) the requests this pass runs
            rows = (running[request_of_row] & (bare_row | wide[request_of_row])).nonzero().squeeze(-1)  # (b,)
            part = len(rows) < len(request_of_row)
            local = torch.full((n,), -1, dtype=torch.long, device=device)
            local[ids] = torch.arange(len(ids), device=device)  # request -> its index in this pass

            def check(took: torch.Tensor, ids: torch.Tensor = ids) -> torch.Tensor:  # (m,) -> (m,) to write
                extra[ids] -= took.to(extra.dtype)
                wide[ids] |= took  # its later passes and checks also run it behind the edit prefixes
                return ~(took & (extra[ids] < 0))

            # from the second pass on, its forward is also the check: stop once every target token is greedy
            size = self.config.pass_scale * (self.config.first_pass_times if passes == 0 else 1.0)
            found = self._pass(
                model, _rows_of_batch(batch, rows) if part else batch, so_far, inverses,
                local[request_of_row[rows]] if part else request_of_row,
                _narrowed_keys(mean_keys, bare_at, ids, local) if mean_keys else None,
                run=_tail_run(model, first, states, batch.attention_mask, select, rows if part else None, split),
                check=check if passes > 0 else None, size=size,
                held={name: k[~running] for name, k in solved_at.items()} if len(ids) < n else None,
                checked=checked[rows] if checked is not None and part else checked)
            if found is None:
                if not part or verified:
                    break
                # the finished requests were not run since they finished: one forward over every row checks
                # them all again, and those that no longer take (later facts' passes moved them) write again
                with torch.no_grad(), added_updates(model, join_updates(so_far)):
                    logits = _tail_run(model, first, states, batch.attention_mask, select, None, split)()  # (N, V)
                    running = ~self._taken(logits, batch, request_of_row, checked)  # (n,)
                if not bool(running.any()):
                    break
                verified = True
                continue
            verified = False
            # the forward after a request's last extra pass checks it again before it ends: an extra pass that
            # lowers its mean target NLL can still drop one of its target tokens from greedy (session 23: ending
            # without that check cost 13 of 300 single edits their success)
            updates, keys, writing = found
            written[ids] += writing.long()
            if momentum and bool(extra[0] == self.config.extra_passes):  # not taken yet: every pass so far grew
                # heavy ball: pass p, k = passes - p passes back, goes from weight 1 + m + ... + m^(k-1) to
                # 1 + ... + m^k. Only the passes before the take ever grow, so k alone gives both weights
                for name, ups in so_far.items():
                    so_far[name] = [LowRankUpdate(u.u * _momentum_growth(momentum, passes - p), u.v)
                                    for p, u in enumerate(ups)]
            for name, upd in updates.items():
                so_far[name].append(upd)
            if narrows and inverses:
                for name, k in keys.items():  # (m, d_in) the keys this pass's requests were solved at
                    solved_at[name] = solved_at.get(name, torch.zeros(n, k.shape[1], dtype=k.dtype,
                                                                      device=device)).index_copy(0, ids, k)
            # the first pass's keys, where the facts were before this edit (the bare prompts')
            journaled = journaled or dict(keys)
            passes += 1
            if passes > self.config.refine_passes or time.perf_counter() > deadline:
                break
            if narrows:
                running[ids] = writing
        meta = {"method": self.method, "editor": self.editor_id, "n_requests": str(len(requests)),
                "passes": str(passes)}
        if len(requests) > 1:
            meta["passes_per_request"] = ",".join(str(int(w)) for w in written)
        if self.preserved:
            meta["preserve_lambda"] = f"{self.config.preserve_lambda:g}"
        if self.config.pass_scale != 1:
            meta["pass_scale"] = f"{self.config.pass_scale:g}"
        if momentum:
            meta["pass_momentum"] = f"{momentum:g}"
        if self.config.first_pass_times != 1:
            meta["first_pass_times"] = f"{self.config.first_pass_times:g}"
        if self.config.extra_passes:
            meta["extra_passes"] = str(self.config.extra_passes)
        if self.config.take_nll:
            meta["take_nll"] = f"{self.config.take_nll:g}"
        if self.config.gradient_scale != 1:
            meta["gradient_scale"] = f"{self.config.gradient_scale:g}"
        if self.config.edit_prefixes:
            meta["edit_prefixes"] = str(len(self.config.edit_prefixes))
            if self.config.edit_prefixes_from != "first_pass":
                meta["edit_prefixes_from"] = self.config.edit_prefixes_from
            if not self.config.check_prefixed:
                meta["check_prefixed"] = "false"
        if mean_keys is not None:
            meta["key_prefixes"] = str(len(self.config.key_prefixes))
            if self.config.key_reads != "every_pass":
                meta["key_reads"] = self.config.key_reads
        return EditDelta(join_updates(so_far), self.fingerprint, meta, keys={n: k.detach() for n, k in journaled.items()})


def _momentum_growth(m: float, k: int) -> float:
    """(1 + m + ... + m^k) / (1 + m + ... + m^(k-1)): the growth of a pass k >= 1 passes back."""
    return (1 - m ** (k + 1)) / (1 - m ** k)


def statistics_path(editor_dir: str | Path) -> Path:
    """The key statistics an editor in ``editor_dir`` re-solves against: its own, else the shipped locate ones."""
    own = Path(editor_dir) / STATS_FILE
    return own if own.exists() else Path(editor_dir) / LOCATE_STATS_FILE


def first_of_each(owner: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the first of each run of equal values in ``owner`` (B,), e.g. each request's first batch row."""
    first = torch.ones_like(owner, dtype=torch.bool)  # (B,)
    first[1:] = owner[1:] != owner[:-1]
    return first


def last_of_each_row(row: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last factor token of each batch row, from the tokens' rows (N,) in order."""
    last = torch.ones_like(row, dtype=torch.bool)  # (N,)
    last[:-1] = row[1:] != row[:-1]
    return last.nonzero().squeeze(-1)


def _tail_run(model: nn.Module, first: int, states: torch.Tensor, attention_mask: torch.Tensor,
              select: torch.Tensor, rows: torch.Tensor | None, split: SplitTail | None = None
              ) -> Callable[[], torch.Tensor]:
    """The logits (N, V) at ``select`` (B, T) from the states entering block ``first`` (B, T, d), of the
    batch rows ``rows`` (b,) only when given; with ``split``, the states are its short rows and what
    precedes them is its cache."""
    if rows is not None:
        states, attention_mask, select = states[rows], attention_mask[rows], select[rows]
    if split is not None:
        return lambda: split.logits(states, select, rows)
    return lambda: tail_logits(model, first, states, attention_mask, select)


def prefix_cuts(tokenizer, batch: TokenBatch, wordings: list[str]) -> torch.Tensor:
    """(B,) where each row's own text starts: the tokens a row behind an edit prefix shares with that
    prefix alone (rows are request-major over ``wordings``, the bare prompt's "" first: cut 0), never
    past the row's first factor token or first target position."""
    openings = [prompt_ids(tokenizer, w) if w else [] for w in wordings]  # the prefix alone, as a prompt starts
    cut = []
    for b, row in enumerate(batch.input_ids.tolist()):
        opening = openings[b % len(wordings)][: len(row)]
        differs = [i for i, (a, o) in enumerate(zip(row, opening, strict=False)) if a != o]
        cut.append(differs[0] if differs else len(opening))
    cut = torch.tensor(cut, dtype=torch.long, device=batch.input_ids.device)  # (B,)
    first_factor = batch.factor_mask.float().argmax(-1)  # (B,) every row has one (its subject, else all)
    first_target = target_positions(batch).float().argmax(-1)  # (B,) every row has a target
    return torch.minimum(cut, torch.minimum(first_factor, first_target))


def _prefix_split(model: nn.Module, tokenizer, batch: TokenBatch, states: torch.Tensor, select: torch.Tensor,
                  wordings: list[str], first: int) -> SplitTail | None:
    """The tail of ``batch`` (B, T) cut where each row's prompt starts behind its edit prefix, its prefix's
    keys and values cached from ``states`` (B, T, d) on the model as it is now; None where the cut does
    not fit the model. The first edit of a model checks the cut against the full tail's logits at
    ``select`` (B, T) once (one more forward); later edits of it trust it."""
    cut = prefix_cuts(tokenizer, batch, wordings)  # (B,)
    if not bool(cut.any()):  # every row's factors start at its first token (factor_tokens "all"): nothing to cache
        return None
    return checked_split(model, first, states, batch.attention_mask, cut, select,
                         lambda: tail_logits(model, first, states, batch.attention_mask, select),
                         "MEND's edit prefixes", once=True)


def _rows_of_batch(batch: TokenBatch, rows: torch.Tensor) -> TokenBatch:
    """The batch rows ``rows`` (b,) of ``batch``."""
    key = batch.key_mask[rows] if batch.key_mask is not None else None
    return TokenBatch(batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows], key)


def _narrowed_keys(mean_keys: MeanKeys, bare_at: dict[str, torch.Tensor], ids: torch.Tensor,
                   local: torch.Tensor) -> MeanKeys:
    """``mean_keys`` for a pass that runs the requests ``ids`` (m,) only. ``bare_at`` (target -> (n, d_in))
    keeps each request's bare key from the latest pass that ran it; ``local`` (n,) maps a request to its
    index in this pass (-1: not run). The averaged keys returned are this pass's requests', indexed as
    in this pass."""
    def read(bare: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        for name, k in bare.items():  # (m, d_in)
            known = bare_at.get(name, torch.zeros(len(local), k.shape[1], dtype=k.dtype, device=k.device))
            bare_at[name] = known.index_copy(0, ids, k)
        index, averaged = mean_keys(dict(bare_at))  # (s,) requests with a subject, (s, d_in) each
        mine = local[index] >= 0  # (s,) those this pass runs
        return local[index][mine], {name: a[mine] for name, a in averaged.items()}
    return read


def _rows_of(update: LowRankUpdate, keep: torch.Tensor) -> LowRankUpdate:
    """The rows ``keep`` (r,) bool of an update's factors."""
    return LowRankUpdate(update.u[keep], update.v[keep])


def _stack_targets(stack: EditStack, config: MendConfig) -> list[Target]:
    """The editor's own targets (its config's names, else its blocks), which the stack must cover."""
    names = list(config.targets) or [
        t.name for t in resolve_targets(stack.model, None, config.last_blocks, config.blocks or None)]
    unknown = [n for n in names if n not in stack.targets]
    if unknown:
        raise ValueError(f"editor targets {unknown} are not in the edit stack")
    return [stack.targets[n] for n in names]
