"""Shared helpers of the reliability scenarios: real redis-server and real ``mend serve`` processes.

Not a conftest.py (a second conftest would shadow ``tests/conftest.py``). The scenario scripts under
``scenarios/`` import this module too, so it works without pytest: ``python tests/reliability/scenarios/crash.py``.
Every process listens on 127.0.0.1 only; every loop is bounded in count and time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
for _p in (str(REPO), str(TESTS / "service")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import httpx  # noqa: E402
import redis  # noqa: E402
from mend_harness import fixture_facts, make_tiny_llama, root_conftest  # noqa: E402

from service.journal import Journal  # noqa: E402
from service.redis_embedded import EmbeddedRedis, free_port  # noqa: E402

FACTS = fixture_facts()
LOOPBACK = "127.0.0.1"


# ---- model ------------------------------------------------------------------------------------------
def tiny_tokenizer():
    """The tests' offline tokenizer (trained on the fixture facts), built without pytest."""
    fixture = root_conftest.tiny_tokenizer
    return getattr(fixture, "__wrapped__", fixture)()


def tiny_model_dir(root: Path) -> Path:
    """A tiny llama + tokenizer saved as a local model directory (loads in well under a second)."""
    d = Path(root) / "tiny-llama"
    if not (d / "config.json").exists():
        tok = tiny_tokenizer()
        make_tiny_llama(len(tok)).save_pretrained(d)
        tok.save_pretrained(d)
    return d


# ---- redis ------------------------------------------------------------------------------------------
class RedisProc:
    """A real redis-server (AOF, appendfsync always) on a fixed 127.0.0.1 port, killable and restartable."""

    def __init__(self, data_dir: Path, port: int | None = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.server: EmbeddedRedis | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> RedisProc:
        self.server = EmbeddedRedis(self.data_dir, port=self.port).start()
        return self

    def kill(self) -> None:
        """SIGKILL: only what was fsynced to the AOF survives."""
        if self.server is not None:
            self.server.kill()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)


# ---- service process --------------------------------------------------------------------------------
class ServiceProc:
    """``python -m service.cli serve`` (what ``mend serve`` runs) as a child process.

    The model is a local directory; no trained MEND editor is found (MEND_EDITORS_DIR points nowhere),
    so the service edits with ``ft`` (the production FT editor, default settings).
    """

    def __init__(self, workdir: Path, model_dir: Path, redis_url: str, prefix: str, name: str = "svc",
                 **settings):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.name = name
        self.log_path = self.workdir / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEND_")}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        env.update(MEND_MODEL=str(model_dir), MEND_HOST=LOOPBACK, MEND_PORT=str(self.port),
                   MEND_REDIS_URL=redis_url, MEND_REDIS_PREFIX=prefix, MEND_TORCH_THREADS="1",
                   MEND_LOG_FORMAT="json", MEND_EDITORS_DIR=str(self.workdir / "no-editors"),
                   MEND_LOCK_TTL_MS="2000", MEND_LOCK_WAIT_S="60", MEND_DATA_DIR=str(self.workdir / "var"),
                   MEND_CANARY_GUARD="false",  # a tiny random model's canaries flip on any edit
                   # these scenarios are about one writer: with the default role auto, a process restarted
                   # while its dead predecessor's lock lives would serve as a replica (409 on edits) until then
                   MEND_ROLE="writer")
        env.update({f"MEND_{k.upper()}": (json.dumps(v) if isinstance(v, dict) else str(v))
                    for k, v in settings.items()})
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> ServiceProc:
        self.starts += 1
        out = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        out.write(f"\n--- start {self.starts} ---\n".encode())
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=self.env, cwd=REPO,
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()
        return self

    def ready_body(self) -> tuple[int, dict]:
        r = httpx.get(f"{self.base}/health/ready", timeout=5)
        return r.status_code, r.json()

    def wait_ready(self, timeout_s: float = 120.0) -> dict:
        """Block until /health/ready is 200; raise with the log tail if the process dies or fails."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, body = self.ready_body()
                if status == 200:
                    return body
                if body.get("status") == "failed":
                    raise AssertionError(f"{self.name} failed to start: {body}\n{self.log_tail()}")
            except (httpx.TransportError, json.JSONDecodeError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready within {timeout_s}s:\n{self.log_tail()}")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, as a crash (no shutdown hooks: the writer lock stays until it expires)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """Graceful SIGTERM (SIGKILL after ``timeout_s``)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 4000) -> str:
        return self.log_text()[-n:]


# ---- journal checks ---------------------------------------------------------------------------------
def edit_body(i: int, key: str | None = None, method: str = "ft") -> dict:
    fact = FACTS[i % len(FACTS)]
    body = {"requests": [{"prompt": fact["prompt"], "target": fact["target_new"]}], "method": method}
    if key is not None:
        body["idempotency_key"] = key
    return body


def journal_problems(client: redis.Redis, prefix: str, fingerprint: str) -> tuple[list[str], dict]:
    """Check the journal in Redis for anything half-written; returns (problems, summary).

    Holds when: the stream's versions are 1..head without gaps; the paging list is exactly the stream's
    edit ops in order; every edit has its record (same version) and its delta blob (matching sha256);
    every rollback op's edit is marked rolled back and no other is; each idempotency key names exactly
    the one edit that carries it.
    """
    import hashlib

    j = Journal(client, fingerprint, prefix)
    problems: list[str] = []
    ops = list(j.ops())
    head = j.head()
    versions = [int(o["version"]) for o in ops]
    if versions != list(range(1, len(ops) + 1)):
        problems.append(f"stream versions not 1..n: {versions[:5]}...")
    if head.version != len(ops):
        problems.append(f"head version {head.version} != {len(ops)} ops")
    if ops and head.sha256 != ops[-1]["sha256"]:
        problems.append("head sha256 differs from the last op's")
    edit_ops = [o["edit_id"] for o in ops if o["op"] == "edit"]
    rolled = {o["edit_id"] for o in ops if o["op"] == "rollback"}
    listed = [x.decode() for x in client.lrange(j.key("edits"), 0, -1)]
    if listed != edit_ops:
        problems.append(f"edits list ({len(listed)}) differs from the stream's edit ops ({len(edit_ops)})")
    records = {}
    for o in ops:
        if o["op"] != "edit":
            continue
        rec = j.get_edit(o["edit_id"])
        blob = client.get(j.key("delta", o["edit_id"]))
        if rec is None or blob is None:
            problems.append(f"edit {o['edit_id']} lacks its record or delta")
            continue
        records[o["edit_id"]] = rec
        if rec["version"] != int(o["version"]):
            problems.append(f"edit {o['edit_id']} record version {rec['version']} != op {o['version']}")
        if hashlib.sha256(blob).hexdigest() != rec["delta_sha256"]:
            problems.append(f"edit {o['edit_id']} delta blob does not match its sha256")
        want = "rolled_back" if o["edit_id"] in rolled else "active"
        if rec["status"] != want:
            problems.append(f"edit {o['edit_id']} status {rec['status']} but the stream says {want}")
    keys: dict[str, str] = {}
    for eid, rec in records.items():
        k = rec.get("idempotency_key")
        if k:
            if k in keys:
                problems.append(f"idempotency key {k} used by two edits")
            keys[k] = eid
            if j.edit_for_idempotency_key(k) != eid:
                problems.append(f"idem:{k} does not name edit {eid}")
    active = [e for e in edit_ops if e not in rolled]
    return problems, {"head": head, "ops": ops, "records": records, "active": active, "keys": keys}


def load_stack(model_dir: Path):
    """The tiny model as the service loads it, with its EditStack (for offline replays)."""
    import torch

    from editor_core.models import load
    from editor_core.stack import EditStack
    from editor_core.targets import resolve_targets

    torch.set_num_threads(1)  # the machine is shared; one thread is faster than two contended ones
    loaded = load(str(model_dir), device="cpu", dtype=torch.float32)
    loaded.model.eval()
    return loaded.model, loaded.tokenizer, EditStack(loaded.model, resolve_targets(loaded.model))


def replay_to(stack, client: redis.Redis, prefix: str, ops: list[dict], version: int) -> str:
    """Rebuild ``stack`` to the journal's state at ``version`` (independently of the service); sha256."""
    from editor_core.delta import EditDelta

    j = Journal(client, stack.fingerprint, prefix)
    order, rolled = [], set()
    for o in ops:
        if int(o["version"]) > version:
            break
        if o["op"] == "edit":
            order.append(o["edit_id"])
        else:
            rolled.add(o["edit_id"])
    active = [e for e in order if e not in rolled]
    blobs = client.mget([j.key("delta", e) for e in active]) if active else []
    stack.rebuild([(e, EditDelta.from_bytes(b, stack.fingerprint, stack.shapes)) for e, b in zip(active, blobs,
                                                                                                 strict=True)])
    return stack.sha256()


def replay_versions(stack, client: redis.Redis, prefix: str, ops: list[dict], versions: Iterable[int]):
    """Yield each of ``versions`` (ascending) after rebuilding ``stack`` to it op by op, as the
    service does (apply an edit's delta, revert a rolled-back one): linear in the journal's length."""
    from editor_core.delta import EditDelta

    j = Journal(client, stack.fingerprint, prefix)
    stack.reset()
    wanted = sorted(set(versions))
    at = 0
    for v in wanted:
        while at < v:
            o = ops[at]
            if o["op"] == "edit":
                blob = client.get(j.key("delta", o["edit_id"]))
                stack.apply(o["edit_id"], EditDelta.from_bytes(blob, stack.fingerprint, stack.shapes))
            else:
                stack.revert(o["edit_id"])
            at += 1
        yield v


# ---- figures ----------------------------------------------------------------------------------------
def percentiles(values: Iterable[float]) -> dict:
    """n, p50, p99 and max of latencies in ms."""
    v = sorted(values)
    if not v:
        return {"n": 0}

    def pct(q: float) -> float:
        return round(v[min(len(v) - 1, int(round(q * (len(v) - 1))))], 1)

    return {"n": len(v), "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": round(v[-1], 1)}


def exit_cleanly_on_sigterm() -> None:
    """Scripts: turn SIGTERM into SystemExit so that ``finally`` blocks stop the child processes."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def scenario_main(title: str, run, doc: str | None, ci: dict | None = None, full: dict | None = None,
                  full_help: str = "issue-size run", seeded: bool = False) -> int:
    """Command line of a scenario script: ``--full`` picks the issue's size; exit 1 on any problem."""
    import argparse

    exit_cleanly_on_sigterm()
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if full is not None:
        ap.add_argument("--full", action="store_true", help=full_help)
    if seeded:
        ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    kwargs = dict(full if getattr(args, "full", False) else (ci or {}))
    if seeded:
        kwargs["seed"] = args.seed
    figures = run(**kwargs)
    print_figures(title, figures)
    return 1 if figures.get("problems") or figures.get("problem_count") else 0


def print_figures(name: str, figures: dict) -> None:
    print(f"== {name} ==")
    print(json.dumps(figures, indent=2, default=str))
