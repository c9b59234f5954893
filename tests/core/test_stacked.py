"""stacked_curve on a tiny model: checkpoints score the facts edited so far, the oldest fifth apart, and
the stack is left with the edits it had on entry."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES
from test_evaluate import FixedEditor

from editor_core.data import load_records
from editor_core.evaluate import mean_metrics, record_metrics, score_records
from editor_core.stack import EditStack
from editor_core.stacked import stacked_curve
from editor_core.targets import resolve_targets


@pytest.fixture
def records():
    return load_records(FIXTURES / "facts.json")


def test_points_score_the_facts_so_far_and_their_oldest_fifth(tiny_llama, tiny_tokenizer, records):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama, ["model.layers.1.mlp.down_proj"]))
    editor = FixedEditor(stack)  # zero deltas: every score stays the unedited one, so each mean is known
    n = 10
    assert len(records) >= n
    pre = [record_metrics(s) for s in score_records(tiny_llama, tiny_tokenizer, records[:n])]
    points = stacked_curve(tiny_llama, tiny_tokenizer, stack, editor, records[:n], [5, n], progress=False)

    assert [p["n"] for p in points] == [5, n]
    for p in points:
        for key in ("efficacy", "paraphrase", "neighborhood"):
            assert p["post"][key] == pytest.approx(mean_metrics(pre[: p["n"]])[key])
            assert p["post_oldest"][key] == pytest.approx(mean_metrics(pre[: p["n"] // 5])[key])
    assert len(editor.calls) == n
    assert stack.active_ids == []  # the stacked edits are taken off again


def test_checkpoints_beyond_the_records_are_refused(tiny_llama, tiny_tokenizer, records):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama, ["model.layers.1.mlp.down_proj"]))
    with pytest.raises(ValueError, match="no checkpoint"):
        stacked_curve(tiny_llama, tiny_tokenizer, stack, FixedEditor(stack), records[:3], [10], progress=False)


def test_unedited_scores_are_cached_for_the_same_model_and_records_in_any_order(
        tiny_llama, tiny_tokenizer, records, tmp_path, monkeypatch):
    import editor_core.stacked as stacked

    stack = EditStack(tiny_llama, resolve_targets(tiny_llama, ["model.layers.1.mlp.down_proj"]))
    cache = tmp_path / "pre.json"
    first = stacked_curve(tiny_llama, tiny_tokenizer, stack, FixedEditor(stack), records[:6], [3, 6],
                          progress=False, pre_cache=cache)
    assert cache.is_file()

    def refuse(*_a, **_k):  # locality_greedy serves only the unedited scores
        raise AssertionError("scored again although the cache holds these records")

    calls = []
    score = stacked.score_records
    monkeypatch.setattr(stacked, "score_records", lambda *a, **k: calls.append(len(a[2])) or score(*a, **k))
    monkeypatch.setattr(stacked, "locality_greedy", refuse)
    # fewer records, same order: read from the cache, same points; scored once, at the checkpoint
    again = stacked_curve(tiny_llama, tiny_tokenizer, stack, FixedEditor(stack), records[:3], [3],
                          progress=False, pre_cache=cache)
    assert again[0]["pre"] == first[0]["pre"]
    assert calls == [3]
    # the same records in another order (a shuffled stack): read from the cache, each record's own scores
    calls.clear()
    shuffled = stacked_curve(tiny_llama, tiny_tokenizer, stack, FixedEditor(stack), records[5::-1], [6],
                             progress=False, pre_cache=cache)
    assert shuffled[0]["pre"] == first[1]["pre"]  # the mean over the same six records
    assert calls == [6]
    saved = json.loads(cache.read_text())
    pre, greedy = stacked._unedited_scores(tiny_llama, tiny_tokenizer, stack, records[5::-1], cache)
    assert json.loads(json.dumps([p.to_dict() for p in pre])) == saved["pre"][5::-1]  # each record its own scores
    assert greedy == saved["locality_greedy"][5::-1]
    # a record the cache does not hold: scored
    with pytest.raises(AssertionError, match="scored again"):
        stacked_curve(tiny_llama, tiny_tokenizer, stack, FixedEditor(stack), records[4:8], [3],
                      progress=False, pre_cache=cache)


def test_a_delta_cache_is_reused_only_under_the_settings_it_was_made_with(tiny_llama, tiny_tokenizer, records,
                                                                          tmp_path):
    stack = EditStack(tiny_llama, resolve_targets(tiny_llama, ["model.layers.1.mlp.down_proj"]))
    cache = tmp_path / "deltas"
    settings = {"method": "fixed", "config": {"steps": 40, "prefixes": ("", "I read that ")}}
    editor = FixedEditor(stack)
    first = stacked_curve(tiny_llama, tiny_tokenizer, stack, editor, records[:4], [4], delta_dir=cache,
                          progress=False, settings=settings)
    assert len(editor.calls) == 4 and (cache / "settings.json").is_file() and first[0]["from_cache"] == 0

    # the same settings (tuples read back as lists): every delta comes from the cache
    again = FixedEditor(stack)
    points = stacked_curve(tiny_llama, tiny_tokenizer, stack, again, records[:4], [4], delta_dir=cache,
                           progress=False,
                           settings={"method": "fixed", "config": {"steps": 40, "prefixes": ["", "I read that "]}})
    assert again.calls == [] and points[0]["from_cache"] == 4

    # other settings: refused, naming what differs, with the cache left as it was
    before = sorted(p.name for p in cache.iterdir())
    with pytest.raises(ValueError, match=r"other settings \(differing: \['config.steps'\]\)"):
        stacked_curve(tiny_llama, tiny_tokenizer, stack, FixedEditor(stack), records[:4], [4], delta_dir=cache,
                      progress=False, settings={**settings, "config": {**settings["config"], "steps": 10}})
    assert sorted(p.name for p in cache.iterdir()) == before
    assert stack.active_ids == []

    # deltas of unknown settings (a cache made without them) are not adopted under some
    (cache / "settings.json").unlink()
    with pytest.raises(ValueError, match="before settings were recorded"):
        stacked_curve(tiny_llama, tiny_tokenizer, stack, FixedEditor(stack), records[:4], [4], delta_dir=cache,
                      progress=False, settings=settings)
