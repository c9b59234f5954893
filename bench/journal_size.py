"""Figure 3: bytes a single-fact MEND edit adds to Redis vs the dense fp32 delta of its targets.

Real edits through :meth:`service.engine.EditEngine.edit` (score, compute, apply, journal in one
MULTI/EXEC) against a real redis-server. For each edit the growth of every key of the journal's
namespace is measured with ``MEMORY USAGE`` (the stream, the list and the head grow; ``delta:<id>``
and ``edit:<id>`` are new), and the delta blob with ``STRLEN``.
"""

from __future__ import annotations

import uuid

from bench.common import BenchContext, Figure, Verdict, pct, ratio

NAME = "journal_size"
TITLE = "3. Journal bytes in Redis per single-fact MEND edit"


def namespace_bytes(client, ns: str) -> dict[str, int]:
    """MEMORY USAGE (all samples) of every key under ``ns:`` except the writer lock."""
    out = {}
    for key in client.scan_iter(match=f"{ns}:*", count=1000):
        name = key.decode()
        if name.endswith(":lock"):
            continue
        out[name] = int(client.memory_usage(key, samples=0) or 0)
    return out


def run(ctx: BenchContext) -> Figure:
    from service.engine import EditEngine
    from service.journal import Journal
    from service.metrics import Metrics
    from service.writer_lock import WriterLock

    fig = Figure(NAME, TITLE)
    lm = ctx.lm()
    stack = ctx.stack()
    editor = ctx.mend_editor(stack)
    client = ctx.client()
    journal = Journal(client, stack.fingerprint, f"bench-size-{uuid.uuid4().hex[:6]}")
    lock = WriterLock(client, journal.lock_key, 60000)
    lock.acquire()
    lock.start_heartbeat()  # building can outlast the ttl
    engine = EditEngine(lm.model, lm.tokenizer, stack, {"mend": editor}, journal, lock, Metrics(), {})
    per_edit, blob_len, factor_bytes, record_len, ranks, dense = [], [], [], [], [], []
    try:
        for req in ctx.edit_requests(ctx.sizes.journal_edits):
            before = namespace_bytes(client, journal.ns)
            out = engine.edit([{"prompt": req.prompt, "target": req.target, "subject": req.subject}], "mend",
                              "bench", None)
            after = namespace_bytes(client, journal.ns)
            per_edit.append(sum(after.values()) - sum(before.values()))
            eid = out["edit_id"]
            blob_len.append(int(client.strlen(journal.key("delta", eid))))
            record_len.append(int(client.strlen(journal.key("edit", eid))))
            delta = stack.delta_of(eid)
            factor_bytes.append(delta.nbytes())
            ranks.append(max(u.rank for u in delta.updates.values()))
            dense.append(sum(stack.targets[n].d_out * stack.targets[n].d_in * 4 for n in delta.updates))
    finally:
        stack.reset()
        lock.release()
    dense_b = dense[0]
    p50 = pct(per_edit, 50)
    fig.rows = [
        {"measure": "Redis bytes added per edit (MEMORY USAGE, all keys)", "n": len(per_edit),
         "p50": int(p50), "p95": int(pct(per_edit, 95)), "max": max(per_edit)},
        {"measure": "  of which delta blob (STRLEN delta:<id>, safetensors)", "n": len(blob_len),
         "p50": int(pct(blob_len, 50)), "p95": int(pct(blob_len, 95)), "max": max(blob_len)},
        {"measure": "  of which edit record JSON (STRLEN edit:<id>)", "n": len(record_len),
         "p50": int(pct(record_len, 50)), "p95": int(pct(record_len, 95)), "max": max(record_len)},
        {"measure": "raw fp32 factors (EditDelta.nbytes)", "n": len(factor_bytes),
         "p50": int(pct(factor_bytes, 50)), "p95": int(pct(factor_bytes, 95)), "max": max(factor_bytes)},
        {"measure": f"dense fp32 delta of the same {len(stack.targets)} targets", "n": 1,
         "p50": dense_b, "p95": dense_b, "max": dense_b},
    ]
    worst = ratio(dense_b, max(per_edit))
    fig.ratios = {"dense / journal bytes (p50 edit)": ratio(dense_b, p50),
                  "dense / journal bytes (largest edit)": worst}
    r = ratio(dense_b, p50)
    fig.verdicts.append(Verdict("journal bytes per single-fact edit <= 1/50 of dense fp32",
                                f"1/{r:.0f} (largest edit 1/{worst:.0f})", r >= 50,
                                "" if r >= 50 else f"{50 / r:.2f}x too large"))
    fig.notes += [
        f"editor: {ctx.editor_note}",
        f"rank of the factors = tokens feeding them (all tokens of prompt + target, or the subject's tokens "
        f"for an editor with factor_tokens='subject', like the shipped one): p50 {pct(ranks, 50):.0f}, max {max(ranks)}; "
        "bytes grow linearly with it (targets x rank x (d_out + d_in) x 4 B), so more than "
        f"~{int(dense_b / 50 / (9 * (1536 + 576) * 4))} factor tokens would cross 1/50 on this model",
        "stored as fp32 factors; bf16 factors would halve it (the dense reference stays fp32)",
    ]
    return fig
