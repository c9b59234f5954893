"""Scenario 3: 16 query clients and 2 edit clients (one also rolls back) against a real `mend serve`.

Holds when: no 5xx (and no other error) on any request; each client sees versions that never go
back; and every query's content is what the journal says that version's weights answer: for every
version seen, the journal is replayed offline to exactly that version and the same query is run on
it (candidate scores within 1e-4, same greedy completion). p50/p99 latencies are reported.

    python tests/reliability/scenarios/load.py            # CI size: 6 s
    python tests/reliability/scenarios/load.py --full     # 60 s
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import httpx  # noqa: E402
from harness import (  # noqa: E402
    FACTS,
    RedisProc,
    ServiceProc,
    edit_body,
    journal_problems,
    load_stack,
    percentiles,
    replay_versions,
    scenario_main,
    tiny_model_dir,
)

CI = {"seconds": 6, "query_clients": 16, "edit_clients": 2}
FULL = {"seconds": 60, "query_clients": 16, "edit_clients": 2}
PROMPTS = [FACTS[7]["prompt"], FACTS[0]["prompt"]]
CANDS = [FACTS[7]["target_new"], FACTS[7]["ground_truth"]]
MAX_NEW = 3
TOL = 1e-4


def run(seconds: float, query_clients: int = 16, edit_clients: int = 2, workdir: Path | None = None) -> dict:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mend-load-"))
    model_dir = tiny_model_dir(workdir)
    red = RedisProc(workdir / "redis").start()
    prefix = f"load-{uuid.uuid4().hex[:6]}"
    svc = ServiceProc(workdir, model_dir, red.url, prefix, max_batch_size=16, max_wait_ms=5)
    problems: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    q_lat: list[float] = []
    e_lat: list[float] = []
    r_lat: list[float] = []
    statuses: dict[int, int] = defaultdict(int)
    seen: dict[int, list[list[dict]]] = defaultdict(list)  # version -> results of each response

    def count(status: int) -> None:
        with lock:
            statuses[status] += 1

    def querier(cid: int) -> None:
        last = -1
        with httpx.Client(base_url=svc.base, timeout=120) as http:
            while not stop.is_set():
                t0 = time.perf_counter()
                r = http.post("/query", json={"prompts": PROMPTS, "candidates": CANDS, "max_new_tokens": MAX_NEW})
                ms = (time.perf_counter() - t0) * 1000
                count(r.status_code)
                if r.status_code != 200:
                    with lock:
                        problems.append(f"query client {cid}: {r.status_code} {r.text[:200]}")
                    continue
                out = r.json()
                with lock:
                    q_lat.append(ms)
                    if len(seen[out["version"]]) < 50:
                        seen[out["version"]].append(out["results"])
                if out["version"] < last:
                    with lock:
                        problems.append(f"query client {cid}: version went back {last} -> {out['version']}")
                last = out["version"]

    def editor(cid: int) -> None:
        n, mine = 0, []
        with httpx.Client(base_url=svc.base, timeout=120) as http:
            while not stop.is_set():
                if cid == 1 and n % 3 == 2 and mine:
                    t0 = time.perf_counter()
                    r = http.post("/rollback", json={"edit_id": mine.pop(0)})
                    sink = r_lat
                else:
                    t0 = time.perf_counter()
                    r = http.post("/edit", json=edit_body([7, 0, 3, 7][n % 4] if cid == 0 else n, f"l{cid}-{n}"))
                    sink = e_lat
                    if r.status_code == 200:
                        mine.append(r.json()["edit_id"])
                count(r.status_code)
                with lock:
                    if r.status_code == 200:
                        sink.append((time.perf_counter() - t0) * 1000)
                    else:
                        problems.append(f"edit client {cid}: {r.status_code} {r.text[:200]}")
                n += 1

    threads = [threading.Thread(target=querier, args=(i,), daemon=True) for i in range(query_clients)]
    threads += [threading.Thread(target=editor, args=(i,), daemon=True) for i in range(edit_clients)]
    try:
        svc.start()
        ready = svc.wait_ready()
        t_start = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join(timeout=130)
        elapsed = time.monotonic() - t_start
        client = red.client()
        found, state = journal_problems(client, prefix, ready["fingerprint"])
        problems.extend(found)
    finally:
        stop.set()
        svc.stop()
    # offline: every version seen, rebuilt from the journal alone, must answer what the service said
    from service.inference import QueryJob, run_queries

    model, tok, stack = load_stack(model_dir)
    compared = 0
    for version in replay_versions(stack, client, prefix, state["ops"], seen):
        want = run_queries(model, tok, [QueryJob(PROMPTS, MAX_NEW, CANDS)])[0]
        for results in seen[version]:
            compared += 1
            for res, ref in zip(results, want, strict=True):
                if res["completion"] != ref["completion"]:
                    problems.append(f"version {version}: completion {res['completion']!r} != replayed "
                                    f"{ref['completion']!r}")
                for cand in CANDS:
                    if abs(res["candidates"][cand] - ref["candidates"][cand]) > TOL:
                        problems.append(f"version {version}: score of {cand!r} {res['candidates'][cand]} != "
                                        f"replayed {ref['candidates'][cand]}")
    red.stop()
    fives = sum(v for k, v in statuses.items() if k >= 500)
    return {
        "seconds": round(elapsed, 1), "query_clients": query_clients, "edit_clients": edit_clients,
        "statuses": dict(statuses), "5xx": fives, "queries_per_s": round(len(q_lat) / elapsed, 1),
        "query_latency": percentiles(q_lat), "edit_latency": percentiles(e_lat),
        "rollback_latency": percentiles(r_lat), "versions_seen": len(seen), "final_version": state["head"].version,
        "responses_checked_against_offline_replay": compared, "problems": problems[:50],
        "problem_count": len(problems), "workdir": str(workdir),
    }


def main() -> int:
    return scenario_main("load: 16 query + 2 edit clients", run, __doc__, CI, FULL, full_help="60 s")


if __name__ == "__main__":
    sys.exit(main())
