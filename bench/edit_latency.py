"""Figure 1: edit latency. MEND (compute + apply) vs one forward+backward of the same request, and
FT run until the edit holds (every target token top-1, the service's FT) vs MEND.

The forward+backward floor is what any gradient-based editor must pay at least: the edit loss (mean
NLL of the target tokens) on the same tokenized request, and its gradient with respect to the edited
weight matrices. Samples are interleaved per record (fwd+bwd, MEND, FT in a rotating order).
"""

from __future__ import annotations

import time
import uuid

import torch

from bench.common import BenchContext, Figure, Verdict, pct, ratio, rotate, summary, torch_profile

NAME = "edit_latency"
TITLE = "1. Edit latency: MEND vs one forward+backward, FT vs MEND"


def _efficacy(model, tok, record) -> float:
    """ROME's efficacy success for one record: P(target_new) > P(ground_truth), mean token log-prob."""
    from editor_core.scoring import score_targets

    new, true = score_targets(model, tok, [record.prompt, record.prompt], [record.target_new, record.ground_truth])
    return float(new.mean_logprob > true.mean_logprob)


def run(ctx: BenchContext) -> Figure:
    fig = Figure(NAME, TITLE)
    records = ctx.records()
    if not records:
        fig.skipped = (f"CounterFact records not found at {ctx.data_path}: figure 1 needs them "
                       "(pass --data PATH to an EasyEdit CounterFact file)")
        return fig
    from editor_core.baselines import FTConfig, FTEditor, FTKLEditor
    from editor_core.batching import build_batch, mean_target_nll
    from editor_core.targets import weight_param

    s = ctx.sizes
    lm = ctx.lm()
    model, tok = lm.model, lm.tokenizer
    stack = ctx.stack()
    mend = ctx.mend_editor(stack)
    ft = FTEditor(stack, FTConfig())
    ft_kl = FTKLEditor(stack)
    editors = {"mend": mend, "ft": ft, "ft_kl": ft_kl}
    weights = [weight_param(model, t) for t in stack.targets.values()]
    max_len = mend.config.max_len

    def fwd_bwd(rec) -> None:
        batch = build_batch(tok, [rec.prompt], [rec.target_new], max_len)
        for w in weights:
            w.requires_grad_(True)
        try:
            with torch.enable_grad():
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
                torch.autograd.grad(mean_target_nll(logits, batch), weights)
        finally:
            for w in weights:
                w.requires_grad_(False)

    def edit_with(editor, rec):
        delta = editor.compute_delta(model, tok, [rec.to_request()])
        edit_id = uuid.uuid4().hex
        stack.apply(edit_id, delta)
        return edit_id, delta

    times: dict[str, list[float]] = {"fwd_bwd": [], "mend": [], "ft": [], "ft_kl": []}
    per_record: list[tuple[float, float]] = []  # (mend / fwd_bwd) per record
    eff = {"unedited": [], "mend": [], "ft": [], "ft_kl": []}
    ft_steps: dict[str, list[int]] = {"ft": [], "ft_kl": []}
    ranks: list[int] = []
    recs = records[: s.edit_records]
    try:
        # warm-up (allocator, kernels, tokenizer caches): one of each, untimed
        fwd_bwd(recs[0])
        i, _ = edit_with(mend, recs[0])
        stack.revert(i)
        started = time.monotonic()
        for k, rec in enumerate(recs):
            if time.monotonic() - started > s.deadline_s and k >= 2:
                fig.notes.append(f"stopped after {k} records at the {s.deadline_s:.0f} s deadline")
                break
            sides = ["fwd_bwd", "mend"] + (["ft", "ft_kl"] if k < s.ft_records else [])
            eff["unedited"].append(_efficacy(model, tok, rec))
            got: dict[str, float] = {}
            for side in rotate(sides, k):
                if side == "fwd_bwd":
                    t0 = time.perf_counter()
                    fwd_bwd(rec)
                    got[side] = time.perf_counter() - t0
                    continue
                t0 = time.perf_counter()
                edit_id, delta = edit_with(editors[side], rec)
                got[side] = time.perf_counter() - t0
                eff[side].append(_efficacy(model, tok, rec))
                if side != "mend":
                    ft_steps[side].append(int(delta.meta.get("steps", "0")))
                else:
                    ranks.append(max(u.rank for u in delta.updates.values()))
                stack.revert(edit_id)
            for side, t in got.items():
                times[side].append(t)
            per_record.append((got["mend"], got["fwd_bwd"]))
    finally:
        stack.reset()

    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    for side, label in (("fwd_bwd", "one forward+backward (grad wrt the 9 target weights)"),
                        ("mend", "MEND compute_delta + EditStack.apply"),
                        ("ft", "FT (the service's: Adam on fp32 offsets until every target token is top-1) + apply"),
                        ("ft_kl", "FT+KL (same, + KL(pre||post) on 8 neutral prompts, weight 1) + apply")):
        row = {"measure": label, **summary(times[side])}
        row["efficacy"] = round(mean(eff[side]), 3) if side in eff else ""
        fig.rows.append(row)
    r_mend = ratio(pct(times["mend"], 50), pct(times["fwd_bwd"], 50))
    r_rec = pct([m / f for m, f in per_record], 50)
    ft_n = len(times["ft"])
    r_ft = ratio(pct(times["ft"], 50), pct(times["mend"][:ft_n], 50))
    r_ftkl = ratio(pct(times["ft_kl"], 50), pct(times["mend"][:ft_n], 50))
    fig.ratios = {"mend_p50 / fwd_bwd_p50": r_mend, "median per-record mend / fwd_bwd": r_rec,
                  "ft_p50 / mend_p50 (same records)": r_ft, "ft_kl_p50 / mend_p50 (same records)": r_ftkl}
    fig.verdicts.append(Verdict("MEND edit <= 2.0x one forward+backward", f"{r_mend:.2f}x", r_mend <= 2.0,
                                "" if r_mend <= 2.0 else f"{r_mend / 2.0:.2f}x over the target"))
    fig.verdicts.append(Verdict("FT to the same efficacy >= 10x slower than MEND", f"{r_ft:.1f}x", r_ft >= 10.0,
                                "" if r_ft >= 10.0 else f"short by {10.0 / r_ft:.1f}x"))
    fig.notes += [
        f"editor: {ctx.editor_note}",
        f"efficacy (P(new) > P(true)) unedited {mean(eff['unedited']):.3f}, after MEND {mean(eff['mend']):.3f}, "
        f"after FT {mean(eff['ft']):.3f}, after FT+KL {mean(eff['ft_kl']):.3f}; optimiser steps to top-1 p50 "
        f"FT {pct(ft_steps['ft'], 50):.0f} (max {max(ft_steps['ft'], default=0)}), FT+KL "
        f"{pct(ft_steps['ft_kl'], 50):.0f} (max {max(ft_steps['ft_kl'], default=0)}); "
        f"MEND delta rank (tokens feeding the factors) p50 {pct(ranks, 50):.0f}",
        "FT runs to top-1 on every target token (FTConfig defaults: Adam lr 5e-4, at most 50 steps), "
        "i.e. at least the efficacy MEND reaches (compare the efficacy column)",
    ]
    if r_ft < 10.0:
        steps = pct(ft_steps["ft"], 50)
        per_pass = pct(times["ft"], 50) / max(1.0, 2 * steps + 1)
        fig.notes.append(
            f"FT misses 10x because it is done in {steps:.0f} Adam steps: each step is one forward+backward "
            f"with dense (d_out, d_in) gradients for 9 matrices (~{per_pass * 1000:.0f} ms per forward or "
            "backward pass), so FT costs about (2 x steps + 1) passes while MEND costs ~2. Adam at lr 5e-4 moves "
            "every weight of 9 matrices by ~5e-4 per step, which makes the target top-1 in a couple of steps "
            "(and is exactly what hurts locality). The ratio reaches 10x only against an FT that needs >= ~10 "
            "steps, e.g. a norm-constrained FT-L or a lower lr; MEND itself is already at the forward+backward floor")
    if r_mend > 2.0:
        rec = recs[0]

        def one_edit():
            i, _ = edit_with(mend, rec)
            stack.revert(i)

        fig.profile = "torch.profiler, one MEND compute + apply (+ revert):\n" + torch_profile(one_edit)
    return fig
