"""tools.results' latency stage on a tiny model: every method timed beside a forward+backward, and the
model left exactly as it was (each edit reverted, no gradient left on the weights)."""

from __future__ import annotations

from editor_core.data import EditRecord
from editor_core.methods.locate import LocateEditor
from editor_core.stack import EditStack
from editor_core.stats import collect_key_stats
from editor_core.targets import out_proj_targets
from tests.core.test_locate import LAYERS, TARGETS, config, texts
from tools.results import _latency_section, latency


def test_latency_times_each_method_and_leaves_the_model_untouched(tiny_model, tiny_tokenizer, facts):
    stats = collect_key_stats(tiny_model, tiny_tokenizer, texts(facts), LAYERS, progress=False)
    stack = EditStack(tiny_model, out_proj_targets(tiny_model, LAYERS))
    editors = {m: LocateEditor(m, stack, stats, config(next(iter(stack.targets.values())).d_in))
               for m in ("rome", "alphaedit")}
    records = [EditRecord(str(i), f"About {f['subject']}", f["subject"], TARGETS[i], None)
               for i, f in enumerate(facts[:3])]
    for p in tiny_model.parameters():  # as models.load leaves the served model
        p.requires_grad_(False)
    before = stack.sha256()

    out = latency(tiny_model, tiny_tokenizer, stack, editors, records)

    assert sorted(out) == ["alphaedit", "rome"]
    for figures in out.values():
        assert figures["edit"]["n"] == figures["fwd_bwd"]["n"] == 3
        assert 0 < figures["fwd_bwd"]["median"] <= figures["fwd_bwd"]["p95"]
        assert 0 < figures["edit"]["median"] <= figures["edit"]["p95"]
    assert stack.sha256() == before and not stack.active_ids
    assert all(p.grad is None and not p.requires_grad for p in tiny_model.parameters())
    table = "\n".join(_latency_section({"latency": out, "records": 3, "threads": 1, "load_average": 0.0,
                                        "finished": "now"}))
    assert "| rome |" in table and "| alphaedit |" in table
