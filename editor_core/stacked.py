"""Stacked edits over time: apply facts one after another, score every fact so far at checkpoints.

This is the service's life in one loop: corrections arrive one by one, each computed on the weights
the earlier ones left. At each checkpoint ``n`` the first ``n`` facts are scored with the metrics of
:mod:`editor_core.evaluate` (the point at ``n`` is exactly ``mend eval --sequential n`` on those
records), plus the canary prompts. The curve of efficacy and neighbourhood against ``n`` is the plot
in docs/RESULTS.md.

With ``delta_dir``, each computed delta is saved (safetensors bytes, with its compute time in the
file name's sidecar) and loaded instead of recomputed on a rerun, so a long run that was cut off
resumes where it stopped and gives the same weights bit for bit. With ``settings`` (what decides the
deltas: method, configuration, statistics) the cache also keeps them in ``settings.json`` and refuses to
resume under other ones, so a changed default or a lever tried under a reused name cannot mix deltas of
two settings in one curve.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn
from tqdm import tqdm

from editor_core.data import EditRecord
from editor_core.delta import EditDelta
from editor_core.evaluate import RecordScores, locality_greedy, mean_metrics, record_metrics, score_records
from editor_core.greedy import still_greedy

log = logging.getLogger(__name__)


def stacked_curve(
    model: nn.Module,
    tokenizer,
    stack,
    editor,
    records: list[EditRecord],
    checkpoints: list[int],
    canaries=None,
    delta_dir: str | Path | None = None,
    on_point: Callable[[dict], None] | None = None,
    progress: bool = True,
    pre_cache: str | Path | None = None,
    settings: dict | None = None,
) -> list[dict]:
    """Edit ``records`` one after another; at each checkpoint score the facts edited so far.

    Returns one point per checkpoint: ``{"n", "post": metric means, "post_oldest": the same over the first
    fifth of the facts, "edit_ms": {...}, "canary": {...}}``.
    The stack is restored to the edits it had on entry, also on error.

    ``pre_cache``: a JSON file of the unedited scores (every score a point compares against, and each
    neighbour's greedy answer), read when it was made on the same model for the same records (or more
    of them, in any order) and written otherwise; used only when the stack holds no edits on entry.
    Scoring 1,000 records takes about a quarter of an hour on one CPU thread, and every run on the
    same records needs the same figures.

    ``settings``: JSON describing what decides the deltas (e.g. ``LocateEditor.settings()``), checked
    against the one ``delta_dir`` was made with (ValueError when they differ, or when it holds deltas
    made with none recorded) and recorded there when it is new.
    """
    checkpoints = sorted({c for c in checkpoints if 1 <= c <= len(records)})
    if not checkpoints:
        raise ValueError("no checkpoint within the number of records")
    records = records[: checkpoints[-1]]
    cache = Path(delta_dir) if delta_dir else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        if settings is not None:
            _claim_cache(cache, settings)  # before the unedited scores: a refusal should cost nothing
    pre, loc_greedy = _unedited_scores(model, tokenizer, stack, records,
                                       Path(pre_cache) if pre_cache and not stack.active_ids else None)
    prior = [(i, stack.delta_of(i)) for i in stack.active_ids]
    times: list[float] = []
    from_cache = 0  # deltas read from the cache: their times are the ones recorded when they were computed
    points: list[dict] = []
    bar = tqdm(total=len(records), desc=f"stacked ({editor.method})", unit="edit", disable=not progress)
    try:
        for i, rec in enumerate(records):
            delta, ms, cached = _delta(model, tokenizer, stack, editor, rec, cache, i)
            stack.apply(f"__stacked-{i}", delta)
            times.append(ms)
            from_cache += cached
            bar.update(1)
            n = i + 1
            if n not in checkpoints:
                continue
            post = score_records(model, tokenizer, records[:n])
            rows = []
            for k in range(n):
                row = record_metrics(post[k], pre[k])
                if records[k].locality:
                    kept = still_greedy(model, tokenizer, [lp.prompt for lp in records[k].locality], loc_greedy[k])
                    row["neighbour_kept"] = float(np.mean(kept))
                rows.append(row)
            recent = times[max(0, n - 10):]
            oldest = max(1, n // 5)
            point = {"n": n, "post": mean_metrics(rows),
                     # the first fifth of the facts, edited before four fifths of the others: how much
                     # of what is lost over a long stack is the early facts wearing away
                     "post_oldest": mean_metrics(rows[:oldest]),
                     "pre": mean_metrics([record_metrics(pre[k]) for k in range(n)]),  # unedited, same facts
                     "edit_ms": {"median": float(np.median(times)), "p95": float(np.percentile(times, 95)),
                                 "recent_median": float(np.median(recent))},
                     "from_cache": from_cache}
            if canaries is not None:
                point["canary"] = canaries.check(model).to_dict()
            points.append(point)
            log.info("stacked %d edits (%s): %s", n, editor.method, point["post"])
            if on_point is not None:
                on_point(point)
    finally:
        bar.close()
        stack.rebuild(prior)
    return points


SETTINGS_FILE = "settings.json"


def _claim_cache(cache: Path, settings: dict) -> None:
    """Record ``settings`` in a new delta cache; refuse one made under other settings."""
    settings = json.loads(json.dumps(settings))  # tuples become lists, as they read back
    path = cache / SETTINGS_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != settings:
            changed = sorted(_changed_keys(saved, settings))
            raise ValueError(f"the delta cache {cache} was made with other settings (differing: {changed}); "
                             "name another cache or remove this one")
        return
    if any(cache.glob("*.safetensors")):
        raise ValueError(f"the delta cache {cache} holds deltas made before settings were recorded; "
                         f"write the settings they were made with to {path}, or name another cache")
    path.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")


def _changed_keys(a, b, prefix: str = "") -> list[str]:
    """Dotted names of the entries in which two JSON objects differ."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [prefix or "."]
    out = []
    for key in sorted(set(a) | set(b)):
        out += _changed_keys(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
    return out


def _unedited_scores(model, tokenizer, stack, records: list[EditRecord], path: Path | None
                     ) -> tuple[list[RecordScores], list[list[list[int]]]]:
    """Scores and neighbours' greedy answers of ``records`` on the model as it is, from ``path`` if it
    holds them for this model and these records, else computed (and saved there)."""
    ids = [r.case_id for r in records]
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        where = {case: i for i, case in enumerate(saved["case_ids"])}  # a record's scores do not depend on order
        if saved.get("fingerprint") == stack.fingerprint and all(case in where for case in ids):
            log.info("unedited scores of %d records from %s", len(ids), path)
            at = [where[case] for case in ids]
            return ([RecordScores.from_dict(saved["pre"][i]) for i in at],
                    [saved["locality_greedy"][i] for i in at])
    pre = score_records(model, tokenizer, records)
    loc_greedy = locality_greedy(model, tokenizer, records)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"fingerprint": stack.fingerprint, "case_ids": ids, "pre": [p.to_dict() for p in pre],
               "locality_greedy": loc_greedy}
        path.write_text(json.dumps(doc))
    return pre, loc_greedy


def _delta(model, tokenizer, stack, editor, rec: EditRecord, cache: Path | None, i: int
           ) -> tuple[EditDelta, float, bool]:
    """The i-th edit's delta, its compute time, and whether it came from the cache (where a previous run
    saved it; else it is computed and saved)."""
    blob = cache / f"{i:05d}.safetensors" if cache is not None else None
    if blob is not None and blob.is_file():
        meta = json.loads(blob.with_suffix(".json").read_text())
        return EditDelta.from_bytes(blob.read_bytes(), stack.fingerprint, stack.shapes), float(meta["ms"]), True
    t0 = time.perf_counter()
    delta = editor.compute_delta(model, tokenizer, [rec.to_request()])
    ms = (time.perf_counter() - t0) * 1000.0
    if blob is not None:
        blob.write_bytes(delta.to_bytes())
        blob.with_suffix(".json").write_text(json.dumps({"ms": ms, "case_id": rec.case_id}))
    return delta, ms, False
