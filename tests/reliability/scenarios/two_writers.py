"""Scenario 7: two service processes on the same Redis namespace (same model, same prefix).

A starts and takes the writer lock; B starts and waits as a standby (503 on everything but
/health/live, with a message naming the lock). Then, per round, the holder is either SIGKILLed (its
lock expires) or SIGSTOPped (frozen past its lock's ttl, then SIGCONTed: a "zombie" writer). The
standby takes over, replays the journal to the holder's last acknowledged version and edits; the
zombie, once resumed, refuses edits (503 writer_unavailable) and writes nothing. At every step at
most one process accepts edits, and the journal never forks.

    python tests/reliability/scenarios/two_writers.py          # CI size: 1 kill + 1 freeze
    python tests/reliability/scenarios/two_writers.py --full   # 3 kills + 3 freezes
"""

from __future__ import annotations

import signal
import sys
import tempfile
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

CI = {"rounds": ["kill", "freeze"]}
FULL = {"rounds": ["kill", "freeze"] * 3}
LOCK_TTL_MS = 2000


def run(rounds: list[str], workdir: Path | None = None) -> dict:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mend-two-writers-"))
    model_dir = tiny_model_dir(workdir)
    red = RedisProc(workdir / "redis").start()
    prefix = f"tw-{uuid.uuid4().hex[:6]}"
    problems: list[str] = []
    takeover_s: list[float] = []
    acked: dict[str, int] = {}
    refusals: dict[str, int] = {}
    names = iter(f"svc{i}" for i in range(100))
    procs: list[ServiceProc] = []

    def new_proc() -> ServiceProc:
        p = ServiceProc(workdir, model_dir, red.url, prefix, name=next(names), lock_ttl_ms=LOCK_TTL_MS,
                        lock_wait_s=300)
        procs.append(p.start())
        return p

    def try_edit(p: ServiceProc, i: int, timeout: float = 60) -> httpx.Response | None:
        try:
            return httpx.post(f"{p.base}/edit", json=edit_body(i, f"{p.name}-{i}-{uuid.uuid4().hex[:4]}"),
                              timeout=timeout)
        except httpx.TransportError:
            return None

    def edit_ok(p: ServiceProc, i: int) -> None:
        r = try_edit(p, i)
        if r is None or r.status_code != 200:
            problems.append(f"{p.name} (holder) edit failed: {r and r.status_code} {r and r.text[:200]}")
        else:
            acked[r.json()["edit_id"]] = r.json()["version"]

    def refused(p: ServiceProc, i: int, why: str) -> None:
        r = try_edit(p, i, timeout=10)
        if r is None or r.status_code != 503:
            problems.append(f"{p.name} ({why}) accepted or failed oddly: {r and r.status_code} {r and r.text[:200]}")
        else:
            code = r.json().get("code")
            refusals[code] = refusals.get(code, 0) + 1
            if "lock" not in r.json().get("detail", ""):
                problems.append(f"{p.name} ({why}) refusal does not say why: {r.text[:200]}")

    try:
        holder = new_proc()
        holder.wait_ready()
        standby = new_proc()
        time.sleep(1.0)
        n = 0
        for r, kind in enumerate(rounds):
            # the standby is up but waits for the lock: it must refuse edits, with the reason
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    status, body = standby.ready_body()
                    if body.get("status") == "locking":
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            refused(standby, n, "standby")
            for _ in range(3):
                edit_ok(holder, n)
                n += 1
            last_version = max(acked.values())
            t0 = time.monotonic()
            if kind == "kill":
                holder.kill()
            else:
                holder.signal(signal.SIGSTOP)
            ready = standby.wait_ready(timeout_s=120)
            takeover_s.append((time.monotonic() - t0) * 1000)
            if ready["version"] != last_version:
                problems.append(f"{standby.name} took over at version {ready['version']}, last ack {last_version}")
            edit_ok(standby, n)
            n += 1
            if kind == "freeze":
                holder.signal(signal.SIGCONT)  # the zombie wakes up believing it is the writer
                time.sleep(0.5)
                refused(holder, n, "deposed zombie")
                q = httpx.post(f"{holder.base}/query", json={"prompts": ["hi"], "max_new_tokens": 1}, timeout=30)
                if q.status_code != 200 or q.json()["version"] != last_version:
                    problems.append(f"deposed {holder.name} query: {q.status_code} {q.text[:200]}")
                holder.kill()
            # the new holder keeps going; a fresh process becomes the next standby
            holder, standby = standby, (new_proc() if r + 1 < len(rounds) else None)
        ready = holder.ready_body()[1]
        found, state = journal_problems(red.client(), prefix, ready["fingerprint"])
        problems.extend(found)
        for eid, version in acked.items():
            rec = state["records"].get(eid)
            if rec is None or rec["version"] != version:
                problems.append(f"acknowledged edit {eid}@{version} lost or moved")
        if (ready["version"], ready["sha256"]) != (state["head"].version, state["head"].sha256):
            problems.append(f"holder at {ready['version']}, journal head {state['head']}")
        writers = {rec["author"] for rec in state["records"].values()}
        final_version = state["head"].version
    finally:
        for p in procs:
            p.signal(signal.SIGCONT)
            p.stop(timeout_s=30)
        red.stop()
    return {"rounds": rounds, "processes": len(procs), "acknowledged_edits": len(acked),
            "final_version": final_version, "takeover_after_holder_loss": percentiles(takeover_s),
            "lock_ttl_ms": LOCK_TTL_MS, "refusals_by_code": refusals, "journal_authors": sorted(writers),
            "problems": problems, "workdir": str(workdir)}


def main() -> int:
    return scenario_main("two writers on one namespace", run, __doc__, CI, FULL, full_help="3 kills + 3 freezes")


if __name__ == "__main__":
    sys.exit(main())
