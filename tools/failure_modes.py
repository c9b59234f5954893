"""What a stacked run's facts answer once they no longer give their target: the old answer, or something else.

Rebuilds the state of a ``tools.stacked_variant`` run from its delta cache (the first ``--n`` edits) and
greedily continues each edited prompt for the target's length. Each fact falls in one class:

- ``new``: exactly the target (what ``success`` counts);
- ``new_first_token``: the target's first token, then something else;
- ``old``: the first token of the true answer the edit replaced (the edit has worn away);
- ``other``: neither, e.g. a function word the prompt also allows (the edit was drowned, not undone).

Counts are printed per fifth of the stack (oldest first) with the most common first tokens of ``other``:

    python -m tools.failure_modes --deltas runs/variants/memit-keep1-ngd.deltas --n 1000
"""

from __future__ import annotations

import argparse
import collections
import logging

log = logging.getLogger("failure_modes")
CLASSES = ("new", "new_first_token", "old", "other")


def classify(answer: list[int], new: list[int], old: list[int]) -> str:
    """The class of one greedy ``answer`` against the new and the old target's token ids."""
    if answer == new:
        return "new"
    if answer[:1] == new[:1]:
        return "new_first_token"
    if answer[:1] == old[:1]:
        return "old"
    return "other"


def classify_records(model, tokenizer, records) -> list[tuple[str, list[int]]]:
    """Per record: its class on the model as it is now, and the greedy answer (target's length)."""
    from editor_core.batching import target_ids
    from editor_core.greedy import greedy_ids

    new = [target_ids(tokenizer, r.target_new) for r in records]
    old = [target_ids(tokenizer, r.ground_truth) for r in records]
    answers = greedy_ids(model, tokenizer, [r.prompt for r in records], [len(t) for t in new])
    return [(classify(list(a), nw, od), list(a)) for a, nw, od in zip(answers, new, old, strict=True)]


def main(argv: list[str] | None = None) -> int:
    from tools import cached_stack

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cached_stack.add_arguments(p)
    args = p.parse_args(argv)
    state = cached_stack.load(p, args)
    model, tok, records = state.model, state.tokenizer, state.records

    fifth = max(1, args.n // 5)
    by_fifth = [collections.Counter() for _ in range(5)]
    other_first: collections.Counter = collections.Counter()
    for i, (c, a) in enumerate(classify_records(model, tok, records)):
        by_fifth[min(i // fifth, 4)][c] += 1
        if c == "other":
            other_first[tok.decode(a[:1])] += 1
    total = sum(by_fifth, collections.Counter())
    log.info("%d stacked edits from %s", args.n, args.deltas)
    log.info("all: %s", {c: total[c] for c in CLASSES})
    for f, counts in enumerate(by_fifth):
        log.info("edits %d-%d: %s", f * fifth, min((f + 1) * fifth, args.n) - 1, {c: counts[c] for c in CLASSES})
    log.info("most common first tokens of 'other': %s", other_first.most_common(8))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
