"""How much each edited layer of a long stack takes from the canaries, alone and together.

Rebuilds a stacked run from its delta cache (the first ``--n`` edits), scores the 64 canaries with the whole
stack, then with each edited layer's summed update taken out, and with every other layer's taken out (that
layer alone), and with the whole stack at half its size. The per-layer leak ``tr(dW C dW^T)`` that
``tools.leak_budget`` reads says nothing of how the layers' leaks combine on real prompts: the half-size state
gives how fast the damage grows with the change (a quarter of it for a square law), and against that law the
layers alone, summed, say whether their leaks are aligned (docs/LOCATE.md, "Why the canaries go at 1,000").

    python -m tools.layer_damage --deltas runs/variants/memit-fisher.deltas --n 1000

One JSON line per state on stdout: canaries changed, nats lost, and the leak of the layers kept (at full size).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def taking_out(summed: dict[str, torch.Tensor], names: list[str], fingerprint: str, share: float = 1.0):
    """An ``EditDelta`` that cancels ``share`` of the summed updates (d_out, d_in) of ``names``: applied on the
    stack with share 1, those targets are back at their base weights and the others are untouched."""
    from editor_core.delta import EditDelta, LowRankUpdate

    return EditDelta({n: LowRankUpdate(u=torch.eye(summed[n].shape[0]), v=-share * summed[n]) for n in names},
                     fingerprint, {"method": "layer_damage"})


def main(argv: list[str] | None = None) -> int:
    from editor_core.canary import CanarySet
    from editor_core.methods.locate import LocateConfig, _summed
    from editor_core.stats import STATS_FILE, KeyStats, find_stats_dir, ridged
    from tools import cached_stack

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cached_stack.add_arguments(p)
    p.add_argument("--stats", help="statistics directory (default: the one shipped for --model)")
    args = p.parse_args(argv)
    state = cached_stack.load(p, args)
    model, stack = state.model, state.stack
    stats_dir = find_stats_dir(args.model, args.stats)
    if stats_dir is None:
        p.error(f"no key statistics for {args.model}: give --stats")
    stats, ridge = KeyStats.load(stats_dir / STATS_FILE), LocateConfig.load(stats_dir).ridge
    names = sorted(state.deltas[0].updates, key=lambda n: stack.targets[n].block)
    summed = {n: _summed([d.updates[n] for d in state.deltas], "cpu").float() for n in names}  # (d_out, d_in)
    leak = {}
    for n in names:
        dw, block = summed[n].double(), stack.targets[n].block
        leak[n] = float(torch.trace(dw @ ridged(stats.moments[block].double(), ridge) @ dw.t())) \
            if block in stats.moments else None
    applied = [(i, stack.delta_of(i)) for i in stack.active_ids]
    stack.rebuild([])
    canaries = CanarySet(model, state.tokenizer)  # the unedited answers
    stack.rebuild(applied)

    def report(tag: str, kept: list[str]) -> None:
        c = canaries.check(model)
        line = {"state": tag, "canaries_changed": c.changed, "canary_nats_lost": round(c.logprob_drop, 4),
                "leak_of_layers_kept": {n: round(leak[n], 1) if leak[n] is not None else None for n in kept}}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    report(f"{args.n} stacked, every layer", names)
    with stack.applied(taking_out(summed, names, stack.fingerprint, share=0.5)):
        # how the damage grows with the size of the change: 1/4 of the whole for a square law, 1/2 for a linear one
        report("every layer at half its size", names)
    for n in names:
        with stack.applied(taking_out(summed, [n], stack.fingerprint)):
            report(f"without {n}", [m for m in names if m != n])
        with stack.applied(taking_out(summed, [m for m in names if m != n], stack.fingerprint)):
            report(f"{n} alone", [n])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
