"""Regenerate docs/RESULTS.md: unedited, FT, MEND, ROME, MEMIT and AlphaEdit on CounterFact and zsRE.

    python -m tools.results [--stages single-rome,stacked-alphaedit,...] [--single 300] [--threads 1]
    python -m tools.results --render          # only rewrite the markdown from the finished stages

A full run takes many hours on 2 CPU cores, so it is split into named stages, each cached as JSON
under ``runs/results/`` once finished (a stacked run also caches every delta it computed, so a cut-off
run resumes where it stopped). Every invocation runs the stages it is asked for that are not cached
yet, then rewrites the markdown from every cached stage; stages not run are listed as such. Two
processes with one torch thread each can run different stages side by side. A single-edit stage runs
and caches ``--part-size`` records at a time (``runs/results/<stage>.parts/``): cut off, it resumes at
its first unfinished part, two processes given the same stage share its parts, and the report shows
the records done so far.

A stacked stage of ROME, MEMIT or AlphaEdit edits a stack of the method's own layers, as
``tools.stacked_variant`` does, and its delta cache records the editor's settings: the cache of a variant
run with the shipped settings can be copied to ``runs/results/<stage>.deltas`` and is re-scored, not
recomputed (a cache made with other settings is refused). ``--restore docs/results.json`` puts the stages
a committed report holds back into the cache, so a machine without ``runs/results`` reruns only what
changed; each stage's line in the report says when it ran and with which settings.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from service.settings import Settings

log = logging.getLogger("results")

METHODS = ("ft", "mend", "rome", "memit", "alphaedit")
LOCATE = ("rome", "memit", "alphaedit")
# the service's shipped default (MEND_DEFAULT_METHOD unset). It runs 1,000 stacked edits, and so do MEND
# (issue 11 measures it there, and it holds second best at 1,000) and AlphaEdit (the method published for
# long sequences); each of the three, deduplicated, with the default first
DEFAULT_METHOD = Settings.model_fields["default_method"].default
LONG = tuple(dict.fromkeys((DEFAULT_METHOD, "mend", "alphaedit")))
CACHE = Path("runs/results")
COLUMNS = ("efficacy", "paraphrase", "neighborhood", "efficacy_acc", "paraphrase_acc", "locality_acc", "success",
           "paraphrase_success", "neighbour_kept")
CHECKPOINTS = (1, 3, 10, 30, 100, 300, 1000)


@dataclass(frozen=True)
class Stage:
    name: str
    method: str
    kind: str  # single | batch | stacked | latency | unedited
    data: str  # counterfact | zsre
    n: int


def stages(args) -> list[Stage]:
    """Every stage of a full run, in the order they are run."""
    out = [Stage(f"single-{DEFAULT_METHOD}", DEFAULT_METHOD, "single", "counterfact", args.single_default)]
    out += [Stage(f"single-{m}", m, "single", "counterfact", args.single) for m in METHODS if m != DEFAULT_METHOD]
    # the sequential-100 figures of a method with a 1,000-edit run are that run's 100-edit point
    out += [Stage(f"stacked-{m}", m, "stacked", "counterfact", args.stacked) for m in METHODS if m not in LONG]
    out += [Stage(f"batch-{m}", m, "batch", "counterfact", args.batch) for m in METHODS]
    out += [Stage(f"stacked1000-{m}", m, "stacked", "counterfact", args.stacked_long) for m in LONG]
    out.sort(key=lambda s: s.name != f"stacked1000-{DEFAULT_METHOD}")  # the longest first: it may be cut short
    out += [Stage(f"zsre-{m}", m, "single", "zsre", args.zsre) for m in METHODS]
    out.append(Stage("latency", "all", "latency", "counterfact", args.latency))
    # what the unedited model answers on the same records: the reference for every success figure
    out += [Stage("unedited-counterfact", "none", "unedited", "counterfact", args.single_default),
            Stage("unedited-zsre", "none", "unedited", "zsre", args.zsre)]
    return out


def run_stage(stage: Stage, args) -> dict:
    """Evaluate one stage on the default model; the JSON it returns is what the cache keeps."""
    from editor_core import checkpoint, models
    from editor_core.baselines import FTConfig, make_baseline
    from editor_core.canary import CanarySet
    from editor_core.data import load_records
    from editor_core.editor import MendEditor
    from editor_core.evaluate import evaluate
    from editor_core.methods.locate import LocateConfig, LocateEditor
    from editor_core.stack import EditStack
    from editor_core.stacked import stacked_curve
    from editor_core.stats import STATS_FILE, KeyStats
    from editor_core.targets import out_proj_targets

    lm = models.load(args.model)
    model, tok = lm.model, lm.tokenizer
    editor_dir = checkpoint.default_editor_dir(args.model)
    stats_dir = editor_dir  # the shipped statistics live beside the shipped editor
    stack = EditStack(model, checkpoint.all_stack_targets(model, editor_dir, stats_dir))

    def make_editor(method: str):
        if method == "mend":
            return MendEditor.load(editor_dir, stack)
        if method == "ft":
            ft_targets = tuple(t.name for t in checkpoint.stack_targets(model, editor_dir))
            return make_baseline("ft", stack, FTConfig(max_steps=args.ft_steps, targets=ft_targets))
        return LocateEditor(method, stack, KeyStats.load(Path(stats_dir) / STATS_FILE), LocateConfig.load(stats_dir))

    path = args.data if stage.data == "counterfact" else args.zsre_data
    records = load_records(path, skip_empty=stage.data == "zsre")  # zsRE: two questions have no new answer
    if stage.data == "zsre":
        records = records[-stage.n:]  # the end of the file: keep the start free for a training split
    else:
        records = records[: stage.n]
    started = time.time()
    if stage.kind == "unedited":
        from editor_core.evaluate import mean_metrics, record_metrics, score_records

        pre = mean_metrics([record_metrics(s) for s in score_records(model, tok, records)])
        return {"pre": pre, "stage": stage.__dict__, "records": len(records), "seconds": round(time.time() - started),
                "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": torch.get_num_threads(),
                "load_average": round(os.getloadavg()[0], 1)}
    if stage.kind == "latency":
        out = {"latency": latency(model, tok, stack, {m: make_editor(m) for m in METHODS}, records),
               "stage": stage.__dict__, "records": len(records), "seconds": round(time.time() - started),
               "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": torch.get_num_threads(),
               "load_average": round(os.getloadavg()[0], 1)}
        return out
    if stage.kind == "stacked" and stage.method in LOCATE:
        # only the method's own layers: the same stack (fingerprint) as tools.stacked_variant's, so a variant
        # run's delta cache made with these settings serves this stage
        stack = EditStack(model, out_proj_targets(model, LocateConfig.load(stats_dir).layers(stage.method)))
    editor = make_editor(stage.method)
    canaries = CanarySet(model, tok)
    if stage.kind == "stacked":
        points_file = CACHE / f"{stage.name}.points.json"
        points = stacked_curve(model, tok, stack, editor, records, list(CHECKPOINTS) + [len(records)],
                               canaries=canaries, delta_dir=CACHE / f"{stage.name}.deltas",
                               on_point=lambda p: _append(points_file, p), progress=not args.no_progress,
                               pre_cache=CACHE / f"unedited-{stage.data}-{stack.fingerprint[:12]}.json",
                               settings=delta_settings(editor))
        # the unedited model on the same records (an unedited neighbour keeps its own answer)
        out = {"pre": {**points[-1]["pre"], "neighbour_kept": 1.0}, "post": points[-1]["post"],
               "edit_ms": points[-1]["edit_ms"], "points": points, "canary": points[-1].get("canary")}
    elif stage.kind == "single":
        out = single_in_parts(stage, records, args.part_size, lambda recs: evaluate(
            model, tok, stack, editor, recs, progress=not args.no_progress, canaries=canaries), delta_settings(editor))
    else:
        rep = evaluate(model, tok, stack, editor, records, batch_size=stage.n, progress=not args.no_progress,
                       canaries=canaries)
        out = {"pre": rep.pre, "post": rep.post, "edit_ms": rep.edit_ms}
    if stage.method in LOCATE:
        out["stats_corpus"] = KeyStats.load(Path(stats_dir) / STATS_FILE).corpus
        out["settings"] = editor.settings()
    out.update({"stage": stage.__dict__, "records": len(records), "seconds": round(time.time() - started),
                "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": torch.get_num_threads(),
                "load_average": round(os.getloadavg()[0], 1)})
    if "part_seconds" in out:  # parts may have run in several sittings: their own times add up to the stage's
        out["seconds"] = out.pop("part_seconds")
    return out


# ---- single-edit stages in parts -------------------------------------------------------------------
def parts_dir(stage: Stage) -> Path:
    return CACHE / f"{stage.name}.parts"


class FinishedElsewhere(Exception):
    """Another process merged the stage's last parts (and removed them) while this one waited."""


def single_in_parts(stage: Stage, records: list, size: int, run: Callable[[list], object], settings: dict,
                    wait_s: float = 20.0) -> dict:
    """A single-edit stage evaluated ``size`` records at a time, each part cached once done.

    Single edits are reverted before the next, so a part's rows do not depend on the others: a stage cut
    off resumes at its first unfinished part, and a second process given the same stage takes the parts
    no other process holds (an ``flock`` on ``<part>.lock``, which the kernel drops with its holder),
    then waits for the rest. ``run(records)`` returns an :class:`~editor_core.evaluate.EvalReport`;
    ``settings`` (what decides the edits, JSON) is recorded in each part, and parts made on other records
    or with other settings are refused before anything runs. The merged figures are the means over every
    record's row, as one ``evaluate`` call over all of them gives.
    """
    d = parts_dir(stage)
    d.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, len(records), size))
    settings = json.loads(json.dumps(settings))  # as a part holds it (tuples read back as lists)

    def part_path(start: int) -> Path:
        return d / f"{start:05d}.json"

    def check(start: int) -> dict:
        part = json.loads(part_path(start).read_text())
        want = [r.case_id for r in records[start:start + size]]
        if part["case_ids"] != want or part.get("settings") != settings:
            what = "other records" if part["case_ids"] != want else "other editor settings"
            raise ValueError(f"{part_path(start)} was made with {what} than this run of stage {stage.name} (records "
                             f"{start}-{start + size - 1}): delete {d} to run the stage again")
        return part

    for start in starts:  # refuse a mismatch now, not after hours of the other parts
        if part_path(start).is_file():
            check(start)
    while True:
        took = False
        for start in starts:
            if (CACHE / f"{stage.name}.json").is_file():
                raise FinishedElsewhere(stage.name)
            if part_path(start).is_file():
                continue
            try:
                lock = _claim(part_path(start))
            except FileNotFoundError:  # the parts were merged and removed between the look above and here
                raise FinishedElsewhere(stage.name) from None
            if lock is None:
                continue
            try:
                if part_path(start).is_file():  # finished by another process since the look above
                    continue
                took = True
                chunk = records[start:start + size]
                t0 = time.time()
                rep = run(chunk)
                log.info("stage %s: records %d-%d done", stage.name, start, start + len(chunk) - 1)
                _write_atomically(part_path(start), {
                    "case_ids": [r.case_id for r in chunk], "settings": settings, "rows": rep.rows,
                    "times_ms": rep.times_ms, "seconds": round(time.time() - t0),
                    "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
            finally:
                os.close(lock)
        missing = [s for s in starts if not part_path(s).is_file()]
        if not missing:
            break
        if not took:  # every missing part is another live process's: wait for it
            log.info("stage %s: waiting for parts %s held by another process", stage.name, missing)
            time.sleep(wait_s)
    return merge_parts([check(start) for start in starts])


def merge_parts(parts: list[dict]) -> dict:
    """A stage's figures from its parts: means over all their rows, timing over all their edit calls."""
    from editor_core.evaluate import mean_metrics, timing_summary

    rows = [row for part in parts for row in part["rows"]]
    times = [t for part in parts for t in part["times_ms"]]
    return {"pre": mean_metrics([r["pre"] for r in rows]), "post": mean_metrics([r["post"] for r in rows if "post" in r]),
            "edit_ms": timing_summary(times) if times else {}, "records": len(rows), "parts": len(parts),
            "part_seconds": sum(part["seconds"] for part in parts)}


def _claim(path: Path) -> int | None:
    """An open descriptor holding the exclusive lock of part ``path`` (close it to let go), or None when
    another process holds it. The lock file stays; the kernel releases the lock when its holder dies."""
    fd = os.open(path.with_suffix(".lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _write_atomically(path: Path, data: dict) -> None:
    """Write JSON so that a reader sees the old file or the whole new one, never half of it."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _partial_singles(all_stages: list[Stage]) -> dict[str, dict]:
    """Single-edit stages not finished but with parts done: their figures so far."""
    out = {}
    for s in all_stages:
        if s.kind != "single" or (CACHE / f"{s.name}.json").is_file():
            continue
        parts = [json.loads(p.read_text()) for p in sorted(parts_dir(s).glob("[0-9]*.json"))]
        if parts:
            out[s.name] = merge_parts(parts)
    return out


def delta_settings(editor) -> dict:
    """What decides an editor's deltas (JSON), recorded in and checked against a stacked stage's delta cache.

    ``tools.mend_variant --delta-dir`` records the same, so a variant run's cache serves the stage once its
    settings are shipped."""
    from dataclasses import asdict

    if editor.method in LOCATE:
        return editor.settings()
    return {"method": editor.method, "config": asdict(editor.config), "editor_id": getattr(editor, "editor_id", None)}


def latency(model, tok, stack, editors: dict, records) -> dict:
    """Per method: one edit call (compute + apply) on each record, beside one forward+backward of the model on
    the same request (prompt + target, loss on the target, gradients of every weight), interleaved so both
    see the same machine load. Milliseconds: {method: {"edit": {...}, "fwd_bwd": {...}}}."""
    from editor_core.batching import build_batch
    from editor_core.evaluate import timing_summary

    out = {}
    for method, editor in editors.items():
        edit_ms, fb_ms = [], []
        for i, r in enumerate(records):
            req = r.to_request()
            batch = build_batch(tok, [req.prompt], [req.target])
            frozen = [p for p in model.parameters() if not p.requires_grad]  # the loaded model is frozen
            for p in frozen:
                p.requires_grad_(True)
            t0 = time.perf_counter()
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
            loss.backward()
            fb_ms.append((time.perf_counter() - t0) * 1000.0)
            model.zero_grad(set_to_none=True)
            for p in frozen:
                p.requires_grad_(False)
            t0 = time.perf_counter()
            delta = editor.compute_delta(model, tok, [req])
            stack.apply(f"latency-{method}-{i}", delta)
            edit_ms.append((time.perf_counter() - t0) * 1000.0)
            stack.revert(f"latency-{method}-{i}")
        out[method] = {"edit": timing_summary(edit_ms), "fwd_bwd": timing_summary(fb_ms)}
        log.info("latency %s: edit p50 %.0f ms, forward+backward p50 %.0f ms", method, out[method]["edit"]["median"],
                 out[method]["fwd_bwd"]["median"])
    return out


def _append(path: Path, point: dict) -> None:
    points = json.loads(path.read_text()) if path.is_file() else []
    points = [p for p in points if p["n"] != point["n"]] + [point]
    path.write_text(json.dumps(points, indent=1))


def _cell(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _ms(e: dict | None) -> str:
    return "-" if not e else f"{e['median'] / 1000:.1f} / {e['p95'] / 1000:.1f}"


def render(args, all_stages: list[Stage]) -> None:
    """docs/RESULTS.md (+ results.json, results_stacked.png) from every cached stage."""
    done = {s.name: json.loads((CACHE / f"{s.name}.json").read_text())
            for s in all_stages if (CACHE / f"{s.name}.json").is_file()}
    partial = {s.name: json.loads((CACHE / f"{s.name}.points.json").read_text()) for s in all_stages
               if s.kind == "stacked" and s.name not in done and (CACHE / f"{s.name}.points.json").is_file()}
    singles = _partial_singles(all_stages)
    head = "| method | records | " + " | ".join(COLUMNS) + " | edit s p50 / p95 |"
    sep = "|" + "---|" * (len(COLUMNS) + 3)

    def row(label: str, n, metrics: dict, edit_ms=None) -> str:
        return f"| {label} | {n} | " + " | ".join(_cell(metrics.get(c)) for c in COLUMNS) + f" | {_ms(edit_ms)} |"

    lines = ["# Results: editing SmolLM2-135M-Instruct (CounterFact, zsRE)", "",
             f"Rendered {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python -m tools.results` "
             f"(`make results`) on {platform.machine()} with {os.cpu_count()} CPU cores. Each stage ran once; "
             "its records, run time, torch threads and the machine's load average are in `docs/results.json`. "
             "Metrics: DESIGN.md; `success` = the greedy continuation is exactly the new target (what `/edit` "
             "reports), `neighbour_kept` = a neighbourhood prompt's greedy answer is unchanged. edit s = "
             "seconds to compute and apply one edit call on this shared machine (other jobs ran beside it: "
             "times are pessimistic).", ""]
    if done or singles:
        lines += ["Stages in this report:", ""]
        lines += [f"- `{name}`: {d['records']} records, {d['seconds']} s, finished {d['finished']}, "
                  f"{d['threads']} torch thread(s), load average {d['load_average']}"
                  + (f", key statistics: {d.get('stats_corpus') or 'not recorded (made before the shipped ones)'}"
                     f", {_value_metric(d)}" if d["stage"]["method"] in LOCATE else "")
                  + _cached_note(d)
                  for name, d in done.items()]
        lines += [f"- `{name}`: cut short after {points[-1]['n']} edits (its checkpoints are shown)"
                  for name, points in partial.items() if points]
        lines += [f"- `{name}`: {d['records']} records so far in {d['parts']} part(s), {d['part_seconds']} s; "
                  "the same command resumes it" for name, d in singles.items()]
        lines.append("")
    for title, kind, data in (("Single edits (one fact at a time, reverted before the next)", "single",
                               "counterfact"),
                              ("Batched: 100 facts in one edit call", "batch", "counterfact"),
                              ("Sequential: facts stacked one after another, all scored at the end", "stacked",
                               "counterfact"),
                              ("zsRE (question answering; the last records of the file), single edits", "single",
                               "zsre")):
        mine = [s for s in all_stages if s.kind == kind and s.data == data and not s.name.startswith("stacked1000")]
        lines += [f"## {title}", "", head, sep]
        pre_done = next((done[s.name] for s in mine if s.name in done), None)
        if pre_done is None and kind == "stacked":  # same first records: any finished CounterFact stage's "pre"
            pre_done = next((d for d in done.values() if d["stage"]["data"] == data
                             and d["records"] == args.stacked), None)
        if pre_done:
            lines.append(row("unedited", pre_done["records"], pre_done["pre"]))
        if kind == "stacked":  # a method with a long run: the 100-edit point of it
            for s in all_stages:
                points = (done.get(s.name) or {}).get("points") or partial.get(s.name) or []
                at = [p for p in points if p["n"] == args.stacked]
                if s.name.startswith("stacked1000") and at:
                    lines.append(row(f"{s.method} (point {args.stacked} of `{s.name}`)", args.stacked, at[0]["post"],
                                     at[0]["edit_ms"]))
        for s in mine:
            if s.name in done:
                d = done[s.name]
                lines.append(row(s.method, d["records"], d["post"], d["edit_ms"]))
            elif s.name in singles:
                d = singles[s.name]
                lines.append(row(f"{s.method} ({d['records']} of {s.n} records so far)", d["records"], d["post"],
                                 d["edit_ms"]))
            else:
                lines.append(f"| {s.method} | not run | " + " | ".join("-" for _ in COLUMNS) + " | - |")
        lines.append("")
    lines += _latency_section(done.get("latency"))
    lines += _unedited_section([done[s.name] for s in all_stages if s.kind == "unedited" and s.name in done])
    long = [s for s in all_stages if s.name.startswith("stacked1000")]
    lines += ["## Stacked edits over time", "",
              "Every fact edited so far is scored after n edits (the point at n is `mend eval --sequential n` "
              "on those n records); `canary kept` = share of the 64 canary prompts answering as the unedited "
              "model does.", "",
              "| method | n | efficacy | paraphrase | neighborhood | success | neighbour_kept | locality_acc | "
              "canary kept | edit s p50 |", "|---|---|---|---|---|---|---|---|---|---|"]
    curves: dict[str, list[dict]] = {}
    for s in [s for s in all_stages if s.kind == "stacked"]:
        points = done[s.name]["points"] if s.name in done else partial.get(s.name, [])
        if not points:
            continue
        curves[s.name] = points
        for p in points:
            if p["n"] in (1, 10, 100, 300, 1000) or p is points[-1]:
                c = p.get("canary")
                kept = "-" if not c else _cell(1 - c["changed_share"])
                lines.append(f"| {s.method}{'' if s.name in done else ' (run cut short)'} | {p['n']} | "
                             + " | ".join(_cell(p["post"].get(k)) for k in ("efficacy", "paraphrase", "neighborhood",
                                                                            "success", "neighbour_kept",
                                                                            "locality_acc"))
                             + f" | {kept} | {p['edit_ms']['median'] / 1000:.1f} |")
    missing = [s.name for s in long if s.name not in done and s.name not in partial]
    if missing:
        lines += ["", f"Not run: {', '.join(missing)}."]
    if curves:
        _plot(curves, Path(args.out) / "results_stacked.png")
        lines += ["", "![efficacy, success and neighbourhood against the number of stacked edits](results_stacked.png)", "",
                  "Each point scores the first n facts, so the unedited model's figures move with n too (its "
                  "neighbourhood score: 0.70 on the first 30 records, 0.75 on the first 100); runs made "
                  "after this change draw the unedited curve (dotted) beside each method."]
    lines.append("")
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps({"stages": done, "partial": partial, "partial_single": singles},
                                                 indent=1))
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s (%d stages finished)", out / "RESULTS.md", len(done))


def _unedited_section(stages: list[dict]) -> list[str]:
    """How often the unedited model's greedy answer is the true object, and the new one, on the stages' records."""
    if not stages:
        return []
    lines = ["## What the unedited model answers", "",
             "The greedy continuation of the unedited model, on the records the tables above edit: how often it is "
             "exactly the true object (`truth_success`, on the prompt and on its rephrasings) and the new one "
             "(`success`). An edited model's `success` on rephrasings is judged beside how often the model gives a "
             "fact it already holds on them.", "",
             "| data | records | truth_success | truth_paraphrase_success | success | paraphrase_success |",
             "|---|---|---|---|---|---|"]
    for d in stages:
        pre = d["pre"]
        lines.append(f"| {d['stage']['data']} | {d['records']} | " + " | ".join(
            _cell(pre.get(k)) for k in ("truth_success", "truth_paraphrase_success", "success",
                                        "paraphrase_success")) + " |")
    return lines + [""]


def _value_metric(stage: dict) -> str:
    """How a locate-then-edit stage measured its values, from the settings it recorded."""
    settings = stage.get("settings")
    if not settings:  # stages made before settings were recorded: before the Fisher metric existed
        return "values in the Euclidean metric (settings not recorded)"
    return f"values in the {settings['config']['value'].get('metric', 'euclidean')} metric"


def _cached_note(stage: dict) -> str:
    """For a stacked stage that re-scored deltas an earlier run computed: how many, and whose times."""
    cached = ((stage.get("points") or [{}])[-1]).get("from_cache")
    if not cached:
        return ""
    return (f"; {cached} of its {stage['records']} deltas read from an earlier run's cache (its run time is the "
            "scoring; the edit times are those recorded when the deltas were computed)")


def _restore(path: Path, all_stages: list[Stage]) -> list[str]:
    """Write the finished stages a results.json holds into the cache, where the cache has none."""
    saved = json.loads(path.read_text()).get("stages", {})
    restored = []
    for s in all_stages:
        if s.name in saved and not (CACHE / f"{s.name}.json").is_file():
            (CACHE / f"{s.name}.json").write_text(json.dumps(saved[s.name], indent=1))
            restored.append(s.name)
    return restored


def _latency_section(d: dict | None) -> list[str]:
    """The latency table: each method's edit call beside a forward+backward of the same requests."""
    lines = ["## Latency: one edit call beside one forward+backward, same run", ""]
    if not d:
        return lines + ["Not run (stage `latency`).", ""]
    lines += [f"{d['records']} counterfact-val records per method, single edits on the unedited model, "
              f"{d['threads']} torch thread(s), load average {d['load_average']} at the end, finished "
              f"{d['finished']}. forward+backward = the model's loss on prompt + target and the gradients of "
              "every weight, timed just before each edit call; edit = `compute_delta` + `EditStack.apply`.", "",
              "| method | edit s p50 / p95 | forward+backward s p50 | edit p50 / forward+backward p50 |",
              "|---|---|---|---|"]
    for method, t in d["latency"].items():
        e, fb = t["edit"], t["fwd_bwd"]
        lines.append(f"| {method} | {_ms(e)} | {fb['median'] / 1000:.2f} | {e['median'] / fb['median']:.1f}x |")
    return lines + [""]


def _plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("efficacy", "success", "neighborhood")  # success: what a user sees (the greedy answer is the target)
    fig, axes = plt.subplots(1, len(keys), figsize=(14, 4), sharex=True)
    for name, points in sorted(curves.items()):
        ns = [p["n"] for p in points]
        for ax, key in zip(axes, keys, strict=True):
            line = ax.plot(ns, [p["post"].get(key) for p in points], "-o", ms=3, label=name)[0]
            if all("pre" in p for p in points):  # the unedited model on the same first n facts
                ax.plot(ns, [p["pre"].get(key) for p in points], ":", color=line.get_color(),
                        label=f"{name}, unedited")
    for ax, key in zip(axes, keys, strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("edits stacked")
        ax.set_title(key)
        ax.set_ylim(-0.02, 1.02)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/counterfact-val.json")
    p.add_argument("--zsre-data", default="../shared/data/zsre_mend_train-1k.json")
    p.add_argument("--stages", default="", help="comma-separated stage names (default: all not yet cached)")
    p.add_argument("--single", type=int, default=300, help="records per method, single edits")
    p.add_argument("--single-default", type=int, default=1919, help="records for the default method")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--stacked", type=int, default=100)
    p.add_argument("--stacked-long", type=int, default=1000)
    p.add_argument("--zsre", type=int, default=100)
    p.add_argument("--part-size", type=int, default=100,
                   help="single-edit stages run and are cached this many records at a time (resumable)")
    p.add_argument("--latency", type=int, default=20, help="records per method in the latency stage")
    p.add_argument("--ft-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--render", action="store_true", help="only rewrite the markdown")
    p.add_argument("--restore", type=Path, metavar="RESULTS_JSON",
                   help="first put the finished stages of this results.json (e.g. docs/results.json) into the cache")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="docs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    all_stages = stages(args)
    known = {s.name: s for s in all_stages}
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in known]
    if unknown:
        p.error(f"--stages: unknown {unknown}; known: {sorted(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from editor_core.allocator import pin_mmap_threshold

    pin_mmap_threshold()  # a long stacked run otherwise grows by megabytes an edit
    CACHE.mkdir(parents=True, exist_ok=True)
    if args.restore:
        if not args.restore.is_file():
            p.error(f"--restore {args.restore}: no such file")
        log.info("restored from %s: %s", args.restore, _restore(args.restore, all_stages) or "nothing new")
    if not args.render:
        for s in [known[w] for w in wanted] if wanted else all_stages:
            if (CACHE / f"{s.name}.json").is_file():
                continue
            log.info("stage %s: %s", s.name, s)
            try:
                out = run_stage(s, args)
            except FinishedElsewhere:
                log.info("stage %s: finished by another process", s.name)
                continue
            (CACHE / f"{s.name}.json").write_text(json.dumps(out, indent=1))
            # its parts are merged into it: running the stage again (its JSON deleted) starts afresh
            shutil.rmtree(parts_dir(s), ignore_errors=True)
            render(args, all_stages)
    render(args, all_stages)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
