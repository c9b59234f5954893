"""ModelWorker: the one thread that touches the model.

Queries are micro-batched (up to ``max_batch`` prompts, waiting at most ``max_wait_s`` for more);
exclusive jobs (edit, rollback) run alone between batches. Because every weight change happens on
this thread between batches, a batch is always served by exactly one version of the weights, and the
version each caller gets back is the one that was live while its batch ran.

HTTP code only calls :meth:`submit_query` / :meth:`submit_exclusive` and awaits the futures.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from service.inference import QueryJob

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _Queued:
    job: QueryJob | Callable[[], Any]
    future: Future

    @property
    def exclusive(self) -> bool:
        return not isinstance(self.job, QueryJob)


class WorkerStoppedError(RuntimeError):
    """The worker is not running; nothing was done."""


class ModelWorker:
    """Runs query batches and exclusive jobs on one thread.

    ``run_batch(jobs) -> (version, results per job)`` answers a list of queries;
    ``on_batch(size)`` is told each batch's prompt count (metrics).
    """

    def __init__(
        self,
        run_batch: Callable[[list[QueryJob]], tuple[int, list[Any]]],
        max_batch: int = 8,
        max_wait_s: float = 0.005,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._q: queue.Queue = queue.Queue()
        self._held: deque[_Queued] = deque()
        self._thread: threading.Thread | None = None
        self._running = False

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the job in hand, fail the queued ones, and join the thread."""
        if not self._running:
            return
        self._running = False
        self._q.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        while True:
            try:
                item = self._held.popleft() if self._held else self._q.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Queued) and item.future.set_running_or_notify_cancel():
                item.future.set_exception(WorkerStoppedError("service is shutting down"))

    @property
    def alive(self) -> bool:
        return self._running and self._thread is not None and self._thread.is_alive()

    # ---- submission ----------------------------------------------------------------------------
    def submit_query(self, job: QueryJob) -> Future:
        """Queue a query; the future resolves to ``(version, results)``."""
        return self._submit(job)

    def submit_exclusive(self, fn: Callable[[], Any]) -> Future:
        """Queue a job that runs alone on the model thread; the future resolves to its return value."""
        return self._submit(fn)

    def _submit(self, job) -> Future:
        if not self._running:
            raise WorkerStoppedError("model worker is not running")
        fut: Future = Future()
        self._q.put(_Queued(job, fut))
        return fut

    # ---- loop ----------------------------------------------------------------------------------
    def _next(self, timeout: float | None = None):
        if self._held:
            return self._held.popleft()
        return self._q.get(timeout=timeout) if timeout is not None else self._q.get()

    def _loop(self) -> None:
        while True:
            item = self._next()
            if item is _STOP:
                return
            if not self._running:  # stopping: leave it for stop() to fail
                self._held.appendleft(item)
                return
            if item.exclusive:
                self._run_exclusive(item)
                continue
            batch = [item]
            rows = item.job.rows
            deadline = time.monotonic() + self.max_wait_s
            while rows < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0 and not self._held and self._q.empty():
                    break
                try:
                    nxt = self._next(timeout=max(remaining, 0.0))
                except queue.Empty:
                    break
                if nxt is _STOP or nxt.exclusive or rows + nxt.job.rows > self.max_batch:
                    self._held.appendleft(nxt)  # runs next, after this batch
                    break
                batch.append(nxt)
                rows += nxt.job.rows
            self._run_queries(batch)

    def _run_exclusive(self, item: _Queued) -> None:
        if not item.future.set_running_or_notify_cancel():
            return  # the caller gave up before it started
        try:
            item.future.set_result(item.job())
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            item.future.set_exception(err)

    def _run_queries(self, batch: list[_Queued]) -> None:
        live = [q for q in batch if q.future.set_running_or_notify_cancel()]
        if not live:
            return
        if self.on_batch is not None:
            self.on_batch(sum(q.job.rows for q in live))
        try:
            version, results = self.run_batch([q.job for q in live])
        except BaseException as err:  # noqa: BLE001 - handed to every caller of the batch
            log.exception("query batch failed")
            for q in live:
                q.future.set_exception(err)
            return
        for q, res in zip(live, results, strict=True):
            q.future.set_result((version, res))
