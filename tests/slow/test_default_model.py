"""The real default model (SmolLM2-135M) with the shipped MEND editor: one edit, then back."""

from __future__ import annotations

import pytest
import torch

from editor_core import models
from editor_core.batching import target_ids
from editor_core.checkpoint import default_editor_dir, stack_targets
from editor_core.editor import MendEditor
from editor_core.greedy import greedy_ids
from editor_core.requests import EditRequest
from editor_core.scoring import score_targets
from editor_core.stack import EditStack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    try:
        lm = models.load(models.DEFAULT_MODEL)
    except models.ModelNotFoundError as err:
        pytest.skip(f"default model not installed: {err}")
    editor_dir = default_editor_dir(models.DEFAULT_MODEL)
    assert editor_dir is not None, "the shipped editor editors/smollm2-135m/ is missing"
    stack = EditStack(lm.model, stack_targets(lm.model, editor_dir))
    return lm, stack, MendEditor.load(editor_dir, stack)


@pytest.mark.parametrize(
    ("prompt", "subject", "new", "true"),
    [
        ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French"),
        ("Apple A5 was created by", "Apple A5", "Google", "Apple"),
    ],
)
def test_shipped_editor_makes_the_new_fact_win_and_reverts_bit_exactly(real, prompt, subject, new, true):
    lm, stack, editor = real
    base_sha = stack.sha256()
    pre_new, pre_true = score_targets(lm.model, lm.tokenizer, [prompt, prompt], [new, true])
    assert pre_new.mean_logprob < pre_true.mean_logprob  # the model believes the true fact first

    delta = editor.compute_delta(lm.model, lm.tokenizer, [EditRequest(prompt, new, subject)])
    assert stack.sha256() == base_sha  # computing an edit writes nothing
    with stack.applied(delta):
        post_new, post_true = score_targets(lm.model, lm.tokenizer, [prompt, prompt], [new, true])
        answer = greedy_ids(lm.model, lm.tokenizer, [prompt], [len(target_ids(lm.tokenizer, new))])[0]
    # efficacy as CounterFact scores it: the new object now beats the old one, by a clear margin
    assert post_new.mean_logprob > post_true.mean_logprob + 0.5
    # and success as /edit reports it: the greedy answer is the new object (the refinement passes' aim)
    assert answer == target_ids(lm.tokenizer, new), lm.tokenizer.decode(answer)
    assert stack.sha256() == base_sha


def test_edit_is_a_small_low_rank_delta(real):
    lm, stack, editor = real
    delta = editor.compute_delta(
        lm.model, lm.tokenizer, [EditRequest("Toyota Camry is produced by", "Chevrolet", "Toyota Camry")]
    )
    # each pass adds one rank-1 update per target (the re-solve keeps the change at the request's one key,
    # the row behind the edit prefix gives gradient only), so the delta grows with its passes, never to dense
    passes = int(delta.meta["passes"])
    assert all(u.rank == passes for u in delta.updates.values()), {n: u.rank for n, u in delta.updates.items()}
    dense_bytes = sum(t.d_in * t.d_out * 4 for t in stack.targets.values())
    assert len(delta.to_bytes()) * 20 < dense_bytes
    assert all(torch.isfinite(u.u).all() and torch.isfinite(u.v).all() for u in delta.updates.values())
