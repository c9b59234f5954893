"""The shipped MEND editor with its inference settings changed, scored one edit at a time and stacked.

The tool for trying a lever of issue 11 (a MEND editor that takes) before it becomes the shipped setting:
``--set`` changes :class:`~editor_core.config.MendConfig`'s inference fields (``INFERENCE_FIELDS``;
``edit_targets`` is ``all`` or ``out_proj``), and the same records are scored as ``tools.results`` does:

    python -m tools.mend_variant --name keep1 --set preserve_keep=1 --single 100 --stacked 100 \\
        --checkpoints 10 100

With ``preserve_lambda`` > 0 the editor's targets that have key statistics are re-solved against them
(:mod:`editor_core.preserved_solve`), with the statistics beside the editor (its own
``mend_keystats.safetensors``, else the locate methods' ``keystats.safetensors``; the editor's card says which).
One JSON line per measurement goes to ``runs/variants/mend-<name>.jsonl``.

With ``--delta-dir`` a stacked run keeps every delta it computed, with the settings that made them, as a
stacked stage of ``tools.results`` does. When those settings are then shipped (``tools.editor_settings``), the
directory copied to ``runs/results/stacked1000-mend.deltas`` makes that stage re-score the stack instead
of recomputing it (the stage refuses a cache made with other settings, or in a shuffled order).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from editor_core.config import INFERENCE_FIELDS, parse_setting

log = logging.getLogger("mend_variant")

SHOWN = ("efficacy", "paraphrase", "neighborhood", "efficacy_acc", "success", "paraphrase_success", "neighbour_kept")
TUNABLE = INFERENCE_FIELDS


def main(argv: list[str] | None = None) -> int:
    from editor_core import checkpoint, models
    from editor_core.canary import CanarySet
    from editor_core.config import MendConfig
    from editor_core.data import load_records
    from editor_core.editor import MendEditor
    from editor_core.evaluate import evaluate
    from editor_core.stack import EditStack
    from editor_core.stacked import stacked_curve
    from tools.results import delta_settings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--editor", type=Path, default=None,
                   help="a trained editor directory (default: the one shipped for --model); its statistics "
                        "for the re-solve are read from beside it")
    p.add_argument("--data", default="../shared/data/counterfact-val.json")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=NUMBER", help=f"any of {', '.join(TUNABLE)}")
    p.add_argument("--single", type=int, default=0, help="score this many records one edit at a time")
    p.add_argument("--stacked", type=int, default=0, help="stack this many records' edits")
    p.add_argument("--checkpoints", type=int, nargs="+", default=[10, 100])
    p.add_argument("--order-seed", type=int, default=None,
                   help="stack the same records in an order shuffled with this seed (the spread a run's order "
                        "and rounding give a long stack)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--delta-dir", type=Path, default=None,
                   help="keep the stacked run's deltas here, with the settings that made them (resumable; "
                        "a stacked stage of tools.results accepts the directory once the settings are shipped)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    changes = {}
    for item in args.set:
        try:
            field, value = parse_setting(item)
        except ValueError as err:
            p.error(f"--set {item!r}: {err}")
        changes[field] = value
    try:  # the settings together, as MendConfig checks them
        replace(MendConfig(preserve_lambda=1.0, preserve_keys="last"),
                **{k: v for k, v in changes.items() if k != "edit_targets"})
    except ValueError as err:
        p.error(f"--set: {err}")

    shipped = args.editor or checkpoint.default_editor_dir(args.model)
    lm = models.load(args.model)
    model, tok = lm.model, lm.tokenizer
    stack = EditStack(model, checkpoint.stack_targets(model, shipped))
    if "edit_targets" in changes:
        from editor_core.targets import out_proj_targets

        trained = checkpoint.stack_targets(model, shipped)
        out_proj = {t.name for t in out_proj_targets(model, sorted({t.block for t in trained}))}
        changes["edit_targets"] = [] if changes["edit_targets"] == "all" else [
            t.name for t in trained if t.name in out_proj]
    editor = MendEditor.load(shipped, stack, settings=changes)  # statistics from beside it when it re-solves
    records = load_records(args.data, skip_empty=True)  # zsRE holds two questions with no new answer
    out = Path(f"runs/variants/mend-{args.name}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    base = {"name": args.name, "editor": str(shipped), "order_seed": args.order_seed,
            **{k: getattr(editor.config, k) for k in TUNABLE},
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

        stacked = records[: args.stacked]
        if args.order_seed is not None:
            order = torch.randperm(len(stacked), generator=torch.Generator().manual_seed(args.order_seed)).tolist()
            stacked = [stacked[i] for i in order]
        # the stage's record of the settings; a shuffled order is recorded too, so the stage refuses it
        settings = delta_settings(editor) | ({} if args.order_seed is None else {"order_seed": args.order_seed})
        stacked_curve(model, tok, stack, editor, stacked, args.checkpoints,
                      canaries=CanarySet(model, tok), on_point=on_point, delta_dir=args.delta_dir, settings=settings,
                      pre_cache=out.parent / f"unedited-{Path(args.data).stem}-mend-stack.json")  # keyed by the stack
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
