"""Why an edit's rephrasings miss: does the edit reach them (key side), and what do they then say (readout)?

For CounterFact records whose subject occurs in both the prompt and the rephrasing, with a MEND editor that
re-solves at the subject's key (the shipped one, or ``--editor``):

- ``reach``, per edited layer, before any edit: the re-solve changes the layer's output at a key ``k'`` by
  about ``t = k'^T (lam C)^-1 k / k^T (lam C)^-1 k`` of the change it makes at the edit's own key ``k``
  (the subject's last token averaged over the editor's ``key_prefixes``, as the editor solves at). Printed:
  the median ``t`` at the rephrasing's subject key, and the median over records of the largest ``|t|`` at any
  position of the neighbour prompt. ``t`` near 1 at the rephrasing and near 0 at the neighbour means the
  edit fires where it should, and a rephrasing that misses is missed downstream of the edited layers;
- ``answers``: each edit is made alone and the rephrasing greedily continued for the target's length plus
  four tokens. Each rephrasing is one of ``success`` (exactly the target first), ``later`` (the target
  further on in that continuation), ``top5`` (the target's first token among the five most likely) or
  ``other``; and ``answerable`` when the *unedited* model ranks the true object's first token within the
  top ``--answerable-rank`` there: the rephrasing asks for an object of that kind next.

    python -m tools.rephrase_reach --records 150 [--editor editors/candidates/s31-seq8] [--out rows.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import statistics
from pathlib import Path

import torch

log = logging.getLogger("rephrase_reach")
CLASSES = ("success", "later", "top5", "other")


def reach(keys: torch.Tensor, others: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(n,) the share of the change at each ``keys`` row (n, d) that the re-solve leaves at the same row of
    ``others`` (n, d), with ``inverse`` (d, d) = ``(lam C)^-1``: ``k'^T A k / k^T A k`` (rank one, the ridge's
    ``s / (1 + s)`` left out as it is the same factor at both)."""
    ak = keys.double() @ inverse.double()  # (n, d)
    return (ak * others.double()).sum(1) / (ak * keys.double()).sum(1)


def answer_class(continuation: str, target: str, first_token_rank: int) -> str:
    """One of :data:`CLASSES` for an edited model's greedy ``continuation`` of a rephrasing."""
    said, want = continuation.strip(), target.strip()
    if said.startswith(want):
        return "success"
    if want in said:
        return "later"
    return "top5" if first_token_rank < 5 else "other"


def _first_token_rank(model, tokenizer, prompt: str, answer: str) -> int:
    """How many tokens the model ranks above ``answer``'s first token after ``prompt``."""
    from editor_core.batching import prompt_ids, target_ids
    from editor_core.logits import logits_at

    ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=next(model.parameters()).device)  # (1, T)
    mask = torch.ones_like(ids)
    select = torch.zeros_like(mask, dtype=torch.bool)
    select[0, -1] = True
    with torch.no_grad():
        logits = logits_at(model, ids, mask, select)[0]  # (V,)
    return int((logits > logits[target_ids(tokenizer, answer)[0]]).sum())


def main(argv: list[str] | None = None) -> int:
    from editor_core import checkpoint, models
    from editor_core.batching import target_ids
    from editor_core.data import load_records
    from editor_core.editor import MendEditor
    from editor_core.greedy import greedy_ids
    from editor_core.methods.values import subject_keys
    from editor_core.requests import EditRequest
    from editor_core.stack import EditStack
    from tools.key_coverage import position_keys

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--editor", type=Path, default=None, help="an editor directory (default: the shipped one)")
    p.add_argument("--data", default="../shared/data/counterfact-val.json")
    p.add_argument("--records", type=int, default=150, help="the first this many records")
    p.add_argument("--answerable-rank", type=int, default=10)
    p.add_argument("--no-edits", action="store_true", help="the reach only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write one row per record here (JSON)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    lm = models.load(args.model)
    model, tok = lm.model, lm.tokenizer
    editor_dir = args.editor or checkpoint.default_editor_dir(args.model)
    stack = EditStack(model, checkpoint.stack_targets(model, editor_dir))
    editor = MendEditor.load(editor_dir, stack)
    targets = [t for t in editor.targets if t.name in editor.preserved]
    if not targets:
        p.error(f"the editor at {editor_dir} does not re-solve against key statistics (preserve_lambda 0)")
    names = [t.name for t in targets]
    records = [r for r in load_records(args.data, limit=args.records, skip_empty=True)
               if r.subject and r.subject in r.prompt and r.rephrases and r.subject in r.rephrases[0]]
    log.info("%d of the first %d records name their subject in the prompt and the rephrasing", len(records),
             args.records)

    # the key side: the edit's averaged key against the rephrasing's and the neighbour's, before any edit
    wordings = ("", *editor.config.key_prefixes)
    own = subject_keys(model, tok, [(r.prompt, r.subject) for r in records], targets, wordings)
    para = subject_keys(model, tok, [(r.rephrases[0], r.subject) for r in records], targets, ("",))
    blocks = {t.block: t.name for t in targets}  # the edited layers are one output projection per block
    neighbour = [{blocks[b]: k for b, k in position_keys(model, tok, [r.locality[0].prompt], blocks).items()}
                 for r in records]
    print("layer  reach at the rephrasing's subject key (median)  largest reach in the neighbour prompt (median)")
    for name in names:
        k = own[name].view(len(records), len(wordings), -1).mean(1)  # (n, d_in)
        inverse = editor.preserved[name].base  # (d_in, d_in) (lam C)^-1
        to_para = reach(k, para[name], inverse)  # (n,)
        to_nbr = [float(reach(k[i:i + 1].expand(len(nb[name]), -1), nb[name], inverse).abs().max())
                  for i, nb in enumerate(neighbour)]
        print(f"{name:32s} {statistics.median(to_para.tolist()):.3f}  {statistics.median(to_nbr):.3f}")
    if args.no_edits:
        return 0

    rows = []
    for r in records:
        phrase = r.rephrases[0]
        truth_rank = _first_token_rank(model, tok, phrase, r.ground_truth)
        delta = editor.compute_delta(model, tok, [EditRequest(prompt=r.prompt, target=r.target_new,
                                                              subject=r.subject)])
        with stack.applied(delta):
            said = tok.decode(greedy_ids(model, tok, [phrase], [len(target_ids(tok, r.target_new)) + 4])[0])
            rank = _first_token_rank(model, tok, phrase, r.target_new)
        rows.append({"case_id": r.case_id, "rephrasing": phrase, "target": r.target_new, "truth": r.ground_truth,
                     "said": said, "target_rank": rank, "truth_rank_unedited": truth_rank,
                     "answerable": truth_rank < args.answerable_rank, "class": answer_class(said, r.target_new, rank)})
    for label, keep in (("all", lambda row: True), ("answerable", lambda row: row["answerable"]),
                        ("not answerable", lambda row: not row["answerable"])):
        part = [row for row in rows if keep(row)]
        counts = collections.Counter(row["class"] for row in part)
        shares = "  ".join(f"{c} {counts[c] / max(len(part), 1):.3f}" for c in CLASSES)
        print(f"{label:15s} n {len(part):4d}  {shares}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
