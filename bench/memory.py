"""Figure 7: peak RSS of the service process (default model, N active edits) vs the fp32 weights.

Peak RSS is VmHWM of a real `mend serve` process after it replayed the journal and answered one
query (the restarts of figure 4, reused when it ran in the same invocation).
"""

from __future__ import annotations

from bench.common import BenchContext, Figure, Verdict, pct, ratio
from bench.replay import restart_samples

NAME = "memory"
TITLE = "7. Memory: peak RSS of the service vs fp32 model weights"


def run(ctx: BenchContext) -> Figure:
    fig = Figure(NAME, TITLE)
    n = ctx.sizes.replay_edits
    samples = restart_samples(ctx)
    model = ctx.lm().model
    fp32 = sum(p.numel() for p in model.parameters()) * 4  # tied weights counted once
    factors = None
    if f"journal:{n}" in ctx.cache:
        from service.journal import Journal

        journal = Journal(ctx.client(), ctx.stack().fingerprint, ctx.cache[f"journal:{n}"])
        factors = sum(int(ctx.client().strlen(journal.key("delta", i.decode())))
                      for i in ctx.client().lrange(journal.key("edits"), 0, -1))
    for edits in (0, n):
        hwm = [s["hwm_kb"] * 1024 for s in samples if s["edits"] == edits]
        rss = [s["rss_kb"] * 1024 for s in samples if s["edits"] == edits]
        fig.rows.append({"service process": f"{edits:,} active edits", "n": len(hwm),
                         "peak RSS MiB (p50)": round(pct(hwm, 50) / 2**20, 1),
                         "RSS after ready MiB (p50)": round(pct(rss, 50) / 2**20, 1),
                         "peak / fp32 weights": round(ratio(pct(hwm, 50), fp32), 2)})
    fig.rows.append({"service process": "fp32 model weights (parameters x 4 B)", "n": 1,
                     "peak RSS MiB (p50)": round(fp32 / 2**20, 1), "RSS after ready MiB (p50)": "",
                     "peak / fp32 weights": 1.0})
    peak_n = pct([s["hwm_kb"] * 1024 for s in samples if s["edits"] == n], 50)
    peak_0 = pct([s["hwm_kb"] * 1024 for s in samples if s["edits"] == 0], 50)
    fig.ratios = {f"peak RSS with {n:,} edits / fp32 weights": ratio(peak_n, fp32),
                  "peak RSS with no edits / fp32 weights": ratio(peak_0, fp32),
                  f"peak RSS with {n:,} edits / with none": ratio(peak_n, peak_0)}
    fig.verdicts.append(Verdict(f"peak RSS with {n:,} edits vs fp32 weights (report only)",
                                f"{ratio(peak_n, fp32):.2f}x ({peak_n / 2**20:.0f} MiB vs {fp32 / 2**20:.0f} MiB)",
                                None))
    if factors is not None:
        fig.notes.append(f"the {n:,} delta blobs hold {factors / 2**20:.0f} MiB of fp32 factors; the EditStack "
                         "keeps every active delta in memory (for revert), and replay holds the blobs and the "
                         "parsed tensors at once, so the peak grows by ~2x the factor bytes")
    fig.notes.append("extra over the weights without edits: the pristine fp32 copy and the fp32 accumulator of "
                     "the 9 targets (2 x 30 MiB), torch/transformers/uvicorn runtime, generation buffers")
    return fig
