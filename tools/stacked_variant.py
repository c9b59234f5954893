"""One stacked run of a locate-then-edit method with some settings changed: the tool for trying a lever
against the long-stack collapse before it becomes a default.

Edits the first ``--n`` counterfact-val records one after another on the default model and, at each
checkpoint, scores every fact edited so far plus the canary prompts, as ``tools.results``' stacked stages
do (:func:`editor_core.stacked.stacked_curve`). Each point is appended as one JSON line to
``--out`` (default ``runs/variants/<name>.jsonl``); every delta is cached beside it, so a cut-off run
resumes and a longer one reuses the shorter one's edits.

    mend stats --layers 3 4 5 6 7 8 9 10 --data ../shared/data/counterfact-train.json --samples 256 \
        --out runs/stats-wide
    python -m tools.stacked_variant --name groups2 --layers 3 4 5 6 7 8 9 10 --set alphaedit_groups=2 \
        --stats runs/stats-wide/keystats.safetensors --n 600 --checkpoints 10 100 300 600

``--set`` changes :class:`LocateConfig` fields, ``--vset`` :class:`ValueConfig` fields (numbers, or a name such as
``optimizer=adam``).
``--deltas`` re-scores an earlier run's cached deltas (for example ``runs/results/stacked1000-memit.deltas``;
``tools.results``' stacked stages edit the method's own layers, as this tool does; ``--results-stack``
edits the stack with MEND's targets too, which its caches made before 2026-11-29 carry the fingerprint of).
A delta cache keeps the settings its deltas were made with (``settings.json``: method, config,
statistics) and is refused under other ones: a lever is tried under a name of its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("stacked_variant")

SHOWN = ("efficacy_acc", "efficacy", "paraphrase_acc", "neighborhood", "neighborhood_acc", "success", "paraphrase_success",
         "neighbour_kept")


def _number_like(old, text: str):
    """``text`` parsed as the type of the field it replaces (int, float; a string stays as it is)."""
    return text if isinstance(old, str) else type(old)(float(text))


def main(argv: list[str] | None = None) -> int:
    from editor_core import checkpoint, models
    from editor_core.canary import CanarySet
    from editor_core.data import load_records
    from editor_core.methods.locate import LocateConfig, LocateEditor
    from editor_core.stack import EditStack
    from editor_core.stacked import stacked_curve
    from editor_core.stats import STATS_FILE, KeyStats
    from editor_core.targets import out_proj_targets

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="names the output file and the delta cache")
    p.add_argument("--method", default="alphaedit", choices=["rome", "memit", "alphaedit"])
    p.add_argument("--layers", type=int, nargs="+", help="the method's layers (default: the shipped config's)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--stats", help="key statistics file (default: the shipped one)")
    p.add_argument("--data", default="../shared/data/counterfact-val.json")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--checkpoints", type=int, nargs="+", default=[10, 30, 100])
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=NUMBER", help="LocateConfig overrides")
    p.add_argument("--vset", nargs="*", default=[], metavar="FIELD=VALUE", help="ValueConfig overrides")
    p.add_argument("--deltas", help="delta cache to read and extend (default: beside --out)")
    p.add_argument("--results-stack", action="store_true",
                   help="edit the stack tools.results edits (MEND targets too), to reuse its cached deltas")
    p.add_argument("--out", help="JSON lines file (default runs/variants/<name>.jsonl)")
    p.add_argument("--pre-cache", help="unedited scores of the records, shared by every run on them "
                   "(default runs/variants/unedited-<data file's stem>.json)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from editor_core.allocator import pin_mmap_threshold

    # without it a long run grows by about the size of each freed solve buffer an edit: a 1,000-edit
    # MEMIT run with a keep weight (two 1536x1536 fp64 matrices a layer) passed 9 GB by its 277th edit
    pin_mmap_threshold()

    shipped = checkpoint.default_editor_dir(args.model)
    cfg = LocateConfig.load(shipped)
    if args.layers:
        setattr(cfg, f"{args.method}_layers", args.layers)
    for target, sets in ((cfg, args.set), (cfg.value, args.vset)):
        for item in sets:
            field, _, text = item.partition("=")
            if not hasattr(target, field) or not text:
                p.error(f"--set/--vset {item!r}: expected FIELD=NUMBER with a field of {type(target).__name__}")
            setattr(target, field, _number_like(getattr(target, field), text))
    layers = cfg.layers(args.method)
    stats = KeyStats.load(args.stats or Path(shipped) / STATS_FILE)
    lm = models.load(args.model)
    model, tok = lm.model, lm.tokenizer
    stack = EditStack(model, checkpoint.all_stack_targets(model, shipped, shipped) if args.results_stack
                      else out_proj_targets(model, layers))
    editor = LocateEditor(args.method, stack, stats, cfg)
    records = load_records(args.data)[: args.n]
    out = Path(args.out or f"runs/variants/{args.name}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def on_point(point: dict) -> None:
        post, canary = point["post"], point.get("canary") or {}
        oldest = point.get("post_oldest") or {}
        row = {"name": args.name, "n": point["n"], **{k: round(post[k], 3) for k in SHOWN if k in post},
               "oldest_fifth_success": round(oldest["success"], 3) if oldest.get("success") is not None else None,
               "canaries_changed": canary.get("changed"), "canary_nats_lost": canary.get("logprob_drop"),
               "edit_s_median": round(point["edit_ms"].get("median", 0) / 1000, 2),
               "seconds": round(time.time() - started), "config": cfg.to_dict()}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("%s n=%d: %s", args.name, point["n"], {k: v for k, v in row.items() if k != "config"})

    stacked_curve(model, tok, stack, editor, records, args.checkpoints, canaries=CanarySet(model, tok),
                  delta_dir=args.deltas or out.with_suffix(".deltas"), on_point=on_point, progress=True,
                  pre_cache=args.pre_cache or out.parent / f"unedited-{Path(args.data).stem}.json",
                  settings=editor.settings())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
