"""``mend check-gpu``: the service's CUDA path, measured and asserted (``make check-gpu``).

Per dtype (bf16, then fp32) one service instance, built as ``mend serve`` builds it (``create_app``,
embedded redis-server, the model's MEND editor and key statistics), takes a MEND and an AlphaEdit
edit of each of N counterfact-val records over HTTP, each rolled back right after; then every edit
rolled back must give the unedited weights bit for bit. A few edits are kept (one rolled back), the
service restarts and its journal replay must reproduce the sha256. Then, on the loaded model: one
forward+backward of the edit loss, query throughput at batch 1 and 16, peak GPU memory with 0 and
N active edits, and (fp32) the same edits computed on CPU fp32 and on the device must agree.

``--dry`` runs the same code on CPU with a tiny llama built from config (saved as a model directory,
with an untrained MEND editor and key statistics made for it) and 4 records, so it cannot rot; it is
part of ``make test``. Without ``--dry`` the device must be there (exit 2 otherwise).
Exit status: 0 all checks passed, 1 a check failed, 2 cannot run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from editor_core.requests import EditRequest
from service.check_gpu_report import Check, machine_info, markdown, table

log = logging.getLogger(__name__)

DEFAULT_OUT = "docs/GPU.md"


@dataclass
class CheckConfig:
    """Everything a check run depends on; written into the report as JSON."""

    device: str = "cuda"
    model: str = "smollm2-135m"
    dtypes: list[str] = field(default_factory=lambda: ["bfloat16", "float32"])
    data: str = "../shared/data/counterfact-val.json"
    records: int = 20  # edited one at a time (each rolled back) per method and dtype
    methods: list[str] = field(default_factory=lambda: ["mend", "alphaedit"])
    # smallest share of records whose target becomes the greedy answer; the same check on CPU fp32
    # (`--device cpu --dtypes float32`, first 20 counterfact-val records) gave mend 0.15, alphaedit 0.95
    min_success: dict[str, float] = field(default_factory=lambda: {"mend": 0.1, "alphaedit": 0.8})
    kept_edits: int = 4  # edits kept through the restart (the second one rolled back first)
    active_edits: int = 1000  # for the memory figure (replicas of real deltas, applied as a replay does)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    query_repeats: int = 5
    new_tokens: int = 16
    agree_records: int = 3  # records edited on CPU fp32 and on the device in fp32
    agree_tol: float = 0.05  # largest |p_after(cpu) - p_after(device)|
    canary_guard: bool = False  # the guard is a quality gate, not part of the device path under test
    torch_threads: int | None = None
    editor_dir: str | None = None
    stats_dir: str | None = None
    dry: bool = False

    @classmethod
    def dry_run(cls) -> CheckConfig:
        """The CI variant: tiny model on CPU, few records and edits, both dtypes."""
        return cls(device="cpu", model="", records=4, min_success={"mend": 0.0, "alphaedit": 0.75}, kept_edits=3,
                   active_edits=50, query_repeats=2, new_tokens=4, agree_records=2, torch_threads=1, dry=True)


# ---- one service instance ------------------------------------------------------------------------
@contextmanager
def serving(settings) -> Iterator[tuple[object, object]]:
    """The real app (lifespan included) behind an in-process HTTP client, once /health/ready is 200."""
    from fastapi.testclient import TestClient

    from service.main import create_app

    app = create_app(settings)
    with TestClient(app) as client:
        if not app.state.runtime.wait_ready(600):
            raise RuntimeError(f"service not ready: {client.get('/health/ready').json()}")
        yield client, app


def _post(client, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    if r.status_code != 200:
        raise RuntimeError(f"{path} answered {r.status_code}: {r.text[:300]}")
    return r.json()


def _edit_body(req: EditRequest, method: str) -> dict:
    return {"requests": [{"prompt": req.prompt, "target": req.target, "subject": req.subject}], "method": method}


def edit_each(client, records: list[EditRequest], method: str) -> list[dict]:
    """Edit each record alone and roll it back: result, server latency and wall time per record."""
    rows = []
    for req in records:
        t0 = time.perf_counter()
        r = client.post("/edit", json=_edit_body(req, method))
        wall = (time.perf_counter() - t0) * 1000.0
        if r.status_code != 200:
            rows.append({"ok": False, "success": False, "error": f"{r.status_code}: {r.text[:200]}"})
            continue
        out = r.json()
        res = out["results"][0]
        _post(client, "/rollback", {"edit_id": out["edit_id"]})
        rows.append({"ok": True, "success": bool(res["success"]), "p_before": res["p_target_before"],
                     "p_after": res["p_target_after"], "latency_ms": out["latency_ms"], "wall_ms": wall})
    return rows


def query_throughput(client, prompts: list[str], batch: int, repeats: int, new_tokens: int) -> dict:
    """/query with ``batch`` prompts, ``repeats`` times: prompts per second and latency p50."""
    chosen = [prompts[i % len(prompts)] for i in range(batch)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _post(client, "/query", {"prompts": chosen, "max_new_tokens": new_tokens})
        times.append(time.perf_counter() - t0)
    p50 = statistics.median(times)
    return {"batch": batch, "p50_ms": p50 * 1000.0, "prompts_per_s": batch / p50}


# ---- on the loaded model, after the service stopped ------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward_ms(engine, records: list[EditRequest]) -> list[float]:
    """One forward+backward of the edit loss wrt MEND's targets, per record (what a MEND edit runs)."""
    from editor_core.batching import build_batch
    from editor_core.grads import capture_factors

    device = next(engine.model.parameters()).device
    mend = engine.editors.get("mend")
    targets = mend.targets if mend is not None else list(engine.stack.targets.values())
    out = []
    for req in records:
        batch = build_batch(engine.tokenizer, [req.prompt], [req.target]).to(device)
        _sync(device)
        t0 = time.perf_counter()
        capture_factors(engine.model, targets, batch)
        _sync(device)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def replicas(deltas: list, n: int, seed: int = 0) -> list[tuple[str, object]]:
    """``n`` deltas shaped like ``deltas`` (5% noise on the factors), each scaled by len(deltas)/n so
    that their sum stays the size of one real edit; AlphaEdit's keys ride along."""
    from editor_core.delta import EditDelta, LowRankUpdate

    gen = torch.Generator().manual_seed(seed)
    scale = len(deltas) / n
    out = []
    for i in range(n):
        base = deltas[i % len(deltas)]
        ups = {}
        for name, u in base.updates.items():
            noise_u = torch.randn(u.u.shape, generator=gen).to(u.u.device)  # (r, d_out)
            noise_v = torch.randn(u.v.shape, generator=gen).to(u.v.device)  # (r, d_in)
            ups[name] = LowRankUpdate((u.u + 0.05 * u.u.std() * noise_u) * scale, u.v + 0.05 * u.v.std() * noise_v)
        out.append((f"replica-{i}", EditDelta(ups, base.model_fingerprint, dict(base.meta), keys=dict(base.keys))))
    return out


def memory_with_active_edits(engine, methods: list[str], records: list[EditRequest], n_active: int, batch: int,
                             new_tokens: int) -> dict:
    """Peak device memory of one query batch plus one edit per method, with 0 and ``n_active`` edits
    applied by ``EditStack.rebuild`` (the replay path). GPU figures only; on CPU the path runs."""
    from service.inference import QueryJob, run_queries

    device = next(engine.model.parameters()).device
    stack, model, tok = engine.stack, engine.model, engine.tokenizer
    editors = [engine.editors[m] for m in methods]
    real = [ed.compute_delta(model, tok, [req]) for ed in editors for req in records[:2]]
    out: dict = {}
    for label, edits in (("0", []), (str(n_active), replicas(real, n_active))):
        stack.rebuild(edits)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        run_queries(model, tok, [QueryJob([records[i % len(records)].prompt for i in range(batch)], new_tokens)])
        for ed in editors:
            ed.compute_delta(model, tok, records[:1])
        _sync(device)
        if device.type == "cuda":
            out[label] = {"peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                          "allocated_gib": torch.cuda.memory_allocated(device) / 2**30}
        else:
            out[label] = {"peak_gib": None, "allocated_gib": None}
        out[label]["active"] = len(stack.active_ids)
    stack.reset()
    out["finite_and_reset"] = stack.sha256() == engine.sha256
    return out


def edit_and_score(model, tok, stack, editor, req: EditRequest) -> dict:
    """Compute, apply, score and revert one edit directly on a model: success and p_after."""
    from editor_core.scoring import score_targets, target_probability

    delta = editor.compute_delta(model, tok, [req])
    with stack.applied(delta):
        s = score_targets(model, tok, [req.prompt], [req.target])[0]
    return {"success": s.token_acc == 1.0, "p_after": target_probability(s)}


def cpu_device_agreement(engine, settings, records: list[EditRequest], methods: list[str]) -> list[dict]:
    """The same edits on a CPU fp32 copy of the model and on the device's fp32 model."""
    from editor_core.models import load
    from editor_core.stack import EditStack
    from service.methods import service_stack_targets
    from service.runtime import default_editors

    cpu_settings = settings.model_copy(update={"device": "cpu", "dtype": "float32"})
    lm = load(settings.model, device="cpu", dtype=torch.float32, cache_dir=settings.model_cache)
    cpu_stack = EditStack(lm.model, service_stack_targets(lm.model, cpu_settings))
    cpu_editors = default_editors(cpu_stack, lm.model, lm.tokenizer, cpu_settings)
    rows = []
    for method in methods:
        for req in records:
            dev = edit_and_score(engine.model, engine.tokenizer, engine.stack, engine.editors[method], req)
            cpu = edit_and_score(lm.model, lm.tokenizer, cpu_stack, cpu_editors[method], req)
            rows.append({"method": method, "prompt": req.prompt, "cpu": cpu, "device": dev,
                         "abs_diff": abs(cpu["p_after"] - dev["p_after"])})
    return rows


# ---- one dtype -------------------------------------------------------------------------------------
def _p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def check_dtype(cfg: CheckConfig, dtype: str, records: list[EditRequest], settings, checks: list[Check]) -> dict:
    """Every measurement and check of one dtype; appends to ``checks``, returns the figures."""
    fig: dict = {"dtype": dtype}
    t0 = time.perf_counter()
    with serving(settings) as (client, _app):
        ready = client.get("/health/ready").json()
        fig["load_s"] = time.perf_counter() - t0
        checks.append(Check(f"{dtype}: service ready on {cfg.device}", ready["device"].startswith(cfg.device)
                            and ready["dtype"] == dtype, f"device {ready['device']}, dtype {ready['dtype']}, "
                            f"methods {ready['methods']}"))
        missing = [m for m in cfg.methods if m not in ready["methods"]]
        checks.append(Check(f"{dtype}: {', '.join(cfg.methods)} offered", not missing,
                            "; ".join(f"{m}: {ready['unavailable_methods'].get(m)}" for m in missing) or "yes"))
        # carry on with what the model offers, so the rest of the path is still measured
        methods = [m for m in cfg.methods if m in ready["methods"]] or [ready["default_method"]]
        fig["methods"] = methods
        base = ready["sha256"]
        for method in methods:
            rows = edit_each(client, records, method)
            ok = [r for r in rows if r["ok"]]
            success = sum(r["success"] for r in rows) / len(rows)
            lat = [r["latency_ms"] for r in ok]
            fig[method] = {"success": success, "edits": len(rows), "failed": len(rows) - len(ok),
                           "p_before": statistics.mean(r["p_before"] for r in ok) if ok else None,
                           "p_after": statistics.mean(r["p_after"] for r in ok) if ok else None,
                           "latency_p50_ms": _p(lat, 50), "latency_p95_ms": _p(lat, 95),
                           "wall_p50_ms": _p([r["wall_ms"] for r in ok], 50),
                           "errors": sorted({r["error"] for r in rows if not r["ok"]})[:3]}
            checks.append(Check(f"{dtype}: {method} edits take (success >= {cfg.min_success.get(method, 0):.2f})",
                                bool(ok) and success >= cfg.min_success.get(method, 0.0)
                                and fig[method]["p_after"] > fig[method]["p_before"],
                                f"success {success:.2f} on {len(rows)} records, mean p_target "
                                f"{fig[method]['p_before'] or 0:.3f} -> {fig[method]['p_after'] or 0:.3f}, "
                                f"{len(rows) - len(ok)} refused"))
        after = client.get("/health/ready").json()["sha256"]
        checks.append(Check(f"{dtype}: rolling back every edit restores the weights bit for bit", after == base,
                            f"targets sha256 {after[:16]} vs unedited {base[:16]}"))
        fig["query"] = [query_throughput(client, [r.prompt for r in records], b, cfg.query_repeats, cfg.new_tokens)
                        for b in cfg.batch_sizes]
        kept = []
        for i, req in enumerate(records[: cfg.kept_edits]):
            kept.append(_post(client, "/edit", _edit_body(req, methods[i % len(methods)]))["edit_id"])
        if len(kept) > 1:
            _post(client, "/rollback", {"edit_id": kept.pop(1)})
        live = client.get("/health/ready").json()
    with serving(settings) as (client, app):  # a restart: the journal is replayed
        again = client.get("/health/ready").json()
        checks.append(Check(f"{dtype}: journal replay after a restart reproduces the sha256",
                            again["sha256"] == live["sha256"] and again["version"] == live["version"],
                            f"{again['active_edits']} active edits, version {again['version']}, sha256 "
                            f"{again['sha256'][:16]} vs {live['sha256'][:16]} before the restart"))
        for edit_id in kept:
            _post(client, "/rollback", {"edit_id": edit_id})
        final = client.get("/health/ready").json()["sha256"]
        checks.append(Check(f"{dtype}: rolling back the replayed edits restores the weights bit for bit",
                            final == base, f"sha256 {final[:16]} vs unedited {base[:16]}"))
        engine = app.state.runtime.engine
    # the worker has stopped: the loaded model, its stack and editors are this thread's now
    fig["fwd_bwd_ms"] = _p(forward_backward_ms(engine, records), 50)
    mem = memory_with_active_edits(engine, methods, records, cfg.active_edits, max(cfg.batch_sizes), cfg.new_tokens)
    fig["memory"] = mem
    checks.append(Check(f"{dtype}: {cfg.active_edits} active edits applied, queried and reset",
                        mem[str(cfg.active_edits)]["active"] == cfg.active_edits and mem["finite_and_reset"],
                        "peak GiB " + ", ".join(f"{k} edits: {v['peak_gib']:.2f}" if v["peak_gib"] is not None
                                                else f"{k} edits: - (no GPU)" for k, v in mem.items()
                                                if isinstance(v, dict))))
    if dtype == "float32" and cfg.agree_records:
        rows = cpu_device_agreement(engine, settings, records[: cfg.agree_records], methods)
        fig["agreement"] = rows
        worst = max(r["abs_diff"] for r in rows)
        same = all(r["cpu"]["success"] == r["device"]["success"] for r in rows)
        checks.append(Check(f"fp32: CPU and {cfg.device} agree on the same edits (|p_after diff| <= "
                            f"{cfg.agree_tol})", same and worst <= cfg.agree_tol,
                            f"{len(rows)} edits, success equal: {same}, largest |p_after diff| {worst:.2e}"))
    return fig


# ---- the whole check ---------------------------------------------------------------------------------
def load_requests(cfg: CheckConfig) -> list[EditRequest]:
    """The first ``cfg.records`` records of the data file that name a subject, as edit requests."""
    from editor_core.data import load_records

    recs = [r.to_request() for r in load_records(cfg.data) if r.subject and r.subject in r.prompt]
    return [EditRequest(r.prompt, r.target, r.subject) for r in recs[: cfg.records]]


def run_check(cfg: CheckConfig, workdir: Path) -> dict:
    """Run every dtype; returns {config, machine, figures, checks}."""
    if cfg.dry:
        from service.check_gpu_dry import build_dry_world

        cfg.model, cfg.editor_dir, cfg.stats_dir, records = build_dry_world(workdir / "world", cfg.records)
    else:
        records = load_requests(cfg)
    threads = torch.get_num_threads()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    checks: list[Check] = []
    figures = {}
    started = time.perf_counter()
    try:
        for dtype in cfg.dtypes:
            figures[dtype] = _one_dtype(cfg, dtype, records, workdir, checks)
    finally:
        torch.set_num_threads(threads)
    return {"config": asdict(cfg), "machine": machine_info(cfg.device), "figures": figures,
            "checks": [asdict(c) for c in checks], "wall_s": time.perf_counter() - started}


def _one_dtype(cfg: CheckConfig, dtype: str, records: list[EditRequest], workdir: Path, checks: list[Check]) -> dict:
    """The service settings of one dtype (own embedded journal), then :func:`check_dtype`."""
    from service.settings import Settings

    settings = Settings(model=cfg.model, device=cfg.device, dtype=dtype, editor_dir=cfg.editor_dir,
                        stats_dir=cfg.stats_dir, data_dir=workdir / f"journal-{dtype}", redis_url=None,
                        canary_guard=cfg.canary_guard, torch_threads=cfg.torch_threads, log_format="text",
                        max_batch_size=max(cfg.batch_sizes), max_prompts_per_query=max(cfg.batch_sizes),
                        default_method="alphaedit", api_keys={})
    log.info("check-gpu: %s on %s, %d records", dtype, cfg.device, len(records))
    return check_dtype(cfg, dtype, records, settings, checks)


# ---- CLI glue (`mend check-gpu`, wired up by service/cli.py) ---------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``mend check-gpu``."""
    d = CheckConfig()
    p.add_argument("--dry", action="store_true", help="CPU, tiny model built from config, few records (CI)")
    p.add_argument("--device", default=d.device, help="torch device to check (cuda, cuda:1; cpu for a reference)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--data", default=d.data, help="CounterFact (EasyEdit) records to edit")
    p.add_argument("--records", type=int, default=None)
    p.add_argument("--dtypes", nargs="+", default=None, choices=["bfloat16", "float32", "float16"])
    p.add_argument("--methods", nargs="+", default=None, choices=["mend", "alphaedit", "memit", "rome", "ft"])
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--active-edits", type=int, default=None)
    p.add_argument("--canary-guard", action="store_true", help="keep the service's canary guard on")
    p.add_argument("--out", default=None, help=f"markdown report (default {DEFAULT_OUT} on a GPU; none with "
                                               "--dry or on CPU)")
    p.add_argument("--json", default=None, help="also write the raw results as JSON here")


def run(args: argparse.Namespace) -> int:
    """``mend check-gpu``: 0 when every check passed, 1 when one failed, 2 when it cannot run."""
    cfg = CheckConfig.dry_run() if args.dry else CheckConfig(device=args.device, model=args.model, data=args.data)
    for name in ("records", "dtypes", "methods", "active_edits", "torch_threads"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.canary_guard = args.canary_guard
    if not cfg.dry and cfg.device.startswith("cuda") and not torch.cuda.is_available():
        log.error("mend check-gpu: no CUDA device here (torch %s, cuda available: False). Run it on a machine "
                  "with a GPU and a CUDA build of torch (make setup TORCH_INDEX=https://download.pytorch.org/"
                  "whl/cu126), or run `mend check-gpu --dry` for the CPU dry run.", torch.__version__)
        return 2
    if not cfg.dry and not Path(cfg.data).is_file():
        log.error("mend check-gpu: no records at %s (--data)", cfg.data)
        return 2
    out = args.out or (DEFAULT_OUT if not cfg.dry and cfg.device.startswith("cuda") else None)
    with tempfile.TemporaryDirectory(prefix="mend-check-gpu-") as tmp:
        result = run_check(cfg, Path(tmp))
    result["command"] = "mend check-gpu " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["check-gpu"] else None
    sys.stdout.write(table(result) + "\n")
    if out:
        Path(out).write_text(markdown(result))
        log.info("wrote %s", out)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    failed = [c for c in result["checks"] if not c["passed"]]
    for c in failed:
        log.error("check failed: %s (%s)", c["name"], c["detail"])
    return 1 if failed else 0
