"""Figure 5: latency of rolling back one edit with 1, 100 and 1,000 active edits.

One EditEngine per count, each on its own copy of the model, replayed from a journal of that many
synthesized MEND-shaped edits. A sample is EditEngine.rollback of the oldest active edit (revert,
sha256 of the targets, journal op under the writer lock): what POST /rollback runs on the model
thread, without HTTP. After each sample the count is restored, untimed, by a real EditEngine.edit
whose editor returns the next synthesized delta. Counts are interleaved (1, 100, 1000, 100, 1000, 1 ...).
"""

from __future__ import annotations

import copy
import time

from bench.common import (
    BenchContext,
    Figure,
    Verdict,
    journal_with,
    pct,
    py_profile,
    rotate,
    summary,
    synthetic_deltas,
)

NAME = "rollback"
TITLE = "5. Rollback latency vs active edits"


class _Replayer:
    """An Editor whose compute_delta hands out pre-made deltas (refills the active set)."""

    method = "mend"

    def __init__(self, deltas):
        self.deltas = deltas

    def compute_delta(self, model, tokenizer, requests):
        return next(self.deltas)


def run(ctx: BenchContext) -> Figure:
    from editor_core.stack import EditStack
    from service.engine import EditEngine
    from service.journal import Journal
    from service.metrics import Metrics
    from service.writer_lock import WriterLock

    fig = Figure(NAME, TITLE)
    lm = ctx.lm()
    base_stack = ctx.stack()
    targets = list(base_stack.targets.values())
    deltas = synthetic_deltas(ctx, seed=1)
    req = ctx.edit_requests(1)[0]
    body = [{"prompt": req.prompt, "target": req.target, "subject": req.subject}]
    engines, locks = {}, []
    try:
        for n in ctx.sizes.rollback_counts:
            prefix = journal_with(ctx, n)
            model = copy.deepcopy(lm.model)
            stack = EditStack(model, targets)
            journal = Journal(ctx.client(), stack.fingerprint, prefix)
            lock = WriterLock(ctx.client(), journal.lock_key, 60000)
            lock.acquire(wait_s=10)
            lock.start_heartbeat()
            locks.append(lock)
            engine = EditEngine(model, lm.tokenizer, stack, {"mend": _Replayer(deltas)}, journal, lock, Metrics(), {})
            engine.replay()
            engines[n] = engine
        times: dict[int, list[float]] = {n: [] for n in engines}
        started = time.monotonic()
        for k in range(ctx.sizes.rollback_samples):
            if k and time.monotonic() - started > ctx.sizes.deadline_s:
                fig.notes.append(f"stopped after {k} rounds at the {ctx.sizes.deadline_s:.0f} s deadline")
                break
            for n in rotate(list(engines), k):
                engine = engines[n]
                oldest = engine.stack.active_ids[0]
                t0 = time.perf_counter()
                engine.rollback(oldest, "bench")
                times[n].append(time.perf_counter() - t0)
                engine.edit(body, "mend", "bench", None)  # untimed: back to n active edits
                assert len(engine.stack.active_ids) == n
        for n, ts in times.items():
            fig.rows.append({"active edits": n, **summary(ts), "ms per active edit (p50)":
                             round(pct(ts, 50) * 1000 / n, 3)})
        lo, hi = min(times), max(times)
        fig.ratios = {f"p50 at {hi:,} / p50 at {lo:,} active edits": pct(times[hi], 50) / pct(times[lo], 50)}
        fig.verdicts.append(Verdict(f"rollback latency with {', '.join(map(str, times))} active edits (report only)",
                                    ", ".join(f"{pct(t, 50) * 1000:.0f} ms" for t in times.values()), None))
        big = engines[hi]
        fig.profile = (f"cProfile, one rollback with {hi:,} active edits (top by cumulative time):\n"
                       + py_profile(lambda: big.rollback(big.stack.active_ids[0], "bench")))
        fig.notes += [
            "latency grows linearly with the active edits: EditStack.revert rebuilds every target the edit "
            "touched from the pristine base plus all remaining edits (one in-place addmm_ per edit per "
            "target), which is what keeps rollback bit-exact. What would make it flat-ish: keeping periodic fp32 checkpoints of "
            "the accumulated targets (every k edits) so a revert replays only the edits after the nearest "
            "checkpoint before the reverted one (still bit-exact, same order of additions)",
            "samples at each count are taken from the same engine; the active set is restored between samples",
        ]
    finally:
        for lock in locks:
            lock.release()
    return fig
