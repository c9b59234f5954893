"""tools.failure_modes: the class of a greedy answer against the new and the old target."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import FIXTURES

from editor_core.batching import prompt_ids
from editor_core.data import load_records
from editor_core.greedy import greedy_ids
from tools.failure_modes import classify, classify_records, main


@pytest.mark.parametrize(("answer", "cls"), [
    ([5, 6], "new"),
    ([5, 9], "new_first_token"),
    ([7, 6], "old"),
    ([3, 6], "other"),
])
def test_classify(answer, cls):
    assert classify(answer, new=[5, 6], old=[7, 8]) == cls


def test_records_are_classed_by_what_the_model_answers(tiny_llama, tiny_tokenizer):
    records = load_records(FIXTURES / "facts.json")[:4]
    said = [tiny_tokenizer.decode(a) for a in greedy_ids(tiny_llama, tiny_tokenizer, [r.prompt for r in records],
                                                          [1] * len(records))]
    assert all(prompt_ids(tiny_tokenizer, s) for s in said)
    # the model's own answer as the new target, then as the old one with some other new target
    as_new = [dataclasses.replace(r, target_new=s, ground_truth="zzz") for r, s in zip(records, said, strict=True)]
    as_old = [dataclasses.replace(r, target_new="zzz", ground_truth=s) for r, s in zip(records, said, strict=True)]
    assert {c for c, _ in classify_records(tiny_llama, tiny_tokenizer, as_new)} <= {"new", "new_first_token"}
    assert {c for c, _ in classify_records(tiny_llama, tiny_tokenizer, as_old)} == {"old"}


def test_refuses_a_cache_with_fewer_edits_than_asked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--deltas", str(tmp_path), "--n", "3"])
    assert "holds 0 edits, fewer than --n 3" in capsys.readouterr().err
