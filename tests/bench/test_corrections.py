"""CI-size corrections run (issue 13): the same code as ``mend bench --only corrections`` against a real
``mend serve`` subprocess (uvicorn, embedded redis-server), on a tiny random llama with FT edits.

The tiny model is random, so its canaries move with any edit: the guard is off here (as in the other
tests on tiny models). What must hold on it: every correction accepted and the target greedy right
after its edit, rollbacks answered and journaled, the rolled-back facts no longer answering their
targets, and a restart that rebuilds the same weights (sha256) and the same answers.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from bench.corrections import Progress, RunConfig, load_facts, measure, plot, recover_rows, to_figure
from bench.runner import render

pytestmark = pytest.mark.integration
FACTS = Path(__file__).resolve().parents[1] / "fixtures" / "facts.json"
log = logging.getLogger(__name__)


def test_corrections_run_on_a_real_service(tiny_model_dir, tmp_path):
    cfg = RunConfig(n=16, data=FACTS, workdir=tmp_path / "run", model=str(tiny_model_dir), method="ft",
                    canary_guard=False, rollbacks=4, every=4, sample=8,
                    env={"MEND_EDITORS_DIR": str(tmp_path / "no-editors")})
    res = measure(cfg)
    log.warning("corrections result: %s", {k: v for k, v in res.items() if k not in ("edits", "timeline")})
    assert res["n"] == 16 and res["accepted"] == 16 and res["refused"] == {}
    assert res["neighbour_answer_tokens"] and 0 <= res["neighbour_kept"] <= 1
    assert len(res["rolled_back_facts"]) == 4 and len(res["answers"]["end_prompt"]) == 16
    assert res["success_at_ack"] == 1.0
    assert len(res["rollback_s"]) == 4 and all(t > 0 for t in res["rollback_s"])
    assert res["active_edits"] == 12 and res["version"] == 20
    assert res["restart_sha256"] == res["sha256"] and res["restart_version"] == res["version"]
    assert res["same_answers_after_restart"] == 16
    assert res["timeline"] and res["timeline"][-1]["done"] == 16
    assert res["delta_bytes_total"] > 0 and res["aof_bytes"] > res["delta_bytes_total"]
    assert res["peak_rss_kb"] > 0 and res["empty_ready_s"] > 0 and res["restart_ready_s"] > 0
    fig = to_figure(res, fp32_bytes=10**6)
    assert all(math.isfinite(v) and v > 0 for v in fig.ratios.values())
    text = render([fig], {"nproc": "2"}, "test", "now", quick=True)
    assert "9. Corrections through the service" in text and "rollback over HTTP" in text
    png = plot(res, tmp_path / "corrections.png")
    assert png.stat().st_size > 1000



def test_a_stopped_run_resumes_on_the_same_journal_without_posting_a_fact_twice(tiny_model_dir, tmp_path):
    def config(max_posts):
        return RunConfig(n=10, data=FACTS, workdir=tmp_path / "kept", model=str(tiny_model_dir), method="ft",
                         canary_guard=False, rollbacks=3, every=5, sample=4, keep_progress=True, max_posts=max_posts,
                         env={"MEND_EDITORS_DIR": str(tmp_path / "no-editors")})

    first = measure(config(4))
    assert first["stopped"] and first["posted"] == 4 and first["accepted"] == 4
    kept = Progress(tmp_path / "kept" / "progress.json")
    assert kept.resumed and sorted(x["i"] for x in kept.rows) == [0, 1, 2, 3]

    res = measure(config(None))
    assert not res.get("stopped") and res["accepted"] == 10
    assert sorted(x["i"] for x in res["edits"]) == list(range(10))  # each fact posted once over both runs
    assert [r["active_edits"] for r in res["runs"]] == [0, 4]  # the second run replayed the first one's edits
    assert res["version"] == 10 + 3 and res["active_edits"] == 7  # 10 edits journaled, not 14; 3 rolled back
    assert res["restart_sha256"] == res["sha256"] and res["same_answers_after_restart"] == 10
    assert any(note.startswith("resumed: the run was stopped and continued 1 time") for note in
               to_figure(res, fp32_bytes=10**6).notes)
    with pytest.raises(RuntimeError, match="has finished"):
        measure(config(None))


def test_another_runs_progress_is_refused(tmp_path):
    progress = Progress(tmp_path / "progress.json")
    progress.check(10, "ft", FACTS)
    progress.save(base={"prompt": []})
    with pytest.raises(RuntimeError, match="use another --corrections-dir"):
        Progress(tmp_path / "progress.json").check(20, "ft", FACTS)


def test_an_edit_journaled_but_never_answered_is_recovered_from_the_journal():
    facts = load_facts(FACTS, 3)
    rows = [{"i": 0, "status": 200, "edit_id": "e0", "version": 1, "success": True}]
    records = [{"edit_id": "e0", "version": 1, "requests": [{"prompt": facts[0].prompt, "target": facts[0].target_new}]},
               {"edit_id": "e1", "version": 2, "requests": [{"prompt": facts[2].prompt, "target": facts[2].target_new}],
                "results": [{"success": False}]},
               {"edit_id": "x", "version": 3, "requests": [{"prompt": "not one of ours", "target": "y"}]}]
    assert recover_rows(rows, records, facts) == 1
    assert rows[-1]["i"] == 2 and rows[-1]["edit_id"] == "e1" and rows[-1]["recovered"]
    assert rows[-1]["success"] is False and rows[-1]["version"] == 2
    assert recover_rows(rows, records, facts) == 0  # idempotent


def test_a_rolled_back_fact_is_restored_unless_its_target_stays_where_it_was_not_before():
    from bench.corrections import restored

    assert restored(" Paris, France", " Paris, the", "Rome")  # the old answer is back
    assert not restored(" Rome, Italy", " Paris, the", "Rome")  # the edit's answer outlived the rollback
    # the model already said the target before the edit: its answer now cannot tell, so it counts as back
    assert restored(" Europe, while the Island", " Europe, while the Peak", "Europe")
