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

from bench.corrections import RunConfig, measure, plot, to_figure
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

