"""What one MEND pass costs for the rows it runs: the tail forward and backward from block ``--first``.

A MEND pass runs the blocks above the first edited one forward and back on its rows. With
``edit_prefixes`` each fact runs two rows, its bare prompt and the prompt behind the prefix, padded to
the longer one. This times that pass shape beside the bare row alone and beside two bare-length rows
(what a prefixed row would cost if the prefix's states were cached and only the prompt's tokens ran),
so the gain of such a cache can be judged before it is built. The rows are built as an edit builds
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
from editor_core.models import load
from editor_core.tail import prefix_states, tail_logits

log = logging.getLogger("pass_cost")


def pass_seconds(model, tokenizer, prompts: list[str], target: str, subject: str, first: int, reps: int
                 ) -> tuple[float, tuple[int, int]]:
    """Median seconds of a tail forward+backward on ``prompt + " " + target`` rows built as an edit builds
    them (:func:`build_batch` with the subject, one column shorter, the loss at the target positions), and
    the rows' shape (B, T)."""
    batch = build_batch(tokenizer, prompts, [target] * len(prompts), subjects=[subject] * len(prompts))
    batch = without_last_input(batch) or batch
    states = prefix_states(model, batch.input_ids, batch.attention_mask, first)  # (B, T, d)
    select = target_positions(batch)  # (B, T)
    times = []
    for _ in range(reps):
        s = states.clone().requires_grad_(True)
        start = time.perf_counter()
        logits = tail_logits(model, first, s, batch.attention_mask, select)  # (N, V)
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
    shapes = [("bare prompt", [args.prompt]),
              ("two bare-length rows (a cached prefix)", [args.prompt, args.prompt]),
              ("bare + behind the prefix, padded", [args.prompt, args.prefix + args.prompt])]
    base = None
    for name, texts in shapes:
        seconds, shape = pass_seconds(model, tokenizer, texts, args.target, args.subject, args.first, args.reps)
        base = base or seconds
        log.info("%-40s rows x tokens %-8s %7.1f ms  %.2fx the bare prompt", name, f"{shape[0]}x{shape[1]}",
                 seconds * 1000, seconds / base)


if __name__ == "__main__":
    main()
