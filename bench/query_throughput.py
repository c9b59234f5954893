"""Figure 2: /query throughput over real HTTP, micro-batching on vs max batch 1.

Two real `mend serve` (uvicorn) processes on 127.0.0.1, identical but for MEND_MAX_BATCH_SIZE (the
shipped default vs 1), both up for the whole figure; rounds alternate between them (A, B, B, A ...).
A round is 16 concurrent async httpx clients, each sending its requests one after another (one short
prompt, 8 new tokens); throughput = requests / round wall time. Every round is bounded in count and
time.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from bench.common import BenchContext, Figure, ServeProcess, Verdict, pct, ratio, rotate

NAME = "query_throughput"
TITLE = "2. Query throughput over HTTP: micro-batching vs batch size 1"


async def _round(base: str, prompts: list[str], clients: int, per_client: int, new_tokens: int,
                 timeout_s: float) -> tuple[float, list[float]]:
    import httpx

    latencies: list[float] = []

    async def client(c: int, http: httpx.AsyncClient) -> None:
        for j in range(per_client):
            body = {"prompts": [prompts[(c * per_client + j) % len(prompts)]], "max_new_tokens": new_tokens}
            t0 = time.perf_counter()
            r = await http.post(f"{base}/query", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client(c, http) for c in range(clients))), timeout_s)
        wall = time.perf_counter() - t0
    return wall, latencies


def run(ctx: BenchContext) -> Figure:
    from service.settings import Settings

    fig = Figure(NAME, TITLE)
    s = ctx.sizes
    prompts = [r.prompt for r in ctx.edit_requests(64)]
    default_batch = Settings.model_fields["max_batch_size"].default
    default_wait = Settings.model_fields["max_wait_ms"].default
    sides = {f"micro-batching (max_batch_size {default_batch}, max_wait_ms {default_wait:g})": {},
             "max_batch_size 1": {"max_batch_size": 1}}
    procs = {}
    try:
        for name, settings in sides.items():
            procs[name] = ServeProcess(ctx, f"bench-query-{uuid.uuid4().hex[:6]}", **settings)
        for p in procs.values():
            p.wait_ready()
        names = list(procs)
        for name in names:  # warm-up round, untimed
            asyncio.run(_round(procs[name].base, prompts, s.query_clients, 1, s.query_new_tokens, 600))
        walls: dict[str, list[float]] = {n: [] for n in names}
        thr: dict[str, list[float]] = {n: [] for n in names}
        lat: dict[str, list[float]] = {n: [] for n in names}
        started = time.monotonic()
        for k in range(s.query_pairs):
            if k and time.monotonic() - started > s.deadline_s:
                fig.notes.append(f"stopped after {k} round pairs at the {s.deadline_s:.0f} s deadline")
                break
            for name in rotate(names, k):
                wall, ls = asyncio.run(_round(procs[name].base, prompts, s.query_clients, s.query_per_client,
                                              s.query_new_tokens, 600))
                walls[name].append(wall)
                thr[name].append(len(ls) / wall)
                lat[name] += ls
    finally:
        for p in procs.values():
            p.stop()
    for name in names:
        fig.rows.append({"server": name, "rounds": len(thr[name]), "requests": len(lat[name]),
                         "throughput req/s (p50 of rounds)": round(pct(thr[name], 50), 2),
                         "latency p50_ms": round(pct(lat[name], 50) * 1000, 1),
                         "latency p99_ms": round(pct(lat[name], 99) * 1000, 1)})
    a, b = names
    r = ratio(pct(thr[a], 50), pct(thr[b], 50))
    pair = [x / y for x, y in zip(thr[a], thr[b], strict=False)]
    fig.ratios = {"throughput batched / batch 1 (p50 of rounds)": r,
                  "per-round-pair ratios": ", ".join(f"{x:.2f}" for x in pair)}
    fig.verdicts.append(Verdict("micro-batching >= 3x the throughput of batch size 1", f"{r:.2f}x", r >= 3.0,
                                "" if r >= 3.0 else f"short by {3.0 / r:.2f}x"))
    fig.notes.append(f"{s.query_clients} concurrent clients x {s.query_per_client} sequential requests per round, "
                     f"1 CounterFact prompt per request, max_new_tokens {s.query_new_tokens}, greedy; both servers "
                     f"MEND_TORCH_THREADS={ctx.torch_threads}; uvicorn, one worker process each")
    return fig
