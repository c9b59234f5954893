"""Meta-train a MEND editor: ``mend train``.

Each step samples ``edits_per_step`` records, computes one batched edit from their gradient factors,
and trains the editor nets (not the model) on

    c_edit * NLL(post-edit model, target_new | prompt and rephrases)
  + c_loc  * KL(pre || post) at the answer positions of the records' locality prompts
  + c_other * KL(pre || post) at the true answers of ``loc_others`` other training records' prompts.

The records' own locality prompts are their neighbours (same relation, other subjects); the other
records' prompts are facts of any relation the edit must leave alone too, as the service's canaries are.

With ``mend.preserve_lambda`` > 0 each proposal is re-solved against key statistics (``stats``) at each
record's key, as one inference pass of the editor writes it (:mod:`editor_core.preserved_solve`, MALMEN's
normal equation with ``C`` as the preserved term), and the nets are trained through that solve: they learn
what to propose for the update that is actually written, not for MEND's sum of rank-one terms.

With ``sequence`` > 1 the steps come in sequences of that many edits applied one after another (RLEdit's
lifelong training, Li et al., ICML 2025): each step edits the model as the sequence's earlier steps left
it (their updates, detached, stay applied, and with ``mend.preserve_keep`` their keys join the re-solve's
preserved term as they do at inference), and the loss adds

  + c_keep * NLL(post-edit model, each earlier edit's target_new | its prompt)

so the nets learn to edit an already-edited model without undoing what it was taught. The locality KL
is then taken against the model before this step (what this edit changes), or with ``loc_against``
"unedited" against the unedited model on the neighbours of every edit of the sequence so far.

Only the edited tail of the model runs per step: the hidden states entering the first edited block
are cached once per text (:class:`PrefixStateCache`). Validation edits held-out records one at a time
and tracks efficacy, paraphrase and neighborhood; the best checkpoint by their mean is kept. With
``val_stacked`` the held-out records are also edited one after another into one model and scored at the
end (``stacked_*``), and the score is the mean of the two.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from editor_core import checkpoint, models
from editor_core.batching import (
    TokenBatch,
    build_batch,
    greedy_rows,
    kl_pre_post,
    selected_target_nll,
    target_positions,
    token_logprobs,
)
from editor_core.config import MendConfig
from editor_core.data import EditRecord, load_records, split_records
from editor_core.delta import LowRankUpdate, join_updates
from editor_core.editor import STATS_FILE as MEND_STATS_FILE
from editor_core.editor import MendEditor, last_of_each_row
from editor_core.fingerprint import weights_fingerprint
from editor_core.functional_edit import added_updates
from editor_core.grads import TokenFactors, capture_factors
from editor_core.preserved_solve import preserved_update
from editor_core.stack import EditStack
from editor_core.state_cache import PrefixStateCache
from editor_core.stats import KeyStats
from editor_core.tail import tail_logits
from editor_core.targets import resolve_targets
from editor_core.train_card import device_description, write_card
from editor_core.training_plot import plot_history

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in the checkpoint's JSON."""

    model: str = models.DEFAULT_MODEL
    data: list[str] = field(default_factory=lambda: ["../shared/data/counterfact-train.json"])
    format: str = "auto"
    out: str = "runs/mend"
    val_size: int = 128  # records held out of the training files for model selection
    edits_per_step: int = 4
    steps: int = 1000
    lr: float = 1e-4  # Adam lr of the editor nets
    lr_lr: float = 1e-2  # Adam lr of the log edit step sizes
    c_edit: float = 0.1
    c_loc: float = 1.0
    # edits applied one after another before the model is reset (1: every step edits the unedited model)
    sequence: int = 1
    c_keep: float = 0.1  # weight of the earlier edits' NLL within a sequence (c_edit's default: as much as the current one)
    val_stacked: bool = False  # also validate the held-out records edited one after another
    # what the locality KL compares the post-edit model with: "step", the model before this step (what this
    # edit changes); "unedited", the unedited model, on the neighbours of every edit of the sequence so far
    # (what the whole sequence has changed, so damage that builds up over a sequence is charged too)
    loc_against: str = "step"
    # prompts of other training records (not in the step's batch) whose true answers each step's edit must
    # leave alone, weighted by c_other: locality beyond the records' own neighbours (0: none)
    loc_others: int = 0
    c_other: float = 1.0
    val_every: int = 100
    patience: int = 5  # validations without improvement before stopping
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    # bf16 autocast of the passes no editor gradient flows through (frozen prefix, pre-edit locality logits,
    # the edit's gradient factors); the post-edit passes that train the editor stay in the model's dtype.
    # "auto": bf16 on a CUDA device that supports it with an fp32 model, else off
    autocast: str = "auto"
    prefix_cache: bool = True
    limit: int | None = None  # read at most this many records per file
    init_from: str | None = None  # continue from this checkpoint's nets (its MendConfig wins)
    # key statistics (a ``mend stats`` file) each edit is re-solved against when mend.preserve_lambda > 0;
    # saved beside the checkpoint, where the editor reads them at inference
    stats: str | None = None
    mend: MendConfig = field(default_factory=MendConfig)

    def __post_init__(self) -> None:
        if self.sequence < 1:
            raise ValueError(f"sequence must be >= 1 (edits applied one after another), not {self.sequence}")
        if self.loc_against not in ("step", "unedited"):
            raise ValueError(f"loc_against must be 'step' or 'unedited', not {self.loc_against!r}")
        if self.loc_others < 0:
            raise ValueError(f"loc_others must be >= 0 (other records' prompts per step), not {self.loc_others}")


def _pairs_batch(tok, pairs: list[tuple[str, str]], max_len: int) -> TokenBatch:
    return build_batch(tok, [p for p, _ in pairs], [t for _, t in pairs], max_len)


def _mean_logprobs(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """(B,) mean log-prob of each row's target tokens."""
    lp = token_logprobs(logits, batch)  # (B, T-1)
    return lp.sum(-1) / batch.target_mask.sum(-1).clamp(min=1)


@dataclass
class AppliedEdit:
    """One edit of a sequence, left applied while the next ones are made (detached from the nets)."""

    id: str
    records: list[EditRecord]
    updates: dict[str, LowRankUpdate]
    keys: dict[str, torch.Tensor]  # re-solved target -> (n, d_in) the keys it was solved at


@dataclass
class HeldAnswers:
    """(prompt, answer) pairs an edit must leave alone, with their answers' log-probs before it."""

    batch: TokenBatch
    select: torch.Tensor  # (B, T) bool: the answer positions
    pre: torch.Tensor  # (N, V) log-probs at those positions before the edit


def applied_updates(earlier: list[AppliedEdit]) -> dict[str, LowRankUpdate]:
    """The earlier edits' updates as one per target (their sum)."""
    parts: dict[str, list[LowRankUpdate]] = {}
    for e in earlier:
        for name, u in e.updates.items():
            parts.setdefault(name, []).append(u)
    return join_updates(parts)


def _detached(updates: dict[str, LowRankUpdate]) -> dict[str, LowRankUpdate]:
    return {n: LowRankUpdate(u.u.detach(), u.v.detach()) for n, u in updates.items()}


class EditorTrainer:
    """Owns the frozen model, the editor being trained, its optimizer and the prefix cache."""

    def __init__(self, cfg: TrainConfig, lm: models.LoadedModel):
        self.cfg, self.model, self.tok = cfg, lm.model, lm.tokenizer
        start = checkpoint.load(cfg.init_from) if cfg.init_from else None
        if start is not None:
            cfg.mend = start.config
        targets = resolve_targets(self.model, cfg.mend.targets or None, cfg.mend.last_blocks, cfg.mend.blocks)
        cfg.mend.targets = [t.name for t in targets]
        self.stack = EditStack(self.model, targets)  # only for the fingerprint; never applied to
        self.weights_fingerprint = weights_fingerprint(self.model, targets)  # dtype-insensitive one
        self.editor = MendEditor.untrained(self.stack, cfg.mend)
        if start is not None:
            self.editor.nets.load_state_dict(start.state)
            log.info("continuing from %s", cfg.init_from)
        # target name -> (lam C)^-1 (d_in, d_in): the targets whose proposals are re-solved
        self.inverses = self._preserved_inverses(cfg)
        self.applied: list[AppliedEdit] = []  # the current sequence's earlier edits
        self.edits_made = 0  # ids of applied edits, for the memoised preserved inverses
        self.first = min(t.block for t in targets)
        self.autocast = resolve_autocast(cfg)
        self.cache = PrefixStateCache(self.model, self.first, enabled=cfg.prefix_cache)
        nets = self.editor.nets.to(cfg.device)
        self.opt = torch.optim.Adam([
            {"params": nets.editor_parameters(), "lr": cfg.lr},
            {"params": [nets.log_lr], "lr": cfg.lr_lr},
        ])

    def _preserved_inverses(self, cfg: TrainConfig) -> dict[str, torch.Tensor]:
        if cfg.mend.preserve_lambda <= 0:
            return {}
        if cfg.mend.preserve_keys != "last":
            raise ValueError("training re-solves at one key per record, its last factor token: preserve_keys "
                             f"must be 'last', not {cfg.mend.preserve_keys!r}")
        if not cfg.stats:
            raise ValueError(f"preserve_lambda {cfg.mend.preserve_lambda:g} re-solves each training edit against key "
                             "statistics: give them (--stats, a `mend stats` file)")
        self.editor.use_statistics(KeyStats.load(cfg.stats), self.model, source=cfg.stats)
        # no earlier edits during training: each edit is solved against (lam C)^-1 alone
        return {name: kept.inverse([]).to(cfg.device) for name, kept in self.editor.preserved.items()}

    def _amp(self):
        """bf16 autocast when enabled (see ``TrainConfig.autocast``), else nothing."""
        if self.autocast == "off":
            return nullcontext()
        return torch.autocast(torch.device(self.cfg.device).type, dtype=torch.bfloat16)

    def _states(self, batch: TokenBatch) -> torch.Tensor:
        with self._amp():  # the frozen prefix: no gradient ever flows through it
            return self.cache.states(batch)

    def _tail(self, batch: TokenBatch, select: torch.Tensor | None = None) -> torch.Tensor:
        return tail_logits(self.model, self.first, self._states(batch), batch.attention_mask, select)

    def _edit_updates(self, records: list[EditRecord], earlier: list[AppliedEdit] | None = None):
        """Editor output for one batched edit of ``records`` (differentiable in the editor), and the keys it
        was re-solved at; ``earlier`` are the edits applied before it (their keys join the preserved term)."""
        edit = build_batch(
            self.tok, [r.prompt for r in records], [r.target_new for r in records], self.cfg.mend.max_len,
            subjects=self.editor.factor_subjects([r.subject for r in records]),
        ).to(self.cfg.device)
        states = self._states(edit)
        with self._amp():  # the edit's gradient factors: inputs of the editor, not trained through
            factors = capture_factors(
                self.model, self.editor.targets, edit,
                run=lambda: tail_logits(self.model, self.first, states, edit.attention_mask, target_positions(edit)),
                loss_fn=selected_target_nll,
            )
        updates = self.editor.updates_from_factors(factors)  # editor nets in fp32
        return self._resolved(updates, factors, earlier or [])

    def _resolved(self, updates: dict[str, LowRankUpdate], factors: TokenFactors, earlier: list[AppliedEdit]
                  ) -> tuple[dict[str, LowRankUpdate], dict[str, torch.Tensor]]:
        """``updates`` with the re-solved targets' proposals written as the least-squares update at each
        record's key, its last factor token (``preserve_keys`` "last"); differentiable in the nets. Returns
        them with those keys, (n, d_in) per re-solved target."""
        if not self.inverses:
            return updates, {}
        rows = last_of_each_row(factors.row)  # (n,) one key per record
        owners = (factors.row[rows], factors.row)  # each key asks for its own record's proposal only
        keys = {name: factors.x[name][rows].detach().float() for name in self.inverses}
        inverses = self._inverses_after(earlier)
        solved = {name: preserved_update(u, keys[name], inverses[name], owners) if name in inverses else u
                  for name, u in updates.items()}
        return solved, keys

    def _inverses_after(self, earlier: list[AppliedEdit]) -> dict[str, torch.Tensor]:
        """(lam C + keep K_p^T K_p)^-1 per re-solved target, K_p the keys of ``earlier`` (as inference's
        ``preserve_keep`` reads the stack's active edits); (lam C)^-1 when there are none."""
        if not earlier or self.cfg.mend.preserve_keep <= 0:
            return self.inverses
        return {name: kept.inverse([(e.id, e.keys[name]) for e in earlier]).to(self.inverses[name])
                for name, kept in self.editor.preserved.items()}

    def _remember(self, records: list[EditRecord], updates: dict[str, LowRankUpdate], keys: dict[str, torch.Tensor],
                  into: list[AppliedEdit]) -> None:
        self.edits_made += 1
        into.append(AppliedEdit(str(self.edits_made), records, _detached(updates), keys))

    def step(self, records: list[EditRecord], others: Sequence[EditRecord] = ()) -> dict[str, float]:
        """One meta-training step on a batch of edits; returns the loss terms. ``others``: records whose
        prompts' true answers the edit must leave alone (``c_other``), beside ``records``' neighbours."""
        self.editor.nets.train()
        dev, max_len = self.cfg.device, self.cfg.mend.max_len
        post_pairs = [(p, r.target_new) for r in records for p in (r.prompt, *r.rephrases)]
        unedited = self.cfg.loc_against == "unedited"
        loc_records = [*records, *(r for e in self.applied for r in e.records)] if unedited else records
        loc_pairs = [(lp.prompt, lp.answer) for r in loc_records for lp in r.locality]
        kept_pairs = [(r.prompt, r.target_new) for e in self.applied for r in e.records]
        other_pairs = [(r.prompt, r.ground_truth) for r in others if r.ground_truth is not None]
        post_b = _pairs_batch(self.tok, post_pairs, max_len).to(dev)
        kept_b = _pairs_batch(self.tok, kept_pairs, max_len).to(dev) if kept_pairs else None
        zero = torch.zeros((), device=dev)
        earlier = applied_updates(self.applied)
        with added_updates(self.model, {} if unedited else earlier), torch.no_grad(), self._amp():
            loc, other = self._answers_before(loc_pairs), self._answers_before(other_pairs)
        with added_updates(self.model, earlier):  # the model as the sequence left it
            updates, keys = self._edit_updates(records, self.applied)
            with added_updates(self.model, updates):
                l_edit = selected_target_nll(self._tail(post_b, target_positions(post_b)), post_b)
                l_keep = (selected_target_nll(self._tail(kept_b, target_positions(kept_b)), kept_b)
                          if kept_b is not None else zero)
                l_loc, l_other = self._answers_kl(loc, zero), self._answers_kl(other, zero)
        loss = (self.cfg.c_edit * l_edit + self.cfg.c_keep * l_keep + self.cfg.c_loc * l_loc
                + self.cfg.c_other * l_other)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.editor.nets.parameters(), 10.0)
        self.opt.step()
        if self.cfg.sequence > 1:  # this edit stays applied (as the nets made it) for the sequence's next steps
            self._remember(records, updates, keys, self.applied)
            if len(self.applied) == self.cfg.sequence:
                self.applied = []
        out = {"loss": float(loss.detach()), "edit_nll": float(l_edit.detach()), "loc_kl": float(l_loc.detach()),
               "log_lr": float(self.editor.nets.log_lr.detach().mean())}
        if kept_b is not None:
            out["keep_nll"] = float(l_keep.detach())
        if other is not None:
            out["other_kl"] = float(l_other.detach())
        return out

    def _answers_before(self, pairs: list[tuple[str, str]]) -> HeldAnswers | None:
        """``pairs`` (prompt, answer) as the model now answers them (None for none): the reference an edit's
        KL is taken against. Logits only at the answer positions, where the KL reads them."""
        if not pairs:
            return None
        batch = _pairs_batch(self.tok, pairs, self.cfg.mend.max_len).to(self.cfg.device)
        select = target_positions(batch)
        return HeldAnswers(batch, select, torch.log_softmax(self._tail(batch, select).float(), -1))

    def _answers_kl(self, held: HeldAnswers | None, zero: torch.Tensor) -> torch.Tensor:
        """Mean KL(before || now) over ``held``'s answer positions, on the model as it is now."""
        if held is None:
            return zero
        post = self._tail(held.batch, held.select)  # (N, V)
        return kl_pre_post(held.pre, post, torch.ones(post.shape[0], device=post.device))

    @torch.no_grad()
    def validate(self, records: list[EditRecord], edit: bool = True) -> dict[str, float]:
        """Edit each record alone (editor in eval mode) and score it, as a user would see it; with
        ``val_stacked`` (and ``edit``) also :meth:`validate_stacked`, and the score is the mean of the two."""
        self.editor.nets.eval()
        hits: dict[str, list[float]] = {}
        for r in records:
            if r.ground_truth is None:
                continue
            with torch.enable_grad():
                updates = _detached(self._edit_updates([r])[0]) if edit else {}
            self._score(r, updates, hits)
        out = _rates(hits)
        if self.cfg.val_stacked and edit:
            stacked = self.validate_stacked(records)
            out.update({f"stacked_{k}": v for k, v in stacked.items()})
            out["score"] = (out["score"] + stacked["score"]) / 2
        return out

    @torch.no_grad()
    def validate_stacked(self, records: list[EditRecord]) -> dict[str, float]:
        """Edit the records one after another into one model (each on the model the earlier ones left, with
        their keys preserved as ``preserve_keep`` asks) and score every record at the end, all applied."""
        self.editor.nets.eval()
        records = [r for r in records if r.ground_truth is not None]
        applied: list[AppliedEdit] = []
        for r in records:
            with added_updates(self.model, applied_updates(applied)), torch.enable_grad():
                updates, keys = self._edit_updates([r], applied)
            self._remember([r], updates, keys, applied)
        hits: dict[str, list[float]] = {}
        every = applied_updates(applied)
        for r in records:
            self._score(r, every, hits)
        return _rates(hits)

    def _score(self, r: EditRecord, updates: dict[str, LowRankUpdate], hits: dict[str, list[float]]) -> None:
        """Add record ``r``'s efficacy, take, paraphrase and neighborhood with ``updates`` applied to ``hits``."""
        pairs = [(r.prompt, r.target_new), (r.prompt, r.ground_truth)]
        for p in r.rephrases:
            pairs += [(p, r.target_new), (p, r.ground_truth)]
        for lp in r.locality:
            pairs += [(lp.prompt, lp.answer), (lp.prompt, r.target_new)]
        b = _pairs_batch(self.tok, pairs, self.cfg.mend.max_len).to(self.cfg.device)
        with added_updates(self.model, updates):
            logits = self._tail(b)  # (B, T, V)
        mlp = _mean_logprobs(logits, b).tolist()
        wins = [mlp[i] > mlp[i + 1] for i in range(0, len(mlp), 2)]
        hits.setdefault("efficacy", []).append(float(wins[0]))
        hits.setdefault("take", []).append(float(greedy_rows(logits, b)[0]))  # row 0: the prompt, new target
        n_reph = len(r.rephrases)
        if n_reph:
            hits.setdefault("paraphrase", []).append(sum(wins[1 : 1 + n_reph]) / n_reph)
        if r.locality:
            hits.setdefault("neighborhood", []).append(sum(wins[1 + n_reph :]) / len(r.locality))

    def state(self) -> dict[str, torch.Tensor]:
        return self.editor.nets.state_dict()


def _rates(hits: dict[str, list[float]]) -> dict[str, float]:
    """Each metric's mean over the records, and the selection score."""
    out = {k: sum(hits[k]) / len(hits[k]) if hits.get(k) else float("nan")
           for k in ("efficacy", "paraphrase", "neighborhood", "take")}
    # model selection keeps MEND's mean of the three; "take" (one edit makes the new target the greedy
    # answer, what `success` counts) is reported beside it
    out["score"] = (out["efficacy"] + out["paraphrase"] + out["neighborhood"]) / 3
    return out


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event that SIGINT or SIGTERM sets while training; the loop stops after the current step.

    Stopping between steps never cuts a checkpoint write in half. Handlers are installed (not left
    to Python's default) because a job started in the background has SIGINT ignored, and time limits
    and process managers send SIGTERM. A second signal raises KeyboardInterrupt: stop right now.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt(signal.Signals(signum).name)
        log.warning("%s: stopping after this step (send it again to stop now)", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def train_val_split(cfg: TrainConfig) -> tuple[list[EditRecord], list[EditRecord]]:
    """The (train, validation) records of a run: a seeded split of ``cfg.data``, so it can be redone."""
    records = [r for path in cfg.data for r in load_records(path, cfg.format, cfg.limit)]
    records = [r for r in records if r.ground_truth is not None]
    val_fraction = min(0.5, cfg.val_size / max(1, len(records)))
    return split_records(records, val_fraction, cfg.seed)


def other_records(rng: random.Random, pool: list[EditRecord], batch: list[EditRecord], n: int) -> list[EditRecord]:
    """``n`` records of ``pool`` drawn by ``rng``, none of them in ``batch`` (by case id)."""
    if n <= 0:
        return []
    taken = {r.case_id for r in batch}
    drawn = rng.sample(pool, min(len(pool), n + len(batch)))
    return [r for r in drawn if r.case_id not in taken][:n]


def train(cfg: TrainConfig, lm: models.LoadedModel | None = None) -> dict:
    """Run a full training; writes the best checkpoint, history JSON and a PNG plot to ``cfg.out``."""
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    lm = lm or models.load(cfg.model, device=cfg.device, dtype=cfg.dtype)
    train_recs, val_recs = train_val_split(cfg)
    log.info("training on %d records, validating on %d", len(train_recs), len(val_recs))
    trainer = EditorTrainer(cfg, lm)
    out = Path(cfg.out)
    history: dict = {"train": [], "val": []}
    baseline = trainer.validate(val_recs, edit=False)
    history["unedited"] = baseline
    log.info("unedited model on val: %s", _fmt(baseline))
    best, bad_rounds, rng = -1.0, 0, random.Random(cfg.seed)
    others_rng = random.Random(cfg.seed + 1)  # its own stream: the batches are those of a run without others
    best_summary: dict | None = None
    where = {**device_description(cfg.device), "autocast": trainer.autocast}
    log.info("training on %s (%s), autocast %s", where["device"], where["device_name"], trainer.autocast)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if trainer.inverses:  # what the saved editor re-solves against when loaded (replacing an earlier run's)
        shutil.copyfile(cfg.stats, out / MEND_STATS_FILE)
    bar = tqdm(range(1, cfg.steps + 1), desc="mend train", unit="step")
    with stop_on_signals() as stop:
        try:
            for step in bar:
                batch = rng.sample(train_recs, min(cfg.edits_per_step, len(train_recs)))
                stats = trainer.step(batch, other_records(others_rng, train_recs, batch, cfg.loc_others))
                history["train"].append({"step": step, **stats})
                bar.set_postfix(edit=f"{stats['edit_nll']:.2f}", kl=f"{stats['loc_kl']:.3f}")
                if step % cfg.val_every == 0 or step == cfg.steps:
                    val = trainer.validate(val_recs)
                    history["val"].append({"step": step, "elapsed_s": time.perf_counter() - t0, **val})
                    (out / "history.json").write_text(json.dumps(history))
                    log.info("step %d val %s", step, _fmt(val))
                    if val["score"] > best:
                        best, bad_rounds = val["score"], 0
                        best_summary = {"step": step, "val": val, "unedited_val": baseline,
                                        "wall_s": time.perf_counter() - t0, **where}
                        _save(out, cfg, trainer, best_summary)
                    else:
                        bad_rounds += 1
                        if bad_rounds >= cfg.patience:
                            log.info("early stop at step %d (no improvement in %d validations)", step, bad_rounds)
                            break
                if stop.is_set():
                    raise KeyboardInterrupt
        except KeyboardInterrupt:  # a signal (or a second one, mid-step): keep the best checkpoint
            log.warning("interrupted after %d steps; keeping the best checkpoint so far", len(history["train"]))
    history["wall_s"] = time.perf_counter() - t0
    history["step_s"] = history["wall_s"] / max(1, len(history["train"]))
    history["prefix_cache"] = {"entries": len(trainer.cache), "hits": trainer.cache.hits,
                               "misses": trainer.cache.misses}
    (out / "history.json").write_text(json.dumps(history, indent=1))
    plot_history(history, out / "training.png")
    write_card(out, cfg, history, best_summary, trainer.autocast)
    log.info("done in %.0f s (%.2f s/step); best val score %.3f; checkpoint in %s",
             history["wall_s"], history["step_s"], best, out)
    return history


def resolve_autocast(cfg: TrainConfig) -> str:
    """"bf16" or "off" for ``cfg.autocast`` on ``cfg.device`` (see the field's comment)."""
    if cfg.autocast not in ("auto", "bf16", "off"):
        raise ValueError(f"autocast must be auto, bf16 or off, got {cfg.autocast!r}")
    if cfg.autocast != "auto":
        return cfg.autocast
    cuda = torch.device(cfg.device).type == "cuda" and torch.cuda.is_available()
    return "bf16" if cuda and cfg.dtype == "float32" and torch.cuda.is_bf16_supported() else "off"


def _save(out: Path, cfg: TrainConfig, trainer: EditorTrainer, summary: dict) -> None:
    info = {
        "editor_id": f"mend-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}",
        "model": cfg.model,
        "model_fingerprint": trainer.stack.fingerprint,
        "weights_fingerprint": trainer.weights_fingerprint,
        "training": {"config": {k: v for k, v in asdict(cfg).items() if k != "mend"}, **summary},
    }
    checkpoint.save(out, cfg.mend, trainer.state(), info)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in metrics.items())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``mend train``."""
    d, m = TrainConfig(), MendConfig()
    p.add_argument("--model", default=d.model, help="HF id, local dir, .gguf file or alias")
    p.add_argument("--data", nargs="+", default=d.data, help="training files (CounterFact/zsRE/KnowEdit)")
    p.add_argument("--format", default=d.format, choices=["auto", "counterfact", "zsre", "knowedit"])
    p.add_argument("--out", default=d.out, help="checkpoint directory")
    for name in ("val_size", "edits_per_step", "steps", "val_every", "patience", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--sequence", type=int, default=d.sequence,
                   help="steps applied one after another before the model is reset (RLEdit; 1: each step edits "
                        "the unedited model)")
    p.add_argument("--c-keep", type=float, default=d.c_keep,
                   help="weight of the sequence's earlier edits' NLL (with --sequence > 1)")
    p.add_argument("--loc-against", default=d.loc_against, choices=["step", "unedited"],
                   help="locality KL against the model before each step, or against the unedited model on the "
                        "neighbours of the whole sequence so far")
    p.add_argument("--loc-others", type=int, default=d.loc_others,
                   help="prompts of other training records per step whose true answers the edit must leave "
                        "alone (KL weighted by --c-other): locality beyond the records' neighbours")
    p.add_argument("--c-other", type=float, default=d.c_other, help="weight of the --loc-others KL")
    p.add_argument("--val-stacked", action="store_true",
                   help="also validate the held-out records edited one after another (score: mean of both)")
    p.add_argument("--limit", type=int, default=None, help="read at most N records per file")
    for name in ("lr", "lr_lr", "c_edit", "c_loc"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--rank", type=int, default=m.rank)
    p.add_argument("--n-blocks", type=int, default=m.n_blocks)
    p.add_argument("--init-lr", type=float, default=m.init_lr)
    p.add_argument("--last-blocks", type=int, default=m.last_blocks)
    p.add_argument("--blocks", type=int, nargs="*", default=None, help="edit the MLPs of these blocks")
    p.add_argument("--targets", nargs="*", default=None, help="module names to edit (overrides --last-blocks)")
    p.add_argument("--factor-tokens", default=m.factor_tokens, choices=["all", "subject"],
                   help="which tokens' gradient factors form the edit")
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--autocast", default=d.autocast, choices=["auto", "bf16", "off"],
                   help="bf16 autocast of the passes the editor is not trained through (auto: on CUDA)")
    p.add_argument("--preserve-lambda", type=float, default=m.preserve_lambda,
                   help="re-solve each edit against key statistics with this weight on them, and train through it")
    p.add_argument("--stats", default=None, help="key statistics for --preserve-lambda (a `mend stats` file)")
    p.add_argument("--init-from", default=None, help="start from this checkpoint's editor (and its config)")
    p.add_argument("--no-prefix-cache", action="store_true", help="recompute the frozen prefix every step")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig a parsed ``mend train`` command line stands for."""
    mend = MendConfig(targets=args.targets or [], last_blocks=args.last_blocks, blocks=args.blocks or [], rank=args.rank,
                      n_blocks=args.n_blocks, init_lr=args.init_lr,
                      factor_tokens=args.factor_tokens, preserve_lambda=args.preserve_lambda,
                      preserve_keys="last" if args.preserve_lambda > 0 else MendConfig.preserve_keys)
    return TrainConfig(
        model=args.model, data=list(args.data), format=args.format, out=args.out, val_size=args.val_size,
        edits_per_step=args.edits_per_step, steps=args.steps, lr=args.lr, lr_lr=args.lr_lr,
        c_edit=args.c_edit, c_loc=args.c_loc, sequence=args.sequence, c_keep=args.c_keep,
        val_stacked=args.val_stacked, loc_against=args.loc_against, loc_others=args.loc_others,
        c_other=args.c_other, val_every=args.val_every, patience=args.patience,
        seed=args.seed, device=args.device, dtype=args.dtype, autocast=args.autocast,
        prefix_cache=not args.no_prefix_cache,
        limit=args.limit, init_from=args.init_from, stats=args.stats, mend=mend,
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``mend train``; returns the process exit code."""
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        log.error("%s", e)
        return 2
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        log.error("--device %s: no CUDA device here (torch %s); install a CUDA build of torch (make setup "
                  "TORCH_INDEX=https://download.pytorch.org/whl/cu126) on a machine with a GPU, or train with "
                  "--device cpu", cfg.device, torch.__version__)
        return 2
    for path in cfg.data:
        if not Path(path).is_file():
            log.error("training data %s does not exist", path)
            return 2
    train(cfg)
    return 0
