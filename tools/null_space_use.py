"""How much of AlphaEdit's null space a stacked run has used, read from its journaled deltas.

Each single-fact AlphaEdit edit writes one key direction per edited layer into the ``null_dims``-wide
null space of the preserved keys, and keeps later edits off the directions of the active ones; once
the earlier keys span that space, a new fact has nowhere left to go. For the first n edits of a run
(``tools.results`` caches every delta of a stacked stage), per layer: the rank of their keys in
null-space coordinates (singular values above 1% of the largest), the median share of a key's energy
that lies in the null space, and the Frobenius norm of the summed update against the weight's.

    python -m tools.null_space_use [--deltas runs/results/stacked1000-alphaedit.deltas] [--at 100 300 1000]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

log = logging.getLogger("null_space_use")


def main(argv: list[str] | None = None) -> int:
    from editor_core import checkpoint, models
    from editor_core.delta import EditDelta
    from editor_core.methods.locate import LocateConfig
    from editor_core.stats import STATS_FILE, KeyStats, null_space_basis

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--deltas", default="runs/results/stacked1000-alphaedit.deltas")
    p.add_argument("--at", type=int, nargs="+", default=[100, 300, 1000])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    stats_dir = checkpoint.default_editor_dir(args.model)
    stats, cfg = KeyStats.load(Path(stats_dir) / STATS_FILE), LocateConfig.load(stats_dir)
    model = models.load(args.model).model
    files = sorted(Path(args.deltas).glob("*.safetensors"))
    if not files:
        p.error(f"--deltas: no *.safetensors in {args.deltas}")
    deltas = [EditDelta.from_bytes(f.read_bytes()) for f in files]
    for layer in cfg.alphaedit_layers:
        name = f"model.layers.{layer}.mlp.down_proj"
        basis = null_space_basis(stats.moments[layer], cfg.null_dims)  # (d_in, m)
        keys = torch.cat([d.keys[name].float() for d in deltas if name in d.keys])  # (n, d_in)
        kb = keys @ basis  # (n, m)
        share = kb.norm(dim=1) ** 2 / keys.norm(dim=1) ** 2  # (n,)
        w_norm = float(model.get_submodule(name).weight.norm())
        for n in [n for n in args.at if n <= len(deltas)]:
            sv = torch.linalg.svdvals(kb[:n])
            rank = int((sv > sv[0] * 1e-2).sum())
            dw = sum(d.updates[name].u.t() @ d.updates[name].v for d in deltas[:n])  # (d_out, d_in)
            log.info("layer %d, first %d edits: keys span %d of %d null-space dimensions; median key energy in "
                     "the null space %.2f; |sum dW| / |W| = %.2f", layer, n, rank, cfg.null_dims,
                     float(share[:n].median()), float(dw.norm()) / w_norm)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
