"""What re-solving a long stack's summed update jointly would do, measured on a finished run.

Rebuilds the state of a ``tools.stacked_variant`` run from its delta cache (the first ``--n`` edits), then
for each ``--lam`` replaces, at every edited layer, the summed update ``A`` of the facts by
:func:`editor_core.methods.locate.refit` ``(A, K^T K, C, lam)``: what the facts' journaled keys ``K`` get
from ``A``, kept in the least-squares sense, with everything else ``A`` does to ordinary text (``C``)
weighed ``lam`` times. Scores every ``--every``-th edited fact and the canaries before and after each.
This is how ``LocateConfig.refit_every`` / ``refit_lambda`` were chosen before a stacked run with them:

    python -m tools.refit_probe --deltas runs/variants/memit-fisher.deltas --n 1000 --lam 15 50 150 500

One JSON line per state on stdout: success, efficacy, paraphrase_success, neighbourhood, locality_acc,
canaries changed and their nats lost, and per layer ``|X - A| / |A|`` and the median share of each key's
output the refit keeps.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch


def summed_updates(deltas: list, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_out, d_in) fp64 sum of every delta's facts' own rows at ``name``, and (N, d_in) their keys."""
    from editor_core.methods.locate import _summed, fact_rows

    keys = torch.cat([d.keys[name].double() for d in deltas])  # (N, d_in)
    return _summed([fact_rows(d, name) for d in deltas], "cpu"), keys


def main(argv: list[str] | None = None) -> int:
    from editor_core.canary import CanarySet
    from editor_core.delta import EditDelta, LowRankUpdate
    from editor_core.evaluate import mean_metrics, record_metrics, score_records
    from editor_core.methods.locate import LocateConfig, _ridged, _summed, refit
    from editor_core.stats import STATS_FILE, KeyStats, find_stats_dir
    from tools import cached_stack

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cached_stack.add_arguments(p)
    p.add_argument("--lam", type=float, nargs="+", default=[150.0], help="weights of the statistics to try")
    p.add_argument("--every", type=int, default=4, help="score every this many-th edited fact")
    p.add_argument("--stats", help="statistics directory (default: the one shipped for --model)")
    args = p.parse_args(argv)
    if any(lam <= 0 for lam in args.lam) or args.every < 1:
        p.error("--lam must be > 0 and --every >= 1")
    state = cached_stack.load(p, args)
    model, tok, stack = state.model, state.tokenizer, state.stack
    stats_dir = find_stats_dir(args.model, args.stats)
    if stats_dir is None:
        p.error(f"no key statistics for {args.model}: give --stats")
    stats, ridge = KeyStats.load(stats_dir / STATS_FILE), LocateConfig.load(stats_dir).ridge

    applied = [(i, stack.delta_of(i)) for i in stack.active_ids]
    records = state.records[:: args.every]
    stack.rebuild([])  # the unedited answers: what the canaries and locality_acc compare with
    canaries = CanarySet(model, tok)
    pre = score_records(model, tok, records)
    stack.rebuild(applied)

    def report(tag: str, extra: dict) -> None:
        rows = [record_metrics(a, b) for a, b in zip(score_records(model, tok, records), pre, strict=True)]
        m = mean_metrics(rows)
        c = canaries.check(model)
        line = {"state": tag, "facts_scored": len(records),
                **{k: round(m[k], 4) for k in ("success", "efficacy", "paraphrase_success", "neighborhood",
                                               "locality_acc")},
                "canaries_changed": c.changed, "canary_nats_lost": round(c.logprob_drop, 4), **extra}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    report(f"{args.n} stacked", {})
    names = sorted(state.deltas[0].updates)
    sums = {n: summed_updates(state.deltas, n) for n in names}  # the facts' own rows, and their keys
    # what the stack sums to now (a refit's rows included), which the probe's delta starts from
    current = {n: _summed([d.updates[n] for d in state.deltas], "cpu") for n in names}
    for lam in args.lam:
        fix, layers = {}, {}
        for name in names:
            a, k = sums[name]  # (d_out, d_in), (N, d_in)
            block = stack.targets[name].block
            fitted = refit(a, k.t() @ k, _ridged(stats.moments[block], ridge).double(), lam)
            on_keys = (fitted @ k.t()).norm(dim=0) / (a @ k.t()).norm(dim=0).clamp(min=1e-12)  # (N,)
            d = (fitted - current[name]).float()  # (d_out, d_in)
            fix[name] = LowRankUpdate(u=torch.eye(d.shape[0]), v=d)
            layers[block] = {"changed": round(float((fitted - a).norm() / a.norm()), 4),
                             "key_output_kept_median": round(float(on_keys.median()), 4)}
        with stack.applied(EditDelta(fix, stack.fingerprint, {"method": "refit_probe"})):
            report(f"refit lam={lam:g}", {"layers": layers})
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    raise SystemExit(main())
