"""Scenario 1: SIGKILL the service at random moments while 4 clients stream edits (and rollbacks).

After every restart: every acknowledged edit is in the journal and active (acknowledged rollbacks are
rolled back), nothing is half-written, the service's targets sha256 equals the journal head's, and an
independent offline replay of the journal gives the same sha256.

    python tests/reliability/scenarios/crash.py            # CI size: 3 kills, >= 20 edits
    python tests/reliability/scenarios/crash.py --full     # 20 kills, >= 200 edits
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
    load_stack,
    percentiles,
    replay_to,
    scenario_main,
    tiny_model_dir,
)

CI = {"kills": 3, "edits": 20, "clients": 4, "time_limit_s": 150}
FULL = {"kills": 20, "edits": 200, "clients": 4, "time_limit_s": 900}


def run(kills: int, edits: int, clients: int = 4, time_limit_s: float = 300, workdir: Path | None = None,
        seed: int = 0) -> dict:
    """Run the scenario; returns figures (``problems`` lists every violated invariant)."""
    rng = random.Random(seed)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mend-crash-"))
    model_dir = tiny_model_dir(workdir)
    red = RedisProc(workdir / "redis").start()
    prefix = f"crash-{uuid.uuid4().hex[:6]}"
    svc = ServiceProc(workdir, model_dir, red.url, prefix)
    problems: list[str] = []
    acked: dict[str, dict] = {}  # edit_id -> response
    acked_rollbacks: set[str] = set()
    # rollbacks posted and not yet answered: one cut by a kill may have landed before it (its outcome is
    # unknown to the client until the retry), so a check in between may find the edit rolled back
    sent_rollbacks: set[str] = set()
    edit_lat: list[float] = []
    unknown_outcomes = 0  # requests cut by a kill (retried with the same idempotency key)
    lock = threading.Lock()
    gate = threading.Event()  # set while the service is up and checked
    stop = threading.Event()
    in_flight = [0]
    started = time.monotonic()
    deadline = started + time_limit_s

    def client_loop(cid: int) -> None:
        nonlocal unknown_outcomes
        http = httpx.Client(base_url=svc.base, timeout=120)
        n = 0
        mine: list[str] = []
        while not stop.is_set() and time.monotonic() < deadline:
            rollback = cid == 0 and n % 4 == 3 and mine
            target_id = mine.pop(0) if rollback else None
            key = f"c{cid}-{n}-{uuid.uuid4().hex[:6]}"
            body = {"edit_id": target_id} if rollback else edit_body(cid * 1000 + n, key)
            path = "/rollback" if rollback else "/edit"
            while not stop.is_set() and time.monotonic() < deadline:
                gate.wait(1.0)
                if not gate.is_set():
                    continue
                t0 = time.perf_counter()
                with lock:
                    in_flight[0] += 1
                    if rollback:
                        sent_rollbacks.add(target_id)
                try:
                    r = http.post(path, json=body)
                except httpx.TransportError:
                    with lock:
                        unknown_outcomes += 1
                    time.sleep(0.05)
                    continue  # outcome unknown: retry (same idempotency key) once the service is back
                finally:
                    with lock:
                        in_flight[0] -= 1
                if r.status_code == 503:  # restarting: not ready yet
                    time.sleep(0.1)
                    continue
                with lock:
                    if r.status_code == 200 and not rollback:
                        out = r.json()
                        acked[out["edit_id"]] = out
                        edit_lat.append((time.perf_counter() - t0) * 1000)
                        mine.append(out["edit_id"])
                    elif r.status_code in (200, 409) and rollback:  # 409: the cut attempt had landed
                        acked_rollbacks.add(target_id)
                    else:
                        problems.append(f"client {cid}: {path} -> {r.status_code} {r.text[:200]}")
                break
            n += 1
        http.close()

    def check(label: str) -> None:
        status, ready = svc.ready_body()
        client = red.client()
        found, state = journal_problems(client, prefix, ready["fingerprint"])
        found = [f"{label}: {p}" for p in found]
        head = state["head"]
        with lock:
            acked_now, rolled_now, sent_now = dict(acked), set(acked_rollbacks), set(sent_rollbacks)
        for eid, out in acked_now.items():
            rec = state["records"].get(eid)
            if rec is None:
                found.append(f"{label}: acknowledged edit {eid} missing")
            elif rec["version"] != out["version"]:
                found.append(f"{label}: edit {eid} acknowledged at version {out['version']}, journal {rec['version']}")
            elif eid in rolled_now and rec["status"] != "rolled_back":
                found.append(f"{label}: edit {eid} status {rec['status']} although its rollback was acknowledged")
            elif rec["status"] == "rolled_back" and eid not in sent_now:
                found.append(f"{label}: edit {eid} rolled back although no rollback of it was sent")
        if ready["version"] != head.version or ready["sha256"] != (head.sha256 or ready["sha256"]):
            found.append(f"{label}: service at version {ready['version']} sha {ready['sha256']}, head {head}")
        if ready["active_edits"] != len(state["active"]):
            found.append(f"{label}: service has {ready['active_edits']} active edits, journal {len(state['active'])}")
        offline = replay_to(stack, client, prefix, state["ops"], head.version)
        if head.sha256 is not None and offline != head.sha256:
            found.append(f"{label}: offline replay sha {offline[:12]} != head {head.sha256[:12]}")
        client.close()
        problems.extend(found)
        checks.append({"label": label, "version": head.version, "edits": len(state["records"]),
                       "active": len(state["active"])})

    checks: list[dict] = []
    restart_s: list[float] = []
    kills_in_flight = 0
    _, _, stack = load_stack(model_dir)
    threads = [threading.Thread(target=client_loop, args=(c,), daemon=True) for c in range(clients)]
    try:
        svc.start()
        svc.wait_ready()
        gate.set()
        for t in threads:
            t.start()
        k = 0
        while time.monotonic() < deadline:
            with lock:
                n_acked = len(acked)
            if k >= kills and n_acked >= edits:
                break
            if k < kills:
                # a random moment: spread the kills so that the edits are spread between them
                time.sleep(rng.uniform(0.3, 1.2) + 0.3 * max(0, edits - n_acked) / max(1, kills - k))
                with lock:
                    during = in_flight[0] > 0
                svc.kill()
                gate.clear()
                kills_in_flight += during
                k += 1
                t0 = time.monotonic()
                svc.start()
                svc.wait_ready()
                restart_s.append(time.monotonic() - t0)
                check(f"after kill {k}")
                gate.set()
            else:
                time.sleep(0.2)
        stop.set()
        gate.set()
        for t in threads:
            t.join(timeout=130)
        check("final")
        if k < kills or len(acked) < edits:
            problems.append(f"time limit: {k}/{kills} kills, {len(acked)}/{edits} edits")
    finally:
        stop.set()
        gate.set()
        rc = svc.stop()
        red.stop()
    return {
        "kills": k, "kills_with_a_request_in_flight": kills_in_flight, "acknowledged_edits": len(acked),
        "acknowledged_rollbacks": len(acked_rollbacks), "requests_cut_by_a_kill": unknown_outcomes,
        "restart_to_ready_s": percentiles([s * 1000 for s in restart_s]) | {"unit": "ms"},
        "edit_latency": percentiles(edit_lat), "final_version": checks[-1]["version"] if checks else None,
        "checks": len(checks), "problems": problems, "wall_s": round(time.monotonic() - started, 1),
        "graceful_stop_rc": rc, "workdir": str(workdir),
    }


def main() -> int:
    return scenario_main("crash (service SIGKILL)", run, __doc__, CI, FULL, full_help="issue-size run (20 kills, 200 edits)", seeded=True)


if __name__ == "__main__":
    sys.exit(main())
