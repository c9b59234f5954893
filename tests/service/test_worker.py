"""ModelWorker scheduling: micro-batches, exclusive jobs alone between batches, cancellation, stop."""

from __future__ import annotations

import threading
import time

import pytest

from service.inference import QueryJob
from service.worker import ModelWorker, WorkerStoppedError


class Recorder:
    """run_batch that records what ran together (and the version each batch saw)."""

    def __init__(self):
        self.version = 0
        self.log: list = []

    def run_batch(self, jobs):
        self.log.append(("batch", [j.prompts[0] for j in jobs]))
        return self.version, [f"{j.prompts[0]}@v{self.version}" for j in jobs]

    def exclusive(self, name):
        def job():
            self.log.append(("exclusive", name))
            self.version += 1
            return self.version
        return job


def _blocked_worker(rec, **kw):
    w = ModelWorker(rec.run_batch, **kw)
    w.start()
    gate = threading.Event()
    w.submit_exclusive(gate.wait)  # holds the thread while we queue work
    return w, gate


def test_queries_are_batched_and_exclusive_jobs_run_alone_in_order():
    rec = Recorder()
    w, gate = _blocked_worker(rec, max_batch=3, max_wait_s=0.05)
    f = [w.submit_query(QueryJob([f"q{i}"], 4)) for i in range(4)]
    e = w.submit_exclusive(rec.exclusive("edit"))
    g = [w.submit_query(QueryJob([f"r{i}"], 4)) for i in range(2)]
    gate.set()
    results = [x.result(5) for x in f + g]
    assert e.result(5) == 1
    w.stop()
    assert rec.log == [("batch", ["q0", "q1", "q2"]), ("batch", ["q3"]), ("exclusive", "edit"),
                       ("batch", ["r0", "r1"])]
    assert [r[0] for r in results] == [0, 0, 0, 0, 1, 1]  # version travels with each result
    assert all(r[1].endswith(f"@v{r[0]}") for r in results)


def test_batch_counts_prompts_not_requests():
    rec = Recorder()
    w, gate = _blocked_worker(rec, max_batch=4, max_wait_s=0.05)
    a = w.submit_query(QueryJob(["a", "a2", "a3"], 4))
    b = w.submit_query(QueryJob(["b", "b2"], 4))  # would make 5 rows
    gate.set()
    a.result(5), b.result(5)
    w.stop()
    assert rec.log == [("batch", ["a"]), ("batch", ["b"])]


def test_cancelled_job_is_skipped_and_errors_reach_the_caller():
    rec = Recorder()
    w, gate = _blocked_worker(rec, max_batch=4, max_wait_s=0.0)
    cancelled = w.submit_query(QueryJob(["gone"], 4))
    assert cancelled.cancel()
    boom = w.submit_exclusive(lambda: 1 / 0)
    ok = w.submit_query(QueryJob(["kept"], 4))
    gate.set()
    with pytest.raises(ZeroDivisionError):
        boom.result(5)
    assert ok.result(5)[1] == "kept@v0"
    w.stop()
    assert ("batch", ["gone"]) not in rec.log


def test_stop_fails_queued_jobs_and_refuses_new_ones():
    rec = Recorder()
    w = ModelWorker(rec.run_batch, max_batch=2, max_wait_s=0.0)
    w.start()
    started = threading.Event()
    w.submit_exclusive(lambda: (started.set(), time.sleep(0.3)))
    started.wait(5)
    pending = w.submit_query(QueryJob(["late"], 4))
    w.stop()
    with pytest.raises(WorkerStoppedError):
        pending.result(5)
    with pytest.raises(WorkerStoppedError):
        w.submit_query(QueryJob(["after"], 4))
