"""What one MEND pass costs for the rows it runs: the tail forward and backward from block ``--first``.

A MEND pass runs the blocks above the first edited one forward and back on its rows. With
``edit_prefixes`` each fact runs two rows, its bare prompt and the prompt behind the prefix, padded to
the longer one, or (``edit_prefix_cache``, shipped) with the prefix's keys and values cached and only
each row's own tokens run. This times those pass shapes beside the bare row alone and beside two
bare-length rows (the least a cached prefix could cost). The rows are built as an edit builds
them and the loss reads the target positions; the weights get no gradient, as in an edit's pass.

    python -m tools.pass_cost [--prompt TEXT] [--target TEXT] [--subject TEXT] [--prefix TEXT] [--first 4] [--reps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from editor_core.batching import build_batch, target_positions, without_last_input
from editor_core.editor import prefix_cuts
from editor_core.models import load
from editor_core.tail import SplitTail, prefix_states, tail_logits

log = logging.getLogger("pass_cost")


def pass_seconds(model, tokenizer, prompts: list[str], target: str, subject: str, first: int, reps: int,
                 wordings: list[str] | None = None) -> tuple[float, tuple[int, int]]:
    """Median seconds of a tail forward+backward on ``prompt + " " + target`` rows built as an edit builds
    them (:func:`build_batch` with the subject, one column shorter, the loss at the target positions), and
    the rows' shape (B, T). With ``wordings`` (the prefix each row's prompt opens with, "" for none), the
    prefixes' keys and values are cached once first and the pass runs each row from its own text on, as an
    edit with ``edit_prefix_cache`` does (its shape is then the short rows')."""
    batch = build_batch(tokenizer, prompts, [target] * len(prompts), subjects=[subject] * len(prompts))
    batch = without_last_input(batch) or batch
    states = prefix_states(model, batch.input_ids, batch.attention_mask, first)  # (B, T, d)
    select = target_positions(batch)  # (B, T)
    mask = batch.attention_mask
    split = None
    if wordings is not None:
        split = SplitTail(model, first, states, mask, prefix_cuts(tokenizer, batch, wordings))
        batch, states, select = split.short_batch(batch), split.short(states), split.short_select(select)
    times = []
    for _ in range(reps):
        s = states.clone().requires_grad_(True)
        start = time.perf_counter()
        logits = tail_logits(model, first, s, mask, select) if split is None else split.logits(s, select)  # (N, V)
        logits.logsumexp(-1).sum().backward()
        times.append(time.perf_counter() - start)
    warm = times[min(5, reps - 1):]  # the first calls pay for allocation
    return statistics.median(warm), tuple(batch.input_ids.shape)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt", default="The mother tongue of Danielle Darrieux is")
    parser.add_argument("--target", default="English")
    parser.add_argument("--subject", default="Danielle Darrieux")
    parser.add_argument("--prefix", default="She closed the book and looked outside. ")
    parser.add_argument("--first", type=int, default=4, help="the first edited block")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    lm = load(args.model)
    model, tokenizer = lm.model, lm.tokenizer
    for p in model.parameters():
        p.requires_grad_(False)
    both = [args.prompt, args.prefix + args.prompt]
    shapes = [("bare prompt", [args.prompt], None),
              ("two bare-length rows", [args.prompt, args.prompt], None),
              ("bare + behind the prefix, prefix cached", both, ["", args.prefix]),
              ("bare + behind the prefix, padded", both, None)]
    base = None
    for name, texts, wordings in shapes:
        seconds, shape = pass_seconds(model, tokenizer, texts, args.target, args.subject, args.first, args.reps,
                                      wordings)
        base = base or seconds
        log.info("%-40s rows x tokens %-8s %7.1f ms  %.2fx the bare prompt", name, f"{shape[0]}x{shape[1]}",
                 seconds * 1000, seconds / base)


if __name__ == "__main__":
    main()
