"""Regenerate docs/RESULTS.md: unedited vs FT vs FT+KL vs MEND on CounterFact, batched and sequential.

    python -m tools.results [--data ../shared/data/counterfact-val.json] [--compare 50] [--full]

Everything is measured in this one run on this machine; the markdown states the command, the date,
the machine and the record counts next to every table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from editor_core import checkpoint, models
from editor_core.baselines import FTConfig, make_baseline
from editor_core.data import load_records
from editor_core.editor import MendEditor
from editor_core.evaluate import METRICS, EvalReport, evaluate
from editor_core.report_plot import plot_reports
from editor_core.stack import EditStack

log = logging.getLogger("results")

FT_KL_SAME = (
    "FT and FT+KL agree to the last digit: FT reaches top-1 in about 2 Adam steps (docs/BENCHMARKS.md, "
    "figure 1) and the KL term is exactly zero at the first step, so it has no time to act; FT+KL only "
    "costs more."
)


def _cell(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _row(name: str, metrics: dict, report: EvalReport | None) -> str:
    ms = "" if report is None else f"{report.edit_ms['median']:.0f} / {report.edit_ms['p95']:.0f}"
    return "| " + " | ".join([name, *(_cell(metrics.get(m)) for m in METRICS), ms]) + " |"


def _table(rows: list[str]) -> str:
    head = "| method | " + " | ".join(METRICS) + " | edit_ms p50 / p95 |"
    sep = "|" + "---|" * (len(METRICS) + 2)
    return "\n".join([head, sep, *rows])


def _plot(batched: dict[int, EvalReport], sequential: dict[int, EvalReport], unedited_ns: float, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, reps, style in (("batched", batched, "-o"), ("sequential", sequential, "--s")):
        ns = sorted(reps)
        ax.plot(ns, [reps[n].post["efficacy"] for n in ns], style, label=f"efficacy, {label}")
        ax.plot(ns, [reps[n].post["neighborhood"] for n in ns], style, label=f"neighborhood, {label}")
    ax.axhline(unedited_ns, c="gray", ls=":", label="neighborhood, unedited")
    ax.set_xscale("log")
    ax.set_xlabel("edits applied together (batched) or stacked (sequential)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("MEND on SmolLM2-135M, CounterFact")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def targets_section(title: str, pre: dict, post: dict, edit_ms_median: float) -> list[str]:
    """Issue 4's targets for MEND, each with the measured figure and met / missed."""
    checks = [
        ("efficacy >= 0.95", post["efficacy"], post["efficacy"] >= 0.95),
        ("paraphrase >= 0.70", post["paraphrase"], post["paraphrase"] >= 0.70),
        (f"neighborhood >= unedited - 0.05 = {pre['neighborhood'] - 0.05:.3f}", post["neighborhood"],
         post["neighborhood"] >= pre["neighborhood"] - 0.05),
        ("edit_ms median < 300 ms (2 CPU cores)", edit_ms_median, edit_ms_median < 300),
    ]
    lines = [f"## Targets ({title})", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {'met' if ok else 'MISSED'} |" for name, value, ok in checks]
    lines += ["", "What was tried for the misses (edited layers, factor tokens, c_loc, steps) and what limits "
              "the editor: README.md, section 'What the shipped editor does differently', and "
              "editors/smollm2-135m/README.md.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--data", default="../shared/data/counterfact-val.json")
    p.add_argument("--compare", type=int, default=50, help="records for the 4-way table (FT is slow)")
    p.add_argument("--scale", type=int, default=100, help="records for the batched/sequential runs")
    p.add_argument("--full", type=int, default=0, metavar="N",
                   help="also evaluate MEND alone on the first N records of --data (-1: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--ft-steps", type=int, default=25)
    p.add_argument("--out", default="docs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not Path(args.data).is_file():
        p.error(f"--data: {args.data} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    load_at_start = os.getloadavg()[0]
    records = load_records(args.data)
    lm = models.load(args.model)
    editor_dir = checkpoint.default_editor_dir(args.model)
    if editor_dir is None:
        p.error(f"no shipped editor for {args.model}")
    stack = EditStack(lm.model, checkpoint.stack_targets(lm.model, editor_dir))
    mend = MendEditor.load(editor_dir, stack)
    m, tok = lm.model, lm.tokenizer

    def run(editor, recs, **kw) -> EvalReport:
        return evaluate(m, tok, stack, editor, recs, **kw)

    cmp_recs = records[: args.compare]
    scale_recs = records[: args.scale]
    reports: dict[str, EvalReport] = {}
    batched: dict[int, EvalReport] = {}
    sequential: dict[int, EvalReport] = {}
    full: EvalReport | None = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((Path(editor_dir) / checkpoint.CONFIG).read_text())
    cal = cfg.get("calibration")
    calibration = (f", step sizes x{cal['total_scale']:g} from `mend calibrate` on the training run's validation "
                   "split" if cal else "")
    command = f"python -m tools.results {' '.join(argv if argv is not None else sys.argv[1:])}"

    def write() -> None:
        """Rewrite the report with every stage finished so far (a long run is useful if cut short)."""
        lines = [
            "# Results: MEND on SmolLM2-135M (CounterFact)",
            "",
            f"Generated by `{command}` (`make results`) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{platform.machine()}, {os.cpu_count()} CPU cores (load average {load_at_start:.1f} at the start), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); {time.time() - t_start:.0f} s so far.",
            f"Editor: `editors/{Path(editor_dir).name}` ({cfg.get('editor_id')}), targets "
            f"{cfg['mend']['targets'][0]} ... {cfg['mend']['targets'][-1]}, factor tokens: "
            f"{cfg['mend']['factor_tokens']}{calibration}.",
            f"Data: `{args.data}`. Metrics as defined in DESIGN.md; edit_ms is compute + apply of one edit "
            "call on this machine (absolute times drift with its load).",
            "",
        ]
        if len(reports) == 3:
            lines += [
                f"## Unedited, FT, FT+KL, MEND on the same {len(cmp_recs)} records (one edit at a time)",
                "",
                _table([
                    _row("unedited", reports["MEND"].pre, None),
                    _row(f"FT (<= {args.ft_steps} Adam steps)", reports["FT"].post, reports["FT"]),
                    _row(f"FT+KL (<= {args.ft_steps} steps)", reports["FT-KL"].post, reports["FT-KL"]),
                    _row("MEND", reports["MEND"].post, reports["MEND"]),
                ]),
                "",
                "![metrics per method](results_compare.png)",
                "",
            ]
            if reports["FT"].post == reports["FT-KL"].post:
                lines += [FT_KL_SAME, ""]
            plot_reports({"FT": reports["FT"], "FT+KL": reports["FT-KL"], "MEND": reports["MEND"]},
                         out / "results_compare.png")
        best = full or reports.get("MEND")
        if best is not None:
            lines += targets_section(f"MEND, {best.n_records} records", best.pre, best.post, best.edit_ms["median"])
        if full is not None:
            lines += [
                f"## MEND alone on the first {full.n_records} records of `{args.data}` (one edit at a time)",
                "",
                _table([_row("unedited", full.pre, None), _row("MEND", full.post, full)]),
                "",
            ]
        if batched:
            lines += [
                f"## Batched and sequential MEND edits ({len(scale_recs)} records)",
                "",
                "| mode | edits | efficacy | paraphrase | neighborhood | unedited neighborhood |",
                "|---|---|---|---|---|---|",
            ]
            for mode, reps in (("batched", batched), ("sequential", sequential)):
                for n, r in sorted(reps.items()):
                    lines.append(f"| {mode} | {n} | {_cell(r.post['efficacy'])} | {_cell(r.post['paraphrase'])} "
                                 f"| {_cell(r.post['neighborhood'])} | {_cell(r.pre['neighborhood'])} |")
            if len(sequential) > 1:
                _plot(batched, sequential, batched[1].pre["neighborhood"], out / "results_scaling.png")
                lines += ["", "![efficacy and neighborhood against the number of edits](results_scaling.png)"]
            lines.append("")
        dump = {
            "compare": {k: r.to_dict() | {"rows": None} for k, r in reports.items()},
            "batched": {b: r.to_dict() | {"rows": None} for b, r in batched.items()},
            "sequential": {n: r.to_dict() | {"rows": None} for n, r in sequential.items()},
            "full": full.to_dict() | {"rows": None} if full else None,
        }
        (out / "results.json").write_text(json.dumps(dump, indent=1))
        (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
        log.info("wrote %s", out / "RESULTS.md")

    if args.full:  # first: the headline figure, kept even if a later stage is cut short
        full = run(mend, records if args.full < 0 else records[: args.full])
        write()
    reports["MEND"] = run(mend, cmp_recs)
    for method, kl in (("ft", 0.0), ("ft-kl", 1.0)):
        ft = make_baseline(method, stack, FTConfig(max_steps=args.ft_steps, kl_weight=kl))
        reports[method.upper()] = run(ft, cmp_recs)
    write()
    for b in (1, 10, 100):
        if b <= len(scale_recs):
            batched[b] = run(mend, scale_recs, batch_size=b)
    sequential[1] = batched[1]
    write()
    for n in (10, 100):
        if n <= len(scale_recs):
            sequential[n] = run(mend, scale_recs, sequential=n)
            write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
