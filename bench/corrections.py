"""Figure 9: N corrections through the service (issue 13's acceptance run, ``mend bench --only corrections``).

What an application and an operator see, end to end over HTTP against a real ``mend serve`` (default
model and method unless told otherwise, embedded redis-server, canary guard as shipped):

1. empty start: spawn -> first 200 of ``/health/ready`` on a fresh data dir;
2. the greedy answers of every edit prompt and neighbour prompt before any edit (batched ``/query``);
3. N CounterFact corrections, one ``POST /edit`` per fact (with ``subject``), from 4 concurrent
   clients; each client asks the prompt just before posting its edit (the "before that edit"
   answer); every 25 acknowledged edits a sample of the earlier accepted facts is asked again (the
   holding share over time, plotted);
4. every accepted fact's prompt, first rephrase and first neighbour are asked (success, paraphrase
   success, neighbour kept = the neighbour answers as before any edit);
5. 20 random accepted edits are rolled back one by one (timed over HTTP); then every accepted prompt is
   asked again: a rolled-back fact is restored when its target is no longer the greedy answer, or
   when the model already gave that target before the edit (a record whose new target the model
   already said); we count those that answer exactly as before their edit; the others must still hold;
6. SIGTERM, restart on the same data dir: ready time, the targets' sha256 and version of
   ``/health/ready`` and the answers of every accepted prompt must equal those before the restart.

Peak RSS is VmHWM of the serve process; journal bytes are the delta blobs the journal records carry
(``delta_bytes``) and the embedded redis-server's append-only file on disk.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import REPO, Figure, Verdict, mend_executable, pct, proc_status_kb, terminate

log = logging.getLogger("bench.corrections")

NAME = "corrections"
TITLE = "9. Corrections through the service: N facts from 4 clients, rollback, restart"
DEFAULT_N = 1000
QUICK_N = 12
PLOT_NAME = "corrections.png"
QUERY_CHUNK = 16  # prompts per /query (the service's default max_prompts_per_query)


@dataclass
class RunConfig:
    """What one corrections run does (sizes, model, method, guard)."""

    n: int
    data: Path
    workdir: Path
    model: str = "smollm2-135m"
    method: str | None = None  # None: the service's default (alphaedit on the default model)
    canary_guard: bool = True
    clients: int = 4
    rollbacks: int = 20
    torch_threads: int = 1
    seed: int = 0
    answer_tokens: int = 8
    every: int = 25  # progress log and holding-share sample every this many acknowledged edits
    sample: int = 32  # earlier accepted facts asked at each sample point
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the serve process
    ready_timeout_s: float = 900.0
    keep_progress: bool = False  # keep <workdir>/progress.json, so that a stopped run can be resumed
    max_posts: int | None = None  # post at most this many facts in this invocation, then stop (resume later)


class Serve:
    """One real ``mend serve`` process (uvicorn, embedded redis-server in ``data_dir``)."""

    def __init__(self, cfg: RunConfig, data_dir: Path, tag: str):
        from service.redis_embedded import free_port

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEND_")}
        env.update(MEND_MODEL=cfg.model, MEND_PORT=str(self.port), MEND_HOST="127.0.0.1",
                   MEND_DATA_DIR=str(data_dir), MEND_TORCH_THREADS=str(cfg.torch_threads),
                   OMP_NUM_THREADS=str(cfg.torch_threads), TOKENIZERS_PARALLELISM="false",
                   MEND_LOG_FORMAT="text", MEND_LOG_LEVEL="WARNING", MEND_ROLE="writer",
                   MEND_CANARY_GUARD=str(cfg.canary_guard).lower())
        for key in ("MEND_MODEL_CACHE", "MEND_EDITORS_DIR"):
            if os.environ.get(key):
                env[key] = os.environ[key]
        env.update(cfg.env)
        self.log_path = data_dir.parent / f"serve-{tag}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([*mend_executable(), "serve"], env=env, cwd=str(REPO), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout_s: float) -> tuple[float, dict]:
        """Seconds from spawn to the first 200 of /health/ready, and its body."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mend serve exited with {self.proc.returncode}: {self.tail()}")
                try:
                    r = client.get(f"{self.base}/health/ready")
                    if r.status_code == 200:
                        return time.perf_counter() - self.started, r.json()
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"mend serve not ready within {timeout_s:.0f} s: {self.tail()}")

    def peak_rss_kb(self) -> int:
        """VmHWM (peak resident set) of the serve process, in kB."""
        return proc_status_kb(self.proc.pid, ("VmHWM",)).get("VmHWM", 0)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 120.0) -> None:
        """SIGTERM (the embedded redis-server stops with it), SIGKILL only if it hangs."""
        terminate(self.proc, timeout_s)
        self._log.close()


# ---- HTTP helpers ------------------------------------------------------------------------------
RETRIED: Counter = Counter()  # "<path> <status>" -> how often a request was answered 503/504 and sent again
_RETRY_LOCK = threading.Lock()


def post(http: httpx.Client, path: str, body: dict, tries: int = 20) -> httpx.Response:
    """POST, sending it again (after a pause) while the service answers 503/504: what an application does
    when a query waited longer than MEND_QUERY_TIMEOUT_S behind the edits of other clients (edits are
    barriers on the model thread). Every retry is counted in :data:`RETRIED` and reported."""
    for attempt in range(tries):
        r = http.post(path, json=body)
        if r.status_code not in (503, 504) or attempt == tries - 1:
            return r
        with _RETRY_LOCK:
            RETRIED[f"{path} {r.status_code}"] += 1
        time.sleep(min(2.0 * (attempt + 1), 10.0))
    return r


def ask(http: httpx.Client, prompts: list[str], tokens: int) -> list[str]:
    """Greedy completions of ``prompts``, QUERY_CHUNK per /query."""
    out: list[str] = []
    for start in range(0, len(prompts), QUERY_CHUNK):
        r = post(http, "/query", {"prompts": prompts[start:start + QUERY_CHUNK], "max_new_tokens": tokens})
        r.raise_for_status()
        out += [x["completion"] for x in r.json()["results"]]
    return out


def holds(completion: str, target: str) -> bool:
    """The greedy answer starts with the target (what /edit's ``success`` promises, and no more)."""
    return completion.lstrip().startswith(target)


def restored(after: str, before_edit: str, target: str) -> bool:
    """A rolled-back fact is back: its target is no longer the greedy answer, unless the model already
    answered with that target before the edit (then nothing tells the edit's answer from the old one)."""
    return not holds(after, target) or holds(before_edit, target)


def refusal_reason(status: int, body: dict) -> str:
    """A short class for a refused edit (422 canary guard, magnitude, size, subject...)."""
    detail = str(body.get("detail", ""))
    if "canary" in body or "canary prompts" in detail:
        return f"{status} canary guard"
    for key, name in (("max_update_ratio", "update norm"), ("max_delta_bytes", "delta size"),
                      ("subject", "subject"), ("non-finite", "non-finite")):
        if key in detail:
            return f"{status} {name}"
    return f"{status} other"


def answer_lengths(model: str, answers: list[str]) -> list[int] | None:
    """Token count of each answer as it follows a prompt (editor_core.batching.target_ids), with the
    model's tokenizer; None when the model has no local directory to read it from."""
    from transformers import AutoTokenizer

    from editor_core.batching import target_ids
    from editor_core.models import local_model_dir

    path = local_model_dir(model, Path(os.environ["MEND_MODEL_CACHE"]) if os.environ.get("MEND_MODEL_CACHE") else None)
    if path is None:
        return None
    tok = AutoTokenizer.from_pretrained(path)
    return [max(1, len(target_ids(tok, a))) for a in answers]


def ask_lengths(http: httpx.Client, prompts: list[str], lengths: list[int]) -> list[str]:
    """Greedy completions, each for its own number of tokens (one /query per length group and chunk)."""
    out: list[str] = [""] * len(prompts)
    for n in sorted(set(lengths)):
        idx = [i for i, k in enumerate(lengths) if k == n]
        for i, text in zip(idx, ask(http, [prompts[i] for i in idx], n), strict=True):
            out[i] = text
    return out


def journal_records(http: httpx.Client) -> list[dict]:
    """Every journal record (GET /edits, oldest first, paged)."""
    records: list[dict] = []
    while True:
        page = http.get("/edits", params={"order": "asc", "offset": len(records), "limit": 50}).json()
        records += page["edits"]
        if not page["edits"] or len(records) >= page["total"]:
            return records


def aof_bytes(data_dir: Path) -> int:
    """Bytes of the embedded redis-server's append-only file(s) in ``data_dir``."""
    return sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file() and ".aof" in p.name)


# ---- the run -----------------------------------------------------------------------------------
def load_facts(path: Path, n: int) -> list[Any]:
    """The first ``n`` records with a subject, a rephrase and a neighbour (EditRecord)."""
    from editor_core.data import load_records

    usable = [r for r in load_records(path) if r.subject and r.rephrases and r.locality]
    if len(usable) < n:
        log.warning("only %d usable records in %s (asked for %d)", len(usable), path, n)
    return usable[:n]


class Progress:
    """What an acceptance run has done so far, kept in ``<workdir>/progress.json`` after every outcome.

    A run of 1,000 corrections takes hours on 2 cores; when it is stopped (a session ends, the machine
    reboots), ``mend bench --only corrections --corrections-dir DIR`` started again on the same
    directory resumes it: the service restarts on the same journal, the facts already posted are not
    posted again, and every figure covers the whole run. A fact whose edit the service journaled but
    whose answer never reached the client (the run was stopped mid-request) is recovered from the
    journal. ``path`` None keeps nothing (a run in a temporary directory).
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.state: dict[str, Any] = json.loads(path.read_text()) if path and path.is_file() else {}
        self.rows: list[dict] = self.state.setdefault("rows", [])
        self.timeline: list[dict] = self.state.setdefault("timeline", [])

    @property
    def resumed(self) -> bool:
        return "base" in self.state

    def check(self, n: int, method: str | None, data: Path) -> None:
        """Refuse to resume a run made with other settings (its figures would not add up)."""
        want = {"n": n, "method": method, "data": str(data)}
        have = {k: self.state.get(k) for k in want}
        if self.resumed and have != want:
            raise RuntimeError(f"{self.path}: a run with {have} is stored there, this one is {want}; "
                               "use another --corrections-dir or delete it")
        self.state.update(want)

    def save(self, **fields: Any) -> None:
        """Write the state (atomically: a reader or a resumed run never sees half a file)."""
        self.state.update(fields)
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, default=str))
        os.replace(tmp, self.path)


def recover_rows(rows: list[dict], records: list[dict], facts: list[Any]) -> int:
    """Add a row for every journaled edit of a fact that has none (posted, journaled, answer lost);
    returns how many were recovered."""
    have = {x.get("edit_id") for x in rows}
    by_prompt = {(f.prompt, f.target_new): i for i, f in enumerate(facts)}
    posted = {x["i"] for x in rows}
    found = 0
    for rec in records:
        if rec["edit_id"] in have or not rec.get("requests"):
            continue
        req = rec["requests"][0]
        i = by_prompt.get((req.get("prompt"), req.get("target")))
        if i is None or i in posted:
            continue
        rows.append({"i": i, "status": 200, "client_ms": float("nan"), "acked_s": float("nan"), "before": None,
                     "edit_id": rec["edit_id"], "version": rec.get("version", 0),
                     "success": rec["results"][0]["success"] if rec.get("results") else None,
                     "p_after": None, "recovered": True})
        posted.add(i)
        found += 1
    return found


class _Edits:
    """The shared state of the posting clients."""

    def __init__(self, cfg: RunConfig, http_base: str, facts: list[Any], started: float,
                 progress: Progress | None = None, peak_rss_kb: Any = None):
        self.cfg, self.base, self.facts, self.started = cfg, http_base, facts, started
        self.peak_rss_kb = peak_rss_kb  # () -> kB of the serve process, sampled with the progress
        self.progress = progress or Progress(None)
        self.lock = threading.Lock()
        self.rows: list[dict] = self.progress.rows  # one per posted fact (those of an earlier run included)
        self.timeline: list[dict] = self.progress.timeline  # holding share of earlier accepted facts over time
        self.done = len(self.rows)
        posted = {x["i"] for x in self.rows}
        pending = [i for i in range(len(facts)) if i not in posted]  # in order; clients pop from the front
        self.pending = pending if cfg.max_posts is None else pending[:cfg.max_posts]
        self.offset_s = self.progress.state.get("edit_phase_s", 0.0)  # edit-phase seconds of earlier runs

    def client(self) -> None:
        with httpx.Client(base_url=self.base, timeout=self.cfg.ready_timeout_s) as http:
            while True:
                with self.lock:
                    if not self.pending:
                        return
                    i = self.pending.pop(0)
                try:
                    self._post(http, i)
                except Exception as err:  # noqa: BLE001 - recorded as this fact's outcome, the client goes on
                    log.exception("fact %d: request failed", i)
                    with self.lock:
                        self.rows.append({"i": i, "status": 0, "reason": f"client error {type(err).__name__}",
                                          "client_ms": float("nan"), "acked_s": self.elapsed()})
                        self.done += 1
                        self.progress.save(edit_phase_s=self.elapsed())

    def elapsed(self) -> float:
        """Seconds of edit phase so far, over every run of a resumed acceptance run."""
        return self.offset_s + time.perf_counter() - self.started

    def _post(self, http: httpx.Client, i: int) -> None:
        f = self.facts[i]
        before = ask(http, [f.prompt], self.cfg.answer_tokens)[0]
        body: dict[str, Any] = {"requests": [{"prompt": f.prompt, "target": f.target_new, "subject": f.subject}]}
        if self.cfg.method:
            body["method"] = self.cfg.method
        t0 = time.perf_counter()
        r = post(http, "/edit", body)
        row = {"i": i, "status": r.status_code, "client_ms": (time.perf_counter() - t0) * 1000.0,
               "acked_s": self.elapsed(), "before": before}
        out = r.json()
        if r.status_code == 200:
            row.update(edit_id=out["edit_id"], version=out["version"], success=out["results"][0]["success"],
                       p_after=out["results"][0]["p_target_after"])
        else:
            row["reason"] = refusal_reason(r.status_code, out)
            log.info("edit of fact %d refused: %s", i, str(out.get("detail", ""))[:200])
        with self.lock:
            self.rows.append(row)
            self.done += 1
            done = self.done
            accepted = [x for x in self.rows if "edit_id" in x]
            self.progress.save(edit_phase_s=self.elapsed())
        if done % self.cfg.every == 0 or done == len(self.facts):
            self._progress(http, done, accepted)

    def _progress(self, http: httpx.Client, done: int, accepted: list[dict]) -> None:
        recent = [x for x in self.rows[-self.cfg.every:]]
        ok = [x for x in recent if "edit_id" in x]
        sample = random.Random(done).sample(accepted, min(self.cfg.sample, len(accepted)))
        said = ask(http, [self.facts[x["i"]].prompt for x in sample], self.cfg.answer_tokens) if sample else []
        share = (sum(holds(s, self.facts[x["i"]].target_new) for s, x in zip(said, sample, strict=True))
                 / len(sample)) if sample else float("nan")
        version = max((x["version"] for x in accepted), default=0)
        with self.lock:
            self.timeline.append({"done": done, "version": version, "accepted": len(accepted), "holding": share})
            if self.peak_rss_kb is not None:  # the peak of a run that is stopped later is not lost
                self.progress.save(peak_rss_kb=max(self.progress.state.get("peak_rss_kb", 0), self.peak_rss_kb()))
        log.info("corrections %d/%d: %d accepted, last %d: %d accepted, success at ack %d, client p50 %.0f ms; "
                 "%d earlier accepted facts sampled, %.0f%% hold (%.0f s)", done, len(self.facts), len(accepted),
                 len(recent), len(ok), sum(bool(x["success"]) for x in ok),
                 pct([x["client_ms"] for x in ok], 50), len(sample), 100 * share, self.elapsed())


def measure(cfg: RunConfig) -> dict[str, Any]:
    """Run the whole scenario; return every figure and the per-edit timeline (JSON-able)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the progress
    RETRIED.clear()
    facts = load_facts(cfg.data, cfg.n)
    if not facts:
        raise RuntimeError(f"no usable records in {cfg.data}")
    data_dir = cfg.workdir / "var"
    data_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(cfg.workdir / "progress.json" if cfg.keep_progress else None)
    progress.check(len(facts), cfg.method, cfg.data)
    if progress.state.get("finished"):
        raise RuntimeError(f"{progress.path}: this run has finished (see corrections.json beside the report); "
                           "use another --corrections-dir to run again")
    res: dict[str, Any] = {"n": len(facts), "method": cfg.method, "canary_guard": cfg.canary_guard}
    serve = Serve(cfg, data_dir, f"run{len(progress.state.get('runs', [])) + 1}")
    try:
        ready_s, ready = serve.wait_ready(cfg.ready_timeout_s)
        http = httpx.Client(base_url=serve.base, timeout=cfg.ready_timeout_s)
        if progress.resumed:  # the same journal replayed: the facts posted so far are not posted again
            recovered = recover_rows(progress.rows, journal_records(http), facts)
            log.info("resuming %s: ready in %.1f s with %d active edits; %d of %d facts posted before (%d "
                     "recovered from the journal)", progress.path, ready_s, ready["active_edits"], len(progress.rows),
                     len(facts), recovered)
            base = progress.state["base"]
        else:
            log.info("mend serve ready in %.1f s (empty journal), default method %s", ready_s,
                     ready.get("default_method"))
            prompts = [f.prompt for f in facts]
            neighbours = [f.locality[0].prompt for f in facts]
            base_answers = ask(http, prompts + neighbours, cfg.answer_tokens)
            # neighbour kept as evaluate.py defines it: the greedy continuation for the locality answer's length
            lengths = answer_lengths(cfg.model, [f.locality[0].answer for f in facts])
            base = {"empty_ready_s": ready_s, "default_method": ready.get("default_method"),
                    "prompt": base_answers[:len(facts)], "neighbour": base_answers[len(facts):],
                    "neighbour_answer_tokens": lengths is not None,
                    "lengths": lengths or [cfg.answer_tokens] * len(facts)}
            base["neighbour_short"] = ask_lengths(http, neighbours, base["lengths"])
            progress.save(base=base)
        progress.save(runs=[*progress.state.get("runs", []), {"ready_s": ready_s,
                                                              "active_edits": ready["active_edits"]}])
        res["empty_ready_s"], res["default_method"] = base["empty_ready_s"], base["default_method"]
        res["neighbour_answer_tokens"], lengths = base["neighbour_answer_tokens"], base["lengths"]
        base_prompt, base_neigh, base_short = base["prompt"], base["neighbour"], base["neighbour_short"]
        res["runs"] = progress.state["runs"]
        edits = _Edits(cfg, serve.base, facts, time.perf_counter(), progress, serve.peak_rss_kb)
        threads = [threading.Thread(target=edits.client, name=f"client-{c}") for c in range(cfg.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        res["edit_phase_s"] = edits.elapsed()
        if len(edits.rows) < len(facts):  # stopped by max_posts: the journal and progress wait for a resume
            log.info("stopped after %d of %d facts (max_posts %s); run again with the same directory to resume",
                     len(edits.rows), len(facts), cfg.max_posts)
            http.close()
            return {**res, "stopped": True, "posted": len(edits.rows),
                    "accepted": sum("edit_id" in x for x in edits.rows)}
        rows = sorted(edits.rows, key=lambda x: x.get("version", 10**9))
        res["timeline"] = edits.timeline
        accepted = [x for x in rows if "edit_id" in x]
        res["accepted"] = len(accepted)
        res["refused"] = dict(Counter(x["reason"] for x in rows if "reason" in x))
        records = {r["edit_id"]: r for r in journal_records(http)}
        for x in accepted:
            rec = records[x["edit_id"]]
            x["server_ms"], x["delta_bytes"], x["canary"] = rec["latency_ms"], rec["delta_bytes"], rec.get("canary")
        res["edits"] = [{k: v for k, v in x.items() if k != "before"} for x in rows]
        res["delta_bytes_total"] = sum(x["delta_bytes"] for x in accepted)
        canaries = [x["canary"] for x in accepted if x.get("canary")]
        res["canary_last"] = canaries[-1] if canaries else None
        res["canary_max_changed"] = max((c["changed"] for c in canaries), default=None)
        # 4. every accepted fact: prompt, rephrase, neighbour
        acc_facts = [facts[x["i"]] for x in accepted]
        said = ask(http, [f.prompt for f in acc_facts] + [f.rephrases[0] for f in acc_facts]
                   + [f.locality[0].prompt for f in acc_facts], cfg.answer_tokens)
        k = len(acc_facts)
        held = [holds(s, f.target_new) for s, f in zip(said[:k], acc_facts, strict=True)]
        res["success_end"] = sum(held) / k if k else float("nan")
        res["paraphrase_success"] = sum(holds(s, f.target_new) for s, f in zip(said[k:2 * k], acc_facts,
                                                                                 strict=True)) / k if k else float("nan")
        res["neighbour_kept_8_tokens"] = sum(s == base_neigh[x["i"]] for s, x in zip(said[2 * k:], accepted,
                                                                                     strict=True)) / k if k else float("nan")
        short = ask_lengths(http, [f.locality[0].prompt for f in acc_facts], [lengths[x["i"]] for x in accepted])
        res["neighbour_kept"] = sum(s == base_short[x["i"]] for s, x in zip(short, accepted,
                                                                            strict=True)) / k if k else float("nan")
        answers = {"base_prompt": base_prompt, "base_neighbour": base_neigh, "base_neighbour_short": base_short}
        res["success_at_ack"] = sum(bool(x["success"]) for x in accepted) / k if k else float("nan")
        # 5. roll back random accepted edits
        chosen = random.Random(cfg.seed).sample(range(k), min(cfg.rollbacks, k))
        times = progress.state.setdefault("rollback_s", {})  # edit_id -> seconds, kept across a resume
        for j in chosen:
            edit_id = accepted[j]["edit_id"]
            if edit_id in times:
                continue
            t0 = time.perf_counter()
            r = http.post("/rollback", json={"edit_id": edit_id})
            times[edit_id] = time.perf_counter() - t0
            r.raise_for_status()
            progress.save()
        res["rollback_s"] = [times[accepted[j]["edit_id"]] for j in chosen]
        res["retried"] = dict(RETRIED)
        after = ask(http, [f.prompt for f in acc_facts], cfg.answer_tokens)
        gone = set(chosen)
        res["rolled_back"] = len(chosen)
        res["restored"] = sum(restored(after[j], accepted[j]["before"], acc_facts[j].target_new) for j in chosen)
        res["restored_target_before"] = sum(holds(accepted[j]["before"], acc_facts[j].target_new) for j in chosen)
        res["restored_as_before_edit"] = sum(after[j] == accepted[j]["before"] for j in chosen)
        res["restored_as_base"] = sum(after[j] == base_prompt[accepted[j]["i"]] for j in chosen)
        others = [j for j in range(k) if j not in gone and held[j]]
        res["others_held_before"] = len(others)
        res["others_still_hold"] = sum(holds(after[j], acc_facts[j].target_new) for j in others)
        res["rolled_back_facts"] = [{"i": accepted[j]["i"], "prompt": acc_facts[j].prompt, "target":
                                     acc_facts[j].target_new, "before_edit": accepted[j]["before"],
                                     "base": base_prompt[accepted[j]["i"]], "after_rollback": after[j]} for j in chosen]
        res["answers"] = {**answers, "accepted_i": [x["i"] for x in accepted], "end_prompt": said[:k],
                          "end_rephrase": said[k:2 * k], "end_neighbour": said[2 * k:],
                          "end_neighbour_short": short, "after_rollbacks": after}
        ready = http.get("/health/ready").json()
        res["sha256"], res["version"], res["active_edits"] = ready["sha256"], ready["version"], ready["active_edits"]
        res["peak_rss_kb"] = max(serve.peak_rss_kb(), progress.state.get("peak_rss_kb", 0))
        http.close()
    finally:
        serve.stop()
    res["aof_bytes"] = aof_bytes(data_dir)
    # 6. restart on the same journal
    serve = Serve(cfg, data_dir, "restart")
    try:
        res["restart_ready_s"], ready = serve.wait_ready(cfg.ready_timeout_s)
        log.info("restart ready in %.1f s with %d active edits", res["restart_ready_s"], ready["active_edits"])
        res["restart_sha256"], res["restart_version"] = ready["sha256"], ready["version"]
        with httpx.Client(base_url=serve.base, timeout=cfg.ready_timeout_s) as http:
            again = ask(http, [f.prompt for f in acc_facts], cfg.answer_tokens)
        res["same_answers_after_restart"] = sum(a == b for a, b in zip(again, after, strict=True))
        res["restart_peak_rss_kb"] = serve.peak_rss_kb()
    finally:
        serve.stop()
    progress.save(finished=True)
    return res


# ---- report ------------------------------------------------------------------------------------
def _at(values: list[float], pos: int, window: int = 5) -> tuple[float, float]:
    """(value at 1-based position ``pos``, median of the ``2*window+1`` values around it)."""
    i = min(max(pos, 1), len(values)) - 1
    near = values[max(0, i - window): i + window + 1]
    return values[i], pct(near, 50)


def plot(res: dict[str, Any], path: Path) -> Path:
    """Success over time: per-edit success at acknowledgement (rolling), accepted share, holding share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["edits"]
    acc = [x for x in rows if "edit_id" in x]
    window = max(1, min(25, len(acc)))
    xs = [x["version"] for x in acc]
    ok = [1.0 if x["success"] else 0.0 for x in acc]
    rolling = [sum(ok[max(0, i - window + 1): i + 1]) / len(ok[max(0, i - window + 1): i + 1]) for i in range(len(ok))]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    if acc:
        ax.plot(xs, rolling, label=f"success at /edit (rolling {window})", color="tab:blue")
    tl = res["timeline"]
    if tl:
        ax.plot([t["version"] for t in tl], [t["holding"] for t in tl], "o-", color="tab:green", ms=3,
                label="earlier accepted facts still held (sample)")
        ax.plot([t["version"] for t in tl], [t["accepted"] / t["done"] for t in tl], "--", color="tab:gray",
                label="accepted share so far")
    end = len(acc)
    ax.scatter([end], [res["success_end"]], color="tab:red", zorder=3, label="all accepted facts held, at the end")
    ax.set_xlabel("journal version (accepted edits)")
    ax.set_ylabel("share")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(f"{res['n']} corrections, method {res.get('method') or res.get('default_method')}, "
                 f"canary guard {'on' if res['canary_guard'] else 'off'}")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def to_figure(res: dict[str, Any], fp32_bytes: int | None, full_n: int = DEFAULT_N) -> Figure:
    """The report section (rows, ratios, verdicts against issue 13's targets, notes)."""
    fig = Figure(NAME, TITLE)
    n, acc = res["n"], [x for x in res["edits"] if "edit_id" in x]
    k = len(acc)
    refused = ", ".join(f"{c} x {r}" for r, c in sorted(res["refused"].items())) or "none"
    srv = [x["server_ms"] for x in acc]
    cli = [x["client_ms"] for x in acc if x["client_ms"] == x["client_ms"]]  # not the recovered (NaN) ones
    rb = res["rollback_s"]
    rss_mib = res["peak_rss_kb"] / 1024
    fig.rows = [
        {"measure": "corrections posted", "value": n},
        {"measure": "accepted", "value": k, "share": round(k / n, 4)},
        {"measure": "refused (reasons)", "value": n - k, "share": round((n - k) / n, 4), "detail": refused},
        {"measure": "success at /edit (teacher-forced, accepted)", "share": round(res["success_at_ack"], 4)},
        {"measure": "success at the end (greedy starts with target)", "share": round(res["success_end"], 4)},
        {"measure": "paraphrase success at the end", "share": round(res["paraphrase_success"], 4)},
        {"measure": "neighbour kept (answer-length greedy continuation as before any edit)",
         "share": round(res["neighbour_kept"], 4)},
        {"measure": "neighbour's 8-token continuation unchanged", "share": round(res["neighbour_kept_8_tokens"], 4)},
    ]
    if res["canary_last"]:
        c = res["canary_last"]
        fig.rows.append({"measure": "canaries after the last accepted edit", "value": c["changed"],
                         "detail": f"{c['changed']} of {c['canaries']} changed, {c['flipped']} flipped near ties, "
                                   f"{c['logprob_drop']} nats/token lost; most changed during the run: "
                                   f"{res['canary_max_changed']}"})
    for pos in sorted({1, max(1, k // 2), k}) if k else []:
        s_at, s_med = _at(srv, pos)
        c_at, c_med = _at(cli, pos)
        fig.rows.append({"measure": f"edit latency at accepted edit {pos}", "server_ms": round(s_at),
                         "server_ms (median of 11 around)": round(s_med), "client_ms": round(c_at),
                         "client_ms (median of 11 around)": round(c_med)})
    if rb:
        fig.rows.append({"measure": f"rollback over HTTP ({len(rb)} random of {k} active)",
                         "p50_ms": round(pct(rb, 50) * 1000, 1), "p95_ms": round(pct(rb, 95) * 1000, 1)})
    fig.rows += [
        {"measure": "rolled-back facts restored (target no longer the answer, or already it before the edit)",
         "value": res["restored"],
         "share": round(res["restored"] / max(1, res["rolled_back"]), 4),
         "detail": f"{res['restored_as_before_edit']} answer exactly as just before their edit, "
                   f"{res['restored_as_base']} as before any edit, "
                   f"{res.get('restored_target_before', 0)} gave the target before their edit"},
        {"measure": "other facts still held after the rollbacks", "value": res["others_still_hold"],
         "share": round(res["others_still_hold"] / max(1, res["others_held_before"]), 4),
         "detail": f"of {res['others_held_before']} that held before them"},
        {"measure": "ready: empty start", "seconds": round(res["empty_ready_s"], 2)},
        {"measure": f"ready: restart with {res['active_edits']} active edits", "seconds": round(res["restart_ready_s"], 2),
         "detail": "sha256 and version equal" if (res["restart_sha256"], res["restart_version"])
                   == (res["sha256"], res["version"]) else "sha256/version DIFFER"},
        {"measure": "answers equal after restart", "value": res["same_answers_after_restart"], "share":
         round(res["same_answers_after_restart"] / max(1, k), 4)},
        {"measure": "peak RSS of mend serve (MiB)", "value": round(rss_mib),
         "detail": f"restarted process: {round(res['restart_peak_rss_kb'] / 1024)} MiB"},
        {"measure": "journal: delta blobs of accepted edits (bytes)", "value": res["delta_bytes_total"],
         "detail": f"{res['delta_bytes_total'] / max(1, k):,.0f} per edit; redis AOF on disk {res['aof_bytes']:,} bytes"},
        {"measure": "edit phase wall time (s)", "seconds": round(res["edit_phase_s"], 1)},
        {"measure": "requests answered 503/504 and sent again", "value": sum(res.get("retried", {}).values()),
         "detail": ", ".join(f"{c} x {k}" for k, c in sorted(res.get("retried", {}).items())) or "none"},
    ]
    fig.ratios = {"ready after restart / empty start": res["restart_ready_s"] / res["empty_ready_s"]}
    if rb:
        fig.ratios["rollback p50 (s)"] = pct(rb, 50)
    if fp32_bytes:
        fig.ratios["peak RSS / fp32 weights"] = res["peak_rss_kb"] * 1024 / fp32_bytes
    at = f" (at {n} corrections, not {full_n:,})" if n < full_n else ""

    def verdict(target: str, measured: str, met: bool | None) -> None:
        fig.verdicts.append(Verdict(target + at, measured, met))

    verdict(">= 99% of the corrections accepted", f"{k / n:.1%}", k / n >= 0.99)
    if k:
        verdict("success at the end >= 0.80", f"{res['success_end']:.3f}", res["success_end"] >= 0.80)
        verdict("neighbour kept >= 0.90", f"{res['neighbour_kept']:.3f}", res["neighbour_kept"] >= 0.90)
        verdict("every rolled-back fact restored", f"{res['restored']} of {res['rolled_back']}",
                res["restored"] == res["rolled_back"])
        verdict("every other fact still held", f"{res['others_still_hold']} of {res['others_held_before']}",
                res["others_still_hold"] == res["others_held_before"])
        if rb:
            verdict("rollback p50 < 1 s", f"{pct(rb, 50):.2f} s", pct(rb, 50) < 1.0)
    if res["canary_last"]:
        verdict("canaries unchanged", f"{res['canary_last']['changed']} changed", res["canary_last"]["changed"] == 0)
    verdict("ready after restart < 2x an empty start", f"{fig.ratios['ready after restart / empty start']:.2f}x",
            fig.ratios["ready after restart / empty start"] < 2.0)
    if fp32_bytes:
        r = fig.ratios["peak RSS / fp32 weights"]
        verdict("peak RSS <= 1.5x the fp32 weights", f"{r:.2f}x ({rss_mib:.0f} MiB vs {fp32_bytes / 2**20:.0f} MiB)",
                r <= 1.5)
    verdict("sha256 and answers equal after restart",
            f"sha256 {'equal' if res['restart_sha256'] == res['sha256'] else 'DIFFERENT'}, "
            f"{res['same_answers_after_restart']} of {k} answers equal",
            res["restart_sha256"] == res["sha256"] and res["same_answers_after_restart"] == k)
    runs = res.get("runs") or []
    if len(runs) > 1:
        fig.notes.append(f"resumed: the run was stopped and continued {len(runs) - 1} time(s) on the same journal "
                         "(`--corrections-dir`); ready with the edits so far: "
                         + ", ".join(f"{r['ready_s']:.1f} s at {r['active_edits']}" for r in runs[1:])
                         + "; peak RSS is the highest sampled over every run")
    fig.notes += [
        f"method: {res.get('method') or res.get('default_method')} (service default when none is named); canary guard "
        f"{'on' if res['canary_guard'] else 'off'}; {n} counterfact-val records with a subject, a rephrase and a "
        "neighbour (the first ones of the file), one POST /edit each from 4 concurrent clients; every edit is "
        "computed on the weights the earlier ones left",
        "success = the greedy continuation (8 tokens) starts with the new target; neighbour kept = the first locality "
        "prompt's greedy continuation for its answer's length in tokens (as evaluate.py's neighbour_kept) is unchanged "
        "from before any edit; server_ms is the journal record's "
        "latency_ms (compute + canary check + journal write), client_ms adds the wait behind the other clients' edits",
        "rollbacks are posted one at a time after all edits, each timed over HTTP; restored = the rolled-back fact's "
        "target is no longer the greedy answer",
    ]
    return fig


def run(ctx) -> Figure:
    """``mend bench --only corrections``: the size from ``--corrections`` (ctx.cache), else 1,000 (12 quick)."""
    n = ctx.cache.get("corrections") or (QUICK_N if ctx.quick else DEFAULT_N)
    if ctx.data_path is None or not ctx.data_path.is_file():
        return Figure(NAME, TITLE, skipped=f"no data file ({ctx.data_path}); needs CounterFact records")
    keep = ctx.cache.get("corrections_dir")
    cfg = RunConfig(n=n, data=ctx.data_path, workdir=Path(keep) if keep else ctx.workdir / "corrections",
                    model=ctx.model_spec, torch_threads=ctx.torch_threads, method=ctx.cache.get("corrections_method"),
                    canary_guard=ctx.cache.get("corrections_canary_guard", True), keep_progress=bool(keep),
                    max_posts=ctx.cache.get("corrections_max_posts"))
    if cfg.max_posts is not None and not keep:
        return Figure(NAME, TITLE, skipped="--corrections-max-posts needs --corrections-dir (where the run waits)")
    res = measure(cfg)
    if res.get("stopped"):
        return Figure(NAME, TITLE, skipped=f"stopped after {res['posted']} of {n} facts ({res['accepted']} accepted) "
                                           f"by --corrections-max-posts; run again with --corrections-dir {keep} "
                                           "to resume")
    out_dir = Path(ctx.cache.get("report_dir") or ctx.workdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "corrections.json").write_text(json.dumps(res, indent=1, default=str))
    path = plot(res, out_dir / PLOT_NAME)
    fp32 = sum(p.numel() for p in ctx.lm().model.parameters()) * 4
    fig = to_figure(res, fp32)
    fig.notes.append(f"plot: {path.name} (beside this report); per-edit data: corrections.json")
    return fig
