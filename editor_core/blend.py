"""Blend two editors' nets: ``mend blend``, the trained nets interpolated with the nets they started from.

Meta-training moves the nets towards edits that take in one pass and carry to rephrasings, and in the
same move towards edits that spill onto other subjects' facts (docs/MEND.md, session 31). Interpolating
the weights of a fine-tuned network with those it started from (WiSE-FT, Wortsman et al., CVPR 2022)
keeps much of what the fine-tuning gained while giving back less of what the start did well; for two
editors of the same architecture, trained one from the other, it is one line per tensor:

    theta = (1 - weight) * theta_start + weight * theta_trained

``weight`` 0 is the start, 1 the trained nets. ``--only`` blends the named tensors alone and keeps the
start's others: ``--only log_lr`` gives the start's nets a share of the trained per-layer step sizes (in
log space), where session 33 found most of what the trained nets had changed (docs/MEND.md). The blend
takes the trained editor's configuration (its targets and inference settings) and key statistics, and
records both sources, the weight and ``only`` in its ``editor_config.json``; its ``editor_id`` names the
weight (and the tensors), so journals tell the editors apart.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch

from editor_core import checkpoint
from editor_core.editor import STATS_FILE

log = logging.getLogger(__name__)


def blend_states(start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], weight: float,
                 only: list[str] | None = None) -> dict[str, torch.Tensor]:
    """``(1 - weight) * start + weight * trained`` per floating tensor; the others must be equal.

    ``only``: blend these tensors and take every other from ``start`` (None: blend all). A name that is not
    among the tensors is refused.

    Refuses states that do not hold the same tensors with the same shapes (nets of another architecture
    or for other targets), naming the first difference.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be within [0, 1] (0: the start, 1: the trained nets), not {weight:g}")
    if set(start) != set(trained):
        missing = sorted(set(start) ^ set(trained))
        raise ValueError(f"the two editors' nets hold different tensors (e.g. {missing[0]}): not one architecture")
    unknown = sorted(set(only or ()) - set(trained))
    if unknown:
        raise ValueError(f"no tensor {unknown[0]!r} in the nets (they hold {', '.join(sorted(trained))})")
    out = {}
    for name, b in trained.items():
        a = start[name]
        if a.shape != b.shape:
            raise ValueError(f"{name}: shape {tuple(a.shape)} in one editor, {tuple(b.shape)} in the other")
        if only is not None and name not in only:
            out[name] = a.clone()
        elif b.is_floating_point():
            out[name] = ((1.0 - weight) * a.double() + weight * b.double()).to(b.dtype)
        elif torch.equal(a, b):
            out[name] = b.clone()
        else:
            raise ValueError(f"{name}: a non-float tensor that differs between the editors cannot be blended")
    return out


def blend(start_dir: str | Path, trained_dir: str | Path, weight: float, out: str | Path,
          only: list[str] | None = None) -> Path:
    """Write the blend of two editor checkpoints to ``out``; returns it (see the module docstring)."""
    start, trained = checkpoint.load(start_dir), checkpoint.load(trained_dir)
    if start.config.targets != trained.config.targets:
        raise ValueError(f"the editors edit different weights ({start.config.targets} and {trained.config.targets})")
    for key in ("model_fingerprint", "weights_fingerprint"):
        if start.info.get(key) != trained.info.get(key):
            raise ValueError(f"the editors were made for different models ({key} differs)")
    state = blend_states(start.state, trained.state, weight, only)
    info = dict(trained.info)
    info["editor_id"] = f"{trained.info.get('editor_id', 'mend')}-blend{weight:g}" + ("-" + "-".join(only) if only else "")
    info["blend"] = {"start": str(start_dir), "start_editor_id": start.info.get("editor_id"),
                     "trained": str(trained_dir), "trained_editor_id": trained.info.get("editor_id"),
                     "weight": weight, "only": only}
    out = checkpoint.save(out, trained.config, state, info)
    stats, kept = Path(trained_dir) / STATS_FILE, out / STATS_FILE
    if stats.exists():  # the statistics the trained nets re-solve against (a link is copied as its file)
        shutil.copyfile(stats.resolve(), kept)
    elif kept.exists():  # an earlier editor's in a reused directory: the blend would re-solve against them
        kept.unlink()
    log.info("wrote %s: %g of %s on %s", out, weight, trained_dir, start_dir)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``mend blend``."""
    p.add_argument("start", help="the editor the training started from (editor_config.json)")
    p.add_argument("trained", help="the trained editor (its configuration and statistics are the blend's)")
    p.add_argument("--weight", type=float, required=True, help="share of the trained nets, in [0, 1]")
    p.add_argument("--out", required=True, help="directory to write the blended editor to")
    p.add_argument("--only", nargs="+", default=None, metavar="TENSOR",
                   help="blend only these tensors of the nets (e.g. log_lr, the per-layer step sizes) and keep "
                        "the start's others")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``mend blend``; returns the process exit code."""
    try:
        blend(args.start, args.trained, args.weight, args.out, args.only)
    except (ValueError, checkpoint.EditorCheckpointError) as err:
        log.error("%s", err)
        return 2
    return 0
