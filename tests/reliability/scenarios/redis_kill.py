"""Scenario 2: SIGKILL redis-server mid-stream and restart it from its AOF (appendfsync always).

Two edit clients and one query client run throughout. While Redis is down: /edit and /rollback
answer 503 fast and apply nothing (version and sha256 unchanged), /query keeps answering 200. Redis
comes back on the same port from its AOF: no acknowledged edit is lost, and writes resume by
themselves (no service restart), also after an outage longer than the writer lock's ttl (the lock
has expired and is taken again only if the journal did not move meanwhile).

    python tests/reliability/scenarios/redis_kill.py          # CI size: 2 outages (one > lock ttl)
    python tests/reliability/scenarios/redis_kill.py --full   # 10 outages
"""

from __future__ import annotations

import random
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import httpx  # noqa: E402
from harness import (  # noqa: E402
    RedisProc,
    ServiceProc,
    edit_body,
    journal_problems,
    percentiles,
    scenario_main,
    tiny_model_dir,
)

CI = {"outages": 2, "time_limit_s": 120}
FULL = {"outages": 10, "time_limit_s": 600}
LOCK_TTL_MS = 2000
FAST_S = 1.0  # "503 fast": well under one edit's compute time on a real model


def run(outages: int, time_limit_s: float = 300, workdir: Path | None = None, seed: int = 0) -> dict:
    rng = random.Random(seed)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mend-redis-kill-"))
    model_dir = tiny_model_dir(workdir)
    red = RedisProc(workdir / "redis").start()
    prefix = f"rk-{uuid.uuid4().hex[:6]}"
    svc = ServiceProc(workdir, model_dir, red.url, prefix, lock_ttl_ms=LOCK_TTL_MS)
    problems: list[str] = []
    acked: dict[str, dict] = {}
    lock = threading.Lock()
    stop = threading.Event()
    redis_up = threading.Event()
    down_edit_503: list[float] = []
    down_rollback_503: list[float] = []
    down_query_ok: list[float] = []
    writes_503 = 0
    resume_s: list[float] = []
    last_success = [0.0]
    started = time.monotonic()
    deadline = started + time_limit_s

    def editor(cid: int) -> None:
        nonlocal writes_503
        http = httpx.Client(base_url=svc.base, timeout=60)
        n = 0
        while not stop.is_set() and time.monotonic() < deadline:
            key = f"e{cid}-{n}-{uuid.uuid4().hex[:6]}"
            while not stop.is_set() and time.monotonic() < deadline:
                r = http.post("/edit", json=edit_body(cid * 1000 + n, key))
                if r.status_code == 200:
                    with lock:
                        acked[r.json()["edit_id"]] = r.json()
                        last_success[0] = time.monotonic()
                    break
                if r.status_code == 503:
                    with lock:
                        writes_503 += 1
                    time.sleep(0.1)
                    continue  # same key: it either landed (and is returned) or is applied now
                with lock:
                    problems.append(f"editor {cid}: {r.status_code} {r.text[:200]}")
                break
            n += 1
        http.close()

    def reader() -> None:
        http = httpx.Client(base_url=svc.base, timeout=60)
        while not stop.is_set() and time.monotonic() < deadline:
            t0 = time.perf_counter()
            r = http.post("/query", json={"prompts": ["The capital of Norway is"], "max_new_tokens": 2})
            if r.status_code != 200:
                with lock:
                    problems.append(f"query: {r.status_code} {r.text[:200]}")
            elif not redis_up.is_set():
                down_query_ok.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.02)
        http.close()

    def probe_while_down(http: httpx.Client, before: dict, some_edit: str | None) -> None:
        for path, body, sink in (("/edit", edit_body(7, f"down-{uuid.uuid4().hex[:6]}"), down_edit_503),
                                 ("/rollback", {"edit_id": some_edit or "unknown"}, down_rollback_503)):
            t0 = time.perf_counter()
            r = http.post(path, json=body)
            elapsed = time.perf_counter() - t0
            sink.append(elapsed * 1000)
            if r.status_code != 503 or elapsed > FAST_S:
                problems.append(f"{path} while redis is down: {r.status_code} in {elapsed:.2f}s {r.text[:200]}")
        now = http.get("/health/ready").json()
        if (now["version"], now["sha256"]) != (before["version"], before["sha256"]):
            problems.append(f"weights changed while redis was down: {before['version']} -> {now['version']}")

    threads = [threading.Thread(target=editor, args=(c,), daemon=True) for c in range(2)]
    threads.append(threading.Thread(target=reader, daemon=True))
    http = httpx.Client(base_url=svc.base, timeout=60)
    k = 0
    try:
        svc.start()
        svc.wait_ready()
        redis_up.set()
        for t in threads:
            t.start()
        while k < outages and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.5, 2.0))
            red.kill()
            redis_up.clear()
            k += 1
            time.sleep(0.3)  # let an edit cut mid-write fail and revert
            before = http.get("/health/ready").json()
            with lock:
                some_edit = next(iter(acked), None)
            # odd outages outlast the writer lock's ttl: it expires while Redis is down
            down_s = LOCK_TTL_MS / 1000 * 1.5 if k % 2 == 0 else rng.uniform(0.3, 1.0)
            t_down = time.monotonic()
            while time.monotonic() - t_down < down_s:
                probe_while_down(http, before, some_edit)
                time.sleep(0.2)
            red.start()
            back = time.monotonic()
            redis_up.set()
            while last_success[0] < back and time.monotonic() < deadline:
                time.sleep(0.05)
            resume_s.append((last_success[0] - back) * 1000)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=70)
        ready = http.get("/health/ready").json()
        found, state = journal_problems(red.client(), prefix, ready["fingerprint"])
        problems.extend(found)
        for eid, out in acked.items():
            rec = state["records"].get(eid)
            if rec is None or rec["version"] != out["version"]:
                problems.append(f"acknowledged edit {eid} (version {out['version']}) lost or moved: {rec and rec['version']}")
        head = state["head"]
        if (ready["version"], ready["sha256"]) != (head.version, head.sha256):
            problems.append(f"service {ready['version']}/{ready['sha256']} != journal head {head}")
        if k < outages:
            problems.append(f"time limit: {k}/{outages} outages")
    finally:
        stop.set()
        http.close()
        svc.stop()
        red.stop()
    return {
        "outages": k, "acknowledged_edits": len(acked), "final_version": state["head"].version if k else None,
        "edit_503_while_down": percentiles(down_edit_503), "rollback_503_while_down": percentiles(down_rollback_503),
        "queries_served_while_down": percentiles(down_query_ok), "client_writes_refused_503": writes_503,
        "first_edit_after_redis_back": percentiles(resume_s), "lock_ttl_ms": LOCK_TTL_MS,
        "problems": problems, "wall_s": round(time.monotonic() - started, 1), "workdir": str(workdir),
    }


def main() -> int:
    return scenario_main("redis SIGKILL + AOF restart", run, __doc__, CI, FULL, full_help="issue-size run (10 outages)", seeded=True)


if __name__ == "__main__":
    sys.exit(main())
