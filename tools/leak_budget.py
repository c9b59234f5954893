"""Where a stacked MEMIT run's leak onto ordinary text comes from, read from its journaled deltas.

An edit ``dW = u w^T`` at a layer moves the output at an ordinary key ``x`` by ``u (w . x)``; over the
statistics ``C = E[x x^T]`` that is ``tr(dW C dW^T)``, the leak. For the first n deltas of a run
(``tools.stacked_variant`` and ``tools.results`` cache every delta), per layer:

- coherence: the leak of the summed update against the sum of the edits' own leaks (1.0 means they
  add up as independent noise, with no shared direction one could take off);
- the leak and the inserted change ``|dW k|^2`` of each tenth of the run (medians), and
  ``leak * s / inserted`` with ``s = k^T C^-1 k``: 1 for an edit solved against ``C`` alone, more
  where the keys of earlier facts it must leave alone push it off its best direction;
- with ``--keep``: the same edits (same keys, same residuals) solved again offline against
  ``lam C + keep K_p^T K_p``, for other weights of the earlier facts' keys: the summed leak, and how far
  the later edits move each earlier fact's key, against its own insertion (medians per fifth).

Reads deltas of single-fact MEMIT edits (rank one per layer; refit rows, if any, are left out).

    python -m tools.leak_budget --deltas runs/variants/memit-fisher.deltas --n 1000 [--layers 8] [--keep 0 0.25 1]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

log = logging.getLogger("leak_budget")


def solved_again(keys: torch.Tensor, moment: torch.Tensor, lam: float, keep: float) -> torch.Tensor:
    """(N, d) input factors ``w_i = (lam C + keep K_<i^T K_<i + k_i k_i^T)^-1 k_i`` for keys (N, d), in order.

    The inverse is extended by Sherman-Morrison as each key joins the kept ones (fp64)."""
    inverse = torch.linalg.inv(lam * moment)  # (d, d)
    out = []
    for k in keys:
        a = inverse @ k  # (d,)
        out.append(a / (1 + k @ a))
        if keep > 0:
            b = keep ** 0.5 * a
            inverse = inverse - torch.outer(b, b) / (1 + keep * (k @ a))
    return torch.stack(out)


def main(argv: list[str] | None = None) -> int:
    from editor_core import checkpoint
    from editor_core.delta import EditDelta
    from editor_core.methods.locate import LocateConfig, fact_rows
    from editor_core.stats import STATS_FILE, KeyStats, ridged

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--deltas", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="default: the config's MEMIT layers")
    p.add_argument("--keep", type=float, nargs="*", default=[], help="keep weights to solve again offline")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    stats_dir = Path(checkpoint.default_editor_dir(args.model))
    stats, cfg = KeyStats.load(stats_dir / STATS_FILE), LocateConfig.load(stats_dir)
    files = sorted(Path(args.deltas).glob("*.safetensors"))[: args.n]
    if not files:
        p.error(f"--deltas: no *.safetensors in {args.deltas}")
    deltas = [EditDelta.from_bytes(f.read_bytes()) for f in files]
    n = len(deltas)
    tenths = [(i * n // 10, (i + 1) * n // 10) for i in range(10)]
    fifths = [(i * n // 5, (i + 1) * n // 5) for i in range(5)]
    for layer in args.layers or cfg.memit_layers:
        name = f"model.layers.{layer}.mlp.down_proj"
        moment = ridged(stats.moments[layer].float(), cfg.ridge).double()  # (d_in, d_in)
        rows = [fact_rows(d, name) for d in deltas]
        if any(r.rank != 1 for r in rows):
            p.error(f"{name}: expected one fact per edit (rank-one rows)")
        u = torch.cat([r.u for r in rows]).double()  # (N, d_out)
        w = torch.cat([r.v for r in rows]).double()  # (N, d_in)
        keys = torch.stack([d.keys[name][0] for d in deltas]).double()  # (N, d_in)
        own = (u * u).sum(1) * ((w @ moment) * w).sum(1)  # (N,) each edit's leak
        summed = u.t() @ w  # (d_out, d_in)
        total = float(torch.trace(summed @ moment @ summed.t()))
        inserted = (u * u).sum(1) * (w * keys).sum(1) ** 2  # (N,) |dW k|^2
        s = (keys * torch.linalg.solve(moment, keys.t()).t()).sum(1)  # (N,) k^T C^-1 k
        push = own * s / inserted  # (N,)
        log.info("%s, first %d edits: leak of the sum %.1f, sum of the edits' leaks %.1f (ratio %.2f)",
                 name, n, total, float(own.sum()), total / float(own.sum()))
        for a, b in tenths:
            log.info("  edits %4d-%4d: leak %.3f, inserted %.0f, leak * s / inserted %.2f (medians)", a, b,
                     float(own[a:b].median()), float(inserted[a:b].median()), float(push[a:b].median()))
        for keep in args.keep:
            w2 = solved_again(keys, moment, cfg.memit_lambda, keep)  # (N, d_in)
            leak2 = (u * u).sum(1) * ((w2 @ moment) * w2).sum(1)  # (N,)
            at = keys @ w2.t()  # (N_i, N_j): w_j . k_i
            later = (torch.triu(at, diagonal=1) @ u).norm(dim=1)  # (N,) what later edits add at k_i
            rel = later / ((w2 * keys).sum(1) * u.norm(dim=1))  # (N,) against its own insertion
            log.info("  keep %g solved again: summed leak %.1f; later edits at each fact's key / its own "
                     "insertion, median per fifth %s", keep, float(leak2.sum()),
                     [round(float(rel[a:b].median()), 3) for a, b in fifths])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
