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


def _args(**over):
    import argparse

    base = dict(single=300, single_default=1919, batch=100, stacked=100, stacked_long=1000, zsre=100, latency=20)
    return argparse.Namespace(**{**base, **over})


def test_the_default_mend_and_alphaedit_run_1000_stacked_edits_and_take_their_100_point_from_them():
    from tools.results import DEFAULT_METHOD, LONG, stages

    assert LONG[0] == DEFAULT_METHOD and len(set(LONG)) == len(LONG) and {"mend", "alphaedit"} <= set(LONG)
    names = [s.name for s in stages(_args())]
    assert names[0] == f"stacked1000-{DEFAULT_METHOD}"  # the longest first: it may be cut short
    for m in LONG:
        assert f"stacked1000-{m}" in names and f"stacked-{m}" not in names
    assert f"stacked-{next(m for m in ('rome', 'mend') if m not in LONG)}" in names
    single = next(s for s in stages(_args()) if s.name == f"single-{DEFAULT_METHOD}")
    assert single.n == 1919


def test_restore_puts_back_only_the_stages_the_cache_lacks(tmp_path, monkeypatch):
    import json

    import tools.results as results

    monkeypatch.setattr(results, "CACHE", tmp_path / "cache")
    results.CACHE.mkdir()
    all_stages = results.stages(_args())
    kept = {"records": 5, "mine": True}
    (results.CACHE / "single-rome.json").write_text(json.dumps(kept))
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps({"stages": {"single-rome": {"records": 9}, "single-mend": {"records": 7},
                                            "gone-stage": {"records": 1}}, "partial": {}}))

    assert results._restore(saved, all_stages) == ["single-mend"]
    assert json.loads((results.CACHE / "single-rome.json").read_text()) == kept  # a cached stage wins
    assert json.loads((results.CACHE / "single-mend.json").read_text()) == {"records": 7}
    assert not (results.CACHE / "gone-stage.json").exists()  # no longer a stage of the report


def test_a_stage_line_says_which_metric_its_values_were_measured_in():
    from tools.results import _value_metric

    assert "Euclidean" in _value_metric({"stage": {"method": "memit"}})
    fisher = {"settings": {"config": {"value": {"metric": "fisher"}}}}
    assert _value_metric(fisher) == "values in the fisher metric"


def test_a_stage_that_rescored_cached_deltas_says_so():
    from tools.results import _cached_note

    assert _cached_note({"records": 10, "points": [{"n": 10, "from_cache": 0}]}) == ""
    assert _cached_note({"records": 10}) == ""
    assert "7 of its 10 deltas read from an earlier run's cache" in _cached_note(
        {"records": 10, "points": [{"n": 3, "from_cache": 3}, {"n": 10, "from_cache": 7}]})


SETTINGS = {"method": "rome", "layers": (2,)}


def _rome_setup(tiny_model, tiny_tokenizer, facts, n: int):
    stats = collect_key_stats(tiny_model, tiny_tokenizer, texts(facts), LAYERS, progress=False)
    stack = EditStack(tiny_model, out_proj_targets(tiny_model, LAYERS))
    editor = LocateEditor("rome", stack, stats, config(next(iter(stack.targets.values())).d_in))
    records = [EditRecord(str(i), f"About {f['subject']}", f["subject"], TARGETS[i % len(TARGETS)], None)
               for i, f in enumerate(facts[:n])]
    return stack, editor, records


def test_a_single_stage_in_parts_resumes_and_equals_one_evaluation(tiny_llama, tiny_tokenizer, facts, tmp_path,
                                                                    monkeypatch):
    """A single-edit stage cut off after its first part runs only the rest when started again, and its
    merged figures are those of one evaluation over every record."""
    import os

    from editor_core.evaluate import evaluate
    from tools import results

    monkeypatch.setattr(results, "CACHE", tmp_path)
    stack, editor, records = _rome_setup(tiny_llama, tiny_tokenizer, facts, 5)
    stage = results.Stage("single-rome", "rome", "single", "counterfact", len(records))
    calls: list[list[str]] = []

    def run(recs, fail_after=None):
        if fail_after is not None and len(calls) == fail_after:
            raise KeyboardInterrupt  # the stage is cut off here
        calls.append([r.case_id for r in recs])
        return evaluate(tiny_llama, tiny_tokenizer, stack, editor, recs, progress=False)

    import pytest

    with pytest.raises(KeyboardInterrupt):
        results.single_in_parts(stage, records, 2, lambda recs: run(recs, fail_after=1), SETTINGS)
    assert calls == [["0", "1"]]
    lock = results._claim(results.parts_dir(stage) / "00002.json")
    assert lock is not None  # the cut-off part is free again
    os.close(lock)
    partial = results._partial_singles([stage])[stage.name]
    assert partial["records"] == 2

    merged = results.single_in_parts(stage, records, 2, run, SETTINGS)
    assert calls == [["0", "1"], ["2", "3"], ["4"]]  # only the parts not done
    whole = evaluate(tiny_llama, tiny_tokenizer, stack, editor, records, progress=False)
    assert merged["records"] == 5 and merged["parts"] == 3
    for key, value in whole.post.items():
        assert merged["post"][key] == pytest.approx(value, abs=1e-6), key
    assert merged["pre"] == pytest.approx(whole.pre)
    assert merged["edit_ms"]["n"] == 5


def test_parts_made_on_other_records_are_refused(tiny_llama, tiny_tokenizer, facts, tmp_path, monkeypatch):
    import pytest

    from editor_core.evaluate import evaluate
    from tools import results

    monkeypatch.setattr(results, "CACHE", tmp_path)
    stack, editor, records = _rome_setup(tiny_llama, tiny_tokenizer, facts, 3)
    stage = results.Stage("single-rome", "rome", "single", "counterfact", 3)
    run = lambda recs: evaluate(tiny_llama, tiny_tokenizer, stack, editor, recs, progress=False)  # noqa: E731
    results.single_in_parts(stage, records, 2, run, SETTINGS)
    ran = []
    with pytest.raises(ValueError, match="other records"):
        results.single_in_parts(stage, list(reversed(records)) + records[:1], 2, lambda r: ran.append(r), SETTINGS)
    with pytest.raises(ValueError, match="other editor settings"):
        results.single_in_parts(stage, records + records[:1], 2, lambda r: ran.append(r), {"method": "rome", "x": 2})
    assert not ran  # refused before any part runs


def test_a_part_locked_by_another_process_is_left_to_it_and_free_once_that_process_is_gone(tmp_path):
    import subprocess
    import sys
    import textwrap

    from tools.results import _claim

    part = tmp_path / "00000.json"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(part.with_suffix(".lock"))!r}, os.O_CREAT | os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _claim(part) is None  # another live process holds it
    finally:
        holder.kill()
        holder.wait()
    fd = _claim(part)  # the kernel let go of the dead holder's lock
    assert fd is not None
    assert _claim(part) is None  # and now this process holds it (a second open file cannot take it)


def test_a_process_waiting_on_a_part_stops_cleanly_when_another_finishes_the_stage(tmp_path, monkeypatch):
    """The process holding the last part merges the stage and removes its parts; the one waiting for
    that part then says the stage was finished elsewhere instead of failing on the missing lock file."""
    import os
    import shutil
    import threading

    import pytest

    from tools import results

    monkeypatch.setattr(results, "CACHE", tmp_path)
    stage = results.Stage("single-rome", "rome", "single", "counterfact", 1)
    records = [EditRecord("0", "About x", "x", "Paris", None)]
    results.parts_dir(stage).mkdir(parents=True)
    held = results._claim(results.parts_dir(stage) / "00000.json")  # "the other process" holds the only part

    def other_finishes():
        (tmp_path / "single-rome.json").write_text("{}")
        shutil.rmtree(results.parts_dir(stage))
        os.close(held)

    timer = threading.Timer(0.3, other_finishes)
    timer.start()
    ran = []
    try:
        with pytest.raises(results.FinishedElsewhere):
            results.single_in_parts(stage, records, 1, lambda r: ran.append(r), SETTINGS, wait_s=0.1)
    finally:
        timer.join()
    assert not ran


def test_the_unedited_stages_score_the_single_and_zsre_records_and_render_the_true_object_s_greedy_rate():
    from tools.results import _unedited_section, stages

    unedited = {s.name: s for s in stages(_args()) if s.kind == "unedited"}
    assert unedited["unedited-counterfact"].n == 1919 and unedited["unedited-zsre"].n == 100
    assert unedited["unedited-zsre"].data == "zsre"
    stage = {"stage": {"data": "counterfact"}, "records": 1919,
             "pre": {"truth_success": 0.033, "truth_paraphrase_success": 0.02, "success": 0.006,
                     "paraphrase_success": 0.002}}
    lines = _unedited_section([stage])
    assert "| counterfact | 1919 | 0.033 | 0.020 | 0.006 | 0.002 |" in lines
    assert _unedited_section([]) == []
