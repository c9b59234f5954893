"""Editing metrics before and after an edit, per record then means (DESIGN.md "Metrics").

- efficacy: P(target_new | prompt) > P(ground_truth | prompt), by mean token log-prob (ROME's ES).
- paraphrase: the same on each rephrase prompt, averaged over a record's rephrases (PS).
- neighborhood: on each locality prompt, P(locality answer) > P(target_new), averaged (NS).
- efficacy_acc / paraphrase_acc: teacher-forced token accuracy of target_new (EasyEdit style).
- locality_acc: share of locality-answer tokens whose teacher-forced argmax is the same after the
  edit as before it (post-edit only; by definition 1 before).
- success / paraphrase_success: the greedy continuation of the prompt (of each rephrase) is exactly
  target_new, i.e. every target token is the argmax under teacher forcing: what ``/edit`` reports and
  what a user sees. Efficacy (new beats old) can be high while success is low.
- truth_success / truth_paraphrase_success: the same for the ground truth (the old answer). Before an
  edit they say how well the model knows the facts it is asked to change (the unedited SmolLM2-135M
  gives the true object greedily on few CounterFact prompts: a reference for what ``success`` on
  rephrasings can reach); after it, how often the old answer survives.
- neighbour_kept: share of locality prompts whose greedy continuation, for the locality answer's
  length in tokens, is the same token ids after the edit as before it.
- canary_kept: share of the fixed canary prompts (:mod:`editor_core.canary`) whose greedy answer is
  unchanged once the edit call (the whole stacked group, in sequential mode) is applied.
- edit_ms: wall time of ``compute_delta`` + ``stack.apply`` for one edit call (median, p95).

Records without a ground truth skip efficacy/paraphrase; records without rephrases or locality pairs
skip the metrics that need them; means are over the records that have a value (None if none do).

Modes: by default each record is edited alone and reverted before the next. ``batch_size=B`` edits B
records with one ``compute_delta`` call. ``sequential=S`` stacks S such edit calls (each computed on
the weights the previous ones left) and scores all their records at the end, then restores the stack
to the edits it had before. "Pre" is the model as the stack holds it when ``evaluate`` is called.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from editor_core.batching import target_ids
from editor_core.data import EditRecord
from editor_core.greedy import greedy_ids, still_greedy
from editor_core.scoring import TargetScore, score_targets

log = logging.getLogger(__name__)

METRICS = ("efficacy", "paraphrase", "neighborhood", "efficacy_acc", "paraphrase_acc", "locality_acc",
           "success", "paraphrase_success", "truth_success", "truth_paraphrase_success", "neighbour_kept",
           "canary_kept")


@dataclass
class RecordScores:
    """Every score one record needs, from one model state."""

    new: TargetScore  # target_new after the prompt
    truth: TargetScore | None  # ground_truth after the prompt
    rephrase: list[tuple[TargetScore, TargetScore | None]]  # (target_new, ground_truth) per rephrase
    locality: list[tuple[TargetScore, TargetScore]]  # (locality answer, target_new) per locality prompt

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RecordScores:
        """The inverse of :meth:`to_dict` (JSON turns tuples into lists)."""
        def score(x: dict | None) -> TargetScore | None:
            return None if x is None else TargetScore(x["mean_logprob"], x["token_acc"], tuple(x["argmax_ids"]))

        return cls(score(d["new"]), score(d["truth"]), [(score(a), score(b)) for a, b in d["rephrase"]],
                   [(score(a), score(b)) for a, b in d["locality"]])


def score_records(
    model: nn.Module, tokenizer, records: list[EditRecord], batch_size: int = 32
) -> list[RecordScores]:
    """Score all (prompt, continuation) pairs the metrics need, batched across records."""
    prompts: list[str] = []
    conts: list[str] = []

    def add(prompt: str, cont: str | None) -> int | None:
        if cont is None:
            return None
        prompts.append(prompt)
        conts.append(cont)
        return len(prompts) - 1

    layout = []
    for r in records:
        layout.append(
            (
                add(r.prompt, r.target_new),
                add(r.prompt, r.ground_truth),
                [(add(p, r.target_new), add(p, r.ground_truth)) for p in r.rephrases],
                [(add(lp.prompt, lp.answer), add(lp.prompt, r.target_new)) for lp in r.locality],
            )
        )
    scores = score_targets(model, tokenizer, prompts, conts, batch_size=batch_size) if prompts else []

    def get(i: int | None) -> TargetScore | None:
        return None if i is None else scores[i]

    return [
        RecordScores(get(n), get(t), [(get(a), get(b)) for a, b in reph], [(get(a), get(b)) for a, b in loc])
        for n, t, reph, loc in layout
    ]


def locality_greedy(model: nn.Module, tokenizer, records: list[EditRecord], batch_size: int = 32
                    ) -> list[list[list[int]]]:
    """Per record, per locality prompt: the greedy token ids for the locality answer's length."""
    prompts = [lp.prompt for r in records for lp in r.locality]
    lengths = [len(target_ids(tokenizer, lp.answer)) for r in records for lp in r.locality]
    flat = greedy_ids(model, tokenizer, prompts, lengths, batch_size) if prompts else []
    out, at = [], 0
    for r in records:
        out.append(flat[at : at + len(r.locality)])
        at += len(r.locality)
    return out


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def record_metrics(s: RecordScores, pre: RecordScores | None = None) -> dict[str, float | None]:
    """Per-record metrics of one model state; ``pre`` (the unedited scores) enables locality_acc."""
    out: dict[str, float | None] = {
        "efficacy": None if s.truth is None else float(s.new.mean_logprob > s.truth.mean_logprob),
        "paraphrase": _mean([float(n.mean_logprob > t.mean_logprob) for n, t in s.rephrase if t is not None]),
        "neighborhood": _mean([float(a.mean_logprob > n.mean_logprob) for a, n in s.locality]),
        "efficacy_acc": s.new.token_acc,
        "paraphrase_acc": _mean([n.token_acc for n, _ in s.rephrase]),
        "success": float(s.new.token_acc == 1.0),
        "paraphrase_success": _mean([float(n.token_acc == 1.0) for n, _ in s.rephrase]),
        "truth_success": None if s.truth is None else float(s.truth.token_acc == 1.0),
        "truth_paraphrase_success": _mean([float(t.token_acc == 1.0) for _, t in s.rephrase if t is not None]),
    }
    if pre is not None:
        same = total = 0
        for (post_ans, _), (pre_ans, _) in zip(s.locality, pre.locality, strict=True):
            same += sum(a == b for a, b in zip(post_ans.argmax_ids, pre_ans.argmax_ids, strict=True))
            total += len(pre_ans.argmax_ids)
        out["locality_acc"] = same / total if total else None
    return out


def mean_metrics(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Mean of each metric over the rows that have it (None when no row does)."""
    keys = [k for k in METRICS if any(k in r for r in rows)]
    return {k: _mean([r[k] for r in rows if r.get(k) is not None]) for k in keys}


@dataclass
class EvalReport:
    """Pre/post metric means, edit timing and the per-record rows of one evaluation run."""

    method: str | None  # None: unedited only
    n_records: int
    batch_size: int
    sequential: int
    pre: dict[str, float | None]
    post: dict[str, float | None]  # {} when no editor
    edit_ms: dict[str, float]  # median, p95, mean, n (edit calls); {} when no editor
    rows: list[dict] = field(default_factory=list)  # {"case_id", "pre": {..}, "post": {..}, "edit": meta}
    times_ms: list[float] = field(default_factory=list)  # each edit call's time, in order (edit_ms summarises it)
    meta: dict = field(default_factory=dict)  # model, data, editor... filled by the caller

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (None for metrics no record had)."""
        return json.dumps(self.to_dict(), indent=indent)


def _sync(model: nn.Module) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _chunks(items: list, n: int) -> list[list]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def evaluate(
    model: nn.Module,
    tokenizer,
    stack,
    editor,
    records: list[EditRecord],
    batch_size: int = 1,
    sequential: int = 1,
    progress: bool = True,
    score_batch_size: int = 32,
    canaries=None,
) -> EvalReport:
    """Score ``records`` before and after editing them with ``editor`` (None: unedited only).

    The stack is left with exactly the edits it had on entry (bit for bit), also on error.
    ``canaries`` (a :class:`~editor_core.canary.CanarySet` taken on the unedited model) adds
    ``canary_kept``.
    """
    if batch_size < 1 or sequential < 1:
        raise ValueError("batch_size and sequential must be >= 1")
    if not records:
        raise ValueError("no records to evaluate")
    pre_scores: list[RecordScores] = []
    for chunk in tqdm(_chunks(records, 64), desc="unedited", disable=not progress, unit="chunk"):
        pre_scores += score_records(model, tokenizer, chunk, score_batch_size)
    rows = [{"case_id": r.case_id, "pre": record_metrics(s)} for r, s in zip(records, pre_scores, strict=True)]
    loc_prompts = [[lp.prompt for lp in r.locality] for r in records]
    loc_greedy = locality_greedy(model, tokenizer, records, score_batch_size)
    for row, ps in zip(rows, loc_prompts, strict=True):
        if ps:
            row["pre"]["neighbour_kept"] = 1.0
    report = EvalReport(
        method=None if editor is None else editor.method, n_records=len(records), batch_size=batch_size,
        sequential=sequential, pre=mean_metrics([row["pre"] for row in rows]), post={}, edit_ms={}, rows=rows,
    )
    if editor is None:
        return report

    times: list[float] = []
    group = batch_size * sequential
    bar = tqdm(total=len(records), desc=f"edit ({editor.method})", disable=not progress, unit="rec")
    for g0 in range(0, len(records), group):
        recs = records[g0 : g0 + group]
        prior = [(i, stack.delta_of(i)) for i in stack.active_ids]
        applied: list[str] = []
        metas: list[dict] = []
        try:
            for b0 in range(0, len(recs), batch_size):
                batch = recs[b0 : b0 + batch_size]
                edit_id = f"__eval-{g0 + b0}"
                _sync(model)
                t0 = time.perf_counter()
                delta = editor.compute_delta(model, tokenizer, [r.to_request() for r in batch])
                stack.apply(edit_id, delta)
                _sync(model)
                times.append((time.perf_counter() - t0) * 1000.0)
                applied.append(edit_id)
                metas += [dict(delta.meta)] * len(batch)
            post = score_records(model, tokenizer, recs, score_batch_size)
            kept = [still_greedy(model, tokenizer, loc_prompts[g0 + k], loc_greedy[g0 + k], score_batch_size)
                    if loc_prompts[g0 + k] else None for k in range(len(recs))]
            canary = canaries.check(model) if canaries is not None else None
        finally:
            if len(applied) == 1:
                stack.revert(applied[0])
            elif applied:
                stack.rebuild(prior)  # one pass back to the entry state (same addmm order: bit exact)
        for k, s in enumerate(post):
            rows[g0 + k]["post"] = record_metrics(s, pre_scores[g0 + k])
            if kept[k] is not None:
                rows[g0 + k]["post"]["neighbour_kept"] = _mean([float(x) for x in kept[k]])
            if canary is not None:
                rows[g0 + k]["post"]["canary_kept"] = 1.0 - canary.changed_share
            rows[g0 + k]["edit"] = metas[k]  # the delta's meta (steps, editor id...) of its edit call
        bar.update(len(recs))
    bar.close()
    report.post = mean_metrics([row["post"] for row in rows])
    report.edit_ms = timing_summary(times)
    report.times_ms = [round(t, 3) for t in times]
    log.info("evaluated %d records with %s: %s", len(records), editor.method, report.post)
    return report


def timing_summary(ms: list[float]) -> dict[str, float]:
    """median, p95, mean and n of a list of milliseconds (the ``edit_ms`` shape every table reads)."""
    return {"median": float(np.median(ms)), "p95": float(np.percentile(ms, 95)), "mean": float(np.mean(ms)),
            "n": len(ms)}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_table(report: EvalReport) -> str:
    """A plain-text table of the pre/post means and edit timing."""
    lines = [f"{'metric':<26}{'unedited':>10}{'edited':>10}"]
    for k in METRICS:
        if k in report.pre or k in report.post:
            lines.append(f"{k:<26}{_fmt(report.pre.get(k)):>10}{_fmt(report.post.get(k)) if report.post else '':>10}")
    if report.edit_ms:
        e = report.edit_ms
        lines.append(f"edit_ms  median {e['median']:.1f}  p95 {e['p95']:.1f}  ({e['n']} edit calls)")
    lines.append(
        f"records {report.n_records}  method {report.method or 'none'}  "
        f"batch {report.batch_size}  sequential {report.sequential}"
    )
    return "\n".join(lines)


# ---- CLI glue (`mend eval`, wired up by service/cli.py) -------------------------------------------
def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_arguments(parser) -> None:
    """Add the ``mend eval`` options to an ``argparse.ArgumentParser``."""
    from editor_core.baselines import FTConfig
    from editor_core.data import FORMATS
    from editor_core.models import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help="alias, local dir, .gguf file or HF id")
    parser.add_argument("--method", choices=["mend", "ft", "ft-kl", "rome", "memit", "alphaedit", "none"],
                        default="mend",
                        help="editor to evaluate; 'none' scores the unedited model only")
    parser.add_argument("--editor", default=None,
                        help="MEND editor checkpoint dir (default: the shipped editor for --model)")
    parser.add_argument("--stats", default=None,
                        help="key statistics dir for rome/memit/alphaedit (default: the one shipped for --model)")
    parser.add_argument("--no-canaries", action="store_true", help="do not report canary_kept")
    parser.add_argument("--data", required=True, help="data file (CounterFact/zsRE/KnowEdit JSON or JSONL)")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="data format")
    parser.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N records")
    parser.add_argument("--skip-empty", action="store_true",
                        help="leave out records with an empty prompt or new target (logged) instead of refusing "
                             "the file")
    parser.add_argument("--batch-size", type=_positive_int, default=1, help="records per edit call")
    parser.add_argument("--sequential", type=_positive_int, default=1,
                        help="edit calls stacked before scoring and reverting")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the full report (with rows) here")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--ft-lr", type=float, default=FTConfig.lr, help="FT/FT+KL Adam learning rate")
    parser.add_argument("--ft-steps", type=_positive_int, default=FTConfig.max_steps, help="FT/FT+KL step cap")
    parser.add_argument("--kl-weight", type=float, default=1.0, help="FT+KL weight of the KL term")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(_eval_parser=parser)


class _UsageError(Exception):
    pass


LOCATE = ("rome", "memit", "alphaedit")


def _stats_dir(args):
    """--stats, else the statistics shipped for the model (None when there are none)."""
    from editor_core.stats import STATS_FILE, find_stats_dir

    d = find_stats_dir(args.model, args.stats)
    if args.stats and d is None:
        raise _UsageError(f"--stats: no {STATS_FILE} in {args.stats}")
    return d


def run(args) -> int:
    """Run ``mend eval`` from parsed arguments: print the table, write JSON; 0 on success.

    User errors (missing data file, bad format, no editor, model not found) exit with status 2
    through the parser, like any argparse error.
    """
    try:
        return _run(args)
    except _UsageError as err:
        parser = getattr(args, "_eval_parser", None)
        if parser is not None:
            parser.error(str(err))  # exits with status 2
        log.error("%s", err)
        return 2


def _run(args) -> int:
    from pathlib import Path

    from editor_core import checkpoint, models
    from editor_core.baselines import FTConfig, make_baseline
    from editor_core.data import EmptyRecordError, load_records
    from editor_core.stack import EditStack
    try:
        records = load_records(args.data, args.format, args.limit, skip_empty=args.skip_empty)
    except (FileNotFoundError, ValueError) as err:
        hint = " (--skip-empty leaves such records out)" if isinstance(err, EmptyRecordError) else ""
        raise _UsageError(f"--data: {err}{hint}") from err
    if args.device == "cuda" and not torch.cuda.is_available():
        raise _UsageError("--device cuda: no CUDA device is available")
    editor_dir = None
    if args.method == "mend":
        editor_dir = args.editor or checkpoint.default_editor_dir(args.model)
        if editor_dir is None:
            raise _UsageError(
                f"no trained MEND editor for model {args.model!r} (looked in {checkpoint.editors_root()}); "
                f"train one with `mend train --model {args.model}`, pass --editor PATH, "
                "or evaluate a baseline with --method ft"
            )
        try:
            checkpoint.load(editor_dir)  # a clear error for a broken checkpoint before the model loads
        except (FileNotFoundError, ValueError) as err:
            raise _UsageError(f"--editor: {err}") from err
    try:
        loaded = models.load(args.model, device=args.device, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as err:
        raise _UsageError(f"--model: {err}") from err
    model, tokenizer = loaded.model, loaded.tokenizer
    stats_dir = _stats_dir(args)
    if args.method in LOCATE and stats_dir is None:
        raise _UsageError(f"--method {args.method}: no key statistics for model {args.model!r}; compute them with "
                          f"`mend stats --model {args.model} --out DIR` and pass --stats DIR")
    default_mend = checkpoint.default_editor_dir(args.model)
    # the same stack (targets, fingerprint) the service builds for this model, whatever the method
    stack = EditStack(model, checkpoint.all_stack_targets(model, editor_dir or default_mend, stats_dir))
    editor = None
    if args.method == "mend":
        from editor_core.editor import MendEditor

        try:
            editor = MendEditor.load(editor_dir, stack)
        except ValueError as err:
            raise _UsageError(f"--editor: {err}") from err
    elif args.method in LOCATE:
        from editor_core.methods.locate import LocateConfig, LocateEditor
        from editor_core.stats import STATS_FILE, KeyStats

        editor = LocateEditor(args.method, stack, KeyStats.load(Path(stats_dir) / STATS_FILE),
                              LocateConfig.load(stats_dir))
    elif args.method in ("ft", "ft-kl"):
        kl = args.kl_weight if args.method == "ft-kl" else 0.0
        ft_targets = tuple(t.name for t in checkpoint.stack_targets(model, editor_dir or default_mend))
        editor = make_baseline(args.method, stack, FTConfig(lr=args.ft_lr, max_steps=args.ft_steps, kl_weight=kl,
                                                            targets=ft_targets))
    canaries = None
    if not args.no_canaries and editor is not None:
        from editor_core.canary import CanarySet

        canaries = CanarySet(model, tokenizer)
    report = evaluate(model, tokenizer, stack, editor, records, batch_size=args.batch_size,
                      sequential=args.sequential, progress=not args.no_progress, canaries=canaries)
    report.meta = {
        "model": args.model, "model_source": loaded.source, "data": str(args.data), "format": args.format,
        "editor": str(editor_dir) if editor_dir else None, "stats": str(stats_dir) if stats_dir else None,
        "device": args.device, "dtype": args.dtype,
        "targets": list(stack.targets),
    }
    print(format_table(report))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.to_json() + "\n")
        log.info("wrote %s", out)
    return 0
