"""tools.pass_cost: the timed pass runs the rows it is given, padded to the longest."""

from __future__ import annotations

import pytest

from editor_core.batching import target_ids as target_ids_of
from tools.pass_cost import main, pass_seconds


def test_pass_seconds_pads_the_prefixed_row_and_times_a_backward(tiny_llama, tiny_tokenizer):
    for p in tiny_llama.parameters():
        p.requires_grad_(False)
    prompt, target = "Paris is the capital of", "France"
    target_ids = target_ids_of(tiny_tokenizer, target)
    # an edit's row: prompt + " " + target, less its last input column (it predicts nothing read)
    bare = len(tiny_tokenizer(prompt).input_ids) + len(target_ids) - 1
    longer = len(tiny_tokenizer("It rained. " + prompt).input_ids) + len(target_ids) - 1
    assert longer > bare
    seconds, shape = pass_seconds(tiny_llama, tiny_tokenizer, [prompt, "It rained. " + prompt], target, "Paris",
                                  first=2, reps=2)
    assert shape == (2, longer)  # the bare row is padded to the prefixed one
    assert seconds > 0
    _, alone = pass_seconds(tiny_llama, tiny_tokenizer, [prompt], target, "Paris", first=2, reps=1)
    assert alone == (1, bare)
    # the prefix cached, the prefixed row runs its own tokens only (and the space this tokenizer splits off)
    _, cached = pass_seconds(tiny_llama, tiny_tokenizer, [prompt, "It rained. " + prompt], target, "Paris",
                             first=2, reps=1, wordings=["", "It rained. "])
    assert cached[0] == 2 and bare <= cached[1] <= bare + 1 < longer


def test_reps_below_one_is_refused():
    with pytest.raises(SystemExit):
        main(["--reps", "0"])
