"""Every benchmark runs once at a tiny size (tiny llama, fixture facts) so none of them can rot.

No timing thresholds: only that each figure is produced, its times are positive and its ratios are
computed from them. The real figures come from `make bench` (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from bench.common import QUICK, BenchContext
from bench.runner import FIGURES, render, run_figures, selected

pytestmark = pytest.mark.integration
FACTS = Path(__file__).resolve().parents[1] / "fixtures" / "facts.json"



def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_benchmark_runs_at_tiny_size(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MEND_EDITORS_DIR", str(tmp_path / "no-editors"))  # untrained editor, as stated
    sizes = dataclasses.replace(QUICK, query_clients=16, query_per_client=1, rollback_counts=(1, 3, 6),
                                replay_edits=6, edit_records=2, ft_records=1)
    ctx = BenchContext(model=str(tiny_model_dir), data=FACTS, sizes=sizes, workdir=tmp_path / "work")
    try:
        figures = {f.key: f for f in run_figures(ctx, list(FIGURES))}
    finally:
        ctx.close()
    assert set(figures) == set(FIGURES)
    for f in figures.values():
        assert not f.skipped, f"{f.key}: {f.skipped}\n{f.profile}"
        assert f.rows and f.ratios, f.key
        for key, value in f.ratios.items():
            if not isinstance(value, str):
                assert _finite_positive(value), (f.key, key, value)
        for row in f.rows:
            for col, value in row.items():
                if col.startswith("p") and col.endswith("_ms") or col.endswith("_s") and value != "":
                    assert _finite_positive(value), (f.key, col, row)
    lat = {r["measure"].split()[0]: r for r in figures["edit_latency"].rows}
    assert math.isclose(figures["edit_latency"].ratios["mend_p50 / fwd_bwd_p50"],
                        lat["MEND"]["p50_ms"] / lat["one"]["p50_ms"], rel_tol=0.02)
    assert figures["replay"].verdicts[0].met is True  # each target written exactly once on replay
    assert [r["active edits"] for r in figures["rollback"].rows] == [1, 3, 6]
    assert figures["journal_size"].rows[0]["p50"] > 0
    text = render(list(figures.values()), {"nproc": "2"}, "mend bench --quick", "now", quick=True)
    assert "## Summary" in text and all(f.title in text for f in figures.values())


def test_only_selects_and_rejects_unknown_names():
    assert selected(["replay,memory"]) == ["replay", "memory"]
    assert selected(None) == list(FIGURES)
    with pytest.raises(SystemExit):
        selected(["nope"])
