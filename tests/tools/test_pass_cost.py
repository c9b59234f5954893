"""tools.pass_cost: the timed pass runs the rows it is given, padded to the longest."""

from __future__ import annotations

import pytest

from tools.pass_cost import main, pass_seconds


def test_pass_seconds_pads_the_prefixed_row_and_times_a_backward(tiny_llama, tiny_tokenizer):
    for p in tiny_llama.parameters():
        p.requires_grad_(False)
    prompt = "Paris is the capital of France"
    bare = len(tiny_tokenizer(prompt).input_ids)
    longer = len(tiny_tokenizer("It rained. " + prompt).input_ids)
    assert longer > bare
    seconds, shape = pass_seconds(tiny_llama, tiny_tokenizer, [prompt, "It rained. " + prompt], first=2, reps=2)
    assert shape == (2, longer)  # the bare row is padded to the prefixed one
    assert seconds > 0
    _, alone = pass_seconds(tiny_llama, tiny_tokenizer, [prompt], first=2, reps=1)
    assert alone == (1, bare)


def test_reps_below_one_is_refused():
    with pytest.raises(SystemExit):
        main(["--reps", "0"])
