"""How a fact's edit wears away in a long stack: its keys move, and later edits fire on the moved keys.

Rebuilds the state of a ``tools.stacked_variant`` run from its delta cache (the first ``--n`` edits) and,
for the oldest and the newest ``--facts`` facts, recomputes each fact's key at every edited layer on that
state and compares it with the key journaled when the fact was edited:

- ``key moved``: median ``||k_now - k_then|| / ||k_then||``;
- ``own``: median share of its own update's strength the fact still gets (``v . k_now / v . k_then``);
- ``later``: median ``||sum over later edits of u_j (v_j . k_now)|| / ||u_i (v_i . k_now)||``, what the
  edits made after the fact add at its key, against its own update's output (the earlier edits were
  already there when its value was solved for, so they are not a loss).

    python -m tools.key_drift --deltas runs/variants/memit-keep1-ngd.deltas --n 1000
"""

from __future__ import annotations

import argparse
import logging

import torch

log = logging.getLogger("key_drift")


def later_firing(k_now: torch.Tensor, us: torch.Tensor, vs: torch.Tensor, first: int) -> torch.Tensor:
    """(n,) ``||sum_{j > first + i} u_j (v_j . k_i)|| / ||u_i (v_i . k_i)||`` for facts ``first .. first+n-1``.

    ``k_now`` (n, d_in) the facts' keys now, ``us`` (N, d_out) and ``vs`` (N, d_in) every edit's factors
    (one fact an edit, in stack order).
    """
    out = torch.empty(k_now.shape[0])
    for row, i in enumerate(range(first, first + k_now.shape[0])):
        k = k_now[row]  # (d_in,)
        own = (vs[i] @ k) * us[i]  # (d_out,)
        later = (vs[i + 1:] @ k) @ us[i + 1:]  # (d_out,)
        out[row] = later.norm() / own.norm().clamp(min=1e-12)
    return out


def main(argv: list[str] | None = None) -> int:
    from editor_core.methods.values import DEFAULT_PREFIXES, keys_and_states
    from tools import cached_stack

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cached_stack.add_arguments(p)
    p.add_argument("--facts", type=int, default=100, help="how many of the oldest and of the newest facts")
    args = p.parse_args(argv)
    if args.n < args.facts:
        p.error(f"--n {args.n} must be at least --facts {args.facts}")
    state = cached_stack.load(p, args)
    model, tok, stack, deltas, records = state.model, state.tokenizer, state.stack, state.deltas, state.records
    if any(int(d.meta.get("n_requests", "1")) != 1 for d in deltas):
        p.error("every edit of the cache must hold one fact")
    last = max(t.block for t in stack.targets.values())
    for first in (0, args.n - args.facts):
        reqs = [r.to_request() for r in records[first:first + args.facts]]
        for name, target in stack.targets.items():
            k_now, _ = keys_and_states(model, tok, reqs, target, last, DEFAULT_PREFIXES)  # (facts, d_in)
            # the mean key of each fact as journaled (a spread delta holds one scaled key per prefix)
            k_then = torch.stack([deltas[i].keys[name].float().sum(0) / deltas[i].keys[name].shape[0] ** 0.5
                                  if deltas[i].keys[name].shape[0] > 1 else deltas[i].keys[name][0].float()
                                  for i in range(first, first + args.facts)])
            us = torch.cat([d.updates[name].u.float() for d in deltas])  # (N, d_out)
            vs = torch.cat([d.updates[name].v.float() for d in deltas])  # (N, d_in)
            v_own = vs[first:first + args.facts]
            moved = ((k_now - k_then).norm(dim=-1) / k_then.norm(dim=-1)).median()
            own = ((v_own * k_now).sum(-1) / (v_own * k_then).sum(-1)).median()
            later = later_firing(k_now, us, vs, first).median()
            log.info("facts %d-%d, %s: key moved %.3f, own update at %.3f of its strength, later edits fire "
                     "at %.3f of it", first, first + args.facts - 1, name, moved, own, later)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
