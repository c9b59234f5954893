"""What one pass of the shipped MEND editor does, and what scaling it would do.

For each record, on the unedited default model, the editor's first pass with its shipped inference
settings (re-solved against the statistics, at the subject's last token), per edited target:

- the cosine between the output change it writes at the edit's key, ``R = K dW^T``, and the negative
  gradient of the edit loss there (what MEND's nets are given);
- the inserted change ``|R|^2``, the leak onto ordinary text ``tr(dW C dW^T)`` (``C`` the statistics
  beside the editor) and ``s = k^T C^-1 k``;

and over all targets at once, for the pass scaled by each ``--scales`` factor, and for the normalised
negative gradient given the same size at each target: the mean NLL of the target tokens
(teacher-forced) and the share of records whose every target token is the greedy one.

    python -m tools.mend_pass_probe [--records 40] [--scales 0.25 0.5 1 2]

If scaling one pass makes the edit take, the nets are short of size; if it saturates while further
passes (each on the model as the previous ones leave it) take, they are short of what the later
forward/backward passes see.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import statistics

import torch

log = logging.getLogger("mend_pass_probe")


def main(argv: list[str] | None = None) -> int:
    from editor_core import checkpoint, models
    from editor_core.batching import build_batch, target_labels, target_positions
    from editor_core.data import load_records
    from editor_core.delta import LowRankUpdate
    from editor_core.editor import MendEditor, last_of_each_row, statistics_path
    from editor_core.functional_edit import added_updates
    from editor_core.grads import capture_factors
    from editor_core.logits import logits_at
    from editor_core.preserved_solve import preserved_inverse
    from editor_core.stack import EditStack
    from editor_core.stats import KeyStats, ridged

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/counterfact-val.json")
    p.add_argument("--records", type=int, default=40)
    p.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    shipped = checkpoint.default_editor_dir(args.model)
    lm = models.load(args.model)
    model, tok = lm.model, lm.tokenizer
    # the whole pass (the shipped pass_scale would shrink it): the sweep scales it itself
    editor = MendEditor.load(shipped, EditStack(model, checkpoint.stack_targets(model, shipped)),
                             settings={"pass_scale": 1.0})
    if not editor.preserved:
        p.error("the shipped editor does not re-solve against statistics (preserve_lambda 0)")
    stats = KeyStats.load(statistics_path(shipped))
    inverses = {n: kept.inverse([]) for n, kept in editor.preserved.items()}
    ridge = inspect.signature(preserved_inverse).parameters["ridge"].default  # the ridge the editor's solve uses

    @torch.no_grad()
    def scored(batch, updates: dict[str, LowRankUpdate]) -> tuple[float, bool]:
        with added_updates(model, updates):
            logits = logits_at(model, batch.input_ids, batch.attention_mask, target_positions(batch)).float()
        labels = target_labels(batch)  # (N,)
        nll = -torch.log_softmax(logits, -1).gather(-1, labels[:, None]).mean()
        return float(nll), bool((logits.argmax(-1) == labels).all())

    per_target: dict[str, list[tuple[float, float, float, float]]] = {}
    sweep: dict[tuple[str, float], list[tuple[float, bool]]] = {}
    unedited = []
    for rec in load_records(args.data)[: args.records]:
        batch = build_batch(tok, [rec.prompt], [rec.target_new], editor.config.max_len,
                            subjects=[rec.subject]).to(next(model.parameters()).device)
        factors = capture_factors(model, editor.targets, batch)
        one_request = torch.zeros(batch.input_ids.shape[0], dtype=torch.long, device=batch.input_ids.device)  # (B,)
        updates, keys, _ = editor._pass(model, batch, {t.name: [] for t in editor.targets}, inverses, one_request)
        last = last_of_each_row(factors.row)
        along_gradient = {}
        for name, upd in updates.items():
            k = keys[name].double()  # (1, d_in)
            gain = float((k @ upd.v.double().t()).squeeze())  # how much of u the key gets
            r = gain * upd.u.double()  # (1, d_out)
            grad = factors.delta[name][last].double()  # (1, d_out)
            layer = int(name.split(".")[2])
            moment = ridged(stats.moments[layer].double(), ridge)
            dw = upd.u.double().t() @ upd.v.double()
            per_target.setdefault(name, []).append((
                float(torch.nn.functional.cosine_similarity(r, -grad)), float(r.norm() ** 2),
                float(torch.trace(dw @ moment @ dw.t())), float(k[0] @ torch.linalg.solve(moment, k[0]))))
            step = -grad / grad.norm() * r.norm() / gain  # same size at the key as the pass's change
            along_gradient[name] = LowRankUpdate(step.float(), upd.v)
        unedited.append(scored(batch, {}))
        for kind, ups in (("pass", updates), ("gradient", along_gradient)):
            for a in args.scales:
                sweep.setdefault((kind, a), []).append(
                    scored(batch, {n: LowRankUpdate(a * u.u, u.v) for n, u in ups.items()}))
    n = len(unedited)
    log.info("%d records; unedited: target NLL %.2f, taken %.2f", n, statistics.mean(x for x, _ in unedited),
             sum(t for _, t in unedited) / n)
    for name, rows in per_target.items():
        log.info("%s: cos(R, -gradient) %.3f, |R|^2 %.0f, leak %.3f, s %.0f (medians)", name,
                 *(statistics.median(r[i] for r in rows) for i in range(4)))
    for (kind, a), rows in sweep.items():
        log.info("%s x %g: target NLL %.2f, taken %.2f", kind, a, statistics.mean(x for x, _ in rows),
                 sum(t for _, t in rows) / n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
