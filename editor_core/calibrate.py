"""Calibrate a trained editor's edit step size on its run's validation split: ``mend calibrate``.

MEND learns one step size per target by minimising ``c_edit * NLL + c_loc * KL``. Neither term is what
users read (the efficacy / paraphrase / neighborhood win rates), and on a small model the learned size
can overshoot: the edit then also moves neighbours that share the relation. Calibration tries a few
global factors ``s`` (every ``lr_t`` becomes ``s * lr_t``), scores each on the training run's own
held-out split (never on the evaluation file), and folds the chosen factor into the checkpoint's log
step sizes. The default choice is the strongest edit that keeps the neighborhood score within a
budget of the unedited model's: a service that corrects facts must first not break the others. The editor's runtime path is unchanged; the sweep is
recorded in the checkpoint's JSON under ``calibration``.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from editor_core import checkpoint, models
from editor_core.data import EditRecord
from editor_core.train import EditorTrainer, TrainConfig, train_val_split

log = logging.getLogger(__name__)

DEFAULT_SCALES = (0.25, 0.375, 0.5, 0.75, 1.0)


@dataclass
class Calibration:
    """The chosen factor and every scored factor (rows of scale + validation metrics)."""

    scale: float
    sweep: list[dict[str, float]]


def calibrate_step_size(
    trainer: EditorTrainer, records: list[EditRecord], scales, unedited_neighborhood: float | None = None,
    locality_budget: float = 0.05,
) -> Calibration:
    """Validate the editor with each step-size factor and pick one; the editor is left as it came.

    With ``unedited_neighborhood``: the largest factor whose neighborhood stays within
    ``locality_budget`` of the unedited model's (the strongest edit that keeps other facts), or the
    smallest factor if none does. Without it: the best mean score, as training selects.
    """
    scales = sorted({float(s) for s in scales})
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive, got {scales}")
    log_lr = trainer.editor.nets.log_lr
    base = log_lr.detach().clone()
    sweep = []
    try:
        for s in scales:
            with torch.no_grad():
                log_lr.copy_(base + math.log(s))
            sweep.append({"scale": s, **trainer.validate(records)})
            log.info("scale %.3g: %s", s, " ".join(f"{k}={v:.3f}" for k, v in sweep[-1].items() if k != "scale"))
    finally:
        with torch.no_grad():
            log_lr.copy_(base)
    if unedited_neighborhood is not None:
        floor = unedited_neighborhood - locality_budget
        within = [row for row in sweep if row["neighborhood"] >= floor]
        best = within[-1] if within else sweep[0]
    else:  # ties go to the larger factor: the stronger edit, nearer to what training learned
        best = max(sweep, key=lambda row: (row["score"], row["scale"]))
    return Calibration(scale=best["scale"], sweep=sweep)


def fold_scale(trainer: EditorTrainer, scale: float) -> None:
    """Multiply every learned step size by ``scale`` (in log space), in place."""
    with torch.no_grad():
        trainer.editor.nets.log_lr.add_(math.log(scale))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``mend calibrate``."""
    p.add_argument("--editor", required=True, help="checkpoint directory written by `mend train`")
    p.add_argument("--out", default=None, help="write the calibrated checkpoint here (default: in place)")
    p.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES),
                   help="step-size factors to try (1 = as trained)")
    p.add_argument("--locality-budget", type=float, default=0.05,
                   help="pick the largest factor whose neighborhood is at most this far below the unedited "
                        "model's; a negative value picks the best mean score instead")
    p.add_argument("--device", default=None, help="default: the device the editor was trained on, else cpu")


def _train_config(ckpt: checkpoint.Checkpoint, editor_dir: str, device: str | None) -> TrainConfig:
    saved = dict(ckpt.info.get("training", {}).get("config", {}))
    if not saved:
        raise ValueError(f"{editor_dir}: the checkpoint has no training config to redo its validation split")
    known = {f.name for f in fields(TrainConfig)} - {"mend"}
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in known}, mend=ckpt.config)
    cfg.init_from = editor_dir
    cfg.device = device or ("cpu" if cfg.device == "cuda" and not torch.cuda.is_available() else cfg.device)
    return cfg


def run(args: argparse.Namespace) -> int:
    """Entry point of ``mend calibrate``; returns the process exit code."""
    try:
        ckpt = checkpoint.load(args.editor)
        cfg = _train_config(ckpt, args.editor, args.device)
        missing = [p for p in cfg.data if not Path(p).is_file()]
        if missing:
            raise ValueError(f"the training data {missing} of this editor is not here (run from the repo root)")
        if min(args.scales) <= 0:
            raise ValueError(f"--scales must be positive, got {args.scales}")
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    trainer = EditorTrainer(cfg, models.load(cfg.model, device=cfg.device, dtype=cfg.dtype))
    _, val_recs = train_val_split(cfg)
    log.info("calibrating on the %d validation records of the training run", len(val_recs))
    unedited = None
    if args.locality_budget >= 0:
        unedited = ckpt.info.get("training", {}).get("unedited_val") or trainer.validate(val_recs, edit=False)
    result = calibrate_step_size(trainer, val_recs, args.scales,
                                 None if unedited is None else unedited["neighborhood"], max(0.0, args.locality_budget))
    fold_scale(trainer, result.scale)
    previous = ckpt.info.get("calibration", {}).get("total_scale", 1.0)
    info = dict(ckpt.info)
    info["calibration"] = {
        "scale": result.scale, "total_scale": previous * result.scale, "val_records": len(val_recs),
        "criterion": (f"largest factor with neighborhood >= unedited {unedited['neighborhood']:.3f} - "
                      f"{args.locality_budget:g}") if unedited else "best mean score",
        "sweep": result.sweep,
    }
    out = checkpoint.save(args.out or args.editor, ckpt.config, trainer.state(), info)
    best = next(r for r in result.sweep if r["scale"] == result.scale)
    log.info("step sizes x%.3g (validation score %.3f); wrote %s", result.scale, best["score"], out)
    return 0
