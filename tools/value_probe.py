"""How far does one gradient step get? The question behind a one-pass (MEND-style) value editor.

For each CounterFact record, on the default model at the locate-then-edit value layer:

- the value the optimisation finds (``optimise_values``, the shipped settings): Adam steps it took,
  its size ``|delta| / |h|`` and its cosine with the negative gradient at zero;
- whether one step along the normalised negative gradient, of a few sizes (share of ``|h|``), already
  makes every target token top-1 behind every prefix (the optimisation's own stop test).

    python -m tools.value_probe [--records 20] [--data ../shared/data/counterfact-train.json]

If the optimum lies far from the gradient direction, a hypernetwork that maps the gradient to the
value in one pass has to learn that correction from data; this probe measures the gap it must close.
"""

from __future__ import annotations

import argparse
import logging
import statistics

import torch

log = logging.getLogger("value_probe")
SIZES = (0.25, 0.5, 0.75)


def main(argv: list[str] | None = None) -> int:
    from editor_core import checkpoint, models
    from editor_core.data import load_records
    from editor_core.methods.locate import LocateConfig
    from editor_core.methods.values import ValueProblem, frozen, optimise_values

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/counterfact-train.json")
    p.add_argument("--records", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    lm = models.load(args.model)
    cfg = LocateConfig.load(checkpoint.default_editor_dir(args.model) or ".")
    layer = cfg.alphaedit_layers[-1]
    steps, sizes, cosines, hits = [], [], [], {s: 0 for s in SIZES}
    for r in load_records(args.data, limit=args.records):
        req = [r.to_request()]
        problem = ValueProblem(lm.model, lm.tokenizer, req, layer, cfg.value)
        grad = problem.gradient_at_zero()  # (1, d)
        unit = grad / grad.norm(dim=-1, keepdim=True)
        with torch.no_grad(), frozen(lm.model):
            for s in SIZES:
                hits[s] += int(problem.evaluate(problem.clamp(-s * problem.h_norm * unit)).hit.all())
        found = optimise_values(lm.model, lm.tokenizer, req, layer, cfg.value)
        delta = found.z - found.h  # (1, d)
        steps.append(found.steps)
        sizes.append(float(delta.norm() / problem.h_norm))
        cosines.append(float(torch.nn.functional.cosine_similarity(delta, -grad)))
    n = len(steps)
    log.info("value layer %d, %d records: optimisation steps median %d (max %d), |delta|/|h| median %.2f "
             "(bound %.2f), cos(delta, -grad) median %.2f (min %.2f, max %.2f)", layer, n,
             statistics.median(steps), max(steps), statistics.median(sizes), cfg.value.clamp_norm,
             statistics.median(cosines), min(cosines), max(cosines))
    log.info("one normalised gradient step hits: %s",
             ", ".join(f"size {s}: {hits[s]}/{n}" for s in SIZES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
