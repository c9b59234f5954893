"""The shipped MEND editor with its inference settings changed, scored one edit at a time and stacked.

The tool for trying a lever of issue 11 (a MEND editor that takes) before it becomes the shipped setting:
``--set`` changes :class:`~editor_core.config.MendConfig`'s inference fields (``preserve_lambda``,
``refine_passes``, ``refine_seconds``), and the same records are scored as ``tools.results`` does:

    python -m tools.mend_variant --name ls15-r3 --set preserve_lambda=15 refine_passes=3 --single 100 \\
        --stacked 100 --checkpoints 10 100

With ``preserve_lambda`` > 0 the editor's targets that have key statistics are re-solved against them
(:mod:`editor_core.preserved_solve`); the statistics of the editor's layers are made once with the shipped
recipe (CounterFact training prompts with their true answers, then 256 model-sampled texts, 40,000 tokens)
and cached in ``--stats``. ``--only-out-proj`` drops the editor's other targets (gate/up projections).
One JSON line per measurement goes to ``runs/variants/mend-<name>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

log = logging.getLogger("mend_variant")

SHOWN = ("efficacy", "paraphrase", "neighborhood", "efficacy_acc", "success", "paraphrase_success", "neighbour_kept")
TUNABLE = ("preserve_lambda", "preserve_keys", "refine_passes", "refine_seconds")


def _statistics(model, tokenizer, layers: list[int], path: Path, train_data: str):
    """Key statistics of the editor's layers, made with the shipped recipe and cached at ``path``."""
    from editor_core.stats import KeyStats, collect_key_stats, counterfact_texts, sampled_texts

    if path.is_file():
        stats = KeyStats.load(path)
        if set(layers) <= set(stats.layers) and stats.fits(model):
            return stats
    texts = counterfact_texts(train_data)
    random.Random(0).shuffle(texts)
    texts = sampled_texts(model, tokenizer, n=256, seed=0) + texts
    stats = collect_key_stats(model, tokenizer, texts, layers, max_tokens=40_000,
                              corpus=f"CounterFact prompts with true answers from {Path(train_data).name}; "
                                     "256 model-sampled texts (seed 0)")
    stats.save(path)
    return stats


def main(argv: list[str] | None = None) -> int:
    from editor_core import checkpoint, models
    from editor_core.canary import CanarySet
    from editor_core.config import MendConfig
    from editor_core.data import load_records
    from editor_core.editor import MendEditor
    from editor_core.evaluate import evaluate
    from editor_core.stack import EditStack
    from editor_core.stacked import stacked_curve

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/counterfact-val.json")
    p.add_argument("--train-data", default="../shared/data/counterfact-train.json", help="statistics corpus")
    p.add_argument("--stats", default="runs/mend-stats/keystats.safetensors")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=NUMBER", help=f"any of {', '.join(TUNABLE)}")
    p.add_argument("--only-out-proj", action="store_true", help="edit only the MLP output projections")
    p.add_argument("--single", type=int, default=0, help="score this many records one edit at a time")
    p.add_argument("--stacked", type=int, default=0, help="stack this many records' edits")
    p.add_argument("--checkpoints", type=int, nargs="+", default=[10, 100])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    changes = {}
    for item in args.set:
        field, _, text = item.partition("=")
        try:
            if field not in TUNABLE:
                raise ValueError(f"FIELD must be one of {', '.join(TUNABLE)}")
            changes[field] = {"refine_passes": int, "preserve_keys": str}.get(field, float)(text)
            replace(MendConfig(), **changes)  # the config's own checks, before the model loads
        except ValueError as err:
            p.error(f"--set {item!r}: {err}")

    shipped = checkpoint.default_editor_dir(args.model)
    lm = models.load(args.model)
    model, tok = lm.model, lm.tokenizer
    stack = EditStack(model, checkpoint.stack_targets(model, shipped))
    editor = MendEditor.load(shipped, stack)
    editor.config = replace(editor.config, **changes)
    if args.only_out_proj:
        from editor_core.targets import out_proj_targets

        keep = {t.name for t in out_proj_targets(model, sorted({t.block for t in editor.targets}))}
        editor.targets = [t for t in editor.targets if t.name in keep]
        editor.config = replace(editor.config, edit_targets=[t.name for t in editor.targets])
    if editor.config.preserve_lambda > 0:
        layers = sorted({t.block for t in editor.targets})
        covered = editor.use_statistics(_statistics(model, tok, layers, Path(args.stats), args.train_data), model)
        log.info("re-solving %s against key statistics (lam %g)", covered, editor.config.preserve_lambda)
    records = load_records(args.data)
    out = Path(f"runs/variants/mend-{args.name}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    base = {"name": args.name, **{k: getattr(editor.config, k) for k in TUNABLE},
            "targets": [t.name for t in editor.targets]}

    def write(row: dict) -> None:
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("%s", {k: v for k, v in row.items() if k != "targets"})

    if args.single:
        t0 = time.time()
        report = evaluate(model, tok, stack, editor, records[: args.single])
        passes = [int(r["edit"].get("passes", 1)) for r in report.rows]
        write({**base, "mode": "single", "n": args.single,
               **{k: round(report.post[k], 3) for k in SHOWN if report.post.get(k) is not None},
               "passes_mean": round(statistics.mean(passes), 2), "passes_max": max(passes),
               "edit_s_median": round(report.edit_ms["median"] / 1000, 3),
               "edit_s_p95": round(report.edit_ms["p95"] / 1000, 3), "seconds": round(time.time() - t0)})
    if args.stacked:
        t0 = time.time()

        def on_point(point: dict) -> None:
            post, canary, oldest = point["post"], point.get("canary") or {}, point.get("post_oldest") or {}
            write({**base, "mode": "stacked", "n": point["n"],
                   **{k: round(post[k], 3) for k in SHOWN if post.get(k) is not None},
                   "oldest_fifth_success": oldest.get("success"), "canaries_changed": canary.get("changed"),
                   "canary_nats_lost": canary.get("logprob_drop"),
                   "edit_s_median": round(point["edit_ms"].get("median", 0) / 1000, 3),
                   "seconds": round(time.time() - t0)})

        stacked_curve(model, tok, stack, editor, records[: args.stacked], args.checkpoints,
                      canaries=CanarySet(model, tok), on_point=on_point,
                      pre_cache=out.parent / f"unedited-{Path(args.data).stem}-mend-stack.json")  # keyed by the stack
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
