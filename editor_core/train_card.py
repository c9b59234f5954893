"""The card a training run leaves beside its checkpoint (``card.md``): where it ran (device, GPU name,
precision), how long (steps, wall time) and what it reached, filled from the run's own records."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

CARD_FILE = "card.md"

CARD_TEMPLATE = """# MEND editor training card: {model}

| | |
|---|---|
| device | {device} ({device_name}) |
| precision | model {dtype}; autocast {autocast} |
| torch | {torch} |
| steps run | {steps_run} of {steps} ({edits_per_step} edits per step{sequence}) |
| loss weights | {weights} |
| wall time | {wall_s:.0f} s ({step_s:.2f} s per step, validations included) |
| best checkpoint | step {best_step} ({best_wall_s:.0f} s into the run) |
| validation at the best step | {best_val} |
| unedited model on the validation split | {unedited} |
| data | {data} ({val_size} records held out for validation) |
| edited weights | {targets} |
| continued from | {init_from} |

Written by `mend train` at the end of the run (`history.json` and `training.png` hold the curves;
`editor_config.json` the full configuration).
"""


def device_description(device: str) -> dict:
    """{device, device_name, torch}: the GPU's name on CUDA, else the CPU's."""
    name = platform.processor() or platform.machine()
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
    return {"device": device, "device_name": name, "torch": torch.__version__}


def _fmt(metrics: dict | None) -> str:
    if not metrics:
        return "-"
    return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))


def loss_weights(cfg) -> str:
    """The training loss's terms and weights, as the card states them."""
    against = "the unedited model" if cfg.loc_against == "unedited" else "the model before each step"
    terms = [f"edit {cfg.c_edit:g}", f"neighbours' KL {cfg.c_loc:g} (against {against})"]
    if cfg.sequence > 1:
        terms.append(f"earlier edits' NLL {cfg.c_keep:g}")
    if cfg.loc_others > 0:
        terms.append(f"KL at {cfg.loc_others} other records' true answers {cfg.c_other:g}")
    return "; ".join(terms)


def write_card(out: Path, cfg, history: dict, best: dict | None, autocast: str) -> Path:
    """Fill :data:`CARD_TEMPLATE` from the run's config and history; returns the card's path."""
    steps_run = len(history["train"])
    fields = {**device_description(cfg.device), "model": cfg.model, "dtype": cfg.dtype, "autocast": autocast,
              "steps_run": steps_run, "steps": cfg.steps, "edits_per_step": cfg.edits_per_step,
              "sequence": (f"; {cfg.sequence} steps applied one after another per sequence, keep weight {cfg.c_keep:g}"
                           if cfg.sequence > 1 else ""),
              "weights": loss_weights(cfg),
              "wall_s": history["wall_s"], "step_s": history["step_s"],
              "best_step": best["step"] if best else "-", "best_wall_s": best["wall_s"] if best else 0.0,
              "best_val": _fmt(best["val"] if best else None), "unedited": _fmt(history.get("unedited")),
              "data": ", ".join(cfg.data), "val_size": cfg.val_size,
              "targets": ", ".join(cfg.mend.targets) or "-", "init_from": cfg.init_from or "-"}
    path = Path(out) / CARD_FILE
    path.write_text(CARD_TEMPLATE.format(**fields))
    return path
