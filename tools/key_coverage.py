"""How well the key statistics cover the keys of some prompts, and how much a stack's update leaks onto them.

The locate-then-edit solves keep an edit off ordinary text only as far as the statistics ``C = E[k k^T]``
describe it. For each set of prompts (the 64 canaries; text the model samples with another seed than the
statistics'; the CounterFact locality prompts of the evaluation records), at every edited layer:

- ``s/d``: the keys' ``k^T C^-1 k`` over the key width ``d``, median and mean over every position. Keys drawn
  from the distribution ``C`` describes give a mean of 1; far above 1 means directions the statistics
  barely saw, where an edit is free to leak;
- with ``--deltas`` (a stacked run's delta cache, facts' own rows summed): the leak of that summed update
  ``dW`` onto those keys, ``mean |dW k|^2``, against its leak over the statistics, ``tr(dW C dW^T)``. 1 means
  the prompts take what ordinary text takes; above 1, the edits lean on them more than on the corpus.

    python -m tools.key_coverage [--stats DIR] [--deltas runs/variants/memit-fisher.deltas --n 1000]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch


@torch.no_grad()
def position_keys(model: torch.nn.Module, tokenizer, texts: list[str], names: dict[int, str]) -> dict[int, torch.Tensor]:
    """(P, d_in) fp64 inputs of each named output projection at every position of ``texts``, per block."""
    got: dict[int, list[torch.Tensor]] = {b: [] for b in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, inputs, b=b: got[b].append(inputs[0][0].double())) for b, n in names.items()]
    try:
        for text in texts:  # one at a time: no padding to mask out
            model(**tokenizer(text, return_tensors="pt"), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {b: torch.cat(v) for b, v in got.items()}


def main(argv: list[str] | None = None) -> int:
    from editor_core import checkpoint, models
    from editor_core.canary import load_canary_prompts
    from editor_core.data import load_records
    from editor_core.delta import EditDelta
    from editor_core.methods.locate import LocateConfig
    from editor_core.stats import STATS_FILE, KeyStats, ridged, sampled_texts
    from editor_core.targets import out_proj_targets
    from tools.refit_probe import summed_updates

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--stats", help="statistics directory (default: the one shipped for --model)")
    p.add_argument("--layers", type=int, nargs="+", help="default: the config's MEMIT layers")
    p.add_argument("--samples", type=int, default=16, help="model-sampled texts (seed 7) to score")
    p.add_argument("--records", type=int, default=40, help="counterfact-val records whose locality prompts to score")
    p.add_argument("--data", default="../shared/data/counterfact-val.json")
    p.add_argument("--deltas", help="a stacked run's delta cache, to measure its summed update's leak")
    p.add_argument("--n", type=int, default=1000, help="how many of its deltas")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    stats_dir = Path(args.stats or checkpoint.default_editor_dir(args.model))
    if not (stats_dir / STATS_FILE).is_file():
        p.error(f"no {STATS_FILE} in {stats_dir}")
    stats, cfg = KeyStats.load(stats_dir / STATS_FILE), LocateConfig.load(stats_dir)
    layers = args.layers or cfg.memit_layers
    if missing := [b for b in layers if b not in stats.moments]:
        p.error(f"--layers: the statistics hold no layer {missing}")
    lm = models.load(args.model)
    names = {t.block: t.name for t in out_proj_targets(lm.model, layers)}
    summed = {}
    if args.deltas:
        files = sorted(Path(args.deltas).glob("*.safetensors"))[: args.n]
        if len(files) < args.n:
            p.error(f"--deltas {args.deltas} holds {len(files)} edits, fewer than --n {args.n}")
        deltas = [EditDelta.from_bytes(f.read_bytes()) for f in files]
        summed = {b: summed_updates(deltas, n)[0] for b, n in names.items()}  # (d_out, d_in): the facts' own rows
    sets = {"canaries": load_canary_prompts(),
            "sampled text (seed 7)": sampled_texts(lm.model, lm.tokenizer, n=args.samples, seed=7, progress=False),
            "counterfact locality prompts": [pair.prompt for r in load_records(args.data)[: args.records] for pair in r.locality]}
    for label, texts in sets.items():
        keys = position_keys(lm.model, lm.tokenizer, texts, names)
        line = {"prompts": label, "positions": len(next(iter(keys.values())))}
        for b in layers:
            moment = ridged(stats.moments[b].double(), cfg.ridge)  # (d, d)
            k = keys[b]  # (P, d)
            s = (k * torch.linalg.solve(moment, k.t()).t()).sum(1) / k.shape[1]  # (P,) k^T C^-1 k / d
            cell = {"s/d median": round(float(s.median()), 3), "s/d mean": round(float(s.mean()), 3)}
            if b in summed:
                dw = summed[b]
                on_keys = float((k @ dw.t()).pow(2).sum(1).mean())
                cell["leak vs corpus"] = round(on_keys / float(torch.trace(dw @ moment @ dw.t())), 3)
            line[f"layer {b}"] = cell
        sys.stdout.write(json.dumps(line) + "\n")  # the tool's output: one JSON line per prompt set
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
