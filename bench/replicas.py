"""Figure 8: query replicas (issue 14): propagation, query throughput, catch-up.

Three real `mend serve` processes on one redis-server: a writer (MEND_ROLE=writer) and two replicas
(MEND_ROLE=replica), canary guard off (propagation does not depend on it; the tiny smoke-test model's
canaries flip on any edit).

- Propagation: the writer makes an edit then rolls it back (so the model stays the base one, however
  many edits); for every acknowledged op the replicas' /health/ready is polled (every 5 ms) until it
  reports that version: ack -> visible. First with one replica following (the second SIGSTOPped,
  using no CPU), then with both. Target: p99 < one edit's EditStack.apply + 100 ms (apply measured in
  this process on the same deltas).
- Query throughput: the same concurrent clients against the writer alone and against the two
  replicas (round-robin, as the proxy does), rounds alternating.
- Catch-up: the writer is stopped, a replica SIGSTOPped, N ops appended to the journal through the
  real path (EditStack.apply, sha256, Journal.append_edit under the writer lock, as `journal_with`;
  the deltas are the propagation runs' real ones with 5% noise),
  the replica SIGCONTed: time until it serves the head (each op applied and sha256-checked).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
import uuid

from bench.common import (
    BenchContext,
    Figure,
    ServeProcess,
    Verdict,
    edit_record,
    pct,
    ratio,
    rotate,
)

NAME = "replicas"
TITLE = "8. Replicas: propagation, query throughput, catch-up"
POLL_S = 0.005


def _version(http, base: str) -> int:
    r = http.get(f"{base}/health/ready")
    return int(r.json().get("version", -1)) if r.status_code in (200, 503) else -1


def _wait_visible(http, followers: list[ServeProcess], version: int, acked: float, out: list[float]) -> None:
    for p in followers:
        while _version(http, p.base) < version:
            time.sleep(POLL_S)
            if time.perf_counter() - acked > 120:
                raise TimeoutError(f"replica {p.base} did not reach version {version}")
        out.append((time.perf_counter() - acked) * 1000)


def _propagation(http, mend, followers: list[ServeProcess], facts: list[dict], pairs: int, method: str,
                 deadline: float) -> list[float]:
    """ack -> visible (ms) of every op (an edit, then its rollback) on every following replica."""
    out: list[float] = []
    for i in range(pairs):
        if time.monotonic() > deadline:
            break
        done = mend.edit([facts[i % len(facts)]], method=method)
        _wait_visible(http, followers, done.version, time.perf_counter(), out)
        back = mend.rollback(done.edit_id)
        _wait_visible(http, followers, back.version, time.perf_counter(), out)
    return out


async def _round(bases: list[str], prompts: list[str], clients: int, per_client: int, new_tokens: int) -> tuple:
    import httpx

    latencies: list[float] = []

    async def client(c: int, http: httpx.AsyncClient) -> None:
        for j in range(per_client):
            k = c * per_client + j
            t0 = time.perf_counter()
            r = await http.post(f"{bases[k % len(bases)]}/query",
                                json={"prompts": [prompts[k % len(prompts)]], "max_new_tokens": new_tokens})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        return time.perf_counter() - t0, latencies


def _journal_deltas(journal, stack):
    """Endless realistic deltas: the real ones the propagation runs journaled (the service's method on
    this model), each replayed with 5% gaussian noise on both factors (same targets, ranks, sizes)."""
    import torch

    from editor_core.delta import EditDelta, LowRankUpdate

    ids = [o["edit_id"] for o in journal.ops() if o["op"] == "edit"]
    blobs = [b for b in journal.client.mget([journal.key("delta", i) for i in ids]) if b is not None]
    real = [EditDelta.from_bytes(b, stack.fingerprint, stack.shapes) for b in blobs]
    if not real:
        raise RuntimeError("no journaled edit to base the appended ops on")
    gen = torch.Generator().manual_seed(0)
    for i in itertools.count():
        base = real[i % len(real)]
        ups = {name: LowRankUpdate(u.u + 0.05 * u.u.std() * torch.randn(u.u.shape, generator=gen),
                                   u.v + 0.05 * u.v.std() * torch.randn(u.v.shape, generator=gen))
               for name, u in base.updates.items()}
        yield EditDelta(ups, stack.fingerprint, dict(base.meta, synthetic="true"))


def _synthesize(ctx: BenchContext, prefix: str, fingerprint: str, n: int, apply_ms: list[float],
                sha_ms: list[float]) -> int:
    """Append ``n`` edit ops after the journal head through the real path; returns the new head."""
    from editor_core.delta import EditDelta
    from editor_core.stack import EditStack
    from service.journal import Journal
    from service.methods import service_stack_targets
    from service.settings import Settings
    from service.writer_lock import WriterLock

    stack = ctx.cache.get("replicas:stack")
    if stack is None:
        stack = EditStack(ctx.lm().model, service_stack_targets(ctx.lm().model, Settings(model=ctx.model_spec)))
        ctx.cache["replicas:stack"] = stack
    if stack.fingerprint != fingerprint:
        raise RuntimeError(f"the benchmark's stack fingerprint {stack.fingerprint[:12]} differs from the "
                           f"service's {fingerprint[:12]}: targets do not match")
    journal = Journal(ctx.client(), fingerprint, prefix)
    lock = WriterLock(ctx.client(), journal.lock_key, 60000)
    lock.acquire(wait_s=30)
    lock.start_heartbeat()
    try:
        deltas = ctx.cache.get("replicas:deltas") or _journal_deltas(journal, stack)
        ctx.cache["replicas:deltas"] = deltas
        plan = journal.replay_plan()
        stack.rebuild([(i, EditDelta.from_bytes(b, fingerprint, stack.shapes)) for i, b in plan.active])
        assert stack.sha256() == plan.head.sha256 or plan.head.sha256 is None
        version = plan.head.version
        for _ in range(n):
            delta = next(deltas)
            edit_id = uuid.uuid4().hex
            t0 = time.perf_counter()
            stack.apply(edit_id, delta)
            apply_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            sha = stack.sha256()
            sha_ms.append((time.perf_counter() - t0) * 1000)
            blob = delta.to_bytes()
            version += 1
            journal.append_edit(edit_record(edit_id, version, sha, blob, delta, "bench", "x"), blob, lock)
    finally:
        stack.reset()
        lock.release()
    return version


def _redis_cost(ctx: BenchContext, prefix: str, fingerprint: str) -> dict:
    """Commands/s Redis serves while nothing is edited, and the mean delta blob size of the journal."""
    from service.journal import Journal

    client = ctx.client()
    idle_s = min(10.0, ctx.sizes.deadline_s / 60)
    before = int(client.info("stats")["total_commands_processed"])
    time.sleep(idle_s)
    after = int(client.info("stats")["total_commands_processed"])
    journal = Journal(client, fingerprint, prefix)
    sizes = [client.strlen(journal.key("delta", o["edit_id"])) for o in journal.ops() if o["op"] == "edit"]
    return {"idle_cmds_per_s": (after - before - 2) / idle_s, "idle_s": idle_s,
            "blob_bytes": sum(sizes) / max(1, len(sizes))}


def run(ctx: BenchContext) -> Figure:
    import httpx

    from service.client import MendClient

    fig = Figure(NAME, TITLE)
    s = ctx.sizes
    facts = [{"prompt": r.prompt, "target": r.target} for r in ctx.edit_requests(max(8, s.journal_edits))]
    prompts = [r.prompt for r in ctx.edit_requests(64)]
    prefix = f"bench-replicas-{uuid.uuid4().hex[:6]}"
    common = {"canary_guard": "false", "lock_ttl_ms": 5000}
    deadline = time.monotonic() + s.deadline_s
    writer = ServeProcess(ctx, prefix, role="writer", **common)
    procs = [writer]
    apply_ms: list[float] = []
    sha_ms: list[float] = []
    try:
        writer.wait_ready()
        replicas = [ServeProcess(ctx, prefix, role="replica", **common) for _ in range(2)]
        procs += replicas
        for p in replicas:
            p.wait_ready()
        methods = writer.ready_body.get("methods", [])
        method = "mend" if "mend" in methods else writer.ready_body.get("default_method")
        samples: dict[int, list[float]] = {}
        with httpx.Client(timeout=30) as http, MendClient(writer.base, timeout_s=600) as mend:
            mend.edit([facts[0]], method=method)  # warm-up, unmeasured
            replicas[1].proc.send_signal(signal.SIGSTOP)
            try:
                samples[1] = _propagation(http, mend, replicas[:1], facts, s.journal_edits, method, deadline)
            finally:
                replicas[1].proc.send_signal(signal.SIGCONT)
            samples[2] = _propagation(http, mend, replicas, facts, s.journal_edits, method, deadline)
        redis_cost = _redis_cost(ctx, prefix, writer.ready_body["fingerprint"])
        memory = {"writer": writer.memory_kb(), "replica": replicas[0].memory_kb()}
        for n, v in samples.items():
            fig.rows.append({"measure": f"propagation ack -> visible, {n} replica{'s' * (n > 1)} following",
                             "n": len(v), "p50_ms": round(pct(v, 50), 1), "p99_ms": round(pct(v, 99), 1),
                             "max_ms": round(max(v), 1)})
        # query throughput: writer alone vs the two replicas, same clients, alternating rounds
        sides = {"writer alone": [writer.base], "2 replicas (round-robin)": [p.base for p in replicas]}
        for bases in sides.values():
            asyncio.run(_round(bases, prompts, s.query_clients, 1, s.query_new_tokens))  # warm-up
        thr: dict[str, list[float]] = {k: [] for k in sides}
        lat: dict[str, list[float]] = {k: [] for k in sides}
        for k in range(s.query_pairs):
            for name in rotate(list(sides), k):
                wall, ls = asyncio.run(_round(sides[name], prompts, s.query_clients, s.query_per_client,
                                              s.query_new_tokens))
                thr[name].append(len(ls) / wall)
                lat[name] += ls
        for name in sides:
            fig.rows.append({"measure": f"query throughput, {name}", "n": len(lat[name]),
                             "p50_ms": round(pct(lat[name], 50) * 1000, 1),
                             "p99_ms": round(pct(lat[name], 99) * 1000, 1),
                             "req/s (p50 of rounds)": round(pct(thr[name], 50), 2)})
        # catch-up after missing N ops
        fingerprint = writer.ready_body["fingerprint"]
        writer.stop()
        replicas[1].stop()
        follower = replicas[0]
        catch_up: dict[int, float] = {}
        for n in s.rollback_counts[1:]:
            follower.proc.send_signal(signal.SIGSTOP)
            try:
                head = _synthesize(ctx, prefix, fingerprint, n, apply_ms, sha_ms)
            finally:
                follower.proc.send_signal(signal.SIGCONT)
            t0 = time.perf_counter()
            with httpx.Client(timeout=30) as http:
                while _version(http, follower.base) < head:
                    time.sleep(0.02)
                    if time.perf_counter() - t0 > 1800:
                        raise TimeoutError(f"replica did not catch up {n} ops within 1800 s")
            catch_up[n] = time.perf_counter() - t0
            fig.rows.append({"measure": f"catch-up after missing {n:,} ops", "n": n,
                             "catch_up_s": round(catch_up[n], 2), "ms per op": round(catch_up[n] * 1000 / n, 1)})
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGCONT)
            p.stop()
    apply_p50 = pct(apply_ms, 50)
    fig.rows.append({"measure": "EditStack.apply of one such delta (this process)", "n": len(apply_ms),
                     "p50_ms": round(apply_p50, 1), "p99_ms": round(pct(apply_ms, 99), 1)})
    fig.rows.append({"measure": "sha256 of the targets, checked after every op (this process)", "n": len(sha_ms),
                     "p50_ms": round(pct(sha_ms, 50), 1), "p99_ms": round(pct(sha_ms, 99), 1)})
    limit = apply_p50 + 100.0
    for n, v in samples.items():
        p99 = pct(v, 99)
        fig.verdicts.append(Verdict(f"propagation p99 < one edit's apply + 100 ms, {n} replica(s)",
                                    f"{p99:.0f} ms vs {limit:.0f} ms", p99 < limit,
                                    "" if p99 < limit else f"over by {p99 - limit:.0f} ms"))
    names = list(sides)
    fig.ratios = {"propagation p50 ms, 1 replica": round(pct(samples[1], 50), 1),
                  "propagation p50 ms, 2 replicas": round(pct(samples[2], 50), 1),
                  "query throughput 2 replicas / writer alone": ratio(pct(thr[names[1]], 50), pct(thr[names[0]], 50)),
                  **{f"catch-up s, {n} ops": round(v, 2) for n, v in catch_up.items()}}
    fig.notes.append(f"edits with method {method} (each followed by its rollback, so the model stays the base "
                     f"one); {s.query_clients} concurrent clients x {s.query_per_client} requests per round, "
                     f"max_new_tokens {s.query_new_tokens}; every process MEND_TORCH_THREADS={ctx.torch_threads}, "
                     "all on this machine's cores (see nproc above): a replica here competes with the writer and "
                     "the other replica for the same cores, so throughput shows the overhead of following, not "
                     "the gain; on separate machines each replica adds one more process's throughput (one model "
                     "copy in memory each)")
    for who, kb in memory.items():
        fig.rows.append({"measure": f"peak RSS of the {who} after the propagation runs (MiB)", "n": 1,
                         "MiB": round(kb.get("VmHWM", 0) / 1024)})
    fig.ratios["redis commands/s, idle, writer + 2 replicas"] = redis_cost["idle_cmds_per_s"]
    fig.ratios["mean journal bytes per edit op (delta blob)"] = redis_cost["blob_bytes"]
    fig.notes.append(f"Redis load while idle: {redis_cost['idle_cmds_per_s']:.1f} commands/s for the writer and "
                     f"both replicas together over {redis_cost['idle_s']:g} s (a replica's blocking XREAD returns at least every "
                     "second, then reads the head; an auto replica also reads the lock); per op each replica reads "
                     f"the op and its delta blob (mean {redis_cost['blob_bytes']:,.0f} bytes here)")
    fig.notes.append("visible = the replica's /health/ready reports the version (polled every 5 ms, so up to "
                     "~5 ms of each figure is the poll); a replica applies each op then checks the targets' sha256 "
                     "recorded in the journal before serving it")
    return fig
