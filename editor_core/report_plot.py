"""Bar chart comparing evaluation reports (e.g. MEND vs FT vs FT+KL) metric by metric."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from editor_core.evaluate import METRICS, EvalReport

log = logging.getLogger(__name__)


def _as_dict(report: EvalReport | dict | str | Path) -> dict:
    if isinstance(report, EvalReport):
        return report.to_dict()
    if isinstance(report, (str, Path)):
        return json.loads(Path(report).read_text())
    return report


def plot_reports(reports: dict[str, EvalReport | dict | str | Path], out: str | Path) -> Path:
    """Save a grouped bar chart: the unedited scores (from the first report) and each report's edited ones.

    ``reports`` maps a label to an :class:`EvalReport`, its ``to_dict()`` or a JSON file it wrote.
    Metrics missing from a report are drawn as empty slots. Returns the image path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not reports:
        raise ValueError("no reports to plot")
    docs = {label: _as_dict(r) for label, r in reports.items()}
    first = next(iter(docs.values()))
    series = {"unedited": first["pre"]}
    series.update({label: d.get("post") or {} for label, d in docs.items()})
    metrics = [m for m in METRICS if any(s.get(m) is not None for s in series.values())]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(1.6 * len(metrics) + 2, 4))
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(metrics))]
        ys = [values.get(m) if values.get(m) is not None else 0.0 for m in metrics]
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(metrics)), metrics, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (mean over records)")
    ax.set_title(f"{first.get('n_records', '?')} records")
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    log.info("wrote %s", out)
    return out
