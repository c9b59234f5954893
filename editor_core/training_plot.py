"""PNG of a training run: train losses and validation metrics against steps."""

from __future__ import annotations

from pathlib import Path


def _smooth(values: list[float], window: int = 20) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_history(history: dict, path: Path) -> Path:
    """Write the plot and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in history["train"]]
    for key, label in (("edit_nll", "edit NLL (post-edit)"), ("loc_kl", "locality KL")):
        ax_loss.plot(steps, _smooth([h[key] for h in history["train"]]), label=label)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("training losses (moving average)")
    ax_loss.legend()
    val = history["val"]
    for key in ("efficacy", "paraphrase", "neighborhood"):
        ax_val.plot([v["step"] for v in val], [v[key] for v in val], marker="o", label=key)
    if "unedited" in history:
        ax_val.axhline(history["unedited"]["neighborhood"], ls="--", c="gray", label="neighborhood, unedited")
    ax_val.set_ylim(-0.02, 1.02)
    ax_val.set_xlabel("step")
    ax_val.set_title("validation (one edit at a time)")
    ax_val.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
