"""The state a ``tools.stacked_variant`` run left, rebuilt from its delta cache: what the diagnostic tools
(``tools.failure_modes``, ``tools.key_drift``) read."""

from __future__ import annotations

import argparse
import glob
import logging
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class CachedStack:
    model: torch.nn.Module
    tokenizer: object
    stack: object  # EditStack with the first n cached deltas applied
    deltas: list  # those deltas, in stack order
    records: list  # the first n records of --data, the facts those deltas edited


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--deltas", required=True, help="delta cache of a stacked run (NNNNN.safetensors files)")
    p.add_argument("--n", type=int, required=True, help="how many of its edits to apply")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/counterfact-val.json")
    p.add_argument("--threads", type=int, default=1)


def load(p: argparse.ArgumentParser, args: argparse.Namespace) -> CachedStack:
    """The model with the first ``args.n`` cached deltas applied (a CLI error when the cache has fewer)."""
    from editor_core import models
    from editor_core.data import load_records
    from editor_core.delta import EditDelta
    from editor_core.stack import EditStack
    from editor_core.targets import resolve_targets

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    files = sorted(glob.glob(str(Path(args.deltas) / "*.safetensors")))[: args.n]
    if len(files) < args.n:
        p.error(f"--deltas {args.deltas} holds {len(files)} edits, fewer than --n {args.n}")
    lm = models.load(args.model)
    deltas = [EditDelta.from_bytes(Path(f).read_bytes()) for f in files]
    stack = EditStack(lm.model, resolve_targets(lm.model, sorted(deltas[0].updates)))
    stack.rebuild([(f"e{i}", d) for i, d in enumerate(deltas)])
    return CachedStack(lm.model, lm.tokenizer, stack, deltas, load_records(args.data)[: args.n])
